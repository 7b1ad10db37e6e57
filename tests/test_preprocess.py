"""The shared preprocessing: pitch resampling, normalisation, padding, channel matching."""
import numpy as np
import pytest

from detector.preprocess import Preprocessing, model_size, normalize, prepare, select_channels, to_model_pitch
from detector.scan import ScanError, scan_from_counts


def test_to_model_pitch_halves_and_preserves_mean():
    pre = Preprocessing(model_pitch_mm=10.0)
    att = np.random.default_rng(0).uniform(0, 5, (2, 64, 200)).astype(np.float32)
    out = to_model_pitch(att, 5.0, pre)
    assert out.shape == (2, 32, 100)
    assert out.mean() == pytest.approx(att.mean(), rel=1e-4)  # area resampling conserves attenuation
    assert to_model_pitch(att, 10.0, pre).shape == att.shape
    assert model_size(641, 2401, 5.0, pre) == (320, 1200)


def test_normalize_clips_and_scales():
    pre = Preprocessing(clip_max=10.0, scale=2.0)
    x = normalize(np.array([-1.0, 0.0, 4.0, 30.0], np.float32), pre)
    np.testing.assert_allclose(x, [0.0, 0.0, 2.0, 5.0])
    assert x.dtype == np.float32


def test_prepare_pads_with_air_and_reports_scale():
    counts = np.full((2, 101, 333), 20000, np.uint16)
    scan = scan_from_counts(counts, i0=50000, pitch_mm=5.0)
    p = prepare(scan, Preprocessing(), channels=2)
    h, w = p.valid_hw
    assert p.x.shape[1] % 32 == 0 and p.x.shape[2] % 32 == 0
    assert (h, w) == (50, 166)
    assert np.all(p.x[:, h:, :] == 0) and np.all(p.x[:, :, w:] == 0)
    assert p.scale_yx == pytest.approx((101 / 50, 333 / 166))
    assert p.x[:, :h, :w].min() > 0


def test_prepare_round_trip_dict():
    pre = Preprocessing(model_pitch_mm=7.5, clip_max=9.0, scale=2.5, pad_multiple=16)
    assert Preprocessing.from_dict({**pre.to_dict(), "unknown": 1}) == pre


def test_select_channels():
    dual = np.zeros((2, 8, 8), np.float32)
    dual[0] = 1
    assert select_channels(dual, 1)[0].max() == 1  # keeps the high energy
    with pytest.raises(ScanError, match="needs 2"):
        select_channels(dual[:1], 2, "one.png")

"""The shared preprocessing: pitch resampling, normalisation, padding, channel matching."""
import numpy as np
import pytest

from detector.preprocess import (Preprocessing, find_bad_rows, model_size, normalize, prepare, repair_bad_rows,
                                  select_channels, to_model_pitch)
from detector.scan import ScanError, counts_to_attenuation, scan_from_counts


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
    counts = np.array([20000, 15000], np.uint16)[:, None, None].repeat(101, 1).repeat(333, 2)   # low attenuates more
    counts[:, 40:60, 100:200] = np.array([8000, 4500], np.uint16)[:, None, None]   # a blank image is refused
    scan = scan_from_counts(counts, i0=50000, pitch_mm=5.0)
    p = prepare(scan, Preprocessing(), channels=2)
    h, w = p.valid_hw
    assert p.x.shape[1] % 32 == 0 and p.x.shape[2] % 32 == 0
    assert (h, w) == (50, 166)
    assert np.all(p.x[:, h:, :] == 0) and np.all(p.x[:, :, w:] == 0)
    assert p.scale_yx == pytest.approx((101 / 50, 333 / 166))
    assert p.x[:, :h, :w].min() > 0


def test_prepare_round_trip_dict():
    pre = Preprocessing(model_pitch_mm=7.5, clip_max=9.0, scale=2.5, pad_multiple=16, repair_rows=False)
    assert Preprocessing.from_dict({**pre.to_dict(), "unknown": 1}) == pre
    assert Preprocessing().repair_rows and Preprocessing.from_dict(Preprocessing().to_dict()).repair_rows
    old = {k: v for k, v in Preprocessing().to_dict().items() if k != "repair_rows"}
    assert not Preprocessing.from_dict(old).repair_rows   # a bundle from before the repair runs without it


I0 = 50000.0


def truck_with_bad_rows(dead: int | slice = 70, hot: int = 60, hot_level: float = 0.5):
    """Clean and measured (2, 120, 400) attenuation of a truck-like scene: air around it, light cargo,
    a dense block, a thin roof plate that ends with the truck; a dead and a hot detector row."""
    from detector.synth.render import DetectorModel, detect

    clean = np.zeros((2, 120, 400), np.float32)
    clean[:, 30:110, 60:340] = [[[0.6]], [[0.78]]]       # cargo (the low energy attenuates more, as in all matter)
    clean[:, 50:95, 100:300] = [[[3.0]], [[3.6]]]        # dense block
    clean[:, 30, 60:340] = [[2.0], [2.5]]                # roof plate seen edge-on: one row, truck length
    counts = detect(clean, np.random.default_rng(0), DetectorModel(i0=I0, dead_rows=0, hot_rows=0, psf_sigma=0))
    counts = counts.astype(np.float64)
    counts[:, dead] *= 0.02                              # as detector.synth.render.detect makes them
    counts[:, hot] = np.maximum(counts[:, hot], hot_level * I0)
    return clean, counts_to_attenuation(np.rint(counts).astype(np.uint16), I0)


def test_dead_and_hot_detector_rows_are_found_and_mended():
    clean, att = truck_with_bad_rows()
    bad = find_bad_rows(att)
    assert bad.shape == (2, 120)
    assert [np.nonzero(b)[0].tolist() for b in bad] == [[60, 70], [60, 70]]   # not the roof plate (row 30)
    fixed = repair_bad_rows(att)
    for y in (60, 70):
        assert np.abs(att[:, y] - clean[:, y]).mean() > 0.3
        assert np.abs(fixed[:, y] - clean[:, y]).mean() < 0.05
    keep = np.ones(120, bool)
    keep[[60, 70]] = False
    np.testing.assert_array_equal(fixed[:, keep], att[:, keep])                # nothing else touched
    quiet = np.delete(att, [60, 70], axis=1)
    assert not find_bad_rows(quiet).any() and repair_bad_rows(quiet) is quiet


@pytest.mark.parametrize("first, count", [(70, 2), (64, 16)])
def test_runs_of_adjacent_dead_rows_a_failed_board_are_found_and_mended(first, count):
    clean, att = truck_with_bad_rows(dead=slice(first, first + count), hot=90)
    bad = find_bad_rows(att)
    want = [*range(first, first + count), 90]
    assert [np.nonzero(b)[0].tolist() for b in bad] == [want, want]
    fixed = repair_bad_rows(att)
    assert np.abs(fixed[:, first:first + count] - clean[:, first:first + count]).mean() < 0.05
    assert np.abs(att[:, first:first + count] - clean[:, first:first + count]).mean() > 3


def test_synthetic_trucks_without_bad_rows_have_none_found():
    from detector.synth.render import DetectorModel
    from detector.synth.scene import generate_scan

    for seed in range(6):   # real structure (tanks, rails, roofs, wheels) is never taken for a bad row
        s = generate_scan(seed, anomaly=bool(seed % 2), detector=DetectorModel(dead_rows=0, hot_rows=0))
        assert not find_bad_rows(counts_to_attenuation(s.counts, s.i0)).any(), seed


def test_prepare_mends_bad_rows_only_when_asked():
    _, att = truck_with_bad_rows()
    counts = np.rint(I0 * np.exp(-att)).astype(np.uint16)
    scan = scan_from_counts(counts, i0=I0, pitch_mm=10.0)     # model pitch: rows are not averaged away
    on, off = prepare(scan, Preprocessing(), 2).x, prepare(scan, Preprocessing(repair_rows=False), 2).x
    assert np.abs(off[:, 70] - on[:, 70]).max() > 0.5
    np.testing.assert_array_equal(on[:, :60], off[:, :60])


def test_select_channels():
    dual = np.zeros((2, 8, 8), np.float32)
    dual[0] = 1
    assert select_channels(dual, 1)[0].max() == 1  # keeps the high energy
    with pytest.raises(ScanError, match="needs 2"):
        select_channels(dual[:1], 2, "one.png")


def test_coarse_pitch_that_would_blow_up_memory_is_refused_before_resampling():
    counts = np.full((1, 600, 2000), 20000, np.uint16)
    counts[0, 300:, 100:1900] = 5000
    scan = scan_from_counts(counts, i0=50000, pitch_mm=60.0, source="coarse.tiff")   # 60 mm: 6x up at 10 mm
    with pytest.raises(ScanError, match="Mpx limit") as e:
        prepare(scan, Preprocessing(), channels=1)
    assert e.value.path == "coarse.tiff"

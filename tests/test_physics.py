"""Beer-Lambert additivity and the dual-energy material ordering, in the table and in rendered scans."""
import numpy as np
import pytest

from detector import physics
from detector.synth.render import Canvas, DetectorModel, detect


def test_stacked_materials_add_and_transmissions_multiply():
    a_steel = physics.attenuation("steel", 3.0)
    a_water = physics.attenuation("water", 40.0)
    stack = physics.attenuation_stack([("steel", 3.0), ("water", 40.0)])
    np.testing.assert_allclose(stack, a_steel + a_water, rtol=1e-6)
    np.testing.assert_allclose(physics.transmission(stack),
                               physics.transmission(a_steel) * physics.transmission(a_water), rtol=1e-5)
    # doubling the thickness doubles the attenuation (exponential law)
    np.testing.assert_allclose(physics.attenuation("lead", 4.0), 2 * physics.attenuation("lead", 2.0), rtol=1e-6)
    # 10 cm of steel at 4 MeV: mu/rho 0.0331 cm2/g * 7.85 g/cm3 * 10 cm
    assert physics.attenuation("steel", 10.0)[0] == pytest.approx(0.0331 * 7.85 * 10, rel=0.01)


def test_thickness_maps_sum_to_attenuation():
    t = {"steel": np.full((4, 5), 2.0, np.float32), "plastic": np.full((4, 5), 30.0, np.float32)}
    att = physics.attenuation_from_thickness(t)
    np.testing.assert_allclose(att[:, 0, 0], physics.attenuation_stack([("steel", 2.0), ("plastic", 30.0)]), rtol=1e-5)


def test_ratio_order_in_table():
    r = [physics.dual_energy_ratio(*physics.material(m).mu) for m in physics.ORDER_CHECK]
    assert r == sorted(r) and r[0] < 0.70 < r[1] < 0.75 < r[2] < 0.8 < r[3]


def test_ratio_order_measured_in_rendered_scan():
    """Blocks of similar high-energy attenuation (~2) render with R ordered by Z, despite noise."""
    cv = Canvas(120, 400, 5.0, ground_row=119)
    thick = {"plastic": 60.0, "aluminium": 24.0, "steel": 7.7, "lead": 4.2}
    for i, (mat, t) in enumerate(thick.items()):
        cv.rect(mat, 5 + i * 50, 5, 5 + i * 50 + 40, 45, t)
    counts = detect(cv.attenuation(), np.random.default_rng(0), DetectorModel(dead_rows=0, hot_rows=0))
    att = physics.attenuation_from_counts(counts, physics.I0_DEFAULT)
    ratios = []
    for i in range(4):
        ys, xs = slice(120 - 1 - 80, 120 - 1 - 20), slice(int((5 + i * 50 + 5) * 2), int((5 + i * 50 + 35) * 2))
        ratios.append(att[0][ys, xs].mean() / att[1][ys, xs].mean())
    assert ratios == sorted(ratios), ratios
    assert ratios[1] - ratios[0] > 0.02 and ratios[3] - ratios[2] > 0.08


def test_counts_roundtrip_and_open_beam():
    att = np.array([[0.0, 1.0, 5.0]], np.float32)
    c = physics.counts_from_attenuation(att)
    assert c.dtype == np.uint16 and abs(int(c[0, 0]) - 53000) <= 1
    np.testing.assert_allclose(physics.attenuation_from_counts(c), att, atol=2e-3)


def test_unknown_material_names_the_known_ones():
    with pytest.raises(KeyError, match="steel"):
        physics.material("unobtainium")


def test_canvas_draws_only_its_roi_and_clips_at_the_border():
    """A shape half outside the canvas adds exactly the visible part of the same shape drawn whole."""
    big = Canvas(100, 200, 5.0, ground_row=99)
    small = Canvas(100, 100, 5.0, ground_row=99)
    small.ox = -50.0                                           # small shows columns 100..199 of big
    for cv in (big, small):
        cv.ellipse("steel", 48.0, 25.0, 10.0, 8.0, 6.0, profile="ball", angle=20)
        cv.rect("water", 45.0, 5.0, 60.0, 12.3, 30.0)
        cv.poly("plastic", [(40, 30), (60, 30), (55, 45)], 10.0)
    np.testing.assert_allclose(small.attenuation(), big.attenuation()[:, :, 100:], atol=1e-5)
    assert big.attenuation()[:, :, :90].max() > 0 and small.attenuation().max() > 0
    # a block's total attenuation is mu * depth * area, whatever its sub-pixel position
    cv = Canvas(50, 50, 5.0, ground_row=49)
    cv.rect("steel", 3.13, 4.27, 13.13, 9.27, 2.0)
    area_px = (10 * 2) * (5 * 2)
    np.testing.assert_allclose(cv.attenuation().sum(axis=(1, 2)), physics.attenuation("steel", 2.0) * area_px, rtol=1e-4)


def test_fast_normal_noise_is_standard_normal_and_deterministic():
    from detector.synth.render import normal_noise
    z = normal_noise(np.random.default_rng(3), (400, 500))
    assert z.dtype == np.float32 and z.shape == (400, 500)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and 3.5 < z.max() < 4.5
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.003      # Gaussian tails, not uniform
    np.testing.assert_array_equal(z, normal_noise(np.random.default_rng(3), (400, 500)))
    assert not np.array_equal(z, normal_noise(np.random.default_rng(4), (400, 500)))


def _slabs(levels, h=200, w=100):
    att = np.zeros((2, h, w * len(levels)), np.float32)
    for i, a in enumerate(levels):
        att[:, :, i * w:(i + 1) * w] = a
    return att, [slice(i * w, (i + 1) * w) for i in range(len(levels))]


def test_photon_noise_is_poisson_in_counts_so_dense_regions_are_noisier():
    """Counts: variance = mean (+ read noise^2); in attenuation the noise grows with the density."""
    m = DetectorModel(psf_sigma=0, dose_jitter=0, row_gain=0, dead_rows=0, hot_rows=0)
    att, cols = _slabs([0.5, 2.0, 5.0])
    counts = detect(att, np.random.default_rng(0), m).astype(np.float64)
    a = physics.attenuation_from_counts(counts, m.i0)
    for c, level in zip(cols, (0.5, 2.0, 5.0)):
        mean = m.i0 * np.exp(-level)
        x = counts[:, :, c]
        assert abs(x.mean() / mean - 1) < 0.01
        assert 0.94 < x.var() / (mean + m.read_noise ** 2) < 1.06, (level, x.var(), mean)
    sd = [a[:, :, c].std() for c in cols]
    assert sd[0] < sd[1] < sd[2] and sd[2] > 5 * sd[0]


def test_photon_starved_and_saturated_pixels_stay_in_range():
    """No log(0) behind very dense matter; an open beam above the 16-bit range clips, never wraps."""
    m = DetectorModel(psf_sigma=0, dead_rows=0, hot_rows=0)
    att, cols = _slabs([30.0, 1e4], h=50)
    counts = detect(att, np.random.default_rng(1), m)
    a = physics.attenuation_from_counts(counts, m.i0)
    assert np.isfinite(a).all() and a.max() <= -np.log(1e-6) + 1e-4 and a.min() > 8
    bright = detect(np.zeros((2, 50, 100), np.float32), np.random.default_rng(2), DetectorModel(i0=80000.0))
    assert bright.dtype == np.uint16 and (bright[:, 5:-5] >= 60000).mean() > 0.99   # 65535, not 80000 - 65536

"""Augmentations keep masks aligned; TIP inserts threats at the configured rate."""
from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from detector.augment import TIP, AugmentConfig, DoseNoise, Stripes, Thickness, train_pipeline


def test_importing_the_training_side_opens_no_network_connection():
    """albumentations asks PyPI for its latest version on import unless told not to: an air-gapped
    site would wait on it in every loader process."""
    import os
    import subprocess
    import sys
    code = ("import socket\n"
            "def refuse(*a, **k): raise SystemExit(f'network call {a[:2]}')\n"
            "socket.getaddrinfo = socket.create_connection = refuse\n"
            "import detector.augment\n"
            "print('quiet')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"})
    assert p.returncode == 0 and p.stdout.strip() == "quiet", p.stdout + p.stderr[-1500:]


def _scene(rng):
    img = np.full((96, 128, 2), 0.8, np.float32) + rng.random((96, 128, 2)).astype(np.float32) * 0.1
    mask = np.zeros((96, 128), np.uint8)
    mask[20:34, 70:90] = 1
    img[mask == 1] += 3.0
    return img, mask


def test_masks_stay_aligned_through_the_pipeline():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(hflip=0.5, scale_p=1.0, noise_p=1.0, stripes_p=1.0, blur_p=0.0)
    pipe = train_pipeline(cfg, 10.0, seed=3)
    flipped = 0
    for _ in range(12):
        img, mask = _scene(rng)
        r = pipe(image=img, mask=mask)
        out, m = r["image"], r["mask"]
        assert out.shape == img.shape and out.dtype == np.float32 and m.shape == mask.shape
        assert m.sum() > 0.6 * mask.sum()
        inside, outside = out[m == 1].mean(), out[(m == 0) & (out.sum(-1) > 0)].mean()
        assert inside > outside + 1.5          # the dense object is where the mask says
        flipped += m[:, :64].sum() > m[:, 64:].sum()
    assert 0 < flipped < 12                    # horizontal flips happen, both ways


def test_dose_noise_and_stripes_change_only_the_image():
    rng = np.random.default_rng(1)
    img, mask = _scene(rng)
    r = A.Compose([Stripes(sigma=0.05, p=1), DoseNoise(photons=(1e3, 1e3), p=1)], seed=0)(image=img, mask=mask)
    assert np.array_equal(r["mask"], mask)
    d = r["image"] - img
    assert 0.01 < d.std() < 0.5 and abs(d[mask == 0].mean()) < 0.1
    assert r["image"].min() >= 0


def test_dose_noise_has_the_poisson_mean_and_spread_at_high_and_low_counts():
    """The Gaussian stand-in (>= GAUSS_COUNTS counts) and the exact low-count draw both give the
    attenuation noise of Poisson photon counts: sd ~ 1/sqrt(counts), and the upward bias at few counts."""
    from detector.augment import GAUSS_COUNTS
    n0 = 2e5
    for a in (0.5, 4.0, 7.0, 9.0, 11.0):                # 121k .. 3.3 counts: both paths
        img = np.full((300, 300, 1), a, np.float32)
        out = DoseNoise().apply(img, n0=n0, seed=3)
        lam = n0 * np.exp(-a)
        ref = -np.log(np.maximum(np.random.default_rng(4).poisson(lam, img.shape), 1) / n0)
        assert (lam >= GAUSS_COUNTS) == (a < 7.6)
        assert abs(out.std() / ref.std() - 1) < 0.02, a
        assert abs(out.mean() - ref.mean()) < 4 * ref.std() / 300 + 1e-6, a
        if lam > 100:
            assert abs(out.std() * np.sqrt(lam) - 1) < 0.02, a


def test_thickness_scales_both_energies_alike_and_keeps_the_material_ratio():
    rng = np.random.default_rng(4)
    img, mask = _scene(rng)
    img[..., 1] *= 1.4                         # low energy attenuates more: a material signature
    pipe = A.Compose([Thickness(limit=0.2, p=1)], seed=0)
    factors = []
    for _ in range(30):
        r = pipe(image=img, mask=mask)
        assert np.array_equal(r["mask"], mask)
        f = r["image"][..., 0] / img[..., 0]
        assert np.allclose(f, f.flat[0], rtol=1e-5)          # one factor for the whole crop
        assert np.allclose(r["image"][..., 1] / r["image"][..., 0], img[..., 1] / img[..., 0], rtol=1e-5)
        factors.append(f.flat[0])
    assert 0.8 <= min(factors) < 0.95 and 1.05 < max(factors) <= 1.2
    assert len(train_pipeline(AugmentConfig(thickness=0.15), 10.0).transforms) > \
        len(train_pipeline(AugmentConfig(thickness=0.0), 10.0).transforms)


def test_tip_rate_and_mask_matches_inserted_attenuation():
    img = np.full((128, 128, 2), 1.0, np.float32)
    pipe = A.Compose([TIP(pitch_mm=10.0, p=0.3)], seed=0)
    n, hits = 200, 0
    for _ in range(n):
        r = pipe(image=img, mask=np.zeros((128, 128), np.uint8))
        if r["mask"].any():
            hits += 1
            added = (r["image"] - img).max(-1)
            assert (added[r["mask"] == 1] > 0).all() and np.allclose(added[r["mask"] == 0], 0)
    assert abs(hits / n - 0.3) < 0.08


def test_tip_scale_makes_the_same_threat_fainter():
    rng = np.random.default_rng(3)
    img, _ = _scene(rng)
    empty = np.zeros(img.shape[:2], np.uint8)
    full = A.Compose([TIP(pitch_mm=10.0, p=1.0)], seed=4)(image=img, mask=empty)
    faint = A.Compose([TIP(pitch_mm=10.0, p=1.0, scale=(0.3, 0.3))], seed=4)(image=img, mask=empty)
    assert full["mask"].any() and np.array_equal(full["mask"], faint["mask"])     # same threat, same place
    np.testing.assert_allclose(faint["image"] - img, 0.3 * (full["image"] - img), atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        TIP(scale=(0.0, 1.0))


def test_tip_skips_crops_that_already_have_an_anomaly():
    rng = np.random.default_rng(2)
    img, mask = _scene(rng)
    r = A.Compose([TIP(pitch_mm=10.0, p=1.0)], seed=0)(image=img, mask=mask)
    assert np.array_equal(r["image"], img) and np.array_equal(r["mask"], mask)


def test_concealed_packages_go_to_the_dense_half_with_their_net_contrast():
    img = np.repeat(np.linspace(1.0, 1.5, 128, dtype=np.float32)[None, :, None], 128, 0).repeat(2, 2)
    img[:, :64] += 4.0                          # a dense vehicle part on the left, light cargo on the right
    empty = np.zeros(img.shape[:2], np.uint8)
    pipe = A.Compose([TIP(pitch_mm=10.0, p=1.0, conceal=1.0)], seed=0)
    plain = A.Compose([TIP(pitch_mm=10.0, p=1.0)], seed=0)
    in_dense, plain_dense, n = 0, 0, 60
    for _ in range(n):
        m = pipe(image=img, mask=empty)["mask"].astype(bool)
        in_dense += m[:, :64].sum() > m[:, 64:].sum()
        m = plain(image=img, mask=empty)["mask"].astype(bool)
        plain_dense += m[:, :64].sum() > m[:, 64:].sum()
    assert in_dense / n > 0.62 and in_dense > plain_dense + 6   # half placed in the dense half, half anywhere
    full = A.Compose([TIP(pitch_mm=10.0, p=1.0, conceal=1.0, conceal_scale=(1.0, 1.0))], seed=5)(image=img, mask=empty)
    net = A.Compose([TIP(pitch_mm=10.0, p=1.0, conceal=1.0, conceal_scale=(0.3, 0.3))], seed=5)(image=img, mask=empty)
    assert full["mask"].any() and np.array_equal(full["mask"], net["mask"])      # same package, same place
    np.testing.assert_allclose(net["image"] - img, 0.3 * (full["image"] - img), atol=1e-5)
    with pytest.raises(ValueError, match="conceal"):
        TIP(conceal=1.5)
    with pytest.raises(ValueError, match="conceal_scale"):
        TIP(conceal=0.5, conceal_scale=(0.0, 1.0))
    tip_t = train_pipeline(AugmentConfig(tip_rate=0.5, tip_conceal=0.4, tip_conceal_scale=(0.3, 0.6)), 10.0).transforms[0]
    assert isinstance(tip_t, TIP) and tip_t.conceal == 0.4 and tip_t.conceal_scale == (0.3, 0.6)


def test_package_threat_and_dense_region():
    from detector import tip
    rng = np.random.default_rng(0)
    full = tip.make_package(np.random.default_rng(1), pitch_mm=10.0)
    faint = tip.make_package(np.random.default_rng(1), pitch_mm=10.0, contrast=0.25)
    assert full.kind == "package" and full.attenuation.shape[0] == 2 and full.mask.sum() > 20
    np.testing.assert_allclose(faint.attenuation, 0.25 * full.attenuation, rtol=1e-6)
    assert np.array_equal(faint.mask, full.mask)                                  # fainter, same extent
    assert tip.make_package(rng, pitch_mm=10.0, channels=1).attenuation.shape[0] == 1
    att = np.repeat(np.linspace(1.0, 1.5, 80, dtype=np.float32)[None, None], 60, 1).repeat(2, 0)
    att[:, :, 50:] += 3.0
    region = np.ones((60, 80), bool)
    region[:, :10] = False
    dense = tip.dense_region(att, region)
    assert dense[:, 55:].all() and not dense[:, :40].any() and not (dense & ~region).any()


def test_tip_from_a_library_projects_its_threats_flipped_and_share_zero_changes_nothing():
    from detector import tip
    img = np.full((128, 128, 2), 1.0, np.float32)
    empty = np.zeros((128, 128), np.uint8)
    lib = [tip.make_threat(np.random.default_rng(i), "firearm", pitch_mm=10.0) for i in range(3)]
    sums = sorted(round(float(t.attenuation.sum()), 3) for t in lib)
    pipe = A.Compose([TIP(pitch_mm=10.0, p=1.0, library=lib, library_share=1.0)], seed=0)
    shapes = set()
    for _ in range(20):
        r = pipe(image=img, mask=empty)
        added = r["image"] - img
        assert round(float(added.sum()), 3) in sums                 # one of the library's threats, whole
        m = r["mask"].astype(bool)
        assert (added.max(-1)[m] > 0).all() and np.allclose(added[~m], 0)
        ys, xs = np.nonzero(m)
        shapes.add(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].tobytes())
    assert len(shapes) > 3                                           # more than the 3 threats as they are: flipped
    plain = A.Compose([TIP(pitch_mm=10.0, p=1.0)], seed=7)(image=img, mask=empty)
    unused = A.Compose([TIP(pitch_mm=10.0, p=1.0, library=lib, library_share=0.0)], seed=7)(image=img, mask=empty)
    assert np.array_equal(plain["image"], unused["image"]) and np.array_equal(plain["mask"], unused["mask"])
    with pytest.raises(ValueError, match="library_share"):
        TIP(library=lib, library_share=1.5)
    t = train_pipeline(AugmentConfig(tip_rate=0.5, tip_from_labels=0.3), 10.0, library=lib).transforms[0]
    assert isinstance(t, TIP) and t.library_share == 0.3 and len(t.library) == 3


def test_tip_noise_adds_the_photon_noise_of_the_threat_inside_it_only():
    from detector.augment import TIP_MAX_STD, TIP_PHOTONS, TIP_READ

    def std(a):
        return np.minimum(np.sqrt(np.exp(a) / TIP_PHOTONS + (TIP_READ / TIP_PHOTONS) ** 2 * np.exp(2 * a)), TIP_MAX_STD)

    img = np.full((128, 128, 2), 5.0, np.float32)     # dense cargo: the threat's photons run low behind it
    empty = np.zeros((128, 128), np.uint8)
    ratios = []
    for seed in range(6):
        plain = A.Compose([TIP(pitch_mm=10.0, p=1.0, kinds=("small_metal",))], seed=seed)(image=img, mask=empty)
        noisy = A.Compose([TIP(pitch_mm=10.0, p=1.0, kinds=("small_metal",), noise=True)], seed=seed)(image=img,
                                                                                                     mask=empty)
        m = plain["mask"].astype(bool)
        assert m.any() and np.array_equal(m, noisy["mask"])                 # the same threat in the same place
        assert np.array_equal(noisy["image"][~m], img[~m])                  # nothing outside it
        added = plain["image"] - img
        expected = np.sqrt(std(plain["image"]) ** 2 - std(img) ** 2)
        inside = m[..., None] & (added > 0)
        ratios.append(((noisy["image"] - plain["image"])[inside] / expected[inside]))
    r = np.concatenate(ratios)
    assert abs(r.mean()) < 0.1 and 0.85 < r.std() < 1.15                   # zero-mean, the missing spread
    light = np.full((128, 128, 2), 0.5, np.float32)                         # thin cargo: almost nothing missing
    a = A.Compose([TIP(pitch_mm=10.0, p=1.0, kinds=("firearm",))], seed=1)(image=light, mask=empty)
    b = A.Compose([TIP(pitch_mm=10.0, p=1.0, kinds=("firearm",), noise=True)], seed=1)(image=light, mask=empty)
    assert np.abs(b["image"] - a["image"]).max() < 0.05 * (a["image"] - light).max()
    t = train_pipeline(AugmentConfig(tip_rate=0.5, tip_noise=True), 10.0).transforms[0]
    assert isinstance(t, TIP) and t.noise


def test_a_misspelled_tip_kind_is_refused_not_a_tip_that_never_inserts():
    """A kind make_threat does not know raised inside TIP's placement tries, which swallow ValueErrors (a threat
    that does not fit): TIP then inserted nothing, and a normal-only run trained without a single anomaly."""
    from detector.config import ConfigError, load_config
    with pytest.raises(ValueError, match="firearms"):
        TIP(kinds=("firearms",))
    for bad, why in (("data.augment.tip_kinds=[firearm,package]", "tip_kinds.*'package'"),
                     ("data.augment.tip_scale=[0,1]", "tip_scale"),
                     ("data.augment.tip_conceal_scale=[1,0.5]", "tip_conceal_scale"),
                     ("data.augment.photons=[0,1e5]", "photons")):
        with pytest.raises(ConfigError, match=why):   # at config load, not after the scans are cached
            load_config(None, [bad])
    assert load_config(None, ["data.augment.tip_kinds=[firearm,small_metal]"]).data.augment.tip_kinds == (
        "firearm", "small_metal")


def test_a_scale_or_thickness_jitter_of_one_or_more_is_refused_at_config_load():
    """Affine at scale 1 +- 1 draws a zero or negative magnification (the crop shrinks to nothing or mirrors), and
    Thickness at 1 +- 1.5 negative path lengths: both trained without a word."""
    from detector.config import ConfigError, load_config
    for bad in ("data.augment.scale=1.0", "data.augment.thickness=1.5", "data.augment.stripes_sigma=-0.1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])
    assert load_config(None, ["data.augment.thickness=0.15"]).data.augment.thickness == 0.15

"""Synthetic scans: determinism, masks/boxes on their anomaly, dataset writer and the CLI."""
import csv
import json

import cv2
import numpy as np
import pytest

from detector import physics
from detector.synth import ANOMALY_TYPES, CARGOS, VEHICLES, generate_scan
from detector.synth.dataset import MANIFEST_COLUMNS, write_dataset

H = 160  # small scans keep the tests fast (the pitch follows: ~25 mm)


def test_default_scan_is_a_realistic_size_with_air_on_top():
    s = generate_scan(11, vehicle="tractor_20ft")
    assert s.counts.dtype == np.uint16 and s.counts.shape[0] == 2 and s.pitch_mm == 5.0
    assert 600 <= s.counts.shape[1] <= 850 and 1500 <= s.counts.shape[2] <= 3000
    top = s.counts[:, 2:8].astype(float)
    assert abs(np.median(top) - 53000) < 1500                  # open beam near I0
    att = physics.attenuation_from_counts(s.counts, s.i0)
    assert att[0].max() > 5                                    # dense parts (wheels, engine)


@pytest.mark.parametrize("vehicle", VEHICLES)
def test_every_vehicle_fits_the_scanner_field_at_about_5_mm(vehicle):
    for seed in range(3):
        s = generate_scan(seed, vehicle=vehicle)
        _, h, w = s.counts.shape
        assert 600 <= h <= 850 and 1500 <= w <= 3000, (vehicle, h, w)
        assert 5.0 <= s.pitch_mm <= 5.6                        # only long/tall rigs are squeezed a little
        assert (s.mask.shape == (h, w)) and not s.mask.any()


@pytest.mark.parametrize("kind", ["in_tyre", "in_chassis", "in_fuel_tank"])
def test_hidden_in_vehicle_part_lies_wholly_inside_that_part(kind):
    from detector.synth.scene import PLACED, _stream, build_scene, insert_anomaly
    for seed in range(6):
        ss = np.random.SeedSequence(seed)
        cv, _, _ = build_scene(_stream(ss, 0), height=300, vehicle=str(VEHICLES[seed % len(VEHICLES)]))
        att = cv.attenuation().copy()
        new, mask, box, got = insert_anomaly(att, cv, kind, _stream(ss, 1))
        assert got == kind
        part = cv.regions[PLACED[kind]]
        assert mask.any() and not (mask & ~part).any(), (kind, seed)
        if kind == "in_tyre":                                  # inside the tyre's disc, not its box corners
            n, lab = cv2.connectedComponents(part.astype(np.uint8))
            k = np.bincount(lab[mask]).argmax()
            ys, xs = np.nonzero(lab == k)
            r = (xs.max() - xs.min() + 1) / 2
            cy, cx = (ys.max() + ys.min()) / 2, (xs.max() + xs.min()) / 2
            my, mx = np.nonzero(mask)
            assert (np.hypot(my - cy, mx - cx) <= r + 1).all()
        assert (new - att)[:, ~mask].max() == 0 and (new - att)[:, mask].max() > 0


def test_a_fallback_threat_is_labelled_as_what_was_inserted():
    """A false wall that does not fit its cargo region falls back to a small metal item: the label
    must say small_metal, not false_wall (per-type metrics and hard-type weights read it)."""
    from detector.synth.scene import _stream, build_scene, insert_anomaly
    from detector.tip import cargo_region
    ss = np.random.SeedSequence(3)
    cv, _, _ = build_scene(_stream(ss, 0), height=300, vehicle="box_truck")
    att = cv.attenuation().copy()
    room = cv.regions["cargo"] & cargo_region(att)
    ok = cv2.erode(room.astype(np.uint8), np.ones((31, 31), np.uint8))   # centres of 31x31 windows inside
    yc, xc = np.argwhere(ok)[len(np.argwhere(ok)) // 2]
    cv.regions["cargo"] = np.zeros_like(room)
    cv.regions["cargo"][yc - 15:yc + 16, xc - 15:xc + 16] = True           # too small for a false wall
    new, mask, box, got = insert_anomaly(att, cv, "false_wall", _stream(ss, 1))
    assert got == "small_metal" and mask.any() and mask.sum() < 31 * 31
    assert insert_anomaly(att, cv, "small_metal", _stream(ss, 1))[3] == "small_metal"
    from detector.synth.dataset import scan_seed
    s = generate_scan(scan_seed(21, 2), anomaly="false_wall")   # a flatbed: no false wall fits its open load
    x0, y0, x1, y1 = s.boxes[0]
    assert (s.anomaly_type, y1 - y0 > 100) in {("false_wall", True), ("small_metal", False)}, (s.anomaly_type, s.boxes)


def test_same_seed_same_scan_different_seed_differs():
    a, b = generate_scan(5, anomaly=True, height=H), generate_scan(5, anomaly=True, height=H)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.boxes == b.boxes and a.anomaly_type == b.anomaly_type
    c = generate_scan(6, anomaly=True, height=H)
    assert c.counts.shape != a.counts.shape or not np.array_equal(c.counts, a.counts)


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_mask_and_box_lie_on_the_anomaly(kind):
    seed = 100 + ANOMALY_TYPES.index(kind)
    with_a = generate_scan(seed, anomaly=kind, height=240)
    without = generate_scan(seed, anomaly=None, height=240)
    assert with_a.anomaly_type == kind and without.anomaly_type == "none" and not without.mask.any()
    m = with_a.mask
    assert m.any() and len(with_a.boxes) == 1
    x0, y0, x1, y1 = with_a.boxes[0]
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    a1 = physics.attenuation_from_counts(with_a.counts, with_a.i0)
    a0 = physics.attenuation_from_counts(without.counts, without.i0)
    diff = (a1 - a0).sum(axis=0)
    near = cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(diff[~near]).max() == 0                      # added nowhere else
    assert diff[m].mean() > 0.005                              # and really added on the mask


@pytest.mark.parametrize("kind", ["small_metal", "firearm", "false_wall"])
def test_mask_covers_every_pixel_the_anomaly_changed(kind):
    """Without blur the scan and its twin (same noise draws) differ only where the anomaly added
    attenuation: after the truck-speed column resampling those pixels must all be in the mask."""
    from detector.synth.render import DetectorModel
    for seed in range(3):
        s = generate_scan(300 + seed, anomaly=kind, height=240, detector=DetectorModel(psf_sigma=0), twin=True)
        changed = (s.counts != s.twin_counts).any(axis=0)
        assert changed.any() and not (changed & ~s.mask).any(), (kind, seed, int((changed & ~s.mask).sum()))


def test_twin_is_the_same_scan_without_its_anomaly():
    s = generate_scan(7, anomaly="small_metal", height=H, twin=True)
    np.testing.assert_array_equal(s.counts, generate_scan(7, anomaly="small_metal", height=H).counts)
    np.testing.assert_array_equal(s.twin_counts, generate_scan(7, anomaly=None, height=H).counts)  # same noise too
    assert (s.counts != s.twin_counts).any()
    assert generate_scan(7, anomaly=None, height=H, twin=True).twin_counts is None


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_visibility_is_positive_for_an_anomaly_and_nan_without(kind):
    from detector.synth.visibility import anomaly_visibility, band_of
    v = anomaly_visibility(200 + ANOMALY_TYPES.index(kind), anomaly=kind, height=240)
    assert np.isfinite(v) and v > 0 and band_of(v) != "n/a"
    assert np.isnan(anomaly_visibility(200, anomaly=None, height=240))


def test_visibility_on_another_image_of_the_energies():
    from detector.synth.visibility import anomaly_visibility
    seed = 200 + ANOMALY_TYPES.index("shielded_block")
    high = anomaly_visibility(seed, anomaly="shielded_block", height=240)
    assert anomaly_visibility(seed, anomaly="shielded_block", height=240, image=lambda a: a[0]) == high
    # lead stands out of organic and steel clutter in the material image (high - R_mid * low) too
    mat = anomaly_visibility(seed, anomaly="shielded_block", height=240, image=lambda a: a[0] - 0.733 * a[1])
    assert np.isfinite(mat) and mat > 1 and mat != high


def test_all_vehicles_and_cargos_render():
    for i, v in enumerate(VEHICLES):
        s = generate_scan(i, vehicle=v, height=H)
        assert s.vehicle == v and s.counts.shape[1] == H
    for i, c in enumerate(CARGOS):
        s = generate_scan(i, vehicle="tractor_40ft", cargo=c, height=H)
        assert s.cargo == c
    with pytest.raises(ValueError):
        generate_scan(0, anomaly="teleporter", height=H)


def _read(root):
    with open(root / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_dataset_manifest_and_independent_of_workers(tmp_path):
    one = write_dataset(tmp_path / "w1", 4, seed=7, anomaly_fraction=0.5, workers=1, height=H, split="train", progress=False)
    two = write_dataset(tmp_path / "w2", 4, seed=7, anomaly_fraction=0.5, workers=2, height=H, split="train", progress=False)
    assert one == two
    from detector.scan import read_scan
    for r in _read(tmp_path / "w1"):
        a, b = read_scan(tmp_path / "w1" / r["path"]), read_scan(tmp_path / "w2" / r["path"])
        np.testing.assert_array_equal(a.counts, b.counts)
    rows = _read(tmp_path / "w1")
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert sum(int(r["label"]) for r in rows) == 2
    for r in rows:
        scan = read_scan(tmp_path / "w1" / r["path"])
        mask = cv2.imread(str(tmp_path / "w1" / r["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (scan.height, scan.width) and set(np.unique(mask)) <= {0, 255}
        assert scan.channels == 2 and scan.i0 == (53000.0, 53000.0) and scan.pitch_mm > 15
        assert scan.energies == ("high", "low")
        hi, lo = scan.attenuation
        dense = (lo > 0.5) & (lo < 8)             # pages in (high, low) order: MeV high energy attenuates less
        assert np.median(hi[dense] / lo[dense]) < 0.9
        boxes = json.loads(r["boxes"])
        assert r["split"] == "train" and r["vehicle"] in VEHICLES
        if r["label"] == "1":
            assert r["anomaly_type"] in ANOMALY_TYPES and len(boxes) == 1 and mask.any()
            x0, y0, x1, y1 = boxes[0]
            assert mask[y0:y1, x0:x1].any() and not mask[:, :x0].any() and not mask[:y0].any()
        else:
            assert r["anomaly_type"] == "none" and boxes == [] and not mask.any()


def test_generator_pools_follow_the_cpus_this_process_may_use_not_the_hosts(tmp_path, monkeypatch):
    """A container given 2 of a host's 64 cores (cpuset, taskset): os.cpu_count says 64, and the dataset writer and
    the visibility pass each started a generator process per scan, up to 64."""
    import os

    from detector.synth import dataset, visibility
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    sizes: list[int] = []

    class Pool:   # generator_pool's stand-in: records its size, runs the jobs here
        def __init__(self, workers: int) -> None:
            sizes.append(workers)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def imap_unordered(self, f, jobs, chunksize=1):
            return map(f, jobs)

        def map(self, f, jobs):
            return list(map(f, jobs))
    monkeypatch.setattr(dataset, "generator_pool", Pool)
    monkeypatch.setattr(visibility, "generator_pool", Pool)
    monkeypatch.setattr(visibility, "_of_stem", lambda stem: 1.0)
    write_dataset(tmp_path / "d", 3, seed=1, height=H, progress=False)
    visibility.generator_visibility(["s1_000000", "s1_000001", "s1_000002"], tmp_path / "vis.json")
    assert sizes == [2, 2]


def test_cli_synth_writes_a_small_dataset(tmp_path, capsys):
    from detector.cli import main
    out = tmp_path / "ds"
    rc = main(["synth", str(out), "--count", "2", "--seed", "3", "--anomaly-fraction", "1",
               "--height", str(H), "--workers", "1"])
    assert rc == 0
    rows = _read(out)
    assert len(rows) == 2 and all(r["label"] == "1" for r in rows)
    assert all((out / r["path"]).exists() and (out / r["mask"]).exists() for r in rows)
    text = capsys.readouterr().out
    assert "2 scans (2 anomalous)" in text and f"detector train --data {out}" in text
    held_out = tmp_path / "test"          # a test split is for scoring: the hint must not say train on it
    assert main(["synth", str(held_out), "--count", "1", "--height", str(H), "--workers", "1", "--split", "test"]) == 0
    text = capsys.readouterr().out
    assert f"next: detector score {held_out / 'images'} --model" in text and "detector train" not in text
    assert all(r["split"] == "test" for r in _read(held_out))
    assert "older scan" not in capsys.readouterr().err
    assert main(["synth", str(out), "--count", "1", "--seed", "4", "--height", str(H), "--workers", "1"]) == 0
    err = capsys.readouterr().err                  # the seed-3 scans are still in images/: say so
    assert f"{out / 'images'} also holds 2 older scan(s) the new manifest does not list (e.g. s3_000000.tiff" in err
    assert main(["synth", str(out), "--count", "0"]) == 2 and "--count must be >= 1" in capsys.readouterr().err
    for bad, said in ((["--anomaly-fraction", "5"], "--anomaly-fraction is a share in [0, 1], got 5"),
                      (["--split", "tst"], "--split must be one of test, testing, train, training, val, valid, "
                                           "validation, got 'tst'")):
        assert main(["synth", str(tmp_path / "bad"), "--count", "1", *bad]) == 2, bad   # a line, not a traceback
        assert capsys.readouterr().err == f"detector synth: {said}\n"
    assert not (tmp_path / "bad").exists()


def test_visibility_is_the_added_signal_over_the_high_passed_clutter():
    from detector.synth.visibility import visibility_of
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, (200, 200)).astype(np.float32)   # white clutter: its high-pass keeps ~all of it
    m = np.zeros_like(clean, bool)
    m[90:110, 90:110] = True
    v = visibility_of(clean + 2 * m, clean, m)
    assert 1.9 < v < 2.3 and abs(visibility_of(clean + 4 * m, clean, m) - 2 * v) < 1e-4
    assert np.isnan(visibility_of(clean, clean, np.zeros_like(m)))


def test_generator_visibility_regenerates_generator_scans_by_name_and_caches(tmp_path):
    from detector.synth.dataset import scan_seed
    from detector.synth.scene import GENERATOR_VERSION
    from detector.synth.visibility import anomaly_visibility, generator_visibility
    cache = tmp_path / "vis.json"
    got = generator_visibility(["s5_000003", "my_own_scan"], cache)
    assert set(got) == {"s5_000003"}                      # a name the generator did not write is skipped
    assert got["s5_000003"] == pytest.approx(anomaly_visibility(scan_seed(5, 3)))
    assert json.loads(cache.read_text()) == {**got, "_generator": GENERATOR_VERSION}
    assert generator_visibility(["s5_000003"], cache) == got                      # read back, not regenerated
    cache.write_text(json.dumps({"s5_000003": 9.0}))                               # an older generator's figures
    assert generator_visibility(["s5_000003"], cache) == got
    cache.write_text(json.dumps({"s5_000003": 9.0, "_generator": GENERATOR_VERSION}))
    assert generator_visibility(["s5_000003"], cache) == {"s5_000003": 9.0}        # this generator's: cached


def test_a_dataset_records_the_generator_that_made_it(tmp_path):
    """Benchmarks reuse a data folder by its name (seed and counts); after a generator change the same name held
    other pixels, so the folder says which generator made it."""
    from detector.synth.dataset import SYNTH_INFO, generator_version, write_dataset
    from detector.synth.scene import GENERATOR_VERSION
    assert generator_version(tmp_path / "none") is None
    write_dataset(tmp_path / "d", 2, seed=3, workers=1, height=64, progress=False)
    assert generator_version(tmp_path / "d") == GENERATOR_VERSION
    info = json.loads((tmp_path / "d" / SYNTH_INFO).read_text())
    assert (info["seed"], info["count"], info["height"]) == (3, 2, 64)
    (tmp_path / "d" / SYNTH_INFO).unlink()
    assert generator_version(tmp_path / "d") == 1                                 # made before versions were kept


def test_mask_centres_are_mask_pixels_spread_in_row_order():
    from detector.synth.stream import mask_centres
    m = np.zeros((300, 900), np.uint8)
    m[40:60, 700:720] = 1
    m[200:203, 100:400] = 1
    ys, xs = np.nonzero(m)                       # the reference: every pixel of the mask, row-major
    want = [(int(ys[i]), int(xs[i])) for i in np.linspace(0, len(ys) - 1, 64).astype(int)]
    assert mask_centres(m) == mask_centres(m.astype(bool)) == want
    assert mask_centres(m, n=2000) == list(zip(ys.tolist(), xs.tolist()))   # fewer pixels than n: all of them
    assert mask_centres(np.zeros((30, 40), np.uint8)) == []


def test_a_package_in_the_fuel_tank_displaces_diesel_only_below_its_surface(monkeypatch):
    """Beer-Lambert: a package under the diesel takes the diesel's place (it adds mu_cocaine - mu_diesel per cm);
    above the surface it displaces air and adds all of mu_cocaine. The generator added the wet difference
    everywhere, so the part above the surface (half of the in_fuel_tank packages reach it) showed at ~26 % of its
    physical contrast, and a package could be deeper along the beam than the tank holding it."""
    from detector.synth import scene, threats, vehicles
    from detector.synth.render import Canvas
    cv = Canvas(320, 300, 5.0, ground_row=310.0)
    vehicles.fuel_tank(cv, 10.0, np.random.default_rng(4))
    tank_cols = np.nonzero(cv.regions["fuel_tank"].any(0))[0]
    col = cv.att[0, :, tank_cols[len(tank_cols) // 2]]
    wet_rows = np.nonzero((col > 1.0) & (col < 3.0))[0]        # 50-65 cm of diesel (the steel skins: > 3)
    s = wet_rows.min()                                          # first row full of diesel
    assert wet_rows.max() - s > 12 and (col[s - 12:s - 1] < 0.3).all()   # dry air above the diesel in the tank

    class Block:                                                # one 40 cm deep brick, 16 x 20 px, no wrapping
        def attenuation(self):
            return physics.attenuation("cocaine", np.full((16, 20), 40.0, np.float32))
    depth = []
    monkeypatch.setattr(threats, "narcotics", lambda *a, **k: depth.append(k.get("max_depth")) or Block())
    cv.regions["fuel_tank"] = np.zeros_like(cv.regions["fuel_tank"])
    cv.regions["fuel_tank"][s - 8:s + 8, tank_cols[5]:tank_cols[5] + 60] = True   # forces the brick across the surface
    att = cv.attenuation().copy()
    new, mask, _, got = scene.insert_anomaly(att, cv, "in_fuel_tank", np.random.default_rng(0))
    add = (new - att)[0]
    assert got == "in_fuel_tank" and mask[s - 8:s + 8].sum() == 16 * 20
    mu_c, mu_d = physics.material("cocaine").mu[0], physics.material("diesel").mu[0]
    dry, wet = add[s - 7:s - 1][mask[s - 7:s - 1]], add[s + 1:s + 8][mask[s + 1:s + 8]]
    np.testing.assert_allclose(dry, 40 * mu_c, rtol=1e-4)       # in air: all of it
    np.testing.assert_allclose(wet, 40 * (mu_c - mu_d), rtol=1e-4)   # in diesel: the difference
    assert depth and all(d is not None and d <= 50 for d in depth)   # bricks no deeper than the shallowest tank


def test_a_package_in_the_chassis_is_no_deeper_than_the_rails_channels_hold():
    """A chassis rail is a C-channel: packages pushed into it fill at most its flange's depth along the beam, one rail
    or both. The generator drew 15-88 cm deep bricks and halved them (7.5-44 cm): two thirds deeper than both
    channels hold, so packages in the chassis showed about twice their physical contrast."""
    from detector.synth import scene, vehicles
    mu = physics.material("cocaine").mu[0]
    one, both = (vehicles.RAIL_CHANNEL_CM * k * mu for k in (1, 2))
    assert vehicles.RAIL_CHANNEL_CM < vehicles.RAIL_FLANGE_CM
    peaks = []
    for seed in range(40):
        t = scene._threat_for("in_chassis", np.random.default_rng(seed), 5.0)
        bricks = t.attenuation[0][t.mask]
        peaks.append(float(np.percentile(bricks, 90)))          # the bricks' body (wrapping and seams aside)
        assert bricks.max() <= both * 1.05, seed                # the wrapping adds ~0.02
    assert any(one <= p <= one * 1.1 for p in peaks) and any(both <= p <= both * 1.05 for p in peaks)


def test_a_package_in_a_tyre_lies_in_its_air_space_not_over_the_hub(monkeypatch):
    """A tyre holds packages only in its air space, which a side view shows as a ring between the rim flange and the
    tread band. The generator placed stacked bricks anywhere in the wheel's disc: 78 % of their pixels over the
    wheel disc, hub and axle (solid steel, a fifth of the pixels opaque, where the package could not be seen)."""
    from detector.synth import scene, vehicles
    wheels = []
    draw = vehicles.wheel
    monkeypatch.setattr(vehicles, "wheel", lambda cv, x, r, *a: wheels.append((x, r)) or draw(cv, x, r, *a))
    for seed in range(5):
        wheels.clear()
        ss = np.random.SeedSequence(seed)
        cv, _, _ = scene.build_scene(scene._stream(ss, 0), vehicle=str(VEHICLES[seed % len(VEHICLES)]))
        att = cv.attenuation().copy()
        new, mask, _, got = scene.insert_anomaly(att, cv, "in_tyre", scene._stream(ss, 1))
        ys, xs = np.nonzero(mask)
        dist = [np.hypot(xs + 0.5 - cv.px(x), ys + 0.5 - cv.py(r)) / (r * cv.s) for x, r in wheels]
        rel = np.min(dist, axis=0)                              # radius over the tyre's, from the nearest wheel
        assert got == "in_tyre" and rel.min() > 0.62 and rel.max() < 0.82, (seed, rel.min(), rel.max())
        depth = (new - att)[0][mask].max() / physics.material("cocaine").mu[0]
        assert depth <= 20.5                                    # within one tyre's width along the beam


def test_cli_synth_refuses_a_height_it_cannot_render_and_an_out_it_cannot_write(tmp_path, capsys):
    """--height 0 died in a worker with ZeroDivisionError, a negative one with numpy's 'negative dimensions', and
    an OUT that is a file or cannot be made with a traceback; each is now one line naming the reason, exit 2."""
    from detector.cli import main
    for h in ("0", "-5", "15", "2001"):
        assert main(["synth", str(tmp_path / "h"), "--count", "1", "--height", h, "--workers", "1"]) == 2, h
        assert capsys.readouterr().err == f"detector synth: --height must be 16-2000 px, got {h}\n"
    assert not (tmp_path / "h").exists()
    (tmp_path / "file").write_text("not a folder")
    assert main(["synth", str(tmp_path / "file"), "--count", "1", "--height", str(H), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detector synth: cannot write {tmp_path / 'file'}: ") and "Traceback" not in err
    assert err.count("\n") == 1


def test_cli_synth_refuses_a_negative_seed_before_making_folders(tmp_path, capsys):
    """--seed -1 died in the generator with numpy's 'expected non-negative integer' after making OUT/images and
    OUT/masks (and scan names s{seed}_{index}, which the visibility pass parses, hold no sign)."""
    from detector.cli import main
    assert main(["synth", str(tmp_path / "neg"), "--count", "1", "--seed", "-1", "--height", str(H)]) == 2
    assert capsys.readouterr().err == "detector synth: --seed must be >= 0, got -1\n"
    assert not (tmp_path / "neg").exists()


def test_cli_synth_refuses_a_count_the_disk_cannot_hold_before_making_anything(tmp_path, capsys):
    """--count 100000 wanted ~700 GB: it planned every scan in memory, then wrote until the disk filled, hours in."""
    from detector.cli import main
    assert main(["synth", str(tmp_path / "big"), "--count", str(10**9)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detector synth: {10**9} scans need about ") and "GB free" in err and err.count("\n") == 1
    assert not (tmp_path / "big").exists()

"""Physics sanity checks on what a station is sent: the open beam of a detector of fewer bits, the energy order,
and a scan upside down."""
from __future__ import annotations

import csv
from dataclasses import replace

import cv2
import numpy as np
import pytest

from conftest import make_scan_counts
from detector import physics
from detector.cli import main as cli
from detector.runtime import Inspector
from detector.scan import (ENERGY_RATIO_MAX, NOISE_RATIO_MIN, ScanError, check_scan, energy_ratio, estimate_i0,
                           noise_ratio, read_scan, scan_from_counts, write_scan)
from detector.synth import cargo, vehicles
from detector.synth.scene import VEHICLE_CARGOS, generate_scan

SWAPPED = "the first energy attenuates more than the second"
UPSIDE_DOWN = "open beam along the bottom rows and none at the top: the scan is upside down?"
INVERTED = "the noise is lowest where the image reads brightest"
ALIKE = r"both energies read alike \(ratio 1\.000\): the same energy written twice\?"


@pytest.fixture(scope="module")
def truck():
    """One generator scan: uint16 counts (high, low) with air above the truck and wheels on the road."""
    return generate_scan(3, anomaly=True)


@pytest.mark.parametrize("shift", [4, 2])
def test_fewer_bits_read_with_i0_from_the_air(truck, shift):
    """12-bit (>> 4) and 14-bit (>> 2) counts in a 16-bit container, with no I0 in the metadata: the air above the
    truck (~3300 / ~13000 counts) is the open beam, so the scan reads as the 16-bit one. I0 was taken as 65535 and
    every pixel read 2.8 (1.4) denser: the model scored clean trucks as anomalous (AUROC 0.53 / 0.66)."""
    ref = scan_from_counts(truck.counts).attenuation
    scan = scan_from_counts(truck.counts >> shift)
    assert all(abs(v - truck.i0 / 2 ** shift) < 0.03 * truck.i0 / 2 ** shift for v in scan.i0), scan.i0
    lit = ref < 4.0   # beneath it a 12-bit detector has a few counts left: quantised
    assert float(np.median(np.abs(scan.attenuation - ref)[lit])) < 0.005
    assert float(np.percentile(np.abs(scan.attenuation - ref)[lit], 99)) < 0.1


def test_flat_dense_top_is_not_taken_for_air(truck):
    """A scan cropped at a container roof: its top rows are flat but dense, and the air elsewhere reads brighter;
    they are not the open beam (I0 stays the dtype's maximum)."""
    counts = truck.counts >> 4
    rng = np.random.default_rng(0)
    counts[:, :8] = 300 + rng.integers(0, 6, (2, 8, counts.shape[2]))
    assert estimate_i0(counts, 65535.0) == (65535.0, 65535.0)


def test_flat_brightest_top_of_fewer_bits_is_air():
    """The rule in isolation: flat top rows that are the brightest part of the image (noise allowed) are air."""
    rng = np.random.default_rng(1)
    img = rng.poisson(1500, (1, 100, 200)).astype(np.uint16)   # cargo
    img[:, :20] = rng.poisson(3300, (1, 20, 200))                 # the air above it, 12-bit
    (i0,) = estimate_i0(img, 65535.0)
    assert abs(i0 - 3300) < 10


def _kinds() -> list[tuple[int, str, str]]:
    """(seed, vehicle, cargo): every vehicle, and every cargo on a vehicle that carries it."""
    kinds = [(10 + i, v, None) for i, v in enumerate(vehicles.VEHICLES)]
    return kinds + [(20 + i, "tractor_40ft" if c not in VEHICLE_CARGOS["flatbed"] else "flatbed", c)
                    for i, c in enumerate(cargo.CARGOS)]


@pytest.mark.parametrize("seed,vehicle,load", _kinds())
def test_generator_scans_obey_the_physics_and_pass(seed, vehicle, load):
    """Every vehicle and cargo kind, with and without an anomaly, read as a file without I0 would be: accepted, and
    the high energy attenuates less than the low one (median ratio well under ENERGY_RATIO_MAX)."""
    s = generate_scan(seed, anomaly=bool(seed % 2), vehicle=vehicle, cargo=load)
    scan = scan_from_counts(s.counts, source=f"{vehicle}-{load}")
    ratio = energy_ratio(scan.attenuation)
    assert ratio is not None and 0.6 < ratio < ENERGY_RATIO_MAX - 0.15, ratio


@pytest.mark.parametrize("order,why", [((1, 0), SWAPPED), ((0, 0), ALIKE), ((1, 1), ALIKE)])
def test_swapped_or_duplicated_energies_are_refused(truck, order, why):
    """Low energy first (AUROC 0.55: half the trucks released at random), the same energy twice (0.77, 0.65)."""
    with pytest.raises(ScanError, match=why) as err:
        scan_from_counts(truck.counts[list(order)], source="lane3.tiff")
    assert err.value.path == "lane3.tiff"


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
@pytest.mark.parametrize("make", [lambda c: 65535 - c, lambda c: (65535 - c)[::-1], lambda c: (65535 - c)[:1],
                                  lambda c: 4095 - (c >> 4)], ids=["inverted", "inverted+swapped", "one energy",
                                                                   "12-bit"])
def test_an_inverted_image_is_refused_by_its_noise(seed, make):
    """Dense reads bright (AUROC 0.52): the photon noise, which grows with the counts, is lowest where the image is
    brightest. Caught whatever the energies (inverted and swapped reads as upright to the energy order) and in one
    energy, where no ratio can tell."""
    counts = np.ascontiguousarray(make(generate_scan(seed, anomaly=bool(seed % 2)).counts))
    assert noise_ratio(counts[0]) < NOISE_RATIO_MIN / 2
    with pytest.raises(ScanError, match=INVERTED) as err:
        scan_from_counts(counts, source="lane3.tiff")
    assert err.value.path == "lane3.tiff"


def test_a_log_scaled_display_image_is_refused(truck):
    """Counts written as log(I) (a display export): the noise is largest in the dark, as in an inverted image."""
    logged = (np.log(np.maximum(truck.counts, 1)) * (65535 / np.log(65535))).astype(np.uint16)
    with pytest.raises(ScanError, match=INVERTED + ".*log-scaled"):
        scan_from_counts(logged)


def test_denoised_clipped_and_quantised_counts_keep_their_polarity(truck):
    """What vendors do to upright counts leaves the bright end at least as noisy as the dark: a 5x5 Gaussian
    denoise, open beam painted one flat value (a plateau, left out) with a hot pixel above it, 8-bit data in a
    16-bit file. All read; their inverses (the blurred one, the painted one) are refused."""
    blurred = np.stack([cv2.GaussianBlur(ch, (5, 5), 1.5) for ch in truck.counts])
    painted = truck.counts.copy()
    painted[truck.counts > 0.95 * truck.i0] = 60000
    painted[:, 5, 5] = 65000
    for upright in (blurred, painted, truck.counts >> 8):
        assert noise_ratio(upright[0]) > 2 * NOISE_RATIO_MIN
        assert scan_from_counts(upright).channels == 2
    for inverted in (blurred, painted):
        with pytest.raises(ScanError, match=INVERTED):
            scan_from_counts(65535 - inverted)


@pytest.mark.parametrize("smooth", [lambda ch: cv2.GaussianBlur(ch, (0, 0), 3),
                                    lambda ch: cv2.bilateralFilter(ch.astype(np.float32), 15, 20000, 15),
                                    lambda ch: cv2.medianBlur(cv2.medianBlur(ch, 5), 5)],
                         ids=["gaussian sigma 3", "bilateral", "median 5x5 twice"])
def test_heavily_smoothed_upright_scans_are_read(smooth):
    """A vendor's strong smoothing leaves cargo edges where the noise was: the darkest tenth's median first
    difference measured structure, and 4 of 6 upright scans blurred at sigma 3 read 0.19-0.87, refused as inverted
    (every truck INSPECT at such a site). The quiet quartile of second differences reads them upright (>= 0.88)."""
    for seed in range(3, 9):
        counts = generate_scan(seed, anomaly=bool(seed % 2)).counts
        smoothed = np.stack([smooth(ch) for ch in counts]).clip(0, 65535).astype(np.uint16)
        assert noise_ratio(smoothed[0]) > 1.5 * NOISE_RATIO_MIN, seed
        assert scan_from_counts(smoothed, source=f"smoothed-{seed}.tiff").channels == 2


def test_polarity_is_not_judged_without_noise_or_on_8_bit_pictures(truck):
    """A noise-free rendering of two values has no pairs off its plateaus (None), nor is a window under
    NOISE_MIN_ROWS rows judged; an 8-bit picture inverted (a
    baggage X-ray export, compressed: its noise says little) is not judged."""
    flat = np.full((1, 256, 1024), 30000, np.uint16)
    flat[:, 64:224, 128:896] = 9000
    assert noise_ratio(flat[0]) is None and scan_from_counts(flat).channels == 1
    assert noise_ratio((65535 - truck.counts[0])[300:427]) is None   # a window of a few rows: texture may outweigh noise
    assert noise_ratio((65535 - truck.counts[0])[300:428]) < NOISE_RATIO_MIN
    picture = 255 - (truck.counts[:1] >> 8).astype(np.uint8)
    assert scan_from_counts(picture).channels == 1


def test_an_inverted_scan_built_in_memory_is_refused(truck):
    """check_scan judges the counts a station's Scan carries; without counts, the energy order still refuses it."""
    upright = scan_from_counts(truck.counts, i0=truck.i0)
    inverted = scan_from_counts(truck.counts, i0=truck.i0)
    inverted = replace(inverted, counts=(65535 - truck.counts), attenuation=upright.attenuation[::-1].copy())
    with pytest.raises(ScanError, match=INVERTED):
        check_scan(inverted)
    with pytest.raises(ScanError, match=SWAPPED):
        check_scan(replace(inverted, counts=None))


def test_a_file_naming_its_low_energy_first_is_turned_around_and_accepted(truck, tmp_path):
    """A file whose metadata says (low, high) is turned around before the check, as before; unnamed, it is refused."""
    ref = scan_from_counts(truck.counts, i0=truck.i0)
    named = read_scan(write_scan(tmp_path / "lf.tiff", truck.counts[::-1].copy(), i0=truck.i0,
                                 energies=("low", "high")))
    np.testing.assert_array_equal(named.attenuation, ref.attenuation)
    with pytest.raises(ScanError, match=SWAPPED):
        read_scan(write_scan(tmp_path / "unnamed.tiff", truck.counts[::-1].copy(), i0=truck.i0))


def test_a_scan_built_in_memory_is_checked_too(truck):
    """check_scan (a station's own Scan): swapped refused, the same named (low, high) turned around and accepted."""
    ref = scan_from_counts(truck.counts, i0=truck.i0)
    swapped = replace(ref, attenuation=ref.attenuation[::-1].copy(), counts=None, source="station")
    with pytest.raises(ScanError, match=SWAPPED):
        check_scan(swapped)
    turned = check_scan(replace(swapped, energies=("low", "high")))
    np.testing.assert_array_equal(turned.attenuation, ref.attenuation)


def test_a_nearly_empty_lane_is_not_judged():
    """Fewer than RATIO_SAMPLES attenuating pixels on the 4x grid: too little to say, accepted."""
    counts = np.full((2, 200, 400), 53000, np.uint16)
    counts[:, 150:170, 100:150] = 9000   # 5 x 13 grid samples, the same in both energies
    assert scan_from_counts(counts).channels == 2


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_a_scan_upside_down_is_refused(seed):
    """Rows reversed (wheels at the top, the air at the bottom): the model released trucks at random (AUROC 0.76)."""
    s = generate_scan(seed, anomaly=bool(seed % 2))
    with pytest.raises(ScanError, match=UPSIDE_DOWN.replace("?", r"\?")):
        scan_from_counts(s.counts[:, ::-1].copy(), source="flipped.tiff")


def test_a_small_car_in_a_tall_frame_is_not_refused(truck):
    """Air at the top AND the bottom (a small vehicle in a tall detector array) is upright whichever way round."""
    rng = np.random.default_rng(2)
    air = rng.poisson(truck.i0, (2, 60, truck.counts.shape[2])).astype(np.uint16)
    tall = np.concatenate([truck.counts, air], axis=1)
    assert scan_from_counts(tall).channels == 2
    assert scan_from_counts(tall[:, ::-1].copy()).channels == 2


def test_a_window_smaller_than_a_vehicle_is_not_judged_upright(truck):
    """The bottom 200 rows of a flipped truck (air below, the load above) is 1 m tall at 5 mm: a window
    cut from under a chassis looks so the right way up, so it is read. At 15 mm the same band spans 3 m, a vehicle."""
    band = truck.counts[:, ::-1][:, -200:].copy()
    assert scan_from_counts(band, i0=truck.i0, pitch_mm=5.0).channels == 2
    with pytest.raises(ScanError, match="upside down"):
        scan_from_counts(band, i0=truck.i0, pitch_mm=15.0)
    assert scan_from_counts(band[:, :, :150].copy(), i0=truck.i0, pitch_mm=15.0).channels == 2   # taller than long


def test_upside_down_is_judged_on_16_bit_counts_only(truck):
    """An 8-bit picture (a baggage X-ray, a rendering) may have a bag touching its top edge with air below."""
    picture = (truck.counts[:1, ::-1] >> 8).astype(np.uint8)
    assert scan_from_counts(picture).channels == 1
    with pytest.raises(ScanError, match="upside down"):
        scan_from_counts(truck.counts[:1, ::-1].copy())


def test_a_scan_built_in_memory_upside_down_is_refused(truck):
    """check_scan judges the counts a station's Scan carries."""
    flipped = scan_from_counts(truck.counts, i0=truck.i0)
    flipped = replace(flipped, attenuation=flipped.attenuation[:, ::-1].copy(), counts=truck.counts[:, ::-1].copy())
    with pytest.raises(ScanError, match="upside down"):
        check_scan(flipped)


def test_score_and_the_inspector_route_a_swapped_scan_to_inspect(heuristic_model, tmp_path):
    """Both paths of a real file: `score` writes an INSPECT row with the diagnosis, inspect_safe answers INSPECT."""
    path = write_scan(tmp_path / "in" / "swapped.tiff", make_scan_counts(dense=True)[::-1].copy())
    write_scan(tmp_path / "in" / "upright.tiff", make_scan_counts(dense=True))
    flipped = write_scan(tmp_path / "in" / "flipped.tiff", generate_scan(4).counts[:, ::-1].copy())
    write_scan(tmp_path / "in" / "inverted.tiff", 65535 - generate_scan(5).counts)
    out = tmp_path / "results.csv"
    assert cli(["score", str(path.parent), "--model", str(heuristic_model), "--out", str(out), "--workers", "1"]) == 0
    with open(out, newline="") as f:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert rows["swapped.tiff"]["decision"] == "INSPECT" and SWAPPED in rows["swapped.tiff"]["error"]
    assert rows["upright.tiff"]["error"] == ""
    assert rows["flipped.tiff"]["decision"] == "INSPECT" and UPSIDE_DOWN in rows["flipped.tiff"]["error"]
    assert rows["inverted.tiff"]["decision"] == "INSPECT" and INVERTED in rows["inverted.tiff"]["error"]
    inspector = Inspector(heuristic_model)
    verdict = inspector.inspect_safe(path)
    assert verdict.decision == "INSPECT" and SWAPPED in verdict.reason
    verdict = inspector.inspect_safe(flipped)
    assert verdict.decision == "INSPECT" and UPSIDE_DOWN in verdict.reason


@pytest.mark.parametrize("bits", [16, 12])
def test_steel_coils_down_to_the_counts_floor_keep_their_energy_order(truck, bits):
    """Steel coils filling the bay (30-120 cm of steel) on a scanner whose counts have a floor (scatter and dark
    current, 0.2 % of I0), in 16 or 12 bits: most of the cargo reads the floor, alike in both energies. The median
    ratio read 0.997-1.000 and the valid scan was refused as the same energy twice; the floor is left out of it."""
    rng = np.random.default_rng(7)
    att = scan_from_counts(truck.counts, i0=truck.i0).attenuation.astype(np.float64)
    _, h, w = att.shape
    steel = rng.uniform(30, 120, (1, w * 3 // 4)) * np.ones((h // 2, 1))   # a coil's steel along each column
    mu = np.array(physics.material("steel").mu)[:, None, None]
    att[:, h // 5:h // 5 + h // 2, w // 8:w // 8 + w * 3 // 4] += mu * steel
    mean = truck.i0 * (np.exp(-att) + 0.002)
    counts = (rng.poisson(mean) >> (16 - bits)).astype(np.uint16)
    scan = scan_from_counts(counts, source="coils.tiff")
    assert 0.7 < energy_ratio(scan.attenuation) < ENERGY_RATIO_MAX - 0.15
    with pytest.raises(ScanError, match=SWAPPED):
        scan_from_counts(counts[::-1].copy(), source="coils.tiff")

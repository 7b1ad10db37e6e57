"""Readers round-trip 16-bit values exactly, agree across formats, and refuse bad input clearly."""
from __future__ import annotations

import io
import json
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import dicom_bytes, make_scan_counts, write_nonsquare_scan
from detector.scan import (
    Scan, ScanError, ScanWarning, attenuation_to_counts, counts_to_attenuation, estimate_i0,
    read_scan, read_scan_bytes, scan_from_counts, write_scan,
)

I0 = 53000


def make_counts(channels: int = 2, h: int = 64, w: int = 160, seed: int = 0) -> np.ndarray:
    """Air on top (open beam ~I0), cargo below with varied transmission; a second energy is the low one (it
    attenuates 1.3 times the high, as real matter does)."""
    rng = np.random.default_rng(seed)
    att = np.zeros((channels, h, w))
    att[:, 12:, :] = rng.uniform(0.2, 6.0, size=(h - 12, w)) * np.array([1.0, 1.3][:channels])[:, None, None]
    counts = rng.poisson(I0 * np.exp(-att)).astype(np.uint16)
    counts[:, :8, :] = I0  # flat open beam
    return counts


@pytest.mark.parametrize("suffix", [".tiff", ".npy", ".npz"])
@pytest.mark.parametrize("channels", [1, 2])
def test_roundtrip_exact_16bit(tmp_path, suffix, channels):
    counts = make_counts(channels)
    path = write_scan(tmp_path / f"s{suffix}", counts, i0=(I0,) * channels, pitch_mm=4.0)
    scan = read_scan(path)
    assert scan.counts.dtype == np.uint16
    np.testing.assert_array_equal(scan.counts, counts)
    assert scan.channels == channels and scan.attenuation.dtype == np.float32
    # rewrite the Scan itself: bytes-identical pixels again
    again = read_scan(write_scan(tmp_path / f"t{suffix}", scan))
    np.testing.assert_array_equal(again.counts, counts)


def test_png_roundtrip_8_and_16_bit(tmp_path):
    c16 = make_counts(1)
    c8 = (c16 // 256).astype(np.uint8)
    for counts in (c16, c8):
        scan = read_scan(write_scan(tmp_path / f"s{counts.dtype}.png", counts))
        np.testing.assert_array_equal(scan.counts, counts)
        assert scan.counts.dtype == counts.dtype


def test_same_attenuation_in_every_format(tmp_path):
    """The same single-energy scan gives the same attenuation from PNG, TIFF, NPY, NPZ, (H,W,2) TIFF."""
    counts = make_counts(1)
    ref = None
    for suffix in (".png", ".tiff", ".npy", ".npz"):
        scan = read_scan(write_scan(tmp_path / f"s{suffix}", counts))  # no I0 given: estimated from air
        assert scan.i0 == (float(I0),)
        if ref is None:
            ref = scan.attenuation
        np.testing.assert_array_equal(scan.attenuation, ref)
    # dual energy: multi-page TIFF == (H, W, 2) TIFF == (2, H, W) npy
    dual = make_counts(2, seed=3)
    tifffile.imwrite(tmp_path / "hw2.tiff", np.moveaxis(dual, 0, -1), photometric="minisblack",
                     planarconfig="contig")
    a = read_scan(tmp_path / "hw2.tiff").attenuation
    b = read_scan(write_scan(tmp_path / "pages.tiff", dual)).attenuation
    c = read_scan(write_scan(tmp_path / "d.npy", dual)).attenuation
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


def test_attenuation_physics_and_i0():
    counts = np.full((1, 40, 40), I0, dtype=np.uint16)
    counts[0, 20:] = int(I0 * np.exp(-2.0))
    scan = scan_from_counts(counts)
    assert scan.i0 == (float(I0),)  # estimated from the air rows
    assert abs(float(scan.attenuation[0, 0, 0])) < 1e-6
    assert scan.attenuation[0, 30, 5] == pytest.approx(2.0, abs=1e-3)
    # without flat air rows that are bright or the brightest part of the scan, I0 falls back to the dtype maximum
    dark = np.full((1, 40, 40), 1000, dtype=np.uint16)
    dark[0, 20:] = 3000
    assert estimate_i0(dark, 65535.0) == (65535.0,)
    # metadata I0 wins over the estimate; counts above I0 clip to attenuation 0
    s2 = scan_from_counts(counts, i0=40000)
    assert s2.attenuation.min() == 0.0
    np.testing.assert_array_equal(attenuation_to_counts(counts_to_attenuation(counts, I0), I0), counts)


@pytest.mark.parametrize("suffix", [".tiff", ".npz"])
def test_metadata_pitch_energies(tmp_path, suffix):
    counts = make_counts(2)
    scan = read_scan(write_scan(tmp_path / f"m{suffix}", counts, i0=(50000, 51000), pitch_mm=3.5,
                                energies=("6MV", "4MV")))
    assert scan.i0 == (50000.0, 51000.0)
    assert scan.pitch_mm == 3.5
    assert scan.energies == ("6MV", "4MV")
    assert scan.source.endswith(f"m{suffix}")


@pytest.mark.parametrize("suffix", [".tiff", ".npz"])
@pytest.mark.parametrize("names", [("low", "high"), ("LE", "HE")])
def test_a_scan_naming_its_low_energy_first_is_read_high_first(tmp_path, names, suffix):
    """The model, a single-energy model's pick and the material image take channel 0 as the high energy: a file
    giving low then high fed them the energies swapped (an .npz kept no names at all, so it was read as given)."""
    counts = make_counts(2)
    ref = read_scan(write_scan(tmp_path / "hl.tiff", counts, i0=(50000, 51000), energies=("high", "low")))
    swapped = read_scan(write_scan(tmp_path / f"lh{suffix}", counts[::-1].copy(), i0=(51000, 50000), energies=names))
    assert swapped.energies == names[::-1] and swapped.i0 == (50000.0, 51000.0)
    np.testing.assert_array_equal(swapped.attenuation, ref.attenuation)
    np.testing.assert_array_equal(swapped.counts, counts)
    built = Scan(ref.attenuation[::-1].copy(), energies=names, i0=(51000.0, 50000.0))   # a Scan made in memory
    from detector.scan import check_scan
    assert check_scan(built).energies == names[::-1]
    np.testing.assert_array_equal(check_scan(built).attenuation, ref.attenuation)
    other = read_scan(write_scan(tmp_path / f"mv{suffix}", counts, i0=(50000, 51000), energies=("4MV", "6MV")))
    assert other.energies == ("4MV", "6MV")            # names it cannot order are kept as given


def test_rgb_rendering_becomes_one_channel_with_warning(tmp_path):
    rgb = np.zeros((50, 80, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    rgb[10:30, 20:50] = (40, 60, 80)   # a bag in the picture: a blank image is refused
    cv2.imwrite(str(tmp_path / "bag.png"), rgb)
    cv2.imwrite(str(tmp_path / "bag.jpg"), rgb)
    for name in ("bag.png", "bag.jpg"):
        with pytest.warns(ScanWarning, match="grey"):
            scan = read_scan(tmp_path / name)
        assert scan.channels == 1 and scan.counts.dtype == np.uint8



def test_colour_tiff_renderings_read_as_grey_like_png(tmp_path):
    """An RGB(A) or palette TIFF (a baggage X-ray exported as TIFF) was refused as "3 energies/channels" before
    the grey conversion PNG and JPEG get could run; now every layout gives the PNG's grey, with the warning, and
    the header alone gives the same size (scan_geometry, which decides label-only training scans)."""
    from detector.formats import scan_geometry
    rgb = np.zeros((50, 80, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    rgb[10:30, 20:50] = (40, 60, 80)
    cv2.imwrite(str(tmp_path / "bag.png"), rgb[..., ::-1])   # cv2 writes BGR: the PNG holds `rgb`
    ref = read_scan(tmp_path / "bag.png")
    alpha = np.full((50, 80, 1), 255, np.uint8)
    grey_map = np.stack([np.arange(256, dtype=np.uint16) * 257] * 3)
    index = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    tifffile.imwrite(tmp_path / "contig.tiff", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tiff", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "rgba.tiff", np.concatenate([rgb, alpha], -1), photometric="rgb",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "rgb16.tiff", rgb.astype(np.uint16) * 257, photometric="rgb")
    tifffile.imwrite(tmp_path / "palette.tiff", index, photometric="palette", colormap=grey_map)
    cv2.imwrite(str(tmp_path / "opencv.tiff"), rgb[..., ::-1])
    for name in ("contig.tiff", "planar.tiff", "rgba.tiff", "rgb16.tiff", "palette.tiff", "opencv.tiff"):
        with pytest.warns(ScanWarning, match="grey"):
            scan = read_scan(tmp_path / name)
        assert scan.channels == 1, name
        np.testing.assert_allclose(scan.attenuation, ref.attenuation, atol=1e-2, err_msg=name)  # 16-bit: unrounded grey
        assert scan_geometry(tmp_path / name) == (scan.height, scan.width, scan.pitch_mm), name


def test_tiff_polarity_and_colour_spaces_that_are_not_counts(tmp_path):
    """MINISWHITE shows 0 as white, so it stores air (bright on a radiograph) low: read as it stood, air was dense
    and a dense block air (released). It is flipped within the bit range; photometrics that are neither grey nor
    RGB/palette are refused with their name, as are float pixels with no range to flip in."""
    counts = make_counts(1)[0]
    ref = read_scan(write_scan(tmp_path / "black.tiff", counts))
    tifffile.imwrite(tmp_path / "white.tiff", 65535 - counts, photometric="miniswhite")
    np.testing.assert_array_equal(read_scan(tmp_path / "white.tiff").attenuation, ref.attenuation)
    tifffile.imwrite(tmp_path / "white_f.tiff", np.full((64, 64), 0.5, np.float32), photometric="miniswhite")
    with pytest.raises(ScanError, match="white_f.tiff.*MINISWHITE"):
        read_scan(tmp_path / "white_f.tiff")
    tifffile.imwrite(tmp_path / "cmyk.tiff", np.zeros((64, 64, 4), np.uint8) + 9, photometric="separated")
    with pytest.raises(ScanError, match="cmyk.tiff: SEPARATED TIFF: not grey"):
        read_scan(tmp_path / "cmyk.tiff")
    tifffile.imwrite(tmp_path / "two.tiff", np.zeros((2, 64, 64, 3), np.uint8) + 9, photometric="rgb")
    with pytest.raises(ScanError, match="colour TIFF of 2 pages"):
        read_scan(tmp_path / "two.tiff")

def test_scan_warnings_from_many_threads_are_summarised_once_per_reason(tmp_path):
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from detector.scan import summarised_scan_warnings
    rgb = np.zeros((50, 80, 3), dtype=np.uint8)
    rgb[..., 2] = 180
    rgb[10:30, 20:50] = (40, 60, 80)
    paths = [tmp_path / f"bag{i}.png" for i in range(5)]
    for p in paths:
        cv2.imwrite(str(p), rgb)
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with summarised_scan_warnings(lines.append):
            with ThreadPoolExecutor(3) as pool:
                assert [s.channels for s in pool.map(read_scan, paths)] == [1] * 5
            warnings.warn("not about a scan", RuntimeWarning)
    assert len(lines) == 1 and lines[0].startswith("5 scan(s): colour image converted to one grey channel")
    assert any(str(p) in lines[0] for p in paths)
    assert [(w.category, str(w.message)) for w in outer] == [(RuntimeWarning, "not about a scan")]


def test_dicom_reads_when_pydicom_installed(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    counts = make_counts(1)[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "s.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = counts.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagerPixelSpacing = [4.0, 4.0]
    ds.PixelData = counts.tobytes()
    ds.save_as(str(tmp_path / "s.dcm"), enforce_file_format=True)
    scan = read_scan(tmp_path / "s.dcm")
    np.testing.assert_array_equal(scan.counts[0], counts)
    assert scan.pitch_mm == 4.0
    del pydicom


@pytest.mark.parametrize("tags", [{"photometric": "MONOCHROME1"},
                                  {"PixelIntensityRelationship": "LIN", "PixelIntensityRelationshipSign": -1}])
def test_dicom_inverted_polarity_reads_as_counts(tags):
    """MONOCHROME1 (minimum = white) or PixelIntensityRelationshipSign -1 stores air low: read as counts, air
    was dense and a dense block was air (a truck with one was released). Both must give the MONOCHROME2 scan."""
    counts = make_counts(1)[0]
    ref = read_scan_bytes(dicom_bytes(counts), "ref.dcm")
    scan = read_scan_bytes(dicom_bytes(65535 - counts, **tags), "inv.dcm")
    np.testing.assert_array_equal(scan.counts, ref.counts)
    np.testing.assert_array_equal(scan.attenuation, ref.attenuation)


def test_dicom_sign_plus_one_keeps_monochrome1_counts():
    """The physics tag wins over the display tag: radiograph-style MONOCHROME1 (air shown black) with sign +1
    (higher value, more intensity) holds counts as they are."""
    counts = make_counts(1)[0]
    scan = read_scan_bytes(dicom_bytes(counts, "MONOCHROME1", PixelIntensityRelationshipSign=1), "m1.dcm")
    np.testing.assert_array_equal(scan.counts[0], counts)


@pytest.mark.parametrize("relation", ["LOG", "OTHER"])
def test_dicom_log_pixels_refused(relation):
    """Log-encoded intensity read as counts made a dense block (1 % transmission) look like light cargo."""
    counts = make_counts(1)[0].astype(float)
    stored = (65535 * (1 + np.log10(np.maximum(counts, 1) / I0) / 4)).clip(0, 65535).astype(np.uint16)
    with pytest.raises(ScanError, match=f"PixelIntensityRelationship {relation}") as err:
        read_scan_bytes(dicom_bytes(stored, PixelIntensityRelationship=relation), "log.dcm")
    assert err.value.path == "log.dcm"


def test_dicom_bits_stored_sets_the_full_scale():
    """12-bit counts in a 16-bit container: I0 from the air near 4000 (not > 32767, so it was missed) and, on a
    scan cropped below the air, 4095, not 65535, which read every pixel ln(16) = 2.8 denser: every truck inspected."""
    counts = (make_counts(1)[0] * (4000 / I0)).round().astype(np.uint16)
    scan = read_scan_bytes(dicom_bytes(counts, bits_stored=12), "12bit.dcm")
    assert scan.i0 == (4000.0,)
    cropped = read_scan_bytes(dicom_bytes(counts[12:].copy(), bits_stored=12), "cropped.dcm")
    assert cropped.i0 == (4095.0,)
    np.testing.assert_array_equal(cropped.attenuation, counts_to_attenuation(counts[12:], 4095.0))


def test_dicom_modality_rescale_gives_the_counts():
    """Counts = RescaleSlope * stored + RescaleIntercept: signed pixels offset by 32768 were refused as int16, and
    14-bit stored values with slope 4 read 4x denser."""
    counts = make_counts(1)[0]
    ref = read_scan_bytes(dicom_bytes(counts), "ref.dcm")
    signed = (counts.astype(np.int32) - 32768).astype(np.int16)
    scan = read_scan_bytes(dicom_bytes(signed, RescaleIntercept=32768, RescaleSlope=1), "signed.dcm")
    np.testing.assert_array_equal(scan.counts, ref.counts)
    quarter = dicom_bytes(counts // 4, bits_stored=14, RescaleSlope=4, RescaleIntercept=0)
    np.testing.assert_array_equal(read_scan_bytes(quarter, "slope.dcm").counts, (counts // 4 * 4)[None])
    inverted = (65535 - counts.astype(np.int32) - 32768).astype(np.int16)
    scan = read_scan_bytes(dicom_bytes(inverted, "MONOCHROME1", RescaleIntercept=32768), "signed_m1.dcm")
    np.testing.assert_array_equal(scan.counts, ref.counts)


@pytest.mark.parametrize("pixels, tags, reason", [
    (np.full((32, 32), -900, np.int16), {"RescaleIntercept": -1024}, "negative counts"),   # CT-style HU
    (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32), {"RescaleSlope": 0}, "RescaleSlope 0"),
    (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32), {}, "do not fit 16 bits"),
])
def test_dicom_values_that_are_no_counts_refused(pixels, tags, reason):
    with pytest.raises(ScanError, match=reason):
        read_scan_bytes(dicom_bytes(pixels, **tags), "bad.dcm")


@pytest.mark.parametrize("photometric, pixels", [
    ("RGB", np.zeros((64, 160, 3), np.uint8) + np.arange(160, dtype=np.uint8)[:, None]),
    ("PALETTE COLOR", make_counts(1)[0]),
])
def test_dicom_colour_refused_with_the_reason(photometric, pixels):
    """RGB was refused as "64 energies/channels"; palette indices were read as counts."""
    with pytest.raises(ScanError, match=f"{photometric} DICOM .*not transmission counts"):
        read_scan_bytes(dicom_bytes(pixels, photometric), "colour.dcm")


def test_dicom_unreadable_files_say_why():
    """A .dcm that is no DICOM, or is cut inside its header, read as "zero-size image (1x0x0)"; a JPEG Lossless
    file without a decoder plugin as "corrupt or truncated" with pydicom's multi-line plugin list."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    good = dicom_bytes(make_counts(1)[0])
    for data in (b"not a DICOM file\n" * 40, good[:200]):
        with pytest.raises(ScanError, match="no DICOM image in it"):
            read_scan_bytes(data, "x.dcm")
    ds = pydicom.dcmread(io.BytesIO(good))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\0" * 64])   # pydicom stops at the missing plugin
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    jpeg = buf.getvalue()
    with pytest.raises(ScanError, match="cannot decode its " + re.escape(JPEGLosslessSV1.name)) as err:
        read_scan_bytes(jpeg, "jpeg.dcm")
    assert "\n" not in err.value.reason and "corrupt or truncated" not in err.value.reason


def test_dicom_spacing_checks_both_axes():
    """[row, column] spacing: a 0 mm column spacing went unseen when the row spacing alone was the pitch."""
    with pytest.raises(ScanError, match="pixel pitch 0"):
        read_scan_bytes(dicom_bytes(make_counts(1)[0], ImagerPixelSpacing=[4.0, 0.0]), "aniso.dcm")


@pytest.mark.parametrize("row_mm, col_mm", [(2.0, 6.0), (6.0, 2.0), (4.0, 4.2)])
def test_dicom_pixels_that_are_not_square_keep_the_truck_its_size(row_mm, col_mm):
    """A line scanner's column pitch follows the truck's speed: the row spacing alone was the pitch, so [2, 6] mm
    pixels made the truck and its threats 3x too short. The scan now comes on square pixels at the coarser pitch,
    so every object keeps its size in mm, and its counts are the area means (what a larger element would count)."""
    h, w = 120, 360
    counts = np.full((h, w), 50000, np.uint16)
    counts[30:90, 60:300] = 8000                      # a block 60 rows x 240 columns
    scan = read_scan_bytes(dicom_bytes(counts, ImagerPixelSpacing=[row_mm, col_mm]), "aniso.dcm")
    pitch = max(row_mm, col_mm)
    assert scan.pitch_mm == pytest.approx(pitch)
    assert (scan.height, scan.width) == (round(h * row_mm / pitch), round(w * col_mm / pitch))
    dense = scan.counts[0] < 29000
    rows, cols = np.flatnonzero(dense.any(1)), np.flatnonzero(dense.any(0))
    assert (rows.size * pitch, cols.size * pitch) == (pytest.approx(60 * row_mm, abs=2 * pitch),
                                                       pytest.approx(240 * col_mm, abs=2 * pitch))
    assert scan.counts[0][dense].mean() == pytest.approx(8000, rel=0.01)


def test_dicom_frames_are_energies():
    """Two frames are the high and low energy; a 40-frame volume was refused as "40 energies/channels"."""
    counts = make_counts(2)
    scan = read_scan_bytes(dicom_bytes(counts), "dual.dcm")
    assert scan.energies == ("high", "low")
    np.testing.assert_array_equal(scan.counts, counts)
    with pytest.raises(ScanError, match="40 frames"):
        read_scan_bytes(dicom_bytes(np.repeat(counts[:1], 40, axis=0)), "volume.dcm")


# ---------------------------------------------------------------- bad input, table-driven

def _png_header_only(h: int, w: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npy_header(descr: str, shape: tuple) -> bytes:
    """A valid .npy header with no pixel data behind it (what a bomb or a pickle would start with)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _good_png() -> bytes:
    ok, enc = cv2.imencode(".png", make_counts(1)[0])
    return enc.tobytes()


BAD_INPUTS = {
    "empty.png": (b"", "empty file"),
    "text.tiff": (b"this is not an image at all", "not a supported scan format"),
    "truncated.png": (_good_png()[:200], "corrupt or truncated"),
    "truncated.tiff": (_tiff_bytes(make_counts(1)[0])[:300], "corrupt or truncated"),
    "zero.npy": (_npy_bytes(np.zeros((0, 10), np.uint16)), "zero-size"),
    "tiny.npy": (_npy_bytes(np.zeros((4, 4), np.uint16)), "too small"),
    "nan.npy": (_npy_bytes(np.full((32, 32), np.nan, np.float32)), "NaN"),
    "inf.npy": (_npy_bytes(np.full((32, 32), np.inf, np.float64)), "NaN or infinity"),
    "int16.npy": (_npy_bytes(np.zeros((32, 32), np.int16)), "unsupported pixel type"),
    "int32.tiff": (_tiff_bytes(np.zeros((32, 32), np.int32)), "unsupported pixel type"),
    "float_range.npy": (_npy_bytes(np.full((32, 32), 7.0, np.float32)), "transmissions in [0, 1]"),
    "three_energies.tiff": (_tiff_bytes(np.zeros((3, 32, 32), np.uint16), photometric="minisblack"), "at most 2"),
    "three_channels.npy": (_npy_bytes(np.zeros((3, 32, 32), np.uint16)), "at most 2"),
    "4d.npy": (_npy_bytes(np.zeros((1, 1, 32, 32), np.uint16)), "expected a 2-D image"),
    "bomb.png": (_png_header_only(100_000, 100_000), "too large"),
    "bomb.npy": (_npy_header("<u2", (60000, 60000)), "too large"),
    "object.npy": (_npy_header("|O", (32, 32)), "Python objects"),
    "npz_no_counts.npz": (None, "needs a 'counts' array"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_clear_error(tmp_path, name):
    data, reason = BAD_INPUTS[name]
    if data is None:
        buf = io.BytesIO()
        np.savez(buf, other=np.zeros((32, 32), np.uint16))
        data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ScanError) as err:
        read_scan(path)
    assert err.value.path == str(path)
    assert reason in err.value.reason
    assert str(path) in str(err.value)



def test_a_truncated_tiff_prints_nothing_besides_its_error(tmp_path, normal_scan_path):
    """Without a logging setup (the command line), tifffile's log lines were printed raw, two per truncated file."""
    import subprocess
    import sys
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(normal_scan_path.read_bytes()[:1000])
    code = (f"from detector.scan import ScanError, read_scan\ntry:\n    read_scan({str(cut)!r})\n"
            "except ScanError:\n    pass")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == ""


def test_a_truncated_png_prints_nothing_besides_its_error(tmp_path, capfd):
    """libpng printed "libpng error: PNG input buffer is incomplete" to stderr for each PNG cut short, a line that
    names no file (one per scan still being copied in a batch), and the error said only "decoder returned nothing"."""
    data = _good_png()
    # cut in its pixels; only its end chunk missing; cut inside the end chunk's checksum
    for cut in (data[:len(data) // 2], data[:-12], data[:-1], data[:-3]):
        (tmp_path / "cut.png").write_bytes(cut)
        with pytest.raises(ScanError, match="corrupt or truncated PNG .*cut short"):
            read_scan(tmp_path / "cut.png")
    assert capfd.readouterr().err == ""


def test_missing_and_directory(tmp_path):
    with pytest.raises(ScanError, match="file not found"):
        read_scan(tmp_path / "nope.tiff")
    with pytest.raises(ScanError, match="not a regular file"):
        read_scan(tmp_path)


def test_pixel_limit_is_configurable(tmp_path):
    path = write_scan(tmp_path / "s.tiff", make_counts(2))
    with pytest.raises(ScanError, match="too large"):
        read_scan(path, max_pixels=1000)
    assert read_scan(path, max_pixels=10**6).width == 160


def test_tiff_pages_of_different_size(tmp_path):
    with tifffile.TiffWriter(tmp_path / "mixed.tiff") as tw:
        tw.write(np.zeros((32, 32), np.uint16))
        tw.write(np.zeros((40, 32), np.uint16))
    with pytest.raises(ScanError, match="differ in size"):
        read_scan(tmp_path / "mixed.tiff")


def test_write_rejects_float_and_multichannel_png(tmp_path):
    with pytest.raises(ScanError):
        write_scan(tmp_path / "f.tiff", np.zeros((32, 32), np.float32))
    with pytest.raises(ScanError, match="PNG holds one energy"):
        write_scan(tmp_path / "d.png", make_counts(2))


# ---------------------------------------------------------------- property-based: mutated bytes

def _valid_files() -> dict[str, bytes]:
    counts = make_counts(2, h=32, w=48)
    buf = io.BytesIO()
    np.savez(buf, counts=counts, i0=np.array([I0, I0]))
    tiff = io.BytesIO()
    with tifffile.TiffWriter(tiff) as tw:
        for c in counts:
            tw.write(c, description=json.dumps({"detector": {"i0": [I0, I0]}}))
    ok, png = cv2.imencode(".png", counts[0])
    ok2, jpg = cv2.imencode(".jpg", (counts[0] // 256).astype(np.uint8))
    return {"s.tiff": tiff.getvalue(), "s.png": png.tobytes(), "s.npy": _npy_bytes(counts),
            "s.npz": buf.getvalue(), "s.jpg": jpg.tobytes()}


VALID = _valid_files()


@settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_mutated_bytes_read_or_clear_error(name, data):
    raw = bytearray(VALID[name])
    n_mut = data.draw(st.integers(1, 8))
    for _ in range(n_mut):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "truncate" and raw:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        else:
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scan = read_scan_bytes(bytes(raw), name, max_pixels=4_000_000)
        except ScanError as err:
            assert err.reason and err.path == name
            return
    assert isinstance(scan, Scan)
    assert scan.attenuation.dtype == np.float32 and np.isfinite(scan.attenuation).all()
    assert 1 <= scan.channels <= 2


# ---------------------------------------------------------------- committed samples

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "samples"


def test_committed_samples_agree_across_formats():
    """The same truck in every committed format gives the same pixels (and attenuation where
    the file carries I0)."""
    ref = read_scan(SAMPLES / "truck_firearm.tiff")
    assert ref.channels == 2 and ref.counts.dtype == np.uint16
    for name in ("truck_firearm.npz", "truck_firearm.npy", "truck_firearm_hw2.tiff"):
        s = read_scan(SAMPLES / name)
        np.testing.assert_array_equal(s.counts, ref.counts)
    np.testing.assert_array_equal(read_scan(SAMPLES / "truck_firearm.npz").attenuation, ref.attenuation)
    for name in ("truck_firearm_high16.png", "truck_firearm_high.dcm"):
        s = read_scan(SAMPLES / name)
        assert s.channels == 1
        np.testing.assert_array_equal(s.counts[0], ref.counts[0])
    assert read_scan(SAMPLES / "truck_firearm_high.dcm").pitch_mm == pytest.approx(ref.pitch_mm)
    assert read_scan(SAMPLES / "truck_firearm_high8.png").counts.dtype == np.uint8
    with pytest.warns(ScanWarning):
        assert read_scan(SAMPLES / "truck_firearm_pseudocolour.jpg").channels == 1


def test_make_samples_writes_the_same_dicom_each_run(tmp_path):
    """scripts/make_samples.py regenerates data/samples (data/README.md): its DICOM drew new UIDs each run, so every
    run left the committed sample modified though no pixel changed."""
    pytest.importorskip("pydicom")
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES.parents[1] / "scripts" / "make_samples.py")
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    high = read_scan(SAMPLES / "truck_firearm.tiff").counts[0]
    runs = [tmp_path / run / "truck_firearm_high.dcm" for run in ("first", "second")]
    for path in runs:
        path.parent.mkdir()
        make_samples.write_dicom(path, high, 3.0)
    assert runs[0].read_bytes() == runs[1].read_bytes()
    np.testing.assert_array_equal(read_scan(runs[0]).counts[0], high)


def test_the_header_tells_the_size_and_pitch_the_read_scan_has(tmp_path):
    """Training decides from a file's header alone whether a scan fits in a training crop (detector.formats.
    scan_geometry): its (height, width, pitch) must be the read scan's, in every format and layout the readers take,
    the pitch from the file (TIFF description or resolution tags, NPZ pitch_mm, DICOM spacing, squared when the
    pixels are not) or the default. Where the header cannot tell, or the reader would refuse the file: None."""
    from detector.formats import scan_geometry
    counts, one = make_counts(2), make_counts(1)[0]
    files = [write_scan(tmp_path / "pages.tiff", counts, pitch_mm=3.5), write_scan(tmp_path / "default.tiff", one),
             write_scan(tmp_path / "c.npy", counts), write_scan(tmp_path / "one.npy", one),
             write_scan(tmp_path / "pitch.npz", counts, i0=(I0, I0), pitch_mm=6.0), write_scan(tmp_path / "no.npz", one),
             write_scan(tmp_path / "s16.png", one), write_scan(tmp_path / "s8.png", (one // 256).astype(np.uint8))]
    tifffile.imwrite(tmp_path / "hw2.tiff", np.moveaxis(counts, 0, -1), photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tiff", counts, photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "pitch4.tiff", one, photometric="minisblack", resolution=(2.5, 2.5),
                     resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "dpi72.tiff", one, photometric="minisblack", resolution=(72, 72), resolutionunit="INCH")
    cv2.imwritemulti(str(tmp_path / "lzw.tiff"), list(counts))
    np.save(tmp_path / "hw2.npy", np.moveaxis(counts, 0, -1))
    cv2.imwrite(str(tmp_path / "s.jpg"), (one // 256).astype(np.uint8))
    dicoms = {"square.dcm": dicom_bytes(one), "dual.dcm": dicom_bytes(counts),
              "rows.dcm": dicom_bytes(one, ImagerPixelSpacing=[2.0, 6.0]),
              "cols.dcm": dicom_bytes(one, ImagerPixelSpacing=[6.0, 2.5]),
              "pixel_spacing.dcm": dicom_bytes(one, ImagerPixelSpacing=None, PixelSpacing=[3.0, 3.0]),
              "no_spacing.dcm": dicom_bytes(one, ImagerPixelSpacing=None)}
    for name, data in dicoms.items():
        (tmp_path / name).write_bytes(data)
    names = sorted({p.name for p in tmp_path.iterdir()} | {p.name for p in files})
    assert len(names) == 21
    for path in [tmp_path / n for n in names] + sorted(p for p in SAMPLES.glob("truck_*") if "mask" not in p.name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the 72 dpi tag, the pseudocolour JPEG
            scan = read_scan(path)
        assert scan_geometry(path) == (scan.height, scan.width, scan.pitch_mm), path.name
    (tmp_path / "deflated.dcm").write_bytes(dicom_bytes(one, deflated=True))
    _tiff_with_description(tmp_path / "far.tiff", counts, {"pitch_mm": 500.0})
    tifffile.imwrite(tmp_path / "pages3.tiff", np.stack([one] * 3), photometric="minisblack")
    (tmp_path / "text.tiff").write_text("not a scan")
    assert read_scan(tmp_path / "deflated.dcm").height == 64    # read whole, but pydicom inflates all to see its tags
    for name in ("deflated.dcm", "far.tiff", "pages3.tiff", "text.tiff", "none.npy"):
        assert scan_geometry(tmp_path / name) is None, name



def test_tiff_with_unequal_x_and_y_resolution_is_squared_like_dicom(tmp_path):
    """A line scanner's pixels are often not square (the column pitch follows the truck's speed). DICOM squared
    them; a TIFF took its X resolution for both axes, so a truck and its threats came out up to several times too
    long or short. Now its finer axis is area-averaged to the coarser pitch as for DICOM, for one page and for an
    (H, W, 2) dual-energy page alike, and the header alone (scan_geometry) gives the same size."""
    from detector.formats import scan_geometry
    pytest.importorskip("pydicom")
    counts = make_counts(2)
    rows_mm, cols_mm = 5.0, 2.5    # XResolution is across the columns, YResolution down the rows
    tags = dict(photometric="minisblack", resolution=(10 / cols_mm, 10 / rows_mm), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "one.tiff", counts[0], **tags)
    tifffile.imwrite(tmp_path / "hw2.tiff", np.moveaxis(counts, 0, -1), planarconfig="contig", **tags)
    (tmp_path / "one.dcm").write_bytes(dicom_bytes(counts[0], ImagerPixelSpacing=[rows_mm, cols_mm]))
    ref = read_scan(tmp_path / "one.dcm")
    one, dual = read_scan(tmp_path / "one.tiff"), read_scan(tmp_path / "hw2.tiff")
    assert ref.pitch_mm == one.pitch_mm == dual.pitch_mm == 5.0
    h, w = counts.shape[1:]
    assert one.attenuation.shape == (1, h, w // 2) and dual.attenuation.shape == (2, h, w // 2)
    np.testing.assert_allclose(one.attenuation, ref.attenuation, atol=1e-6)
    np.testing.assert_allclose(dual.attenuation[:1], ref.attenuation, atol=1e-6)
    for scan, name in ((one, "one.tiff"), (dual, "hw2.tiff")):
        assert scan_geometry(tmp_path / name) == (scan.height, scan.width, scan.pitch_mm)


def test_squared_pixels_keep_the_files_own_geometry(tmp_path):
    """Squaring a line scanner's pixels left no trace of the file's own grid, the one a station draws the regions on
    and an officer's boxes and masks are drawn on ("scan pixels"). Scan.meta now holds the file's height, width and
    [row, column] spacing, file_shape gives its size (the attenuation's where nothing was squared), and
    file_geometry the read scan's size, pitch and the file's size from the header alone."""
    from detector.formats import file_geometry, scan_geometry
    from detector.scan import file_shape
    pytest.importorskip("pydicom")
    write_nonsquare_scan(tmp_path / "line.tiff", 4.0, 5.0)                    # 200 x 600 file pixels
    (tmp_path / "line.dcm").write_bytes(dicom_bytes(make_counts(1, 120, 360)[0], ImagerPixelSpacing=[2.0, 6.0]))
    write_scan(tmp_path / "square.tiff", make_counts(2))
    (tmp_path / "square.dcm").write_bytes(dicom_bytes(make_counts(1)[0], ImagerPixelSpacing=[4.0, 4.0]))
    for name, size, spacing in (("line.tiff", (200, 600), [4.0, 5.0]), ("line.dcm", (120, 360), [2.0, 6.0]),
                                ("square.tiff", (64, 160), None), ("square.dcm", (64, 160), None)):
        scan = read_scan(tmp_path / name)
        assert file_shape(scan) == size, name
        if spacing:
            assert scan.meta == {"file_height": size[0], "file_width": size[1], "file_spacing_mm": spacing}, name
            assert (scan.height, scan.width) != size
        else:
            assert scan.meta == {} and (scan.height, scan.width) == size, name
        assert file_geometry(tmp_path / name) == (scan.height, scan.width, scan.pitch_mm, *size), name
        assert scan_geometry(tmp_path / name) == (scan.height, scan.width, scan.pitch_mm), name
    assert file_geometry(tmp_path / "none.tiff") is None


# ---------------------------------------------------------------- metadata a station must not trust blindly

def _tiff_with_description(path, counts: np.ndarray, detector: dict, **kw) -> None:
    with tifffile.TiffWriter(path) as tw:
        for k, page in enumerate(counts):
            tw.write(page, photometric="minisblack", metadata=None,
                     description=json.dumps({"detector": detector}) if k == 0 else None, **kw)


def test_image_editor_resolution_tag_is_not_taken_as_pitch(tmp_path):
    counts = make_counts(channels=1)[0]
    tifffile.imwrite(tmp_path / "dpi72.tiff", counts, photometric="minisblack", resolution=(72, 72),
                     resolutionunit="INCH")
    with pytest.warns(ScanWarning, match="resolution tag"):
        scan = read_scan(tmp_path / "dpi72.tiff")
    assert scan.pitch_mm == 5.0   # 72 dpi would be 0.35 mm: the truck shrunk 28x, its threats gone
    tifffile.imwrite(tmp_path / "pitch4.tiff", counts, photometric="minisblack", resolution=(2.5, 2.5),
                     resolutionunit="CENTIMETER")   # 4 mm per pixel: a scanner's pitch, kept
    assert read_scan(tmp_path / "pitch4.tiff").pitch_mm == pytest.approx(4.0)


@pytest.mark.parametrize("pitch", [-5.0, 0.0, float("nan"), 500.0])
def test_implausible_pitch_in_metadata_is_refused(tmp_path, pitch):
    counts = make_counts()
    _tiff_with_description(tmp_path / "p.tiff", counts, {"pitch_mm": pitch, "i0": [I0, I0]})
    np.savez(tmp_path / "p.npz", counts=counts, i0=np.array([I0, I0]), pitch_mm=np.array(pitch))
    for name in ("p.tiff", "p.npz"):
        with pytest.raises(ScanError, match="pixel pitch") as e:
            read_scan(tmp_path / name)
        assert e.value.path.endswith(name)


def test_blank_scans_are_refused_not_released(tmp_path):
    counts = make_counts()
    cases = {"white.npy": np.full((2, 64, 160), 65535, np.uint16),   # a saturated detector
             "dark.npy": np.zeros((2, 64, 160), np.uint16)}          # no beam
    for name, arr in cases.items():
        np.save(tmp_path / name, arr)
    _tiff_with_description(tmp_path / "i0.tiff", counts, {"i0": [1.0, 1.0]})   # every pixel "above the open beam"
    for name, why in (("white.npy", "blank"), ("dark.npy", "blank"), ("i0.tiff", "I0 1 is below")):
        with pytest.raises(ScanError, match=why):
            read_scan(tmp_path / name)
    air = np.full((2, 64, 160), I0, np.uint16)
    air[:, 40:, 10:20] = I0 // 2   # a little in the beam is a scan, not a blank
    assert read_scan_bytes(_npy_bytes(air), "a.npy").attenuation.max() > 0.5


def test_other_layouts_and_codecs_read_the_same_counts(tmp_path):
    counts = make_counts()
    cv2.imwritemulti(str(tmp_path / "lzw.tiff"), list(counts))   # OpenCV writes LZW: no imagecodecs here
    tifffile.imwrite(tmp_path / "planar.tiff", counts, photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "be.tiff", counts, photometric="minisblack", byteorder=">")
    np.save(tmp_path / "be.npy", counts.astype(">u2"))
    np.save(tmp_path / "hw2.npy", np.moveaxis(counts, 0, -1))
    for name in ("lzw.tiff", "planar.tiff", "be.tiff", "be.npy", "hw2.npy"):
        scan = read_scan(tmp_path / name)
        np.testing.assert_array_equal(scan.counts, counts, err_msg=name)


def test_fewer_bit_data_without_air_warns_that_i0_is_a_guess():
    rng = np.random.default_rng(0)
    fourteen_bit = rng.integers(2000, 12000, (1, 64, 160)).astype(np.uint16)   # no open-beam rows at the top
    with pytest.warns(ScanWarning, match="I0 taken as 65535"):
        scan_from_counts(fourteen_bit, source="cropped.tiff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_from_counts(make_counts())                 # air at the top: I0 estimated, nothing to say
        scan_from_counts(fourteen_bit, i0=16383.0)      # I0 given


@pytest.mark.parametrize("colours", [3, 4])
def test_a_colour_image_array_is_named_as_one(colours):
    """An (H, W, 3) RGB array handed to the station was refused as "200 energies/channels": its height read as the
    number of energies."""
    rgb = np.full((200, 600, colours), 120, np.uint8)
    rgb[100:150, 200:300] = 30
    with pytest.raises(ScanError, match=rf"<array>: shape \(200, 600, {colours}\) is a colour image \(H, W, "
                                        rf"{colours}\), not X-ray counts"):
        scan_from_counts(rgb)


def test_a_file_without_a_pitch_takes_the_default_pitch_given(tmp_path):
    """Many scanners write 16-bit PNG/TIFF without a pitch: read at the 5 mm default, a site at 4 mm came out 25 %
    too large, silently. read_scan, read_scan_bytes and the header-only scan_geometry / file_geometry take the site's
    pitch for such files (default_pitch_mm) and agree; a file's own pitch (description, resolution tags, NPZ) wins."""
    from detector.formats import file_geometry, scan_geometry
    one = make_counts(1)[0]
    cv2.imwrite(str(tmp_path / "bare.png"), one)
    tifffile.imwrite(tmp_path / "bare.tiff", one, photometric="minisblack")
    np.save(tmp_path / "bare.npy", one)
    tifffile.imwrite(tmp_path / "dpi72.tiff", one, photometric="minisblack", resolution=(72, 72), resolutionunit="INCH")
    untagged = ("bare.png", "bare.tiff", "bare.npy", "dpi72.tiff")
    write_scan(tmp_path / "own.tiff", one, pitch_mm=3.5)
    write_scan(tmp_path / "own.npz", one, pitch_mm=6.0)
    tifffile.imwrite(tmp_path / "tag.tiff", one, photometric="minisblack", resolution=(2.5, 2.5),
                     resolutionunit="CENTIMETER")
    own = {"own.tiff": 3.5, "own.npz": 6.0, "tag.tiff": 4.0}
    for name in untagged + tuple(own):
        path = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the 72 dpi tag
            scan = read_scan(path, default_pitch_mm=4.0)
            from_bytes = read_scan_bytes(path.read_bytes(), name, default_pitch_mm=4)
            plain = read_scan(path)
        want = own.get(name, 4.0)
        assert scan.pitch_mm == pytest.approx(want) and from_bytes.pitch_mm == pytest.approx(want), name
        assert plain.pitch_mm == pytest.approx(own.get(name, 5.0)), name   # None: the 5 mm default, as before
        assert scan_geometry(path, 4.0) == (scan.height, scan.width, scan.pitch_mm), name
        assert file_geometry(path, default_pitch_mm=4.0).pitch_mm == scan.pitch_mm, name
        assert scan_geometry(path) == (plain.height, plain.width, plain.pitch_mm), name


@pytest.mark.parametrize("bad", [0.0, -4.0, float("nan"), float("inf"), 500.0, "4", True])
def test_a_default_pitch_that_is_no_pitch_is_refused_in_one_line(tmp_path, bad):
    from detector.formats import file_geometry, scan_geometry
    path = write_scan(tmp_path / "bare.png", make_counts(1)[0])
    for read in (lambda: read_scan(path, default_pitch_mm=bad), lambda: scan_geometry(path, bad),
                 lambda: file_geometry(path, bad),
                 lambda: read_scan_bytes(path.read_bytes(), "bare.png", default_pitch_mm=bad)):
        with pytest.raises(ScanError, match=r"default pixel pitch .* must be a number in 0\.01-100 mm") as e:
            read()
        assert "\n" not in str(e.value) and e.value.path.endswith("bare.png")


def _exif_jpeg(img: np.ndarray, orientation: int, big_endian: bool = False) -> bytes:
    """A JPEG of `img` as stored, with an EXIF APP1 segment whose IFD0 holds only the Orientation tag."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    order, fmt = (b"MM", ">") if big_endian else (b"II", "<")
    ifd = order + struct.pack(fmt + "HIH", 42, 8, 1) + struct.pack(fmt + "HHIHH", 0x112, 3, 1, orientation, 0)
    app1 = b"Exif\x00\x00" + ifd + struct.pack(fmt + "I", 0)
    data = buf.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_read_as_a_viewer_shows_it(tmp_path, orientation):
    """A camera's or viewer's JPEG stores its pixels as the sensor read them and says in EXIF how to turn them;
    every viewer (and OpenCV's grey read) shows them turned, so a mask or boxes are drawn on that picture. The
    reader took the stored pixels: a 300x500 picture was a 500x300 scan, its mask refused as the wrong size and its
    regions drawn on a picture no officer sees. Scan, header geometry and a JPEG mask now follow the tag."""
    _turned_bag(tmp_path / "bag.jpg", _exif_jpeg, orientation)


def _turned_bag(path: Path, encode, orientation: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored, shown) of a picture `encode` writes to `path` with an EXIF `orientation`, checked: OpenCV's grey read
    shows it turned, and read_scan, the header geometry and read_mask give what it shows."""
    from detector.formats import scan_geometry
    from detector.manifest import read_mask
    stored = np.full((40, 64), 220, np.uint8)
    stored[5:15, 8:30] = 40   # an asymmetric block: any wrong turn or flip moves it
    data = encode(stored, orientation, big_endian=orientation % 2 == 0)
    path.write_bytes(data)
    shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)   # OpenCV applies EXIF here
    assert shown.shape == ((40, 64) if orientation < 5 else (64, 40))
    np.testing.assert_array_equal(read_scan(path).counts[0], shown)
    assert scan_geometry(path)[:2] == shown.shape
    np.testing.assert_array_equal(read_mask(path), shown)
    return stored, shown


def test_transparent_pixels_are_read_as_air_not_as_the_densest_material(tmp_path):
    """A rendering or cut-out with a transparent background (RGBA or grey+alpha PNG, grey+alpha TIFF) stores black
    under its alpha: read as it stood, the background was the densest material (a clean bag scored 10x the others,
    one region over the whole picture), and a grey+alpha TIFF was a 2-energy scan (alpha the low energy), refused
    beside grey ones or trained as two channels. Transparent pixels are air now: composited over white, one channel."""
    from PIL import Image
    grey = np.full((40, 60), 200, np.uint8)
    grey[10:20, 20:40] = 50                             # the bag
    alpha = np.zeros_like(grey)
    alpha[5:35, 10:50] = 255                            # opaque around the bag, transparent beyond
    alpha[5:35, 10] = 128                               # a half-transparent edge
    shown = np.rint(grey * (alpha / 255) + 255 * (1 - alpha / 255)).astype(np.uint8)   # as a viewer on white shows it
    cv2.imwrite(str(tmp_path / "ref.png"), shown)
    ref = read_scan(tmp_path / "ref.png")
    under = np.where(alpha > 0, grey, 0).astype(np.uint8)   # black under the transparent part, as editors store it
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([under] * 3 + [alpha]))
    Image.fromarray(np.dstack([under, alpha]), "LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "la.tiff", np.dstack([under, alpha]), photometric="minisblack",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "rgba.tiff", np.dstack([under] * 3 + [alpha]), photometric="rgb",
                     extrasamples=["unassalpha"])
    for name in ("rgba.png", "la.png", "la.tiff", "rgba.tiff"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scan = read_scan(tmp_path / name)
        assert scan.channels == 1, name
        np.testing.assert_allclose(scan.attenuation, ref.attenuation, atol=0.02, err_msg=name)


def _exif_png(img: np.ndarray, orientation: int, big_endian: bool = False) -> bytes:
    """A PNG of `img` as stored, with an eXIf chunk (before its pixels) whose IFD0 holds only the Orientation tag."""
    order, fmt = (b"MM", ">") if big_endian else (b"II", "<")
    body = order + struct.pack(fmt + "HIH", 42, 8, 1) + struct.pack(fmt + "HHIHH", 0x112, 3, 1, orientation, 0)
    body += struct.pack(fmt + "I", 0)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    data = cv2.imencode(".png", img)[1].tobytes()
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_and_tiff_orientation_is_read_as_a_viewer_shows_it(tmp_path, orientation):
    """A PNG's eXIf chunk and a TIFF's Orientation tag (274) say how to turn the stored pixels, as a JPEG's EXIF
    does; OpenCV's grey read (PNG) and its libtiff (TIFF) show them turned, and a TIFF that tifffile cannot decode
    (LZW without imagecodecs) was read through OpenCV turned while an uncompressed one was not (orientation 6: refused
    as the wrong size). Scan, header geometry and a PNG mask now follow the tag, as for a JPEG."""
    from PIL import Image

    from detector.formats import scan_geometry
    stored, shown = _turned_bag(tmp_path / "bag.png", _exif_png, orientation)
    counts = stored.astype(np.uint16) * 257
    for compression in ("raw", "tiff_lzw"):   # PIL: tifffile writes no LZW without imagecodecs
        path = tmp_path / f"bag_{compression}.tiff"
        Image.fromarray(counts).save(path, compression=compression, tiffinfo={274: orientation})
        viewer = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)   # libtiff turns
        np.testing.assert_array_equal(viewer, shown.astype(np.uint16) * 257)
        np.testing.assert_array_equal(read_scan(path).counts[0], viewer)
        assert scan_geometry(path)[:2] == viewer.shape


@pytest.mark.parametrize("orientation", (2, 6))
def test_a_compressed_turned_tiff_reads_alike_whether_or_not_opencv_turns_it(tmp_path, monkeypatch, orientation):
    """A TIFF tifffile cannot decode (LZW without imagecodecs) is read through OpenCV, whose libtiff turns its pages
    by the Orientation tag in 5.x; the reader turned them back unconditionally, so an OpenCV that leaves them as
    stored (older releases) had them mis-turned (2: mirrored twice) or refused (6: the wrong size). The reader now
    probes what this OpenCV does and turns back only what it turned."""
    from PIL import Image

    from detector import formats
    stored, shown = _turned_bag(tmp_path / "bag.png", _exif_png, orientation)
    path = tmp_path / "bag.tiff"
    Image.fromarray(stored.astype(np.uint16) * 257).save(path, compression="tiff_lzw", tiffinfo={274: orientation})
    real = cv2.imdecodemulti

    def unturning(data, flags):   # an OpenCV that leaves TIFF pages as stored (the probe's page included)
        ok, pages = real(data, flags)
        probe = tifffile.TiffFile(io.BytesIO(data.tobytes())).pages.first.asarray() if pages[0].size == 12 else None
        return ok, [probe if probe is not None else stored.astype(np.uint16) * 257 for _ in pages]

    from detector.manifest import read_mask
    marked = (stored < 128).astype(np.uint8) * 255   # a TIFF mask stored, and tagged, as its scan
    Image.fromarray(marked).save(tmp_path / "mask.tiff", compression="tiff_lzw", tiffinfo={274: orientation})
    decode = cv2.imdecode
    for turns in (True, False):
        formats.opencv_turns_tiff.cache_clear()
        if not turns:
            monkeypatch.setattr(formats.cv2, "imdecodemulti", unturning)
            monkeypatch.setattr(cv2, "imdecode", lambda d, f: marked if bytes(d[:2]) == b"II" else decode(d, f))
        assert formats.opencv_turns_tiff() is turns
        np.testing.assert_array_equal(read_scan(path).counts[0], shown.astype(np.uint16) * 257)
        np.testing.assert_array_equal(read_mask(tmp_path / "mask.tiff") > 0, shown < 128)
    formats.opencv_turns_tiff.cache_clear()


def test_a_scanners_tiff_without_orientation_or_with_1_reads_as_before(tmp_path):
    """A scanner's TIFF carries Orientation 1 or none: its pixels stay as stored, every page, byte for byte."""
    pages = make_scan_counts(height=48, width=80, channels=2, seed=3)
    for tags in ([], [(274, 3, 1, 1, True)]):
        path = tmp_path / f"s{len(tags)}.tiff"
        with tifffile.TiffWriter(path) as tw:
            for page in pages:
                tw.write(page, photometric="minisblack", extratags=tags)
        np.testing.assert_array_equal(read_scan(path).counts, pages)


def test_scan_warnings_that_differ_in_a_figure_alone_are_summarised_as_one():
    """A 12-bit archive without open beam warns with each scan's brightest pixel: grouped by the whole text, 20,000
    such scans printed one line per brightest value (thousands) at the end of `detector score`."""
    from detector.scan import ScanWarning, summarised_scan_warnings, warn_scan
    lines: list[str] = []
    with summarised_scan_warnings(lines.append):
        for i in range(40):
            warn_scan(ScanWarning(f"day1/t{i}.png", f"the brightest pixel reads {3000 + i} of 65535: give I0"))
        warn_scan(ScanWarning("day1/rgb.png", "colour image converted to one grey channel"))
    assert len(lines) == 2, lines
    assert lines[0] == ("40 scan(s): the brightest pixel reads 3000 of 65535: give I0 (e.g. day1/t0.png; the "
                        "figures are this one's, they differ among these scans)")
    assert lines[1] == "1 scan(s): colour image converted to one grey channel (e.g. day1/rgb.png)"


def test_summarised_scan_warnings_hold_no_memory_per_warning():
    """Every ScanWarning of a batch was kept (catch_warnings(record=True)) until the run ended: about 700 bytes a
    scan, 14 MB over 20,000 converted scans, growing with the archive."""
    import tracemalloc

    from detector.scan import ScanWarning, summarised_scan_warnings, warn_scan
    lines: list[str] = []
    with summarised_scan_warnings(lines.append):
        warn_scan(ScanWarning("warm/t.png", "colour image converted to one grey channel"))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            warn_scan(ScanWarning(f"/archive/day{i // 500}/lane{i % 5}/t{i:06d}.tiff",
                                  "colour image converted to one grey channel"))
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    assert held < 100_000, f"{held} bytes held for 3000 warnings"
    assert lines == ["3001 scan(s): colour image converted to one grey channel (e.g. warm/t.png)"]

"""Hostile scan files: bombs whose header or compressed data claims far more than the file holds, pixel types no
scan has, pathological TIFF layouts. Each must give ScanError naming the file and the cause, with memory and time
bounded by the scan's own size, never by what the bytes claim."""
from __future__ import annotations

import io
import random
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import dicom_bytes
from detector.scan import Scan, ScanError, read_scan_bytes

MB = 1 << 20


def _npy_header(descr: str, shape: tuple) -> bytes:
    """A valid .npy header with no pixel data behind it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def read_with_peak(data: bytes, name: str, **kw) -> tuple[Scan | ScanError, float]:
    """read_scan_bytes' result (or its ScanError) and the peak of Python/NumPy memory it took, in MB."""
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out: Scan | ScanError = read_scan_bytes(data, name, **kw)
            except ScanError as e:
                out = e
        return out, tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


def expect_refused(data: bytes, name: str, reason: str, most_mb: float = 20.0, **kw) -> None:
    out, peak = read_with_peak(data, name, **kw)
    assert isinstance(out, ScanError), f"{name} was read: {out}"
    assert out.path == name and reason in out.reason, out.reason
    assert peak < most_mb, f"{name}: {peak:.0f} MB to refuse {len(data)} bytes"


# ---------------------------------------------------------------- NumPy

@pytest.mark.parametrize("descr, shape, reason", [
    ("|V10000000", (16, 16), "unsupported pixel type"),      # 2.5 GB of void pixels from a 128-byte file
    ("<U1000000", (16, 16), "unsupported pixel type"),
    ("<c16", (2, 4000, 5000), "unsupported pixel type"),     # within the pixel limit, 640 MB of complex
    ("<f8", (2, 4000, 5000), "truncated"),                   # a legal type, but no pixels behind the header
    ("<u2", (2, 4000, 5000), "truncated"),
])
def test_npy_header_claims_are_checked_before_numpy_allocates(descr, shape, reason):
    expect_refused(_npy_header(descr, shape) + b"\0" * 100, "bomb.npy", reason)


def _npz(members: dict[str, bytes]) -> bytes:
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for key, raw in members.items():
            z.writestr(key, raw)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _counts(channels: int = 2, h: int = 64, w: int = 160) -> np.ndarray:
    """uint16 counts: open beam on top, varied cargo below."""
    counts = np.random.default_rng(0).integers(1000, 50000, (channels, h, w)).astype(np.uint16)
    counts[:, :8] = 53000
    return counts


@pytest.mark.parametrize("key, value", [("i0", np.zeros(3_000_000)), ("pitch_mm", np.zeros(3_000_000)),
                                        ("i0", np.array([1 + 2j, 3j])), ("pitch_mm", np.array(["5"])),
                                        ("energies", np.array(["high", "low", "mid"])), ("energies", np.array([1, 2])),
                                        ("energies", np.array(["x" * 100_000])), ("energies", np.array([["h"], ["l"]]))])
def test_npz_metadata_members_are_checked_before_they_are_unpacked(key, value):
    data = _npz({"counts.npy": _npy(_counts()), f"{key}.npy": _npy(value)})
    assert len(data) < 100_000   # 24 MB of zeros deflate ~1000:1
    expect_refused(data, "meta.npz", f"NPZ {key!r} must hold at most", most_mb=5)


def test_npz_metadata_without_npy_header_is_refused():
    data = _npz({"counts.npy": _npy(_counts()), "i0": b"\0" * 1_000_000})
    expect_refused(data, "raw.npz", "'i0' is no .npy array", most_mb=5)


def test_npz_with_valid_metadata_reads():
    data = _npz({"counts.npy": _npy(_counts()), "i0.npy": _npy(np.array([53000.0, 52000.0])),
                 "pitch_mm.npy": _npy(np.array(4.0))})
    scan, _ = read_with_peak(data, "ok.npz")
    assert isinstance(scan, Scan) and scan.i0 == (53000.0, 52000.0) and scan.pitch_mm == 4.0


# ---------------------------------------------------------------- TIFF

def tiff_file(width: int, height: int, segments: list[bytes], compression: int = 1,
              tile: tuple[int, int] | None = None, pages: int = 1, samples: int = 1) -> bytes:
    """A little-endian uint16 TIFF written by hand (tifffile refuses to write lies): `pages` identical IFDs, each with
    the given strips (or tiles of `tile` = (width, length)) of `samples` interleaved channels stored as they are,
    compressed or not."""
    import struct
    n = len(segments)
    data_at = 8 + 8 * n   # header, then the offset and byte-count arrays, then the segments
    offsets = np.cumsum([data_at] + [len(s) for s in segments[:-1]]).astype("<u4")
    counts = np.array([len(s) for s in segments], "<u4")
    arrays = {273: (offsets, 8), 324: (offsets, 8), 279: (counts, 8 + 4 * n), 325: (counts, 8 + 4 * n)}
    layout = [(322, tile[0]), (323, tile[1]), (324, 0), (325, 0)] if tile else [(273, 0), (278, -(-height // n)),
                                                                                  (279, 0)]
    tags = sorted([(256, width), (257, height), (258, 16), (259, compression), (262, 1), (277, samples)] + layout)
    ifds_at = data_at + int(counts.sum())
    ifd_size = 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifds_at) + offsets.tobytes() + counts.tobytes())
    out += b"".join(segments)
    for i in range(pages):
        out += struct.pack("<H", len(tags))
        for tag, value in tags:
            if tag in arrays:   # one value is stored in the entry itself, more at their offset
                values, at = arrays[tag]
                value = int(values[0]) if n == 1 else at
            out += struct.pack("<HHII", tag, 4, n if tag in arrays else 1, value)
        out += struct.pack("<I", ifds_at + (i + 1) * ifd_size if i < pages - 1 else 0)
    return bytes(out)


def test_hand_written_tiff_reads():
    counts = _counts(1)[0]
    strips = [counts[i:i + 16].tobytes() for i in range(0, 64, 16)]
    scan, _ = read_with_peak(tiff_file(160, 64, strips), "ok.tiff")
    assert isinstance(scan, Scan)
    np.testing.assert_array_equal(scan.counts[0], counts)


def test_tiff_with_thousands_of_pages_is_refused_without_walking_them():
    import time
    data = tiff_file(16, 16, [b"\0" * 512], pages=100_000)
    t0 = time.perf_counter()
    expect_refused(data, "pages.tiff", "pages; at most 2 energies")
    assert time.perf_counter() - t0 < 1.0   # counting all 100,000 pages took 3 s


def test_tiff_of_one_pixel_tiles_is_refused_before_decoding():
    import time
    data = tiff_file(200, 200, [b"\1\2"] * 40_000, tile=(1, 1))
    t0 = time.perf_counter()
    expect_refused(data, "tiles.tiff", "strips or tiles in one page")
    assert time.perf_counter() - t0 < 1.0   # decoding 40,000 one-pixel tiles took ~5 s


def _packbits(raw: bytes) -> bytes:
    """PackBits: 128 zero bytes as one repeat run (2 bytes), anything else as literal runs."""
    zeros = bytes(128)
    return b"".join(b"\x81\x00" if raw[i:i + 128] == zeros else bytes([len(raw[i:i + 128]) - 1]) + raw[i:i + 128]
                    for i in range(0, len(raw), 128))


BOMB = b"\0" * 40_000_000   # what each bomb strip unpacks to, for a page that holds 20 KB


@pytest.mark.parametrize("compression, pack", [(8, lambda b: __import__("zlib").compress(b, 9)),
                                               (34925, lambda b: __import__("lzma").compress(b, preset=0)),
                                               (32773, _packbits)])
def test_tiff_strip_that_unpacks_past_its_page_is_refused(compression, pack):
    counts = _counts(1)[0]
    assert isinstance(read_with_peak(tiff_file(160, 64, [pack(counts.tobytes())], compression), "ok.tiff")[0], Scan)
    data = tiff_file(160, 64, [pack(counts.tobytes() + BOMB)], compression)
    assert len(data) < 1_000_000
    expect_refused(data, "bomb.tiff", "decompression bomb")


@pytest.mark.parametrize("kw", [{"compression": "zlib"}, {"compression": "zlib", "predictor": True},
                                {"compression": "lzma", "tile": (32, 32)},
                                {"compression": "zlib", "photometric": "minisblack", "planarconfig": "separate"}])
def test_compressed_tiffs_still_read_exactly(kw):
    import tifffile
    counts = _counts(2 if "planarconfig" in kw else 1)
    buf = io.BytesIO()
    tifffile.imwrite(buf, counts if "planarconfig" in kw else counts[0], **kw)
    scan, _ = read_with_peak(buf.getvalue(), "ok.tiff")
    assert isinstance(scan, Scan), scan
    np.testing.assert_array_equal(scan.counts, counts)


def _lzw(raw: bytes) -> bytes:
    """TIFF LZW coding every byte as a literal (a Clear code every 250 keeps the codes 9 bits wide)."""
    codes = []
    for i in range(0, len(raw), 250):
        codes += [256, *raw[i:i + 250]]
    bits = "".join(format(c, "09b") for c in codes + [257])
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def test_lzw_tiff_reads_through_opencv_or_is_refused_never_misread():
    """tifffile needs imagecodecs for LZW, so OpenCV decodes it; OpenCV read a dual-energy (H, W, 2) uint16 page as
    one 8-bit channel (a different scan, routed as if it were this one)."""
    counts = _counts(2)
    one, _ = read_with_peak(tiff_file(160, 64, [_lzw(counts[0].tobytes())], compression=5), "one.tiff")
    np.testing.assert_array_equal(one.counts[0], counts[0])
    pair = tiff_file(160, 64, [_lzw(np.moveaxis(counts, 0, -1).tobytes())], compression=5, samples=2)
    expect_refused(pair, "pair.tiff", "OpenCV decodes it as (64, 160) uint8")


# ---------------------------------------------------------------- JPEG

def test_jpeg_frame_hidden_from_the_size_check_is_refused_before_decoding(monkeypatch):
    """libjpeg skips FF 00 as two stray bytes; the size check read it as a segment with a length, jumped over the
    real 1200x1300 frame header and checked a 64x160 one placed after it. OpenCV then decoded the big frame (up to
    its own limit of 2^30 pixels, GBs from a small file) before the pixel limit was applied."""
    import struct

    import cv2

    import detector.formats as formats_module
    ok, big = cv2.imencode(".jpg", np.zeros((1200, 1300), np.uint8))
    ok, small = cv2.imencode(".jpg", _counts(1)[0].astype(np.uint8))
    body = big.tobytes()[2:]
    data = b"\xff\xd8\xff\x00" + struct.pack(">H", len(body) + 2) + body + small.tobytes()[2:]
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == (1200, 1300)
    decoded = []
    monkeypatch.setattr(formats_module, "_decode_image", lambda *a: decoded.append(a) or cv2.imdecode(
        np.frombuffer(a[0], np.uint8), cv2.IMREAD_UNCHANGED))
    expect_refused(data, "hidden.jpg", "image too large (1200x1300", max_pixels=1_000_000)
    assert not decoded


# ---------------------------------------------------------------- DICOM and files

def test_deflated_dicom_that_inflates_past_any_scan_is_refused():
    counts = _counts(1)[0]
    scan, _ = read_with_peak(dicom_bytes(counts, deflated=True), "ok.dcm", max_pixels=100_000)
    np.testing.assert_array_equal(scan.counts[0], counts)
    data = dicom_bytes(counts, deflated=True, padding=25_000_000)
    assert len(data) < 100_000
    expect_refused(data, "bomb.dcm", "decompression bomb", max_pixels=100_000)


def test_file_larger_than_any_scan_is_refused_unread(tmp_path):
    from detector.scan import read_scan
    path = tmp_path / "disk_image.tiff"
    with open(path, "wb") as f:   # sparse: 100 MB on paper, no disk
        f.write(b"II*\x00")
        f.truncate(100_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(ScanError, match="more than a scan within the pixel limit holds") as err:
            read_scan(path, max_pixels=100_000)
        assert tracemalloc.get_traced_memory()[1] < 5 * MB
    finally:
        tracemalloc.stop()
    assert err.value.path == str(path)


# ---------------------------------------------------------------- fuzzing the committed samples, seeded

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _mutate(raw: bytes, rnd: random.Random) -> bytes:
    """1-6 random byte changes, header-heavy, with the odd cut or insertion."""
    out = bytearray(raw)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.random()
        if op < 0.8:
            out[rnd.randrange(len(out) if op < 0.5 else min(len(out), 512))] = rnd.randrange(256)
        elif op < 0.9:
            out = out[:rnd.randrange(1, len(out) + 1)]
        else:
            at = rnd.randrange(len(out) + 1)
            out[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    return bytes(out)


def test_mutated_samples_give_scan_errors_or_scans_and_never_an_unread_release(heuristic_model):
    """300 seeded mutations of data/samples' scans: reading raises ScanError or gives a finite scan, and the
    fail-closed Inspector answers them without raising, INSPECT naming the file whenever the bytes cannot be read."""
    from detector.runtime import Inspector
    inspector = Inspector(heuristic_model, threads=1, warmup=False)
    samples = {p.name: p.read_bytes() for p in sorted(SAMPLES.iterdir()) if p.suffix != ".csv" and "mask" not in p.name}
    rnd = random.Random(20261206)
    outcomes = {"read": 0, "refused": 0}
    for case in range(300):
        name = rnd.choice(sorted(samples))
        data = _mutate(samples[name], rnd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out: Scan | ScanError = read_scan_bytes(data, name)
            except ScanError as e:
                out = e
        outcomes["read" if isinstance(out, Scan) else "refused"] += 1
        if isinstance(out, Scan):
            assert out.attenuation.dtype == np.float32 and np.isfinite(out.attenuation).all()
            if outcomes["read"] % 10:   # a readable scan's verdict is the model's: check one in ten, for time
                continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verdict = inspector.inspect_safe((data, name), deadline_ms=5000)
        assert verdict.decision in ("RELEASE", "INSPECT"), (case, name)
        if isinstance(out, ScanError):
            assert verdict.decision == "INSPECT" and name in verdict.reason, (case, name, verdict.reason)
    assert min(outcomes.values()) > 30, outcomes   # both paths were exercised


def test_paths_that_are_no_files_are_inspected_at_once(heuristic_model, tmp_path):
    """A FIFO (whose read would wait for a writer forever), /dev/zero (endless), a symlink loop or to nothing, a folder
    and an empty file: each an immediate INSPECT naming the path and what it is (a link that `ls` lists was "file not
    found"), never a hang or a crash."""
    import os
    import time

    from detector.runtime import Inspector
    inspector = Inspector(heuristic_model, threads=1, warmup=False)
    os.mkfifo(tmp_path / "fifo.tiff")
    (tmp_path / "zero.tiff").symlink_to("/dev/zero")
    (tmp_path / "loop.tiff").symlink_to(tmp_path / "loop.tiff")
    (tmp_path / "dangling.tiff").symlink_to(tmp_path / "gone.tiff")
    (tmp_path / "empty.tiff").write_bytes(b"")
    for name, reason in [("fifo.tiff", "not a regular file"), ("zero.tiff", "not a regular file"),
                         ("loop.tiff", "a symbolic link that loops"), ("dangling.tiff", "to a missing file"),
                         (".", "not a regular file"), ("empty.tiff", "empty file")]:
        t0 = time.perf_counter()
        verdict = inspector.inspect_safe(tmp_path / name)
        assert time.perf_counter() - t0 < 1.0
        assert verdict.decision == "INSPECT" and reason in verdict.reason and str(tmp_path) in verdict.reason


def test_a_path_the_os_cannot_look_up_is_a_scan_error(tmp_path):
    """A name longer than the file system allows raised OSError out of read_scan (Path.exists only hides "not
    found"), where every bad input is a ScanError naming the file and the reason."""
    from detector.scan import read_scan
    path = tmp_path / ("x" * 300 + ".tiff")
    with pytest.raises(ScanError, match=r"cannot read file \(File name too long\)") as err:
        read_scan(path)
    assert err.value.path == str(path)

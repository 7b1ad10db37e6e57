"""Hostile scan files: bombs whose header or compressed data claims far more than the file holds, pixel types no
scan has, pathological TIFF layouts. Each must give ScanError naming the file and the cause, with memory and time
bounded by the scan's own size, never by what the bytes claim."""
from __future__ import annotations

import io
import tracemalloc
import warnings

import numpy as np
import pytest

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
                                        ("i0", np.array([1 + 2j, 3j])), ("pitch_mm", np.array(["5"]))])
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

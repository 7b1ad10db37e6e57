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

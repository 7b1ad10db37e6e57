"""Read, validate and write X-ray scans as attenuation images (the core's one way in).

Every format becomes a `Scan`: float32 attenuation (C, H, W) = -ln(clip(I / I0, 1e-6, 1)),
C = 1 (single energy) or 2 (high, low). Bad input of any kind raises `ScanError` naming the file
and the reason; image sizes are checked from the header before any pixels are decoded.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import lzma
import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import tifffile

DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"   # Deflated Explicit VR Little Endian: the whole data set zlib-packed
SCAN_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".npz", ".dcm", ".dcs", ".jpg", ".jpeg")
DEFAULT_PITCH_MM = 5.0
DEFAULT_MAX_PIXELS = int(os.environ.get("DETECTOR_MAX_PIXELS", 40_000_000))  # per channel
MIN_SIDE = 16
MIN_TRANSMISSION = 1e-6
AIR_ROWS = 8  # top rows used to estimate the open-beam I0
PITCH_RANGE_MM = (0.01, 100.0)    # a pixel pitch outside this is a metadata error (samples are 40-45 mm thumbnails)
TAG_PITCH_RANGE_MM = (1.0, 20.0)  # TIFF resolution tags are trusted only in a scanner's range: image editors
                                  # write 72-300 dpi (0.08-0.35 mm), which would shrink a truck 15-60x
BLANK_ATTENUATION = 0.05          # below this (transmission > 95 %) a pixel reads as open beam
BLANK_SHARE = 0.001               # a scan with fewer pixels above it than this share shows no object
MAX_TIFF_SEGMENTS = 16384         # strips or tiles per TIFF page: tifffile spends ~0.1 ms on each, and 1-pixel tiles
                                  # made a 2 MB file take 36 s (a scan has at most a few thousand)

# tifffile logs what it finds wrong in a file besides raising; ScanError already names it, and without a logging
# setup Python printed each such log line raw (two per truncated TIFF, thousands in a batch of copies in progress)
logging.getLogger("tifffile").addHandler(logging.NullHandler())


class ScanError(ValueError):
    """Bad scan input: `.path` is the file (or name), `.reason` says what is wrong."""

    def __init__(self, path: Any, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ScanWarning(UserWarning):
    """A scan was readable but converted (e.g. RGB rendering to one channel): `.path`, `.reason`."""

    def __init__(self, path: Any, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@contextlib.contextmanager
def summarised_scan_warnings(report: Callable[[str], None]) -> Iterator[None]:
    """Collect the ScanWarnings raised inside (from any thread) and report one line per reason, with its count and
    a file, when the block ends: batch jobs printed one two-line warning per scan (20,000 lines for 10,000 RGB
    renderings). Other warnings are passed on as they would have been."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScanWarning)
        try:
            yield
        finally:
            groups: dict[str, list[str]] = {}
            others = []
            for w in caught:
                if issubclass(w.category, ScanWarning):
                    m = w.message
                    groups.setdefault(getattr(m, "reason", str(m)), []).append(getattr(m, "path", "?"))
                else:
                    others.append(w)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    for reason, paths in groups.items():
        report(f"{len(paths)} scan(s): {reason} (e.g. {paths[0]})")


@dataclass
class Scan:
    """One scan in the attenuation domain, with what is needed to write it back losslessly."""

    attenuation: np.ndarray  # float32 (C, H, W)
    pitch_mm: float = DEFAULT_PITCH_MM
    energies: tuple[str, ...] = ("single",)
    i0: tuple[float, ...] = (65535.0,)
    source: str | None = None
    counts: np.ndarray | None = None  # original integer pixels (C, H, W)
    meta: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.attenuation.shape[0])

    @property
    def height(self) -> int:
        return int(self.attenuation.shape[1])

    @property
    def width(self) -> int:
        return int(self.attenuation.shape[2])


# ---------------------------------------------------------------- conversions

def counts_to_attenuation(counts: np.ndarray, i0: float | tuple[float, ...]) -> np.ndarray:
    """Beer-Lambert: A = -ln(clip(I / I0, 1e-6, 1)) per channel, float32 (C, H, W)."""
    counts = np.asarray(counts)
    if counts.ndim == 2:
        counts = counts[None]
    i0s = np.broadcast_to(np.asarray(i0, dtype=np.float64).reshape(-1), (counts.shape[0],))
    out = np.empty(counts.shape, dtype=np.float32)
    for c in range(counts.shape[0]):
        t = counts[c].astype(np.float32) * np.float32(1.0 / i0s[c])
        np.clip(t, MIN_TRANSMISSION, 1.0, out=t)
        np.log(t, out=t)
        np.negative(t, out=out[c])
    return out


def attenuation_to_counts(att: np.ndarray, i0: float | tuple[float, ...], dtype=np.uint16) -> np.ndarray:
    """Inverse of counts_to_attenuation: I = I0 * exp(-A), rounded and clipped to the dtype."""
    att = np.asarray(att, dtype=np.float64)
    if att.ndim == 2:
        att = att[None]
    i0s = np.broadcast_to(np.asarray(i0, dtype=np.float64).reshape(-1), (att.shape[0],))
    hi = np.iinfo(dtype).max
    counts = np.rint(i0s[:, None, None] * np.exp(-att))
    return np.clip(counts, 0, hi).astype(dtype)


def estimate_i0(counts: np.ndarray, dtype_max: float) -> tuple[float, ...]:
    """Open-beam I0 per channel from the air above the vehicle (top rows), else the dtype max.

    The top rows count as air when they are bright (above half the range) and flat (robust spread
    under 5 %); their median is then the open-beam reading.
    """
    out = []
    for ch in counts:
        top = ch[: max(1, min(AIR_ROWS, ch.shape[0] // 10 or 1))].astype(np.float64)
        med = float(np.median(top))
        mad = float(np.median(np.abs(top - med)))
        if med > 0.5 * dtype_max and mad < 0.05 * med:
            out.append(med)
        else:
            out.append(float(dtype_max))
    return tuple(out)


def scan_from_counts(counts: np.ndarray, *, i0: float | tuple[float, ...] | None = None,
                     pitch_mm: float | None = None, energies: tuple[str, ...] | None = None,
                     source: str | None = None, meta: dict | None = None,
                     max_pixels: int | None = None, full_scale: float | None = None) -> Scan:
    """Validate integer (or [0,1] float transmission) pixels and build a Scan. `full_scale`: the integer counts'
    largest possible value when the file says (DICOM BitsStored: 4095 for 12-bit data), else the dtype's maximum;
    the I0 guess without air at the top."""
    src = source or "<array>"
    counts = np.asarray(counts)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3:
        raise ScanError(src, f"expected a 2-D image or (C, H, W) stack, got shape {counts.shape}")
    if _channels_last(counts.shape):   # (H, W, 2) as many tools write a dual-energy pair
        counts = np.moveaxis(counts, -1, 0)
    _check_shape(src, counts.shape[0], counts.shape[1], counts.shape[2], max_pixels)
    if not counts.dtype.isnative:      # big-endian pixels, e.g. from a FITS-minded tool or a raw dump
        counts = counts.astype(counts.dtype.newbyteorder("="))
    if counts.dtype in (np.uint8, np.uint16):
        dtype_max = float(full_scale or np.iinfo(counts.dtype).max)
    elif counts.dtype.kind == "f":
        if not np.isfinite(counts).all():
            raise ScanError(src, "pixel values contain NaN or infinity")
        if counts.min() < 0 or counts.max() > 1:
            raise ScanError(src, f"float pixels must be transmissions in [0, 1], got "
                                 f"[{counts.min():.3g}, {counts.max():.3g}]")
        dtype_max = 1.0
    else:
        raise ScanError(src, f"unsupported pixel type {counts.dtype}; expected uint8 or uint16 counts "
                             "(or float transmission in [0, 1])")
    guessed = i0 is None
    if guessed:
        i0 = estimate_i0(counts, dtype_max)
    i0_arr = np.asarray(i0, dtype=np.float64).reshape(-1)
    if i0_arr.size not in (1, counts.shape[0]):
        raise ScanError(src, f"{i0_arr.size} I0 values for {counts.shape[0]} channel(s)")
    i0 = tuple(float(v) for v in np.broadcast_to(i0_arr, (counts.shape[0],)))
    if not all(math.isfinite(v) and v > 0 for v in i0):
        raise ScanError(src, f"invalid I0 {i0}")
    pitch = _valid_pitch(src, DEFAULT_PITCH_MM if pitch_mm is None else pitch_mm)
    if energies is None:
        energies = ("high", "low") if counts.shape[0] == 2 else ("single",)
    if len(energies) != counts.shape[0]:
        raise ScanError(src, f"{len(energies)} energy names for {counts.shape[0]} channels")
    att = counts_to_attenuation(counts, i0)
    _check_not_blank(src, counts, att, i0)
    brightest = float(counts.max()) if guessed and counts.dtype == np.uint16 and min(i0) == dtype_max else None
    if brightest is not None and brightest < 0.5 * dtype_max:
        warnings.warn(ScanWarning(src, f"no open beam at the top and the brightest pixel reads {brightest:g} of "
                                       f"{dtype_max:g}: I0 taken as {dtype_max:g}, which reads every pixel denser "
                                       "than it is if the detector has fewer bits (12/14-bit data): give I0 in the "
                                       "metadata"),
                      stacklevel=2)
    return Scan(attenuation=att, pitch_mm=pitch, energies=tuple(energies),
                i0=i0, source=source, counts=counts if counts.dtype.kind == "u" else None,
                meta=dict(meta or {}))


def check_scan(scan: Scan) -> Scan:
    """The checks scan_from_counts makes, for a Scan built in memory (a station handing the Inspector its own):
    (C, H, W) with 1-2 channels of a sane size, a valid pitch, finite, and not blank. Without them a pitch of 0 or
    -5 shrank the truck to one pixel and a negated attenuation read as air: both were released."""
    src = scan.source or "<scan>"
    att = np.asarray(scan.attenuation)
    if att.ndim != 3 or att.dtype.kind != "f":
        raise ScanError(src, f"attenuation must be a float (C, H, W) array, got {att.dtype} {att.shape}")
    _check_shape(src, *att.shape, None)
    _valid_pitch(src, scan.pitch_mm)
    if not np.isfinite(att).all():   # ~1 ms on a 2-energy 640x2400 scan
        raise ScanError(src, "attenuation contains NaN or infinity")
    _check_not_blank(src, att if scan.counts is None else scan.counts, att, tuple(scan.i0) or (1.0,))
    return scan


def _channels_last(shape: tuple[int, ...]) -> bool:
    """True for an (H, W, 1|2) stack: a channel axis last and an image's sides first."""
    return len(shape) == 3 and shape[2] in (1, 2) and shape[0] > 2 and shape[1] > 2


def _valid_pitch(src: str, pitch_mm: Any) -> float:
    """The pixel pitch as a float; ScanError when it is not a number or outside PITCH_RANGE_MM: a negative
    or tiny pitch shrinks the scan to nothing (its threats vanish), a huge one blows it up past memory."""
    try:
        pitch = float(pitch_mm)
    except (TypeError, ValueError):
        raise ScanError(src, f"pixel pitch {pitch_mm!r} is not a number") from None
    lo, hi = PITCH_RANGE_MM
    if not (math.isfinite(pitch) and lo <= pitch <= hi):
        raise ScanError(src, f"pixel pitch {pitch:g} mm is outside {lo:g}-{hi:g} mm (wrong metadata?)")
    return pitch


def _check_not_blank(src: str, counts: np.ndarray, att: np.ndarray, i0: tuple[float, ...]) -> None:
    """ScanError for an image that shows nothing: every pixel the same (no acquisition), or (nearly) every
    pixel open beam (a saturated detector, an empty lane, or an I0 below the counts). Such a scan must never
    be released as a clean truck."""
    first = counts[0]
    sub = first[::2, ::2]   # a quarter of the pixels first: ~1 ms on a scan, the full check only when it is flat
    if sub.min() == sub.max() and first.min() == first.max():
        raise ScanError(src, f"every pixel reads {first.flat[0]:g}: a blank image (no acquisition, or a saturated "
                             "detector)")
    view = att[0, ::2, ::2]
    if np.count_nonzero(view > BLANK_ATTENUATION) < BLANK_SHARE * view.size:
        median = float(np.median(first[::4, ::4]))
        why = (f"I0 {i0[0]:g} is below most pixel counts (median {median:g}): wrong I0 in the metadata"
               if median > 1.05 * i0[0] else "a saturated detector or an empty scan")
        raise ScanError(src, f"blank scan: nothing in it attenuates the beam (every pixel is open air); {why}")


def _most_scan_bytes(max_pixels: int | None) -> int:
    """The most bytes a scan within the pixel limit can take: two energies of float64, plus 16 MiB of headers."""
    return 2 * 8 * (DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels) + (16 << 20)


def _check_shape(src: str, c: int, h: int, w: int, max_pixels: int | None) -> None:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if h == 0 or w == 0 or c == 0:
        raise ScanError(src, f"zero-size image ({c}x{h}x{w})")
    if c > 2:
        raise ScanError(src, f"{c} energies/channels; at most 2 (high, low) are supported")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ScanError(src, f"image too small ({h}x{w} px; at least {MIN_SIDE} px per side)")
    if h * w > limit:
        raise ScanError(src, f"image too large ({h}x{w} = {h * w / 1e6:.1f} Mpx > limit "
                             f"{limit / 1e6:.1f} Mpx; set DETECTOR_MAX_PIXELS to allow)")


# ---------------------------------------------------------------- reading

def _sniff(head: bytes, suffix: str) -> str:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if suffix in (".dcm", ".dcs"):
        return "dicom"
    return "unknown"


def read_scan(path: str | os.PathLike, *, max_pixels: int | None = None) -> Scan:
    """Read any supported scan file into a Scan; raise ScanError on any bad input."""
    p = Path(path)
    if not p.exists():
        raise ScanError(p, "file not found")
    if not p.is_file():
        raise ScanError(p, "not a regular file")
    try:
        size, most = p.stat().st_size, _most_scan_bytes(max_pixels)
        if size > most:   # read whole, any big file (a video, a disk image) filled memory
            raise ScanError(p, f"file of {size / 1e6:.0f} MB, more than a scan within the pixel limit holds "
                               f"({most / 1e6:.0f} MB; set DETECTOR_MAX_PIXELS to allow)")
        data = p.read_bytes()
    except OSError as exc:
        raise ScanError(p, f"cannot read file ({exc.strerror or exc})") from exc
    return read_scan_bytes(data, str(p), max_pixels=max_pixels)


def read_scan_bytes(data: bytes, name: str, *, max_pixels: int | None = None) -> Scan:
    """Read a scan from its file bytes (`name` gives the suffix and the name in errors)."""
    if len(data) == 0:
        raise ScanError(name, "empty file (0 bytes)")
    kind = _sniff(data[:132], Path(name).suffix.lower())
    readers = {"png": _read_png, "jpeg": _read_jpeg, "tiff": _read_tiff, "npy": _read_npy,
               "npz": _read_npz, "dicom": _read_dicom}
    if kind not in readers:
        raise ScanError(name, "not a supported scan format (PNG, TIFF, NPY/NPZ, DICOM/DICOS, JPEG)")
    try:
        counts, info = readers[kind](data, name, max_pixels)
    except ScanError:
        raise
    except MemoryError as exc:
        raise ScanError(name, "image too large to decode in memory") from exc
    except Exception as exc:  # any decoder failure on corrupt bytes is bad input, never a crash
        raise ScanError(name, f"corrupt or truncated {kind.upper()} ({type(exc).__name__}: {exc})") from exc
    return scan_from_counts(counts, source=name, max_pixels=max_pixels, **info)


def _png_size(data: bytes, name: str) -> tuple[int, int, int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ScanError(name, "truncated PNG header")
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    return h, w, depth, color


def _decode_image(data: bytes, name: str, kind: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ScanError(name, f"corrupt or truncated {kind} (decoder returned nothing)")
    return img


def _to_one_channel(img: np.ndarray, name: str) -> np.ndarray:
    """8-bit/16-bit grey stays; RGB(A) renderings become luminance with a warning."""
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] in (3, 4):
        warnings.warn(ScanWarning(name, "colour image converted to one grey channel (luminance); raw 16-bit "
                                        "scans are better input"), stacklevel=3)
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(img, code)
    if img.ndim == 3 and img.shape[2] == 2:
        return np.moveaxis(img, -1, 0)
    raise ScanError(name, f"unsupported image layout {img.shape}")


def _read_png(data: bytes, name: str, max_pixels: int | None):
    h, w, depth, color = _png_size(data, name)
    _check_shape(name, 1, h, w, max_pixels)
    if depth not in (1, 2, 4, 8, 16):
        raise ScanError(name, f"invalid PNG bit depth {depth}")
    img = _decode_image(data, name, "PNG")
    if img.shape[:2] != (h, w):
        raise ScanError(name, "corrupt PNG (decoded size differs from header)")
    return _to_one_channel(img, name), {}


def _jpeg_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) from the first frame header, found as libjpeg finds it: FF 00 is no marker but two bytes
    to skip (read as a segment with a length, it hid a 1300x1200 frame behind a 64x160 one from the size check)."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        seg = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return h, w
        i += 2 + seg
    raise ScanError(name, "truncated JPEG (no frame header)")


def _read_jpeg(data: bytes, name: str, max_pixels: int | None):
    h, w = _jpeg_size(data, name)
    _check_shape(name, 1, h, w, max_pixels)
    img = _decode_image(data, name, "JPEG")
    if img.shape[:2] != (h, w):
        raise ScanError(name, "corrupt JPEG (decoded size differs from header)")
    return _to_one_channel(img, name), {}


def _read_tiff(data: bytes, name: str, max_pixels: int | None):
    buf = io.BytesIO(data)
    try:
        return _read_tiff_buffer(buf, data, name, max_pixels)
    finally:
        buf.close()  # tifffile leaves a reference cycle: free the buffer's copy of the file now


def _read_tiff_buffer(buf: io.BytesIO, data: bytes, name: str, max_pixels: int | None):
    with tifffile.TiffFile(buf) as tif:
        pages = list(itertools.islice(tif.pages, 3))   # len(tif.pages) walked every page: 16 s for 500,000
        if len(pages) == 0:
            raise ScanError(name, "TIFF has no pages")
        first = pages[0]
        shape = tuple(first.shape)
        n_pages = len(pages)
        if n_pages > 2:
            raise ScanError(name, "3 or more pages; at most 2 energies (high, low) are supported")
        planar = len(shape) == 3 and str(first.axes).startswith("S")   # one page, energies as separate planes
        h, w = (shape[1], shape[2]) if planar else (shape[0], shape[1] if len(shape) > 1 else 0)
        c = n_pages * (shape[0] if planar else shape[2] if len(shape) == 3 else 1)
        _check_shape(name, c, h, w, max_pixels)
        for page in pages:
            if tuple(page.shape) != shape:
                raise ScanError(name, f"TIFF pages differ in size ({page.shape} vs {shape})")
            if len(page.dataoffsets) > MAX_TIFF_SEGMENTS:
                raise ScanError(name, f"{len(page.dataoffsets)} strips or tiles in one page (at most "
                                      f"{MAX_TIFF_SEGMENTS}): each is decoded on its own, so they take minutes")
            _check_tiff_segments(page, data, name)
        try:
            arrays = [page.asarray() for page in pages]
        except ValueError as e:
            if "imagecodecs" not in str(e):
                raise
            arrays = _tiff_pages_opencv(data, name, pages)   # e.g. LZW (OpenCV's default): its libtiff reads it
        info = _tiff_info(first, name)
    if len(arrays) == 2:
        counts = np.stack(arrays)
    else:
        img = arrays[0]
        if planar or (img.ndim == 3 and img.shape[2] == 2):   # (C, H, W), or (H, W, 2) that scan_from_counts turns
            counts = img
        elif img.ndim == 3 and img.shape[2] in (3, 4) and img.dtype == np.uint8:
            counts = _to_one_channel(img[..., ::-1].copy(), name)  # TIFF RGB -> BGR for OpenCV
        elif img.ndim == 2:
            counts = img
        else:
            raise ScanError(name, f"unsupported TIFF layout {img.shape} {img.dtype}")
    return counts, info


def _check_tiff_segments(page: Any, data: bytes, name: str) -> None:
    """ScanError for a compressed strip or tile that unpacks to more bytes than it holds. Without imagecodecs
    tifffile unpacks zlib, LZMA and PackBits segments whole, whatever their size: a 115 KB strip of a 64x160 page
    took 215 MB (a 64 MB upload, 64 GB)."""
    most = math.prod(page.chunks) * -(-page.bitspersample // 8)
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        size = _unpacked_size(page.compression, data[offset:offset + count], most)
        if size is None:
            return
        if size > most:
            raise ScanError(name, f"a compressed strip or tile unpacks to more than the {most} bytes it holds "
                                  "(a decompression bomb)")


def _unpacked_size(compression: int, segment: bytes, most: int) -> int | None:
    """Bytes a zlib, LZMA or PackBits TIFF segment unpacks to, counted no further than most + 1; None for other
    codecs (no codec, or one that OpenCV's libtiff decodes into a buffer of the segment's size)."""
    if compression in (8, 32946):
        return len(zlib.decompressobj().decompress(segment, most + 1))
    if compression == 34925:
        return len(lzma.LZMADecompressor().decompress(segment, most + 1))
    if compression != 32773:
        return None
    i = n = 0
    while i < len(segment) and n <= most:   # PackBits: a header byte, then a literal run or one repeated byte
        head = segment[i]
        n += head + 1 if head < 128 else 257 - head if head > 128 else 0
        i += head + 2 if head < 128 else 2 if head > 128 else 1
    return n


def _tiff_pages_opencv(data: bytes, name: str, tiff_pages: list[Any]) -> list[np.ndarray]:
    """The pages of a TIFF whose compression tifffile cannot decode without imagecodecs, through OpenCV
    (colour pages in tifffile's RGB order), each the shape and type its header says: OpenCV read a dual-energy
    (H, W, 2) uint16 page as one 8-bit channel."""
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if not ok or len(pages) != len(tiff_pages):
        raise ScanError(name, "compressed TIFF that neither tifffile (without imagecodecs) nor OpenCV can decode")
    for got, page in zip(pages, tiff_pages):
        if got.shape != tuple(page.shape) or got.dtype != page.dtype:
            raise ScanError(name, f"compressed TIFF page of {tuple(page.shape)} {page.dtype} that tifffile cannot "
                                  f"decode without imagecodecs, and OpenCV decodes it as {got.shape} {got.dtype}")
    rgb = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}
    return [cv2.cvtColor(p, rgb[p.shape[2]]) if p.ndim == 3 and p.shape[2] in rgb else p for p in pages]


def _tiff_info(page: Any, name: str) -> dict:
    """I0, pitch and energy names from our JSON description, else the resolution tags."""
    info: dict = {}
    desc = page.description or ""
    if desc.startswith("{"):
        try:
            d = json.loads(desc)
        except ValueError:
            d = {}
        d = d.get("detector", d) if isinstance(d, dict) else {}
        if isinstance(d, dict):
            if d.get("i0") is not None:
                info["i0"] = tuple(float(v) for v in np.ravel(d["i0"]))
            if d.get("pitch_mm") is not None:
                info["pitch_mm"] = d["pitch_mm"]   # checked with the rest in scan_from_counts
            if d.get("energies"):
                info["energies"] = tuple(str(e) for e in d["energies"])
    if "pitch_mm" not in info:
        tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
        if tag is not None and unit is not None and int(unit.value) in (2, 3):
            num, den = tag.value
            if num and den:
                per_unit = num / den
                mm_per_unit = 25.4 if int(unit.value) == 2 else 10.0
                pitch = mm_per_unit / per_unit
                lo, hi = TAG_PITCH_RANGE_MM
                if lo <= pitch <= hi:
                    info["pitch_mm"] = pitch
                else:
                    warnings.warn(ScanWarning(name, f"TIFF resolution tag ({per_unit:g} per "
                                                    f"{'inch' if int(unit.value) == 2 else 'cm'}) is no scanner pitch "
                                                    f"({lo:g}-{hi:g} mm): ignored, {DEFAULT_PITCH_MM:g} mm assumed"),
                                  stacklevel=2)
    return info


def _read_npy(data: bytes, name: str, max_pixels: int | None):
    f = io.BytesIO(data)
    _check_npy_header(f, name, max_pixels, len(data))
    f.seek(0)
    arr = np.load(f, allow_pickle=False)
    return np.ascontiguousarray(arr), {}


def _read_npy_header(f: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header; ScanError for Python objects."""
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise ScanError(name, "NumPy file holds Python objects; refusing to unpickle")
    return tuple(shape), dtype


def _check_npy_header(f: Any, name: str, max_pixels: int | None, file_bytes: int) -> None:
    """Size and dtype checks from the .npy header alone, before any pixel is read. NumPy allocates the whole array
    before reading it: a 128-byte header of 16x16 pixels of 10 MB each (or of complex128 at the pixel limit) took
    GBs, so only pixel types a scan can have pass, and only when the file (`file_bytes`) holds all their bytes."""
    shape, dtype = _read_npy_header(f, name)
    if not ((dtype.kind == "u" and dtype.itemsize <= 2) or (dtype.kind == "f" and dtype.itemsize <= 8)):
        raise ScanError(name, f"unsupported pixel type {dtype}; expected uint8 or uint16 counts (or float "
                              "transmission in [0, 1])")
    if len(shape) == 2:
        _check_shape(name, 1, shape[0], shape[1], max_pixels)
    elif _channels_last(shape):
        _check_shape(name, shape[2], shape[0], shape[1], max_pixels)
    elif len(shape) == 3:
        _check_shape(name, shape[0], shape[1], shape[2], max_pixels)
    else:
        raise ScanError(name, f"expected a 2-D image or (C, H, W) stack, got shape {shape}")
    need = f.tell() + math.prod(shape) * dtype.itemsize
    if need > file_bytes:
        raise ScanError(name, f"truncated NumPy array: its header promises {need} bytes, the file holds {file_bytes}")


def _read_npz(data: bytes, name: str, max_pixels: int | None):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "counts" not in z:
            raise ScanError(name, "NPZ scan needs a 'counts' array (optional 'i0', 'pitch_mm')")
        with z.zip.open("counts.npy") as f:
            _check_npy_header(f, name, max_pixels, z.zip.getinfo("counts.npy").file_size)
        counts = z["counts"]
        info: dict = {}
        if "i0" in z:
            info["i0"] = tuple(float(v) for v in np.ravel(_npz_numbers(z, "i0", 2, name)))
        if "pitch_mm" in z:
            info["pitch_mm"] = _npz_numbers(z, "pitch_mm", 1, name)
    return counts, info


def _npz_numbers(z: Any, key: str, most: int, name: str) -> np.ndarray:
    """NPZ member `key`: at most `most` real numbers, checked from its header before it is unpacked. Loaded blind,
    an 'i0' of zeros deflated 1000:1, so a 60 KB file took 120 MB (a 64 MB upload, 64 GB)."""
    member = f"{key}.npy"
    if member not in z.zip.namelist():
        raise ScanError(name, f"NPZ member {key!r} is no .npy array")
    with z.zip.open(member) as f:
        shape, dtype = _read_npy_header(f, name)
        if dtype.kind not in "uif" or math.prod(shape) > most:
            raise ScanError(name, f"NPZ {key!r} must hold at most {most} number(s), got {dtype} {shape}")
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)


def _read_dicom(data: bytes, name: str, max_pixels: int | None):
    try:
        import pydicom
    except ImportError as exc:
        raise ScanError(name, "DICOM/DICOS needs pydicom: pip install 'detector[dicom]'") from exc
    _check_inflated_size(data, name, _most_scan_bytes(max_pixels))
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False, force=True, defer_size=None)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanError(name, "no DICOM image in it (no pixel data): not a DICOM file, or its header is truncated")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 2:   # "40 energies/channels" said nothing of what a DICOS CT volume or a series of views is
        raise ScanError(name, f"{frames} frames (a CT volume or a series of views?); a scan has one frame per "
                              "energy, at most 2 (high, low)")
    _check_shape(name, frames, rows, cols, max_pixels)
    _check_dicom_pixels_are_counts(ds, name)
    arr, full_scale = _dicom_counts(_dicom_pixel_array(ds, name), ds, name)
    info: dict = {"full_scale": full_scale}
    spacing = _dicom_spacing(ds, name)
    if spacing is not None:
        arr, info["pitch_mm"] = _square_pixels(arr, *spacing)
    return arr, info


def _check_inflated_size(data: bytes, name: str, most: int) -> None:
    """ScanError for a Deflated Explicit VR DICOM whose data set inflates past `most` bytes, counted with a bounded
    decoder: pydicom inflates it whole (a 116 KB file took 215 MB; a 64 MB upload, 64 GB)."""
    from pydicom.filereader import read_dataset, read_preamble
    f = io.BytesIO(data)
    read_preamble(f, True)
    meta = read_dataset(f, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, *_: tag >> 16 != 2)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_DICOM:
        return
    inflate, rest, size = zlib.decompressobj(-zlib.MAX_WBITS), data[f.tell():], 0
    while rest and size <= most:   # 1 MiB at a time, each dropped once counted
        size += len(inflate.decompress(rest, 1 << 20))
        rest = inflate.unconsumed_tail
    if size > most:
        raise ScanError(name, f"deflated DICOM data set inflates past {most / 1e6:.0f} MB, more than a scan within "
                              "the pixel limit holds (a decompression bomb)")


def _dicom_spacing(ds: Any, name: str) -> tuple[float, float] | None:
    """[row, column] pixel spacing in mm from ImagerPixelSpacing, else PixelSpacing, each checked; None when
    absent. The row spacing alone used to be taken, and a 0 mm column spacing went unseen."""
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if not spacing:
        return None
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    return _valid_pitch(name, values[0]), _valid_pitch(name, values[-1])


def _square_pixels(counts: np.ndarray, row_mm: float, col_mm: float) -> tuple[np.ndarray, float]:
    """Counts on square pixels at the coarser of the two spacings, and that pitch. A line scanner's pixels are
    often not square (the column pitch follows the truck's speed and the pulse rate): taking one spacing for both
    made a truck and its threats up to several times too short or long. The finer axis is area-averaged, which is
    what a larger detector element would have counted, and no axis grows, so memory stays bounded."""
    if math.isclose(row_mm, col_mm, rel_tol=1e-6):
        return counts, row_mm
    pitch = max(row_mm, col_mm)
    h, w = counts.shape[-2:]
    size = (max(1, round(w * col_mm / pitch)), max(1, round(h * row_mm / pitch)))   # cv2: (width, height)
    planes = counts.reshape(-1, h, w)
    out = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in planes])
    return out.reshape(*counts.shape[:-2], size[1], size[0]), pitch


def _dicom_pixel_array(ds: Any, name: str) -> np.ndarray:
    """The decoded pixels. A compressed file pydicom cannot decode (JPEG and JPEG 2000 need pylibjpeg or GDCM;
    RLE it decodes itself) gets a one-line reason naming its transfer syntax, not "corrupt or truncated" and
    pydicom's list of missing plugins."""
    try:
        return np.asarray(ds.pixel_array)
    except (RuntimeError, NotImplementedError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not syntax.is_compressed:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScanError(name, f"cannot decode its {syntax.name} pixel data, corrupt or no decoder installed "
                              f"(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg): {first}") from exc


def _check_dicom_pixels_are_counts(ds: Any, name: str) -> None:
    """ScanError, from the header, for pixels that are no (linear) transmission counts. Colour (RGB, YBR: it
    was refused as "64 energies/channels") and PALETTE COLOR (indices into a colour table, read as counts) are no
    scanner's raw data. PixelIntensityRelationship LOG (common for processed radiographs) stores log(I): read as
    counts, a block passing 1 % of the beam read as light cargo (attenuation 0.7 instead of 4.6) and was released;
    its log scale is not in the file. A Modality LUT Sequence maps stored values in a way not applied here."""
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric not in ("", "MONOCHROME1", "MONOCHROME2"):
        raise ScanError(name, f"{photometric or 'colour'} DICOM ({samples} samples per pixel): a rendering or "
                              "palette indices, not transmission counts (MONOCHROME1/2 expected)")
    relation = str(ds.get("PixelIntensityRelationship", "") or "").strip().upper()
    if relation and relation != "LIN":
        raise ScanError(name, f"PixelIntensityRelationship {relation}: pixel values are not linear in X-ray "
                              "intensity, so they cannot be read as transmission counts (export raw LIN data)")
    if "ModalityLUTSequence" in ds:
        raise ScanError(name, "a Modality LUT Sequence maps the stored values: only RescaleSlope/Intercept are "
                              "applied, so the counts would be wrong")


def _dicom_inverted(ds: Any) -> bool:
    """True when higher stored values mean less X-ray intensity, so they must be flipped into counts (bright = air).
    PixelIntensityRelationshipSign (0028,1041) says so for the physics (-1: higher value, less intensity); without
    it the display tag does: MONOCHROME1 shows the minimum as white, so a file whose display shows air bright
    stores air low. Read as counts, such a file showed air as dense and a dense concealed block as air: released."""
    sign = ds.get("PixelIntensityRelationshipSign")
    if sign in (1, -1):
        return int(sign) == -1
    return str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"


def _dicom_counts(arr: np.ndarray, ds: Any, name: str) -> tuple[np.ndarray, float | None]:
    """Stored DICOM pixels as transmission counts, with their full scale (the I0 guess without air at the top).
    Unused high bits are masked (pydicom < 3 leaves them), the modality rescale applied (counts = slope * stored +
    intercept: signed pixels with intercept 32768, or a slope), inverted polarity flipped within the range, and the
    full scale taken from BitsStored: a 12-bit detector's open beam is near 4095, and a guessed 65535 read every
    pixel 2.8 denser (every truck inspected). Integer counts stay integers, fractional ones become [0, 1]
    transmissions; counts beyond 16 bits are refused."""
    if arr.dtype.kind == "f":   # Float Pixel Data: transmissions in [0, 1], checked by scan_from_counts
        if _dicom_inverted(ds):
            raise ScanError(name, "float pixels with inverted polarity (MONOCHROME1 or PixelIntensityRelationshipSign"
                                  " -1): no range to flip them in")
        return arr, None
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if not 1 <= bits <= arr.dtype.itemsize * 8:
        raise ScanError(name, f"BitsStored {bits} does not fit {arr.dtype.itemsize * 8}-bit pixels")
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if arr.dtype.kind == "i" else (0, (1 << bits) - 1)
    if lo == 0 and int(arr.max()) > hi:
        arr = arr & np.asarray(hi, arr.dtype)
    slope, intercept = _dicom_rescale(ds, name)
    vmin, vmax = lo * slope + intercept, hi * slope + intercept
    if (lo, slope, intercept) == (0, 1.0, 0.0):   # the usual case: unsigned counts, kept as integers
        values = (hi - arr).astype(arr.dtype) if _dicom_inverted(ds) else arr
    else:
        values = arr * slope + intercept
        if _dicom_inverted(ds):
            values = (vmin + vmax) - values
    lowest = float(values.min())
    if lowest < 0 or vmax <= 0:
        raise ScanError(name, f"negative counts (down to {lowest:g}) from {arr.dtype} pixels with RescaleSlope "
                              f"{slope:g} and RescaleIntercept {intercept:g}: not transmission counts")
    if vmax > 65535:
        raise ScanError(name, f"counts up to {vmax:g} (BitsStored {bits}, RescaleSlope {slope:g}, RescaleIntercept "
                              f"{intercept:g}) do not fit 16 bits")
    if values.dtype.kind in "iu" or np.array_equal(values, np.rint(values)):
        return values.astype(np.uint8 if vmax <= 255 else np.uint16), float(vmax)
    return (values / vmax).astype(np.float32), None   # a fractional slope: transmissions


def _dicom_rescale(ds: Any, name: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), 1 and 0 when absent; ScanError for a slope that is not positive."""
    raw_slope, raw_intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if raw_slope in (None, "") else float(raw_slope)
    intercept = 0.0 if raw_intercept in (None, "") else float(raw_intercept)
    if not (math.isfinite(slope) and slope > 0 and math.isfinite(intercept)):
        raise ScanError(name, f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g}: no counts from these")
    return slope, intercept


# ---------------------------------------------------------------- writing

def write_scan(path: str | os.PathLike, scan: Scan | np.ndarray, *, i0: float | tuple[float, ...] | None = None,
               pitch_mm: float | None = None, energies: tuple[str, ...] | None = None) -> Path:
    """Write a scan losslessly: .tif/.tiff (one uint16 page per energy + JSON metadata),
    .png (one channel), .npy (counts) or .npz (counts, i0, pitch_mm)."""
    p = Path(path)
    if isinstance(scan, Scan):
        counts = scan.counts if scan.counts is not None else attenuation_to_counts(scan.attenuation, scan.i0)
        i0 = scan.i0 if i0 is None else i0
        pitch_mm = scan.pitch_mm if pitch_mm is None else pitch_mm
        energies = scan.energies if energies is None else energies
    else:
        counts = np.asarray(scan)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.dtype not in (np.uint8, np.uint16):
        raise ScanError(p, f"write_scan needs uint8/uint16 counts, got {counts.dtype}")
    suffix = p.suffix.lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "detector-scan", "i0": None if i0 is None else list(np.ravel(np.asarray(i0, float))),
            "pitch_mm": pitch_mm, "energies": list(energies) if energies else None}
    if suffix in (".tif", ".tiff"):
        with tifffile.TiffWriter(p) as tw:
            for c in range(counts.shape[0]):
                # uncompressed: noisy 16-bit counts shrink only ~10% with zlib, at 100x the time
                tw.write(counts[c], photometric="minisblack",
                         description=json.dumps({"detector": meta}) if c == 0 else None,
                         metadata=None)
    elif suffix == ".png":
        if counts.shape[0] != 1:
            raise ScanError(p, "PNG holds one energy; write dual-energy scans as .tiff")
        if not cv2.imwrite(str(p), counts[0]):
            raise ScanError(p, "OpenCV could not write the PNG")
    elif suffix == ".npy":
        np.save(p, counts if counts.shape[0] > 1 else counts[0])
    elif suffix == ".npz":
        extra = {k: np.asarray(v) for k, v in (("i0", meta["i0"]), ("pitch_mm", pitch_mm)) if v is not None}
        np.savez_compressed(p, counts=counts, **extra)
    else:
        raise ScanError(p, f"cannot write {suffix!r}; use .tiff, .png, .npy or .npz")
    return p

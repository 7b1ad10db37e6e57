"""One reader per scan file format (PNG, JPEG, TIFF, NPY/NPZ, DICOM/DICOS), used by `detector.scan.read_scan`.

Each reader takes the file's bytes and returns (counts, info): the pixels as stored and what the file says about
I0, pitch and energies. Sizes are checked from the header, and compressed parts counted with bounded decoders,
before anything large is decoded: a small hostile file must not fill memory. `scan_geometry` gives a scan's size
and pitch from those headers alone.
"""
from __future__ import annotations

import functools
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
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import cv2
import numpy as np
import tifffile

from detector.scan import (DEFAULT_PITCH_MM, ScanError, ScanWarning, channels_last, check_shape, default_pitch,
                           file_meta, most_scan_bytes, sniff_format, square_size, valid_pitch, warn_scan)

DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"   # Deflated Explicit VR Little Endian: the whole data set zlib-packed
MAX_TIFF_SEGMENTS = 16384         # strips or tiles per TIFF page: tifffile spends ~0.1 ms on each, and 1-pixel tiles
                                  # made a 2 MB file take 36 s (a scan has at most a few thousand)
HEADER_BYTES = 1 << 16            # scan_geometry reads this much for a PNG or JPEG header (TIFF, NPY/NPZ and DICOM
                                  # headers are read where they lie)
TAG_PITCH_RANGE_MM = (1.0, 20.0)  # TIFF resolution tags are trusted only in a scanner's range: image editors
                                  # write 72-300 dpi (0.08-0.35 mm), which would shrink a truck 15-60x

# tifffile logs what it finds wrong in a file besides raising; ScanError already names it, and without a logging
# setup Python printed each such log line raw (two per truncated TIFF, thousands in a batch of copies in progress)
logging.getLogger("tifffile").addHandler(logging.NullHandler())


def png_header(data: bytes, name: str) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from a PNG's IHDR; ScanError when the header is cut short."""
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
        warn_scan(ScanWarning(name, "colour image converted to one grey channel (luminance); raw 16-bit scans are "
                                    "better input"), stacklevel=3)
        grey = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_BGR2GRAY)
        return over_air(grey, img[..., 3]) if img.shape[2] == 4 else grey
    if img.ndim == 3 and img.shape[2] == 2:
        return np.moveaxis(img, -1, 0)
    raise ScanError(name, f"unsupported image layout {img.shape}")


def over_air(grey: np.ndarray, alpha: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Grey pixels composited by their alpha over air (the dtype's top, bright on a radiograph): a transparent
    background is nothing in the beam, while the black stored under it read as the densest material."""
    top = float(np.iinfo(grey.dtype).max)
    a = alpha.astype(np.float32) / top
    out = grey.astype(np.float32) * (1 if premultiplied else a) + top * (1 - a)
    return np.rint(np.clip(out, 0, top)).astype(grey.dtype)


def png_cut_short(data: bytes) -> bool:
    """Whether a PNG's bytes stop before its IEND end chunk and checksum end: libpng would print a line naming no
    file to stderr, then fail (a scan or mask still being copied)."""
    end = data.rfind(b"IEND")
    return end < 0 or len(data) < end + 8


def read_png(data: bytes, name: str, max_pixels: int | None):
    h, w, depth, color = png_header(data, name)
    check_shape(name, 1, h, w, max_pixels)
    if depth not in (1, 2, 4, 8, 16):
        raise ScanError(name, f"invalid PNG bit depth {depth}")
    if png_cut_short(data):
        raise ScanError(name, "corrupt or truncated PNG (it stops before its IEND end chunk ends: cut short, or still "
                              "being copied)")
    img = _decode_image(data, name, "PNG")
    if img.shape[:2] != (h, w):
        raise ScanError(name, "corrupt PNG (decoded size differs from header)")
    return _to_one_channel(orient_jpeg(img, png_orientation(data)), name), {}


def png_orientation(data: bytes) -> int:
    """The EXIF Orientation (1-8) of a PNG's eXIf chunk (before its pixels, as the PNG spec places it), 1 where there
    is none or it cannot be read: viewers and OpenCV's colour or grey read turn the picture as it says."""
    return next((_exif_orientation(body) for kind, body in _png_head_chunks(data) if kind == b"eXIf"), 1)


def _png_head_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG before its pixels (IDAT) or its end, as far as `data` (a header) holds."""
    i = 8
    while i + 8 <= len(data) and data[i + 4:i + 8] not in (b"IDAT", b"IEND"):
        size = struct.unpack(">I", data[i:i + 4])[0]
        yield data[i + 4:i + 8], data[i + 8:i + 8 + size]
        i += 12 + size


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


def jpeg_orientation(data: bytes) -> int:
    """The EXIF Orientation (1-8) of a JPEG's APP1 segment, 1 where there is none or it cannot be read: how a
    viewer turns the stored pixels to show them (OpenCV's IMREAD_UNCHANGED does not)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] not in (0xDA, 0xD9):   # segments before the scan
        seg = struct.unpack(">H", data[i + 2:i + 4])[0]
        body = data[i + 4:i + 2 + seg]
        if data[i + 1] == 0xE1 and body[:6] == b"Exif\x00\x00":
            return _exif_orientation(body[6:])
        i += 2 + seg
    return 1


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of an EXIF block's first IFD, 1 where it is missing or out of range."""
    fmt = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    try:
        first = struct.unpack(fmt + "I", tiff[4:8])[0]
        count = struct.unpack(fmt + "H", tiff[first:first + 2])[0]
        for k in range(count):
            at = first + 2 + 12 * k
            tag, kind = struct.unpack(fmt + "HH", tiff[at:at + 4])
            if tag == 0x0112 and kind == 3:
                value = struct.unpack(fmt + "H", tiff[at + 8:at + 10])[0]
                return value if 1 <= value <= 8 else 1
    except (TypeError, struct.error):   # no byte order mark, or an offset past the block
        pass
    return 1


def orient_jpeg(img: np.ndarray, orientation: int) -> np.ndarray:
    """Stored JPEG, PNG or TIFF pixels (H, W[, C]) turned as EXIF `orientation` tells a viewer to show them."""
    if orientation >= 5:   # 5-8 swap the sides: transpose, then as 1-4 (5: none, 6: mirror, 7: 180, 8: flip)
        img, orientation = img.swapaxes(0, 1), {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    flips = {1: (), 2: (1,), 3: (0, 1), 4: (0,)}[orientation]
    return np.ascontiguousarray(np.flip(img, flips) if flips else img)


def read_jpeg(data: bytes, name: str, max_pixels: int | None):
    h, w = _jpeg_size(data, name)
    check_shape(name, 1, h, w, max_pixels)
    img = _decode_image(data, name, "JPEG")
    if img.shape[:2] != (h, w):
        raise ScanError(name, "corrupt JPEG (decoded size differs from header)")
    return _to_one_channel(orient_jpeg(img, jpeg_orientation(data)), name), {}


def tiff_orientation(page: Any) -> int:
    """A TIFF page's Orientation tag (274: 1-8, the EXIF tag's values), 1 where it is missing or out of range."""
    tag = page.tags.get(274)
    try:
        value = int(tag.value) if tag is not None else 1
    except (TypeError, ValueError):   # a count of several values
        return 1
    return value if 1 <= value <= 8 else 1


def unturned_size(h: int, w: int, orientation: int) -> tuple[int, int]:
    """(height, width) of a picture of h x w stored pixels as shown (orientation 5-8 swap the sides)."""
    return (w, h) if orientation >= 5 else (h, w)


def _orient_counts(counts: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) TIFF counts turned as `orientation` says, each channel alike."""
    if orientation == 1:   # a scanner's TIFF: its pixels as they are
        return counts
    if counts.ndim == 2 or channels_last(counts.shape):
        return orient_jpeg(counts, orientation)
    return np.stack([orient_jpeg(c, orientation) for c in counts])


def read_tiff(data: bytes, name: str, max_pixels: int | None):
    buf = io.BytesIO(data)
    try:
        return _read_tiff_buffer(buf, data, name, max_pixels)
    finally:
        buf.close()  # tifffile leaves a reference cycle: free the buffer's copy of the file now


def _read_tiff_buffer(buf: io.BytesIO, data: bytes, name: str, max_pixels: int | None):
    with tifffile.TiffFile(buf) as tif:
        pages = list(itertools.islice(tif.pages, 3))   # len(tif.pages) walked every page: 16 s for 500,000
        planar, _, _ = _tiff_layout(pages, name, max_pixels)
        first = pages[0]
        for page in pages:
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
    if _tiff_colour(first, name):
        counts = _tiff_colour_to_grey(arrays[0], first, name)
    elif _tiff_grey_alpha(first, arrays[0]):
        img = np.moveaxis(arrays[0], 0, -1) if str(first.axes).startswith("S") else arrays[0]
        counts = over_air(img[..., 0], img[..., 1], premultiplied=first.extrasamples[0] == 1)
    elif len(arrays) == 2:
        counts = np.stack(arrays)
    else:
        img = arrays[0]
        if planar or (img.ndim == 3 and img.shape[2] == 2):   # (C, H, W), or (H, W, 2) that scan_from_counts turns
            counts = img
        elif img.ndim == 2:
            counts = img
        else:
            raise ScanError(name, f"unsupported TIFF layout {img.shape} {img.dtype}")
    if first.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        counts = _flip_miniswhite(counts, first, name)
    orientation = tiff_orientation(first)   # as a viewer (and OpenCV's libtiff) shows the page; 1 for a scanner's
    counts = _orient_counts(counts, orientation)
    if "spacing_mm" in info and orientation >= 5:   # the resolution tags are the stored rows' and columns'
        info["spacing_mm"] = info["spacing_mm"][::-1]
    if "spacing_mm" in info:   # X and Y resolution differ: square the pixels as for DICOM
        if channels_last(counts.shape):
            counts = np.moveaxis(counts, -1, 0)
        counts, squared = _squared(counts, *info.pop("spacing_mm"))
        info.update(squared)
    return counts, info


def _tiff_colour(page: Any, name: str) -> bool:
    """True for an RGB or palette page (a rendering: its samples are colours, not energies); ScanError for
    photometrics that are neither grey nor these (CMYK, YCbCr, CIELab, camera raw)."""
    kind = page.photometric
    if kind in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.PALETTE):
        return True
    if kind not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE):
        raise ScanError(name, f"{getattr(kind, 'name', kind)} TIFF: not grey transmission counts (MINISBLACK expected)")
    return False


def _tiff_grey_alpha(page: Any, img: np.ndarray) -> bool:
    """True for a grey page with an alpha sample (ExtraSamples 1 or 2): one channel and its transparency, not the
    two energies of a (H, W, 2) scan (whose second sample is unspecified, 0)."""
    extra = tuple(getattr(page, "extrasamples", ()) or ())
    return extra in ((1,), (2,)) and img.ndim == 3 and 2 in (img.shape[0], img.shape[-1]) and img.dtype.kind == "u"


def _tiff_colour_to_grey(img: np.ndarray, page: Any, name: str) -> np.ndarray:
    """An 8- or 16-bit RGB(A) or palette TIFF page as one grey channel (luminance, with the colour warning PNG and
    JPEG give): a baggage X-ray or a rendering exported as TIFF, before this refused as "3 energies"."""
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        if page.colormap is None or img.ndim != 2 or img.dtype.kind != "u":
            raise ScanError(name, "palette TIFF without a usable colour map")
        img = np.moveaxis(np.asarray(page.colormap, np.uint16)[:, img], 0, -1)   # (H, W, 3) RGB, 16-bit
    elif img.ndim == 3 and img.shape[0] in (3, 4) and str(page.axes).startswith("S"):
        img = np.moveaxis(img, 0, -1)   # planar (separate) RGB
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype not in (np.uint8, np.uint16):
        raise ScanError(name, f"unsupported colour TIFF layout {img.shape} {img.dtype} (8- or 16-bit RGB expected)")
    return _to_one_channel(np.ascontiguousarray(img[..., [2, 1, 0, 3][:img.shape[2]]]), name)  # RGB -> BGR(A)


def _flip_miniswhite(counts: np.ndarray, page: Any, name: str) -> np.ndarray:
    """MINISWHITE pixels as counts: the file shows 0 as white, so it stores air (bright on a radiograph) low;
    read as they are, air was dense and a dense block air. Flipped within the sample's bit range."""
    if counts.dtype.kind != "u":
        raise ScanError(name, f"{counts.dtype} pixels with MINISWHITE polarity: no integer range to flip them in")
    top = (1 << int(page.bitspersample)) - 1
    return (np.asarray(top, counts.dtype) - np.minimum(counts, np.asarray(top, counts.dtype))).astype(counts.dtype)


def _tiff_layout(pages: list[Any], name: str, max_pixels: int | None) -> tuple[bool, int, int]:
    """(planar, height, width) of a TIFF's first pages (at most 3 read) from their tags, checked: 1 or 2 pages of
    one size, 1 or 2 energies, a sane size."""
    if len(pages) == 0:
        raise ScanError(name, "TIFF has no pages")
    first = pages[0]
    shape = tuple(first.shape)
    n_pages = len(pages)
    if n_pages > 2:
        raise ScanError(name, "3 or more pages; at most 2 energies (high, low) are supported")
    planar = len(shape) == 3 and str(first.axes).startswith("S")   # one page, energies as separate planes
    h, w = (shape[1], shape[2]) if planar else (shape[0], shape[1] if len(shape) > 1 else 0)
    if _tiff_colour(first, name):   # RGB(A) or palette: one grey channel once read
        if n_pages > 1:
            raise ScanError(name, "colour TIFF of 2 pages; a colour rendering is one page")
        c = 1
    else:
        c = n_pages * (shape[0] if planar else shape[2] if len(shape) == 3 else 1)
    check_shape(name, c, h, w, max_pixels)
    for page in pages:
        if tuple(page.shape) != shape:
            raise ScanError(name, f"TIFF pages differ in size ({page.shape} vs {shape})")
    return planar, h, w


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


@functools.lru_cache(maxsize=1)
def opencv_turns_tiff() -> bool:
    """Whether this OpenCV turns a TIFF page by its Orientation tag when it decodes it (5.x does, even unchanged; older
    releases may not), probed once on a tiny page: _tiff_pages_opencv turns back only what it turned."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((3, 4), np.uint16), extratags=[(274, "H", 1, 6, True)])
    ok, pages = cv2.imdecodemulti(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    return bool(ok) and pages[0].shape == (4, 3)


def _tiff_pages_opencv(data: bytes, name: str, tiff_pages: list[Any]) -> list[np.ndarray]:
    """The pages of a TIFF whose compression tifffile cannot decode without imagecodecs, through OpenCV
    (colour pages in tifffile's RGB order), each the shape and type its header says: OpenCV read a dual-energy
    (H, W, 2) uint16 page as one 8-bit channel."""
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if not ok or len(pages) != len(tiff_pages):
        raise ScanError(name, "compressed TIFF that neither tifffile (without imagecodecs) nor OpenCV can decode")
    if opencv_turns_tiff():   # its libtiff turned each page as its Orientation tag says: back to the stored pixels
        pages = [orient_jpeg(p, {6: 8, 8: 6}.get(o, o)) for p, o in zip(pages, map(tiff_orientation, tiff_pages))]
    for got, page in zip(pages, tiff_pages):
        if got.shape != tuple(page.shape) or got.dtype != page.dtype:
            raise ScanError(name, f"compressed TIFF page of {tuple(page.shape)} {page.dtype} that tifffile cannot "
                                  f"decode without imagecodecs, and OpenCV decodes it as {got.shape} {got.dtype}")
    rgb = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}
    return [cv2.cvtColor(p, rgb[p.shape[2]]) if p.ndim == 3 and p.shape[2] in rgb else p for p in pages]


def _tiff_info(page: Any, name: str, warn: bool = True) -> dict:
    """I0, pitch and energy names from our JSON description, else the resolution tags (warn: say when a tag is
    ignored)."""
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
        col_mm = _tiff_tag_pitch(page, "XResolution", name, warn)
        if col_mm is not None:
            info["pitch_mm"] = col_mm
            row_mm = _tiff_tag_pitch(page, "YResolution", name, warn=False)
            if row_mm is not None and not math.isclose(row_mm, col_mm, rel_tol=1e-6):
                info["spacing_mm"] = (row_mm, col_mm)   # a line scanner's pixels: squared by the reader
    return info


def _tiff_tag_pitch(page: Any, tag_name: str, name: str, warn: bool) -> float | None:
    """The pixel spacing in mm that a TIFF resolution tag gives, if it is in a scanner's range (warn: say when it
    is not, and is ignored)."""
    tag, unit = page.tags.get(tag_name), page.tags.get("ResolutionUnit")
    if tag is None or unit is None or int(unit.value) not in (2, 3):
        return None
    num, den = tag.value
    if not (num and den):
        return None
    per_unit = num / den
    pitch = (25.4 if int(unit.value) == 2 else 10.0) / per_unit
    lo, hi = TAG_PITCH_RANGE_MM
    if lo <= pitch <= hi:
        return pitch
    if warn:
        warn_scan(ScanWarning(name, f"TIFF resolution tag ({per_unit:g} per "
                                    f"{'inch' if int(unit.value) == 2 else 'cm'}) is no scanner pitch "
                                    f"({lo:g}-{hi:g} mm): ignored, read as a file without a pitch "
                                    f"({DEFAULT_PITCH_MM:g} mm, or the default pitch given)"), stacklevel=3)
    return None


def read_npy(data: bytes, name: str, max_pixels: int | None):
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


def _check_npy_header(f: Any, name: str, max_pixels: int | None, file_bytes: int) -> tuple[int, ...]:
    """Size and dtype checks from the .npy header alone, before any pixel is read; returns the array's shape. NumPy
    allocates the whole array before reading it: a 128-byte header of 16x16 pixels of 10 MB each (or of complex128
    at the pixel limit) took GBs, so only pixel types a scan can have pass, and only when the file (`file_bytes`)
    holds all their bytes."""
    shape, dtype = _read_npy_header(f, name)
    if not ((dtype.kind == "u" and dtype.itemsize <= 2) or (dtype.kind == "f" and dtype.itemsize <= 8)):
        raise ScanError(name, f"unsupported pixel type {dtype}; expected uint8 or uint16 counts (or float "
                              "transmission in [0, 1])")
    if len(shape) == 2:
        check_shape(name, 1, shape[0], shape[1], max_pixels)
    elif channels_last(shape):
        check_shape(name, shape[2], shape[0], shape[1], max_pixels)
    elif len(shape) == 3:
        check_shape(name, shape[0], shape[1], shape[2], max_pixels)
    else:
        raise ScanError(name, f"expected a 2-D image or (C, H, W) stack, got shape {shape}")
    need = f.tell() + math.prod(shape) * dtype.itemsize
    if need > file_bytes:
        raise ScanError(name, f"truncated NumPy array: its header promises {need} bytes, the file holds {file_bytes}")
    return shape


def read_npz(data: bytes, name: str, max_pixels: int | None):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "counts" not in z:
            raise ScanError(name, "NPZ scan needs a 'counts' array (optional 'i0', 'pitch_mm', 'energies')")
        with z.zip.open("counts.npy") as f:
            _check_npy_header(f, name, max_pixels, z.zip.getinfo("counts.npy").file_size)
        counts = z["counts"]
        info: dict = {}
        if "i0" in z:
            info["i0"] = tuple(float(v) for v in np.ravel(_npz_numbers(z, "i0", 2, name)))
        if "pitch_mm" in z:
            info["pitch_mm"] = _npz_numbers(z, "pitch_mm", 1, name)
        if "energies" in z:
            info["energies"] = tuple(str(v) for v in np.ravel(_npz_numbers(z, "energies", 2, name, text=True)))
    return counts, info


def _npz_numbers(z: Any, key: str, most: int, name: str, text: bool = False) -> np.ndarray:
    """NPZ member `key`: at most `most` real numbers (or, with `text`, short names), checked from its header before
    it is unpacked. Loaded blind, an 'i0' of zeros deflated 1000:1, so a 60 KB file took 120 MB (a 64 MB upload, 64 GB)."""
    member = f"{key}.npy"
    if member not in z.zip.namelist():
        raise ScanError(name, f"NPZ member {key!r} is no .npy array")
    with z.zip.open(member) as f:
        shape, dtype = _read_npy_header(f, name)
        fits = (dtype.kind == "U" and dtype.itemsize <= 256 and len(shape) <= 1) if text else dtype.kind in "uif"
        if not fits or math.prod(shape) > most:
            raise ScanError(name, f"NPZ {key!r} must hold at most {most} {'name(s) as text' if text else 'number(s)'}, "
                                  f"got {dtype} {shape}")
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)


def read_dicom(data: bytes, name: str, max_pixels: int | None):
    try:
        import pydicom
    except ImportError as exc:
        raise ScanError(name, "DICOM/DICOS needs pydicom: pip install 'detector[dicom]'") from exc
    _check_inflated_size(data, name, most_scan_bytes(max_pixels))
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False, force=True, defer_size=None)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanError(name, "no DICOM image in it (no pixel data): not a DICOM file, or its header is truncated")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 2:   # "40 energies/channels" said nothing of what a DICOS CT volume or a series of views is
        raise ScanError(name, f"{frames} frames (a CT volume or a series of views?); a scan has one frame per "
                              "energy, at most 2 (high, low)")
    check_shape(name, frames, rows, cols, max_pixels)
    _check_dicom_pixels_are_counts(ds, name)
    arr, full_scale = _dicom_counts(_dicom_pixel_array(ds, name), ds, name)
    info: dict = {"full_scale": full_scale}
    spacing = _dicom_spacing(ds, name)
    if spacing is not None:
        arr, squared = _squared(arr, *spacing)
        info.update(squared)
    return arr, info


def _check_inflated_size(data: bytes, name: str, most: int) -> None:
    """ScanError for a Deflated Explicit VR DICOM whose data set inflates past `most` bytes, counted with a bounded
    decoder: pydicom inflates it whole (a 116 KB file took 215 MB; a 64 MB upload, 64 GB)."""
    f = io.BytesIO(data)
    if not _dicom_deflated(f):
        return
    inflate, rest, size = zlib.decompressobj(-zlib.MAX_WBITS), data[f.tell():], 0
    while rest and size <= most:   # 1 MiB at a time, each dropped once counted
        size += len(inflate.decompress(rest, 1 << 20))
        rest = inflate.unconsumed_tail
    if size > most:
        raise ScanError(name, f"deflated DICOM data set inflates past {most / 1e6:.0f} MB, more than a scan within "
                              "the pixel limit holds (a decompression bomb)")


def _dicom_deflated(f: Any) -> bool:
    """Whether a DICOM file's meta header (read from `f`, left just after it) names the Deflated transfer syntax."""
    from pydicom.filereader import read_dataset, read_preamble
    read_preamble(f, True)
    meta = read_dataset(f, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, *_: tag >> 16 != 2)
    return str(meta.get("TransferSyntaxUID", "")) == DEFLATED_DICOM


def _dicom_spacing(ds: Any, name: str) -> tuple[float, float] | None:
    """[row, column] pixel spacing in mm from ImagerPixelSpacing, else PixelSpacing, each checked; None when
    absent. The row spacing alone used to be taken, and a 0 mm column spacing went unseen."""
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if not spacing:
        return None
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    return valid_pitch(name, values[0]), valid_pitch(name, values[-1])


def _squared(counts: np.ndarray, row_mm: float, col_mm: float) -> tuple[np.ndarray, dict]:
    """_square_pixels, and what the reader passes on: the pitch and, where the pixels were not square, the file's own
    geometry as Scan.meta (file_meta), to which a verdict's regions are mapped back and a manifest's boxes and masks
    are taken from."""
    h, w = counts.shape[-2:]
    out, pitch = _square_pixels(counts, row_mm, col_mm)
    if math.isclose(row_mm, col_mm, rel_tol=1e-6):
        return out, {"pitch_mm": pitch}
    return out, {"pitch_mm": pitch, "meta": file_meta(h, w, row_mm, col_mm)}


def _square_pixels(counts: np.ndarray, row_mm: float, col_mm: float) -> tuple[np.ndarray, float]:
    """Counts on square pixels at the coarser of the two spacings, and that pitch. A line scanner's pixels are
    often not square (the column pitch follows the truck's speed and the pulse rate): taking one spacing for both
    made a truck and its threats up to several times too short or long. The finer axis is area-averaged, which is
    what a larger detector element would have counted, and no axis grows, so memory stays bounded."""
    if math.isclose(row_mm, col_mm, rel_tol=1e-6):
        return counts, row_mm
    h, w = counts.shape[-2:]
    sh, sw, pitch = square_size(h, w, row_mm, col_mm)
    planes = counts.reshape(-1, h, w)
    out = np.stack([cv2.resize(c, (sw, sh), interpolation=cv2.INTER_AREA) for c in planes])
    return out.reshape(*counts.shape[:-2], sh, sw), pitch


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


# ---------------------------------------------------------------- size from the header


class Geometry(NamedTuple):
    """A scan's size and pitch as read_scan gives them, and the size of the file's own pixels (the same unless the
    reader squared them: file_meta)."""

    height: int
    width: int
    pitch_mm: float
    file_height: int
    file_width: int


def scan_geometry(path: str | os.PathLike, default_pitch_mm: float | None = None) -> tuple[int, int, float] | None:
    """(height, width, pitch in mm) of the Scan that `read_scan(path, default_pitch_mm=...)` returns, from the file's
    header alone: TIFF tags, the .npy header (in an .npz too, with its pitch_mm), the PNG or JPEG frame header, the
    DICOM data set up to its pixels; no pixel is decoded. The pitch is resolved as the reader resolves it (the file's,
    else `default_pitch_mm`, else DEFAULT_PITCH_MM), non-square pixels as they are squared. None where the header
    cannot tell (a JPEG frame header past the first 64 KB, a deflated DICOM, no pydicom) or where the reader would
    refuse what the header says: read_scan then decides, and says why. Warnings are silenced: call it from one
    thread. A default_pitch_mm that is no pitch is a ScanError, as in read_scan."""
    got = file_geometry(path, default_pitch_mm)
    return None if got is None else (got.height, got.width, got.pitch_mm)


def file_geometry(path: str | os.PathLike, default_pitch_mm: float | None = None) -> Geometry | None:
    """scan_geometry, with the size of the file's own pixels (where a manifest's boxes and masks are drawn)."""
    name = str(path)
    default = default_pitch(default_pitch_mm, name)   # outside the try: a wrong default is no header's failure
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = os.path.getsize(path)
            if size == 0 or size > most_scan_bytes(None):
                return None
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
                kind = sniff_format(head[:132], Path(name).suffix.lower())
                f.seek(0)
                got = _header_geometry(kind, f, head, name, size)
            if got is None:
                return None
            h, w, pitch, fh, fw = got
            return Geometry(int(h), int(w), valid_pitch(name, default if pitch is None else pitch),
                            int(fh), int(fw))
    except Exception:   # whatever the header does not say plainly, the full read decides (and names the reason)
        return None


def _header_geometry(kind: str, f: Any, head: bytes, name: str, size: int) -> tuple[int, int, Any, int, int] | None:
    """(height, width, pitch or None for the default, the file's height and width) of an open scan file of the
    sniffed `kind`, from its header."""
    if kind == "png":
        h, w, depth, _ = png_header(head, name)
        check_shape(name, 1, h, w, None)
        h, w = unturned_size(h, w, png_orientation(head))   # shown turned by a quarter (read_png turns it)
        return (h, w, None, h, w) if depth in (1, 2, 4, 8, 16) else None
    if kind == "jpeg":
        h, w = _jpeg_size(head, name)
        check_shape(name, 1, h, w, None)
        h, w = unturned_size(h, w, jpeg_orientation(head))   # shown turned by a quarter (read_jpeg turns it)
        return h, w, None, h, w
    if kind == "tiff":
        with tifffile.TiffFile(f) as tif:
            pages = list(itertools.islice(tif.pages, 3))
            _, h, w = _tiff_layout(pages, name, None)
            info = _tiff_info(pages[0], name, warn=False)
            turned = tiff_orientation(pages[0]) >= 5
        h, w = (w, h) if turned else (h, w)
        if "spacing_mm" in info:
            return _squared_geometry(h, w, info["spacing_mm"][::-1] if turned else info["spacing_mm"])
        return h, w, info.get("pitch_mm"), h, w
    if kind == "npy":
        h, w = _image_sides(_check_npy_header(f, name, None, size))
        return h, w, None, h, w
    if kind == "npz":
        with np.load(f, allow_pickle=False) as z:
            if "counts" not in z:
                return None
            with z.zip.open("counts.npy") as m:
                shape = _check_npy_header(m, name, None, z.zip.getinfo("counts.npy").file_size)
            h, w = _image_sides(shape)
            return h, w, _npz_numbers(z, "pitch_mm", 1, name) if "pitch_mm" in z else None, h, w
    if kind == "dicom":
        import pydicom
        if _dicom_deflated(f):   # pydicom inflates the whole data set to read its header
            return None
        f.seek(0)
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 2:
            return None
        check_shape(name, frames, rows, cols, None)
        _check_dicom_pixels_are_counts(ds, name)
        spacing = _dicom_spacing(ds, name)
        return (rows, cols, None, rows, cols) if spacing is None else _squared_geometry(rows, cols, spacing)
    return None


def file_view(path: str | os.PathLike) -> tuple[int, bool]:
    """(EXIF orientation 1-8, has alpha) of a JPEG, PNG or TIFF file from its header: what the reader turns it by,
    and whether it composites transparent pixels over air; (1, False) for other files and where the header cannot be
    read (the read that follows names the reason)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            kind = sniff_format(head[:132], Path(path).suffix.lower())
            if kind == "tiff":
                f.seek(0)
                with tifffile.TiffFile(f) as tif:
                    page = tif.pages.first
                    extra = tuple(getattr(page, "extrasamples", ()) or ())   # 1, 2: alpha; 0 (a 2nd energy): not
                    return tiff_orientation(page), any(int(v) in (1, 2) for v in extra)
            if kind == "png":
                return png_orientation(head), png_has_alpha(head)
    except Exception:   # any header a decoder cannot parse: the read that follows decides
        return 1, False
    return (jpeg_orientation(head) if kind == "jpeg" else 1), False


def png_has_alpha(data: bytes) -> bool:
    """Whether OpenCV reads a PNG with an alpha channel (which read_png composites over air): grey+alpha or RGBA
    (colour type 4, 6), or an RGB or palette PNG (2, 3) with a tRNS chunk before its pixels (a grey one's is ignored)."""
    color = data[25] if len(data) >= 26 else 0
    return color in (4, 6) or (color in (2, 3) and any(kind == b"tRNS" for kind, _ in _png_head_chunks(data)))


def _squared_geometry(h: int, w: int, spacing: tuple[float, float]) -> tuple[int, int, float, int, int]:
    """_header_geometry's answer for a file of h x w pixels of [row, column] `spacing`: squared, and the file's size."""
    return (*square_size(h, w, *spacing), h, w)


def _image_sides(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of a checked 2-D, (C, H, W) or (H, W, C) pixel array shape, as scan_from_counts lays it out."""
    if len(shape) == 2:
        return shape[0], shape[1]
    return (shape[0], shape[1]) if channels_last(shape) else (shape[1], shape[2])

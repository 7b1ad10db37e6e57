"""Read, validate and write X-ray scans as attenuation images (the core's one way in).

Every format becomes a `Scan`: float32 attenuation (C, H, W) = -ln(clip(I / I0, 1e-6, 1)),
C = 1 (single energy) or 2 (high, low). Bad input of any kind raises `ScanError` naming the file
and the reason; image sizes are checked from the header before any pixels are decoded.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import tifffile

SCAN_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".npz", ".dcm", ".dcs", ".jpg", ".jpeg")
DEFAULT_PITCH_MM = 5.0
DEFAULT_MAX_PIXELS = int(os.environ.get("DETECTOR_MAX_PIXELS", 40_000_000))  # per channel
MIN_SIDE = 16
MIN_TRANSMISSION = 1e-6
AIR_ROWS = 8  # top rows used to estimate the open-beam I0
HIGH_NAMES, LOW_NAMES = ("high", "he", "h"), ("low", "le", "l")   # energy names a file may give (low_first)
PITCH_RANGE_MM = (0.01, 100.0)    # a pixel pitch outside this is a metadata error (samples are 40-45 mm thumbnails)
BLANK_ATTENUATION = 0.05          # below this (transmission > 95 %) a pixel reads as open beam
BLANK_SHARE = 0.001               # a scan with fewer pixels above it than this share shows no object
SCAN_WARNINGS_KEPT = 1000         # ScanWarning texts remembered as shown (the "default" action's once per text)
# Energy order. Every material attenuates the high energy less than the low one, at a cargo linac's MeV (Compton, plus
# pair production for high Z) as at a baggage scanner's keV (photoabsorption): R = A_high / A_low < 1 (organic ~0.68,
# steel ~0.78, lead ~0.91 at 4/2 MeV; whole generator scans 0.70-0.78). A median R at or above 0.99 is no transmission
# scan of real matter: the energies swapped (1.28-1.44), the same energy twice (1.000) or an inverted image (1.01-1.14).
ENERGY_RATIO_MAX = 0.99
RATIO_BAND = (0.2, 8.0)   # attenuations where both energies give a ratio: above the noise, below the counts' floor
RATIO_SAMPLES = 500       # fewer such pixels on the 4x grid (a nearly empty lane): the order is not judged
# A scanner's counts have a floor (scatter, dark current, a 12-bit detector's last counts: 0.2 % of I0 reads A ~6.2)
# where both energies read alike: steel coils or lead filling the bay put most pixels there and a valid scan read
# 1.00, "the same energy twice". Pixels under 4x the floor's counts (A within ln 4 of the channel's 99.5th percentile
# attenuation, the floor when it holds that many pixels) are left out of the ratio.
RATIO_FLOOR_PERCENTILE = 99.5
RATIO_FLOOR_MARGIN = math.log(4.0)
# Polarity. Photon noise grows with the counts (sigma ~ sqrt(I)), so in linear counts, air bright, the brightest tenth
# of a scan is noisier than its darkest tenth: 15-108 on 300 generator scans, 9-39 in 12 bits, 2 in 8-bit data in a
# 16-bit file, 0.88 or more after a vendor's heaviest smoothing (Gaussian sigma 3, bilateral, median twice). Inverted
# (dense reads bright: 0.009-0.065; smoothed 0.02-0.47, but blurred at sigma 3 up to 1.1, passed) or log-scaled (a
# display image: 0.07-0.30) counts turn it round; the model scored inverted scans at chance (AUROC 0.52).
NOISE_RATIO_MIN = 0.5
PLATEAU_SHARE = 0.01      # a value this common is clipped or painted (saturated air, a padded border): no noise in it
# A window of fewer rows, or with fewer pixel triples off the plateaus, is not judged: in a few rows the texture can
# outweigh the noise (test images of 40-64 rows of i.i.d. texture, resampled, read 0.2).
NOISE_MIN_ROWS = 128
NOISE_TRIPLES = 10000
UPRIGHT_MIN_HEIGHT_MM = 2000.0   # a scan judged upright or not spans a vehicle: this tall, and at least as long


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


_FIGURES = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")   # the numbers in a warning's reason (summarised_scan_warnings)
_SHOWN: dict = {}   # warn_scan's registry: what __warningregistry__ is to warnings.warn, bounded


def warn_scan(warning: ScanWarning, stacklevel: int = 1) -> None:
    """warnings.warn(warning, stacklevel=stacklevel), remembering at most the last SCAN_WARNINGS_KEPT texts shown:
    warnings.warn keeps each text the "default" action showed in the caller's __warningregistry__ for good, and each
    ScanWarning names its file, so a station embedding the Inspector grew by one entry per warned truck (20,000 RGB
    scans: 20,000 entries, 8.9 MB). A text is still shown once while it is remembered; the application's filters,
    -W and catch_warnings apply as to warnings.warn."""
    try:
        frame = sys._getframe(stacklevel)
    except ValueError:   # called from fewer frames than stacklevel: warnings.warn's own fallback
        globs, filename, lineno = sys.__dict__, "sys", 1
    else:
        globs, filename, lineno = frame.f_globals, frame.f_code.co_filename, frame.f_lineno
    warnings.warn_explicit(warning, type(warning), filename, lineno, module=globs.get("__name__", "sys"),
                           registry=_SHOWN, module_globals=globs)
    excess = len(_SHOWN) - SCAN_WARNINGS_KEPT - 1   # less its "version" key
    if excess > 0:
        for key in [k for k in list(_SHOWN) if k != "version"][:excess]:   # list(): a copy, whatever other threads do
            _SHOWN.pop(key, None)


@contextlib.contextmanager
def summarised_scan_warnings(report: Callable[[str], None]) -> Iterator[None]:
    """Collect the ScanWarnings raised inside (from any thread) and report one line per reason, with its count and
    a file, when the block ends: batch jobs printed one two-line warning per scan (20,000 lines for 10,000 RGB
    renderings). Reasons that differ in their figures alone are one (`_FIGURES`: a 12-bit archive's brightest pixel
    differs per scan, and gave a line per value); the line shows the first one's. Each reason keeps a count and its
    first file, not its warnings (recording them all held ~700 bytes a scan for the whole run). Other warnings are
    passed on as they would have been."""
    groups: dict[str, list] = {}   # reason, figures masked -> [count, first reason, first file, figures differ]
    others: list[tuple] = []
    lock = threading.Lock()

    def collect(message, category, filename, lineno, file=None, line=None) -> None:
        with lock:
            if not issubclass(category, ScanWarning):
                others.append((message, category, filename, lineno))
                return
            reason = getattr(message, "reason", str(message))
            group = groups.setdefault(_FIGURES.sub("#", reason), [0, reason, getattr(message, "path", "?"), False])
            group[0] += 1
            group[3] = group[3] or reason != group[1]

    with warnings.catch_warnings():
        warnings.simplefilter("always", ScanWarning)
        warnings.showwarning = collect   # restored by catch_warnings
        yield
    for message, category, filename, lineno in others:
        warnings.warn_explicit(message, category, filename, lineno)
    for count, reason, path, differ in groups.values():
        figures = "; the figures are this one's, they differ among these scans" if differ else ""
        report(f"{count} scan(s): {reason} (e.g. {path}{figures})")


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
    pitch_default: bool = False   # the file carried no pitch: pitch_mm is the default it was read at

    @property
    def channels(self) -> int:
        return int(self.attenuation.shape[0])

    @property
    def height(self) -> int:
        return int(self.attenuation.shape[1])

    @property
    def width(self) -> int:
        return int(self.attenuation.shape[2])


# ---------------------------------------------------------------- the file's own pixels

def file_meta(height: int, width: int, row_mm: float, col_mm: float) -> dict:
    """Scan.meta of a scan whose reader squared the file's pixels: the file's own size and [row, column] spacing, so
    the coordinates users give and get ("scan pixels": a manifest's boxes and masks, a verdict's regions) stay the
    file's, the grid a station or an officer's tool draws on."""
    return {"file_height": int(height), "file_width": int(width), "file_spacing_mm": [float(row_mm), float(col_mm)]}


def square_size(h: int, w: int, row_mm: float, col_mm: float) -> tuple[int, int, float]:
    """(height, width, pitch) of an image of h x w pixels of row_mm x col_mm once on square pixels at the coarser
    spacing (the readers' formats._square_pixels)."""
    if math.isclose(row_mm, col_mm, rel_tol=1e-6):
        return h, w, row_mm
    pitch = max(row_mm, col_mm)
    return max(1, round(h * row_mm / pitch)), max(1, round(w * col_mm / pitch)), pitch


def file_shape(scan: Scan) -> tuple[int, int]:
    """(height, width) of the file the scan was read from: file_meta's where its reader squared the pixels, else the
    attenuation's (nothing was resampled). Only while that file, squared, still gives the attenuation's size: a
    station that crops or resamples a read Scan keeps its meta, and its regions then belong to the array it passed."""
    meta = scan.meta if isinstance(scan.meta, dict) else {}
    h, w, spacing = meta.get("file_height"), meta.get("file_width"), meta.get("file_spacing_mm")
    try:
        squared = square_size(h, w, *spacing)[:2]
    except (TypeError, ValueError, ZeroDivisionError):   # no file geometry, or not one a reader wrote
        return scan.height, scan.width
    return (h, w) if squared == (scan.height, scan.width) else (scan.height, scan.width)


def map_box(box: Any, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> list:
    """A box [x0, y0, x1, y1] on an image of src_hw = (height, width) pixels, on the same image at dst_hw: each axis
    scaled on its own, outward to whole pixels (a box never loses the pixels it touched) and clipped to dst_hw. The
    box as it is where the two grids are one (square pixels: nothing changes)."""
    if tuple(src_hw) == tuple(dst_hw):
        return list(box)
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return [_edge(box[0], sx, dst_hw[1], False), _edge(box[1], sy, dst_hw[0], False),
            _edge(box[2], sx, dst_hw[1], True), _edge(box[3], sy, dst_hw[0], True)]


def _edge(v: float, scale: float, most: int, up: bool) -> int:
    """One box edge scaled to another grid: rounded outward (1e-9: 100 * 0.8 is 80.00000000000001), in [0, most]."""
    v = math.ceil(v * scale - 1e-9) if up else math.floor(v * scale + 1e-9)
    return min(most, max(0, v))


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
    """Open-beam I0 per channel from the air above the vehicle (top rows, `open_beam`), else the dtype max."""
    out = []
    for ch in counts:
        med = open_beam(ch[:_edge_rows(ch)], ch, dtype_max)
        out.append(float(dtype_max) if med is None else med)
    return tuple(out)


def _edge_rows(image: np.ndarray) -> int:
    """How many rows at the top (or bottom) of an image are judged as open beam: AIR_ROWS, at most a tenth of it."""
    return max(1, min(AIR_ROWS, image.shape[0] // 10 or 1))


def open_beam(band: np.ndarray, image: np.ndarray, dtype_max: float) -> float | None:
    """The median of a band of rows when it is open beam, else None. Open beam is flat (robust spread under 5 %) and
    bright (above half the range), or flatter (under 2 %: the open beam's noise is ~1 %, a band of light cargo along
    the whole width rarely so even) and the brightest part of the image within the band's own noise (its median plus
    3 robust sigmas at or above the image's 99th percentile): a 12- or 14-bit detector's air in a 16-bit container
    reads ~3300 or ~13000 of 65535, still the brightest pixels. The 99th, not the maximum: hot pixels and noise spikes
    exceed the air; a flat dense top (a scan cropped at a container roof) stays below the air elsewhere."""
    band = band.astype(np.float64)
    med = float(np.median(band))
    mad = float(np.median(np.abs(band - med)))
    if not mad < 0.05 * med:
        return None
    if med > 0.5 * dtype_max:
        return med
    if not mad < 0.02 * med:
        return None
    brightest = float(np.percentile(image[::4, ::4], 99))
    return med if med + 3 * 1.4826 * mad >= brightest else None


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
    if channels_last(counts.shape):   # (H, W, 2) as many tools write a dual-energy pair
        counts = np.moveaxis(counts, -1, 0)
    elif counts.shape[0] > 2 and counts.shape[-1] in (3, 4):   # else refused as "<height> energies/channels"
        raise ScanError(src, f"shape {counts.shape} is a colour image (H, W, {counts.shape[-1]}), not X-ray counts: "
                             "pass (H, W) or (C, H, W) with 1-2 energies (high, low)")
    check_shape(src, counts.shape[0], counts.shape[1], counts.shape[2], max_pixels)
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
    pitch = valid_pitch(src, DEFAULT_PITCH_MM if pitch_mm is None else pitch_mm)
    if energies is None:
        energies = ("high", "low") if counts.shape[0] == 2 else ("single",)
    if len(energies) != counts.shape[0]:
        raise ScanError(src, f"{len(energies)} energy names for {counts.shape[0]} channels")
    if low_first(energies):   # every step after reading takes the high energy first
        counts, i0, energies = np.ascontiguousarray(counts[::-1]), i0[::-1], tuple(energies)[::-1]
    att = counts_to_attenuation(counts, i0)
    _check_not_blank(src, counts, att, i0)
    check_physics(src, att, counts, dtype_max, None if guessed else i0[0], pitch)
    brightest = float(counts.max()) if guessed and counts.dtype == np.uint16 and min(i0) == dtype_max else None
    if brightest is not None and brightest < 0.5 * dtype_max:
        warn_scan(ScanWarning(src, f"no open beam at the top and the brightest pixel reads {brightest:g} of "
                                   f"{dtype_max:g}: I0 taken as {dtype_max:g}, which reads every pixel denser "
                                   "than it is if the detector has fewer bits (12/14-bit data): give I0 in the "
                                   "metadata"), stacklevel=2)
    return Scan(attenuation=att, pitch_mm=pitch, energies=tuple(energies),
                i0=i0, source=source, counts=counts if counts.dtype.kind == "u" else None,
                meta=dict(meta or {}))


def low_first(energies: Any) -> bool:
    """Whether a dual-energy scan names its low energy first ("low", "high"; "LE", "HE"). The model, a dual-to-single
    selection and the material image all take channel 0 as the high energy: such a scan is turned around on
    reading, else the model saw the energies swapped."""
    names = tuple(str(e).strip().lower() for e in energies or ())
    return len(names) == 2 and names[0] in LOW_NAMES and names[1] in HIGH_NAMES


def check_scan(scan: Scan) -> Scan:
    """The checks scan_from_counts makes, for a Scan built in memory (a station handing the Inspector its own):
    (C, H, W) with 1-2 channels of a sane size, a valid pitch, finite, and not blank. Without them a pitch of 0 or
    -5 shrank the truck to one pixel and a negated attenuation read as air: both were released. One naming its low
    energy first comes back turned around (high first)."""
    if low_first(scan.energies) and np.shape(scan.attenuation)[:1] == (2,):
        counts = None if scan.counts is None else np.ascontiguousarray(np.asarray(scan.counts)[::-1])
        scan = replace(scan, attenuation=np.ascontiguousarray(np.asarray(scan.attenuation)[::-1]),
                       energies=tuple(scan.energies)[::-1], i0=tuple(scan.i0)[::-1], counts=counts)
    src = scan.source or "<scan>"
    att = np.asarray(scan.attenuation)
    if att.ndim != 3 or att.dtype.kind != "f":
        raise ScanError(src, f"attenuation must be a float (C, H, W) array, got {att.dtype} {att.shape}")
    check_shape(src, *att.shape, None)
    valid_pitch(src, scan.pitch_mm)
    if not np.isfinite(att).all():   # ~1 ms on a 2-energy 640x2400 scan
        raise ScanError(src, "attenuation contains NaN or infinity")
    _check_not_blank(src, att if scan.counts is None else scan.counts, att, tuple(scan.i0) or (1.0,))
    counts = scan.counts
    if not (isinstance(counts, np.ndarray) and counts.ndim == 3 and counts.shape[1:] == att.shape[1:]):
        counts = None
    check_physics(src, att, counts, float(np.iinfo(np.uint16).max), float(scan.i0[0]) if scan.i0 else None,
                  scan.pitch_mm)
    return scan


def check_physics(src: str, att: np.ndarray, counts: np.ndarray | None, dtype_max: float, i0: float | None,
                  pitch_mm: float) -> None:
    """The physics checks, in their order: polarity before the energy order (which reads an inverted dual-energy
    scan as swapped), then upright; the checks on counts are skipped without them. `i0`: the first energy's open
    beam where it is given."""
    if counts is not None:
        check_polarity(src, counts)
    check_energy_order(src, att)
    if counts is not None:
        check_upright(src, counts, dtype_max, i0, pitch_mm)


def noise_ratio(image: np.ndarray) -> float | None:
    """How much noisier the brightest tenth of a 16-bit image is than its darkest tenth: the lower quartile of the
    non-zero |second differences| along a row (a - 2b + c: a smoothed edge, locally straight, leaves out of it what
    a first difference counted as noise) in each, on ~64 rows and ~1000 triples a row (~2 ms). The lower quartile of
    the non-zero ones, not the median: a vendor's smoothing leaves the noise in the quiet pixels and structure in the
    rest (a 3-pixel Gaussian blur read 0.19 with first differences' median, 0.88 so), and median filtering leaves
    flat steps of zero difference. Values common enough to be plateaus (PLATEAU_SHARE) are left out; None under
    NOISE_MIN_ROWS rows, with fewer than NOISE_TRIPLES triples, or with no difference at all (a noise-free rendering);
    inf when only the bright end varies."""
    h, w = image.shape
    if h < NOISE_MIN_ROWS:
        return None
    rows = image[:: max(1, h // 64)]
    step = max(1, (w - 2) // 1024)
    plateau = np.bincount(rows.ravel(), minlength=65536) > PLATEAU_SHARE * rows.size
    a, b, c = rows[:, 0:-2:step], rows[:, 1:-1:step], rows[:, 2::step]
    keep = ~(plateau[a] | plateau[b] | plateau[c])
    a, b, c = (x[keep].astype(np.int32) for x in (a, b, c))
    if a.size < NOISE_TRIPLES:
        return None
    level, diff = a + b + c, np.abs(a - 2 * b + c)
    n = level.size // 10
    order = np.argpartition(level, (n, level.size - n - 1))
    bright, dark = _quiet(diff[order[-n:]]), _quiet(diff[order[:n]])
    if dark == 0:
        return None if bright == 0 else float("inf")
    return bright / dark


def _quiet(diff: np.ndarray) -> float:
    """The lower quartile of the non-zero differences (0 when none): the noise of the quietest pixels."""
    diff = diff[diff > 0]
    return _percentile(diff, 25) if diff.size else 0.0


def check_polarity(src: str, counts: np.ndarray) -> None:
    """ScanError for 16-bit counts whose noise falls where they read bright (NOISE_RATIO_MIN): no linear transmission
    counts, but an inverted image (dense reads bright) or a log-scaled display image. Caught before the energy order,
    which reads an inverted dual-energy scan as swapped; one energy is judged too. 8-bit pictures are not judged
    (compressed and denoised, their noise says little)."""
    if counts.dtype != np.uint16:
        return
    ratio = noise_ratio(counts[0])
    if ratio is not None and ratio < NOISE_RATIO_MIN:
        raise ScanError(src, f"the noise is lowest where the image reads brightest (bright/dark noise {ratio:.2f}; "
                             "photon noise grows with the counts): the image is inverted (dense reads bright) or "
                             "log-scaled (a display image); the detector reads linear counts, open beam bright")


def energy_ratio(att: np.ndarray) -> float | None:
    """Median A_high / A_low of a dual-energy scan over the pixels where both energies attenuate (RATIO_BAND, on a 4x
    grid: ~1 ms) and read above their counts' floor (RATIO_FLOOR_MARGIN, the floor found on an 8x grid); None for one
    energy, or with fewer than RATIO_SAMPLES such pixels (too little in the beam to say)."""
    if att.shape[0] != 2:
        return None
    high, low = att[0, ::4, ::4], att[1, ::4, ::4]
    lo = RATIO_BAND[0]
    top_high, top_low = (min(RATIO_BAND[1], _percentile(a[::2, ::2], RATIO_FLOOR_PERCENTILE) - RATIO_FLOOR_MARGIN)
                         for a in (high, low))
    both = (high >= lo) & (high <= top_high) & (low >= lo) & (low <= top_low)
    if np.count_nonzero(both) < RATIO_SAMPLES:
        return None
    return float(np.median(high[both] / low[both]))


def _percentile(a: np.ndarray, q: float) -> float:
    """The q-th percentile of an array, nearest rank (one partition: half np.percentile's time)."""
    k = min(a.size - 1, int(a.size * q / 100))
    return float(np.partition(a.ravel(), k)[k])


def check_energy_order(src: str, att: np.ndarray) -> None:
    """ScanError for a dual-energy scan whose first energy does not attenuate less than the second (ENERGY_RATIO_MAX):
    the model, trained on (high, low), then released about half the clean and half the anomalous trucks at random.
    Not turned around: an inverted image (dense reads bright) gives the same ratio as a swap."""
    ratio = energy_ratio(att)
    if ratio is None or ratio < ENERGY_RATIO_MAX:
        return
    if ratio < 1.01:
        raise ScanError(src, f"both energies read alike (ratio {ratio:.3f}): the same energy written twice?")
    raise ScanError(src, f"the first energy attenuates more than the second (median A1/A2 = {ratio:.2f}; in a "
                         "transmission scan the high energy attenuates 0.6-0.95 of the low): the low energy came "
                         "first, or the image is inverted (dense reads bright); name the energies in the file's "
                         "metadata (how: the README's Scan formats) or write the high energy first")


def check_upright(src: str, counts: np.ndarray, dtype_max: float, i0: float | None = None,
                  pitch_mm: float = DEFAULT_PITCH_MM) -> None:
    """ScanError for 16-bit counts whose bottom rows are open beam across the width while something dense cuts the
    top rows: a cargo scan has the road at the bottom (wheels cut its rows) and air above, so it came upside down
    (the model then released trucks at random: AUROC 0.76). A small car in a tall frame (air at both ends) passes,
    and so does a scan without air, where light cargo may read as flat at its bottom as air. 8-bit pictures (baggage
    X-rays, renderings) are not judged: a bag may touch the top edge with air below. `i0`: the first energy's open
    beam where the file gives it. Only a whole vehicle is judged (UPRIGHT_MIN_HEIGHT_MM tall, at least as long as
    tall): a window cut from under a chassis has air below and steel above, the right way up."""
    height, width = counts.shape[-2:]
    if counts.dtype != np.uint16 or height * pitch_mm < UPRIGHT_MIN_HEIGHT_MM or width < height:
        return
    image = counts[0]
    rows = _edge_rows(image)
    air = _clear_air(image[-rows:], image, dtype_max, i0)
    if air is not None and _dense_share(image[:rows], air) > 0.01:
        raise ScanError(src, "open beam along the bottom rows and none at the top: the scan is upside down? write it "
                             "with the road at the bottom")


def _clear_air(band: np.ndarray, image: np.ndarray, dtype_max: float, i0: float | None) -> float | None:
    """The open beam a band of rows reads when it is open beam across the whole width, else None: `open_beam`, within
    10 % of `i0` where it is known (a flat band of light cargo, 0.7 of it, is no air), with at most 1 % of its pixels
    dense (`_dense_share`): the median and its spread alone took a generator truck's bottom rows, where wheels on the
    road cut 3-6 % of them, for air."""
    air = open_beam(band, image, dtype_max)
    if air is None or (i0 is not None and air < 0.9 * i0) or _dense_share(band, air) > 0.01:
        return None
    return air


def _dense_share(band: np.ndarray, air: float) -> float:
    """The share of a band's pixels reading 20 % under the open beam `air` (attenuation over 0.22, far beyond its
    noise): something in the beam."""
    return float(np.count_nonzero(band < 0.8 * air)) / band.size


def channels_last(shape: tuple[int, ...]) -> bool:
    """True for an (H, W, 1|2) stack: a channel axis last and an image's sides first."""
    return len(shape) == 3 and shape[2] in (1, 2) and shape[0] > 2 and shape[1] > 2


def valid_pitch(src: str, pitch_mm: Any) -> float:
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


def default_pitch(pitch_mm: Any, src: str = "default_pitch_mm") -> float:
    """The pitch taken for a file that carries none: DEFAULT_PITCH_MM for None, else `pitch_mm` checked as a file's
    pitch is (PITCH_RANGE_MM); ScanError naming `src` for text, a bool, NaN or a value outside it. A site at 4 mm read
    at the 5 mm default is 25 % too large, well inside the station's height check: the user says so here."""
    if pitch_mm is None:
        return DEFAULT_PITCH_MM
    try:   # a user's setting: text or a bool is no pitch, though float() would take "4" and True
        if isinstance(pitch_mm, (bool, np.bool_, str, bytes)):
            raise ScanError(src, "not a number")
        return valid_pitch(src, pitch_mm)
    except ScanError:
        lo, hi = PITCH_RANGE_MM
        raise ScanError(src, f"default pixel pitch {pitch_mm!r} (for files that carry none) must be a number in "
                             f"{lo:g}-{hi:g} mm") from None


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


def most_scan_bytes(max_pixels: int | None) -> int:
    """The most bytes a scan within the pixel limit can take: two energies of float64, plus 16 MiB of headers."""
    return 2 * 8 * (DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels) + (16 << 20)


def check_shape(src: str, c: int, h: int, w: int, max_pixels: int | None) -> None:
    """ScanError unless a (c, h, w) scan is one any reader may decode: 1-2 channels, sides of at least MIN_SIDE,
    at most `max_pixels` per channel. The readers call it on the header's size, before decoding."""
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

def sniff_format(head: bytes, suffix: str) -> str:
    """The reader for a file from its first bytes (the suffix only for DICOM without its preamble); "unknown" else."""
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


def read_scan(path: str | os.PathLike, *, max_pixels: int | None = None, default_pitch_mm: float | None = None) -> Scan:
    """Read any supported scan file into a Scan; raise ScanError on any bad input. `default_pitch_mm`: the pitch of
    a file that carries none (many scanners write 16-bit PNG/TIFF without one); None = DEFAULT_PITCH_MM. A file's
    own pitch always wins."""
    p = Path(path)
    try:   # exists() says False where nothing is found; a name too long, or a folder it may not search, raised OSError
        if not p.exists():
            raise ScanError(p, _missing(p))
        if not p.is_file():
            raise ScanError(p, "not a regular file")
        size, most = p.stat().st_size, most_scan_bytes(max_pixels)
        if size > most:   # read whole, any big file (a video, a disk image) filled memory
            raise ScanError(p, f"file of {size / 1e6:.0f} MB, more than a scan within the pixel limit holds "
                               f"({most / 1e6:.0f} MB; set DETECTOR_MAX_PIXELS to allow)")
        data = p.read_bytes()
    except OSError as exc:
        raise ScanError(p, f"cannot read file ({exc.strerror or exc})") from exc
    return read_scan_bytes(data, str(p), max_pixels=max_pixels, default_pitch_mm=default_pitch_mm)


def _missing(p: Path) -> str:
    """Why a path that leads to no file does: a link `ls` lists was reported "file not found" too."""
    if not p.is_symlink():
        return "file not found"
    try:
        p.resolve(strict=True)
    except RuntimeError:   # Python < 3.13 on a loop
        return "a symbolic link that loops (it leads back to itself)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops (it leads back to itself)"
    return f"a symbolic link to a missing file ({os.readlink(p)})"


def read_scan_bytes(data: bytes, name: str, *, max_pixels: int | None = None,
                    default_pitch_mm: float | None = None) -> Scan:
    """Read a scan from its file bytes (`name` gives the suffix and the name in errors; `default_pitch_mm` as for
    read_scan)."""
    default = default_pitch(default_pitch_mm, name)
    if len(data) == 0:
        raise ScanError(name, "empty file (0 bytes)")
    kind = sniff_format(data[:132], Path(name).suffix.lower())
    from detector import formats   # here, not at the top: formats takes ScanError and the shape checks from here
    readers = {"png": formats.read_png, "jpeg": formats.read_jpeg, "tiff": formats.read_tiff, "npy": formats.read_npy,
               "npz": formats.read_npz, "dicom": formats.read_dicom}
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
    scan = scan_from_counts(counts, source=name, max_pixels=max_pixels, **{"pitch_mm": default, **info})
    scan.pitch_default = "pitch_mm" not in info
    return scan


# ---------------------------------------------------------------- writing

def write_scan(path: str | os.PathLike, scan: Scan | np.ndarray, *, i0: float | tuple[float, ...] | None = None,
               pitch_mm: float | None = None, energies: tuple[str, ...] | None = None) -> Path:
    """Write a scan losslessly: .tif/.tiff (one uint16 page per energy + JSON metadata),
    .png (one channel), .npy (counts) or .npz (counts, i0, pitch_mm, energies)."""
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
        extra = {k: np.asarray(v) for k, v in (("i0", meta["i0"]), ("pitch_mm", pitch_mm),
                                                ("energies", meta["energies"])) if v is not None}
        np.savez_compressed(p, counts=counts, **extra)
    else:
        raise ScanError(p, f"cannot write {suffix!r}; use .tiff, .png, .npy or .npz")
    return p

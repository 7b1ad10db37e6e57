"""Preprocessing shared by training and the station, so the two can never differ.

A scan's attenuation is resampled to the model's pitch, clipped and scaled, and padded with air
(attenuation 0) to a multiple of the network's total stride. The constants travel in the ONNX
bundle's metadata.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from detector.scan import DEFAULT_MAX_PIXELS, Scan, ScanError


@dataclass(frozen=True)
class Preprocessing:
    """Constants of the model's input; stored in the bundle metadata."""

    model_pitch_mm: float = 10.0  # the network sees 10 mm pixels (half a 5 mm scan's resolution)
    clip_max: float = 12.0        # beyond this (transmission < 6e-6) only noise is left
    scale: float = 4.0            # divide so typical cargo lands in [0, ~2]
    pad_multiple: int = 32        # the network's total stride
    repair_rows: bool = True      # mend dead and hot detector rows (find_bad_rows) before resampling

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From a bundle's or checkpoint's metadata; one without `repair_rows` predates the row repair,
        so its model was trained (and runs) without it."""
        names = {f.name for f in fields(cls)}
        return cls(**{"repair_rows": False, **{k: v for k, v in d.items() if k in names}})


@dataclass
class Prepared:
    """Model input for one scan: x (C, Hp, Wp) float32; valid_hw the unpadded size in model px;
    scale_yx the scan pixels per model pixel along y and x."""

    x: np.ndarray
    valid_hw: tuple[int, int]
    scale_yx: tuple[float, float]


def model_size(height: int, width: int, pitch_mm: float, pre: Preprocessing) -> tuple[int, int]:
    """(h, w) of a scan once resampled to the model's pitch."""
    f = pitch_mm / pre.model_pitch_mm
    return max(1, int(round(height * f))), max(1, int(round(width * f)))


def to_model_pitch(att: np.ndarray, pitch_mm: float, pre: Preprocessing,
                   interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Resample (C, H, W) attenuation (or a (H, W) map) to the model's pitch."""
    h, w = att.shape[-2:]
    mh, mw = model_size(h, w, pitch_mm, pre)
    if (mh, mw) == (h, w):
        return np.ascontiguousarray(att, dtype=np.float32)
    if att.ndim == 2:
        return cv2.resize(att.astype(np.float32, copy=False), (mw, mh), interpolation=interpolation)
    out = np.empty((att.shape[0], mh, mw), np.float32)
    for c in range(att.shape[0]):  # per plane: no (C,H,W) <-> (H,W,C) copies of the full scan
        out[c] = cv2.resize(att[c].astype(np.float32, copy=False), (mw, mh), interpolation=interpolation)
    return out


AIR = 0.05     # attenuation below this: air (transmission > 95 %)
DENSE = 1.2    # above this (transmission < 30 %) in both neighbours, a hot detector row's cap shows


def find_bad_rows(att: np.ndarray, step: int = 4, min_air: int = 16, min_dense: int = 48,
                  max_run: int = 32) -> np.ndarray:
    """(C, H) bool: detector rows that are dead or hot in each energy of a (C, H, W) attenuation scan.

    A line scanner's detector row is one image row along the whole truck. A dead row, or a run of up
    to `max_run` adjacent ones (a failed detector board), reads far too much attenuation where the
    good rows just outside it see air (a real thin plate ends where the truck ends); a hot row is
    capped: one flat value wherever its neighbours see more than that (judged once dead rows are
    mended, else a dead row's neighbours look hot). Decided from every `step`-th column (a bad row
    spans them all) and only on rows with enough air / dense columns."""
    a = np.array(np.asarray(att)[:, :, ::step], np.float32)
    bad = np.zeros(a.shape[:2], bool)
    if a.shape[1] < 3:
        return bad
    for c, y0, y1 in _dead_runs(a, min_air, max_run):
        bad[c, y0:y1 + 1] = True
    a = _mend_rows(a, bad)
    row, floor = a[:, 1:-1], np.minimum(a[:, :-2], a[:, 2:])   # a hot row dips below both neighbours
    dense = floor > DENSE
    n = _count_per_row(dense)
    dips = (n >= min_dense) & (_count_per_row(dense & (row < floor - 0.3)) >= 0.8 * n)
    for c, y in zip(*np.nonzero(dips)):     # few rows: is the row one flat value there (a cap)?
        r, d = row[c, y], dense[c, y]
        mean = (r * d).sum() / n[c, y]
        if np.sqrt(max((r * r * d).sum() / n[c, y] - mean * mean, 0)) < 0.05:
            bad[c, y + 1] = True
    return bad


def _count_per_row(b: np.ndarray) -> np.ndarray:
    """True values along the last axis of a bool array: a uint8 sum, ~8x faster than np.count_nonzero."""
    return b.view(np.uint8).sum(-1, dtype=np.uint16 if b.shape[-1] < 65536 else np.uint32)


def _dead_runs(a: np.ndarray, min_air: int, max_run: int) -> list[tuple[int, int, int]]:
    """(channel, first, last) of each run of inner rows of `a` (C, H, W') that all read > 0.5 more than
    the mean of the two rows bounding the run in >= 80 % of the columns where that mean is air. Runs
    start where a row steps up from air above and end where one steps down to air below (each in
    >= 80 % of at least min_air such columns): few rows, so the runs are checked one by one."""
    air, d = a < AIR, a[:, 1:] - a[:, :-1]                  # d[y]: row y+1 minus row y

    def steps(air_side: np.ndarray, stepped: np.ndarray) -> np.ndarray:
        n = _count_per_row(air_side)
        return (n >= min_air) & (_count_per_row(air_side & stepped) >= 0.8 * n)

    starts = steps(air[:, :-1], d > 0.5)    # starts[y]: row y+1 over air above
    ends = steps(air[:, 1:], d < -0.5)      # ends[y]: row y over air below
    runs = []
    for c in range(a.shape[0]):
        last = np.nonzero(ends[c])[0]
        for y0 in np.nonzero(starts[c])[0] + 1:
            for y1 in last[(last >= y0) & (last < min(y0 + max_run, a.shape[1] - 1))]:   # nearest end first
                ref = 0.5 * (a[c, y0 - 1] + a[c, y1 + 1])
                ref_air = ref < AIR
                n = np.count_nonzero(ref_air)
                if n >= min_air and np.count_nonzero(ref_air & (a[c, y0:y1 + 1].min(0) - ref > 0.5)) >= 0.8 * n:
                    runs.append((c, int(y0), int(y1)))
                    break
    return runs


def _mend_rows(a: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Rows flagged in `bad` (C, H) of a (C, H, W) array, in place: linear between the nearest good rows."""
    for c, y in zip(*np.nonzero(bad)):
        good = np.nonzero(~bad[c])[0]
        lo, hi = good[good < y], good[good > y]
        if len(lo) and len(hi):
            w = (y - lo[-1]) / (hi[0] - lo[-1])
            a[c, y] = (1 - w) * a[c, lo[-1]] + w * a[c, hi[0]]
        elif len(lo) or len(hi):
            a[c, y] = a[c, lo[-1] if len(lo) else hi[0]]
    return a


def repair_bad_rows(att: np.ndarray) -> np.ndarray:
    """(C, H, W) attenuation with dead and hot detector rows (`find_bad_rows`) replaced by linear
    interpolation between the nearest good rows above and below; the input itself if there are none."""
    bad = find_bad_rows(att)
    return _mend_rows(np.array(att, np.float32), bad) if bad.any() else att


def normalize(att: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Clip attenuation to [0, clip_max] and divide by scale (float32)."""
    x = np.clip(att, 0.0, pre.clip_max).astype(np.float32, copy=False)
    return x * np.float32(1.0 / pre.scale)


def select_channels(att: np.ndarray, channels: int, source: str | None = None) -> np.ndarray:
    """Match a scan's energies to the model: dual to single keeps the high energy;
    single to dual is an error (the model needs both energies)."""
    c = att.shape[0]
    if c == channels:
        return att
    if c == 2 and channels == 1:
        return att[:1]
    raise ScanError(source or "<scan>", f"scan has {c} energy channel(s) but the model needs {channels}"
                                        + (" (a dual-energy high+low scan)" if channels == 2 else ""))


def padded_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    """(H, W) of an (h, w) scan after pad_to_multiple: the size the network sees at the station."""
    return h + (-h) % multiple, w + (-w) % multiple


def valid_cells(h: int, w: int, stride: int) -> tuple[int, int]:
    """Heatmap cells (rows, columns) that cover an (h, w) model-pitch scan; the rest lie over the padding."""
    return -(-h // stride), -(-w // stride)


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad (C, H, W) at the bottom/right with zeros (air) to multiples of `multiple`."""
    h, w = x.shape[-2:]
    H, W = padded_size(h, w, multiple)
    if (H, W) == (h, w):
        return np.ascontiguousarray(x)
    return np.pad(x, ((0, 0), (0, H - h), (0, W - w)))


def model_attenuation(att: np.ndarray, pitch_mm: float, pre: Preprocessing, channels: int | None = None,
                      source: str | None = None) -> np.ndarray:
    """(C, H, W) scan attenuation -> the model's energies (`channels`, None: all), bad detector rows
    mended (pre.repair_rows), at the model's pitch: one path for the station, the training cache and
    the in-memory synthetic trucks."""
    if channels is not None:
        att = select_channels(att, channels, source)
    mh, mw = model_size(*att.shape[-2:], pitch_mm, pre)
    if mh * mw > DEFAULT_MAX_PIXELS:   # a coarse pitch is upsampled: bound the memory it would take
        raise ScanError(source or "<scan>", f"at {pitch_mm:g} mm per pixel the scan becomes {mh}x{mw} px at the "
                                            f"model's {pre.model_pitch_mm:g} mm pitch, over the "
                                            f"{DEFAULT_MAX_PIXELS / 1e6:.0f} Mpx limit (DETECTOR_MAX_PIXELS)")
    if pre.repair_rows:
        att = repair_bad_rows(att)
    return to_model_pitch(att, pitch_mm, pre)


def prepare(scan: Scan, pre: Preprocessing, channels: int) -> Prepared:
    """Scan -> padded, normalised model input at the model's pitch."""
    att = model_attenuation(scan.attenuation, scan.pitch_mm, pre, channels, scan.source)
    x = pad_to_multiple(normalize(att, pre), pre.pad_multiple)
    h, w = att.shape[-2:]
    return Prepared(x=x, valid_hw=(h, w), scale_yx=(scan.height / h, scan.width / w))

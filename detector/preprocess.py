"""Preprocessing shared by training and the station, so the two can never differ.

A scan's attenuation is resampled to the model's pitch, clipped and scaled, and padded with air
(attenuation 0) to a multiple of the network's total stride. The constants travel in the ONNX
bundle's metadata.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from detector.scan import Scan, ScanError


@dataclass(frozen=True)
class Preprocessing:
    """Constants of the model's input; stored in the bundle metadata."""

    model_pitch_mm: float = 10.0  # the network sees 10 mm pixels (half a 5 mm scan's resolution)
    clip_max: float = 12.0        # beyond this (transmission < 6e-6) only noise is left
    scale: float = 4.0            # divide so typical cargo lands in [0, ~2]
    pad_multiple: int = 32        # the network's total stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad (C, H, W) at the bottom/right with zeros (air) to multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return np.ascontiguousarray(x)
    return np.pad(x, ((0, 0), (0, ph), (0, pw)))


def prepare(scan: Scan, pre: Preprocessing, channels: int) -> Prepared:
    """Scan -> padded, normalised model input at the model's pitch."""
    att = select_channels(scan.attenuation, channels, scan.source)
    att = to_model_pitch(att, scan.pitch_mm, pre)
    x = pad_to_multiple(normalize(att, pre), pre.pad_multiple)
    h, w = att.shape[-2:]
    return Prepared(x=x, valid_hw=(h, w), scale_yx=(scan.height / h, scan.width / w))

"""Threat image projection (TIP) in the attenuation domain (numpy + opencv, no torch).

Inserting an object behind/inside cargo multiplies transmissions, i.e. adds its attenuation
(Beer-Lambert). Used by the synthetic generator and as a training augmentation on crops.
Boxes are (x0, y0, x1, y1) in pixels with x1/y1 exclusive.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detector.metrics import mask_bbox

THREAT_KINDS = ("firearm", "narcotics", "false_wall", "shielded_block", "small_metal")
MIN_ATT = 0.01  # a threat pixel adds at least this much attenuation (else it is outside the mask)


@dataclass
class Threat:
    """An object to insert: its own attenuation (C,h,w), zero outside `mask`, and its kind."""
    attenuation: np.ndarray
    mask: np.ndarray
    kind: str

    def __post_init__(self):
        self.attenuation = np.asarray(self.attenuation, np.float32)
        if self.attenuation.ndim == 2:
            self.attenuation = self.attenuation[None]
        self.mask = np.asarray(self.mask, bool)
        if self.attenuation.shape[1:] != self.mask.shape:
            raise ValueError(f"threat attenuation {self.attenuation.shape} and mask {self.mask.shape} differ")
        self.attenuation = np.where(self.mask[None], np.maximum(self.attenuation, 0), 0).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape


def make_threat(rng: np.random.Generator, kind: str | None = None, pitch_mm: float = 5.0,
                channels: int = 2) -> Threat:
    """A parametric threat from the synthetic threat library (physical sizes, dual-energy values)."""
    from detector.synth.threats import build_threat  # lazy: synth imports this module
    kind = kind or str(rng.choice(THREAT_KINDS))
    if kind not in THREAT_KINDS:
        raise ValueError(f"unknown threat kind {kind!r}; known: {', '.join(THREAT_KINDS)}")
    att = build_threat(rng, kind, pitch_mm)
    if channels == 1:
        att = att[:1]
    return Threat(att, att.max(axis=0) >= MIN_ATT, kind)


def make_package(rng: np.random.Generator, pitch_mm: float = 5.0, channels: int = 2,
                 contrast: float = 1.0) -> Threat:
    """Wrapped bricks stacked to fit a vehicle part (fuel tank, tyre, chassis rail): kind "package".
    `contrast` scales the net attenuation (packages displacing diesel add only ~0.3 of their own)."""
    from detector.synth.threats import narcotics  # lazy: synth imports this module
    cv = narcotics(rng, pitch_mm, rows=int(rng.integers(1, 6)), cols=int(rng.integers(1, 4)))
    att = cv.attenuation()
    mask = att.max(axis=0) >= MIN_ATT            # the full-contrast extent; Threat clips negatives
    att = att * np.float32(contrast)
    return Threat(att[:1] if channels == 1 else att, mask, "package")


def dense_region(attenuation: np.ndarray, region: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """The denser half of `region` (smoothed attenuation >= its median): vehicle parts, dense loads."""
    att = np.asarray(attenuation, np.float32)
    a = cv2.GaussianBlur(att.mean(axis=0) if att.ndim == 3 else att, (0, 0), sigma)
    vals = a[region]
    return region & (a >= np.median(vals)) if vals.size else region


def _smooth_fill(att: np.ndarray, known: np.ndarray, sigma: float) -> np.ndarray:
    """Fill unknown pixels by normalised Gaussian convolution of the known ones (background estimate)."""
    w = known.astype(np.float32)
    num = cv2.GaussianBlur(att * w, (0, 0), sigma)
    den = cv2.GaussianBlur(w, (0, 0), sigma)
    return np.where(known, att, num / np.maximum(den, 1e-6))


def threat_from_scan(attenuation: np.ndarray, mask: np.ndarray, background: np.ndarray | None = None,
                     kind: str = "custom", others: np.ndarray | None = None) -> Threat:
    """Cut an object out of a scan with its mask; subtract the local background so that only the
    object's own attenuation is kept (then it can be projected into other scans). `others`: pixels of
    other objects, (H, W) like `mask`, left out of the background estimate too."""
    att = np.asarray(attenuation, np.float32)
    if att.ndim == 2:
        att = att[None]
    mask = np.asarray(mask, bool)
    if mask.shape != att.shape[1:] or not mask.any():
        raise ValueError("mask must have the scan's (H, W) shape and mark at least one pixel")
    x0, y0, x1, y1 = mask_bbox(mask)
    pad = max(4, (max(y1 - y0, x1 - x0)) // 2)
    Y0, Y1 = max(0, y0 - pad), min(att.shape[1], y1 + pad)
    X0, X1 = max(0, x0 - pad), min(att.shape[2], x1 + pad)
    crop, m = att[:, Y0:Y1, X0:X1], mask[Y0:Y1, X0:X1]
    if background is None:
        sigma = max(2.0, pad / 2)
        known = ~m if others is None else ~(m | np.asarray(others, bool)[Y0:Y1, X0:X1])
        bg = np.stack([_smooth_fill(c, known, sigma) for c in crop])
    else:
        bg = np.asarray(background, np.float32)
        bg = (bg[None] if bg.ndim == 2 else bg)[:, Y0:Y1, X0:X1]
    own = np.clip(crop - bg, 0, None)[:, y0 - Y0:y1 - Y0, x0 - X0:x1 - X0]
    m = m[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0]
    return Threat(own, m & (own.max(axis=0) > 0), kind)


def threats_from_mask(attenuation: np.ndarray, mask: np.ndarray, max_side: int, kind: str = "custom",
                       min_pixels: int = 4) -> list[Threat]:
    """Each labelled object of a scan (a connected part of its mask, 8-connected) cut out as its own
    attenuation (`threat_from_scan`): a site's own seizures as a TIP library. Parts with fewer than
    `min_pixels` pixels or a side longer than `max_side` (they would not fit a training crop) are left out."""
    m = np.asarray(mask) > 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    out = []
    for j in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[j])
        if area < min_pixels or max(w, h) > max_side:
            continue
        t = threat_from_scan(attenuation, labels == j, kind=kind, others=m)   # other objects: not background
        if t.mask.sum() >= min_pixels:
            out.append(t)
    return out


def cargo_region(attenuation: np.ndarray, min_att: float = 0.08, close_px: int = 15) -> np.ndarray:
    """(H, W) bool: inside the vehicle/cargo (closed silhouette of attenuating matter), not air."""
    att = np.asarray(attenuation, np.float32)
    if att.ndim == 3:   # the channel mean, as att.mean(axis=0) (same values) at a third of its time
        a = att[0].copy()
        for c in att[1:]:
            a += c
        a /= np.float32(len(att))
    else:
        a = att
    solid = (cv2.GaussianBlur(a, (0, 0), 2.0) > min_att).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (close_px, close_px))
    solid = cv2.morphologyEx(solid, cv2.MORPH_CLOSE, k)
    solid = cv2.erode(solid, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5)))
    return solid.astype(bool)


def project(attenuation: np.ndarray, threat: Threat, rng: np.random.Generator,
            at: tuple[int, int] | None = None, region: np.ndarray | None = None,
            tries: int = 300, min_inside: float = 0.98
            ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Add the threat's attenuation (multiply transmissions) at `at` = (x0, y0) top-left, or at a
    random place whose region covers the threat's mask. Returns (new attenuation, mask, box).
    Raises ValueError if nothing fits."""
    att = np.asarray(attenuation, np.float32)
    squeeze = att.ndim == 2
    if squeeze:
        att = att[None]
    C, H, W = att.shape
    t_att = threat.attenuation
    if t_att.shape[0] != C:
        if t_att.shape[0] == 2 and C == 1:
            t_att = t_att[:1]          # single-energy scan: keep the high energy
        else:
            raise ValueError(f"threat has {t_att.shape[0]} channels, scan has {C}")
    h, w = threat.shape
    if h > H or w > W:
        raise ValueError(f"threat {h}x{w} larger than the scan {H}x{W}")
    if at is None:
        region = cargo_region(att) if region is None else np.asarray(region, bool)
        flat = np.flatnonzero(region)   # one index array: 6x faster than np.nonzero's two on a whole scan
        if flat.size == 0:
            raise ValueError("no cargo region to place the threat in")
        n_mask = threat.mask.sum()
        for _ in range(tries):
            yc, xc = divmod(int(flat[rng.integers(flat.size)]), region.shape[1])
            y0 = int(np.clip(yc - h // 2, 0, H - h))
            x0 = int(np.clip(xc - w // 2, 0, W - w))
            inside = region[y0:y0 + h, x0:x0 + w][threat.mask].sum()
            if inside >= min_inside * n_mask:
                break
        else:
            raise ValueError(f"no place in the region fits a {h}x{w} {threat.kind}")
    else:
        x0, y0 = int(at[0]), int(at[1])
        if not (0 <= x0 <= W - w and 0 <= y0 <= H - h):
            raise ValueError(f"threat at {at} with size {w}x{h} leaves the {W}x{H} scan")
    out = att.copy()
    out[:, y0:y0 + h, x0:x0 + w] += t_att
    mask = np.zeros((H, W), bool)
    mask[y0:y0 + h, x0:x0 + w] = threat.mask
    ys, xs = np.nonzero(threat.mask)
    box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
    return (out[0] if squeeze else out), mask, box


WHEEL_RADIUS_MM = (300.0, 650.0)   # a road wheel's outer (tread) radius: a van's 30 cm to a truck's 60 cm and more
WHEEL_SYMMETRY = 0.3   # a wheel's attenuation is nearly the same at every angle: spread across angles over spread
                       # along the radius stays under this (synthetic wheels 0.08-0.14; 98 % of other circles above)


def find_wheels(attenuation: np.ndarray, pitch_mm: float,
                radius_mm: tuple[float, float] = WHEEL_RADIUS_MM) -> list[tuple[float, float, float]]:
    """(x, y, outer radius) in pixels of the wheels seen side-on in a scan, inside it: circles (Hough) whose
    lower half is rotationally symmetric (tread, sidewalls, rim and hub are rings; cargo that happens to hold a
    circle mostly is not), the radius at the tread's edge (Hough often locks onto an inner ring). Where TIP can hide
    packages in tyres, which cleared traffic never shows."""
    att = np.asarray(attenuation, np.float32)
    a = att.mean(axis=0) if att.ndim == 3 else att
    H, W = a.shape
    rmin, rmax = radius_mm[0] / pitch_mm, radius_mm[1] / pitch_mm
    top = float(np.percentile(a, 99)) if a.size else 0.0
    if min(H, W) < 2 * rmin or top <= 0:
        return []
    img = cv2.GaussianBlur(np.clip(a * (255 / top), 0, 255).astype(np.uint8), (0, 0), 1.5)
    circles = cv2.HoughCircles(img, cv2.HOUGH_GRADIENT, dp=1, minDist=1.6 * rmin, param1=60, param2=30,
                               minRadius=int(0.6 * rmin), maxRadius=int(np.ceil(rmax)))
    smooth = cv2.GaussianBlur(a, (0, 0), 1.0)
    out = []
    for x0, y0, _ in ([] if circles is None else circles[0]):
        # Hough's centre is often a few pixels off (an inner ring, the axle and springs across the wheel): the
        # most symmetric centre near it
        sym, x, y, r = min(_tread(smooth, x0 + dx, y0 + dy, rmin, rmax) for dx in _NUDGE for dy in _NUDGE)
        r = r if sym < WHEEL_SYMMETRY else None
        # wholly inside but for the bottom of the tread, which a loaded tyre presses onto the ground, at the bottom edge
        if r is not None and r <= x <= W - r and r <= y <= H - 0.8 * r:
            out.append((x, y, r))
    return out


_NUDGE = (-6, -4, -2, 0, 2, 4, 6)   # pixels around Hough's centre
_LOWER_HALF = np.radians(np.linspace(15, 165, 31))   # under the axle: against air and ground, not the body above


def _tread(a: np.ndarray, x: float, y: float, rmin: float, rmax: float) -> tuple[float, float, float, float]:
    """(asymmetry, x, y, outer radius) of a wheel centred at (x, y), from its lower half: the tread's edge, and the
    spread of the attenuation across angles over its spread along the radius inside it (a wheel's rings: small).
    Samples beyond the scan's edges are left out: a loaded tyre's tread reaches the ground, at the bottom edge."""
    rs = np.arange(max(2, int(0.5 * rmin)), int(1.2 * rmax) + 2, dtype=np.float32)
    polar = cv2.remap(a, (x + rs[:, None] * np.cos(_LOWER_HALF)).astype(np.float32),
                      (y + rs[:, None] * np.sin(_LOWER_HALF)).astype(np.float32), cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    seen = ~np.isnan(polar)
    if seen.sum(axis=1).min() < 8:   # too little of some radius inside the scan
        return np.inf, float(x), float(y), 0.0
    profile = np.nanmean(polar, axis=1)
    # the tread's edge: the outermost radius in range where the profile falls below a third of its peak (the
    # largest drop is often the rim's edge, and a tread cut by the ground falls over several radii)
    level = profile[rs <= rmax].max() / 3
    falls = np.flatnonzero((profile[:-1] >= level) & (profile[1:] < level) & (rs[:-1] >= rmin) & (rs[:-1] <= rmax))
    if falls.size == 0:
        return np.inf, float(x), float(y), 0.0
    r = float(rs[falls[-1]]) + 0.5
    inside = (rs >= 0.3 * r) & (rs <= r)
    along = float(profile[inside].std())
    sym = float(np.nanstd(polar[inside], axis=1).mean()) / along if along > 0 else np.inf
    return sym, float(x), float(y), r


def hide_in_tyre(attenuation: np.ndarray, wheel: tuple[float, float, float], rng: np.random.Generator,
                 pitch_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Bags of narcotics packed into the air space of the tyre of `wheel` (x, y, outer radius: find_wheels), as the
    synthetic generator hides them (`synth.scene.tyre_bags`) -> (attenuation, mask). ValueError if none fits."""
    from detector.synth import scene, vehicles   # lazy: synth imports this module
    x, y, r = wheel
    att = np.asarray(attenuation, np.float32)
    yy, xx = np.ogrid[:att.shape[-2], :att.shape[-1]]
    rho = np.hypot(xx - x, yy - y)
    air = (rho >= vehicles.TYRE_AIR[0] * r) & (rho <= vehicles.TYRE_AIR[1] * r)
    threat, at = scene.tyre_bags(rng, air, pitch_mm)
    new, mask, _ = project(att, threat, rng, at=at)
    return new, mask

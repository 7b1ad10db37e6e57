"""Per-material path-length maps (a drawing canvas in cm) and the linac detector model.

The canvas accumulates, per material, the path length (cm) the beam travels through matter at
each pixel; edges are area-weighted (anti-aliased). `attenuation()` turns the maps into
A = sum_i mu_i t_i; `detect()` renders a linac scanner's artefacts and returns uint16 counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detector import physics


def _cover(a: float, b: float, n: int) -> tuple[int, np.ndarray]:
    """Pixels covered by the interval [a, b) (pixel units) with fractional edge coverage."""
    i0, i1 = max(int(np.floor(a)), 0), min(int(np.ceil(b)), n)
    if i1 <= i0:
        return i0, np.zeros(0, np.float32)
    idx = np.arange(i0, i1, dtype=np.float32)
    return i0, np.clip(np.minimum(idx + 1, b) - np.maximum(idx, a), 0, 1).astype(np.float32)


class Canvas:
    """Path-length maps in a scene measured in cm: x along the vehicle, y up from the ground."""

    def __init__(self, height: int, width: int, pitch_mm: float, ground_row: float):
        self.h, self.w, self.pitch_mm = height, width, pitch_mm
        self.s = 10.0 / pitch_mm                 # pixels per cm
        self.ground = ground_row                 # pixel row (float) of y = 0
        self.ox = 0.0                            # cm of air before the vehicle's front
        self.maps: dict[str, np.ndarray] = {}
        self.regions: dict[str, np.ndarray] = {}

    # coordinates -----------------------------------------------------------------------------
    def px(self, x_cm: float) -> float:
        return (x_cm + self.ox) * self.s

    def py(self, y_cm: float) -> float:
        return self.ground - y_cm * self.s

    def map(self, mat: str) -> np.ndarray:
        if mat not in self.maps:
            physics.material(mat)  # validate the name early
            self.maps[mat] = np.zeros((self.h, self.w), np.float32)
        return self.maps[mat]

    def mark(self, name: str, x0: float, y0: float, x1: float, y1: float) -> None:
        """Remember a named region (e.g. 'chassis', 'tyre', 'fuel_tank', 'cargo') for placements."""
        r = self.regions.setdefault(name, np.zeros((self.h, self.w), bool))
        c0, c1 = int(self.px(min(x0, x1))), int(np.ceil(self.px(max(x0, x1))))
        r0, r1 = int(self.py(max(y0, y1))), int(np.ceil(self.py(min(y0, y1))))
        r[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True

    # primitives ------------------------------------------------------------------------------
    def rect(self, mat: str, x0: float, y0: float, x1: float, y1: float, depth: float) -> None:
        """Axis-aligned block of `depth` cm along the beam (area-weighted edges: thin layers work)."""
        cx, wx = _cover(self.px(min(x0, x1)), self.px(max(x0, x1)), self.w)
        ry, wy = _cover(self.py(max(y0, y1)), self.py(min(y0, y1)), self.h)
        if wx.size and wy.size:
            self.map(mat)[ry:ry + wy.size, cx:cx + wx.size] += np.float32(depth) * np.outer(wy, wx)

    def patch(self, mat: str, x0: float, y1: float, t: np.ndarray) -> None:
        """Add a path-length patch (pixels) with its top-left corner at (x0, y1) in cm."""
        c, r = int(round(self.px(x0))), int(round(self.py(y1)))
        h, w = t.shape
        a0, b0 = max(r, 0), max(c, 0)
        a1, b1 = min(r + h, self.h), min(c + w, self.w)
        if a1 > a0 and b1 > b0:
            self.map(mat)[a0:a1, b0:b1] += t[a0 - r:a1 - r, b0 - c:b1 - c]

    def poly(self, mat: str, pts_cm, depth: float) -> None:
        """Filled polygon (cm vertices) of constant depth, anti-aliased."""
        p = np.array([(self.px(x), self.py(y)) for x, y in pts_cm], np.float32)
        lo = np.floor(p.min(0)).astype(int) - 1
        hi = np.ceil(p.max(0)).astype(int) + 2
        m = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
        q = np.round((p - lo) * 16).astype(np.int32)
        cv2.fillPoly(m, [q], 255, cv2.LINE_AA, shift=4)
        self.patch(mat, lo[0] / self.s - self.ox, (self.ground - lo[1]) / self.s, m.astype(np.float32) * (depth / 255.0))

    def line(self, mat: str, pts_cm, width_cm: float, depth: float) -> None:
        """Anti-aliased polyline of `width_cm`, e.g. a sheet seen edge-on (depth = its extent along the beam)."""
        p = np.array([(self.px(x), self.py(y)) for x, y in pts_cm], np.float32)
        wpx = max(1, int(round(width_cm * self.s)))
        cover = min(1.0, width_cm * self.s)          # sub-pixel sheets darken one pixel partially
        lo = np.floor(p.min(0)).astype(int) - wpx - 1
        hi = np.ceil(p.max(0)).astype(int) + wpx + 2
        m = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
        q = np.round((p - lo) * 16).astype(np.int32)
        cv2.polylines(m, [q], False, 255, wpx, cv2.LINE_AA, shift=4)
        self.patch(mat, lo[0] / self.s - self.ox, (self.ground - lo[1]) / self.s, m.astype(np.float32) * (depth * cover / 255.0))

    def ellipse(self, mat: str, cx: float, cy: float, rx: float, ry: float, depth: float,
                profile: str = "flat", inner: float = 0.0) -> None:
        """Ellipse; profile 'flat' (disc), 'cyl_v' (vertical axis, chord in x), 'cyl_h' (chord in
        y) or 'ball' (ellipsoid). `inner` > 0 removes a concentric hole (ring) of that radius fraction."""
        rxp, ryp = rx * self.s, ry * self.s
        x0, y0 = self.px(cx) - rxp, self.py(cy) - ryp
        c0, r0 = int(np.floor(x0)), int(np.floor(y0))
        xs = (np.arange(c0, int(np.ceil(x0 + 2 * rxp)) + 1, dtype=np.float32) + 0.5 - self.px(cx)) / max(rxp, 1e-3)
        ys = (np.arange(r0, int(np.ceil(y0 + 2 * ryp)) + 1, dtype=np.float32) + 0.5 - self.py(cy)) / max(ryp, 1e-3)
        d2 = ys[:, None] ** 2 + xs[None, :] ** 2
        inside = np.clip((1.0 - d2) * max(rxp, ryp) * 0.5 + 0.5, 0, 1)  # ~1 px soft edge
        if inner > 0:
            inside = inside * np.clip((d2 - inner ** 2) * max(rxp, ryp) * 0.5 + 0.5, 0, 1)
        if profile == "flat":
            t = inside
        elif profile == "cyl_v":
            t = inside * np.sqrt(np.clip(1 - xs[None, :] ** 2, 0, 1))
        elif profile == "cyl_h":
            t = inside * np.sqrt(np.clip(1 - ys[:, None] ** 2, 0, 1))
        else:
            t = np.sqrt(np.clip(1 - d2, 0, 1))
        self.patch(mat, c0 / self.s - self.ox, (self.ground - r0) / self.s, (t * depth).astype(np.float32))

    def texture(self, rng: np.random.Generator, shape: tuple[int, int], cell_px: float, amp: float) -> np.ndarray:
        """Smooth random field ~1 +- amp at the given correlation length (pixels)."""
        gh, gw = max(2, int(shape[0] / cell_px) + 2), max(2, int(shape[1] / cell_px) + 2)
        g = rng.standard_normal((gh, gw)).astype(np.float32)
        f = cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
        return np.clip(1.0 + amp * f, 0.0, None)

    def attenuation(self) -> np.ndarray:
        """A (2, H, W) float32 = sum over materials of mu * path length."""
        out = np.zeros((2, self.h, self.w), np.float32)
        for mat, t in self.maps.items():
            np.maximum(t, 0, out=t)                  # subtractive cavities may undershoot at edges
            mh, ml = physics.material(mat).mu
            cv2.scaleAdd(t, mh, out[0], out[0])
            cv2.scaleAdd(t, ml, out[1], out[1])
        return out


@dataclass
class DetectorModel:
    """Linac line-scanner artefacts (set any to 0 to switch it off)."""
    i0: float = physics.I0_DEFAULT
    psf_sigma: float = 0.8           # detector + focal spot blur, pixels
    dose_jitter: float = 0.012       # per-pulse (per-column) dose fluctuation, relative
    row_gain: float = 0.006          # residual per-detector gain after flat-field, relative
    read_noise: float = 3.0          # counts
    dead_rows: int = 2               # at most this many dead detector rows
    hot_rows: int = 1
    speed_var: float = 0.12          # relative truck speed variation (horizontal stretch)


def speed_resample(width: int, rng: np.random.Generator, var: float) -> np.ndarray:
    """Source column (float) for each output column when the truck speed varies smoothly."""
    if var <= 0:
        return np.arange(width, dtype=np.float32)
    knots = max(3, width // 400)
    v = 1.0 + var * np.clip(rng.standard_normal(knots), -2, 2)
    speed = np.interp(np.linspace(0, knots - 1, width), np.arange(knots), v)
    speed *= width / speed.sum()                # same mean length; columns move by the speed
    src = np.concatenate([[0.0], np.cumsum(speed)[:-1]])
    return np.clip(src, 0, width - 1).astype(np.float32)


def resample_columns(a: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Linear interpolation of the last axis at float positions `src`."""
    H = a.shape[-2]
    mx = np.ascontiguousarray(np.broadcast_to(src.astype(np.float32)[None, :], (H, src.size)))
    my = np.ascontiguousarray(np.broadcast_to(np.arange(H, dtype=np.float32)[:, None], (H, src.size)))
    planes = a.reshape(-1, H, a.shape[-1])
    out = np.stack([cv2.remap(np.ascontiguousarray(p), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                    for p in planes])
    return out.reshape(a.shape[:-1] + (src.size,))


def detect(att: np.ndarray, rng: np.random.Generator, model: DetectorModel | None = None) -> np.ndarray:
    """Noise-free attenuation (C, H, W) -> uint16 counts with blur, gains, jitter, noise, bad rows."""
    m = model or DetectorModel()
    C, H, W = att.shape
    dose = 1.0 + m.dose_jitter * rng.standard_normal((C, 1, W)).astype(np.float32)
    gain = 1.0 + m.row_gain * rng.standard_normal((1, H, 1)).astype(np.float32)
    z = rng.standard_normal((C, H, W), dtype=np.float32)
    n_dead, n_hot = rng.integers(0, m.dead_rows + 1), rng.integers(0, m.hot_rows + 1)
    bad = rng.choice(H, size=n_dead + n_hot, replace=False)
    hot_level = rng.uniform(0.3, 0.9)
    out = np.empty((C, H, W), np.uint16)
    for c in range(C):
        t = cv2.exp(-att[c])
        if m.psf_sigma > 0:
            t = cv2.GaussianBlur(t, (0, 0), m.psf_sigma)
        mean = t * (np.float32(m.i0) * dose[c]) * gain[0]
        noisy = mean + z[c] * cv2.sqrt(mean + np.float32(m.read_noise ** 2))
        noisy[bad[:n_dead]] *= 0.02
        noisy[bad[n_dead:]] = np.maximum(noisy[bad[n_dead:]], hot_level * m.i0)
        np.clip(noisy, 0, 65535, out=noisy)
        out[c] = noisy + 0.5                     # round half up (values are >= 0)
    return out

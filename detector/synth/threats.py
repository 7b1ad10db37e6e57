"""The parametric threat library: physical shapes (cm) and materials -> own attenuation (2, h, w).

Each builder draws on a small Canvas sized to the object, so the same threat renders correctly at
any pixel pitch (the generator's 5 mm, or a training crop's pitch).
"""
from __future__ import annotations

import numpy as np

from detector.synth.render import Canvas

PAD_CM = 1.0


def _canvas(w_cm: float, h_cm: float, pitch_mm: float) -> Canvas:
    s = 10.0 / pitch_mm
    h, w = int(np.ceil((h_cm + 2 * PAD_CM) * s)) + 1, int(np.ceil((w_cm + 2 * PAD_CM) * s)) + 1
    return Canvas(h, w, pitch_mm, ground_row=h - PAD_CM * s)


def _shift(pts, dx: float, dy: float, flip: bool, length: float):
    return [((length - x if flip else x) + dx, y + dy) for x, y in pts]


def firearm(rng: np.random.Generator, pitch_mm: float) -> Canvas:
    """Pistol or rifle side view: steel slide/barrel/receiver, polymer or wood grip/stock."""
    rifle = rng.random() < 0.35
    flip = rng.random() < 0.5
    if rifle:
        L, Hh = rng.uniform(75, 100), rng.uniform(18, 24)
        cv = _canvas(L, Hh, pitch_mm)
        o = PAD_CM
        recv = [(25, Hh - 9), (60, Hh - 9), (60, Hh - 3), (25, Hh - 3)]
        barrel = [(60, Hh - 6.5), (L, Hh - 6.5), (L, Hh - 4.5), (60, Hh - 4.5)]
        mag = [(45, Hh - 9), (52, Hh - 9), (50, 1), (44, 2)]
        stock = [(0, Hh - 14), (25, Hh - 8), (25, Hh - 3), (0, Hh - 2)]
        grip = [(30, Hh - 9), (36, Hh - 9), (33, Hh - 17), (28, Hh - 17)]
        for pts, mat, d in ((recv, "steel", 3.5), (barrel, "steel", 2.2), (mag, "steel", 2.5),
                            (stock, "wood", 4.0), (grip, "plastic", 3.0)):
            cv.poly(mat, _shift(pts, o, o, flip, L), d)
        return cv
    L, Hh = rng.uniform(17, 23), rng.uniform(12, 15)
    cv = _canvas(L, Hh, pitch_mm)
    o = PAD_CM
    slide = [(0, Hh - 3.2), (L, Hh - 3.2), (L, Hh), (0, Hh)]
    frame = [(1, Hh - 5), (L * 0.75, Hh - 5), (L * 0.75, Hh - 3.2), (1, Hh - 3.2)]
    grip = [(0.5, Hh - 5), (5.5, Hh - 5), (4.0, 0), (-1.0, 0.5)]
    cv.poly("steel", _shift(slide, o, o, flip, L), 2.6)
    cv.poly("steel", _shift(frame, o, o, flip, L), 2.4)
    cv.poly("plastic" if rng.random() < 0.5 else "steel", _shift(grip, o + 0.5, o, flip, L), 2.8)
    cv.poly("steel", _shift([(2, 1), (5, 1), (4.5, Hh - 5), (2.5, Hh - 5)], o, o, flip, L), 1.2)  # magazine
    gx = L - 12 if flip else 10
    cv.ellipse("steel", gx + o, Hh - 6 + o, 2.4, 1.6, 0.8, inner=0.7)  # trigger guard
    return cv


def narcotics(rng: np.random.Generator, pitch_mm: float, rows: int | None = None,
              cols: int | None = None, max_depth: float | None = None) -> Canvas:
    """Stacked pressed bricks (~1 kg each), several deep along the beam, wrapped (seams visible); `max_depth`
    (cm along the beam) keeps them inside a container no deeper (a fuel tank)."""
    bw, bh = rng.uniform(22, 32), rng.uniform(5, 10)
    rows = rows or int(rng.integers(2, 9))
    cols = cols or int(rng.integers(1, 5))
    cv = _canvas(cols * bw, rows * bh, pitch_mm)
    for r in range(rows):
        for c in range(cols):
            deep = rng.integers(1, 5) * rng.uniform(15, 22)
            deep = deep if max_depth is None else min(deep, max_depth)
            x0, y0 = PAD_CM + c * bw + 0.4, PAD_CM + r * bh + 0.3
            cv.rect("cocaine", x0, y0, x0 + bw - 0.8, y0 + bh - 0.6, deep)
            cv.rect("plastic", x0 - 0.3, y0 - 0.2, x0 + bw - 0.5, y0 + bh - 0.4, 0.6)  # wrapping
    return cv


def false_wall(rng: np.random.Generator, pitch_mm: float) -> Canvas:
    """A false front wall: steel sheet parallel to the beam plus a frame, hiding a compartment of goods."""
    cw, ch = rng.uniform(30, 80), rng.uniform(120, 230)
    cv = _canvas(cw + 4, ch, pitch_mm)
    o = PAD_CM
    width = rng.uniform(200, 235)              # the beam crosses the whole container width
    cv.rect("steel", o + cw, o, o + cw + 0.3, o + ch, width)          # the sheet, edge-on
    for y in np.arange(0, ch, rng.uniform(40, 70)):                     # horizontal frame rails
        cv.rect("steel", o, o + y, o + cw + 0.3, o + y + 0.5, 4.0)
    goods = "cocaine" if rng.random() < 0.6 else str(rng.choice(["plastic", "paper", "steel"]))
    fill = rng.uniform(0.3, 0.8) * width * (0.03 if goods == "steel" else 1.0)
    for y in np.arange(2, ch - 10, rng.uniform(12, 25)):
        cv.rect(goods, o + 1, o + y, o + cw - 1, o + y + rng.uniform(8, 20), fill * rng.uniform(0.6, 1.0))
    return cv


def shielded_block(rng: np.random.Generator, pitch_mm: float) -> Canvas:
    """A lead-walled box (radioactive-source shielding): thick walls, cavity inside."""
    W, H, D = rng.uniform(15, 40), rng.uniform(15, 40), rng.uniform(15, 40)
    wall = rng.uniform(3, 8)
    mat = "lead" if rng.random() < 0.8 else "steel"
    cv = _canvas(W, H, pitch_mm)
    o = PAD_CM
    cv.rect(mat, o, o, o + W, o + H, D)
    cv.rect(mat, o + wall, o + wall, o + W - wall, o + H - wall, -(D - 2 * wall))
    return cv


def small_metal(rng: np.random.Generator, pitch_mm: float) -> Canvas:
    """A small dense item under 20 px at 5 mm: knife, ammunition box, detonator, gun part."""
    L, Hh = rng.uniform(3, 9), rng.uniform(2, 6)
    cv = _canvas(L, Hh, pitch_mm)
    mat = str(rng.choice(["steel", "steel", "copper", "lead"]))
    if rng.random() < 0.5:
        cv.rect(mat, PAD_CM, PAD_CM, PAD_CM + L, PAD_CM + Hh, rng.uniform(2, 6))
    else:
        cv.ellipse(mat, PAD_CM + L / 2, PAD_CM + Hh / 2, L / 2, Hh / 2, rng.uniform(3, 6), profile="ball")
    return cv


BUILDERS = {"firearm": firearm, "narcotics": narcotics, "false_wall": false_wall,
            "shielded_block": shielded_block, "small_metal": small_metal}


def build_threat(rng: np.random.Generator, kind: str, pitch_mm: float = 5.0) -> np.ndarray:
    """Own attenuation (2, h, w) float32 of one threat of `kind` at `pitch_mm`."""
    cv = BUILDERS[kind](rng, pitch_mm)
    att = cv.attenuation()
    return np.clip(att, 0, None)

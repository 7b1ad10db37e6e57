"""Cargo classes packed into a bay: palletised cartons, bulk sacks, machinery, drums/IBCs of
liquid, textiles, electronics, vehicles, mixed, empty. Path lengths are along the beam (the bay's
depth), so e.g. two pallets side by side or four drums across the width add up."""
from __future__ import annotations

import numpy as np

from detector.synth.render import Canvas
from detector.synth.vehicles import Bay

CARGOS = ("palletised", "bulk_sacks", "machinery", "liquid_drums", "textiles", "electronics",
          "vehicles", "mixed", "empty")


def _pallet(cv: Canvas, x0: float, x1: float, y: float, depth: float) -> None:
    cv.rect("wood", x0, y + 11, x1, y + 13.5, depth * 0.55)                    # top deck boards
    cv.rect("wood", x0, y, x1, y + 2.2, depth * 0.35)                          # bottom boards
    for bx in (x0, (x0 + x1) / 2 - 5, x1 - 10):                                # blocks
        cv.rect("wood", bx, y + 2.2, bx + 10, y + 11, depth * 0.3)


def palletised(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Pallets of cartons; each carton column holds goods of one kind with internal clutter."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    x = x0 + rng.uniform(0, 8)
    goods = ["paper", "food", "plastic", "water", "glass", "food"]
    while x < x1 - 60:
        pl = min(rng.choice([100.0, 120.0]), x1 - x)
        _pallet(cv, x, x + pl, b.y0, b.depth)
        top = b.y0 + 13.5 + rng.uniform(0.35, 0.97) * (b.y1 - b.y0 - 14)
        mat = str(rng.choice(goods))
        cw, ch = rng.uniform(25, 60), rng.uniform(18, 45)
        frac = rng.uniform(0.08, 0.45) * (0.4 if mat == "glass" else 1.0)
        tex = cv.texture(rng, (max(2, int((top - b.y0) * cv.s)), max(2, int(pl * cv.s))), 20, 0.25)
        cv.patch(mat, x, top, tex * (b.depth * frac))
        for cx in np.arange(x, x + pl - 5, cw):                                 # carton walls
            cv.rect("paper", cx, b.y0 + 13.5, cx + 0.5, top, b.depth * 0.8)
        for cy in np.arange(b.y0 + 13.5, top, ch):
            cv.rect("paper", x, cy, x + pl, cy + 0.5, b.depth * 0.8)
        for _ in range(int(rng.integers(0, 12))):                                # clutter inside
            ox, oy = rng.uniform(x, x + pl - 10), rng.uniform(b.y0 + 15, max(b.y0 + 16, top - 10))
            m = str(rng.choice(["steel", "aluminium", "glass", "water", "plastic"]))
            r = rng.uniform(2, 8)
            cv.ellipse(m, ox, oy, r, r * rng.uniform(0.5, 2), rng.uniform(5, 40) * (0.1 if m == "steel" else 1),
                       profile="ball")
        x += pl + rng.uniform(1, 12)


def bulk_sacks(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Rounded sacks (grain, sugar, fertiliser) stacked in a brick pattern."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    sw, sh = rng.uniform(70, 100), rng.uniform(25, 40)
    top = b.y0 + rng.uniform(0.5, 0.95) * (b.y1 - b.y0)
    mat = str(rng.choice(["food", "food", "plastic", "glass"]))
    fill = rng.uniform(0.5, 0.8) * (0.3 if mat == "glass" else 1.0)
    for i, y in enumerate(np.arange(b.y0 + sh / 2, top - sh / 2, sh * 0.85)):
        off = (i % 2) * sw / 2
        for x in np.arange(x0 + sw / 2 - off, x1 - sw / 2, sw * 0.95):
            if x > x0 + sw * 0.4:
                cv.ellipse(mat, x + rng.uniform(-3, 3), y, sw / 2, sh / 2, b.depth * fill, profile="ball")


def machinery(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Crated machines: engine blocks, gears, motors, steel frames on wooden skids."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    x = x0 + rng.uniform(5, 40)
    while x < x1 - 80:
        w = min(rng.uniform(80, 220), x1 - x - 5)
        h = min(rng.uniform(60, 180), b.y1 - b.y0 - 20)
        y = b.y0 + 12
        cv.rect("wood", x, b.y0, x + w, y, b.depth * 0.3)                       # skid
        kind = rng.integers(4)
        if kind == 0:                                                             # engine / gearbox block
            cv.rect("steel", x + 5, y, x + w - 5, y + h, rng.uniform(20, 60) * 0.35)
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = rng.uniform(x + 15, x + w - 15), rng.uniform(y + 10, y + h - 10)
                cv.ellipse("steel", cx, cy, 8, 8, -10.0)                          # bores
        elif kind == 1:                                                           # gears / flywheels
            r = min(w, h) / 2 - 2
            cv.ellipse("steel", x + w / 2, y + r, r, r, rng.uniform(5, 20), inner=0.3)
            cv.ellipse("steel", x + w / 2, y + r, r * 0.2, r * 0.2, 40.0)
        elif kind == 2:                                                           # motor: copper + steel
            cv.ellipse("steel", x + w / 2, y + h / 2, w / 2 - 3, h / 2, rng.uniform(40, 90), profile="cyl_h")
            cv.ellipse("copper", x + w / 2, y + h / 2, w / 2 - 15, h / 3, 20.0, profile="cyl_h")
        else:                                                                     # welded frame
            for yy in (y, y + h - 8):
                cv.rect("steel", x, yy, x + w, yy + 8, 2.0)
            for xx in np.linspace(x, x + w - 8, int(rng.integers(2, 5))):
                cv.rect("steel", xx, y, xx + 8, y + h, 2.0)
            cv.rect("steel", x + 10, y + 8, x + w - 10, y + h - 8, rng.uniform(0.5, 3))
        cv.rect("wood", x - 2, y, x, y + h + 5, b.depth * 0.02)                   # crate sides
        cv.rect("wood", x + w, y, x + w + 2, y + h + 5, b.depth * 0.02)
        x += w + rng.uniform(10, 80)


def liquid_drums(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """200 l steel/plastic drums (4 across the width, 1-2 tiers) or 1000 l IBCs in steel cages."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    liquid = str(rng.choice(["water", "diesel", "water"]))
    if rng.random() < 0.6:
        shell = "steel" if rng.random() < 0.6 else "plastic"
        tiers = 2 if b.y1 - b.y0 > 210 else 1
        for t in range(tiers):
            y = b.y0 + 14 + t * 102
            for x in np.arange(x0 + 2, x1 - 120, 120):
                _pallet(cv, x, x + 118, y - 14, b.depth)
                for dx in (29, 89):
                    lvl = rng.uniform(0.7, 0.95)
                    cv.ellipse(liquid, x + dx, y + 44 * lvl, 28, 44 * lvl, 4 * 56.0 * 0.5, profile="cyl_v")
                    cv.rect(liquid, x + dx - 28, y, x + dx + 28, y + 88 * lvl, 4 * 56 * 0.5 * 0.2)
                    cv.ellipse(shell, x + dx, y + 44, 28.6, 44, 4 * 2 * (0.12 if shell == "steel" else 0.4), profile="cyl_v")
                    for hy in (30, 58):
                        cv.rect(shell, x + dx - 28, y + hy, x + dx + 28, y + hy + 1.5, 4 * 1.0)
    else:
        for x in np.arange(x0 + 2, x1 - 120, 122):
            _pallet(cv, x, x + 120, b.y0, b.depth)
            y = b.y0 + 14
            lvl = rng.uniform(0.4, 0.95)
            cv.rect(liquid, x + 3, y, x + 117, y + 110 * lvl, 2 * 100.0)
            cv.rect("plastic", x + 2, y, x + 118, y + 112, 2 * 2 * 0.2)
            for gx in np.arange(x, x + 121, 15):                                  # cage
                cv.rect("steel", gx, y, gx + 2, y + 114, 2 * 2 * 0.4)
            for gy in np.arange(y, y + 115, 20):
                cv.rect("steel", x, gy, x + 120, gy + 2, 2 * 0.8 + 100 * 0.02)


def textiles(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Compressed bales (cotton, clothing) with steel straps."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    bw, bh = rng.uniform(80, 120), rng.uniform(40, 70)
    top = b.y0 + rng.uniform(0.6, 0.97) * (b.y1 - b.y0)
    for y in np.arange(b.y0, top - bh, bh + 1):
        for x in np.arange(x0, x1 - bw, bw + rng.uniform(0, 4)):
            tex = cv.texture(rng, (max(2, int(bh * cv.s)), max(2, int(bw * cv.s))), 4, 0.15)
            cv.patch("textile", x, y + bh, tex * (b.depth * rng.uniform(0.4, 0.8)))
            for sx in np.linspace(x + 15, x + bw - 15, 3):
                cv.rect("steel", sx, y, sx + 1.2, y + bh, 2 * 0.1 + 0.05)


def electronics(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Cartons of appliances: steel cases (edges bright), PCBs, transformers, batteries, foam."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    uw, uh = rng.uniform(35, 70), rng.uniform(25, 60)
    top = b.y0 + rng.uniform(0.5, 0.95) * (b.y1 - b.y0)
    n_across = int(b.depth // 60)
    for y in np.arange(b.y0 + 14, top - uh, uh + 2):
        for x in np.arange(x0, x1 - uw, uw + 2):
            cv.rect("plastic", x, y, x + uw, y + uh, b.depth * 0.05)             # foam + carton
            cv.rect("steel", x + 3, y + 3, x + uw - 3, y + uh - 3, n_across * 2 * 0.08)
            for e in (y + 3, y + uh - 3.5):                                       # case edges along the beam
                cv.rect("steel", x + 3, e, x + uw - 3, e + 0.5, n_across * 40 * 0.1)
            cx = x + rng.uniform(8, uw - 15)
            cv.rect("steel", cx, y + 5, cx + 8, y + 13, n_across * 6.0 * 0.6)     # transformer / motor
            cv.rect("copper", cx + 2, y + 7, cx + 6, y + 11, n_across * 3.0)
            cv.rect("glass", x + 6, y + uh - 12, x + uw - 6, y + uh - 10, n_across * 25 * 0.3)  # PCB
        if rng.random() < 0.3:
            break


def vehicles(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Cars: body shell (roof/sills bright), engine block, wheels, seats, glass."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    x = x0 + rng.uniform(10, 40)
    while x < x1 - 380:
        L, H = rng.uniform(380, 470), min(rng.uniform(140, 170), b.y1 - b.y0 - 5)
        y, r = b.y0 + 2, 31.0
        body = [(x, y + 35), (x + 5, y + 75), (x + L * 0.22, y + 85), (x + L * 0.35, y + H),
                (x + L * 0.75, y + H), (x + L * 0.9, y + 85), (x + L, y + 80), (x + L, y + 35)]
        cv.poly("steel", body, 2 * 0.08)
        cv.line("steel", body + [body[0]], 0.5, 170 * 0.04)
        cv.poly("glass", [(x + L * 0.28, y + 87), (x + L * 0.36, y + H - 5), (x + L * 0.72, y + H - 5), (x + L * 0.85, y + 87)], 2 * 0.4)
        cv.rect("steel", x + 20, y + 32, x + 110, y + 78, 55 * 0.3)             # engine
        cv.rect("aluminium", x + 15, y + 60, x + 115, y + 78, 60 * 0.2)
        for sx in (x + L * 0.45, x + L * 0.65):                                  # seats
            cv.poly("plastic", [(sx, y + 40), (sx + 45, y + 40), (sx + 50, y + 110), (sx + 40, y + 112), (sx + 35, y + 55), (sx, y + 55)], 120 * 0.15)
            cv.rect("steel", sx + 5, y + 30, sx + 40, y + 40, 6.0)
        for wx in (x + 70, x + L - 75):
            cv.ellipse("rubber", wx, y + r, r, r, 2 * 18.0, inner=0.6)
            cv.ellipse("aluminium", wx, y + r, r * 0.6, r * 0.6, 2 * 3.0, inner=0.2)
            cv.ellipse("steel", wx, y + r, r * 0.35, r * 0.35, 2 * 6.0)       # brake discs
        cv.rect("steel", x + 60, y + 20, x + L - 60, y + 30, 2 * 1.0 + 4)        # floor pan, exhaust
        x += L + rng.uniform(15, 60)


def mixed(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Consolidated load: 2-4 sections of different cargo classes."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    cuts = np.sort(rng.uniform(x0, x1, int(rng.integers(1, 4))))
    edges = [x0, *cuts, x1]
    for a, c in zip(edges[:-1], edges[1:]):
        if c - a > 130:
            kind = str(rng.choice(["palletised", "bulk_sacks", "machinery", "liquid_drums", "textiles", "electronics"]))
            FILL[kind](cv, b, rng, a, c)


def empty(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Nothing but perhaps dunnage and lashing straps."""
    for _ in range(int(rng.integers(0, 3))):
        x = rng.uniform(b.x0, b.x1 - 20)
        cv.rect("wood", x, b.y0, x + 10, b.y0 + 10, b.depth * 0.3)


FILL = {"palletised": palletised, "bulk_sacks": bulk_sacks, "machinery": machinery,
        "liquid_drums": liquid_drums, "textiles": textiles, "electronics": electronics,
        "vehicles": vehicles, "mixed": mixed, "empty": empty}


def fill(cv: Canvas, b: Bay, kind: str, rng: np.random.Generator) -> None:
    """Pack the bay with one cargo class."""
    if kind not in FILL:
        raise ValueError(f"unknown cargo {kind!r}; known: {', '.join(CARGOS)}")
    FILL[kind](cv, b, rng)

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


def _goods_tex(cv: Canvas, rng: np.random.Generator, w: float, h: float, mat: str) -> np.ndarray:
    """Density field of a carton's contents: fine grain plus, for bottled/canned goods, rows of
    containers (bright gaps between them), for bulk goods coarse settling."""
    t = cv.tex(rng, w, h, rng.uniform(1.5, 4), 0.12) * cv.tex(rng, w, h, rng.uniform(8, 20), 0.12)
    if mat in ("water", "glass", "plastic") and rng.random() < 0.7:      # bottles / cans side by side
        pitch = rng.uniform(6, 12)
        n = max(1, int(w / pitch))
        xs = (np.arange(t.shape[1], dtype=np.float32) + 0.5) / t.shape[1] * n % 1.0
        t = t * (0.35 + 0.9 * np.sqrt(np.clip(1 - (2 * xs - 1) ** 2, 0, 1)))[None, :]
        if rng.random() < 0.6:                                           # layers with a divider
            ys = (np.arange(t.shape[0], dtype=np.float32) + 0.5) / t.shape[0] * max(1, int(h / rng.uniform(15, 30))) % 1.0
            t = t * np.where(np.abs(ys - 0.5) > 0.46, 0.4, 1.0)[:, None]
    return t.astype(np.float32)


def _carton(cv: Canvas, rng: np.random.Generator, x: float, y: float, w: float, h: float, depth: float,
            mat: str, frac: float, tilt: float = 0.0) -> None:
    """One carton: cardboard walls, goods of uneven density inside, sometimes an item of clutter."""
    if tilt:
        c, s = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
        pts = [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        cv.poly(mat, pts, depth * frac, tex=_goods_tex(cv, rng, w, h, mat))
        cv.line("paper", pts + [pts[0]], 0.6, depth * 0.5)
        return
    cv.rect(mat, x + 0.5, y + 0.5, x + w - 0.5, y + h - 0.5, depth * frac, tex=_goods_tex(cv, rng, w, h, mat))
    cv.rect("paper", x, y, x + 0.6, y + h, depth * 0.6)                      # walls along the beam
    cv.rect("paper", x + w - 0.6, y, x + w, y + h, depth * 0.6)
    cv.rect("paper", x, y + h - 0.6, x + w, y + h, depth * 0.6)
    if rng.random() < 0.25:                                                  # something denser inside
        m = str(rng.choice(["steel", "aluminium", "glass", "water", "plastic"]))
        r = rng.uniform(2, min(w, h) / 3)
        cv.ellipse(m, x + rng.uniform(r, w - r), y + rng.uniform(r, h - r), r, r * rng.uniform(0.5, 1.5),
                   rng.uniform(5, 40) * (0.15 if m in ("steel", "glass") else 1), profile="ball")


def palletised(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Pallets of cartons: stacks of uneven height with gaps, missing and tilted cartons; goods of
    one kind per pallet with their own density texture."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    x = x0 + rng.uniform(0, 8)
    goods = ["paper", "food", "plastic", "water", "glass", "food", "textile"]
    while x < x1 - 60:
        pl = min(rng.choice([100.0, 120.0]), x1 - x)
        _pallet(cv, x, x + pl, b.y0, b.depth)
        mat = str(rng.choice(goods))
        frac = rng.uniform(0.15, 0.6) * (0.35 if mat == "glass" else 1.0)
        cw, ch = rng.uniform(25, 60), rng.uniform(18, 45)
        n_col = max(1, int(pl // cw))
        cw = pl / n_col
        full = rng.uniform(0.35, 0.97) * (b.y1 - b.y0 - 14)
        for k in range(n_col):
            top = b.y0 + 13.5 + full * rng.uniform(0.6, 1.0) if rng.random() < 0.35 else b.y0 + 13.5 + full
            y = b.y0 + 13.5
            while y + ch <= top:
                if rng.random() > 0.06:                                      # a missing carton
                    f = frac * rng.uniform(0.8, 1.2)
                    tilt = rng.uniform(-12, 12) if y + 2 * ch > top and rng.random() < 0.2 else 0.0
                    _carton(cv, rng, x + k * cw + 0.3, y, cw - 0.6, ch - 0.3, b.depth, mat, f, tilt)
                y += ch
        if rng.random() < 0.5:                                               # shrink wrap / straps
            cv.rect("plastic", x, b.y0 + 13.5, x + pl, b.y0 + 13.5 + full, 2 * 0.05)
        x += pl + rng.uniform(1, 25) * (3 if rng.random() < 0.15 else 1)


def bulk_sacks(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Sacks (grain, sugar, fertiliser) of uneven size and slump, loosely stacked, overlapping."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    sw, sh = rng.uniform(70, 100), rng.uniform(25, 40)
    top = b.y0 + rng.uniform(0.5, 0.95) * (b.y1 - b.y0)
    mat = str(rng.choice(["food", "food", "plastic", "glass"]))
    fill = rng.uniform(0.3, 0.55) * (0.3 if mat == "glass" else 1.0)
    for x in np.arange(x0, x1 - 100, 120):                                   # on pallets
        _pallet(cv, x, x + 118, b.y0, b.depth)
    for i, y in enumerate(np.arange(b.y0 + 14 + sh / 2, top - sh / 2, sh * 0.8)):
        off = (i % 2) * sw / 2 + rng.uniform(-10, 10)
        for x in np.arange(x0 + sw / 2 - off, x1 - sw * 0.6, sw * rng.uniform(0.85, 0.95)):
            if x > x0 + sw * 0.4 and rng.random() > 0.04:
                w, h = sw * rng.uniform(0.95, 1.15) / 2, sh * rng.uniform(0.9, 1.2) / 2
                cv.ellipse(mat, x + rng.uniform(-4, 4), y + rng.uniform(-2, 2), w, h, b.depth * fill,
                           profile="cyl_h", angle=rng.uniform(-6, 6), tex=cv.tex(rng, 2 * w, 2 * h, 6, 0.2))


def machinery(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Crated machines on skids: cast housings with internal parts, gears, motors (steel +
    copper windings), welded frames with parts bolted on."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    x = x0 + rng.uniform(5, 40)
    while x < x1 - 80:
        w = min(rng.uniform(80, 220), x1 - x - 5)
        h = min(rng.uniform(60, 180), b.y1 - b.y0 - 20)
        y = b.y0 + 12
        cv.rect("wood", x, b.y0, x + w, y, b.depth * 0.3)                       # skid
        kind = rng.integers(4)
        if kind == 0:                                                             # housing with internals
            cv.rect("steel", x + 5, y, x + w - 5, y + h, rng.uniform(4, 12), tex=cv.tex(rng, w, h, 10, 0.15))
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = rng.uniform(x + 15, x + w - 15), rng.uniform(y + 10, y + h - 10)
                rr = rng.uniform(4, 15)
                cv.ellipse("steel", cx, cy, rr, rr, -rng.uniform(2, 4))           # bores
                cv.ellipse("steel", cx, cy, rr * 0.4, rr * 0.4, rng.uniform(10, 30), profile="ball")  # shafts
            cv.rect("steel", x + 10, y + h * 0.45, x + w - 10, y + h * 0.45 + 3, 20.0)  # main shaft
        elif kind == 1:                                                           # gears / flywheels
            r = min(w, h) / 2 - 2
            cv.ellipse("steel", x + w / 2, y + r, r, r, rng.uniform(3, 10), inner=0.3)
            cv.ellipse("steel", x + w / 2, y + r, r * 1.02, r * 1.02, rng.uniform(2, 5), inner=0.9)  # teeth rim
            cv.ellipse("steel", x + w / 2, y + r, r * 0.2, r * 0.2, 25.0, profile="ball")
        elif kind == 2:                                                           # motor: copper + steel
            cv.ellipse("steel", x + w / 2, y + h / 2, w / 2 - 3, h / 2, rng.uniform(8, 20), profile="cyl_h",
                       tex=cv.tex(rng, w, h, 6, 0.1))
            cv.ellipse("copper", x + w / 2, y + h / 2, w / 2 - 15, h / 3, 6.0, profile="cyl_h")
            cv.rect("steel", x - 5, y + h / 2 - 2, x + w + 5, y + h / 2 + 2, 8.0)     # rotor shaft
        else:                                                                     # welded frame + parts
            for yy in (y, y + h - 8):
                cv.rect("steel", x, yy, x + w, yy + 8, 2.0)
            for xx in np.linspace(x, x + w - 8, int(rng.integers(2, 5))):
                cv.rect("steel", xx, y, xx + 8, y + h, 2.0)
            cv.rect("steel", x + 10, y + 8, x + w - 10, y + h - 8, rng.uniform(0.5, 3))
            for _ in range(int(rng.integers(2, 8))):
                px, py = rng.uniform(x + 5, x + w - 25), rng.uniform(y + 8, y + h - 20)
                cv.rect(str(rng.choice(["steel", "aluminium", "copper"])), px, py, px + rng.uniform(5, 20),
                        py + rng.uniform(5, 20), rng.uniform(2, 15))
        cv.rect("wood", x - 2, y, x, y + h + 5, b.depth * 0.02)                   # crate sides
        cv.rect("wood", x + w, y, x + w + 2, y + h + 5, b.depth * 0.02)
        cv.rect("wood", x - 2, y + h + 3, x + w + 2, y + h + 5, b.depth * 0.02)
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
                if t and rng.random() < 0.2:                                      # upper tier not full
                    continue
                _pallet(cv, x, x + 118, y - 14, b.depth)
                for dx in (29, 89):
                    n = int(rng.integers(1, 5))                                   # drums across the width
                    lvl = rng.uniform(0.5, 0.95)
                    cv.ellipse(liquid, x + dx, y + 44 * lvl, 28, 44 * lvl, n * 56.0 * 0.5, profile="cyl_v")
                    cv.rect(liquid, x + dx - 28, y, x + dx + 28, y + 88 * lvl, n * 56 * 0.5 * 0.2)
                    cv.ellipse(shell, x + dx, y + 44, 28.6, 44, n * 2 * (0.12 if shell == "steel" else 0.4), profile="cyl_v")
                    for hy in (30, 58):
                        cv.rect(shell, x + dx - 28, y + hy, x + dx + 28, y + hy + 1.5, n * 1.0)
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
    """Compressed bales (cotton, clothing) with steel straps, unevenly stacked, some tipped over."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    bw, bh = rng.uniform(80, 120), rng.uniform(40, 70)
    top = b.y0 + rng.uniform(0.6, 0.97) * (b.y1 - b.y0)
    for y in np.arange(b.y0, top - bh, bh + 1):
        for x in np.arange(x0, x1 - bw, bw + rng.uniform(0, 6)):
            if rng.random() < 0.07:
                continue
            w, h = bw * rng.uniform(0.9, 1.05), bh * rng.uniform(0.9, 1.05)
            d = b.depth * rng.uniform(0.4, 0.8)
            tex = cv.tex(rng, w, h, rng.uniform(3, 8), 0.2)
            tilt = rng.uniform(-6, 6) if rng.random() < 0.2 else 0.0
            c, s_ = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
            pts = [(x + dx * c - dy * s_, y + dx * s_ + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
            cv.poly("textile", pts, d, tex=tex)
            for sx in np.linspace(x + 15, x + w - 15, 3):
                cv.line("steel", [(sx, y), (sx - s_ * h, y + c * h)], 1.2, 2 * 0.1 + 0.05)

def electronics(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Cartons of appliances in uneven stacks: steel cases (edges along the beam dark), motors and
    transformers, copper windings, PCBs, cables, foam; a few cartons missing or shifted."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    n_across = max(1, int(b.depth // 60))
    x = x0 + rng.uniform(0, 10)
    while x < x1 - 40:
        uw, uh = rng.uniform(35, 75), rng.uniform(25, 60)                     # one product per stack
        top = b.y0 + rng.uniform(0.4, 0.97) * (b.y1 - b.y0)
        case = rng.uniform(0.05, 0.12)
        y = b.y0 + 14 + (0 if rng.random() < 0.5 else -13.5)
        if y > b.y0:
            _pallet(cv, x, x + uw, b.y0, b.depth)
        while y + uh < top:
            if rng.random() < 0.08:
                y += uh + 1
                continue
            xx = x + rng.uniform(-2, 2)
            cv.rect("paper", xx, y, xx + uw, y + uh, b.depth * 0.04)
            cv.rect("plastic", xx + 1, y + 1, xx + uw - 1, y + uh - 1, b.depth * 0.03,
                    tex=cv.tex(rng, uw, uh, 4, 0.3))                             # foam
            cv.rect("steel", xx + 3, y + 3, xx + uw - 3, y + uh - 3, n_across * 2 * case)
            for e in (y + 3, y + uh - 3.5):                                       # case edges along the beam
                cv.rect("steel", xx + 3, e, xx + uw - 3, e + 0.5, n_across * 40 * case)
            for _ in range(int(rng.integers(1, 4))):                              # motor / transformer / PSU
                cw_, ch_ = rng.uniform(5, 14), rng.uniform(5, 12)
                cx, cy = rng.uniform(xx + 4, xx + uw - 4 - cw_), rng.uniform(y + 4, y + uh - 4 - ch_)
                cv.rect("steel", cx, cy, cx + cw_, cy + ch_, n_across * rng.uniform(2, 6))
                cv.rect("copper", cx + cw_ * 0.25, cy + ch_ * 0.25, cx + cw_ * 0.75, cy + ch_ * 0.75, n_across * 2.0)
            py = y + rng.uniform(5, uh - 8)
            cv.rect("glass", xx + 6, py, xx + uw - 6, py + 1.6, n_across * 25 * 0.3)  # PCB edge-on
            cv.line("copper", [(xx + rng.uniform(5, uw - 5), y + rng.uniform(3, uh - 3)) for _ in range(3)],
                    0.5, n_across * 1.0)                                          # cable
            y += uh + rng.uniform(0.3, 2)
        x += uw + rng.uniform(1, 6) * (4 if rng.random() < 0.1 else 1)


def vehicles(cv: Canvas, b: Bay, rng: np.random.Generator, x0=None, x1=None) -> None:
    """Cars: thin body shell with pillars, doors and sills, engine block with cylinders and gearbox,
    wheels with alloy rims and brake discs, seats on steel frames, fuel tank, exhaust."""
    x0, x1 = b.x0 if x0 is None else x0, b.x1 if x1 is None else x1
    x = x0 + rng.uniform(10, 40)
    while x < x1 - 380:
        L, H = rng.uniform(380, 470), min(rng.uniform(140, 170), b.y1 - b.y0 - 5)
        y, r = b.y0 + 2, rng.uniform(29, 33)
        flip = rng.random() < 0.5                                               # loaded nose first or last
        X = (lambda u: x + L - u) if flip else (lambda u: x + u)
        body = [(X(0), y + 35), (X(5), y + 75), (X(L * 0.22), y + 85), (X(L * 0.35), y + H),
                (X(L * 0.75), y + H), (X(L * 0.9), y + 85), (X(L), y + 80), (X(L), y + 35)]
        cv.poly("steel", body, 2 * 0.25, tex=cv.tex(rng, L, H, 30, 0.2))        # skins, door frames, trim
        cv.poly("plastic", body, 170 * 0.03, tex=cv.tex(rng, L, H, 10, 0.3))
        cv.line("steel", body + [body[0]], 0.6, 170 * 0.04)
        cv.poly("glass", [(X(L * 0.28), y + 87), (X(L * 0.36), y + H - 5), (X(L * 0.72), y + H - 5),
                          (X(L * 0.85), y + 87)], 2 * 0.4)
        for u in (L * 0.37, L * 0.55, L * 0.73):                                # pillars, door edges
            cv.line("steel", [(X(u), y + 35), (X(u + 3), y + H - 3)], 2.0, 2 * 0.6)
        cv.line("steel", [(X(L * 0.2), y + 38), (X(L * 0.9), y + 38)], 3.0, 2 * 0.8)   # sills
        e0, e1 = (12, 105)
        cv.rect("aluminium", X(e1) if flip else X(e0), y + 30, X(e0) if flip else X(e1), y + 72, 50 * 0.25,
                tex=cv.tex(rng, 95, 42, 6, 0.12))                                # engine block
        for k in range(4):
            u = e0 + 12 + k * 18
            cv.rect("steel", min(X(u), X(u + 12)), y + 45, max(X(u), X(u + 12)), y + 68, 10 * 0.8)  # liners
        cv.ellipse("steel", X(e1 + 12), y + 42, 14, 16, 25 * 0.4, profile="cyl_v")  # gearbox
        cv.rect("steel", min(X(20), X(100)), y + 30, max(X(20), X(100)), y + 33, 40 * 0.5)  # subframe
        cv.ellipse("aluminium", X(8), y + 55, 4, 18, 60 * 0.3)                   # radiator
        for u in (L * 0.45, L * 0.65):                                          # seats
            cv.poly("plastic", [(X(u), y + 40), (X(u + 45), y + 40), (X(u + 50), y + 110), (X(u + 40), y + 112),
                                (X(u + 35), y + 55), (X(u), y + 55)], 120 * 0.1)
            cv.line("steel", [(X(u + 3), y + 33), (X(u + 42), y + 42), (X(u + 47), y + 105)], 1.2, 2 * 1.5)
        for u in (70, L - 75):
            wx = X(u)
            cv.ellipse("rubber", wx, y + r, r, r, 2 * 18.0, inner=0.62)
            cv.ellipse("aluminium", wx, y + r, r * 0.62, r * 0.62, 2 * 2.0, inner=0.25)
            for k in range(5):                                                  # rim spokes
                a = 2 * np.pi * k / 5
                cv.line("aluminium", [(wx + 0.2 * r * np.cos(a), y + r + 0.2 * r * np.sin(a)),
                                      (wx + 0.6 * r * np.cos(a), y + r + 0.6 * r * np.sin(a))], 3, 2 * 3.0)
            cv.ellipse("steel", wx, y + r, r * 0.45, r * 0.45, 2 * 2.5, inner=0.3)  # brake disc
            cv.ellipse("steel", wx, y + r, r * 0.2, r * 0.2, 2 * 8.0, profile="ball")  # hub
        cv.rect("steel", min(X(60), X(L - 60)), y + 20, max(X(60), X(L - 60)), y + 23, 2 * 1.0 + 4)  # floor, exhaust
        cv.rect("plastic", min(X(L * 0.68), X(L * 0.82)), y + 22, max(X(L * 0.68), X(L * 0.82)), y + 32, 60 * 0.4)  # fuel tank
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

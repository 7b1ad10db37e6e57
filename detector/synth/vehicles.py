"""Whole vehicles seen from the side: tractor + trailer with a 20/40 ft container, box truck,
flatbed, tanker. Dimensions in cm (x from the vehicle's front, y up from the ground).

`plan(rng, kind)` samples the layout (so the image size is known), `draw(cv, plan, rng)` renders
the structure and returns the cargo bay. Named regions (chassis, tyre, fuel_tank, cargo) are
marked on the canvas for anomaly placement.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detector.synth.render import Canvas

VEHICLES = ("tractor_20ft", "tractor_40ft", "box_truck", "flatbed", "tanker")
TRACK_CM = 200.0   # distance the beam travels through the vehicle's width


@dataclass
class Bay:
    """The cargo space: x0..x1 along the vehicle, y0 (floor) .. y1 (ceiling), depth along the beam."""
    x0: float
    x1: float
    y0: float
    y1: float
    depth: float
    open_top: bool = False


@dataclass
class Plan:
    kind: str
    length: float
    top: float
    p: dict = field(default_factory=dict)


def plan(rng: np.random.Generator, kind: str) -> Plan:
    """Sample the vehicle's layout (all lengths in cm)."""
    cab = rng.uniform(200, 240)
    p = {"cab": cab, "cab_h": rng.uniform(300, 370), "deck": rng.uniform(118, 135)}
    if kind.startswith("tractor"):
        L = 606.0 if kind == "tractor_20ft" else 1219.0
        p["box_h"] = 259.0 if rng.random() < 0.6 or L < 1000 else 289.0
        p["box_x"] = cab + rng.uniform(60, 110)
        p["box_len"] = L
        length = p["box_x"] + L + 20
        top = p["deck"] + p["box_h"]
    elif kind == "box_truck":
        p["deck"] = rng.uniform(105, 120)
        p["box_x"] = cab + rng.uniform(15, 30)
        p["box_len"] = rng.uniform(480, 760)
        p["box_h"] = rng.uniform(220, 255)
        length = p["box_x"] + p["box_len"] + 30
        top = p["deck"] + p["box_h"]
    elif kind == "flatbed":
        p["deck"] = rng.uniform(120, 140)
        p["box_x"] = cab + rng.uniform(15, 40)
        p["box_len"] = rng.uniform(600, 850)
        p["box_h"] = rng.uniform(150, 240)          # load height
        length = p["box_x"] + p["box_len"] + 30
        top = max(p["deck"] + p["box_h"], p["cab_h"])
    elif kind == "tanker":
        p["box_x"] = cab + rng.uniform(70, 120)
        p["box_len"] = rng.uniform(850, 1150)
        p["box_h"] = rng.uniform(180, 215)          # tank diameter
        length = p["box_x"] + p["box_len"] + 40
        top = p["deck"] + p["box_h"]
    else:
        raise ValueError(f"unknown vehicle {kind!r}; known: {', '.join(VEHICLES)}")
    return Plan(kind, length, max(top, p["cab_h"]), p)


# parts --------------------------------------------------------------------------------------
def wheel(cv: Canvas, x: float, r: float, tyres: int) -> None:
    """A wheel position (single or dual tyres on both sides): tread, sidewalls, rim, hub, axle."""
    y = r
    cv.ellipse("rubber", x, y, r, r, tyres * 24.0, inner=0.80)            # tread band
    cv.ellipse("steel", x, y, r * 0.97, r * 0.97, tyres * 0.5, inner=0.84)  # steel belts
    cv.ellipse("rubber", x, y, r * 0.80, r * 0.80, tyres * 5.0, inner=0.62)  # sidewalls
    cv.ellipse("steel", x, y, r * 0.62, r * 0.62, tyres * 3.0, inner=0.52)  # rim flange
    cv.ellipse("steel", x, y, r * 0.52, r * 0.52, tyres * 0.9)             # wheel disc
    cv.ellipse("steel", x, y, r * 0.42, r * 0.42, 6.0, inner=0.75)         # brake drum
    cv.ellipse("steel", x, y, r * 0.18, r * 0.18, 45.0, profile="ball")    # hub + axle end-on
    cv.rect("steel", x - 6, y - 5, x + 6, y + 5, TRACK_CM * 0.25)          # axle tube along the beam
    cv.mark("tyre", x - r, 0, x + r, 2 * r)


def rails(cv: Canvas, x0: float, x1: float, y0: float, h: float, rng: np.random.Generator) -> None:
    """Two C-channel chassis rails (webs thin, flanges along the beam) with cross members."""
    cv.rect("steel", x0, y0, x1, y0 + h, 2 * 0.8)
    cv.rect("steel", x0, y0, x1, y0 + 0.9, 2 * 8.0)
    cv.rect("steel", x0, y0 + h - 0.9, x1, y0 + h, 2 * 8.0)
    for x in np.arange(x0 + 40, x1 - 20, rng.uniform(90, 130)):
        cv.rect("steel", x, y0 + 2, x + 0.7, y0 + h - 2, 85.0)
    cv.mark("chassis", x0, y0 - 5, x1, y0 + h + 5)


def fuel_tank(cv: Canvas, x0: float, rng: np.random.Generator) -> None:
    """A side-mounted diesel tank (box with rounded corners), partly filled."""
    L, y0, h, d = rng.uniform(70, 130), rng.uniform(45, 60), rng.uniform(50, 65), rng.uniform(50, 65)
    lvl = rng.uniform(0.3, 0.95)
    cv.rect("diesel", x0 + 2, y0 + 1, x0 + L - 2, y0 + 1 + (h - 2) * lvl, d)
    cv.rect("steel", x0, y0, x0 + L, y0 + h, 2 * 0.3)
    cv.rect("steel", x0, y0, x0 + L, y0 + 0.3, d)
    cv.rect("steel", x0, y0 + h - 0.3, x0 + L, y0 + h, d)
    for xe in (x0, x0 + L - 0.3):
        cv.rect("steel", xe, y0, xe + 0.3, y0 + h, d)
    for xs in (x0 + 10, x0 + L - 12):                                    # mounting straps
        cv.rect("steel", xs, y0 - 2, xs + 2.5, y0 + h + 2, 2.0)
    cv.mark("fuel_tank", x0 + 2, y0 + 2, x0 + L - 2, y0 + h - 2)


def cab(cv: Canvas, P: Plan, rng: np.random.Generator) -> None:
    """Cab-over-engine cab: shell, roof and floor edges, seats, dashboard, engine, radiator."""
    c, hh = P.p["cab"], P.p["cab_h"]
    floor = rng.uniform(115, 135)
    shell = [(8, floor), (2, floor + 60), (0, hh - 70), (6, hh - 5), (20, hh), (c - 15, hh), (c, hh - 10), (c, floor)]
    cv.poly("steel", shell, 2 * 0.15)
    cv.line("steel", shell + [shell[0]], 0.3, TRACK_CM * 0.6)
    cv.poly("glass", [(3, floor + 90), (1, hh - 80), (8, hh - 40), (40, hh - 40), (40, floor + 90)], 2 * 0.6)
    cv.rect("steel", 10, floor, c - 10, floor + 4, 60.0 * 0.25)                 # floor
    for sx in (c * 0.35, c * 0.75):                                             # seats
        cv.rect("plastic", sx - 25, floor + 20, sx + 25, floor + 45, 55 * 0.3)
        cv.rect("steel", sx - 20, floor + 4, sx - 15, floor + 25, 8.0)
        cv.poly("plastic", [(sx + 18, floor + 40), (sx + 28, floor + 120), (sx + 35, floor + 118), (sx + 26, floor + 40)], 50 * 0.3)
    cv.rect("plastic", 8, floor + 60, 45, floor + 95, 180 * 0.25)               # dashboard
    cv.ellipse("steel", 45, floor + 95, 22, 8, 1.5, inner=0.8)                   # steering wheel
    if rng.random() < 0.7:                                                       # sleeper bunk
        cv.rect("plastic", c - 75, floor + 50, c - 8, floor + 65, 200 * 0.15)
    ex0 = rng.uniform(35, 70)
    cv.rect("steel", ex0, 50, ex0 + 120, floor - 5, 75 * 0.45)                  # engine block
    cv.rect("aluminium", ex0 + 10, floor - 25, ex0 + 100, floor - 5, 70 * 0.3)  # head, manifolds
    cv.rect("steel", ex0 + 120, 60, ex0 + 180, 100, 35 * 0.5)                   # gearbox
    cv.rect("aluminium", 2, 55, 12, floor - 8, 90 * 0.35)                       # radiator
    cv.rect("steel", 0, 35, 10, 60, 240 * 0.05)                                  # bumper
    cv.rect("steel", c - 5, floor, c + 15, floor + 20, 20.0)                     # air tanks, steps
    cv.ellipse("steel", c + 5, floor + 70, 8, 60, 2 * 0.5, profile="cyl_v")     # exhaust stack


def container(cv: Canvas, x0: float, y0: float, L: float, H: float, rng: np.random.Generator) -> Bay:
    """ISO container: corrugated sides, roof and floor edge-on, rails, posts, doors, cross members."""
    W, tw = 244.0, 0.2
    x1, y1 = x0 + L, y0 + H
    pitch = rng.uniform(26, 30)
    xs = np.arange(x0 + 10, x1 - 10, pitch)
    cv.rect("steel", x0, y0, x1, y1, 2 * 0.16)                                   # side walls
    for x in xs:                                                                 # corrugation flanks
        cv.rect("steel", x, y0 + 10, x + 4, y1 - 8, 2 * 0.12)
        cv.rect("steel", x + pitch / 2, y0 + 10, x + pitch / 2 + 4, y1 - 8, 2 * 0.12)
    cv.rect("steel", x0, y1 - 0.4, x1, y1, W * 0.6)                             # roof edge-on
    cv.rect("steel", x0, y1 - 12, x1, y1 - 0.4, 2 * 1.2)                        # top rails
    cv.rect("wood", x0, y0 + 15, x1, y0 + 17.8, W)                             # plywood floor
    cv.rect("steel", x0, y0, x1, y0 + 15, 2 * 1.5)                              # bottom rails
    cv.rect("steel", x0, y0, x1, y0 + 1.0, 2 * 12.0)
    for x in np.arange(x0 + 15, x1 - 10, rng.uniform(28, 32)):                  # floor cross members
        cv.rect("steel", x, y0 + 1, x + 0.45, y0 + 15, W - 10)
    cv.rect("steel", x0, y0, x0 + 4.5, y1, W * 0.05)                             # front wall edge-on
    cv.rect("steel", x0, y0, x0 + 16, y1, 2 * 2.5)                              # corner posts
    cv.rect("steel", x1 - 16, y0, x1, y1, 2 * 3.0)
    cv.rect("steel", x1 - 8, y0, x1 - 6, y1, W * 0.5 * 0.1)                      # doors edge-on
    for k in range(4):                                                            # locking bars
        cv.rect("steel", x1 - 14 + k * 0.2, y0 + 5, x1 - 11 + k * 0.2, y1 - 5, 2.7)
    cv.mark("cargo", x0 + 5, y0 + 18, x1 - 9, y1 - 1)
    return Bay(x0 + 5, x1 - 9, y0 + 18, y1 - 1, W - 10)


def box_body(cv: Canvas, x0: float, y0: float, L: float, H: float, rng: np.random.Generator) -> Bay:
    """Truck box body: aluminium/plywood panels, posts, floor, roll-up door."""
    W = 245.0
    x1, y1 = x0 + L, y0 + H
    cv.rect("aluminium", x0, y0, x1, y1, 2 * 0.15)
    cv.rect("wood", x0, y0, x1, y1, 2 * 1.2)                                   # plywood lining
    for x in np.arange(x0, x1, rng.uniform(50, 70)):                             # posts
        cv.rect("aluminium", x, y0, x + 4, y1, 2 * 0.8)
    cv.rect("aluminium", x0, y1 - 0.3, x1, y1, W)
    cv.rect("wood", x0, y0 + 8, x1, y0 + 11, W)
    cv.rect("steel", x0, y0, x1, y0 + 8, 2 * 1.0)
    for x in np.arange(x0 + 20, x1 - 10, 40):
        cv.rect("steel", x, y0, x + 0.5, y0 + 8, W - 20)
    cv.rect("aluminium", x0, y0, x0 + 3, y1, W * 0.1)
    cv.rect("aluminium", x1 - 3, y0, x1, y1, W * 0.15)
    cv.mark("cargo", x0 + 4, y0 + 12, x1 - 4, y1 - 1)
    return Bay(x0 + 4, x1 - 4, y0 + 12, y1 - 1, W - 10)


def tank(cv: Canvas, x0: float, y0: float, L: float, D: float, rng: np.random.Generator) -> Bay:
    """Cylindrical tank along the vehicle: shell (dark at its tangent edges), baffles, liquid."""
    R, tw = D / 2, 0.6
    yc = y0 + R
    rows = np.arange(int(cv.py(y0 + D)) - 1, int(cv.py(y0)) + 2)
    yv = (cv.ground - rows - 0.5) / cv.s - yc
    outer = 2 * np.sqrt(np.clip(R ** 2 - yv ** 2, 0, None))
    inner = 2 * np.sqrt(np.clip((R - tw) ** 2 - yv ** 2, 0, None))
    c0, c1 = int(cv.px(x0)), int(cv.px(x0 + L))
    shell = np.outer(outer - inner, np.ones(c1 - c0, np.float32)).astype(np.float32)
    cv.patch("steel", x0, (cv.ground - rows[0]) / cv.s, shell)
    fill = rng.uniform(0.0, 0.95) if rng.random() < 0.9 else 0.0
    liquid = str(rng.choice(["diesel", "water", "diesel"]))
    level = y0 + tw + fill * (D - 2 * tw)
    wet = np.where(yv + yc < level, inner, 0).astype(np.float32)
    cv.patch(liquid, x0 + 3, (cv.ground - rows[0]) / cv.s, np.outer(wet, np.ones(c1 - c0 - int(6 * cv.s), np.float32)))
    for x in (x0, x0 + L - 1.2):                                                 # heads
        cv.ellipse("steel", x + 0.6, yc, 1.2, R, 2 * R * 0.6, profile="cyl_h")
    for x in np.linspace(x0, x0 + L, int(rng.integers(3, 6)))[1:-1]:              # baffles edge-on
        cv.ellipse("steel", x, yc, 0.5, R - 1, 2 * R * 0.4, profile="cyl_h")
    cv.rect("steel", x0 + 20, y0 + D, x0 + L - 20, y0 + D + 6, 2 * 2.0)         # walkway
    cv.mark("cargo", x0 + 5, y0 + 3, x0 + L - 5, y0 + D - 3)
    return Bay(x0 + 5, x0 + L - 5, y0 + 3, y0 + D - 3, D * 0.8)


def draw(cv: Canvas, P: Plan, rng: np.random.Generator) -> Bay:
    """Render the vehicle's structure; returns the cargo bay (drawn by the cargo module)."""
    p, k = P.p, P.kind
    cab(cv, P, rng)
    r_front = rng.uniform(48, 53)
    wheel(cv, p["cab"] * 0.55, r_front, 2)
    deck, bx, bl = p["deck"], p["box_x"], p["box_len"]
    if k in ("box_truck", "flatbed"):
        rails(cv, 10, bx + bl - 10, rng.uniform(85, 95), 28, rng)
        xr = bx + bl * rng.uniform(0.58, 0.68)
        wheel(cv, xr, r_front, 4)
        if bl > 650 and rng.random() < 0.5:
            wheel(cv, xr + 2 * r_front + 25, r_front, 4)
        fuel_tank(cv, p["cab"] + 10, rng)
        cv.rect("steel", xr - 60, r_front * 0.6, xr + 60, r_front * 0.9, 8.0)         # leaf springs
        if k == "box_truck":
            return box_body(cv, bx, deck, bl, p["box_h"], rng)
        cv.rect("steel", bx, deck - 14, bx + bl, deck - 2, 2 * 1.2)
        cv.rect("wood", bx, deck - 4, bx + bl, deck, 240.0)
        cv.mark("cargo", bx, deck, bx + bl, deck + p["box_h"])
        return Bay(bx, bx + bl, deck, deck + p["box_h"], 240.0, open_top=True)
    # tractor unit + semi-trailer
    tr_end = p["cab"] + rng.uniform(250, 320)
    rails(cv, 10, tr_end, rng.uniform(88, 98), 27, rng)
    xd = p["cab"] + rng.uniform(120, 160)
    wheel(cv, xd, r_front, 4)
    if k != "tractor_20ft" or rng.random() < 0.4:
        wheel(cv, xd + 2 * r_front + 20, r_front, 4)
    fuel_tank(cv, p["cab"] + 5, rng)
    cv.rect("steel", xd - 30, deck - 20, xd + 60, deck - 8, 90 * 0.4)                  # fifth wheel
    t0 = bx - 30
    cv.rect("steel", t0, deck - 45, bx + bl, deck - 2, 2 * 1.0)                        # trailer beams
    cv.rect("steel", t0, deck - 3, bx + bl, deck - 1.5, 2 * 15.0)
    cv.rect("steel", t0, deck - 45, bx + bl, deck - 43.5, 2 * 15.0)
    cv.mark("chassis", t0, deck - 48, bx + bl, deck)
    leg = bx + rng.uniform(150, 260)
    cv.rect("steel", leg, 25, leg + 10, deck - 40, 2 * 3.0)                           # landing gear
    n_ax = 3 if bl > 1000 else int(rng.integers(1, 3))
    xa = bx + bl - rng.uniform(120, 200)
    for i in range(n_ax):
        wheel(cv, xa - i * (2 * r_front + 28), r_front, 4)
    cv.rect("steel", xa - n_ax * 130, r_front * 0.6, xa + 60, r_front * 0.9, 10.0)     # suspension
    if k == "tanker":
        return tank(cv, bx, deck, bl, p["box_h"], rng)
    return container(cv, bx, deck, bl, p["box_h"], rng)

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
TYRE_AIR = (0.64, 0.80)      # its air space, radii over the tyre's: from the rim flange to the tread band
FUEL_TANK_MIN_DEPTH = 50.0   # cm along the beam: the shallowest side tank `fuel_tank` draws
RAIL_FLANGE_CM = 8.5         # a chassis rail's C-channel flange, along the beam
RAIL_CHANNEL_CM = 7.5        # what a rail's C-channel holds along the beam: its flange less the web


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
def wheel(cv: Canvas, x: float, r: float, tyres: int, rng: np.random.Generator | None = None) -> None:
    """A wheel position (single or dual tyres on both sides): tread, sidewalls, rim, disc with
    vent holes, lug nuts, brake drum, hub + axle end-on."""
    rng = rng or np.random.default_rng(0)
    y = r
    cv.ellipse("rubber", x, y, r, r, tyres * 26.0, inner=0.80)            # tread band
    cv.ellipse("steel", x, y, r * 0.97, r * 0.97, tyres * 0.6, inner=0.84)  # steel belts
    cv.ellipse("rubber", x, y, r * 0.80, r * 0.80, tyres * 6.0, inner=0.60)  # sidewalls + beads
    cv.ellipse("steel", x, y, r * 0.64, r * 0.64, tyres * 4.0, inner=0.58)  # bead wires, rim flange
    cv.ellipse("steel", x, y, r * 0.58, r * 0.58, tyres * 1.2, inner=0.50)  # rim well
    cv.ellipse("steel", x, y, r * 0.50, r * 0.50, tyres * 1.2)             # wheel disc
    n_vent = int(rng.integers(0, 2)) * int(rng.choice([5, 8, 10]))
    a0 = rng.uniform(0, 2 * np.pi)
    for k in range(n_vent):                                                # vent holes in the disc
        a = a0 + 2 * np.pi * k / n_vent
        cv.ellipse("steel", x + 0.40 * r * np.cos(a), y + 0.40 * r * np.sin(a), 0.07 * r, 0.05 * r,
                   -tyres * 1.2, angle=np.degrees(a))
    cv.ellipse("steel", x, y, r * 0.40, r * 0.40, 8.0, inner=0.72)         # brake drum
    a0 = rng.uniform(0, 2 * np.pi)
    for k in range(10):                                                    # lug nuts (studs along the beam)
        a = a0 + 2 * np.pi * k / 10
        cv.ellipse("steel", x + 0.30 * r * np.cos(a), y + 0.30 * r * np.sin(a), 1.6, 1.6, 2 * 9.0, profile="ball")
    cv.ellipse("steel", x, y, r * 0.22, r * 0.22, 50.0, profile="ball")    # hub + axle end-on
    cv.ellipse("steel", x, y, r * 0.10, r * 0.10, 25.0)                    # spindle
    cv.rect("steel", x - 7, y - 6, x + 7, y + 6, TRACK_CM * 0.25)          # axle tube along the beam
    cv.mark_disc("tyre", x, y, r * TYRE_AIR[1], inner=r * TYRE_AIR[0])      # the air space inside the tyre


def rails(cv: Canvas, x0: float, x1: float, y0: float, h: float, rng: np.random.Generator) -> None:
    """Two C-channel chassis rails (webs thin, flanges along the beam: thin dark bands), cross
    members, air tanks, battery box and brackets hanging off them."""
    web = rng.uniform(0.7, 1.1) * (2 if rng.random() < 0.4 else 1)          # single or double frame
    cv.rect("steel", x0, y0, x1, y0 + h, 2 * web, tex=cv.tex(rng, x1 - x0, h, 40, 0.08))
    cv.rect("steel", x0, y0, x1, y0 + 1.2, 2 * RAIL_FLANGE_CM)
    cv.rect("steel", x0, y0 + h - 1.2, x1, y0 + h, 2 * RAIL_FLANGE_CM)
    for x in np.arange(x0 + 40, x1 - 20, rng.uniform(90, 130)):            # cross members edge-on
        cv.rect("steel", x, y0 + 2, x + 0.8, y0 + h - 2, 85.0)
        cv.rect("steel", x - 6, y0 + 2, x + 7, y0 + 5, 2 * 1.0)            # gusset plates
    for x in rng.uniform(x0 + 20, x1 - 20, int(rng.integers(4, 9))):       # brackets, bolts, clamps
        cv.rect("steel", x, y0 - rng.uniform(3, 15), x + rng.uniform(3, 10), y0 + h * 0.6, rng.uniform(2, 8))
    cv.mark("chassis", x0, y0 - 5, x1, y0 + h + 5)


def leaf_springs(cv: Canvas, x: float, r: float, rng: np.random.Generator) -> None:
    """A leaf-spring pack over an axle (both sides): stacked steel arcs, shackles, U-bolts."""
    half = rng.uniform(50, 65)
    xs = np.linspace(-half, half, 9)
    for k in range(int(rng.integers(3, 7))):
        sag = 7.0 - k * 1.2
        y = r * 1.15 + 0.25 + k * 1.4 + sag * (xs / half) ** 2
        span = xs * (1 - 0.13 * k)
        cv.line("steel", list(zip(x + span, y)), 1.2, 2 * 7.5)
    for sx in (x - half, x + half):
        cv.rect("steel", sx - 2, r * 1.15, sx + 2, r * 1.15 + 15, 2 * 6.0)
    cv.rect("steel", x - 8, r * 0.85, x + 8, r * 1.15 + 8, 2 * 2.0)


def air_tank(cv: Canvas, x0: float, y: float, L: float, r: float) -> None:
    """A compressed-air reservoir across the chassis: thin steel cylinder with end caps."""
    cv.rect("steel", x0, y - r, x0 + L, y + r, 2 * 0.3)
    cv.rect("steel", x0, y + r - 0.6, x0 + L, y + r, 60.0 * 0.3)
    cv.rect("steel", x0, y - r, x0 + L, y - r + 0.6, 60.0 * 0.3)
    for xe in (x0, x0 + L - 1):
        cv.ellipse("steel", xe + 0.5, y, 1.5, r, 60 * 0.2, profile="cyl_h")


def battery_box(cv: Canvas, x0: float, y0: float) -> None:
    """Two lead-acid batteries in a steel box: lead grids make a dense striped block."""
    cv.rect("steel", x0, y0, x0 + 55, y0 + 30, 2 * 0.3 + 50 * 0.02)
    for k in range(2):
        bx = x0 + 3 + k * 26
        cv.rect("plastic", bx, y0 + 2, bx + 24, y0 + 26, 50 * 0.2)
        cv.rect("water", bx + 1, y0 + 3, bx + 23, y0 + 20, 50 * 0.3)       # acid
        for gx in np.arange(bx + 2, bx + 22, 3.5):                         # plate groups (lead)
            cv.rect("lead", gx, y0 + 4, gx + 2.0, y0 + 20, 50 * 0.08)
        for tx in (bx + 4, bx + 18):
            cv.rect("lead", tx, y0 + 26, tx + 2.5, y0 + 29, 3.0)           # terminals


def fuel_tank(cv: Canvas, x0: float, rng: np.random.Generator) -> None:
    """A side-mounted diesel tank (box with rounded corners), partly filled; marks the tank ('fuel_tank') and
    the diesel in it ('diesel': below its surface a package displaces diesel, above it only air)."""
    L, y0, h = rng.uniform(70, 130), rng.uniform(45, 60), rng.uniform(50, 65)
    d = rng.uniform(FUEL_TANK_MIN_DEPTH, 65)
    lvl = rng.uniform(0.3, 0.95)
    cv.rect("diesel", x0 + 2, y0 + 1, x0 + L - 2, y0 + 1 + (h - 2) * lvl, d)
    cv.mark("diesel", x0 + 2, y0 + 1, x0 + L - 2, y0 + 1 + (h - 2) * lvl)
    cv.rect("steel", x0, y0, x0 + L, y0 + h, 2 * 0.3)
    cv.rect("steel", x0, y0, x0 + L, y0 + 0.3, d)
    cv.rect("steel", x0, y0 + h - 0.3, x0 + L, y0 + h, d)
    for xe in (x0, x0 + L - 0.3):
        cv.rect("steel", xe, y0, xe + 0.3, y0 + h, d)
    for xs in (x0 + 10, x0 + L - 12):                                    # mounting straps
        cv.rect("steel", xs, y0 - 2, xs + 2.5, y0 + h + 2, 2.0)
    cv.mark("fuel_tank", x0 + 2, y0 + 2, x0 + L - 2, y0 + h - 2)


def engine(cv: Canvas, x0: float, y0: float, floor: float, rng: np.random.Generator) -> None:
    """Diesel engine + gearbox side view: cast-iron block (textured) with lighter cylinder bores,
    pistons and con-rods, crankshaft and sump below, head and valve train above, turbo,
    flywheel housing and a tapering gearbox behind."""
    L = rng.uniform(110, 135)
    top = min(floor - 8, y0 + rng.uniform(95, 110))
    crank = y0 + 25
    cv.rect("aluminium", x0 + 5, y0, x0 + L - 10, y0 + 18, 50 * 0.35)                    # sump
    cv.rect("steel", x0, crank - 8, x0 + L, top - 18, 70 * 0.28, tex=cv.tex(rng, L, top - y0, 10, 0.10))  # block
    n_cyl = 6
    pitch = (L - 16) / n_cyl
    for k in range(n_cyl):
        cx = x0 + 8 + pitch * (k + 0.5)
        cv.rect("steel", cx - pitch * 0.36, crank + 22, cx + pitch * 0.36, top - 22, -14 * 0.6)  # bore (liner is lighter)
        py = crank + 28 + rng.uniform(0, 14)
        cv.rect("aluminium", cx - pitch * 0.33, py, cx + pitch * 0.33, py + 12, 13.0)       # piston
        cv.line("steel", [(cx, py), (cx + rng.uniform(-5, 5), crank)], 2.5, 5.0)            # con-rod
    cv.ellipse("steel", x0 + L / 2, crank, L / 2 - 4, 5, 20 * 0.8, profile="cyl_h")        # crankshaft
    cv.rect("steel", x0 + 4, top - 18, x0 + L - 6, top, 65 * 0.32)                         # head
    for k in range(2 * n_cyl):                                                            # valves, springs
        vx = x0 + 10 + (L - 20) * (k + 0.5) / (2 * n_cyl)
        cv.rect("steel", vx - 0.8, top - 16, vx + 0.8, top - 4, 6.0)
    cv.rect("aluminium", x0 + 6, top, x0 + L - 8, top + 6, 40 * 0.1)                       # valve cover
    cv.ellipse("steel", x0 + L * 0.6, top + 5, 12, 10, 25.0, profile="ball")              # turbo
    cv.line("steel", [(x0 + 10, top - 10), (x0 + L * 0.6, top - 8)], 6, 2 * 0.6)           # manifold
    cv.ellipse("steel", x0 + L + 8, crank + 20, 10, 42, 55 * 0.5, profile="cyl_v")         # flywheel + housing
    cv.poly("steel", [(x0 + L + 16, crank + 55), (x0 + L + 80, crank + 35), (x0 + L + 80, crank + 5),
                      (x0 + L + 16, crank - 15)], 30 * 0.4, tex=cv.tex(rng, 70, 70, 8, 0.12))  # gearbox
    cv.ellipse("steel", x0 - 6, crank + 30, 5, 12, 30 * 0.3, profile="cyl_v")              # damper, pulleys
    cv.ellipse("steel", x0 + 12, top - 5, 10, 9, 20 * 0.4, inner=0.4)                      # alternator


def cab(cv: Canvas, P: Plan, rng: np.random.Generator) -> None:
    """Cab-over-engine cab (mostly light): thin shell and doors, seats on steel frames, steering
    column, dashboard, sleeper bunk; engine and radiator under the floor."""
    c, hh = P.p["cab"], P.p["cab_h"]
    floor = rng.uniform(115, 135)
    shell = [(8, floor), (2, floor + 60), (0, hh - 70), (6, hh - 5), (20, hh), (c - 15, hh), (c, hh - 10), (c, floor)]
    cv.poly("steel", shell, 2 * 0.1)
    cv.line("steel", shell + [shell[0]], 0.3, TRACK_CM * 0.5)
    cv.line("steel", [(c - 3, floor), (c - 3, hh - 12)], 0.3, TRACK_CM * 0.6)                   # rear wall edge-on
    cv.poly("glass", [(3, floor + 90), (1, hh - 80), (8, hh - 40), (40, hh - 40), (40, floor + 90)], 2 * 0.6)
    dx, dw = rng.uniform(20, 40), rng.uniform(90, 120)                                         # doors
    cv.line("steel", [(dx, floor + 5), (dx, hh - 40), (dx + dw, hh - 40), (dx + dw, floor + 5), (dx, floor + 5)],
            1.5, 2 * 0.8)
    cv.rect("steel", dx + 5, floor + 10, dx + dw - 5, floor + 70, 2 * 0.25)                    # door panel, beams
    cv.line("steel", [(dx + 5, floor + 45), (dx + dw - 5, floor + 50)], 3, 2 * 0.5)
    cv.rect("steel", 10, floor, c - 10, floor + 4, 60.0 * 0.25)                                # floor
    for sx in (c * 0.35, c * 0.72):                                                            # seats
        cv.rect("plastic", sx - 25, floor + 20, sx + 25, floor + 45, 55 * 0.15, tex=cv.tex(rng, 50, 25, 6, 0.2))
        cv.line("steel", [(sx - 22, floor + 4), (sx - 18, floor + 22), (sx + 20, floor + 22), (sx + 22, floor + 4)],
                1.5, 2 * 2.0)                                                                  # seat frame
        cv.ellipse("steel", sx, floor + 15, 5, 9, 8.0, profile="cyl_v")                        # suspension
        back = [(sx + 18, floor + 40), (sx + 28, floor + 120), (sx + 35, floor + 118), (sx + 26, floor + 40)]
        cv.poly("plastic", back, 50 * 0.15)
        cv.line("steel", back[:2], 1.0, 2 * 1.5)
    cv.rect("plastic", 8, floor + 60, 45, floor + 95, 180 * 0.12, tex=cv.tex(rng, 37, 35, 5, 0.3))  # dashboard
    cv.rect("steel", 12, floor + 70, 40, floor + 72, 150 * 0.05)                               # dash cross beam
    cv.ellipse("steel", 45, floor + 95, 22, 8, 1.5, inner=0.8)                                 # steering wheel
    cv.line("steel", [(45, floor + 95), (25, floor - 10)], 4, 4.0)                             # steering column
    cv.rect("steel", 15, floor - 30, 35, floor - 10, 20 * 0.5)                                 # steering box
    cv.line("steel", [(c * 0.52, floor + 4), (c * 0.5, floor + 45)], 1.5, 2.0)                 # gear lever
    if rng.random() < 0.7:                                                                     # sleeper bunk
        cv.rect("plastic", c - 75, floor + 50, c - 8, floor + 65, 200 * 0.1, tex=cv.tex(rng, 67, 15, 8, 0.3))
    engine(cv, rng.uniform(35, 60), 50, floor, rng)
    cv.rect("aluminium", 2, 55, 12, floor - 8, 90 * 0.25)                                      # radiator core
    for fy in np.arange(58, floor - 10, 4.0):                                                  # radiator tubes
        cv.rect("aluminium", 2, fy, 12, fy + 0.8, 90 * 0.3)
    cv.ellipse("plastic", 20, (55 + floor) / 2, 3, (floor - 60) / 2, 60 * 0.3)                 # fan
    cv.rect("steel", 0, 35, 10, 60, 240 * 0.05)                                                # bumper
    cv.rect("steel", c - 5, floor, c + 15, floor + 20, 20.0)                                   # steps
    cv.ellipse("steel", c + 5, floor + 70, 8, 60, 2 * 0.5, profile="cyl_v")                   # exhaust stack


def _corrugation(cv: Canvas, x0: float, x1: float, pitch_cm: float, depth: float, base: float) -> np.ndarray:
    """Path length profile (1, w) of two corrugated side walls: flanks add slant path -> faint stripes."""
    c0, c1 = int(cv.px(x0)), int(cv.px(x1))
    xs = (np.arange(c0, c1, dtype=np.float32) + 0.5) / cv.s - cv.ox - x0
    ph = (xs / pitch_cm) % 1.0
    flank = np.exp(-(((ph - 0.25) / 0.05) ** 2)) + np.exp(-(((ph - 0.75) / 0.05) ** 2))
    return (base + depth * flank)[None, :].astype(np.float32)


def container(cv: Canvas, x0: float, y0: float, L: float, H: float, rng: np.random.Generator) -> Bay:
    """ISO container: corrugated sides, roof and floor edge-on, rails, posts, doors, cross members."""
    W = 244.0
    x1, y1 = x0 + L, y0 + H
    pitch = rng.uniform(26, 30)
    prof = _corrugation(cv, x0, x1, pitch, 2 * 0.25, 2 * 0.16)                   # corrugated side walls
    rows = int(round(cv.py(y0 + 10))) - int(round(cv.py(y1 - 8)))
    cv.patch("steel", x0, y1 - 8, np.repeat(prof, max(rows, 1), axis=0))
    cv.rect("steel", x0, y0, x1, y0 + 10, 2 * 0.16)
    cv.rect("steel", x0, y1 - 8, x1, y1, 2 * 0.16)
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
    wheel(cv, p["cab"] * 0.55, r_front, 2, rng)
    deck, bx, bl = p["deck"], p["box_x"], p["box_len"]
    if k in ("box_truck", "flatbed"):
        rails(cv, 10, bx + bl - 10, rng.uniform(85, 95), 28, rng)
        xr = bx + bl * rng.uniform(0.58, 0.68)
        wheel(cv, xr, r_front, 4, rng)
        if bl > 650 and rng.random() < 0.5:
            wheel(cv, xr + 2 * r_front + 25, r_front, 4, rng)
        fuel_tank(cv, p["cab"] + 10, rng)
        air_tank(cv, p["cab"] + 140, rng.uniform(55, 70), rng.uniform(50, 80), 12)
        battery_box(cv, bx + bl * 0.25, rng.uniform(50, 60))
        leaf_springs(cv, xr, r_front, rng)
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
    wheel(cv, xd, r_front, 4, rng)
    x_last = xd
    if k != "tractor_20ft" or rng.random() < 0.4:
        x_last = xd + 2 * r_front + 20
        wheel(cv, x_last, r_front, 4, rng)
    fuel_tank(cv, p["cab"] + 5, rng)
    air_tank(cv, tr_end - 90, rng.uniform(55, 70), rng.uniform(50, 80), 12)
    battery_box(cv, p["cab"] + 150, rng.uniform(50, 60))
    cv.rect("steel", xd - 35, deck - 11, xd + 55, deck - 8, 90 * 0.6)                  # fifth wheel plate
    cv.rect("steel", xd - 30, deck - 24, xd + 50, deck - 11, 2 * 2.0 + 10)              # brackets, pivot
    cv.ellipse("steel", xd + 5, deck - 18, 6, 6, 60.0, profile="cyl_h")                 # pivot pin (across)
    t0 = bx - 30
    cv.rect("steel", t0, deck - 45, bx + bl, deck - 2, 2 * 1.0, tex=cv.tex(rng, bx + bl - t0, 43, 60, 0.1))  # beams
    for x in np.arange(t0 + 60, bx + bl - 60, rng.uniform(100, 160)):                  # lightening holes
        cv.ellipse("steel", x, deck - 24, 12, 8, -2 * 0.9)
    cv.rect("steel", t0, deck - 3, bx + bl, deck - 1.5, 2 * 15.0)
    cv.rect("steel", t0, deck - 45, bx + bl, deck - 43.5, 2 * 15.0)
    cv.mark("chassis", t0, deck - 48, bx + bl, deck)
    leg = bx + rng.uniform(150, 260)
    cv.rect("steel", leg, 25, leg + 10, deck - 40, 2 * 3.0)                           # landing gear
    n_ax = 3 if bl > 1000 else int(rng.integers(1, 3))
    xa = bx + bl - rng.uniform(120, 200)
    axles = [x for x in xa - np.arange(n_ax) * (2 * r_front + 28) if x > x_last + 2 * r_front + 25] or [xa]
    for x in axles:                                                                    # (never over the tractor's)
        wheel(cv, x, r_front, 4, rng)
    for x in axles:
        leaf_springs(cv, x, r_front, rng)
    if k == "tanker":
        return tank(cv, bx, deck, bl, p["box_h"], rng)
    return container(cv, bx, deck, bl, p["box_h"], rng)

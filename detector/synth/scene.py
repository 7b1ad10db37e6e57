"""One synthetic scan in memory: vehicle + cargo -> attenuation -> TIP anomaly -> linac counts.

Three independent random streams per scan (scene, anomaly, detector), all derived from the
scan's SeedSequence, so the same seed renders the same vehicle with or without an anomaly and
the result never depends on which worker made it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import cv2
import numpy as np

from detector import physics, tip
from detector.metrics import mask_bbox
from detector.synth import cargo as cargo_mod
from detector.synth import threats, vehicles
from detector.synth.render import Canvas, DetectorModel, detect, resample_columns, speed_resample

# Bumped whenever the same seed makes other pixels, so that data made before is not taken for today's:
# 2 (2026-12-07): packages in fuel tanks add their full attenuation above the diesel, packages in tyres lie in
# the tyre's air space (1: the whole wheel disc, and fuel-tank packages netted against diesel everywhere).
# 3 (2026-12-07): packages in the chassis fill one rail's C-channel or both (7.5 or 15 cm along the beam); before,
# halved bricks 7.5-44 cm deep, two thirds of them deeper than both channels hold.
GENERATOR_VERSION = 3

ANOMALY_TYPES = ("firearm", "narcotics", "false_wall", "shielded_block", "small_metal",
                 "in_chassis", "in_tyre", "in_fuel_tank", "low_contrast")
PITCH_MM, MAX_H, MAX_W = 5.0, 850, 3000   # default pitch; image size at most 850 x 3000 px
VEHICLE_CARGOS = {"tanker": ("liquid_bulk",),
                  "flatbed": ("machinery", "vehicles", "palletised", "bulk_sacks", "liquid_drums")}


@dataclass
class SynthScan:
    """A generated scan: uint16 counts (2, H, W) and its ground truth."""
    counts: np.ndarray
    i0: float
    pitch_mm: float
    mask: np.ndarray
    boxes: list = field(default_factory=list)
    anomaly_type: str = "none"
    cargo: str = ""
    vehicle: str = ""
    twin_counts: np.ndarray | None = None   # generate_scan(twin=True): the same scan without its anomaly

    @property
    def label(self) -> int:
        return int(self.anomaly_type != "none")


def _seq(seed) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))


def _stream(ss: np.random.SeedSequence, k: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (k,)))


def build_scene(rng: np.random.Generator, height: int | None = None, vehicle: str | None = None,
                cargo: str | None = None) -> tuple[Canvas, str, str]:
    """Draw a vehicle with its cargo on a canvas sized for it (air above and around)."""
    vehicle = vehicle or str(rng.choice(vehicles.VEHICLES))
    P = vehicles.plan(rng, vehicle)
    choices = VEHICLE_CARGOS.get(vehicle, cargo_mod.CARGOS)
    cargo = cargo or str(rng.choice(choices))
    air, below = rng.uniform(8, 25), 2.0
    lead, tail = rng.uniform(10, 60), rng.uniform(10, 60)
    extent, total = P.top + air + below, P.length + lead + tail
    if height is None:                   # 5 mm unless the scanner's field (MAX_H x MAX_W px) is exceeded
        pitch = max(PITCH_MM, extent * 10.0 / MAX_H, total * 10.0 / MAX_W)
    else:
        pitch = extent * 10.0 / height
    s = 10.0 / pitch
    H = int(height or min(round(extent * s), MAX_H))
    W = min(int(round(total * s)), MAX_W if height is None else 10 ** 6)
    cv = Canvas(H, W, pitch, ground_row=H - below * s)
    cv.ox = lead
    bay = vehicles.draw(cv, P, rng)
    if cargo != "liquid_bulk":
        cargo_mod.fill(cv, bay, cargo, rng)
    return cv, vehicle, cargo


def _threat_for(kind: str, rng: np.random.Generator, pitch: float) -> tip.Threat:
    """The threat object of an anomaly type (placement types carry packages of narcotics)."""
    if kind in tip.THREAT_KINDS:
        return tip.make_threat(rng, kind, pitch)
    if kind == "low_contrast":
        return tip.make_threat(rng, str(rng.choice(["narcotics", "firearm", "small_metal"])), pitch)
    # every entry draws (in_tyre's too, though `tyre_bags` makes its packages): the scans of the others rely on it
    rows, cols = {"in_chassis": (1, int(rng.integers(1, 4))), "in_tyre": (int(rng.integers(2, 5)), 1),
                  "in_fuel_tank": (int(rng.integers(2, 5)), int(rng.integers(1, 3)))}[kind]
    deep = None                          # no deeper than the part holds: a tank; one rail's channel, or both
    if kind == "in_fuel_tank":
        deep = vehicles.FUEL_TANK_MIN_DEPTH
    elif kind == "in_chassis":
        deep = vehicles.RAIL_CHANNEL_CM * int(rng.integers(1, 3))
    att = threats.narcotics(rng, pitch, rows=rows, cols=cols, max_depth=deep).attenuation()
    if kind == "in_fuel_tank":           # full attenuation (dry above the diesel): `_displace` nets the wet part
        return tip.Threat(att, (att * _diesel_net()).max(axis=0) >= tip.MIN_ATT * 0.5, kind)
    return tip.Threat(att, att.max(axis=0) >= tip.MIN_ATT * 0.5, kind)


def _diesel_net() -> np.ndarray:
    """(2, 1, 1): the share of a package's own attenuation it adds where it displaces diesel (~0.26, 0.25)."""
    net = [1 - d / c for d, c in zip(physics.material("diesel").mu, physics.material("cocaine").mu)]
    return np.array(net, np.float32)[:, None, None]


def _displace(att: np.ndarray, threat: tip.Threat, box, wet: np.ndarray | None):
    """Project a package placed in a fuel tank again, at the place `project` chose (its mask's `box`): below the
    diesel surface (`wet`) it takes the diesel's place, so only the difference is added there; above it, in air,
    all of its own attenuation."""
    if wet is None:
        wet = np.ones(att.shape[1:], bool)
    ys, xs = np.nonzero(threat.mask)
    x0, y0 = box[0] - int(xs.min()), box[1] - int(ys.min())
    h, w = threat.shape
    net = np.where(wet[None, y0:y0 + h, x0:x0 + w], _diesel_net(), np.float32(1))
    return tip.project(att, tip.Threat(threat.attenuation * net, threat.mask, threat.kind), None, at=(x0, y0))


def tyre_bags(rng: np.random.Generator, region: np.ndarray, pitch: float) -> tuple[tip.Threat, tuple[int, int]]:
    """Bags of narcotics packed into one tyre of `region` (rings: the tyres' air space), an arc of it against the
    tread, a few bags along the arc, each filling part of the tyre's width along the beam -> (threat, top-left)."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    if n < 2:
        raise ValueError("no tyre to fill")
    x, y, w, h, _ = (int(v) for v in stats[int(rng.integers(1, n))])
    ro = w / 2                                           # outer radius (pixels) of the ring
    ri = ro * vehicles.TYRE_AIR[0] / vehicles.TYRE_AIR[1]
    inner = ro - rng.uniform(0.6, 1.0) * (ro - ri)       # the bags lie against the tread, reaching inward
    a0, span = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(40, 160))
    n_bags = max(1, int(round(span * (ro + inner) / 2 * pitch / 10 / rng.uniform(20, 30))))
    gap = 0.8 / ((ro + inner) / 2 * pitch / 10)           # ~0.8 cm of wrapping between bags (radians)
    k = 4                                                # 4 x 4 samples a pixel: anti-aliased edges
    u = (np.arange(w * k, dtype=np.float32) + 0.5) / k - w / 2
    v = (np.arange(h * k, dtype=np.float32) + 0.5) / k - h / 2
    rho = np.hypot(u[None, :], v[:, None])
    ang = (np.arctan2(v[:, None], u[None, :]) - a0) % (2 * np.pi)
    bag = np.floor(ang / (span / n_bags)).astype(int)
    along = ang - bag * (span / n_bags)
    deep = rng.uniform(8, 20, n_bags + 1).astype(np.float32)   # cm along the beam, of a tyre's ~25 cm width
    t = np.where((rho >= inner) & (rho <= ro) & (ang < span) & (along > gap), deep[np.minimum(bag, n_bags)], 0)
    t = t.reshape(h, k, w, k).mean(axis=(1, 3))
    att = physics.attenuation("cocaine", t)
    mask = (att.max(axis=0) >= tip.MIN_ATT * 0.5) & region[y:y + h, x:x + w]
    if not mask.any():
        raise ValueError("the tyre is too small at this pitch for a package")
    return tip.Threat(att, mask, "in_tyre"), (x, y)


PLACED = {"in_chassis": "chassis", "in_tyre": "tyre", "in_fuel_tank": "fuel_tank"}


def _region_for(kind: str, cv: Canvas, att: np.ndarray, solid: np.ndarray) -> np.ndarray:
    name = PLACED.get(kind, "cargo")
    region = cv.regions.get(name)
    if region is None or not region.any():
        region = solid
    elif name == "cargo" and (region & solid).sum() > 400:
        region = region & solid          # open loads: not in the air above them
    if kind == "low_contrast":           # behind the densest cargo
        a = att[0][region]
        dense = region & (att[0] > np.percentile(a, 75)) if a.size else region
        region = dense if dense.sum() > 400 else region
    return region


def insert_anomaly(att: np.ndarray, cv: Canvas, kind: str, rng: np.random.Generator):
    """TIP the anomaly into the scene's attenuation -> (attenuation, mask, box, type inserted).
    Falls back to a small metal item if none fits: it keeps a placement type (in a vehicle part, behind
    dense cargo) whose region it lies in, else it is labelled what it is, "small_metal" (a label must
    name what the image shows). Anomalies hidden in a vehicle part lie wholly inside that part."""
    region = _region_for(kind, cv, att, tip.cargo_region(att))
    inside = 1.0 if kind in PLACED else 0.9
    for attempt in range(6):
        try:
            if kind == "in_tyre" and attempt < 4:
                threat, at = tyre_bags(rng, region, cv.pitch_mm)
                new, mask, box = tip.project(att, threat, rng, at=at)
            else:
                threat = _threat_for(kind if attempt < 4 else "small_metal", rng, cv.pitch_mm)
                new, mask, box = tip.project(att, threat, rng, region=region, min_inside=inside)
        except ValueError:
            continue
        if kind == "in_fuel_tank" and attempt < 4:
            new, mask, box = _displace(att, threat, box, cv.regions.get("diesel"))
        placement = kind in PLACED or kind == "low_contrast"
        return new, mask, box, kind if attempt < 4 or placement else "small_metal"
    return (*tip.project(att, tip.make_threat(rng, "small_metal", cv.pitch_mm), rng), "small_metal")


def generate_scan(seed, anomaly: bool | str | None = None, height: int | None = None,
                  vehicle: str | None = None, cargo: str | None = None,
                  detector: DetectorModel | None = None, twin: bool = False) -> SynthScan:
    """Generate one scan. `anomaly`: None/False (normal), True (random type) or a name from
    ANOMALY_TYPES. `height` fixes the image height (the pitch then follows the vehicle).
    `twin`: also render its twin, the same vehicle, cargo and detector noise without the anomaly."""
    ss = _seq(seed)
    scene_rng, anom_rng, det_rng = _stream(ss, 0), _stream(ss, 1), _stream(ss, 2)
    cv, vehicle, cargo = build_scene(scene_rng, height, vehicle, cargo)
    flip = scene_rng.random() < 0.5
    att = cv.attenuation()
    mask = np.zeros(att.shape[1:], bool)
    kind = "none"
    clean = att
    if anomaly:
        kind = str(anom_rng.choice(ANOMALY_TYPES)) if anomaly is True else str(anomaly)
        if kind not in ANOMALY_TYPES:
            raise ValueError(f"unknown anomaly {kind!r}; known: {', '.join(ANOMALY_TYPES)}")
        att, mask, _, kind = insert_anomaly(att, cv, kind, anom_rng)
    m = detector or DetectorModel()
    W = att.shape[2]
    src = speed_resample(W, det_rng, m.speed_var)
    if flip:                             # driving the other way: read the columns backwards
        src = (W - 1) - src
    att = resample_columns(att, src)
    mask = resample_columns(mask[None].astype(np.float32), src)[0] > 0   # every column the anomaly reaches
    twin_rng = copy.deepcopy(det_rng) if twin and kind != "none" else None
    counts = detect(att, det_rng, m)
    twin_counts = None
    if twin_rng is not None:             # the same noise draws: the two differ by the anomaly alone
        twin_counts = detect(resample_columns(clean, src), twin_rng, m)
    box = mask_bbox(mask)
    boxes = [list(box)] if box else []
    return SynthScan(counts, float(m.i0), float(cv.pitch_mm), mask, boxes, kind, cargo, vehicle, twin_counts)

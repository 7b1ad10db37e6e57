"""How visible a synthetic anomaly is: its added attenuation over the clutter of the scan around it.

A generated anomalous scan is rendered again from the same seed without its anomaly (the scene,
vehicle, cargo and detector noise come from their own random streams, so only the anomaly differs). Both are brought to the model's pitch; visibility = mean attenuation the anomaly adds
(high energy, over its mask) / std of the high-passed clean scan in a window around it (structure
edges + noise at the object's scale). Below ~1 an officer cannot tell it from the clutter by
contrast alone; quality figures are reported per band of it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from detector.cpus import usable_cpus
from detector.hard_types import write_atomic
from detector.metrics import mask_bbox
from detector.preprocess import Preprocessing, to_model_pitch
from detector.scan import scan_from_counts
from detector.synth.dataset import generator_pool, scan_seed
from detector.synth.scene import GENERATOR_VERSION
from detector.synth.stream import MASK_KEEP

BANDS = (0.0, 0.5, 1.0, 2.0, float("inf"))
VERSION_KEY = "_generator"   # in a visibility cache: the generator version its figures are of


def high_energy(att: np.ndarray) -> np.ndarray:
    """The image visibility is measured on by default: the high-energy attenuation."""
    return att[0]


def _att(s, pre: Preprocessing, image: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    scan = scan_from_counts(s.counts, i0=(s.i0, s.i0), pitch_mm=s.pitch_mm, energies=("high", "low"))
    return to_model_pitch(image(scan.attenuation), scan.pitch_mm, pre)


def anomaly_visibility(seed, anomaly: bool | str = True, pre: Preprocessing | None = None,
                       height: int | None = None, margin: int = 16, sigma: float = 4.0,
                       image: Callable[[np.ndarray], np.ndarray] = high_energy) -> float:
    """Visibility of the anomaly of the scan generated from `seed` and `anomaly` as `generate_scan`
    takes them (nan if it has none). `image` maps the (2, H, W) attenuation to the 2-D image measured
    (the high energy; benchmarks/material_visibility.py passes a dual-energy material image)."""
    from detector.synth.scene import generate_scan

    pre = pre or Preprocessing()
    with_a = generate_scan(seed, anomaly=anomaly, height=height)
    clean = generate_scan(seed, anomaly=False, height=height)
    a, c = _att(with_a, pre, image), _att(clean, pre, image)
    m = to_model_pitch(with_a.mask.astype(np.float32), with_a.pitch_mm, pre) > MASK_KEEP
    return visibility_of(a, c, m, margin, sigma)


def visibility_of(a: np.ndarray, c: np.ndarray, m: np.ndarray, margin: int = 16, sigma: float = 4.0) -> float:
    """Visibility from model-pitch 2-D images: `a` with the anomaly, `c` its clean twin, `m` the anomaly's
    mask (nan if the mask is empty or the shapes differ). The in-memory training trucks use it directly."""
    if not m.any() or a.shape != c.shape:
        return float("nan")
    signal = abs(float((a - c)[m].mean()))   # a material image may go down where matter is added
    bx0, by0, bx1, by1 = mask_bbox(m)
    y0, y1 = max(0, by0 - margin), min(c.shape[0], by1 + margin)
    x0, x1 = max(0, bx0 - margin), min(c.shape[1], bx1 + margin)
    high = c - cv2.GaussianBlur(c, (0, 0), sigma)
    clutter = float(high[y0:y1, x0:x1].std())
    return signal / max(clutter, 1e-6)


def band_of(v: float) -> str:
    """'0.5-1' style label of the visibility band holding v."""
    for lo, hi in zip(BANDS, BANDS[1:]):
        if lo <= v < hi:
            return f">={lo:g}" if hi == float("inf") else f"{lo:g}-{hi:g}"
    return "n/a"


def _generator_seed(stem: str) -> tuple[int, int] | None:
    """(seed, index) of a scan the generator wrote as s{seed}_{index}, else None."""
    m = re.fullmatch(r"s(\d+)_(\d+)", stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _of_stem(stem: str) -> float:
    seed, index = _generator_seed(stem)
    return anomaly_visibility(scan_seed(seed, index))


def generator_visibility(stems: list[str], cache: Path) -> dict[str, float]:
    """Visibility of the anomalous generator scans named in `stems` (s{seed}_{index}; other names are
    skipped), cached in the JSON file `cache`. Each re-generates its scan twice (~0.25 s): one process per core."""
    vis = json.loads(cache.read_text()) if cache.exists() else {}
    if vis.get(VERSION_KEY) != GENERATOR_VERSION:   # figures of another generator's scans: not these scans'
        vis = {VERSION_KEY: GENERATOR_VERSION}
    todo = sorted({s for s in stems if s not in vis and _generator_seed(s)})
    if todo:
        with generator_pool(min(len(todo), usable_cpus())) as pool:
            vis.update(zip(todo, pool.map(_of_stem, todo)))
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, vis)   # DDP processes read it in setup
    return {s: vis[s] for s in stems if s in vis}

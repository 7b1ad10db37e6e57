"""Hard anomaly types: give the anomaly types the model finds hardest on validation more training crops.

A scan-level detector is judged at a 1 % false-alarm rate, where the easy types (dense blocks, false
walls) are found long before the faint ones (a few-cm metal part, packages in a chassis rail). After each
validation the module measures, per anomaly type, how far its anomalies sit among the normal scores
(`type_hardness`) and writes sampling weights to RUN/hard_types.json; the crop workers (other processes)
re-read it and draw anomaly-centred crops, and the anomalies of fresh synthetic trucks, by those weights.
Numpy only: no torch here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from detector.atomic import replacing


def type_hardness(rows: list[dict]) -> dict[str, float]:
    """Per anomaly type: the mean share of normal scores at or above each of its anomalies' scores
    (0 = every one outranks every normal scan; 0.5 = they look like normals). `rows`: dicts with
    label, score, type (the validation rows)."""
    normal = np.sort([float(r["score"]) for r in rows if r["label"] == 0])
    if not normal.size:
        return {}
    shares: dict[str, list[float]] = {}
    for r in rows:
        if r["label"] == 1 and r.get("type"):
            above = normal.size - np.searchsorted(normal, float(r["score"]), side="left")
            shares.setdefault(r["type"], []).append(above / normal.size)
    return {t: float(np.mean(v)) for t, v in sorted(shares.items())}


def type_weights(hardness: dict[str, float], share: float) -> dict[str, float]:
    """Sampling weight per type: (1 - share) + share * hardness / mean hardness. share 0 (or no type
    harder than another) gives {}: every type as it comes; share 1: in proportion to hardness."""
    if not hardness or share <= 0:
        return {}
    mean = float(np.mean(list(hardness.values())))
    if mean <= 0:
        return {}
    return {t: round((1 - share) + share * h / mean, 4) for t, h in hardness.items()}


def smooth(old: dict[str, float], new: dict[str, float], keep: float = 0.5) -> dict[str, float]:
    """Exponential average of two hardness tables (a type seen first takes its new value): a small
    validation set gives a handful of anomalies per type, so one validation alone is noisy."""
    return {t: keep * old.get(t, h) + (1 - keep) * h for t, h in new.items()}


def draw_kind(rng: np.random.Generator, kinds: tuple[str, ...], weights: dict[str, float]) -> str:
    """One of `kinds`, each with its weight (1 when the table does not name it)."""
    p = np.array([max(0.0, weights.get(k, 1.0)) for k in kinds], np.float64)
    p = p / p.sum() if p.sum() > 0 else np.full(len(kinds), 1 / len(kinds))
    return kinds[int(rng.choice(len(kinds), p=p))]


def write_atomic(path: Path, data: Any) -> None:
    """JSON written whole (`atomic.replacing`): readers in other processes never see half a file."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data))


class WatchedJson:
    """A JSON file another process rewrites (atomically): `read` returns (changed, data), re-reading only
    when the file's mtime moved, and keeps the last good data while the file is missing or replaced."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self.data: Any = None
        self._mtime = 0

    def read(self) -> tuple[bool, Any]:
        if self.path is None:
            return False, self.data
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return False, self.data
        if mtime == self._mtime:
            return False, self.data
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False, self.data
        self._mtime = mtime
        return True, self.data

"""Synthetic training scans generated on the fly, in memory: more distinct trucks than a disk holds.

Each training-loader worker keeps a small pool of scans at the model's pitch and replaces one with a
freshly generated scan every few crops, so an epoch sees `per_epoch` new vehicles and nothing is
written to disk (2,400 stored scans already take ~25 GB as TIFF + cache). The scans come from the same
generator and the same counts -> attenuation -> model-pitch path as `detector synth` + training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from detector.hard_types import draw_kind
from detector.metrics import mask_bbox
from detector.preprocess import Preprocessing, model_attenuation, to_model_pitch
from detector.scan import scan_from_counts

MASK_KEEP = 0.25  # model_mask: a quarter-pixel anomaly at model pitch stays in the mask


@dataclass
class PoolScan:
    """One in-memory training scan at model pitch."""
    att: np.ndarray                 # (C, h, w) float32 attenuation
    mask: np.ndarray                # (h, w) uint8
    centres: list[tuple[int, int]]  # anomaly pixels to centre positive crops on (empty if normal)
    twin: np.ndarray | None = None  # (C, h, w) the same scan without its anomaly (make_pool_scan(twin=True))


def make_pool_scan(seed: np.random.SeedSequence, anomalous: bool | str, pre: Preprocessing,
                   channels: int | None = None, twin: bool = False) -> PoolScan:
    """Generate one synthetic scan and bring it to model pitch exactly as the scan cache does.
    `anomalous`: False, True (a random type) or an anomaly type's name. `twin`: keep an anomalous scan's
    twin too (the same truck and noise without the anomaly)."""
    from detector.synth.scene import generate_scan

    s = generate_scan(seed, anomaly=anomalous, twin=twin)

    def model_att(counts: np.ndarray) -> np.ndarray:
        scan = scan_from_counts(counts, i0=(s.i0, s.i0), pitch_mm=s.pitch_mm, energies=("high", "low"))
        return model_attenuation(scan.attenuation, scan.pitch_mm, pre, channels, "synthetic").astype(
            np.float32, copy=False)

    mask = model_mask(s.mask, s.pitch_mm, pre)
    twin_att = model_att(s.twin_counts) if s.twin_counts is not None else None
    return PoolScan(model_att(s.counts), mask, mask_centres(mask), twin_att)


def model_mask(mask: np.ndarray, pitch_mm: float, pre: Preprocessing) -> np.ndarray:
    """(H, W) anomaly mask -> 0/1 uint8 at the model's pitch: INTER_AREA, then a low threshold, so an
    anomaly a quarter-pixel wide at model pitch stays in the mask (one path for cache and pool)."""
    return (to_model_pitch(mask.astype(np.float32, copy=False), pitch_mm, pre) > MASK_KEEP).astype(np.uint8)


def mask_centres(mask: np.ndarray, n: int = 64) -> list[tuple[int, int]]:
    """Up to n anomaly pixels spread over a model-pitch mask: where positive crops are centred."""
    box = mask_bbox(mask)
    if box is None:
        return []
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(mask[y0:y1, x0:x1])              # the same pixels, in the same order, as over the mask
    ys, xs = ys + y0, xs + x0
    sel = np.linspace(0, len(ys) - 1, min(len(ys), n)).astype(int)
    return [(int(ys[i]), int(xs[i])) for i in sel]


class SynthPool:
    """A worker's pool of on-the-fly scans; `draw` returns one and renews the pool as crops are taken.
    `kind_weights`, if given, returns the current sampling weight per anomaly type (empty: uniform).
    `twin_fraction`: share of negative draws that are an anomalous scan's twin, cut where its anomaly was.
    `min_visibility`: an anomaly fainter than this (detector.synth.visibility) is not taught as one: its truck
    joins the pool as its clean twin (a normal truck), so no crop asks the network to find what cannot be seen."""

    def __init__(self, size: int, crops_per_scan: int, pre: Preprocessing, channels: int | None,
                 entropy: list[int], anomaly_fraction: float = 0.5,
                 kind_weights: Callable[[], dict[str, float]] | None = None, twin_fraction: float = 0.0,
                 min_visibility: float = 0.0) -> None:
        self.size, self.crops_per_scan = max(1, size), max(1, crops_per_scan)
        self.pre, self.channels, self.anomaly_fraction = pre, channels, anomaly_fraction
        self.kind_weights = kind_weights
        self.twin_fraction = twin_fraction
        self.min_visibility = min_visibility
        self.faint = 0                # anomalous trucks kept as their clean twin (min_visibility)
        self.entropy = entropy        # distinct per worker and run: never the seeds of a stored test set
        self.scans: list[PoolScan] = []
        self.made = 0
        self._taken = 0

    def _new(self, rng: np.random.Generator) -> PoolScan:
        seed = np.random.SeedSequence(self.entropy, spawn_key=(self.made,))
        self.made += 1
        anomaly: bool | str = bool(rng.random() < self.anomaly_fraction)
        weights = self.kind_weights() if anomaly and self.kind_weights else None
        if weights:   # the types the model finds hardest come more often (detector.hard_types)
            from detector.synth.scene import ANOMALY_TYPES
            anomaly = draw_kind(rng, ANOMALY_TYPES, weights)
        s = make_pool_scan(seed, anomaly, self.pre, self.channels,
                           twin=self.twin_fraction > 0 or self.min_visibility > 0)
        if self.min_visibility > 0 and s.twin is not None:
            from detector.synth.visibility import visibility_of
            if visibility_of(s.att[0], s.twin[0], s.mask > 0) < self.min_visibility:
                self.faint += 1
                return PoolScan(s.twin, np.zeros_like(s.mask), [])
        return s if self.twin_fraction > 0 else PoolScan(s.att, s.mask, s.centres)

    def draw(self, rng: np.random.Generator, positive: bool) -> PoolScan:
        """A pool scan to cut a crop from, centred on `centres` if it has any: an anomalous one if `positive`
        (and the pool has any); if not, now and then an anomalous scan's twin with the anomaly's centres and
        an empty mask (same context, no threat: context alone must not predict one), else a scan to crop at
        random (centres empty). Fills and renews the pool."""
        while len(self.scans) < self.size:
            self.scans.append(self._new(rng))
        self._taken += 1
        if self._taken % self.crops_per_scan == 0:   # oldest out, a new truck in
            self.scans.pop(0)
            self.scans.append(self._new(rng))
        if not positive and self.twin_fraction > 0 and rng.random() < self.twin_fraction:
            twins = [s for s in self.scans if s.twin is not None]
            if twins:
                s = twins[int(rng.integers(len(twins)))]
                return PoolScan(s.twin, np.zeros_like(s.mask), s.centres)
        pool = [s for s in self.scans if s.centres] if positive else self.scans
        pool = pool or self.scans
        s = pool[int(rng.integers(len(pool)))]
        return s if positive else PoolScan(s.att, s.mask, [])

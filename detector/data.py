"""Training data: the crops a model learns from and the whole scans it is validated on, as a LightningDataModule.

Records come from detector.records (manifest or normal/ + anomalous/ folders, splits); each scan is read and
resampled to the model's pitch once into detector.scan_cache. Training draws random crops, oversampling crops that
contain an anomaly; validation/test use whole scans padded to multiples of 32, exactly as
detector.preprocess.prepare does at the station.
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from detector import tip
from detector.atomic import replacing
from detector.augment import AugmentConfig, train_pipeline
from detector.formats import scan_geometry
from detector.hard_types import WatchedJson
from detector.loader_workers import single_threaded_worker
from detector.preprocess import Preprocessing, model_size, normalize, pad_to_multiple, padded_size
from detector.records import SPLITS, Record, load_records, split_records
from detector.cpus import usable_cpus
from detector.scan import DEFAULT_MAX_PIXELS, ScanError, summarised_scan_warnings
from detector.scan_cache import ScanCache
from detector.synth.stream import SynthPool

STRUCTURE_ATTENUATION = 0.3  # above this a pixel is vehicle or cargo, not air


@dataclass
class DataConfig:
    crop: int = 192                 # training crop side in model pixels (multiple of 32)
    crops_per_epoch: int = 2000
    anomaly_crop_fraction: float = 0.5  # share of crops centred on a known anomaly (when masks exist)
    air_crop_fraction: float = 0.1  # share of other crops taken anywhere; the rest lie on the vehicle
    hard_negative_fraction: float = 0.5  # share of other crops centred on mined hard negatives (once mined)
    mine_share: float = 0.25        # share of training scans mined for hard negatives after each epoch (0 = off)
    synth_per_epoch: int = 0        # fresh synthetic scans per epoch, made in memory by the loader workers (0 = off)
    synth_share: float = 0.5        # share of training crops cut from those scans (when synth_per_epoch > 0)
    synth_pool: int = 24            # on-the-fly scans each worker holds (~3 MB each at 10 mm)
    synth_anomaly_fraction: float = 0.5  # share of those fresh trucks that carry an anomaly (0 in normal-only)
    synth_twin_fraction: float = 0.0  # share of the negative crops from fresh trucks cut from an anomalous
                                      # truck's twin (same truck and noise, no anomaly) where the anomaly was
    min_visibility: float = 0.0     # synthetic training scans only: anomalies fainter than this (detector.synth.
                                    # visibility: added attenuation / local clutter) are not taught as anomalies:
                                    # a fresh truck's becomes its clean twin, a stored generator scan is left out
                                    # (0.5 measured neutral on the synthetic default: docs/experiments.md)
    hard_types: float = 0.0         # > 0: this share of the anomaly sampling follows each anomaly type's hardness
                                    # on the last validations (detector.hard_types); 0 = types as they come
                                    # (0.5 measured worse on the synthetic default: docs/experiments.md)
    batch_size: int = 16
    val_batch_size: int = 1         # whole scans differ in size; 1 avoids padding waste
    workers: int | str = "auto"     # crop loader processes per training process; "auto": auto_workers
    val_fraction: float = 0.15      # used only when the manifest has no split column
    test_fraction: float = 0.15
    seed: int = 0
    normal_only: bool = False       # drop anomalous training scans; anomalies come from TIP alone
    label_only_crops: bool = False  # anomalous training scans with a label alone (no mask, no boxes) larger than a
                                    # crop: false leaves them out of training, since their crops, cut anywhere and
                                    # taught as anomalous, measured worse than none; true trains on them anyway. Those
                                    # that fit in one crop are always trained on, whole (docs/experiments.md)
    channels: int | None = None     # None: from the data (the first scan)
    pitch_mm: float | None = None   # pixel pitch (mm) of the scans whose files carry none (many 16-bit PNG/TIFF);
                                    # None: 5 mm (scan.DEFAULT_PITCH_MM). A file's own pitch wins, then a manifest
                                    # row's pitch_mm. The export puts it in the bundle as the station's default
    cache_dir: str | None = None    # default RUN/cache
    skip_unreadable: bool = True    # an unreadable scan or mask (corrupt, truncated, NaN, ...) is left out and listed
                                    # in RUN/skipped_scans.csv, as `detector score` records its failures; false: the
                                    # first one stops the run
    augment: AugmentConfig = field(default_factory=AugmentConfig)



class CropDataset(Dataset):
    """Random training crops: x (C,S,S) normalised, mask (1,S,S), pixel weight, label."""

    def __init__(self, cache: ScanCache, recs: list[Record], metas: list[dict], cfg: DataConfig,
                 pre: Preprocessing, hard_negative_file: str | os.PathLike | None = None,
                 hard_types_file: str | os.PathLike | None = None) -> None:
        self.cache, self.recs, self.metas, self.cfg, self.pre = cache, recs, metas, cfg, pre
        self.hard_negative_file = Path(hard_negative_file) if hard_negative_file else None
        self.pos = [i for i, m in enumerate(metas) if m["centres"]]
        self.library = self._labelled_threats() if cfg.augment.tip_rate > 0 and cfg.augment.tip_from_labels > 0 else []
        self.pipeline = train_pipeline(cfg.augment, pre.model_pitch_mm, library=self.library)
        self._rng: np.random.Generator | None = None
        self._index = {m["key"]: i for i, m in enumerate(metas)}
        self._hard: list[tuple[int, int, int]] = []   # (scan index, y, x) at model pitch
        self._hard_file = WatchedJson(self.hard_negative_file)
        self._types_file = WatchedJson(hard_types_file if cfg.hard_types > 0 else None)
        self._type_w: dict[str, float] = {}
        self._pos_cum: np.ndarray | None = None      # cumulative sampling weights of self.pos (None: uniform)
        self._pool: SynthPool | None = None
        self.channels = metas[0]["shape"][0] if metas else None
        self._wheels: dict[int, list] = {}   # scan index -> tip.find_wheels, found once per loader process

    def _labelled_threats(self) -> list[tip.Threat]:
        """The training scans' own masked anomalies, cut out (`tip.threats_from_mask`) for TIP to project
        elsewhere; built once in the parent, so the loader processes share it. Boxes-only scans count too
        (their box is the mask), scans with a label alone do not."""
        out: list[tip.Threat] = []
        for i in self.pos:
            att, mask = self.cache.load(self.metas[i])
            out += tip.threats_from_mask(att, mask, max_side=self.cfg.crop * 2 // 3,
                                         kind=self.recs[i].anomaly_type or "labelled")
        if self.pos and not out:
            rank_zero_warn("data.augment.tip_from_labels: no labelled anomaly fits a training crop; TIP uses "
                           "its own threats only")
        return out

    def _hard_negatives(self) -> list[tuple[int, int, int]]:
        """The miner's latest cells (its file is rewritten each epoch by another process)."""
        changed, found = self._hard_file.read()
        if changed:
            self._hard = [(self._index[k], y, x) for k, cells in found.items() if k in self._index for y, x in cells]
        return self._hard

    def _type_weights(self) -> dict[str, float]:
        """The latest per-type sampling weights (RUN/hard_types.json, rewritten after each validation)."""
        changed, data = self._types_file.read()
        if changed and isinstance(data, dict):
            self._type_w = {str(k): float(v) for k, v in (data.get("weights") or {}).items()}
            w = np.array([self._type_w.get(self.recs[i].anomaly_type, 1.0) for i in self.pos], np.float64)
            self._pos_cum = np.cumsum(w) if self._type_w and w.sum() > 0 else None
        return self._type_w

    def _positive(self, rng: np.random.Generator) -> int:
        """A training scan with a known anomaly, drawn by its type's weight once hard types are known."""
        self._type_weights()
        if self._pos_cum is None:
            return int(self.pos[rng.integers(len(self.pos))])
        j = int(np.searchsorted(self._pos_cum, rng.random() * self._pos_cum[-1], side="right"))
        return int(self.pos[min(j, len(self.pos) - 1)])

    def __len__(self) -> int:
        return self.cfg.crops_per_epoch

    def _generator(self) -> np.random.Generator:
        if self._rng is None:  # one stream per worker process (persistent workers keep it across epochs)
            single_threaded_worker()
            seed = torch.initial_seed() % 2**32
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            if rank and torch.utils.data.get_worker_info() is None:  # DDP, no loader workers: ranks share a seed
                seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
            self._rng = np.random.default_rng([self.cfg.seed, seed])
            self.pipeline.set_random_seed(int(seed % 2**31))
            if self.cfg.synth_per_epoch > 0:
                per_scan = round(self.cfg.crops_per_epoch * self.cfg.synth_share / self.cfg.synth_per_epoch)
                self._pool = SynthPool(self.cfg.synth_pool, per_scan, self.pre, self.channels,
                                       [self.cfg.seed, 0x5EED, seed],   # normal-only: TIP adds the threats
                                       anomaly_fraction=0.0 if self.cfg.normal_only else self.cfg.synth_anomaly_fraction,
                                       kind_weights=self._type_weights if self.cfg.hard_types > 0 else None,
                                       twin_fraction=self.cfg.synth_twin_fraction,
                                       min_visibility=self.cfg.min_visibility)
        return self._rng

    def crop(self, i: int, rng: np.random.Generator, centred: bool, hard: tuple[int, int] | None = None
             ) -> tuple[np.ndarray, np.ndarray, bool]:
        """An (S,S,C) attenuation crop of training scan i, its mask, has_mask.
        centred: around a known anomaly; hard: around this (y, x); else random, mostly on the vehicle."""
        att, mask = self.cache.load(self.metas[i])
        img, m = self.cut(att, mask, rng, self.metas[i]["centres"] if centred else None, hard)
        return img, m, mask is not None

    def _tyre_crop(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """A crop around a wheel of normal training scan i with bags packed into its tyre (data.augment.tip_tyres),
        or None when no wheel was found in the scan."""
        att, _ = self.cache.load(self.metas[i])
        if i not in self._wheels:   # ~0.1 s a scan
            self._wheels[i] = tip.find_wheels(np.asarray(att), self.pre.model_pitch_mm)
        if not self._wheels[i]:
            return None
        x, y, r = self._wheels[i][int(rng.integers(len(self._wheels[i])))]
        s, (h, w) = self.cfg.crop, padded_size(att.shape[1], att.shape[2], self.pre.pad_multiple)
        if 2 * r >= s:
            return None
        y0 = int(np.clip(rng.integers(int(y + r) + 1 - s, int(y - r) + 1), 0, max(0, h - s)))   # the wheel inside
        x0 = int(np.clip(rng.integers(int(x + r) + 1 - s, int(x - r) + 1), 0, max(0, w - s)))
        img, _ = self.cut(att, None, rng, at=(y0, x0))
        try:
            new, m = tip.hide_in_tyre(np.moveaxis(img, -1, 0), (x - x0, y - y0, r), rng, self.pre.model_pitch_mm)
        except ValueError:
            return None
        return np.moveaxis(new, 0, -1), m.astype(np.uint8)

    def cut(self, att: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
            centres: list | None = None, hard: tuple[int, int] | None = None,
            at: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """An (S,S,C) crop of a (C,h,w) scan and its (S,S) mask, cut from the scan as the station pads it
        (air below and right up to a multiple of pad_multiple): the image's bottom edge, where tyres meet
        it, then falls mid-cell as it does at the station, not always on a cell border (top false alarms)."""
        s = self.cfg.crop
        h, w = padded_size(att.shape[1], att.shape[2], self.pre.pad_multiple)
        if at is not None:   # this top-left corner
            y0, x0 = at
        elif centres:
            cy, cx = centres[rng.integers(len(centres))]
            j = s // 3
            y0, x0 = cy - s // 2 + rng.integers(-j, j + 1), cx - s // 2 + rng.integers(-j, j + 1)
        elif hard is not None:  # a cell where the model fired on normal structure
            j = s // 4
            y0, x0 = hard[0] - s // 2 + rng.integers(-j, j + 1), hard[1] - s // 2 + rng.integers(-j, j + 1)
        else:  # negatives mostly on the vehicle: air crops teach nothing, engines and wheels do
            for _ in range(8):
                y0, x0 = rng.integers(0, max(1, h - s + 1)), rng.integers(0, max(1, w - s + 1))
                if rng.random() < self.cfg.air_crop_fraction:
                    break
                patch = np.asarray(att[0, y0:y0 + s:4, x0:x0 + s:4])
                if patch.size and float(np.mean(patch > STRUCTURE_ATTENUATION)) > 0.25:
                    break
        y0, x0 = int(np.clip(y0, 0, max(0, h - s))), int(np.clip(x0, 0, max(0, w - s)))
        out = np.zeros((s, s, att.shape[0]), np.float32)
        a = np.asarray(att[:, y0:y0 + s, x0:x0 + s])
        out[:a.shape[1], :a.shape[2]] = np.moveaxis(a, 0, -1)
        m = np.zeros((s, s), np.uint8)
        if mask is not None:
            mm = np.asarray(mask[y0:y0 + s, x0:x0 + s])
            m[:mm.shape[0], :mm.shape[1]] = mm
        return out, m

    def _sample(self, x: np.ndarray, m: np.ndarray, supervised: bool, label: int) -> dict[str, torch.Tensor]:
        """Augment one crop and make the training sample."""
        if supervised:
            r = self.pipeline(image=x, mask=m)
            x, m = r["image"], r["mask"]
            label = int(m.any())
        else:  # label-only anomalous: no pixel target, the MIL loss uses the label
            x = self.pipeline(image=x, mask=np.ones_like(m))["image"]  # non-empty mask: TIP skips it
        x = normalize(np.moveaxis(x, -1, 0), self.pre)
        return {"x": torch.from_numpy(np.ascontiguousarray(x)),
                "mask": torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None],
                "pixel_weight": torch.tensor(1.0 if supervised else 0.0),
                "label": torch.tensor(float(label))}

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = self._generator()
        if self._pool is not None and rng.random() < self.cfg.synth_share:   # a fresh synthetic truck
            positive = rng.random() < self.cfg.anomaly_crop_fraction
            ps = self._pool.draw(rng, positive)
            img, m = self.cut(ps.att, ps.mask, rng, ps.centres)
            return self._sample(img, m, True, int(m.any()))
        centred = bool(self.pos) and rng.random() < self.cfg.anomaly_crop_fraction
        hard = None
        if centred:
            i = self._positive(rng)
        else:
            cells = self._hard_negatives() if self.cfg.hard_negative_fraction > 0 else []
            if cells and rng.random() < self.cfg.hard_negative_fraction:
                i, y, x = cells[rng.integers(len(cells))]
                hard = (y, x)
            else:
                i = int(rng.integers(len(self.metas)))
                tyres = self.cfg.augment.tip_tyres
                if tyres > 0 and self.recs[i].label == 0 and rng.random() < tyres:
                    tyre = self._tyre_crop(i, rng)
                    if tyre is not None:
                        return self._sample(*tyre, True, 1)
        img, m, has_mask = self.crop(i, rng, centred, hard)
        label = self.recs[i].label
        return self._sample(img, m, has_mask or label == 0, label)


class ScanDataset(Dataset):
    """Whole scans for validation/test: x padded to multiples of 32 (like prepare), mask, label."""

    def __init__(self, cache: ScanCache, recs: list[Record], metas: list[dict], pre: Preprocessing) -> None:
        self.cache, self.recs, self.metas, self.pre = cache, recs, metas, pre

    def __len__(self) -> int:
        return len(self.recs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        single_threaded_worker()
        att, mask = self.cache.load(self.metas[i])
        x = pad_to_multiple(normalize(np.asarray(att), self.pre), self.pre.pad_multiple)
        m = np.zeros(x.shape[1:], np.float32)
        if mask is not None:
            m[:mask.shape[0], :mask.shape[1]] = mask
        return {"x": torch.from_numpy(x), "mask": torch.from_numpy(m)[None], "label": float(self.recs[i].label),
                "has_mask": mask is not None, "valid_hw": torch.tensor(att.shape[1:]),
                "anomaly_type": self.recs[i].anomaly_type, "index": i}


def _pad_collate(items: list[dict]) -> dict[str, Any]:
    """Stack whole scans of different sizes by padding with air (0)."""
    H = max(it["x"].shape[1] for it in items)
    W = max(it["x"].shape[2] for it in items)
    out: dict[str, Any] = {}
    for k in items[0]:
        v = [it[k] for it in items]
        if k in ("x", "mask"):
            out[k] = torch.stack([torch.nn.functional.pad(t, (0, W - t.shape[2], 0, H - t.shape[1])) for t in v])
        elif isinstance(v[0], torch.Tensor):
            out[k] = torch.stack(v)
        elif isinstance(v[0], (int, float, bool)):
            out[k] = torch.tensor(v)
        else:
            out[k] = v
    return out


def auto_workers(on_gpu: bool, processes: int = 1) -> int:
    """Crop loader processes per training process for `data.workers: auto`. On a CPU its cores also
    train: a quarter of its cores load, at least 1 (1 per process measured best on 2 cores; a loader
    core cuts ~190 crops/s, a core trains 25-130, without and with bf16 units). On GPUs its share of
    the cores less two (itself, a spare), at most 16: a GPU outruns the loaders (H200, 16 cores,
    14 loaders: a default epoch 5.9 s, ~1.3 s of it the network). Cores: those this process may run on
    and their cgroup CPU quota (detector.cpus.usable_cpus), not the host's."""
    cores = usable_cpus() // max(1, processes)
    return max(1, min(16, cores - 2)) if on_gpu else max(1, cores // 4)


class ScanDataModule(L.LightningDataModule):
    """Splits, the scan cache and the loaders (persistent workers)."""

    def __init__(self, data_dir: str | os.PathLike, cfg: DataConfig, pre: Preprocessing,
                 cache_dir: str | os.PathLike, hard_negative_file: str | os.PathLike | None = None,
                 hard_types_file: str | os.PathLike | None = None, require_train: bool = True) -> None:
        """require_train=False: a folder of held-out scans only, for scoring a trained model on new data."""
        super().__init__()
        self.data_dir, self.cfg, self.pre = Path(data_dir), cfg, pre
        self.hard_negative_file = Path(hard_negative_file) if hard_negative_file else None
        self.hard_types_file = Path(hard_types_file) if hard_types_file else None
        self.records = load_records(data_dir)
        self.splits = split_records(self.records, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        if cfg.normal_only:
            self.splits["train"] = [r for r in self.splits["train"] if r.label == 0]
        self.require_train = require_train
        self.skipped: dict[str, tuple[str, str]] = {}   # path -> (split, reason) of the unreadable scans left out
        self._warned = False
        self._check_splits()
        self.cache = ScanCache(cache_dir, pre, cfg.channels, cfg.pitch_mm)
        self.visibility_file = Path(cache_dir) / "train_visibility.json"   # min_visibility
        self.metas: dict[str, list[dict]] = {}
        self.channels = cfg.channels
        self.energies: list[str] = []
        self._uncached: set[str] | None = None   # _left_out_uncached, once decided

    @property
    def _leaves_out_label_only(self) -> bool:
        """Whether label-only anomalous training scans larger than a crop are left out (_leave_out_label_only)."""
        return not self.cfg.normal_only and not self.cfg.label_only_crops

    def _left_out_uncached(self) -> set[str]:
        """Paths of the label-only anomalous training scans that _leave_out_label_only leaves out, decided from their
        file headers (detector.formats.scan_geometry) before they are read: a site's thousands of whole trucks were
        each read, resampled and cached, then left out. Those another split holds too, and those whose header cannot
        tell, are cached and decided from the cache as before."""
        if self._uncached is None:
            self._uncached = set()
            if self._leaves_out_label_only:
                others = {r.path for s in ("val", "test") for r in self.splits[s]}
                self._uncached = {r.path for r in self.splits["train"] if r.label_alone and r.path not in others
                                  and self._larger_than_a_crop(r)}
        return self._uncached

    def _larger_than_a_crop(self, rec: Record) -> bool:
        """True when the file's header says its scan is larger than a training crop at the model's pitch (an untagged
        file at its row's pitch_mm, else data.pitch_mm); False when it fits, or the header cannot tell."""
        geometry = scan_geometry(rec.path, rec.untagged_pitch(self.cfg.pitch_mm))
        if geometry is None:
            return False
        h, w = model_size(*geometry, self.pre)
        return h * w <= DEFAULT_MAX_PIXELS and max(h, w) > self.cfg.crop   # past the limit: the read says why

    def _leave_out_label_only(self) -> None:
        """Drop the anomalous training scans that have a label alone and are larger than one training crop. Nobody
        said where their anomaly lies, so a crop of one, taught as anomalous, is almost always normal structure
        (0.8 % of a truck's crops hold a 25 px package): on the quick config such scans cost 0.14 test AUROC against
        training without them. A scan that fits in one crop is cut whole, so its label holds for its crop: those stay,
        taught by the image-level loss (+0.073 test AUROC against leaving them out: docs/experiments.md)."""
        train, metas, s = self.splits["train"], self.metas["train"], self.cfg.crop
        weak = [i for i, r in enumerate(train) if r.label_alone]
        if not weak:
            return
        uncached = self._left_out_uncached()   # their size from the header: no meta
        out = {i for i in weak if train[i].path in uncached or max(metas[i]["shape"][1:]) > s}
        if len(out) < len(weak):
            rank_zero_info(f"{len(weak) - len(out)} anomalous training scans with a label alone fit in one training "
                           f"crop ({s} px at {self.pre.model_pitch_mm:g} mm): each is trained on whole, by its label")
        if out:
            self.splits["train"] = [r for i, r in enumerate(train) if i not in out]
            self.metas["train"] = [m for i, m in enumerate(metas) if i not in out]
            # the plain layout has no boxes and no split column: only a mask file marks where the anomaly lies
            how = ("a box (manifest `boxes`) to train on it, or put them in the validation split, where a label is "
                   "enough" if (self.data_dir / "manifest.csv").exists() else
                   f"a mask ({self.data_dir / 'masks'}/<same stem>.png, non-zero on the anomaly) to train on it")
            example = Path(train[min(out)].path).name
            rank_zero_warn(f"{len(out)} of {sum(r.label == 1 for r in train)} anomalous training scans have a label "
                           f"alone (no mask, no boxes; e.g. {example}) and are larger than a training crop "
                           f"({s} px at {self.pre.model_pitch_mm:g} mm): left out of training, where crops cut "
                           f"anywhere in them taught normal structure as anomalous. Give each {how}; "
                           "data.label_only_crops=true trains on them anyway")

    def prepare_data(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm
        if self.cfg.min_visibility > 0:
            self._faint_training_anomalies()
        # each scan once: a tiny dataset validates on its training scans, the same records in two splits
        uncached = self._left_out_uncached()
        todo = [r for r in {r.path: r for s in SPLITS for r in self.splits[s]}.values() if r.path not in uncached]
        # threads: decoding and resampling release the GIL (1.7x on 2 cores)
        pool = ThreadPoolExecutor(min(8, usable_cpus()), thread_name_prefix="cache")
        try:
            with summarised_scan_warnings(rank_zero_warn):   # one line per kind of conversion, not one per scan
                # a terminal clears the bar; a log file keeps it and ends its line, so a warning after it
                # starts a line of its own instead of running on from the bar's last state
                for _ in tqdm(pool.map(self._build_or_skip, todo), total=len(todo), desc="caching scans",
                              leave=not sys.stderr.isatty(), disable=len(todo) < 20, file=sys.stderr):
                    pass
        finally:
            pool.shutdown(cancel_futures=True)
        self._drop_skipped()

    def _build_or_skip(self, rec: Record) -> dict | None:
        """The record's cache meta; None (and the reason kept in self.skipped) if its scan or mask is unreadable
        and data.skip_unreadable is on, else its ScanError stops the run."""
        if rec.path in self.skipped:
            return None
        try:
            return self.cache.build(rec)
        except ScanError as e:
            if not self.cfg.skip_unreadable:
                raise
            split = next(s for s in SPLITS if any(r is rec for r in self.splits[s]))
            self.skipped[rec.path] = (split, e.reason if e.path == rec.path else str(e))   # else: its mask
            return None

    def _drop_skipped(self) -> None:
        """Leave the unreadable scans out of every split, say so once, and re-check that training can go on."""
        if not self.skipped:
            return
        for s in SPLITS:
            self.splits[s] = [r for r in self.splits[s] if r.path not in self.skipped]
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"{len(self.skipped)} of {len(self.records)} scans are unreadable and left out (e.g. "
                           f"{self._a_skipped_scan()}); data.skip_unreadable=false stops at the first instead")
        self._check_splits()

    def _a_skipped_scan(self) -> str:
        path, (_, reason) = next(iter(self.skipped.items()))
        return f"{path}: {reason}"

    def _unreadable(self, split: str | None = None) -> str:
        """' (N unreadable, e.g. PATH: REASON)' for the scans of `split` (None: of any) left out as unreadable, else
        '': a split emptied by them is a file problem, not a manifest one."""
        bad = [f"{p}: {reason}" for p, (s, reason) in self.skipped.items() if split in (None, s)]
        return f" ({len(bad)} unreadable, e.g. {bad[0]})" if bad else ""

    def _check_splits(self) -> None:
        if self.require_train and not any(r.label == 0 for r in self.records):   # no split can fix that
            raise ScanError(self.data_dir, "the dataset has no normal scans (label 0, or normal/ in the plain layout): "
                                           "the thresholds are calibrated on normal traffic, so training needs some")
        if self.require_train and not self.splits["train"]:
            raise ScanError(self.data_dir, f"no training scans after splitting{self._unreadable()}")
        if not self.splits["val"]:  # tiny datasets: validate on the training scans rather than not at all
            if self.require_train:
                rank_zero_warn(f"no validation scans in {self.data_dir}{self._unreadable('val')}: validating and "
                               "calibrating on the training scans, whose scores are optimistic (the thresholds will "
                               "flag fewer trucks than asked)")
            self.splits["val"] = list(self.splits["train"])
        if self.require_train and not any(r.label == 0 for r in self.splits["val"]):
            raise ScanError(self.data_dir, f"the validation split has no normal scans{self._unreadable('val')}: the "
                                           "thresholds are calibrated on them (put some normal scans in split=val, or "
                                           "leave the split column empty for a seeded split)")

    def write_skipped(self, path: str | os.PathLike) -> int:
        """RUN/skipped_scans.csv: path, split, reason of each unreadable scan left out (header only if none)."""
        with replacing(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "split", "reason"])
            for p, (split, reason) in sorted(self.skipped.items()):
                w.writerow([p, split, reason])
        return len(self.skipped)

    def _faint_training_anomalies(self) -> set[str]:
        """Stems of the anomalous generator-made training scans fainter than data.min_visibility (computed
        once per cache folder on the first process, read from it by the others)."""
        from detector.synth.visibility import generator_visibility

        stems = [Path(r.path).stem for r in self.splits["train"] if r.label == 1]
        vis = generator_visibility(stems, self.visibility_file)
        return {k for k, v in vis.items() if v < self.cfg.min_visibility}

    def setup(self, stage: str | None = None) -> None:
        if self.metas:
            return
        if self.cfg.min_visibility > 0:   # not taught as anomalies, and not clean either: left out
            faint = self._faint_training_anomalies()
            self.splits["train"] = [r for r in self.splits["train"] if Path(r.path).stem not in faint]
            rank_zero_info(f"data.min_visibility={self.cfg.min_visibility:g}: {len(faint)} faint training "
                           f"anomalies left out")
        uncached = self._left_out_uncached()
        with summarised_scan_warnings(rank_zero_warn):
            metas = {r.path: self._build_or_skip(r) for s in SPLITS for r in self.splits[s] if r.path not in uncached}
        self._drop_skipped()
        for s in SPLITS:
            self.metas[s] = [metas.get(r.path) for r in self.splits[s]]
        if self._leaves_out_label_only:
            self._leave_out_label_only()   # here: whether a scan fits in a crop is known from its header or its cache
            self._check_splits()
        first = next(m for s in SPLITS for m in self.metas[s])   # train's, or test's in a test-only folder
        chans = {m["shape"][0] for s in SPLITS for m in self.metas[s]}
        if len(chans) > 1:
            raise ScanError(self.data_dir, f"scans have different channel counts {sorted(chans)}; "
                                           "set data.channels=1 to use the high energy of all")
        self.channels = first["shape"][0]
        self.energies = first["energies"][: self.channels]
        fresh_anomalies = self.cfg.synth_per_epoch > 0 and self.cfg.synth_anomaly_fraction > 0
        train = self.splits["train"]   # empty in a folder of held-out scans (require_train=False)
        if train and not self.cfg.normal_only and not fresh_anomalies and not any(r.label for r in train):
            # cleared traffic only: TIP at its labelled-data rate (0.25) would be a weaker normal-only run
            rank_zero_warn("no anomalous training scans: training in normal-only mode (threats projected into the "
                           "normal scans, as with data.normal_only=true)")
            self.cfg.normal_only = True
        if self.cfg.normal_only:  # TIP is then the only source of anomalies: half the crops get one
            self.cfg.augment.tip_rate = max(self.cfg.augment.tip_rate, 0.5)
        self._say_splits_without_anomalies()

    def _say_splits_without_anomalies(self) -> None:
        """Warn when a labelled set's anomalous scans all lie outside validation or test: their figures are then
        n/a and best.ckpt cannot be ranked, which a seeded split does quietly to a label of 3 scans or fewer."""
        bare = [s for s in ("val", "test") if self.splits[s] and not any(r.label == 1 for r in self.splits[s])]
        n = {s: sum(r.label == 1 for r in self.splits[s]) for s in SPLITS}
        if not self.require_train or not bare or not any(r.label == 1 for r in self.records):
            return
        how = ("the manifest's split column" if any(r.split for r in self.records) else
               "the seeded split (round(n x data.val_fraction or data.test_fraction) of each label's scans, none of "
               "a label with 2 or fewer)")
        rank_zero_warn(f"the {' and '.join(bare)} split{'s have' if len(bare) > 1 else ' has'} no anomalous scans "
                       f"(train {n['train']}, val {n['val']}, test {n['test']}) by {how}: validation and test AUROC "
                       "and detection are n/a, best.ckpt is the latest epoch and the thresholds rest on normal scans "
                       "alone; put one or more anomalous scans in split=val (and split=test) to measure them")

    def _loader(self, ds: Dataset, batch: int, shuffle: bool, collate=None) -> DataLoader:
        w = self.cfg.workers if self.cfg.workers != "auto" else auto_workers(torch.cuda.is_available())
        return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=w, persistent_workers=w > 0,
                          collate_fn=collate, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        ds = CropDataset(self.cache, self.splits["train"], self.metas["train"], self.cfg, self.pre,
                         self.hard_negative_file, self.hard_types_file)
        return self._loader(ds, self.cfg.batch_size, False)

    def val_dataloader(self) -> DataLoader:
        ds = ScanDataset(self.cache, self.splits["val"], self.metas["val"], self.pre)
        return self._loader(ds, self.cfg.val_batch_size, False, _pad_collate)

    def test_dataloader(self) -> DataLoader:
        ds = ScanDataset(self.cache, self.splits["test"], self.metas["test"], self.pre)
        return self._loader(ds, self.cfg.val_batch_size, False, _pad_collate)

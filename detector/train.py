"""Training: the LightningModule (pixel + MIL losses), calibration on validation, the fit and the `train` verb.

`detector train --config configs/quick.yaml --data DIR --out RUN key=value ...` writes RUN/best.ckpt,
RUN/last.ckpt, RUN/config.yaml, RUN/metrics.json (+ RUN/test_scores.csv with a test split),
CSV/TensorBoard logs, and the run's pictures RUN/curves.png and RUN/review/ (detector.run_review). Every validation calibrates thresholds on the normal validation scores
(detector.calibration), so each checkpoint carries what the ONNX bundle needs; `load_checkpoint`
returns it (detector.checkpoint); the config is detector.config's.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import json
import logging
import math
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.utilities import rank_zero_only

from detector import metrics
from detector.atomic import replacing
from detector.callbacks import AverageBatchNormStats, EpochTimer, TimeBudget, ValidateLastEpoch
from detector.calibration import threshold_table, unresolved_warning
from detector.checkpoint import (AtomicCheckpointIO, CheckpointError, check_initialisable, check_resumable,
                                 load_checkpoint, load_initial_weights, read_checkpoint, read_init)
from detector.config import Config, ConfigError, TrainerConfig, flatten, from_dict, load_config, to_dict
from detector.cpus import quota_words, usable_cpus
from detector.data import ScanDataModule
from detector.records import fingerprint, load_records
from detector.run_review import clear as clear_review
from detector.run_review import curves_when_stopped, review_quietly
from detector.hard_negatives import HardNegativeMiner
from detector.hard_types import smooth, type_hardness, type_weights, write_atomic
from detector.hardware import (check_hardware, cpu_threads, ddp_without_step_buffer_sync, resolve_cpu_processes,
                               resolve_precision, resolve_workers)
from detector.model import AnomalyNet, build_model, check_model_config, nhwc
from detector.scan import ScanError
from detector.score import hold_lock

CALIBRATION_RATES = (0.01, 0.005, 0.001)
FEW_VAL_ANOMALIES = 10   # the summary line says how few validation scans its figures rest on, below this


# ---------------------------------------------------------------- losses
def focal_loss(z: torch.Tensor, t: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Per-cell binary focal loss on logits."""
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    p = torch.sigmoid(z)
    pt = p * t + (1 - p) * (1 - t)
    a = alpha * t + (1 - alpha) * (1 - t)
    return a * (1 - pt) ** gamma * bce


def dice_loss(z: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Soft dice per sample, averaged over the supervised samples that contain an anomaly (w: (N,) 0/1):
    a 1-cell threat weighs as much as a false wall."""
    p = torch.sigmoid(z).flatten(1)
    t = t.flatten(1)
    has = (t.sum(1) > 0).float() * w
    d = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return (d * has).sum() / has.sum().clamp(min=1)


def pixel_loss(z: torch.Tensor, t: torch.Tensor, w: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Focal loss summed over each sample's cells and divided by its positive cells (RetinaNet's
    normalisation, per sample): every anomaly counts alike whatever its size, and a negative crop's
    few hard cells are not averaged away by hundreds of easy ones."""
    f = focal_loss(z, t, gamma, alpha).flatten(1).sum(1) / t.flatten(1).sum(1).clamp(min=1)
    return (f * w).sum() / w.sum().clamp(min=1)


def topk_logit(z: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the top-k logits per sample (the score before the sigmoid), optionally inside `valid`."""
    flat = z.float().flatten(1)
    if valid is not None:
        flat = flat.masked_fill(~valid.flatten(1), -1e4)
    k = min(k, flat.shape[1])
    return flat.topk(k, dim=1).values.mean(1)


# ---------------------------------------------------------------- the LightningModule
LOSS_PARTS = ("loss", "pixel", "dice", "mil")


class AnomalyModule(L.LightningModule):
    """AnomalyNet + losses + validation metrics and calibration."""

    def __init__(self, config: dict, info: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = from_dict(Config, config)
        # channels-last (NHWC): oneDNN's fast conv layout; +27 % training crops/s in bf16 on this CPU
        self.model: AnomalyNet = build_model(self.cfg.model).to(memory_format=torch.channels_last)
        self.info = dict(info or {})
        self._val: list[dict] = []
        self.schedule_epochs: int | None = None   # epochs the LR schedule spans (None: trainer.max_epochs)
        self._hardness: dict[str, float] = {}     # per anomaly type, smoothed over validations (hard_types)
        self._top_select = float("-inf")          # the highest val/select so far (checkpoint selection)
        self._epoch_sum: torch.Tensor | None = None  # this epoch's batch-weighted sums of LOSS_PARTS, this rank
        self._epoch_n = 0
        self._val_scores: list[dict] | None = None   # the last validation's per-scan scores (run_review picks from)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x)

    def training_step(self, batch: dict, _: int) -> torch.Tensor:
        c, s = self.cfg.loss, self.model.stride
        z = self.model.logits(nhwc(batch["x"]))
        target = F.max_pool2d(batch["mask"], s)          # a cell is positive if any pixel is
        w = batch["pixel_weight"]
        pix = pixel_loss(z.float(), target, w, c.focal_gamma, c.focal_alpha)
        dice = dice_loss(z.float(), target, w)
        mil = F.binary_cross_entropy_with_logits(topk_logit(z, self.cfg.model.topk), batch["label"])
        loss = pix + c.dice_weight * dice + c.mil_weight * mil
        # Lightning's self.log costs ~1 ms a call on a 1-thread CPU rank: 9 calls a step were ~5 % of its time.
        # Step values go to the logs only on the steps the loggers write (log_every_n_steps), and the epoch
        # means are summed here and logged once, reduced over the ranks, in on_train_epoch_end
        parts = torch.stack([loss, pix, dice, mil]).detach().float()
        self._epoch_sum = parts * len(w) + (self._epoch_sum if self._epoch_sum is not None else 0)
        self._epoch_n += len(w)
        every = self.trainer.log_every_n_steps
        if every > 0 and (self.global_step + 1) % every == 0:   # Lightning's own should_update_logs test
            self.log_dict({f"train/{k}_step": v for k, v in zip(LOSS_PARTS, parts)}, on_step=True, on_epoch=False,
                          batch_size=len(w))
            self.log("loss", parts[0], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch_sum is not None:
            means = self._epoch_sum / max(1, self._epoch_n)
            self.log_dict({f"train/{k}_epoch": v for k, v in zip(LOSS_PARTS, means)}, on_step=False, on_epoch=True,
                          sync_dist=True)
        self._epoch_sum, self._epoch_n = None, 0

    def _scan_outputs(self, batch: dict) -> list[dict]:
        s = self.model.stride
        z = self.model.logits(nhwc(batch["x"])).float().contiguous()
        N, _, h, w = z.shape
        hv = (batch["valid_hw"][:, 0] + s - 1) // s
        wv = (batch["valid_hw"][:, 1] + s - 1) // s
        ys = torch.arange(h, device=z.device).view(1, h, 1)
        xs = torch.arange(w, device=z.device).view(1, 1, w)
        valid = ((ys < hv.view(-1, 1, 1)) & (xs < wv.view(-1, 1, 1)))[:, None]
        score = torch.sigmoid(topk_logit(z, self.cfg.model.topk, valid))
        target = F.max_pool2d(batch["mask"], s, ceil_mode=True)[..., :h, :w]
        near = F.max_pool2d(target, 3, stride=1, padding=1)  # one cell of slack around the anomaly
        top = z.masked_fill(~valid, -1e4).flatten(1).argmax(1)
        out = []
        for i in range(N):
            hit = None
            if batch["has_mask"][i] and target[i].sum() > 0:
                hit = bool(near[i].flatten()[top[i]] > 0)
            out.append({"score": float(score[i]), "label": int(batch["label"][i]), "hit": hit,
                        "type": batch["anomaly_type"][i], "index": int(batch["index"][i])})
        return out

    def validation_step(self, batch: dict, _: int) -> None:
        self._val.extend(self._scan_outputs(batch))

    def test_step(self, batch: dict, _: int) -> None:
        self._val.extend(self._scan_outputs(batch))

    def _gather(self) -> list[dict]:
        rows, self._val = self._val, []
        if self.trainer.world_size > 1:
            import torch.distributed as dist
            parts: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(parts, rows)
            rows = list({r["index"]: r for p in parts for r in p}.values())  # drop sampler padding
        return rows

    def on_validation_epoch_end(self) -> None:
        rows = self._gather()
        if self.trainer.sanity_checking or not rows:
            return
        m = evaluate_rows(rows)
        # unrounded: a policy tier derives its threshold from normal_scores, and at a rate of the table it must be
        # the table's own (rounded to 6 decimals it sat up to 5e-7 off, routing a truck there otherwise)
        normal = sorted(r["score"] for r in rows if r["label"] == 0)
        self.info.update({"thresholds": threshold_table(normal, CALIBRATION_RATES) if normal else [],
                          "normal_scores": [float(v) for v in normal], "validation": m})
        # every rank computed the same figures from the gathered rows: syncing averages equal values
        # a figure undefined here (no anomalous validation scan) is left out: logged as 0.0 it drew a measured zero
        # in the curves where metrics.json and the summary say n/a; val/select and val/progress are always defined
        figures = {f"val/{k}": m[k] for k in ("auroc", "ap", "det_at_1pct") if m[k] is not None}
        self.log_dict({**figures, "val/select": m["select"]}, prog_bar=True, sync_dist=True)
        self.log("val/progress", m["progress"], prog_bar=False, sync_dist=True)
        # best.ckpt follows val/choice: this epoch's number if it is within noise of the best so far, else -1
        self._top_select = max(self._top_select, m["select"])
        keep = within_noise(m["select"], self._top_select, m["n_anomalous"], self.cfg.trainer.select_se)
        self.log("val/choice", float(self.current_epoch) if keep else -1.0, prog_bar=False, sync_dist=True)
        self._write_hard_types(rows)
        self._keep_val_scores(rows)

    def _keep_val_scores(self, rows: list[dict]) -> None:
        """Each validation scan's path, label and score, for the checkpoints: the run's review draws the normal scans
        that set the threshold and the missed anomalies of best.ckpt's own validation (detector.run_review)."""
        recs = getattr(getattr(self.trainer, "datamodule", None), "splits", {}).get("val")
        if recs is not None:
            self._val_scores = [{"path": recs[r["index"]].path, "label": r["label"], "score": r["score"]}
                                for r in sorted(rows, key=lambda r: r["index"])]

    def _write_hard_types(self, rows: list[dict]) -> None:
        """RUN/hard_types.json: per-type hardness on this validation (smoothed) and the crop workers'
        sampling weights (data.hard_types > 0 only; rank 0 writes, every rank's workers read)."""
        dm = getattr(self.trainer, "datamodule", None)
        path, share = getattr(dm, "hard_types_file", None), self.cfg.data.hard_types
        if path is None or share <= 0:
            return
        self._hardness = smooth(self._hardness, type_hardness(rows))
        if self.trainer.is_global_zero and self._hardness:
            write_atomic(path, {"hardness": self._hardness, "weights": type_weights(self._hardness, share)})

    def on_test_epoch_end(self) -> None:
        self.test_rows = self._gather()
        self.test_metrics = evaluate_rows(self.test_rows)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["detector_info"] = json.loads(json.dumps(self.info))
        checkpoint["detector_top_select"] = self._top_select
        checkpoint["detector_hardness"] = dict(self._hardness)   # smoothed over validations: a resume smooths on
        if self._val_scores is not None:
            checkpoint["detector_val_scores"] = self._val_scores

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the last validation carries on; what describes the run (its config, data, scans) is this run's, which a resume
        # may have changed
        saved = checkpoint.get("detector_info", {})
        self.info.update({k: saved[k] for k in ("thresholds", "normal_scores", "validation") if k in saved})
        self._top_select = checkpoint.get("detector_top_select", self._top_select)
        self._hardness = dict(checkpoint.get("detector_hardness", self._hardness))
        self._val_scores = checkpoint.get("detector_val_scores", self._val_scores)

    def configure_optimizers(self) -> dict:
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        max_epochs = max(1, int(self.trainer.max_epochs))
        per_epoch = max(1, int(self.trainer.estimated_stepping_batches)) / max_epochs

        def lr_at(step: int) -> float:
            # warmup and cosine span the planned run: a TimeBudget re-plans it after each epoch, so with a
            # generous max_epochs the budget, not the epoch count, sets the schedule on any machine
            total = max(2, round(per_epoch * (self.schedule_epochs or max_epochs)))
            warm = max(1, round(total * o.warmup_fraction))
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def evaluate_rows(rows: list[dict]) -> dict:
    """AUROC, AP, detection at 1% / 0.1% false alarms, localisation and per-type detection."""
    y = np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows])
    both = (y == 0).any() and (y == 1).any()
    det1 = metrics.detection_at_1pct(y, s) if both else None
    det01 = metrics.detection_at_01pct(y, s) if both else None
    auroc = metrics.auroc(y, s) if both else None
    hits = [r["hit"] for r in rows if r["hit"] is not None]
    per_type: dict[str, dict] = {}
    if both:
        t1 = metrics.threshold_at_far(y, s, 0.01)
        for kind in sorted({r["type"] for r in rows if r["label"] == 1}):
            ks = [r["score"] for r in rows if r["label"] == 1 and r["type"] == kind]
            per_type[kind or "unknown"] = {"n": len(ks), "det_at_1pct": float(np.mean(np.array(ks) >= t1))}
    return {"n": len(rows), "n_normal": int((y == 0).sum()), "n_anomalous": int((y == 1).sum()),
            "auroc": auroc, "ap": metrics.average_precision(y, s) if both else None,
            "det_at_1pct": det1, "det_at_0.1pct": det01,
            "top_region_hit": float(np.mean(hits)) if hits else None, "n_localised": len(hits),
            "per_type": per_type,
            # checkpoint selection: detection at 1% first, AUROC breaks ties; no anomalies -> low normal scores
            "select": (det1 or 0.0) + 1e-3 * (auroc or 0.0) - (0.0 if both else float(np.mean(s)) * 1e-3),
            # early stopping: AUROC moves smoothly while detection at 1% of a small validation set jumps in
            # steps and plateaus for many epochs (it stopped a still-improving run at epoch 11)
            "progress": auroc if both else -float(np.mean(s))}


def within_noise(select: float, top: float, n_anomalous: int, se: float) -> bool:
    """Whether a validation's `select` is within `se` standard errors of the best so far (`top`), the error
    being that of a difference of two detection rates near 50 % on n validation anomalies, sqrt(0.5 / n):
    0.1 (5 anomalies) on 50. Such a later epoch becomes best.ckpt: on a small validation set the highest
    detection at 1 % false alarms is mostly luck (its threshold is the top normal score or two, whose own
    noise that error leaves out), and picking it picked an earlier, less annealed epoch that tested worse
    than the last one (docs/experiments.md). Without validation anomalies there is no detection figure, and the
    lowest normal scores picked the first, barely trained epoch: every epoch is then within noise (the latest kept)."""
    return n_anomalous <= 0 or select >= top - se * math.sqrt(0.5 / n_anomalous)


# ---------------------------------------------------------------- fit
def scan_heights_mm(metas: list[dict], model_pitch_mm: float) -> list[float] | None:
    """[lowest, highest] height of the training scans in mm (their model-pitch rows x the pitch): the station
    refuses a scan far outside it, the sign of a wrong pixel pitch (bundle.HEIGHT_TOLERANCE)."""
    heights = [m["shape"][1] * model_pitch_mm for m in metas]
    return [float(min(heights)), float(max(heights))] if heights else None


def run_training(config: Config | str | Path | None, data_dir: str | Path, out_dir: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = (), resume: str | None = None,
                 accelerator: str | None = None, quiet: bool = False, init: str | None = None) -> dict:
    """Fit, calibrate on validation, write RUN/{best,last}.ckpt, config.yaml, metrics.json; return metrics.
    Under DDP (several GPUs, or trainer.cpu_processes > 1) Lightning re-runs the calling command once per
    extra process; there this returns {} and the caller should just exit (rank 0 writes and returns)."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        cfg = load_config(None, [*flatten(to_dict(cfg)), *overrides])
    if accelerator:
        cfg.trainer.accelerator = accelerator
    if init:   # --init: the same as model.init=PATH, without YAML reading the path
        cfg.model.init = str(init)
        try:
            check_model_config(cfg.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    resumed = read_checkpoint(resume) if resume is not None else None   # a wrong --resume fails now, not after caching
    started = resumed["hyper_parameters"]["config"].get("model", {}).get("init") if resumed is not None else None
    if resumed is not None and cfg.model.init and cfg.model.init != started:
        # the same command with --resume (what a stopped run prints) goes on; another start is another run
        raise ConfigError(f"model.init {cfg.model.init} with --resume {resume}: that run did not start from it, and a "
                          "resumed run goes on from its own weights; give one of them")
    changed = check_resumable(resumed, cfg, resume) if resumed is not None else []
    # a fine-tune's starting network (a resume has its own weights); read now too, before the scans are cached
    start = read_init(cfg.model.init) if cfg.model.init and resume is None else None
    init_changes = check_initialisable(start, cfg, cfg.model.init) if start is not None else []
    check_hardware(cfg.trainer)
    load_records(data_dir)   # a wrong --data or a manifest cell that cannot be used, before the run folder is touched
    asked = to_dict(cfg.trainer)              # RUN/config.yaml keeps cpu_processes, not its DDP settings
    batch = resolve_cpu_processes(cfg)
    workers = resolve_workers(cfg)
    out = Path(out_dir or f"runs/{cfg.name}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the run (checkpoints, config.yaml, metrics.json)")
    try:   # and one it can write in: else the first checkpoint fails, after the caching and an epoch
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot make the run folder or write in it ({e.strerror or e})") from None
    with hold_run_folder(out):   # refused while another run trains into it
        if resume is None:
            _warn_if_replacing(out)
        elif changed:
            _rank_zero_warn(f"resuming {resume} with settings other than its run's: {', '.join(changed)}")
        if init_changes:
            _rank_zero_warn(f"model.init {cfg.model.init} learnt under other preprocessing settings than this run's: "
                            f"{', '.join(init_changes)}")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        if not torch.cuda.is_available():   # torch's default counts the cores, not a container's CPU quota
            torch.set_num_threads(cpu_threads(cfg.trainer, torch.get_num_threads()))
        _say_cpu_quota(workers)
        t0 = time.time()
        found = file_id(out / "last.ckpt")   # an earlier run's, until this run writes its own
        hard_file, types_file = out / "hard_negatives.json", out / "hard_types.json"
        data = dataclasses.replace(cfg.data, batch_size=batch, workers=workers)
        dm = ScanDataModule(data_dir, data, cfg.preprocessing, cfg.data.cache_dir or out / "cache", hard_file,
                            types_file)
        try:
            dm.prepare_data()
            dm.setup("fit")
        except ScanError as e:   # a split emptied by unreadable scans: the file lists them all, the message one
            if not dm.skipped:
                raise
            n = dm.write_skipped(out / "skipped_scans.csv")
            raise ScanError(e.path, f"{e.reason}; {out / 'skipped_scans.csv'} lists the {n} unreadable scans") from None
        _clear_earlier_results(out, fresh=resume is None)   # only now: a run stopped while caching leaves them
        cfg.model.in_channels = dm.channels
        val_anomalies = sum(r.label == 1 for r in dm.splits["val"])
        cfg.data.channels = dm.channels
        cfg.data.normal_only = dm.cfg.normal_only          # switched on when no training scan is anomalous
        saved = {**to_dict(cfg), "trainer": asked}
        with replacing(out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(saved, sort_keys=False))
        info = {"channels": dm.channels, "energies": dm.energies, "pitch_mm": cfg.preprocessing.model_pitch_mm,
                "preprocessing": cfg.preprocessing.to_dict(), "stride": cfg.model.stride,
                "score": {"method": "topk_mean_logit", "k": cfg.model.topk}, "thresholds": [], "normal_scores": [],
                "validation": {}, "train_config": saved, "data_fingerprint": fingerprint(dm.records, cfg.data.pitch_mm),
                "scan_height_mm": scan_heights_mm(dm.metas["train"], cfg.preprocessing.model_pitch_mm)}
        was = ((resumed or {}).get("detector_info") or {}).get("data_fingerprint")
        if was and was != info["data_fingerprint"]:
            _rank_zero_warn(f"resuming {resume} on other data than the checkpoint's ({info['data_fingerprint']}, "
                            f"was {was}): the scans, their labels, their splits or data.pitch_mm differ")
        if start is not None:   # where the network came from travels in metrics.json and the checkpoints
            info["initialised_from"] = {"checkpoint": str(cfg.model.init), "epochs": int(start.get("epoch", -1)) + 1,
                                        "data_fingerprint": (start.get("detector_info") or {}).get("data_fingerprint")}
        elif (was_from := ((resumed or {}).get("detector_info") or {}).get("initialised_from")) is not None:
            info["initialised_from"] = was_from   # a resumed fine-tune started there too
        resumed = None   # the weights are read again by Lightning
        module = AnomalyModule(saved, info)
        if start is not None:
            load_initial_weights(module.model, start, cfg.model.init)
            start = None   # its optimiser state and the rest are not needed: free them before the fit

        from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
        ckpt = ModelCheckpoint(dirpath=out, filename="best", monitor="val/choice", mode="max",
                               enable_version_counter=False, auto_insert_metric_name=False)
        # last.ckpt = the state after every epoch (resume, and the annealed end of the schedule): Lightning's
        # own save_last writes only when `best` is saved, so its "last" was the best epoch, not the last
        last = ModelCheckpoint(dirpath=out, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                               save_on_train_epoch_end=True, enable_version_counter=False)
        timer = EpochTimer(started=t0)
        callbacks = [ckpt, last, LearningRateMonitor("step"), ValidateLastEpoch(cfg.trainer.val_every), timer]
        if cfg.trainer.max_minutes > 0:
            callbacks.append(TimeBudget(cfg.trainer.max_minutes, started=t0))
        early = EarlyStopping("val/progress", mode="max", patience=cfg.trainer.patience)
        if cfg.trainer.patience > 0 and not val_anomalies:
            _rank_zero_warn(f"trainer.patience {cfg.trainer.patience} ignored: validation has no anomalous scans, so "
                            "there is no detection figure to stop on (its normal scores rise as the network learns)")
        elif cfg.trainer.patience > 0:  # 0 = off: stopping early also cuts the cosine schedule before it anneals
            callbacks.append(early)
        if cfg.data.mine_share > 0 and cfg.data.hard_negative_fraction > 0:
            callbacks.append(HardNegativeMiner(share=cfg.data.mine_share))   # mines with the live weights
        if cfg.trainer.ema_decay > 0:  # validation, best/last.ckpt's state_dict and the test use the average
            callbacks.append(EMAWeightAveraging(decay=cfg.trainer.ema_decay))
        strategy = cfg.trainer.strategy
        if strategy == "ddp":   # as resolve_cpu_processes sets it: BN statistics synced once an epoch, not every step
            from lightning.pytorch.strategies import DDPStrategy
            strategy = DDPStrategy(**ddp_without_step_buffer_sync())
            callbacks.append(AverageBatchNormStats())
        with lightning_noise_off():
            trainer = L.Trainer(max_epochs=cfg.trainer.max_epochs, accelerator=cfg.trainer.accelerator,
                                devices=cfg.trainer.devices, strategy=strategy,
                                precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
                                callbacks=callbacks, logger=[CSVLogger(out, name="logs", version=""),
                                                             TensorBoardLogger(out, name="tb", version="")],
                                plugins=[AtomicCheckpointIO()],
                                log_every_n_steps=cfg.trainer.log_every_n_steps, num_sanity_val_steps=0,
                                check_val_every_n_epoch=cfg.trainer.val_every,
                                enable_progress_bar=not quiet, enable_model_summary=not quiet, deterministic=False)
            kept_log = _set_log_aside(out / "logs" / "metrics.csv") if resume and trainer.is_global_zero else None
            try:
                with stopped_by_signal(trainer, out, "in epoch {epoch} of {epochs}", found, resume):
                    trainer.fit(module, datamodule=dm, ckpt_path=resume)
            except TrainingInterrupted:   # rank 0: what it logged is drawn
                curves_when_stopped(out)
                raise
        if kept_log is not None:
            _merge_logs(kept_log, out / "logs" / "metrics.csv")
            kept_log.unlink()
        best = Path(ckpt.best_model_path or out / "last.ckpt")
        train_s = round(timer.total_s(), 1)   # a resumed run: its time before the checkpoint too
        tested = bool(cfg.trainer.test and dm.splits["test"])
        if tested:  # every rank takes part (DDP: a share of the scans each)
            # the sampler's repeated scans are dropped by index in _gather, and the checkpoint's callbacks are
            # left out on purpose (EMA would reload the raw weights)
            with lightning_noise_off("Using `DistributedSampler` with the dataloaders. During `trainer.test",
                                      "Be aware that when using `ckpt_path`, callbacks used to create"):
                tester = L.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                                   strategy=cfg.trainer.strategy, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=not quiet, enable_model_summary=False)
                with stopped_by_signal(tester, out, "while testing best.ckpt (the training had finished)", found, resume):
                    tester.test(module, datamodule=dm, ckpt_path=str(best), verbose=False)
        if not trainer.is_global_zero:
            return {}
        _, best_info = load_checkpoint(best)
        result = {"name": cfg.name, "best_checkpoint": str(best), "epochs": trainer.current_epoch,
                  "max_epochs": cfg.trainer.max_epochs, "max_minutes": cfg.trainer.max_minutes,
                  "train_time_s": train_s, "epoch_s": timer.seconds, "validation": best_info["validation"],
                  "best_epoch": read_checkpoint(best)["epoch"] + 1, "selection": selection(cfg.trainer, val_anomalies),
                  "stopped": stopped_by(cfg.trainer, trainer.current_epoch, early.stopped_epoch > 0),
                  "thresholds": best_info["thresholds"], "normal_scores": best_info["normal_scores"],
                  "data_fingerprint": info["data_fingerprint"], "initialised_from": info.get("initialised_from"),
                  "skipped_scans": dm.write_skipped(out / "skipped_scans.csv")}
        if tested:
            result["test"] = module.test_metrics
            write_test_scores(out / "test_scores.csv", module.test_rows, dm.splits["test"])
        result["review"] = review_quietly(out, best, dm, tensorboard(trainer), trainer.global_step)
        with replacing(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        return result


def tensorboard(trainer: L.Trainer):
    """The SummaryWriter of the run's TensorBoard logger, None where it has none."""
    from lightning.pytorch.loggers import TensorBoardLogger
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def hold_run_folder(out: Path):
    """RUN/train.lock, held for the whole run (rank 0; DDP's other ranks re-run the command inside rank 0's run): two
    runs into one folder deleted and rewrote each other's files and checkpoints. ConfigError while another holds it."""
    if rank_zero_only.rank != 0:
        return contextlib.nullcontext()
    lock = out / "train.lock"
    try:
        return hold_lock(lock, f"--out {out} is in use by another `detector train` (lock {lock}): wait for it to end, "
                               "or give another --out")
    except BlockingIOError as e:
        raise ConfigError(str(e)) from None


def selection(t: TrainerConfig, val_anomalies: int) -> str:
    """How best.ckpt was chosen, for metrics.json: a user of a small validation set must know what it rests on."""
    if not val_anomalies:
        return "the latest validated epoch: validation has no anomalous scans, so nothing to rank epochs by"
    return (f"the latest validated epoch within {t.select_se:g} standard errors (trainer.select_se) of the best "
            f"detection at 1 % false alarms on {val_anomalies} validation anomal{'y' if val_anomalies == 1 else 'ies'}")


def stopped_by(t: TrainerConfig, epochs: int, early: bool) -> str | None:
    """What ended a run before trainer.max_epochs (None: it ran them all), for metrics.json and the summary line."""
    if early:
        return f"early stopping, trainer.patience {t.patience}"
    if epochs < t.max_epochs and t.max_minutes > 0:
        return f"time budget {t.max_minutes:g} min"
    return None


FULL_DISK = {errno.ENOSPC, errno.EDQUOT}   # a disk or quota filled while the run wrote its folder


class TrainingInterrupted(Exception):
    """A run stopped by Ctrl-C, SIGTERM or a full disk; the message says what its folder holds and how to continue it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def file_id(path: Path) -> tuple | None:
    """(device, inode, mtime ns, size) of a file, None where there is none: tells a file written since from the one
    that was there (a checkpoint is replaced by a rename: a new inode; no clock is compared, an NFS server's may
    differ)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def stopped_by_signal(trainer: L.Trainer, out: Path, where: str, found: tuple | None = None, resume: str | None = None):
    """TrainingInterrupted (rank 0; SystemExit on the others) when Ctrl-C, SIGTERM or a full disk ends a fit or test:
    Lightning exits 1 on Ctrl-C and 0 on SIGTERM (a supervisor took it for success), without a word, and a full disk
    was a traceback; a SIGTERM sent to the whole process group (systemd, a batch scheduler) kills the loader workers
    first, a RuntimeError. `where` may
    name {epoch} (the one stopped, from 1) and {epochs} (the config's count). `found`: file_id of RUN/last.ckpt when
    the run started (an earlier run's, which this run has not replaced until it writes its own); `resume`: the
    checkpoint it resumed, what continues it while it has written none."""
    try:
        yield
    except BaseException as e:
        if trainer.received_sigterm:
            how, code = "SIGTERM", 143
        elif isinstance(e, KeyboardInterrupt) or (type(e) is SystemExit and trainer.interrupted):
            how, code = "Ctrl-C", 130
        elif isinstance(e, OSError) and e.errno in FULL_DISK:   # the checkpoints are whole: resuming loses nothing
            how, code = f"a full disk ({e.strerror}{f': {e.filename}' if e.filename else ''})", 1
        else:
            raise
        if not trainer.is_global_zero:
            raise SystemExit(code) from None
        said = where.format(epoch=trainer.current_epoch + 1, epochs=trainer.max_epochs)
        raise TrainingInterrupted(f"stopped by {how} {said}; {_how_to_continue(out / 'last.ckpt', found, resume)}",
                                  code) from None


def _how_to_continue(last: Path, found: tuple | None, resume: str | None) -> str:
    """What continues a stopped run: its own last.ckpt, else the checkpoint it resumed; never an earlier run's."""
    ours = file_id(last) not in (None, found)
    ck = last if ours else Path(resume) if resume is not None else None
    try:
        done = int(read_checkpoint(ck).get("epoch", -1)) + 1 if ck is not None else 0
    except CheckpointError:
        done = 0
    if done:
        return (f"{ck} holds the {done} epoch(s) before it: continue with the same command and --resume "
                f"{shlex.quote(str(ck))}")
    earlier = f" ({last} is an earlier run's)" if not ours and last.is_file() else ""
    return f"no epoch of this run finished, nothing to resume: run it again{earlier}"


class _NoAdverts(logging.Filter):
    """Drops Lightning's advert for its cloud logging service (printed on every fit): this tool never uses
    the network, and a station engineer should not be pointed at a cloud platform."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


@contextlib.contextmanager
def lightning_noise_off(*also: str):
    """Silence what Lightning prints on every run and that asks nothing of the user: "checkpoint directory
    not empty" (RUN always holds config.yaml by then; an earlier run's checkpoints get their own warning,
    _warn_if_replacing), "logs directory not empty" (a resumed run's earlier logs are kept: _set_log_aside),
    a torch-version deprecation inside Lightning, the model summary's bf16 notice, the advert, and the
    warnings that start with `also`. Other warnings pass."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    advert = _NoAdverts()
    log.addFilter(advert)
    try:
        with warnings.catch_warnings():
            for text in (r"Checkpoint directory .* exists and is not empty", r"Experiment logs directory .* exists and is not",
                         r"`isinstance\(treespec, LeafSpec\)`",
                         r"Precision .* is not supported by the model summary", *map(re.escape, also)):
                warnings.filterwarnings("ignore", text)
            yield
    finally:
        log.removeFilter(advert)


def _rank_zero_warn(message: str) -> None:
    """A warning from rank 0 only: DDP re-runs the command once per extra process."""
    from lightning.pytorch.utilities import rank_zero_warn
    rank_zero_warn(message)


def _say_cpu_quota(workers: int) -> None:
    """Where a cgroup CPU quota (docker --cpus, a pod's limits.cpu) set the CPU count, say so at start and what it
    sized (rank 0 only): a run in a container on a many-core host is otherwise slower with no word why."""
    from lightning.pytorch.utilities import rank_zero_only
    words = quota_words()
    if words and rank_zero_only.rank == 0:
        print(f"detector train: {usable_cpus()} usable CPU(s){words}: torch on {torch.get_num_threads()} thread(s) "
              f"per process, {workers} loader worker(s) each", file=sys.stderr, flush=True)


def _warn_if_replacing(out: Path) -> None:
    """A new run into a folder that holds an earlier run's checkpoints replaces them: say so, and how to continue
    that run instead (rank 0 only: DDP re-runs the command once per extra process)."""
    old = [f for f in ("best.ckpt", "last.ckpt") if (out / f).exists()]
    if old:
        _rank_zero_warn(f"{out} holds {' and '.join(old)} of an earlier run: this run replaces them "
                       f"(--resume {out / 'last.ckpt'} continues that run instead)")


def _clear_earlier_results(out: Path, fresh: bool) -> None:
    """Remove an earlier run's metrics.json and test_scores.csv (written at the end: a run stopped before it leaves
    none) and, for a new run (`fresh`), its hard negatives, type weights and TensorBoard curves, which belong to an
    earlier model. Called once the data is ready, so a run stopped while caching leaves the folder as it was."""
    for old in ("metrics.json", "test_scores.csv"):
        (out / old).unlink(missing_ok=True)
    clear_review(out)   # curves.png and review/: drawn again at the end, from this run's best.ckpt
    if not fresh:
        return
    (out / "hard_negatives.json").unlink(missing_ok=True)
    (out / "hard_types.json").unlink(missing_ok=True)
    # TensorBoard draws every file in tb/ as one run; rank 0 only: DDP's other ranks re-run this command once rank 0
    # has opened its own file
    for events in (out / "tb").glob("events.out.tfevents.*") if rank_zero_only.rank == 0 else ():
        events.unlink()


def _set_log_aside(log: Path) -> Path | None:
    """Lightning's CSV logger deletes RUN/logs/metrics.csv when a fit starts, which would lose a resumed run's
    earlier epochs: copy it aside first (crash-safe: a copy left by an interrupted resume is merged, not
    overwritten) and merge it back after the fit (_merge_logs)."""
    kept = log.with_name("metrics.before_resume.csv")
    if kept.is_file() and log.is_file():
        _merge_logs(kept, log, dest=kept)
    elif log.is_file():
        shutil.copyfile(log, kept)
    return kept if kept.is_file() else None


def _merge_logs(earlier: Path, later: Path, dest: Path | None = None) -> None:
    """`dest` (default `later`) = the rows of `earlier` logged before `later`'s first step, then `later`'s rows;
    the columns of both."""
    def rows(path: Path) -> tuple[list[str], list[dict]]:
        if not path.is_file():
            return [], []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    (old_keys, old), (new_keys, new) = rows(earlier), rows(later)
    first = min((int(r["step"]) for r in new if r.get("step")), default=None)
    old = [r for r in old if first is None or not r.get("step") or int(r["step"]) < first]
    with replacing(dest or later) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, [*old_keys, *(k for k in new_keys if k not in old_keys)])
        w.writeheader()
        w.writerows(old + new)


def write_test_scores(path: Path, rows: list[dict], records: list) -> None:
    """RUN/test_scores.csv: one row per test scan (path, label, type, score, top region on the anomaly)."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "anomaly_type", "score", "top_region_hit"])
        for r in sorted(rows, key=lambda r: r["index"]):
            hit = "" if r["hit"] is None else int(r["hit"])
            w.writerow([records[r["index"]].path, r["label"], r["type"], f"{r['score']:.9g}", hit])


def review_line(review: dict | None, run: Path) -> str:
    """The summary's line on the run's pictures: where they are, and why a role has none."""
    if not review:
        return f"review: not drawn (see the warning above); curves in {run / 'logs' / 'metrics.csv'}"
    why = next((n.split(": ", 1)[1] for n in review["notes"] if n.startswith("review: validation has no")), "")
    return (f"review: {len(review['pictures'])} validation scan(s) at the 1 % threshold in {review['folder']}, curves "
            f"in {run / 'curves.png'}" + (f" ({why})" if why else ""))


def main(args) -> int:
    """The `train` verb."""
    try:
        res = run_training(args.config, args.data or "data/synth", args.out, args.overrides or [],
                           resume=args.resume, accelerator=args.accelerator, init=args.init)
    except (ConfigError, ScanError, CheckpointError) as e:   # the user's config, data or --resume: one line
        print(f"detector train: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"detector train: {e}", file=sys.stderr)
        return e.exit_code
    if not res:
        return 0
    v, th = res["validation"], {f"{r['false_alarm_rate']:.1%}": round(r["threshold"], 4) for r in res["thresholds"]}
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    cut = f" of {res['max_epochs']}: {res['stopped']}" if res.get("stopped") else ""
    na, nn = v.get("n_anomalous") or 0, v.get("n_normal") or 0
    why = (" (validation has no anomalous scans)" if nn and not na else
           f" (on {na} anomalous and {nn} normal validation scans)" if 0 < na < FEW_VAL_ANOMALIES else "")
    print(f"trained {res['name']} in {res['train_time_s']:.0f}s ({res['epochs']} epochs{cut}): val AUROC {fmt(v.get('auroc'))}"
          f"{why} AP {fmt(v.get('ap'))} det@1% {fmt(v.get('det_at_1pct'))}; thresholds {th}; "
          f"{'best.ckpt: epoch %d ' % res['best_epoch'] if res.get('best_epoch') else ''}-> {res['best_checkpoint']}")
    run = Path(res["best_checkpoint"]).parent
    if (short := unresolved_warning(res["thresholds"])) is not None:
        print(f"warning: {short}", file=sys.stderr)
    if res.get("skipped_scans"):
        print(f"left out {res['skipped_scans']} unreadable scan(s): {run / 'skipped_scans.csv'} says which and why",
              file=sys.stderr)
    print(review_line(res.get("review"), run))
    print(f"next: detector export {shlex.quote(str(run / 'best.ckpt'))} --out {shlex.quote(str(run / 'model.onnx'))}")
    return 0

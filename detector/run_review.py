"""What a training run shows its engineer at its end: RUN/curves.png and RUN/review/.

curves.png: the training loss and its parts, and validation AUROC and detection at 1 % false alarms, per epoch, from
RUN/logs/metrics.csv. review/: overlays of a few validation scans scored by best.ckpt at its calibrated 1 % threshold,
drawn by the station's own code (detector.report, detector.runtime's regions and score rule): the highest-scoring
normal scans (the false alarms behind the threshold), the lowest-scoring anomalous ones (the misses) and the best-found
anomalies. Which scans: the per-scan validation scores best.ckpt holds (`detector_val_scores`); only those few scans
are run through the network again, for their heatmaps. Training side (torch). A picture that cannot be drawn is a
warning line, never a failed run.
"""
from __future__ import annotations

import csv
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector import report
from detector.manifest import shown
from detector.metrics import mask_boxes
from detector.preprocess import valid_cells
from detector.runtime import heatmap_regions

N_ALARMS, N_MISSES, N_FOUND = 4, 4, 2     # pictures of each role at most
REVIEW_RATE = 0.01                        # the calibrated false-alarm rate the review routes at
LOSSES = ("loss", "pixel", "dice", "mil")
FIGURES = {"val/auroc": "AUROC", "val/det_at_1pct": "detection at 1 % false alarms"}


# ---------------------------------------------------------------- curves.png
def epoch_series(log: Path) -> dict[str, dict[int, float]]:
    """{column: {epoch (from 1): its last value in that epoch}} of the per-epoch columns of a Lightning metrics.csv;
    an epoch a column has no value for (validation every 2nd epoch, or none) is absent from it."""
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [f"train/{k}_epoch" for k in LOSSES] + list(FIGURES)
    out: dict[str, dict[int, float]] = {k: {} for k in keys}
    for r in rows:
        if not (r.get("epoch") or "").strip():
            continue
        for k in keys:
            if (r.get(k) or "").strip():
                out[k][int(float(r["epoch"])) + 1] = float(r[k])
    return out


def plot_curves(log: Path, path: Path, best_epoch: int | None = None) -> Path:
    """curves.png: loss parts (left) and validation figures (right) per epoch, markers on the epochs that have one,
    best.ckpt's epoch dashed; a panel with nothing to draw says why."""
    series = epoch_series(log)
    plt = report._plt()
    from matplotlib.ticker import MaxNLocator
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, keys, names, empty in (
            (left, [f"train/{k}_epoch" for k in LOSSES], LOSSES, "no finished training epoch"),
            (right, list(FIGURES), list(FIGURES.values()),
             "no validation figure: no validation ran, or it has no anomalous scans")):
        drawn = False
        for key, name in zip(keys, names):
            pts = sorted(series[key].items())
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, lw=1.4, label=name)
                drawn = True
        if best_epoch and drawn:
            ax.axvline(best_epoch, color="k", ls="--", lw=1, label=f"best.ckpt (epoch {best_epoch})")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=9, transform=ax.transAxes, wrap=True)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if series["train/loss_epoch"]:   # one epoch axis: validation every 2nd epoch lines up with its losses
        right.set_xlim(left.get_xlim())
    left.set_title("training loss (epoch means)")
    right.set_title("validation")
    right.set_ylim(0, 1.02)
    return report._save_figure(plt, fig, path)


# ---------------------------------------------------------------- review/
def pick(scores: list[dict], threshold: float) -> list[tuple[str, int, dict]]:
    """(role, rank from 1, scan) of the scans to draw: the N_ALARMS highest normal scores (`false_alarm` where they
    reach the threshold, else `highest_normal`), the N_MISSES lowest anomalous ones (`miss` under it, else
    `weakest_found`), then the N_FOUND highest anomalous ones not drawn yet that reach it (`found`)."""
    normal = sorted((s for s in scores if s["label"] == 0), key=lambda s: -s["score"])[:N_ALARMS]
    anomalous = sorted((s for s in scores if s["label"] == 1), key=lambda s: s["score"])
    low = anomalous[:N_MISSES]
    best = [s for s in reversed(anomalous[len(low):]) if s["score"] >= threshold][:N_FOUND]
    out = [("false_alarm" if s["score"] >= threshold else "highest_normal", i, s) for i, s in enumerate(normal, 1)]
    out += [("miss" if s["score"] < threshold else "weakest_found", i, s) for i, s in enumerate(low, 1)]
    return out + [("found", i, s) for i, s in enumerate(best, 1)]


def file_name(role: str, rank: int, path: str) -> str:
    """`<role>_<rank>_<scan stem>.png`, the stem in characters any file system takes."""
    stem = re.sub(r"[^\w.-]+", "_", Path(path).stem)[:80] or "scan"
    return f"{role}_{rank}_{stem}.png"


@torch.no_grad()
def scan_picture(model: Any, dataset: Any, i: int, stride: int, score: float, threshold: float, role: str
                 ) -> np.ndarray:
    """The overlay of validation scan i (at the model's pitch, as validation read it): its validation `score` (the one
    the threshold was calibrated on; the heatmap is run again in float32, which a bf16 run's validation was not), the
    heatmap over the scan's own cells, the station's regions, the true boxes dashed."""
    from detector.model import nhwc
    item = dataset[i]
    x, (h, w) = item["x"][None], (int(v) for v in item["valid_hw"])
    logits = model.logits(nhwc(x)).float()[0, 0].numpy()
    hv, wv = valid_cells(h, w, stride)
    heat = 1.0 / (1.0 + np.exp(-logits[:hv, :wv].astype(np.float64)))
    regions = [r.to_dict() for r in heatmap_regions(heat, (stride, stride), h, w, min(0.5, threshold), 10)]
    att, _ = dataset.cache.load(dataset.metas[i])
    truth = mask_boxes(item["mask"][0, :h, :w].numpy()) if item["has_mask"] else []
    decision = "INSPECT" if score >= threshold else "RELEASE"
    banner = report.verdict_banner(decision, score, threshold, f"{role}  {shown(dataset.recs[i].path)}")
    return report.render(np.asarray(att), regions=regions, heatmap=heat, truth_boxes=truth, banner=banner,
                         flagged=decision == "INSPECT")


def clear(out: Path) -> None:
    """Remove an earlier run's curves.png and review pictures (they show another model)."""
    (out / "curves.png").unlink(missing_ok=True)
    shutil.rmtree(out / "review", ignore_errors=True)


def draw_review(out: Path, best: Path, dm: Any, tb: Any = None, step: int = 0) -> dict:
    """RUN/curves.png and RUN/review/*.png (plus the same into TensorBoard `tb`, a SummaryWriter, where given);
    returns what metrics.json records: the folder, each picture (file, role, scan, label, score), the threshold,
    notes (what could not be drawn, or why a role has no picture) and the seconds it took."""
    from detector.checkpoint import load_checkpoint, read_checkpoint
    from detector.data import ScanDataset
    t0, notes, pictures = time.perf_counter(), [], []
    clear(out)
    best_epoch = None
    try:
        ck = read_checkpoint(best)
        best_epoch = int(ck.get("epoch", -1)) + 1 or None
        scores = ck.get("detector_val_scores")
    except Exception as e:   # noqa: BLE001 (a picture never fails a run)
        ck, scores = None, None
        notes.append(f"review: cannot read {best}: {e}")
    images = []
    log = out / "logs" / "metrics.csv"
    try:
        if log.is_file():
            images.append(("curves", plot_curves(log, out / "curves.png", best_epoch)))
        else:
            notes.append(f"curves.png: no {log} (no epoch logged)")
    except Exception as e:   # noqa: BLE001
        notes.append(f"curves.png: {e}")
    model, info = (None, {})
    if ck is not None:
        model, info = load_checkpoint(best)
    threshold = next((t["threshold"] for t in info.get("thresholds") or [] if t["false_alarm_rate"] == REVIEW_RATE),
                     None)
    if ck is not None and scores is None:
        notes.append(f"review: {best} holds no per-scan validation scores (no validation ran, or an older version "
                     "wrote it)")
    elif ck is not None and threshold is None:
        notes.append("review: validation has no normal scans, so no calibrated threshold to review at")
    elif ck is not None:
        where = {r.path: i for i, r in enumerate(dm.splits["val"])}
        known = [s for s in scores if s["path"] in where]
        if not any(s["label"] == 1 for s in known):
            notes.append("review: validation has no anomalous scans: no misses or found anomalies to show")
        ds = ScanDataset(dm.cache, dm.splits["val"], dm.metas["val"], dm.pre)
        stride = int(info["stride"])
        for role, rank, s in pick(known, threshold):
            name = file_name(role, rank, s["path"])
            try:
                img = scan_picture(model, ds, where[s["path"]], stride, s["score"], threshold, role)
                images.append((f"review/{name[:-4]}", report.write_png(out / "review" / name, img)))
                pictures.append({"file": name, "role": role, "scan": s["path"], "label": s["label"],
                                 "score": s["score"]})
            except Exception as e:   # noqa: BLE001
                notes.append(f"review/{name}: {e}")
    _to_tensorboard(tb, images, step, notes)
    return {"folder": str(out / "review"), "threshold": threshold, "false_alarm_rate": REVIEW_RATE,
            "pictures": pictures, "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}


def _to_tensorboard(tb: Any, images: list[tuple[str, Path]], step: int, notes: list[str]) -> None:
    """The pictures as TensorBoard images (RGB), flushed."""
    if tb is None or not images:
        return
    import cv2
    try:
        for tag, path in images:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            tb.add_image(tag, img[..., ::-1].copy(), step, dataformats="HWC")
        tb.flush()
    except Exception as e:   # noqa: BLE001
        notes.append(f"TensorBoard images: {e}")


def review_quietly(*args: Any, **kwargs: Any) -> dict | None:
    """draw_review, its every failure a warning line: the checkpoints and metrics of a finished run matter more."""
    try:
        done = draw_review(*args, **kwargs)
    except Exception as e:   # noqa: BLE001
        warnings.warn(f"the run's review pictures could not be drawn: {e}", stacklevel=2)
        return None
    for note in done["notes"]:
        if not note.startswith("review: validation has no"):   # a plain fact of the data, said once in the summary
            warnings.warn(note, stacklevel=2)
    return done


def curves_when_stopped(out: Path) -> None:
    """curves.png of a run stopped by Ctrl-C, SIGTERM or a full disk, from the epochs it logged (no review: it has no
    final best.ckpt to judge, and a stop asked for is not held up by a network run); a failure, or a second Ctrl-C,
    is one warning line."""
    log = out / "logs" / "metrics.csv"
    try:
        if log.is_file():
            plot_curves(log, out / "curves.png")
    except (Exception, KeyboardInterrupt) as e:   # noqa: BLE001
        warnings.warn(f"{out / 'curves.png'} not drawn: {e or type(e).__name__}", stacklevel=2)

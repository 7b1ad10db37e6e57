"""Where a trained run's detections are lost: in the scan score (how the heatmap's top cells are pooled) or in
the heatmap itself (the anomaly's own cells not hotter than clean trucks' hottest cells)?

    .venv/bin/python benchmarks/heatmap_cells.py runs/quality/default runs/quality/data_s100_1200_100_600/test

Rescans the run's test scans (RUN/test_scores.csv, written by benchmarks/quality.py) with RUN/best.ckpt
(or --checkpoint) and prints AUROC and detection at 1 % false alarms for the mean of the top-k cell logits
(k = 1 ... 16; the model's score uses its config's topk), then, per anomaly type, the hottest logit on the
anomaly's own cells against the clean trucks' hottest cells: if the anomaly's cell is not hotter than the
1 %-false-alarm level of those, no pooling of the heatmap can flag it. DATA: the test folder with its
manifest (masks, types, cargo).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch

from detector import metrics
from detector.evaluate import load_truth
from detector.preprocess import Preprocessing
from detector.scan import ScanError, read_scan
from detector.checkpoint import CheckpointError, load_checkpoint
from false_alarms import cell_logits, scored_rows  # benchmarks/ is on sys.path when this script runs

TOPK = (1, 2, 4, 8, 16)


def scan_cells(run: Path, data: Path, checkpoint: str = "best.ckpt") -> list[dict]:
    """Per test scan: label, type, cargo, its 16 hottest cell logits and (anomalies) the hottest on its mask."""
    rows = scored_rows(run)
    truth = {t.path.resolve(): t for t in load_truth(data)[0]}
    model, info = load_checkpoint(run / checkpoint)
    model = model.eval().to(memory_format=torch.channels_last)
    pre, s = Preprocessing.from_dict(info["preprocessing"]), model.stride
    out = []
    for r in rows:
        t = truth.get(Path(r["path"]).resolve())
        if t is None:
            raise SystemExit(f"{r['path']}: not in {data}'s manifest")
        z, scale = cell_logits(model, read_scan(t.path), pre, info["channels"])
        hc, wc = z.shape
        d = {"label": t.label, "type": t.anomaly_type or "none", "cargo": t.cargo or "",
             "top": np.sort(z.ravel())[::-1][:max(TOPK)], "own": np.nan}
        if t.label and t.mask is not None:
            ys, xs = np.nonzero(cv2.imread(str(t.mask), cv2.IMREAD_GRAYSCALE))
            cy = np.minimum((ys / (s * scale[0])).astype(int), hc - 1)
            cx = np.minimum((xs / (s * scale[1])).astype(int), wc - 1)
            d["own"] = float(z[cy, cx].max()) if len(ys) else np.nan
        out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path, help="the test folder (with manifest.csv and masks)")
    ap.add_argument("--checkpoint", default="best.ckpt")
    a = ap.parse_args()
    try:
        cells = scan_cells(a.run, a.data, a.checkpoint)
    except (CheckpointError, ScanError, FileNotFoundError) as e:   # the run, its checkpoint or DATA: one line
        raise SystemExit(f"heatmap_cells: {e}") from None
    y = np.array([c["label"] for c in cells])
    top = np.stack([np.pad(c["top"], (0, max(TOPK) - len(c["top"])), constant_values=c["top"][-1]) for c in cells])
    print(f"{a.run / a.checkpoint}: {len(y)} test scans ({int(y.sum())} anomalous)")
    for k in TOPK:
        sc = top[:, :k].mean(1)
        print(f"  score = mean of the top {k:2d} cell logits: AUROC {metrics.auroc(y, sc):.4f}  "
              f"det@1% {metrics.detection_at_1pct(y, sc):.3f}")
    thr = metrics.threshold_at_far(y, top[:, 0], 0.01)
    anom = [c for c in cells if c["label"] and np.isfinite(c["own"])]
    print(f"clean trucks' hottest cell at 1 % false alarms: logit {thr:.2f}; an anomaly whose own cells stay "
          f"below it is lost in the heatmap, whatever the pooling")
    for kind in sorted({c["type"] for c in anom}):
        own = np.array([c["own"] for c in anom if c["type"] == kind])
        hottest = np.mean([c["own"] >= c["top"][0] - 1e-6 for c in anom if c["type"] == kind])
        print(f"  {kind:15s} n={len(own):3d}  own-cell logit median {np.median(own):6.2f}  "
              f"at or above it {np.mean(own >= thr):.2f}  the scan's hottest cell {hottest:.2f}")
    lost = Counter(c["cargo"] for c in anom if c["own"] < thr)
    print(f"lost in the heatmap: {sum(lost.values())} of {len(anom)}; by cargo: "
          + ", ".join(f"{k or '?'} {v}" for k, v in lost.most_common()))


if __name__ == "__main__":
    main()

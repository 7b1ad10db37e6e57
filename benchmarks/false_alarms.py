"""Where a trained run fires on clean test trucks: each one's hottest heatmap cell, the highest-scoring
first, and how many sit on the image's bottom edge (where the tyres meet it; a padding artefact until
training crops were cut from the station-padded scan).

    .venv/bin/python benchmarks/false_alarms.py runs/quality/default [--top 10]

Reads RUN/best.ckpt and RUN/test_scores.csv (written by benchmarks/quality.py) and rescans the clean trucks.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from detector.model import nhwc
from detector.preprocess import Preprocessing, prepare, valid_cells
from detector.scan import ScanError, read_scan
from detector.checkpoint import CheckpointError, load_checkpoint

EDGE_ROWS = 2  # cell rows above the bottom edge counted as "on the edge"


def cell_logits(model: torch.nn.Module, scan, pre: Preprocessing, channels: int) -> tuple[np.ndarray, tuple]:
    """A scan's heatmap logits over its valid (unpadded) cells, and the scan pixels per model pixel (y, x)."""
    p = prepare(scan, pre, channels)
    with torch.no_grad():
        z = model.logits(nhwc(torch.from_numpy(p.x)[None]))[0, 0].float().numpy()
    hc, wc = valid_cells(*p.valid_hw, model.stride)
    return z[:hc, :wc], p.scale_yx


def scored_rows(run: Path) -> list[dict]:
    """RUN/test_scores.csv's rows; SystemExit naming the file when the run has none (no test split)."""
    path = run / "test_scores.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (train with a test split, e.g. benchmarks/quality.py)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hottest_cells(run: Path) -> list[dict]:
    """Each clean test truck of the run: its score, hottest cell (scan px) and cell rows above the bottom."""
    clean = [r for r in scored_rows(run) if r["label"] == "0"]
    model, info = load_checkpoint(run / "best.ckpt")
    model = model.eval().to(memory_format=torch.channels_last)
    pre, s = Preprocessing.from_dict(info["preprocessing"]), model.stride
    out = []
    for r in clean:
        z, scale = cell_logits(model, read_scan(r["path"]), pre, info["channels"])
        hc, wc = z.shape
        y, x = np.unravel_index(int(np.argmax(z)), (hc, wc))
        out.append({"path": r["path"], "score": float(r["score"]), "rows_above_bottom": hc - 1 - int(y),
                    "y": int((y + 0.5) * s * scale[0]), "x": int((x + 0.5) * s * scale[1])})
    return sorted(out, key=lambda d: -d["score"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    try:
        rows = hottest_cells(a.run)
    except (CheckpointError, ScanError) as e:   # no RUN/best.ckpt, or a test scan moved since: one line
        raise SystemExit(f"false_alarms: {e}") from None
    for d in rows[: a.top]:
        print(f"{d['score']:.3f}  {d['path']}  hottest cell at y={d['y']} x={d['x']} (scan px), "
              f"{d['rows_above_bottom']} cell rows above the bottom edge")
    edge = sum(d["rows_above_bottom"] < EDGE_ROWS for d in rows)
    print(f"{a.run}: clean trucks whose hottest cell is in the bottom {EDGE_ROWS} cell rows: {edge} of {len(rows)}")


if __name__ == "__main__":
    main()

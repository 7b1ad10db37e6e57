"""Picture-sized windows cut from a truck dataset: the case of a site whose scans are small (baggage pictures,
close-ups), for measuring training from labels alone when a scan fits in one training crop.

Each anomalous scan gives one window that holds its (first) anomaly, each normal scan two windows on the vehicle;
the windows keep the scans' counts, I0 and pitch. OUT/manifest.csv keeps the masks, OUT/labels_only/manifest.csv
drops those of the anomalous training windows (validation and test keep theirs).

    python benchmarks/windows.py runs/quality/data_s100_1200_100_600 runs/quality/win240 --size 240
    detector train --config configs/quick.yaml --data runs/quality/win240/labels_only --out runs/w240 \
        trainer.max_minutes=0 trainer.max_epochs=12
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from detector.data import STRUCTURE_ATTENUATION
from detector.manifest import SPLIT_ALIASES
from detector.scan import Scan, read_scan, write_scan


def window_origins(scan: Scan, row: dict, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(y0, x0) of the windows of one scan: around its first box if anomalous, else two on the vehicle."""
    h, w = scan.height, scan.width
    if int(row["label"]):
        x0, y0, x1, y1 = json.loads(row["boxes"])[0]
        xs = (max(0, x1 - size), min(w - size, x0))
        ys = (max(0, y1 - size), min(h - size, y0))
        if xs[1] < xs[0]:   # the anomaly is wider than the window: centre it
            xs = (int(np.clip((x0 + x1 - size) // 2, 0, w - size)),) * 2
        if ys[1] < ys[0]:
            ys = (int(np.clip((y0 + y1 - size) // 2, 0, h - size)),) * 2
        return [(int(rng.integers(ys[0], ys[1] + 1)), int(rng.integers(xs[0], xs[1] + 1)))]
    out = []
    for _ in range(2):
        for _ in range(50):   # mostly vehicle or cargo, not air
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            if np.mean(scan.attenuation[0, y:y + size, x:x + size] > STRUCTURE_ATTENUATION) > 0.4:
                break
        out.append((y, x))
    return out


def write_manifest(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a dataset with manifest.csv, boxes and masks (benchmarks/quality.py's)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=240, help="window side in scan pixels")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    if not (a.src / "manifest.csv").exists():
        sys.exit(f"error: {a.src}/manifest.csv not found")
    if a.size < 1:
        sys.exit(f"error: --size must be >= 1 px, got {a.size}")
    src_rows = list(csv.DictReader(open(a.src / "manifest.csv", newline="")))
    # the windows keep their scan's split: without one, training would split a scan's windows at random (one in
    # training, its twin in test), and an empty split named OUT//images, a folder at the filesystem root
    if not any((r.get("split") or "").strip() for r in src_rows):
        sys.exit(f"error: {a.src}/manifest.csv has no split column: the windows keep each scan's split "
                 f"(benchmarks/quality.py's datasets have one)")
    rng = np.random.default_rng(a.seed)
    rows = []
    for r in src_rows:
        r["split"] = SPLIT_ALIASES.get((r.get("split") or "train").strip().lower(), r["split"])   # empty: train
        scan = read_scan(a.src / r["path"])
        if scan.height < a.size or scan.width < a.size:
            sys.exit(f"error: {r['path']} is {scan.height}x{scan.width} px, smaller than a {a.size} px window")
        mask = cv2.imread(str(a.src / r["mask"]), cv2.IMREAD_UNCHANGED) if r.get("mask") else None
        stem = Path(r["path"]).stem
        for k, (y, x) in enumerate(window_origins(scan, r, a.size, rng)):
            part = np.s_[:, y:y + a.size, x:x + a.size]
            name = f"{r['split']}/images/{stem}_{k}.tiff"
            write_scan(a.out / name, Scan(scan.attenuation[part], scan.pitch_mm, scan.energies, scan.i0,
                                          counts=np.ascontiguousarray(scan.counts[part])))
            row = {"path": name, "label": r["label"], "mask": "", "anomaly_type": r["anomaly_type"],
                   "cargo": r["cargo"], "split": r["split"]}
            if mask is not None and int(r["label"]):   # the generator writes blank masks for normal scans too
                row["mask"] = f"{r['split']}/masks/{stem}_{k}.png"
                (a.out / row["mask"]).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(a.out / row["mask"]), ((mask[y:y + a.size, x:x + a.size] > 0) * 255).astype(np.uint8))
            rows.append(row)
    write_manifest(a.out / "manifest.csv", rows)
    weak = [dict(r, path=f"../{r['path']}", mask="" if r["split"] == "train" and r["label"] == "1" else
                 r["mask"] and f"../{r['mask']}") for r in rows]
    write_manifest(a.out / "labels_only" / "manifest.csv", weak)
    print("windows (split, label):", dict(sorted(Counter((r["split"], r["label"]) for r in rows).items())))
    print(f"next: detector train --config configs/quick.yaml --data {a.out}/labels_only --out runs/w{a.size}")


if __name__ == "__main__":
    main()

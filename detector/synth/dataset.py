"""`detector synth`: write a synthetic dataset (images/*.tiff, masks/*.png, manifest.csv) in
parallel; deterministic by seed whatever the number of workers."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from detector.manifest import SPLIT_ALIASES

MANIFEST_COLUMNS = ("path", "label", "mask", "boxes", "anomaly_type", "cargo", "vehicle", "split")


def plan_labels(count: int, seed: int, fraction: float) -> np.ndarray:
    """Which scan indices get an anomaly: exactly round(count * fraction), chosen by the seed."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--anomaly-fraction must be in [0, 1], got {fraction}")
    labels = np.zeros(count, bool)
    idx = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2 ** 31,))).permutation(count)
    labels[idx[: int(round(count * fraction))]] = True
    return labels


def scan_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The SeedSequence of scan `index` (independent of workers and of the dataset's size)."""
    return np.random.SeedSequence(seed, spawn_key=(index,))


def _work(job: tuple) -> dict:
    """Generate and write one scan; returns its manifest row."""
    from detector.scan import write_scan
    from detector.synth.scene import generate_scan

    out, seed, index, anomalous, height, split = job
    cv2.setNumThreads(1)
    s = generate_scan(scan_seed(seed, index), anomaly=bool(anomalous), height=height)
    sid = f"s{seed}_{index:06d}"
    write_scan(Path(out) / "images" / f"{sid}.tiff", s.counts, i0=(s.i0, s.i0), pitch_mm=s.pitch_mm,
               energies=("high", "low"))
    cv2.imwrite(str(Path(out) / "masks" / f"{sid}.png"), s.mask.astype(np.uint8) * 255)
    return {"path": f"images/{sid}.tiff", "label": s.label, "mask": f"masks/{sid}.png",
            "boxes": json.dumps(s.boxes), "anomaly_type": s.anomaly_type, "cargo": s.cargo,
            "vehicle": s.vehicle, "split": split or "", "_index": index}


def generator_pool(workers: int) -> mp.pool.Pool:
    """A process pool whose workers run the generator: forkserver, its workers forked with numpy, OpenCV and
    the synth modules already imported; spawn where there is no forkserver."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["detector.synth.scene", "detector.scan"])
    return ctx.Pool(workers)


def write_dataset(out: str | os.PathLike, count: int, seed: int = 0, anomaly_fraction: float = 0.5,
                  workers: int | None = None, height: int | None = None, split: str | None = None,
                  progress: bool = True) -> list[dict]:
    """Generate `count` scans into `out`; returns the manifest rows (also written to manifest.csv). workers: None, one
    per CPU this process may run on."""
    from tqdm import tqdm

    from detector.runtime import usable_cpus   # here: the generator's processes import this module, and need no
                                               # onnxruntime

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels = plan_labels(count, seed, anomaly_fraction)
    jobs = [(str(out), seed, i, bool(labels[i]), height, split) for i in range(count)]
    workers = max(1, min(workers or usable_cpus(), count))
    bar = tqdm(total=count, desc="synth", unit="scan", disable=not progress)
    rows = []
    if workers == 1:
        for j in jobs:
            rows.append(_work(j))
            bar.update()
    else:
        with generator_pool(workers) as pool:
            for r in pool.imap_unordered(_work, jobs, chunksize=1):
                rows.append(r)
                bar.update()
    bar.close()
    rows.sort(key=lambda r: r.pop("_index"))
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return rows


def unlisted_images(out: str | os.PathLike, rows: list[dict]) -> list[str]:
    """Files in OUT/images that the manifest rows do not list (left by an earlier synth into the same folder)."""
    listed = {Path(r["path"]).name for r in rows}
    return sorted(p.name for p in (Path(out) / "images").iterdir() if p.is_file() and p.name not in listed)


def main(args) -> int:
    """CLI handler of `detector synth OUT --count N ...`."""
    if args.count < 1:
        print("detector synth: --count must be >= 1", file=sys.stderr)
        return 2
    if not 0.0 <= args.anomaly_fraction <= 1.0:
        print(f"detector synth: --anomaly-fraction is a share in [0, 1], got {args.anomaly_fraction:g}",
              file=sys.stderr)
        return 2
    split = getattr(args, "split", None)
    if split and split.lower() not in SPLIT_ALIASES:   # training would refuse the manifest later, row by row
        print(f"detector synth: --split must be one of {', '.join(sorted(SPLIT_ALIASES))}, got {split!r}",
              file=sys.stderr)
        return 2
    t0 = time.time()
    rows = write_dataset(args.out, args.count, args.seed, args.anomaly_fraction, args.workers,
                         getattr(args, "height", None), getattr(args, "split", None))
    n_anom = sum(int(r["label"]) for r in rows)
    dt = time.time() - t0
    print(f"synth: {len(rows)} scans ({n_anom} anomalous) in {dt:.1f} s ({len(rows) / dt:.2f} scans/s) "
          f"-> {Path(args.out) / 'manifest.csv'}")
    stale = unlisted_images(args.out, rows)
    if stale:
        print(f"note: {Path(args.out) / 'images'} also holds {len(stale)} older scan(s) the new manifest does not list "
              f"(e.g. {stale[0]}, from an earlier synth): training reads the manifest, but scoring the folder would "
              "score them too; delete them or synthesise into a new folder", file=sys.stderr)
    if getattr(args, "split", None) == "test":   # held-out scans are scored and evaluated, never trained on
        print(f"next: detector score {shlex.quote(str(Path(args.out) / 'images'))} --model MODEL.onnx --out results.csv, "
              f"then detector eval results.csv --truth {shlex.quote(args.out)} --out report/")
    else:
        print(f"next: detector train --data {shlex.quote(args.out)} --out runs/synth")
    return 0

"""`detector synth`: write a synthetic dataset (images/*.tiff, masks/*.png, manifest.csv, synth.json) in
parallel; deterministic by seed whatever the number of workers."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from detector.atomic import replacing
from detector.cpus import usable_cpus
from detector.manifest import SPLIT_ALIASES
from detector.synth.scene import GENERATOR_VERSION
from detector.scan import MIN_SIDE

SCAN_BYTES = 7e6      # a scan's files at the default heights (~6.8 MB measured: two uint16 pages, mask, manifest row)
DEFAULT_HEIGHT = 725  # the middle of the default 600-850 px heights
MAX_HEIGHT = 2000   # --height: real scans are 600-2000 px high; the longest rig (5.2 heights long) stays < 40 Mpx
SYNTH_INFO = "synth.json"   # beside manifest.csv: what made the dataset (generator version, seed, count)
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

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    # first: a folder a run left half-written still says what it was being made with (the demo remakes it)
    with replacing(out / SYNTH_INFO) as tmp:
        tmp.write_text(json.dumps({"generator": GENERATOR_VERSION, "seed": seed, "count": count,
                                   "anomaly_fraction": anomaly_fraction, "height": height, "split": split}))
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
    with replacing(out / "manifest.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return rows


def generator_version(out: str | os.PathLike) -> int | None:
    """The generator version that made the dataset in `out` (1: made before versions were recorded); None: no
    generated dataset there."""
    out = Path(out)
    if not (out / "manifest.csv").exists():
        return None
    try:
        return int(json.loads((out / SYNTH_INFO).read_text())["generator"])
    except FileNotFoundError:
        return 1
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{out / SYNTH_INFO}: unreadable ({e})") from None


def unlisted_images(out: str | os.PathLike, rows: list[dict]) -> list[str]:
    """Files in OUT/images that the manifest rows do not list (left by an earlier synth into the same folder)."""
    listed = {Path(r["path"]).name for r in rows}
    return sorted(p.name for p in (Path(out) / "images").iterdir() if p.is_file() and p.name not in listed)


def disk_shortfall(out: Path, count: int, height: int | None) -> str | None:
    """Why `count` scans cannot fit on OUT's disk, or None: a scan takes ~7 MB at the default 600-850 px heights
    (two uint16 pages), so --count 100000 wanted ~700 GB and failed when the disk filled, hours in."""
    need = count * SCAN_BYTES * (1.0 if height is None else height / DEFAULT_HEIGHT)
    where = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if where is None:
        return None
    free = shutil.disk_usage(where).free
    if need <= free:
        return None
    return (f"{count} scans need about {need / 1e9:.1f} GB, and {where} has {free / 1e9:.1f} GB free: ask for fewer "
            "(training also makes fresh trucks in memory: data.synth_per_epoch)")


def main(args) -> int:
    """CLI handler of `detector synth OUT --count N ...`."""
    if args.count < 1:
        print("detector synth: --count must be >= 1", file=sys.stderr)
        return 2
    if args.seed < 0:   # numpy's SeedSequence takes none, and the scan names s{seed}_{index} hold no sign
        print(f"detector synth: --seed must be >= 0, got {args.seed}", file=sys.stderr)
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
    height = getattr(args, "height", None)
    if height is not None and not MIN_SIDE <= height <= MAX_HEIGHT:
        print(f"detector synth: --height must be {MIN_SIDE}-{MAX_HEIGHT} px, got {height}", file=sys.stderr)
        return 2
    short = disk_shortfall(Path(args.out), args.count, height)
    if short:
        print(f"detector synth: {short}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        rows = write_dataset(args.out, args.count, args.seed, args.anomaly_fraction, args.workers, height, split)
    except OSError as e:   # OUT a file, read-only, disk full: a line, not a traceback
        print(f"detector synth: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
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

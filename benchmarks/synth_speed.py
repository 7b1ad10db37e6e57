"""Synthetic scan throughput at the default size (5 mm pitch, ~700 x 1500-3600 px, 2 energies).

Prints scans/second for in-memory generation on all cores, and for the full `detector synth`
path (generation + TIFF/PNG writing). Target: >= 4 scans/s on 2 cores (2,000 scans < 10 min).
Usage: python benchmarks/synth_speed.py [--count 24] [--workers N]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np


def _gen(i: int) -> int:
    import cv2

    from detector.synth import generate_scan
    cv2.setNumThreads(1)
    s = generate_scan(np.random.SeedSequence(1, spawn_key=(i,)), anomaly=bool(i % 2))
    return s.counts.shape[1] * s.counts.shape[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    a = ap.parse_args()
    ctx = mp.get_context("forkserver")
    with ctx.Pool(a.workers) as pool:
        pool.map(_gen, range(a.workers))                      # warm the workers up
        t = time.perf_counter()
        px = pool.map(_gen, range(a.count), chunksize=1)
        dt = time.perf_counter() - t
    print(f"generate: {a.count / dt:.2f} scans/s on {a.workers} workers "
          f"(mean {np.mean(px) / 1e6:.2f} Mpx per channel, {dt / a.count * a.workers:.2f} s per scan per core)")
    from detector.synth.dataset import write_dataset
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_dataset(d, a.count, seed=1, anomaly_fraction=0.5, workers=a.workers, progress=False)
        dt = time.perf_counter() - t
    print(f"detector synth (with TIFF+PNG writing): {a.count / dt:.2f} scans/s on {a.workers} workers")


if __name__ == "__main__":
    main()

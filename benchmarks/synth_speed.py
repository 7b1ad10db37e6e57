"""Synthetic scan throughput at the default size (5 mm pitch, <= 850 x 3000 px, 2 energies).

Prints scans/second for in-memory generation, and for the full `detector synth OUT --count N`
CLI path (generation + TIFF/PNG writing + manifest), with the load average at the time (the
machine is shared: compare figures taken at similar load). Target: >= 4 scans/s on 2 cores.
Usage: python benchmarks/synth_speed.py [--count 48] [--workers N]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

from detector.runtime import usable_cpus


def _gen(i: int) -> int:
    import cv2

    from detector.synth import generate_scan
    cv2.setNumThreads(1)
    s = generate_scan(np.random.SeedSequence(1, spawn_key=(i,)), anomaly=bool(i % 2))
    return s.counts.shape[1] * s.counts.shape[2]


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--workers", type=int, default=usable_cpus())
    a = ap.parse_args()
    if a.count < 1 or a.workers < 1:
        ap.error("--count and --workers must be >= 1")
    print(f"{usable_cpus()} usable cores, {a.workers} workers, {a.count} scans; before: {_load()}")
    _gen(0)                                                   # imports, caches
    t = time.perf_counter()
    px = [_gen(i) for i in range(4)]
    one = (time.perf_counter() - t) / 4
    print(f"generate, 1 process: {1 / one:.2f} scans/s ({one * 1000:.0f} ms per scan, "
          f"mean {np.mean(px) / 1e6:.2f} Mpx per channel)")
    ctx = mp.get_context("forkserver")
    with ctx.Pool(a.workers) as pool:
        pool.map(_gen, range(a.workers))                      # warm the workers up
        t = time.perf_counter()
        px = pool.map(_gen, range(a.count), chunksize=1)
        dt = time.perf_counter() - t
    print(f"generate in memory: {a.count / dt:.2f} scans/s on {a.workers} workers "
          f"(mean {np.mean(px) / 1e6:.2f} Mpx per channel)")
    from detector.cli import main as cli
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = cli(["synth", os.path.join(d, "ds"), "--count", str(a.count), "--seed", "1",
                      "--workers", str(a.workers)])
        dt = time.perf_counter() - t
    if rc != 0:   # its own message, which the redirect hid
        raise SystemExit(f"detector synth failed ({rc}): {err.getvalue().strip()[-2000:]}")
    print(f"detector synth OUT --count {a.count} (CLI path, TIFF+PNG+manifest): {a.count / dt:.2f} scans/s "
          f"on {a.workers} workers; after: {_load()}")


if __name__ == "__main__":
    main()

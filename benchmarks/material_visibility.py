"""How visible each synthetic anomaly type is in the dual-energy material image, beside the high energy.

    .venv/bin/python benchmarks/material_visibility.py [--per-type 8] [--test-seed 2100]

Visibility (detector.synth.visibility) = the anomaly's mean added signal over the local clutter; each
anomaly (a few generated per type) is rendered again without it. The material image is high - R_mid * low
(model.MaterialInput's second channel without its gain: visibility does not depend on scale). Where it is
above the high energy's, a material channel shows the anomaly better than attenuation alone; where it is
below, the photon noise of a difference of two energies outweighs the material contrast.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp

import numpy as np

from detector.model import MaterialInput
from detector.runtime import usable_cpus
from detector.synth.dataset import scan_seed
from detector.synth.scene import ANOMALY_TYPES
from detector.synth.visibility import anomaly_visibility

R_MID = MaterialInput(1.0).r_mid   # the network's constant, between organic matter and steel


def material(att: np.ndarray) -> np.ndarray:
    return att[0] - R_MID * att[1]


def both(args: tuple[int, int, str]) -> tuple[str, float, float]:
    seed, index, kind = args
    ss = scan_seed(seed, index)
    return kind, anomaly_visibility(ss, kind), anomaly_visibility(ss, kind, image=material)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-type", type=int, default=8, help="anomalous scans per type")
    ap.add_argument("--test-seed", type=int, default=2100, help="seed the scans are drawn from (quality.py's test seed; other indices than its test scans)")
    a = ap.parse_args()
    jobs = [(a.test_seed, 100_000 + 1000 * t + i, kind) for t, kind in enumerate(ANOMALY_TYPES)
            for i in range(a.per_type)]
    ctx = mp.get_context("fork")
    with ctx.Pool(usable_cpus()) as pool:
        rows = pool.map(both, jobs)
    print(f"visibility of {a.per_type} anomalies per type (seed {a.test_seed}), material image = high - {R_MID:.3f} * low")
    for kind in ANOMALY_TYPES:
        v = np.array([(h, m) for k, h, m in rows if k == kind and np.isfinite(h) and np.isfinite(m)])
        if len(v):
            print(f"  {kind:<16} high energy {np.median(v[:, 0]):6.2f}  material {np.median(v[:, 1]):6.2f}  "
                  f"(medians; material higher in {np.mean(v[:, 1] > v[:, 0]):.0%})")


if __name__ == "__main__":
    main()

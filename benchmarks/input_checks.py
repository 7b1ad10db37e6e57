"""What a station's model does with misconfigured input, and what the reader's physics checks refuse: each scan of a
synthetic test folder read as it is and as nine common mistakes (energies swapped, one energy twice, an inverted
image, inverted and swapped, a log-scaled display image, 12- and 14-bit counts without I0, upside down).

    .venv/bin/python benchmarks/input_checks.py --model model.onnx --data runs/quality/DATA/test [--n 100]

Per variant: scans refused (ScanError, with the first reason), and over those scored the AUROC, the clean trucks'
median score and how many clean / anomalous trucks the bundle's own threshold releases. Torch-free; writes nothing.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from detector.metrics import auroc
from detector.runtime import InspectionError, Inspector
from detector.scan import ScanError, check_energy_order, check_polarity, check_upright, read_scan, scan_from_counts

VARIANTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], bool]] = {   # name: (counts -> counts, keeps I0)
    "as is": (lambda c: c, True),
    "swapped (low, high)": (lambda c: c[::-1], True),
    "(high, high)": (lambda c: c[[0, 0]], True),
    "(low, low)": (lambda c: c[[1, 1]], True),
    "inverted (65535 - I)": (lambda c: 65535 - c, False),
    "inverted and swapped": (lambda c: (65535 - c)[::-1], False),
    "log-scaled display": (lambda c: (np.log(np.maximum(c, 1)) * (65535 / np.log(65535))).astype(np.uint16), False),
    "12-bit, no I0 (>> 4)": (lambda c: c >> 4, False),
    "14-bit, no I0 (>> 2)": (lambda c: c >> 2, False),
    "upside down": (lambda c: c[:, ::-1], True),
}


def test_rows(data: Path, n: int) -> list[dict]:
    """The first n rows of DATA/manifest.csv; SystemExit naming the file when there is none."""
    path = data / "manifest.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (a synthetic folder, e.g. made by `detector synth`)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))[:n]


def run_variant(inspector: Inspector, scans: list[tuple], make: Callable, keep_i0: bool) -> dict:
    """Refusals and, over the scans scored, labels, scores and decisions."""
    out: dict = {"refused": 0, "reason": "", "labels": [], "scores": [], "released": [0, 0]}
    for scan, label in scans:
        try:
            counts = np.ascontiguousarray(make(scan.counts))
            v = inspector.inspect(scan_from_counts(counts, i0=scan.i0 if keep_i0 else None, pitch_mm=scan.pitch_mm,
                                                   source=scan.source))
        except (ScanError, InspectionError) as e:
            out["refused"] += 1
            out["reason"] = out["reason"] or getattr(e, "reason", str(e))
            continue
        out["labels"].append(label)
        out["scores"].append(v.score)
        out["released"][label] += v.decision == "RELEASE"
    return out


def check_ms(scans: list[tuple]) -> float:
    """Median milliseconds of the polarity, energy-order and upside-down checks on a scan as it is."""
    times = []
    for scan, _ in scans:
        t = time.perf_counter()
        check_polarity("x", scan.counts)
        check_energy_order("x", scan.attenuation)
        check_upright("x", scan.counts, 65535.0, scan.i0[0])
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="a 2-energy model bundle (.onnx)")
    ap.add_argument("--data", required=True, type=Path, help="a synthetic folder with manifest.csv (read only)")
    ap.add_argument("--n", type=int, default=100, help="scans to use (the manifest's first; default 100)")
    a = ap.parse_args()
    rows = test_rows(a.data, a.n)
    inspector = Inspector(a.model, threads=None)
    scans = [(read_scan(a.data / r["path"]), int(r["label"])) for r in rows]
    clean, bad = sum(1 for _, y in scans if y == 0), sum(1 for _, y in scans if y == 1)
    print(f"{len(scans)} scans ({clean} clean, {bad} anomalous) of {a.data}; threshold {inspector.threshold:.3f}; "
          f"checks {check_ms(scans):.2f} ms a scan (median, {scans[0][0].height}x{scans[0][0].width} px)")
    print(f"{'variant':22s} {'refused':>8s} {'AUROC':>6s} {'clean median':>12s} {'released clean':>14s} "
          f"{'released anomalous':>18s}  first reason")
    for name, (make, keep_i0) in VARIANTS.items():
        r = run_variant(inspector, scans, make, keep_i0)
        a_uc = auroc(r["labels"], r["scores"]) if r["labels"] else None
        med = statistics.median([s for s, y in zip(r["scores"], r["labels"]) if y == 0] or [float("nan")])
        n_clean, n_bad = r["labels"].count(0), r["labels"].count(1)
        print(f"{name:22s} {r['refused']:>4d}/{len(scans):<3d} {'-' if a_uc is None else f'{a_uc:.3f}':>6s} "
              f"{med:>12.3f} {r['released'][0]:>6d}/{n_clean:<7d} {r['released'][1]:>8d}/{n_bad:<9d}  "
              f"{r['reason'][:90]}")


if __name__ == "__main__":
    main()

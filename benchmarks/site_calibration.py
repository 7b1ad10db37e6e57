"""What `detector calibrate` changes at the station: each rate's threshold before (the bundle's, from its training
validation scans) and after calibrating on a site's cleared traffic, and what each does on a labelled test set:
the share of its clean scans inspected (with a 95 % interval) and of its anomalies detected.

    .venv/bin/python benchmarks/site_calibration.py MODEL.onnx TEST_DATA --out runs/site [--cleared 1000 --seed 20200]

The "site" is `--cleared` synthetic trucks without anomalies (generator seed `--seed`), or your own folder of
cleared scans with `--cleared-dir`. Scoring resumes, so a second run only redoes the calibration and the table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from detector.bundle import read_metadata
from detector.calibration import rate_interval
from detector.cli import main as detector
from detector.evaluate import load_results, load_truth, match


def run(*argv: str) -> None:
    """One `detector` verb in this process; SystemExit with its exit code when it fails."""
    rc = detector([str(a) for a in argv])
    if rc:
        raise SystemExit(f"detector {argv[0]} exited {rc}")


def scores_by_label(results: Path, truth: Path) -> tuple[np.ndarray, np.ndarray]:
    """(clean scores, anomalous scores) of the scored test scans; failed scans count as inspected (score 1)."""
    pairs, _, _ = match(load_results(results), load_truth(truth)[0], results.parent)
    score = {0: [], 1: []}
    for r, t in pairs:
        score[t.label].append(1.0 if r.failed else r.score)
    return np.asarray(score[0]), np.asarray(score[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the exported bundle (.onnx)")
    ap.add_argument("test", help="labelled test dataset (manifest.csv or normal/ + anomalous/)")
    ap.add_argument("--out", required=True, help="work folder: cleared scans, results, site.onnx")
    ap.add_argument("--cleared", type=int, default=1000, help="synthetic cleared trucks to make (default 1000)")
    ap.add_argument("--seed", type=int, default=20200, help="their generator seed (keep it apart from the test's)")
    ap.add_argument("--height", type=int, default=None, help="their height in px (default: the generator's)")
    ap.add_argument("--cleared-dir", default=None, help="score this folder of cleared scans instead of making some")
    args = ap.parse_args()
    out = Path(args.out)
    cleared = Path(args.cleared_dir) if args.cleared_dir else out / "cleared"
    if not args.cleared_dir and not (cleared / "manifest.csv").is_file():
        run("synth", cleared, "--count", args.cleared, "--seed", args.seed, "--anomaly-fraction", 0,
            *(["--height", args.height] if args.height else []))
    run("score", cleared, "--model", args.model, "--out", out / "cleared.csv")
    run("calibrate", out / "cleared.csv", "--model", args.model, "--out", out / "site.onnx")
    run("score", args.test, "--model", args.model, "--out", out / "test.csv")
    clean, anomalous = scores_by_label(out / "test.csv", Path(args.test))
    print(f"\ntest set {args.test}: {clean.size} clean, {anomalous.size} anomalous scans")
    print(f"{'bundle':<8} {'rate':>6} {'threshold':>9}  {'clean scans inspected (95 %)':<30} anomalies detected")
    for name, path in (("shipped", Path(args.model)), ("site", out / "site.onnx")):
        for row in read_metadata(path)["thresholds"]:
            t = row["threshold"]
            k = int(np.sum(clean >= t))
            lo, hi = rate_interval(k, clean.size)
            print(f"{name:<8} {row['false_alarm_rate']:>6.1%} {t:>9.4f}  {k:>4} = {k / clean.size:6.2%} "
                  f"({lo:.2%}-{hi:.2%}){'':<4} {np.mean(anomalous >= t):.1%}")


if __name__ == "__main__":
    main()

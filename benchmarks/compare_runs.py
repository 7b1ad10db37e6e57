"""Is run B better than run A? A paired comparison of two trainings scored on the same test scans.

    .venv/bin/python benchmarks/compare_runs.py runs/quality/default runs/quality/candidate

Reads each run's test_scores.csv (written by training with a test split, e.g. benchmarks/quality.py),
matches the scans by path and prints both runs' AUROC and detection at 1 % and 0.1 % false alarms, then B - A
with a 95 % interval over resampled test sets, and how many anomalies both miss at 1 % (detector.metrics'
paired_difference and missed_at_far: `detector eval NEW.csv --baseline OLD.csv` compares two models' results
the same way). Both runs are resampled together, so the luck of the test set cancels: on 600 synthetic scans the AUROC difference of
two default-sized runs came out +-0.023, each run's own interval +-0.03. Differences inside that are not
a reason to change a config.
The interval covers the test set, not the training seed: a CPU rerun with the same seed reproduces
the scores, and two seeds of the default differed by 0.002-0.003 AUROC (2026-11-29), so a candidate
worth keeping should also win with a second seed (`seed=1 data.seed=1` on both runs):

    .venv/bin/python benchmarks/compare_runs.py A B --seed-pair A_seed1 B_seed1

prints each pair, then the difference averaged over the pairs, all resampled on the same test sets.
Resampling one test set cannot show that set's own quirks: on 300 clean scans detection at 0.1 % hangs on the
single highest clean score. Before keeping a candidate that won on a test set earlier choices were made on,
score both on new scans (benchmarks/evaluate_checkpoint.py on a folder of test scans from quality.make_data
with another seed) and compare those: a three-seed detection lead of +0.03 / +0.07 reversed that way
(docs/experiments.md).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from detector import metrics


def read_scores(run: Path) -> dict[str, tuple[int, float]]:
    """{scan path: (label, score)} from RUN/test_scores.csv (or that CSV itself). Paths are resolved from the
    working directory, so a run started elsewhere (absolute paths) matches one started here (relative)."""
    path = run / "test_scores.csv" if run.is_dir() else run
    if not path.exists():
        raise SystemExit(f"{path}: not found (train with a test split, e.g. benchmarks/quality.py)")
    with open(path, newline="") as f:
        try:
            return {str(Path(r["path"]).resolve()): (int(r["label"]), float(r["score"])) for r in csv.DictReader(f)}
        except (KeyError, TypeError, ValueError) as e:   # e.g. `detector score`'s results.csv: no label column
            raise SystemExit(f"{path}: not a test scores CSV (path,label,score per scan; {type(e).__name__}: {e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path, help="baseline run folder (or its test_scores.csv)")
    ap.add_argument("run_b", type=Path, help="candidate run folder (or its test_scores.csv)")
    ap.add_argument("--seed-pair", nargs=2, type=Path, action="append", default=[], metavar=("A2", "B2"),
                    help="the same two configs trained with another seed (repeatable): also prints the "
                         "difference averaged over all pairs")
    ap.add_argument("--resamples", type=int, default=2000)
    a = ap.parse_args()
    pairs = [(a.run_a, a.run_b), *a.seed_pair]
    runs = [(read_scores(ra), read_scores(rb)) for ra, rb in pairs]
    keys = sorted(set.intersection(*(set(s) for pair in runs for s in pair)))
    if not keys:
        raise SystemExit("the runs share no test scans: compare runs tested on the same data")
    if any(len({s[k][0] for pair in runs for s in pair}) > 1 for k in keys):
        raise SystemExit("the runs disagree on labels of the same scans: not the same test set")
    most = max(len(s) for pair in runs for s in pair)
    if len(keys) < most:
        print(f"note: comparing the {len(keys)} scans every run scored (up to {most} in one)")
    y = np.array([runs[0][0][k][0] for k in keys])
    score_a = np.array([[sa[k][1] for k in keys] for sa, _ in runs])
    score_b = np.array([[sb[k][1] for k in keys] for _, sb in runs])
    print(f"{len(keys)} test scans ({int(y.sum())} anomalous)")
    for i, (ra, rb) in enumerate(pairs):
        if len(pairs) > 1:
            print(f"pair {i + 1}: A {ra}  B {rb}")
        compare(y, score_a[i], score_b[i], a.resamples)
    if len(pairs) > 1:
        print(f"averaged over the {len(pairs)} pairs (the same resampled test sets for each):")
        compare(y, score_a, score_b, a.resamples)


def compare(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, resamples: int) -> None:
    """Prints B - A for AUROC and detection at 1 % and 0.1 % false alarms (the station's strictest calibrated
    threshold: on a few hundred clean scans, the highest of them); 2-D scores (one row per seed pair) print
    the mean over rows."""
    for name, fn in (("AUROC", metrics.auroc), ("det@1%", metrics.detection_at_1pct),
                     ("det@.1%", metrics.detection_at_01pct)):
        d = metrics.paired_difference(y, score_a, score_b, fn, n=resamples)
        if d is None:
            raise SystemExit("the test scans need both normal and anomalous ones")
        verdict = "B better" if d["low"] > 0 else "A better" if d["high"] < 0 else "no measurable difference"
        fa, fb = (np.mean([fn(y, row) for row in np.atleast_2d(s)]) for s in (score_a, score_b))
        print(f"{name:<7} A {fa:.4f}  B {fb:.4f}  B-A {d['difference']:+.4f} "
              f"(95 % {d['low']:+.4f} to {d['high']:+.4f}, B ahead in {d['p_better']:.0%} of resamples): {verdict}")
    if score_a.ndim == 2:
        return
    # the same misses in both: those anomalies are hard for this kind of model (a longer run or an ensemble of
    # the two is unlikely to find them); different misses: the runs differ by luck more than by design
    miss_a, miss_b = metrics.missed_at_far(y, score_a, 0.01), metrics.missed_at_far(y, score_b, 0.01)
    print(f"missed at 1 %: A {miss_a.sum()}, B {miss_b.sum()}, both {(miss_a & miss_b).sum()} "
          f"of {int(y.sum())} anomalies")


if __name__ == "__main__":
    main()

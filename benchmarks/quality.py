"""Quality of a training config on synthetic scans: train/val/test generated here, test from other seeds.

    .venv/bin/python benchmarks/quality.py --config configs/quick.yaml [--train 160 --val 60 --test 100]
    .venv/bin/python benchmarks/quality.py --config configs/default.yaml --train 1200 --val 100 --test 200
    .venv/bin/python benchmarks/quality.py --normal-only ...   # no anomalous training scans: TIP only
    .venv/bin/python benchmarks/quality.py --labels-only ...   # training anomalies without masks or boxes
                                     # (whole trucks: training leaves them out, so this trains normal-only,
                                     # unless data.label_only_crops=true; docs/experiments.md)

Prints AUROC, AP, detection at 1 % and 0.1 % false alarms, per anomaly type, how often the top heatmap
region hits the anomaly, and the data and training times. Two runs on the same data (same --train/--val/
--test/--seed, different --run and overrides): benchmarks/compare_runs.py tells whether they really differ.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from detector import metrics
from detector.calibration import rate_interval
from detector.scan import ScanError
from detector.synth.dataset import generator_version, write_dataset
from detector.synth.scene import GENERATOR_VERSION
from detector.synth.visibility import BANDS, band_of, generator_visibility
from detector.checkpoint import CheckpointError
from detector.config import ConfigError, load_config
from detector.train import run_training


def make_data(root: Path, n: dict[str, int], seed: int, fraction: float) -> Path:
    """train/val/test folders from disjoint seeds + one manifest with a split column."""
    rows = []
    for i, (split, count) in enumerate(n.items()):
        part = root / split
        try:
            made_by = generator_version(part)
        except ValueError as e:
            raise SystemExit(f"quality: {e}") from None
        if made_by not in (None, GENERATOR_VERSION):   # the same seeds now make other pixels
            raise SystemExit(f"quality: {part} was made by synthetic generator version {made_by}, this code makes "
                             f"version {GENERATOR_VERSION}; delete {root} to generate it again, or use another --work")
        if made_by is None:
            write_dataset(part, count, seed=seed + 1000 * i, anomaly_fraction=fraction, split=split,
                          progress=True)
        with open(part / "manifest.csv", newline="") as f:
            for r in csv.DictReader(f):
                r["path"] = f"{split}/{r['path']}"
                r["mask"] = f"{split}/{r['mask']}" if r.get("mask") else ""
                r["split"] = split
                rows.append(r)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def labels_only(data: Path) -> Path:
    """A dataset beside `data` whose training anomalies have their label alone (masks and boxes dropped): a site
    that knows which trucks held something but not where. Its manifest points into `data`; the scan cache is
    shared (its keys hold absolute paths), so only those scans are cached again."""
    out = data / "labels_only"
    out.mkdir(exist_ok=True)
    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["path"] = f"../{r['path']}"
        r["mask"] = f"../{r['mask']}" if r.get("mask") else ""
        if r["split"] == "train" and r["label"] == "1":
            r["mask"], r["boxes"] = "", ""
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


FLOORS = (0.5, 1.0)   # visibility floors the figures are also given above: what a target that left out the fainter
                      # anomalies would read (issue 3's targets count every anomaly)


def by_visibility(rows: list[dict], cache: Path) -> dict:
    """Detection at the test set's 1 % false-alarm threshold per visibility band of the anomaly, and AUROC,
    detection and top-region hits counting only the anomalies at or above each of FLOORS (at visibility >= 1,
    the ones contrast can show). `rows`: RUN/test_scores.csv."""
    vis = generator_visibility([Path(r["path"]).stem for r in rows if r["label"] == "1"], cache)
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    v = np.array([vis.get(Path(r["path"]).stem, np.nan) for r in rows])
    t1 = metrics.threshold_at_far(y, s, 0.01)
    bands = {}
    for lo, hi in zip(BANDS, BANDS[1:]):
        sel = (y == 1) & (v >= lo) & (v < hi)
        if sel.any():
            bands[band_of(lo)] = {"n": int(sel.sum()), "det_at_1pct": float(np.mean(s[sel] >= t1))}
    hit = np.array([r.get("top_region_hit") == "1" for r in rows])
    floors = {}
    for floor in FLOORS:
        keep, pos = (y == 0) | (v >= floor), (y == 1) & (v >= floor)
        floors[f"{floor:g}"] = {"n": int(pos.sum()), "auroc": metrics.auroc(y[keep], s[keep]),
                                "det_at_1pct": metrics.detection_at_1pct(y[keep], s[keep]),
                                "top_region": float(hit[pos].mean()) if pos.any() else None}
    visible = floors["1"]
    return {"bands": bands, "floors": floors, "visible_auroc": visible["auroc"],
            "visible_det_at_1pct": visible["det_at_1pct"], "n_visible": visible["n"]}


def at_own_threshold(rows: list[dict], thresholds: list[dict], rate: float = 0.01) -> dict | None:
    """What the run's own threshold for `rate` (calibrated on its normal validation scans, as the exported bundle
    ships it) does on the test scans: the clean ones it inspects (with a 95 % interval) and the anomalies it finds.
    det@1% above sets its threshold on the test scans themselves, which a station cannot."""
    row = next((r for r in thresholds if abs(r["false_alarm_rate"] - rate) < 1e-12), None)
    if row is None:
        return None
    t = row["threshold"]
    clean = [float(r["score"]) >= t for r in rows if r["label"] == "0"]
    found = [float(r["score"]) >= t for r in rows if r["label"] == "1"]
    if not clean or not found:
        return None
    k = sum(clean)
    return {"rate": rate, "threshold": t, "n_normal_validation": row.get("n_normal"), "clean_inspected": k,
            "clean": len(clean), "clean_interval": rate_interval(k, len(clean)), "detection": sum(found) / len(found)}


def print_details(rows: list[dict], thresholds: list[dict], per_type: dict, data: Path) -> tuple[dict, dict | None, dict]:
    """Print what the test scores say beyond AUROC: 95 % intervals, the run's own 1 % threshold at work, detection
    per anomaly type and per visibility band; returns (intervals, own threshold, visibility). `rows`: a run's
    test_scores.csv; `data`: the generator data folder it was tested on (benchmarks/evaluate_checkpoint.py uses it too)."""
    # 95 % intervals: how much of a difference between two runs another test set of this size could undo
    ci = metrics.intervals([int(r["label"]) for r in rows], [float(r["score"]) for r in rows])
    if ci["auroc"] and ci["detection_at_1pct"]:
        print(f"95 % intervals over resampled test sets: AUROC [{ci['auroc'][0]:.3f}, {ci['auroc'][1]:.3f}]  "
              f"det@1% [{ci['detection_at_1pct'][0]:.3f}, {ci['detection_at_1pct'][1]:.3f}]")
    own = at_own_threshold(rows, thresholds)
    if own:
        lo, hi = own["clean_interval"]
        print(f"at the run's own 1 % threshold {own['threshold']:.4f} (from {own['n_normal_validation']} normal validation "
              f"scans, as the bundle ships it): {own['clean_inspected']} of {own['clean']} clean test scans inspected "
              f"({lo:.1%}-{hi:.1%}), detection {own['detection']:.3f}")
    for kind, v in per_type.items():
        print(f"  {kind:<16} n={v['n']:<4} det@1% {v['det_at_1pct']:.3f}")
    vis = by_visibility(rows, data / "test" / "visibility.json")
    print("visibility = added attenuation / local clutter (detector.synth.visibility):")
    for band, v in vis["bands"].items():
        print(f"  visibility {band:<6} n={v['n']:<4} det@1% {v['det_at_1pct']:.3f}")
    for floor, f in vis["floors"].items():
        if f["auroc"] is not None:   # None: no anomaly at or above this floor
            print(f"  anomalies at visibility >= {floor} only ({f['n']}): AUROC {f['auroc']:.4f}  det@1% "
                  f"{f['det_at_1pct']:.4f}  top region {f['top_region']:.3f}")
    return ci, own, vis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--anomaly-fraction", type=float, default=0.5)
    ap.add_argument("--normal-only", action="store_true", help="train on normal scans only (TIP anomalies)")
    ap.add_argument("--labels-only", action="store_true",
                    help="the training anomalies without masks or boxes: image labels alone (training leaves "
                         "such scans out when larger than a crop, as these trucks are: normal-only unless "
                         "data.label_only_crops=true)")
    ap.add_argument("--work", default="runs/quality")
    ap.add_argument("--run", help="run folder name under --work (default: the config's name)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if min(a.train, a.val, a.test) < 1:   # no test split: no figures, after a full training
        raise SystemExit(f"quality: --train, --val and --test must be >= 1, got {a.train}, {a.val}, {a.test}")
    if not 0 <= a.anomaly_fraction <= 1:
        raise SystemExit(f"quality: --anomaly-fraction must be in [0, 1], got {a.anomaly_fraction}")
    extra = [*a.overrides, *(["data.normal_only=true"] if a.normal_only else [])]
    try:
        load_config(a.config, extra)   # before the data: a mistyped config or override fails at once, not after it
    except ConfigError as e:
        raise SystemExit(f"quality: {e}") from None
    work = Path(a.work)
    t0 = time.time()
    # the folder is reused when it exists: its name holds everything it was generated from (another
    # --anomaly-fraction reused the 0.5 data; the default keeps the name the docs use)
    frac = "" if a.anomaly_fraction == 0.5 else f"_a{a.anomaly_fraction:g}"
    data = make_data(work / f"data_s{a.seed}_{a.train}_{a.val}_{a.test}{frac}",
                     {"train": a.train, "val": a.val, "test": a.test}, a.seed, a.anomaly_fraction)
    t_data = time.time() - t0
    # one scan cache per data folder, shared by every run on it (keys hold the pitch): ~16 GB per 1900 scans
    ov = [f"data.cache_dir={data / 'cache'}", *extra]
    mode = " (normal-only, TIP)" if a.normal_only else " (labels only)" if a.labels_only else ""
    run = work / (a.run or Path(a.config).stem + ("_normal_only" if a.normal_only else "_labels_only" if a.labels_only
                                                  else ""))
    t1 = time.time()
    try:
        res = run_training(a.config, labels_only(data) if a.labels_only else data, run, ov)
    except (ConfigError, ScanError, CheckpointError) as e:   # as `detector train` reports them: one line
        raise SystemExit(f"quality: {e}") from None
    if not res:   # a DDP worker process (trainer.cpu_processes > 1): rank 0 reports
        return
    t_train = time.time() - t1
    t = res.get("test") or {}
    f = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"\n== {a.config} {' '.join(a.overrides)}{mode}: test {t.get('n')} scans "
          f"({t.get('n_anomalous')} anomalous), seeds disjoint from training")
    print(f"AUROC {f(t.get('auroc'))}  AP {f(t.get('ap'))}  det@1% {f(t.get('det_at_1pct'))}  "
          f"det@0.1% {f(t.get('det_at_0.1pct'))}  top-region hit {f(t.get('top_region_hit'))} "
          f"(of {t.get('n_localised')})")
    rows = list(csv.DictReader(open(run / "test_scores.csv", newline="")))
    ci, own, vis = print_details(rows, res["thresholds"], t.get("per_type") or {}, data)
    print(f"data {t_data:.0f}s, training {res['train_time_s']:.0f}s ({res['epochs']} epochs; scan caching "
          f"included), test {t_train - res['train_time_s']:.0f}s, run {run}")
    (run / "quality.json").write_text(json.dumps({"test": t, "validation": res["validation"], "data_s": t_data,
                                                   "train_s": res["train_time_s"],
                                                   "test_s": t_train - res["train_time_s"], "epochs": res["epochs"],
                                                   "normal_only": a.normal_only, "labels_only": a.labels_only,
                                                   "visibility": vis, "intervals": ci, "own_threshold": own}, indent=2))


if __name__ == "__main__":
    main()

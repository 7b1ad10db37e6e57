"""`detector demo`: the whole story on the CPU in a few minutes, through the same verbs a user runs.

synth (train + held-out test, other seeds) -> train configs/quick.yaml -> export ONNX ->
score the test folder with overlays -> eval (metrics.json, roc.png, report.html) -> summary.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import time
from pathlib import Path

from detector import cli
from detector.evaluate import detection_phrase
from detector.shipped import resolve_config
from detector.sources import colour_png
from detector.synth.dataset import SYNTH_INFO

DEFAULT_TRAIN = 160
DEFAULT_TEST = 60


def _config_path(arg: str | None) -> str:
    """--config, else configs/quick.yaml (the checkout's from its root, else the copy shipped in the package)."""
    return arg or resolve_config("configs/quick.yaml")


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: detector {shlex.join(argv)}", flush=True)
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"demo step failed ({title}, exit {rc})")


def _forget_other_data(root: Path, asked: dict) -> None:
    """Delete the scans an earlier demo into this folder made with another --count or --seed, so that they are made
    again: reused, a --count 24 demo trained on 12. A stamp, root/demo.json, records what the scans now there were
    made with; without one, only scans `detector synth` made (its synth.json) or an empty folder go, never a user's."""
    stamp = root / "demo.json"
    try:
        made = json.loads(stamp.read_text())
    except (OSError, ValueError):
        made = None
    if made != asked:
        for part in ("train", "test"):
            if not (root / part).exists():
                continue
            empty = (root / part).is_dir() and not any((root / part).iterdir())
            mine = made is not None or (root / part / SYNTH_INFO).exists() or empty
            if not mine:   # never delete scans the demo did not make
                raise SystemExit(f"demo: {root / part} holds scans this demo did not make; give another --out")
            shutil.rmtree(root / part)
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(asked))


def _forget_overlays(overlays: Path) -> None:
    """Delete an earlier demo's overlay pictures (colour PNGs, as only overlays are), which describe another model;
    nothing else in the folder."""
    for png in overlays.rglob("*.png") if overlays.is_dir() else ():
        if colour_png(png):
            png.unlink()


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train = args.count or DEFAULT_TRAIN
    n_test = max(20, n_train * DEFAULT_TEST // DEFAULT_TRAIN)
    t0 = time.perf_counter()
    data, test = out / "data" / "train", out / "data" / "test"
    run, model = out / "run", out / "model.onnx"
    results, overlays, report = out / "results.csv", out / "overlays", out / "report"
    seed = args.seed
    _forget_other_data(out / "data", {"train": n_train, "test": n_test, "seed": seed})
    if not (data / "manifest.csv").exists():
        _step("1/6 synthesise training scans", ["synth", str(data), "--count", str(n_train),
                                                "--seed", str(seed), "--anomaly-fraction", "0.5"])
    if not (test / "manifest.csv").exists():
        _step("2/6 synthesise held-out test scans (other seeds)",
              ["synth", str(test), "--count", str(n_test), "--seed", str(seed + 10_000),
               "--anomaly-fraction", "0.5", "--split", "test"])
    _step("3/6 train", ["train", "--config", _config_path(args.config), "--data", str(data),
                        "--out", str(run)])
    _step("4/6 export", ["export", str(run / "best.ckpt"), "--out", str(model)])
    results.unlink(missing_ok=True)              # an earlier demo's rows and overlays describe another model
    _forget_overlays(overlays)
    _step("5/6 score", ["score", str(test / "images"), "--model", str(model), "--out", str(results),
                        "--overlays", str(overlays)])
    _step("6/6 eval", ["eval", str(results), "--truth", str(test), "--out", str(report)])

    metrics = json.loads((report / "metrics.json").read_text())
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    lat = sorted(float(r["latency_ms"]) for r in rows if r.get("latency_ms"))
    ms = lat[len(lat) // 2] if lat else float("nan")
    overall = metrics["overall"]
    minutes = (time.perf_counter() - t0) / 60
    print("\n" + "=" * 72)
    print(f"demo done in {minutes:.1f} min: AUROC {_fmt(overall['auroc'])}, {detection_phrase(overall)}, "
          f"{ms:.0f} ms per scan (median, file to verdict, {len(rows)} scans)")
    print(f"report:   {report / 'report.html'}")
    print(f"overlays: {overlays}/")
    print(f"model:    {model}")
    print(f"next:     detector serve --model {shlex.quote(str(model))}   (station HTTP service)")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"

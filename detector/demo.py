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
from detector.sources import remove_overlay
from detector.synth.dataset import SYNTH_INFO
from detector.synth.scene import GENERATOR_VERSION

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


def _made_with(part: Path) -> tuple | None:
    """(count, seed, generator version) that `detector synth` recorded making the scans in `part` (its synth.json)."""
    try:
        made = json.loads((part / SYNTH_INFO).read_text())
        return made["count"], made["seed"], made["generator"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _forget_other_data(wanted: dict[Path, tuple[int, int]]) -> None:
    """Delete the demo's scans ({folder: (count, seed)}) when any was made with another --count, --seed or generator
    (synth.json says what made them), so that all are made again: reused, a --count 24 demo trained on 12. Never a
    user's: a folder of files `detector synth` did not make is refused, before anything is deleted."""
    made = {part: _made_with(part) for part in wanted}
    if all(made[part] == (*want, GENERATOR_VERSION) for part, want in wanted.items()):
        return
    for part in wanted:
        if part.exists() and made[part] is None and not (part.is_dir() and not any(part.iterdir())):
            raise SystemExit(f"demo: {part} holds scans this demo did not make; give another --out")
    for part in wanted:
        if part.exists():
            shutil.rmtree(part)


def _forget_overlays(overlays: Path) -> None:
    """Delete an earlier demo's overlay pictures (colour PNGs, as only overlays are), which describe another model;
    nothing else in the folder."""
    for png in overlays.rglob("*.png") if overlays.is_dir() else ():
        remove_overlay(png)


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
    _forget_other_data({data: (n_train, seed), test: (n_test, seed + 10_000)})
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

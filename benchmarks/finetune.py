"""Does starting from a trained model (train --init) beat training from scratch on a site's few scans?

    .venv/bin/python benchmarks/finetune.py --init runs/quality/gen3_1207/best.ckpt --single-energy
    .venv/bin/python benchmarks/finetune.py --init RUN/best.ckpt --single-energy --normal-only optim.lr=0.001

Generates (or reuses) benchmarks/quality.py's synthetic train/val/test folder, with --single-energy keeps only
the high energy of every scan (a site whose scanner has one energy, where the synthetic model saw two), then
trains the same config twice on it, from scratch and from --init, in separate `detector train` processes (a
DDP run re-runs its command), and prints both runs' test figures and their paired difference
(benchmarks/compare_runs.py). The --init model must not have trained on these scans: quality.py's folders of
one seed share their scans, so give --seed another one than the --init run's (its test scans then are new too).
Overrides apply to both runs (optim.lr=... to the fine-tune only with --init-lr).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import compare, read_scores  # noqa: E402
from quality import make_data  # noqa: E402

from detector.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from detector.config import ConfigError, load_config  # noqa: E402
from detector.cpus import usable_cpus  # noqa: E402
from detector.scan import read_scan, write_scan  # noqa: E402


def _high_energy_copy(job: tuple[Path, Path]) -> None:
    src, dst = job
    s = read_scan(src)
    c = list(s.energies).index("high") if "high" in s.energies else 0
    write_scan(dst, s.counts[c:c + 1], i0=(s.i0[c],), pitch_mm=s.pitch_mm, energies=(s.energies[c],))


def single_energy(data: Path) -> Path:
    """DATA_single: the folder's scans with their high energy only (masks linked, manifest copied); reused."""
    out = data.with_name(data.name + "_single")
    if (out / "manifest.csv").exists():
        return out
    rows = list(csv.DictReader(open(data / "manifest.csv", newline="")))
    with ProcessPoolExecutor(usable_cpus()) as ex:
        list(ex.map(_high_energy_copy, [(data / r["path"], out / r["path"]) for r in rows], chunksize=8))
    for r in rows:
        if r.get("mask") and not (out / r["mask"]).exists():
            (out / r["mask"]).parent.mkdir(parents=True, exist_ok=True)
            os.link(data / r["mask"], out / r["mask"])
    tmp = out / "manifest.csv.tmp"   # written last: a folder with a manifest is complete
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "manifest.csv")
    return out


def train(config: str, data: Path, run: Path, overrides: list[str], init: str | None) -> dict:
    """One `detector train` in its own process; its metrics.json."""
    cmd = [sys.executable, "-m", "detector.cli", "train", "--config", config, "--data", str(data), "--out", str(run),
           f"data.cache_dir={data / 'cache'}", *overrides, *(["--init", init] if init else [])]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the trained checkpoint to start from (RUN/best.ckpt)")
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--single-energy", action="store_true", help="keep the high energy only (a one-energy site)")
    ap.add_argument("--normal-only", action="store_true", help="train on the normal scans only (TIP anomalies)")
    ap.add_argument("--init-lr", type=float, default=None, help="optim.lr of the fine-tune (default: the config's)")
    ap.add_argument("--work", default="runs/quality")
    ap.add_argument("--run", default="finetune", help="run folders WORK/RUN_scratch and WORK/RUN_init")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="an earlier run of this script's scratch arm (its folder) to compare with, not trained again")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    try:   # before the data and the first run: a wrong --init or override fails now, in one line
        read_checkpoint(a.init)
        load_config(a.config, a.overrides)
        if a.scratch is not None and not (a.scratch / "metrics.json").is_file():
            raise SystemExit(f"finetune: {a.scratch / 'metrics.json'}: not found (--scratch names a finished run)")
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"finetune: {e}") from None
    if min(a.train, a.val, a.test) < 1:
        raise SystemExit(f"finetune: --train, --val and --test must be >= 1, got {a.train}, {a.val}, {a.test}")
    work = Path(a.work)
    data = make_data(work / f"data_s{a.seed}_{a.train}_{a.val}_{a.test}",
                     {"train": a.train, "val": a.val, "test": a.test}, a.seed, 0.5)
    if a.single_energy:
        data = single_energy(data)
    ov = [*a.overrides, "trainer.max_minutes=0", *(["data.normal_only=true"] if a.normal_only else [])]
    lr = [f"optim.lr={a.init_lr}"] if a.init_lr is not None else []
    runs = {"scratch": (a.scratch or work / f"{a.run}_scratch", ov, None),
            "init": (work / f"{a.run}_init", [*ov, *lr], a.init)}
    res = {k: json.loads((run / "metrics.json").read_text()) if k == "scratch" and a.scratch else
           train(a.config, data, run, o, init) for k, (run, o, init) in runs.items()}
    for k, m in res.items():
        t = m["test"]
        print(f"{k:8s} {m['epochs']} epochs in {m['train_time_s']:.0f}s: test AUROC {t['auroc']:.3f} AP {t['ap']:.3f} "
              f"det@1% {t['det_at_1pct']:.3f} det@0.1% {t['det_at_0.1pct']:.3f} top region {t['top_region_hit']:.3f}")
    a_scores, b_scores = (read_scores(runs[k][0]) for k in ("scratch", "init"))
    keys = sorted(set(a_scores) & set(b_scores))
    y = np.array([a_scores[k][0] for k in keys])
    print(f"init - scratch on the same {len(keys)} test scans ({data}):")
    compare(y, np.array([a_scores[k][1] for k in keys]), np.array([b_scores[k][1] for k in keys]), 2000)


if __name__ == "__main__":
    main()

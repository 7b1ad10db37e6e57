"""Test another checkpoint of a finished run (e.g. last.ckpt beside the best.ckpt that training tested) on the
run's test split, and write its scores beside RUN/test_scores.csv for benchmarks/compare_runs.py; on a
benchmarks/quality.py data folder it also prints quality.py's figures per anomaly type and visibility band. `--split train`
scores the scans the run trained on instead: the gap to the test figures is how much of what it learnt is memorised.
The data folder may also hold test scans only (e.g. quality.make_data with a new seed and {"test": 600}): new scans
that no earlier choice was made on, the check a candidate should pass before it is kept (docs/experiments.md).

    .venv/bin/python benchmarks/evaluate_checkpoint.py runs/quality/default runs/quality/data_s100_1200_100_600 \
        [--checkpoint last.ckpt]
    .venv/bin/python benchmarks/compare_runs.py runs/quality/default runs/quality/default/test_scores_last.csv
    .venv/bin/python benchmarks/evaluate_checkpoint.py runs/quality/default runs/quality/data_s100_1200_100_600 \
        --checkpoint best.ckpt --split train
    .venv/bin/python benchmarks/evaluate_checkpoint.py runs/quality/default runs/quality/data_fresh_s9100_600 \
        --checkpoint best.ckpt --out runs/quality/default/fresh_scores_best.csv

This is how the checkpoint-selection rule was measured: on 50 validation anomalies the strictly best epoch
was often an earlier one that tested worse than the last (docs/experiments.md, trainer.select_se).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import lightning as L
import torch

from detector.data import ScanDataModule
from detector.scan import ScanError
from detector.checkpoint import CheckpointError, read_checkpoint
from detector.config import ConfigError, load_config
from detector.synth.dataset import generator_version
from detector.train import AnomalyModule, lightning_noise_off, write_test_scores
from quality import print_details   # benchmarks/quality.py: per type, per visibility band, the run's own threshold


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a training run folder (config.yaml, *.ckpt)")
    ap.add_argument("data", type=Path, help="the data folder the run trained on (its manifest's splits)")
    ap.add_argument("--checkpoint", default="last.ckpt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--split", choices=("test", "val", "train"), default="test",
                    help="the split to score (train: the scans the run learnt from)")
    ap.add_argument("--out", type=Path, help="the scores CSV (default RUN/<split>_scores_<checkpoint>.csv; name "
                                             "another for another data folder, or it replaces the first's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:   # the checkpoint first: a mistyped name fails before the scans are cached
        epoch = read_checkpoint(a.run / a.checkpoint)["epoch"]
        cfg = load_config(a.run / "config.yaml", [])
        dm = ScanDataModule(a.data, dataclasses.replace(cfg.data, workers=0, min_visibility=0.0), cfg.preprocessing,
                            cfg.data.cache_dir or a.run / "cache", require_train=a.split != "test")
        dm.prepare_data()
        dm.setup("test")
    except (CheckpointError, ConfigError, ScanError) as e:   # the run, its checkpoint or the data folder: one line
        raise SystemExit(f"evaluate_checkpoint: {e}") from None
    if not dm.splits[a.split]:
        raise SystemExit(f"{a.data}: no {a.split} split in its manifest")
    dm.splits["test"], dm.metas["test"] = dm.splits[a.split], dm.metas[a.split]   # the test loop runs it
    module = AnomalyModule.load_from_checkpoint(a.run / a.checkpoint, map_location="cpu")
    with lightning_noise_off("The 'test_dataloader' does not have many workers"):   # workers=0 on purpose
        tester = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=True, enable_model_summary=False)
        tester.test(module, datamodule=dm, verbose=False)
    m = module.test_metrics
    out = a.out or a.run / f"{a.split}_scores_{Path(a.checkpoint).stem}.csv"
    write_test_scores(out, module.test_rows, dm.splits["test"])
    print(f"{a.run / a.checkpoint} (epoch {epoch}): {m['n']} {a.split} scans, AUROC {m['auroc']:.4f}  AP {m['ap']:.4f}  "
          f"det@1% {m['det_at_1pct']:.4f}  det@0.1% {m['det_at_0.1pct']:.4f}  "
          f"top-region hit {m['top_region_hit']:.4f}")
    if a.split == "test" and generator_version(a.data / "test") is not None:   # a quality.py data folder: its figures too
        rows = list(csv.DictReader(open(out, newline="")))
        print_details(rows, module.info.get("thresholds") or [], m.get("per_type") or {}, a.data)
    print(f"scores: {out}")
    if a.split == "test" and a.out is None:   # the run's test split: its test_scores.csv holds the same scans
        print(f"next: python benchmarks/compare_runs.py {a.run} {out}")
    elif a.split == "test":   # maybe another data folder: compare with another run's scores of the same scans
        print(f"next: python benchmarks/compare_runs.py OTHER_RUN/{out.name} {out}")


if __name__ == "__main__":
    main()

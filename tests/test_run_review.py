"""A training run's pictures: RUN/curves.png, RUN/review/ (validation scans behind the threshold, misses) and the same
in TensorBoard."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import cv2
from test_train import TINY, _one_thread, no_val_anomalies, write_dataset

ONE_THREAD = _one_thread   # test_train's autouse fixture, imported: these tests run on one torch thread too


def test_a_run_draws_its_curves_and_the_validation_scans_that_set_its_threshold(tmp_path):
    """The highest-scoring normal validation scans (the false alarms behind the 1 % threshold) and the lowest-scoring
    anomalous ones (the misses) of best.ckpt's validation, named by role, drawn at its threshold; curves.png with
    validation every 2nd epoch; both in TensorBoard; metrics.json lists them."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from detector.train import review_line, run_training
    data = write_dataset(tmp_path / "data", n=18)
    run = tmp_path / "run"
    res = run_training(None, data, run, [*TINY, "trainer.max_epochs=3", "trainer.val_every=2", "trainer.patience=0"],
                       quiet=True)
    m = json.loads((run / "metrics.json").read_text())
    review = m["review"]
    assert review["threshold"] == m["thresholds"][0]["threshold"] and review["notes"] == []
    scores = torch.load(run / "best.ckpt", map_location="cpu", weights_only=False)["detector_val_scores"]
    assert sorted(s["score"] for s in scores if s["label"] == 0) == m["normal_scores"]   # best.ckpt's validation
    truth = {str(data / r["path"]): int(r["label"]) for r in csv.DictReader(open(data / "manifest.csv"))}
    pics = review["pictures"]
    normal = [p for p in pics if p["role"] in ("false_alarm", "highest_normal")]
    assert [p["score"] for p in normal] == sorted(m["normal_scores"], reverse=True)[:4]
    anomalous = sorted(s["score"] for s in scores if s["label"] == 1)
    low = [p for p in pics if p["role"] in ("miss", "weakest_found")]
    assert [p["score"] for p in low] == anomalous[:4]
    assert all(truth[p["scan"]] == p["label"] == (p in low) for p in normal + low)
    thr = review["threshold"]
    assert all((p["role"] in ("false_alarm", "weakest_found")) == (p["score"] >= thr) for p in normal + low)
    drawn = sorted(f.name for f in (run / "review").iterdir())
    assert drawn == sorted(p["file"] for p in pics)
    for p in pics:
        assert p["file"] == f"{p['role']}_{pics.index(p) - (len(normal) if p in low else 0) + 1}_" \
                            f"{Path(p['scan']).stem}.png"
        assert cv2.imread(str(run / "review" / p["file"])) is not None
    curves = cv2.imread(str(run / "curves.png"))
    assert curves is not None and curves.shape[1] > 1000
    images = set(EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload().Tags()["images"])
    assert images == {"curves", *(f"review/{p['file'][:-4]}" for p in pics)}
    line = review_line(res["review"], run)
    assert f"{len(pics)} validation scan(s)" in line and str(run / "review") in line


def test_a_validation_split_without_anomalies_reviews_its_normal_scans_and_says_so(tmp_path):
    """No anomalous validation scan (and single-energy scans): the normal scans are drawn, the missing roles said in
    one line, no warning, no failure; a new run into the folder clears the earlier review."""
    from detector.train import review_line, run_training
    root = no_val_anomalies(write_dataset(tmp_path / "d", n=12))
    run = tmp_path / "run"
    (run / "review").mkdir(parents=True)
    (run / "review" / "miss_1_old.png").write_bytes(b"an earlier run's")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_training(None, root, run, [*TINY, "trainer.max_epochs=1", "trainer.max_minutes=0",
                                             "data.channels=1"], quiet=True)
    review = res["review"]
    assert {p["role"] for p in review["pictures"]} <= {"false_alarm", "highest_normal"} and review["pictures"]
    assert sorted(f.name for f in (run / "review").iterdir()) == sorted(p["file"] for p in review["pictures"])
    assert not [w for w in caught if "review" in str(w.message) or "curves" in str(w.message)]
    assert "validation has no anomalous scans" in review_line(review, run)


def test_curves_are_drawn_from_a_log_with_gaps_or_without_validation(tmp_path):
    """Validation every 2nd epoch: its points sit on their epochs; no validation column at all: the panel says so."""
    from detector.run_review import epoch_series, plot_curves
    log = tmp_path / "metrics.csv"
    rows = [{"epoch": "0", "step": "3", "train/loss_step": "3.0"},
            {"epoch": "0", "step": "3", "train/loss_epoch": "2.0", "train/pixel_epoch": "1.0"},
            {"epoch": "1", "step": "7", "val/auroc": "0.7", "val/det_at_1pct": ""},
            {"epoch": "1", "step": "7", "train/loss_epoch": "1.5"},
            {"epoch": "", "step": "8", "lr-AdamW": "0.001"},
            {"epoch": "3", "step": "15", "val/auroc": "0.9", "val/det_at_1pct": "0.5"}]
    keys = ["epoch", "step", "lr-AdamW", "train/loss_step", "train/loss_epoch", "train/pixel_epoch", "val/auroc",
            "val/det_at_1pct"]
    with open(log, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    s = epoch_series(log)
    assert s["train/loss_epoch"] == {1: 2.0, 2: 1.5} and s["val/auroc"] == {2: 0.7, 4: 0.9}
    assert s["val/det_at_1pct"] == {4: 0.5} and s["train/dice_epoch"] == {}
    assert cv2.imread(str(plot_curves(log, tmp_path / "a" / "curves.png", best_epoch=4))) is not None
    log.write_text("epoch,step,train/loss_epoch\n0,3,2.0\n")
    assert epoch_series(log)["val/auroc"] == {}
    assert cv2.imread(str(plot_curves(log, tmp_path / "b" / "curves.png"))) is not None

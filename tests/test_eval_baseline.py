"""`detector eval NEW.csv --baseline OLD.csv`: two models' results on one truth, compared scan by scan (paired)."""
import csv
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from detector import evaluate
from detector import metrics as M

COLS = ["path", "score", "decision", "threshold", "regions", "latency_ms", "error"]


def _truth(root: Path, labels: list[int]) -> Path:
    """A manifest of scans s0, s1, ... (no files needed: results and truth meet by path)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([f"images/s{i}.tiff", y] for i, y in enumerate(labels))
    return root


def _results(path: Path, scores, threshold: float, skip=(), failed=()) -> Path:
    """A results CSV of scans s0, s1, ... beside the truth's folder: `skip` unscored, `failed` failed."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for i, s in enumerate(scores):
            if i in skip:
                continue
            if i in failed:
                w.writerow([f"images/s{i}.tiff", "", "INSPECT", "", "[]", "1.0", "truncated TIFF"])
            else:
                w.writerow([f"images/s{i}.tiff", s, "INSPECT" if s >= threshold else "RELEASE", threshold, "[]",
                            "1.0", ""])
    return path


def _eval(tmp_path, new, old, capsys=None, out="report"):
    args = Namespace(results=str(new), truth=str(tmp_path), out=str(tmp_path / out), baseline=old and str(old))
    rc = evaluate.main(args)
    text = capsys.readouterr() if capsys else None
    m = json.loads((tmp_path / out / "metrics.json").read_text()) if rc == 0 else None
    return rc, m, text


def test_a_clearly_better_model_has_a_paired_interval_above_zero():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200, int), np.ones(100, int)]
    old = np.r_[rng.uniform(0, 0.7, 200), rng.uniform(0.3, 1.0, 100)]
    new = np.clip(old + 0.2 * y, 0, 1)
    f = M.paired_figures(y, old, new, old >= 0.6, new >= 0.6, n=200)
    for name in ("auroc", "ap", "detection_at_1pct", "shipped_detection"):
        assert f[name]["low"] > 0 and f[name]["difference"] == pytest.approx(f[name]["new"] - f[name]["baseline"])
        assert f[name]["p_new_ahead"] == 1.0
    assert f["auroc"]["baseline"] == pytest.approx(M.auroc(y, old)) and f["auroc"]["new"] == pytest.approx(M.auroc(y, new))
    # the same normals scores: the same false alarms as shipped, a difference of exactly 0, new never ahead
    assert f["shipped_false_alarm"] == {"baseline": pytest.approx(f["shipped_false_alarm"]["new"]),
                                        "new": f["shipped_false_alarm"]["new"], "difference": 0.0, "low": 0.0,
                                        "high": 0.0, "better": "lower", "p_new_ahead": 0.0}


def test_identical_scores_differ_by_zero_with_a_zero_interval():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(50, int), np.ones(20, int)]
    s = rng.uniform(0, 1, 70)
    f = M.paired_figures(y, s, s.copy(), s >= 0.5, s >= 0.5, n=100)
    assert set(f) == {"auroc", "ap", "detection_at_1pct", "detection_at_0.5pct", "detection_at_0.1pct",
                      "shipped_detection", "shipped_false_alarm"}
    for v in f.values():
        assert (v["difference"], v["low"], v["high"], v["p_new_ahead"]) == (0.0, 0.0, 0.0, 0.0)
        assert v["baseline"] == v["new"] is not None


def test_eval_with_a_baseline_counts_and_lists_the_scans_left_out_and_says_the_headline(tmp_path, capsys):
    rng = np.random.default_rng(2)
    y = [0] * 60 + [1] * 30
    old = np.r_[rng.uniform(0, 0.7, 60), rng.uniform(0.3, 1.0, 30)].round(4)
    new = np.clip(old + 0.3 * np.array(y), 0, 1).round(4)
    _truth(tmp_path, y)
    a = _results(tmp_path / "new.csv", new, 0.6, skip={0, 61}, failed={1, 62})
    b = _results(tmp_path / "old.csv", old, 0.6, skip={2}, failed={3, 63, 62})
    rc, m, text = _eval(tmp_path, a, b, capsys)
    assert rc == 0, text.err
    c = m["comparison"]
    assert c["left_out_scans"] == {"only_new": ["images/s2.tiff"], "only_baseline": ["images/s0.tiff", "images/s61.tiff"],
                                   "failed_new": ["images/s1.tiff", "images/s62.tiff"],
                                   "failed_baseline": ["images/s3.tiff", "images/s62.tiff", "images/s63.tiff"]}
    assert c["left_out"] == {"only_new": 1, "only_baseline": 2, "failed_new": 2, "failed_baseline": 3,
                             "baseline_without_truth": 0}
    assert (c["n"], c["n_normal"], c["n_anomalous"]) == (90 - 3 - 4, 56, 27)   # s0-s3, s61-s63 out
    assert (c["resamples"], c["seed"], c["level"]) == (M.COMPARE_RESAMPLES, M.COMPARE_SEED, 0.95)
    assert c["figures"]["auroc"]["low"] > 0 and c["baseline"]["thresholds"] == [0.6]
    assert m["overall"]["n"] == 88    # the new model's own figures keep its failures (INSPECT) and all it scored
    assert "new - baseline on the 83 scans both scored: AUROC +0." in text.out
    assert "detection at 1 % +" in text.out and "points (95 % +" in text.out
    assert "roc_compare.png" in text.out and (tmp_path / "report" / "roc_compare.png").is_file()
    assert "1 truth scans scored in the new results only and 2 in the baseline only" in text.err
    assert "2 scans failed in the new results and 3 in the baseline" in text.err
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Against the baseline" in page and "old.csv" in page and "1000 test sets (seed 0)" in page
    # the same folder judged again without a baseline: no comparison, and the earlier one's plot is gone
    rc, m, _ = _eval(tmp_path, a, None, capsys)
    assert rc == 0 and "comparison" not in m and not (tmp_path / "report" / "roc_compare.png").exists()


def test_the_anomalies_each_model_misses_at_1pct_that_the_other_finds_are_named(tmp_path, capsys):
    normals = [round(0.05 * i, 2) for i in range(10)]   # 10 normals: 1 % allows none, threshold above 0.45
    y = [0] * 10 + [1] * 4
    old = normals + [0.9, 0.2, 0.7, 0.1]               # s10 both find, s11 new finds, s12 old finds, s13 neither
    new = normals + [0.9, 0.8, 0.3, 0.1]
    _truth(tmp_path, y)
    rc, m, text = _eval(tmp_path, _results(tmp_path / "new.csv", new, 0.5), _results(tmp_path / "old.csv", old, 0.5),
                        capsys)
    assert rc == 0, text.err
    assert m["comparison"]["misses_at_1pct"] == {"new_only": ["images/s12.tiff"], "baseline_only": ["images/s11.tiff"],
                                                 "both": 1, "new": 2, "baseline": 2}
    f = m["comparison"]["figures"]
    assert f["detection_at_1pct"]["difference"] == 0.0 and f["shipped_detection"]["new"] == 0.5
    assert "missed by the new model and found by the baseline 1, the reverse 1" in \
        (tmp_path / "report" / "report.html").read_text()


def test_a_baseline_that_does_not_fit_the_truth_is_refused_before_anything_is_written(tmp_path, capsys):
    _truth(tmp_path, [0, 0, 1])
    new = _results(tmp_path / "new.csv", [0.1, 0.2, 0.9], 0.5)
    other = tmp_path / "other.csv"
    other.write_text("path,score,decision,threshold,regions,latency_ms,error\nelse/x.tiff,0.5,INSPECT,0.5,[],1,\n")
    rc, _, text = _eval(tmp_path, new, other, capsys)
    assert rc == 2 and "no result in --baseline" in text.err and str(other) in text.err
    twice = _results(tmp_path / "twice.csv", [0.1, 0.2, 0.9], 0.5)
    with open(twice, "a", newline="") as f:
        csv.writer(f).writerow(["images/s0.tiff", 0.3, "RELEASE", 0.5, "[]", "1.0", ""])
    rc, _, text = _eval(tmp_path, new, twice, capsys)
    assert rc == 2 and text.err.startswith(f"detector eval: --baseline {twice}: rows 2 and 5")
    assert not (tmp_path / "report").exists()

"""Metrics against hand-computed values on a small crafted table."""
import math

import numpy as np
import pytest

from detector import calibration
from detector import metrics as M

NORMAL = [0.1, 0.2, 0.3, 0.4]
ANOM = [0.35, 0.5, 0.6]
Y = [0] * 4 + [1] * 3
S = NORMAL + ANOM


def test_auroc_ap_by_hand():
    assert M.auroc(Y, S) == pytest.approx(11 / 12)  # 11 of 12 anomalous-normal pairs ranked right
    # ranking A A N A N N N: precision 1, 1, 3/4 at the three anomalies
    assert M.average_precision(Y, S) == pytest.approx((1 + 1 + 0.75) / 3)


def test_detection_at_far_matches_calibration():
    row = M.detection_at_far(Y, S, 0.25)  # one of four normals may alarm: 0.4
    assert row["threshold"] == calibration.threshold_for_rate(NORMAL, 0.25)
    assert 0.3 < row["threshold"] < 0.35
    assert row["achieved_rate"] == 0.25 and row["detection_rate"] == 1.0
    row = M.detection_at_far(Y, S, 0.01)  # no normal may alarm: threshold just above 0.4
    assert 0.4 < row["threshold"] < 0.5
    assert row["detection_rate"] == pytest.approx(2 / 3) and row["achieved_rate"] == 0.0
    assert row["resolvable"] is False


def test_far_at_detection():
    row = M.far_at_detection(Y, S, 0.9)  # all 3 anomalies needed -> threshold 0.35 -> 0.4 alarms
    assert row["threshold"] == 0.35 and row["false_alarm_rate"] == 0.25 and row["achieved_detection"] == 1.0
    row = M.far_at_detection(Y, S, 0.6)  # 2 of 3 -> threshold 0.5 -> no false alarm
    assert row["threshold"] == 0.5 and row["false_alarm_rate"] == 0.0


def test_failures_are_fail_closed():
    y = Y[:4] + [0] + Y[4:] + [1]
    s = NORMAL + [math.nan] + ANOM + [math.nan]
    f = [False] * 4 + [True] + [False] * 3 + [True]
    # failed rows rank above everything; the two failed rows tie: (3 + 4 + 4 + 4.5) / 20
    assert M.auroc(y, s, f) == pytest.approx(15.5 / 20)
    row = M.detection_at_far(y, s, 0.2, f)  # the failed normal uses the one allowed alarm
    assert 0.4 < row["threshold"] < 0.5
    assert row["achieved_rate"] == pytest.approx(0.2) and row["detection_rate"] == pytest.approx(3 / 4)
    assert M.detection_at_far(y, s, 0.1, f)["threshold"] is None  # failures alone exceed 10%
    out = M.summary(y, s, f, ["RELEASE"] * 4 + ["INSPECT"] + ["RELEASE", "INSPECT", "INSPECT", "INSPECT"])
    assert out["n_failed"] == 2
    assert out["decisions"] == {"inspected": 4, "detection_rate": 0.75, "false_alarm_rate": 0.2,
                                "tp": 3, "fn": 1, "fp": 1, "tn": 4}


def test_single_class_is_graceful():
    out = M.summary([0, 0, 0], [0.1, 0.2, 0.3])
    assert out["auroc"] is None and out["ap"] is None
    assert any("AUROC and AP undefined" in n for n in out["notes"])
    assert out["far_at_detection"][0]["false_alarm_rate"] is None
    assert M.summary([1, 1], [0.1, 0.9])["detection_at_far"][0]["detection_rate"] is None


def test_iou_and_localisation():
    assert M.iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.iou([0, 0, 10, 10], [9, 9, 20, 20]) == pytest.approx(1 / 220)
    assert M.iou([0, 0, 10, 10], [50, 50, 60, 60]) == 0.0
    regions = [{"box": [50, 50, 60, 60], "score": 0.2}, {"box": [0, 0, 10, 10], "score": 0.9}]
    assert M.best_iou(regions, [[5, 5, 15, 15], [100, 100, 110, 110]]) == pytest.approx(1 / 7)  # best region only
    assert M.best_iou([], [[0, 0, 1, 1]]) == 0.0 and M.best_iou(regions, []) is None
    loc = M.localisation([1 / 7, 1 / 220, 0.0, None])
    assert loc["n"] == 3 and loc["hit_rate"] == pytest.approx(1 / 3) and loc["overlap_rate"] == pytest.approx(2 / 3)


def test_mask_boxes():
    m = np.zeros((20, 30), np.uint8)
    m[2:5, 3:9] = 255
    m[10:20, 20:30] = 255
    assert sorted(M.mask_boxes(m)) == [[3, 2, 9, 5], [20, 10, 30, 20]]


def test_mask_bbox_is_the_box_of_all_nonzero_pixels_whatever_the_dtype():
    m = np.zeros((20, 30), np.uint8)
    m[2:5, 3:9] = 255
    m[10:20, 20:30] = 1
    ys, xs = np.nonzero(m)
    want = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert M.mask_bbox(m) == M.mask_bbox(m > 0) == M.mask_bbox(m.astype(np.float32) * 0.3) == want == (3, 2, 30, 20)
    assert M.mask_bbox(np.zeros((5, 5), bool)) is None and M.mask_bbox(np.zeros((5, 5), np.float32)) is None


def test_bootstrap_interval_covers_the_true_auroc_and_narrows_with_more_scans():
    from detector.metrics import auroc, bootstrap_interval
    rng = np.random.default_rng(0)
    true = 0.8556                                   # P(N(1.5, 1) > N(0, 1)) = Phi(1.5 / sqrt(2))
    widths = []
    for n in (200, 800):
        y = np.r_[np.zeros(n), np.ones(n)]
        s = np.r_[rng.normal(0, 1, n), rng.normal(1.5, 1, n)]
        lo, hi = bootstrap_interval(y, s, auroc, n=300)
        assert lo < true < hi and lo <= auroc(y, s) <= hi
        widths.append(hi - lo)
    assert 0.35 < widths[1] / widths[0] < 0.7            # ~1/sqrt(4)
    assert bootstrap_interval(np.zeros(5), np.arange(5.0), auroc) is None


def test_paired_difference_separates_models_that_unpaired_intervals_cannot():
    from detector.metrics import auroc, bootstrap_interval, paired_difference
    rng = np.random.default_rng(1)
    n = 150
    y = np.r_[np.zeros(n), np.ones(n)]
    a = np.r_[rng.normal(0, 1, n), rng.normal(1.5, 1, n)]       # true AUROC 0.856
    b = a + 0.3 * y                                              # same scans, anomalies 0.3 higher: 0.887
    _, ha = bootstrap_interval(y, a, auroc, n=300)
    lb, _ = bootstrap_interval(y, b, auroc, n=300)
    assert lb < ha                                               # unpaired intervals overlap
    d = paired_difference(y, a, b, auroc, n=300)
    assert 0 < d["low"] <= d["difference"] <= d["high"] and d["p_better"] == 1.0
    assert d["difference"] == pytest.approx(auroc(y, b) - auroc(y, a))
    same = paired_difference(y, a, a, auroc, n=50)
    assert same["difference"] == same["low"] == same["high"] == 0.0 and same["p_better"] == 0.0
    with pytest.raises(ValueError, match="one value per scan"):
        paired_difference(y, a, b[:-1], auroc)
    assert paired_difference(np.zeros(4), np.arange(4.0), np.arange(4.0), auroc) is None
    # a progress bar's update once per resample (eval --baseline on 20,000 scans ran ~45 s without a word)
    ticks = []
    paired_difference(y, a, b, auroc, n=37, tick=lambda: ticks.append(1))
    assert len(ticks) == 37


def test_paired_difference_over_seeds_is_the_mean_of_the_pairs():
    from detector.metrics import auroc, paired_difference
    rng = np.random.default_rng(2)
    n = 120
    y = np.r_[np.zeros(n), np.ones(n)]
    a0, a1 = (np.r_[rng.normal(0, 1, n), rng.normal(1.2, 1, n)] for _ in range(2))
    b0, b1 = a0 + 0.4 * y, a1 - 0.1 * y                       # one seed clearly better, the other worse
    pooled = paired_difference(y, [a0, a1], [b0, b1], auroc, n=200)
    d0, d1 = auroc(y, b0) - auroc(y, a0), auroc(y, b1) - auroc(y, a1)
    assert d0 > 0 > d1
    assert pooled["difference"] == pytest.approx((d0 + d1) / 2)
    assert pooled["low"] <= pooled["difference"] <= pooled["high"]
    # every resample moves both pairs alike: the pooled interval is not the first pair's
    first = paired_difference(y, a0, b0, auroc, n=200)
    assert pooled["high"] < first["high"]
    with pytest.raises(ValueError, match="seed rows 2, 1"):
        paired_difference(y, [a0, a1], [b0], auroc)


def test_far_at_detection_reached_by_failures_alone_flags_no_scored_normal():
    # 9 of 10 anomalies failed (INSPECT whatever the threshold): 90 % detection needs no threshold at all
    y, s, f = [0, 0, 0] + [1] * 10, [0.1, 0.2, 0.9] + [0.0] * 9 + [0.3], [False] * 3 + [True] * 9 + [False]
    row = M.far_at_detection(y, s, 0.9, f)
    assert row["false_alarm_rate"] == 0.0 and row["threshold"] > 0.9 and row["achieved_detection"] == 0.9


def test_a_target_missed_by_saturated_normal_scores_is_said():
    # 3 of 200 normals score 1.0: the capped threshold (1.0) inspects them, 1.5 % instead of 1 %
    y = [0] * 200 + [1] * 10
    s = list(np.linspace(0, 0.9, 197)) + [1.0] * 3 + [1.0] * 4 + [0.5] * 6
    out = M.summary(y, s)
    row = out["detection_at_far"][0]
    assert row["threshold"] == 1.0 and row["achieved_rate"] == 0.015 and row["detection_rate"] == 0.4
    assert "detection at 1.0% false alarms is measured at 1.50%: 3 normal scans score 1.0, which no threshold " \
           "releases" in out["notes"]
    assert not any("measured at" in n for n in M.summary(Y, S)["notes"])   # no note where the target is met


def test_a_target_that_failed_normal_scans_alone_exceed_is_said():
    # 3 of 200 normals failed (INSPECT whatever the threshold): 1.5 % of alarms before any score, so no 1 % point
    y, s = [0] * 200 + [1] * 10, [0.1] * 200 + [0.9] * 10
    f = [True] * 3 + [False] * 207
    out = M.summary(y, s, f)
    assert out["detection_at_far"][0]["detection_rate"] is None
    assert ("detection at 1.0% false alarms: n/a: 3 of the 200 normal scans failed to score (INSPECT, fail-closed), "
            "more than the 1.0% allows") in out["notes"]
    assert not any("fail-closed" in n for n in M.summary(y, s)["notes"])


def test_average_precision_without_normal_scans_is_undefined_not_perfect():
    # no normal scan: every precision is 1, so AP read 1.0 whatever the scores (a model ranking them backwards too)
    assert M.average_precision([1, 1, 1], [0.9, 0.1, 0.0]) is None
    out = M.summary([1, 1], [0.1, 0.9])
    assert out["ap"] is None and any("AUROC and AP undefined" in n for n in out["notes"])


def test_auroc_is_undefined_where_a_class_has_no_scored_scan():
    # every scan failed: the fail-closed ranking ties them all and read "AUROC 0.5000 (95% 0.500-0.500)" for a model
    # that scored nothing; every anomaly failed: 1.0 for a model that scored none of them
    y, s = [0] * 5 + [1] * 5, [0.0] * 10
    out = M.summary(y, s, [True] * 10)
    assert out["auroc"] is None and out["ap"] is None and M.roc_points(y, s, [True] * 10) is None
    assert any("no scan scored" in n for n in out["notes"]), out["notes"]
    assert M.intervals(y, s, [True] * 10)["auroc"] is None
    f = [False] * 5 + [True] * 5
    out = M.summary(y, [0.1, 0.2, 0.3, 0.4, 0.5] + [0.0] * 5, f)
    assert out["auroc"] is None and out["ap"] is None
    assert any("no anomalous scan scored (all 5 failed)" in n for n in out["notes"]), out["notes"]
    assert out["detection_at_far"][0]["detection_rate"] == 1.0   # the routing still inspects them (fail-closed)
    # one scored scan per class is enough: the failures rank above it, as before
    assert M.auroc([0, 0, 1, 1], [0.1, 0.0, 0.9, 0.0], [False, True, False, True]) == pytest.approx(0.625)


def test_detection_interval_at_0_and_100_percent_is_not_a_point():
    # 20 of 20 anomalies found: every resampled test set finds 20 of 20 too, so the percentile bootstrap read
    # "100.0 - 100.0 %" as if 20 anomalies pinned detection down; the Wilson interval of 20 of 20 is 83.9-100 %
    y = [0] * 100 + [1] * 20
    found = M.intervals(y, [0.1] * 100 + [0.9] * 20)
    lo, hi = found["detection_at_1pct"]
    assert hi == 1.0 and lo == pytest.approx(calibration.rate_interval(20, 20)[0], abs=1e-4) and lo < 0.85
    lo, hi = M.intervals(y, [0.9] * 100 + [0.1] * 20)["detection_at_1pct"]
    assert lo == 0.0 and hi == pytest.approx(calibration.rate_interval(0, 20)[1], abs=1e-4) and hi > 0.15
    lo, hi = found["auroc"]
    assert lo <= M.auroc(y, [0.1] * 100 + [0.9] * 20) <= hi   # 1.0, not under an upper end of 0.9999999999999999


def test_auroc_interval_of_a_few_anomalies_is_not_a_point():
    """eval of a first site's test set, 6 clean trucks and its one seizure scored below them: 'AUROC 0.0000 (95%
    0.000-0.000)', as if one anomaly pinned it down (every resample holds the same one anomaly). AUROC's interval
    now holds at least the Wilson interval of its figure over the smaller class (its variance is at most
    A(1-A)/min(n0, n1), van Dantzig) where the bootstrap reads one value: 0-79 % for one anomaly, and 20 anomalies
    all above 100 clean ones 84-100 %."""
    lo, hi = M.intervals([0] * 6 + [1], [0.5] * 6 + [0.1])["auroc"]
    assert lo == 0.0 and hi == pytest.approx(calibration.rate_interval(0, 1)[1], abs=1e-4) and hi > 0.7
    lo, hi = M.intervals([0] * 100 + [1] * 20, [0.1] * 100 + [0.9] * 20)["auroc"]
    assert hi == 1.0 and lo == pytest.approx(calibration.rate_interval(20, 20)[0], abs=1e-4)
    rng = np.random.default_rng(0)   # elsewhere the bootstrap's own spread: that bound is looser, and unused
    y, s = [0] * 300 + [1] * 50, np.r_[rng.normal(0, 1, 300), rng.normal(2, 1, 50)]
    assert M.intervals(y, s)["auroc"] == pytest.approx(M.bootstrap_interval(y, s, M.auroc))

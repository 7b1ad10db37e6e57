"""Thresholds hit their false-alarm targets on known score distributions."""
import numpy as np
import pytest

from detector.calibration import (false_alarm_rate, rate_interval, threshold_for_rate, threshold_table,
                                  unresolved_warning)


@pytest.mark.parametrize("rate", [0.01, 0.005, 0.001, 0.2])
def test_threshold_hits_rate_on_known_distribution(rate):
    scores = np.random.default_rng(0).beta(2, 8, size=20000)
    t = threshold_for_rate(scores, rate)
    far = false_alarm_rate(scores, t)
    assert far <= rate
    assert far >= rate - 1.5 / scores.size  # the smallest threshold: not needlessly strict


def test_ties_never_exceed_the_rate():
    scores = np.array([0.1] * 50 + [0.9] * 50)
    t = threshold_for_rate(scores, 0.1)
    assert false_alarm_rate(scores, t) == 0.0 and t > 0.9


def test_a_rate_of_one_inspects_every_scan_not_only_those_above_the_lowest_normal_score():
    # it returned the lowest normal score: Inspector.threshold_for_rate(1.0) released the trucks scoring under it
    assert threshold_for_rate([0.2, 0.3, 0.4], 1.0) == 0.0


def test_unresolvable_rate_flags_only_above_max_and_is_reported():
    rows = threshold_table([0.2, 0.3, 0.4], rates=(0.01,))
    assert rows[0]["threshold"] > 0.4 and rows[0]["achieved_rate"] == 0.0
    assert rows[0]["resolvable"] is False
    # saturated scores: the threshold is capped at 1.0 so a score of 1.0 is still inspected
    assert threshold_for_rate([0.5, 1.0], 0.0) == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError):
        threshold_for_rate([], 0.01)
    with pytest.raises(ValueError):
        threshold_for_rate([0.1, float("nan")], 0.01)
    with pytest.raises(ValueError):
        threshold_for_rate([0.1], 1.5)


def test_rate_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n, p in ((300, 0.01), (3000, 0.01), (1000, 0.001)):
        flagged = rng.binomial(n, p, size=2000)
        covered = np.mean([lo <= p <= hi for lo, hi in (rate_interval(int(k), n) for k in flagged)])
        assert 0.92 <= covered <= 0.99, (n, p, covered)
    lo, hi = rate_interval(0, 300)          # none seen in 300 still allows ~1.3 %
    assert lo == 0.0 and 0.011 < hi < 0.014
    with pytest.raises(ValueError):
        rate_interval(5, 3)


def test_unresolved_warning_names_the_rates_and_the_scans_they_need():
    assert unresolved_warning(threshold_table(np.linspace(0, 1, 1000))) is None
    text = unresolved_warning(threshold_table(np.linspace(0, 1, 50)))
    assert text.startswith("50 normal validation scans cannot resolve the 1.0%, 0.5%, 0.1% false-alarm rate(s)")
    assert "1,000 or more" in text and "detector calibrate" in text
    text = unresolved_warning(threshold_table(np.linspace(0, 1, 300)))
    assert "the 0.1% false-alarm" in text and "1.0%" not in text

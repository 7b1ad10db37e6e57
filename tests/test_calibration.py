"""Thresholds hit their false-alarm targets on known score distributions."""
import numpy as np
import pytest

from detector.calibration import false_alarm_rate, threshold_for_rate, threshold_table


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

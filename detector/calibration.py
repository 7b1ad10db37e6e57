"""Thresholds for a target false-alarm (inspection) rate, from scores of normal scans.

The decision rule everywhere is: INSPECT when score >= threshold. A threshold for rate r is the
smallest one whose share of normal scores at or above it is <= r.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

DEFAULT_RATES = (0.01, 0.005, 0.001)


def _scores(normal_scores: Iterable[float]) -> np.ndarray:
    s = np.sort(np.asarray(list(normal_scores), dtype=np.float64))
    if s.size == 0:
        raise ValueError("no normal scores to calibrate on")
    if not np.isfinite(s).all():
        raise ValueError("normal scores contain NaN or infinity")
    return s


def score_digits(score: float, threshold: float, least: int = 2) -> int:
    """Decimals (at least `least`, at most 9) that print a score and a threshold apart when they differ: a
    decision must never read "0.62 < 0.62"."""
    d = least
    while d < 9 and f"{score:.{d}f}" == f"{threshold:.{d}f}" and score != threshold:
        d += 1
    return d


def threshold_texts(*values: float) -> list[str]:
    """Thresholds printed side by side with 4 decimals, or as many more (up to the results CSV's 9) as keep two
    that differ apart and one below 1 from reading 1.0000: a confident model's scores crowd just under 1, where
    an old and a new threshold, or a threshold and the top score, looked the same."""
    for places in range(4, 10):
        texts = [f"{v:.{places}f}" for v in values]
        apart = len(set(texts)) == len(set(values))
        if apart and all(v >= 1 or float(s) < 1 for v, s in zip(values, texts)):
            break
    return texts


def false_alarm_rate(normal_scores: Iterable[float], threshold: float) -> float:
    """Share of normal scans that would be inspected at this threshold."""
    s = _scores(normal_scores)
    return float(np.mean(s >= threshold))


def threshold_for_rate(normal_scores: Iterable[float], rate: float) -> float:
    """Smallest threshold whose false-alarm rate on the normal scores is <= rate."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"false-alarm rate must be in [0, 1], got {rate}")
    s = _scores(normal_scores)
    n = s.size
    allowed = int(np.floor(rate * n + 1e-9))  # normal scans allowed at or above the threshold
    if allowed >= n:   # every scan inspected: the lowest normal score released the trucks scoring under it
        return 0.0
    # everything strictly above s[n-1-allowed] may be flagged: threshold just above that value,
    # capped at 1 so a saturated score (1.0) can always still be inspected
    t = float(np.nextafter(s[n - 1 - allowed], np.inf))
    return min(t, 1.0) if s[-1] <= 1.0 else t


def threshold_table(normal_scores: Iterable[float], rates: Iterable[float] = DEFAULT_RATES) -> list[dict]:
    """One row per target rate: threshold, rate achieved on these scores, and whether the
    validation set is large enough to resolve the rate (n * rate >= 1)."""
    s = _scores(normal_scores)
    rows = []
    for r in rates:
        t = threshold_for_rate(s, r)
        rows.append({"false_alarm_rate": float(r), "threshold": t,
                     "achieved_rate": float(np.mean(s >= t)), "n_normal": int(s.size),
                     "resolvable": bool(s.size * r >= 1)})
    return rows


def rate_interval(flagged: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (Wilson) interval of a false-alarm rate seen as `flagged` of `n` normal scans: how closely n scans
    pin a rate down (0 of 300 still allows ~1.3 %)."""
    if n <= 0 or not 0 <= flagged <= n:
        raise ValueError(f"need 0 <= flagged <= n and n > 0, got {flagged} of {n}")
    p, z2 = flagged / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def unresolved_warning(rows: Iterable[dict]) -> str | None:
    """One line when a threshold table's normal scans are too few to resolve some of its rates (n * rate < 1: the
    threshold then sits just above the highest normal score, whatever the rate), else None."""
    short = [r for r in rows if not r.get("resolvable", True)]
    if not short:
        return None
    need = max(math.ceil(1 / r["false_alarm_rate"]) for r in short)
    rates = ", ".join(f"{r['false_alarm_rate']:.1%}" for r in short)
    return (f"{short[0].get('n_normal', '?')} normal validation scans cannot resolve the {rates} false-alarm rate(s) (that takes "
            f"{need:,} or more): those thresholds sit just above the highest normal score; set them on the site's "
            "cleared traffic with `detector calibrate`")

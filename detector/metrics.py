"""Evaluation metrics: AUROC, AP, detection at a fixed false-alarm rate, localisation.

Conventions shared with detector.calibration: label 1 = anomalous; a scan is INSPECTed when
score >= threshold; the threshold for a false-alarm rate r is calibration.threshold_for_rate on the
normal scores. Scans whose scoring failed are fail-closed: always INSPECT, whatever the threshold
(`failed` masks below), so they count as alarms on normals and as detections on anomalies.
AUROC and AP rank them above every score, and are undefined (None) where a class has no scored scan.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from detector.calibration import rate_interval, threshold_for_rate

FAR_TARGETS = (0.01, 0.005, 0.001)
DETECTION_TARGETS = (0.90, 0.95)
IOU_HIT = 0.1  # the localisation hit criterion reported as primary (IoU > 0 is reported too)

Box = Sequence[float]


def _arrays(labels, scores, failed=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    f = np.zeros(y.shape, bool) if failed is None else np.asarray(failed, dtype=bool).ravel()
    if not (y.shape == s.shape == f.shape):
        raise ValueError(f"labels, scores and failed differ in length: {y.size}, {s.size}, {f.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(s[~f]).all():
        raise ValueError("scores of scored rows contain NaN or infinity")
    return y, s, f


def _ranked(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Scores with failed rows placed above every real score (fail-closed), for ranking metrics."""
    out = s.copy()
    top = float(np.max(s[~f])) if (~f).any() else 0.0
    out[f] = max(top, 1.0) + 1.0
    return out


def _ranks_scores(y: np.ndarray, f: np.ndarray) -> bool:
    """Whether a ranking metric measures scores here: both classes present, each with a scored scan. Failures rank
    above every score, so where a class has none scored the figure is the failures' alone (every scan failed read
    AUROC 0.5, every anomaly failed 1.0) and says nothing of the model."""
    return all((y == c).any() and ((y == c) & ~f).any() for c in (0, 1))


def undefined_reason(labels, failed=None) -> str | None:
    """Why AUROC and AP are undefined (null) for these labels and failures, None when they are defined."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    f = np.zeros(y.shape, bool) if failed is None else np.asarray(failed, dtype=bool).ravel()
    if _ranks_scores(y, f):
        return None
    if not ((y == 0).any() and (y == 1).any()):
        return f"only {'normal' if (y == 0).any() else 'anomalous'} scans in the truth"
    if f.all():
        return f"no scan scored (all {f.size} failed)"
    c = 0 if not ((y == 0) & ~f).any() else 1
    return f"no {('normal', 'anomalous')[c]} scan scored (all {int((y == c).sum())} failed)"


def auroc(labels, scores, failed=None) -> float | None:
    """Area under the ROC curve (scikit-learn); None with one class, or a class none of whose scans scored."""
    from sklearn.metrics import roc_auc_score
    y, s, f = _arrays(labels, scores, failed)
    if not _ranks_scores(y, f):
        return None
    return float(roc_auc_score(y, _ranked(s, f)))


def average_precision(labels, scores, failed=None) -> float | None:
    """Average precision (scikit-learn); None without both classes (with no normal scan every precision is 1, and AP
    read 1.0 whatever the scores), or where a class has no scored scan (as auroc)."""
    from sklearn.metrics import average_precision_score
    y, s, f = _arrays(labels, scores, failed)
    if not _ranks_scores(y, f):
        return None
    return float(average_precision_score(y, _ranked(s, f)))


def roc_points(labels, scores, failed=None) -> tuple[np.ndarray, np.ndarray] | None:
    """(false-alarm rates, detection rates) of the ROC curve; None where auroc is."""
    from sklearn.metrics import roc_curve
    y, s, f = _arrays(labels, scores, failed)
    if not _ranks_scores(y, f):
        return None
    far, det, _ = roc_curve(y, _ranked(s, f))
    return far, det


def threshold_at_far(labels, scores, rate: float, failed=None) -> float | None:
    """calibration.threshold_for_rate on the normals, counting failed normals as alarms at any
    threshold; None when there are no normals or the failures alone exceed the rate."""
    y, s, f = _arrays(labels, scores, failed)
    normal = y == 0
    n, n_fail = int(normal.sum()), int((normal & f).sum())
    if n == 0:
        return None
    allowed = int(math.floor(rate * n + 1e-9)) - n_fail  # alarms left for the scored normals
    ok = s[normal & ~f]
    if allowed < 0:
        return None
    if ok.size == 0:
        return 0.0
    return threshold_for_rate(ok, rate if n_fail == 0 else min(1.0, allowed / ok.size))


def rates_at(labels, scores, threshold: float, failed=None) -> tuple[float | None, float | None]:
    """(detection rate, false-alarm rate) when INSPECT is score >= threshold or failed."""
    y, s, f = _arrays(labels, scores, failed)
    flagged = f | (s >= threshold)
    det = float(flagged[y == 1].mean()) if (y == 1).any() else None
    far = float(flagged[y == 0].mean()) if (y == 0).any() else None
    return det, far


def detection_at_far(labels, scores, rate: float, failed=None) -> dict:
    """Detection rate at the threshold chosen for false-alarm rate `rate` on these normals."""
    t = threshold_at_far(labels, scores, rate, failed)
    y = np.asarray(labels).ravel()
    row = {"false_alarm_rate": rate, "threshold": t, "detection_rate": None, "achieved_rate": None,
           "resolvable": bool((y == 0).sum() * rate >= 1)}
    if t is not None:
        row["detection_rate"], row["achieved_rate"] = rates_at(labels, scores, t, failed)
    return row


def _class_resamples(y: np.ndarray, n: int, seed: int):
    """n index arrays of test sets resampled with replacement within each class (counts kept)."""
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([rng.choice(g, len(g)) for g in groups])


def bootstrap_interval(labels, scores, metric, n: int = 1000, level: float = 0.95,
                       seed: int = 0, failed=None) -> tuple[float, float] | None:
    """Percentile interval of `metric(labels, scores)` (`metric(labels, scores, failed)` when `failed` is given)
    over test sets resampled within each class (so each keeps the normal/anomalous counts): how far the figure
    would move on another test set of the same size. None without both classes."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not ((y == 0).any() and (y == 1).any()):
        return None
    vals = []
    for pick in _class_resamples(y, n, seed):
        v = metric(y[pick], s[pick]) if failed is None else metric(y[pick], s[pick], np.asarray(failed)[pick])
        if v is not None:
            vals.append(v)
    if not vals:
        return None
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def detection_at_1pct(labels, scores, failed=None) -> float | None:
    """Detection rate at 1 % false alarms: the headline figure beside AUROC."""
    return detection_at_far(labels, scores, 0.01, failed)["detection_rate"]


def detection_at_01pct(labels, scores, failed=None) -> float | None:
    """Detection rate at 0.1 % false alarms, the station's strictest calibrated threshold."""
    return detection_at_far(labels, scores, 0.001, failed)["detection_rate"]


def intervals(labels, scores, failed=None, level: float = 0.95) -> dict:
    """Bootstrap intervals of the two headline figures, AUROC and detection at 1 % false alarms, with failed rows
    counted as INSPECT as in the figures themselves; an interval is None where its figure is (e.g. a failed normal
    scan uses up the 1 % of alarms that 25 normal scans allow). Each holds its figure, and detection's at least the
    Wilson interval of its count: at 0 or 100 % every resampled test set reads the same, and 20 of 20 anomalies
    found read "100 - 100 %" where 20 scans allow 84 %. AUROC's, where every resample reads the same (0 or 1, or one
    anomaly: "0.000-0.000"), is the Wilson interval of its figure over the smaller class, whose size bounds its
    variance (A(1-A)/min(n0, n1), van Dantzig); elsewhere that bound is looser than the bootstrap, so unused."""
    y, s, f = _arrays(labels, scores, failed)
    out: dict = {"level": level}
    for name, metric in (("auroc", auroc), ("detection_at_1pct", detection_at_1pct)):
        point = metric(y, s, f)
        iv = None if point is None else bootstrap_interval(y, s, metric, level=level, failed=f)
        if iv is not None and name == "detection_at_1pct":
            n = int((y == 1).sum())
            iv = _hull(iv, rate_interval(round(point * n), n, _z(level)))
        elif iv is not None and iv[0] == iv[1]:
            n = int(min((y == 0).sum(), (y == 1).sum()))
            iv = _hull(iv, rate_interval(round(point * n), n, _z(level)))
        out[name] = None if iv is None else _hull(iv, (point, point))
    return out


def _hull(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """The smallest interval holding both."""
    return min(a[0], b[0]), max(a[1], b[1])


def _z(level: float) -> float:
    """The normal quantile of a two-sided interval at `level` (1.96 at 95 %)."""
    from statistics import NormalDist
    return NormalDist().inv_cdf((1 + level) / 2)


def paired_difference(labels, scores_a, scores_b, metric, n: int = 1000, level: float = 0.95,
                      seed: int = 0, tick=None) -> dict | None:
    """metric(B) - metric(A) of two models scored on the same scans, over the same resampled test sets:
    pairing cancels the test set's own luck, so it separates configs that unpaired intervals cannot.
    2-D scores (one row per training seed, row i of A paired with row i of B) give the mean difference over
    the seeds, every pair resampled alike: one seed's luck weighs less. Returns {difference, low, high,
    p_better and p_worse (shares of resamples where B's figure is above A's, below it)}; None without both classes
    (or where no resample gives both a figure). `tick`: called once per resample (a progress bar's update)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    a = np.atleast_2d(np.asarray(scores_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != len(y):
        raise ValueError(f"labels and both score lists must have one value per scan: {len(y)}, "
                         f"{a.shape[-1]}, {b.shape[-1]} (seed rows {a.shape[0]}, {b.shape[0]})")
    if not ((y == 0).any() and (y == 1).any()):
        return None

    def mean_difference(pick: np.ndarray) -> float | None:
        diffs = []
        for ra, rb in zip(a, b):
            ma, mb = metric(y[pick], ra[pick]), metric(y[pick], rb[pick])
            if ma is None or mb is None:
                return None
            diffs.append(mb - ma)
        return float(np.mean(diffs))

    d = []
    for pick in _class_resamples(y, n, seed):
        v = mean_difference(pick)
        d += [] if v is None else [v]
        if tick is not None:
            tick()
    d = np.array(d)
    if not d.size:
        return None
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": mean_difference(np.arange(len(y))), "low": float(lo), "high": float(hi),
            "p_better": float(np.mean(d > 0)), "p_worse": float(np.mean(d < 0))}


def missed_at_far(labels, scores, rate: float = 0.01) -> np.ndarray | None:
    """The anomalies released (score under the threshold for false-alarm rate `rate` on these normals), as a mask
    over the scans; None without normal scans. Two models' masks side by side show whether they miss the same
    anomalies (hard for this kind of model) or different ones (luck more than design)."""
    y, s, _ = _arrays(labels, scores)
    t = threshold_at_far(y, s, rate)
    return None if t is None else (y == 1) & (s < t)


def _flag_rate(cls: int):
    """The share of class `cls` flagged, as a metric(labels, flags) of 0/1 INSPECT flags (1: detection, 0: false
    alarms)."""
    def rate(labels, flags) -> float | None:
        sel = np.asarray(labels).ravel() == cls
        return float(np.asarray(flags, dtype=np.float64).ravel()[sel].mean()) if sel.any() else None
    return rate


def _far_detection(rate: float):
    """Detection at false-alarm rate `rate` as a metric(labels, scores)."""
    return lambda labels, scores: detection_at_far(labels, scores, rate)["detection_rate"]


COMPARE_RESAMPLES = 1000   # paired resamples of a baseline comparison, drawn from COMPARE_SEED: the same every run
COMPARE_SEED = 0


def paired_figures(labels, old, new, flags_old=None, flags_new=None, n: int = COMPARE_RESAMPLES,
                   seed: int = COMPARE_SEED, level: float = 0.95, progress: bool = False) -> dict:
    """Two models scored on the same scans (none failed), figure by figure: each one's AUROC, AP, detection at
    FAR_TARGETS and, given each model's INSPECT flags at its own shipped threshold, detection and false alarms as
    shipped; and new - old with its interval over the same n resampled test sets (paired_difference: the test set's
    luck cancels). `better` says which way is ahead, `p_new_ahead` the share of resamples where new is. Figures are
    None where undefined (one class; no flags). `progress`: a progress bar on a terminal (20,000 scans take ~45 s
    here, most of it scikit-learn's AUROC and AP of 2 x n resamples)."""
    figures = [("auroc", auroc, old, new, "higher"), ("ap", average_precision, old, new, "higher")]
    figures += [(f"detection_at_{r * 100:g}pct", _far_detection(r), old, new, "higher") for r in FAR_TARGETS]
    if flags_old is not None and flags_new is not None:
        figures += [("shipped_detection", _flag_rate(1), flags_old, flags_new, "higher"),
                    ("shipped_false_alarm", _flag_rate(0), flags_old, flags_new, "lower")]
    from tqdm import tqdm
    out = {}
    bar = tqdm(total=n * len(figures), desc="paired resamples", unit="resample", leave=False,
               disable=None if progress else True)   # None: only on a terminal
    for name, metric, a, b, better in figures:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        d = paired_difference(labels, a, b, metric, n=n, level=level, seed=seed, tick=bar.update) or {}
        out[name] = {"baseline": metric(labels, a), "new": metric(labels, b), "difference": d.get("difference"),
                     "low": d.get("low"), "high": d.get("high"), "better": better,
                     "p_new_ahead": d.get("p_better" if better == "higher" else "p_worse")}
    bar.close()
    return out


def far_at_detection(labels, scores, target: float, failed=None) -> dict:
    """False-alarm rate at the highest threshold that still detects >= target of the anomalies."""
    y, s, f = _arrays(labels, scores, failed)
    row = {"detection_rate": target, "threshold": None, "false_alarm_rate": None, "achieved_detection": None}
    anom = y == 1
    if not anom.any() or not (~anom).any():
        return row
    need = int(math.ceil(target * anom.sum() - 1e-9)) - int((anom & f).sum())  # beyond failures
    ok = np.sort(s[anom & ~f])[::-1]
    # failures alone reach the target: above every scored scan, normal ones too (only failures alarm)
    top = float(np.nextafter(s[~f].max(), np.inf)) if (~f).any() else 1.0
    t = float(ok[need - 1]) if need > 0 else top
    det, far = rates_at(y, s, t, f)
    row.update(threshold=t, false_alarm_rate=far, achieved_detection=det)
    return row


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (x1, y1 exclusive)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of all of a mask's nonzero pixels, None if there are none. cv2.boundingRect:
    ~20x faster than np.nonzero's min and max over a scan-sized mask."""
    import cv2
    m = np.asarray(mask)
    m = m.view(np.uint8) if m.dtype == bool else m if m.dtype == np.uint8 else (m != 0).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(m)
    return (x, y, x + w, y + h) if w else None


def mask_boxes(mask: np.ndarray) -> list[list[int]]:
    """Bounding boxes [x0, y0, x1, y1] of the connected components of a truth mask."""
    import cv2
    n, _, stats, _ = cv2.connectedComponentsWithStats((np.asarray(mask) > 0).astype(np.uint8), connectivity=8)
    return [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h, _ in stats[1:n]]


def best_iou(regions: Iterable[dict], truth_boxes: Sequence[Box]) -> float | None:
    """IoU of the highest-scoring predicted region with its best-matching true box
    (0 when there is no region); None when there is no true box."""
    truth_boxes = list(truth_boxes)
    if not truth_boxes:
        return None
    regions = list(regions)
    if not regions:
        return 0.0
    best = max(regions, key=lambda r: r["score"])
    return max(iou(best["box"], t) for t in truth_boxes)


def localisation(ious: Iterable[float | None], hit: float = IOU_HIT) -> dict:
    """Share of detected anomalies whose best region overlaps the truth: IoU >= hit (primary)
    and IoU > 0 (any overlap). Entries of None (no truth box) are left out."""
    v = np.asarray([x for x in ious if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "criterion": f"iou>={hit}", "hit_rate": None, "overlap_rate": None, "mean_iou": None}
    return {"n": int(v.size), "criterion": f"iou>={hit}", "hit_rate": float((v >= hit).mean()),
            "overlap_rate": float((v > 0).mean()), "mean_iou": float(v.mean())}


def summary(labels, scores, failed=None, decisions: Sequence[str] | None = None) -> dict:
    """The standard metric block: counts, AUROC, AP, detection at 1/0.5/0.1% false alarms,
    false alarms at 90/95% detection, and the rates of the recorded decisions when given."""
    y, s, f = _arrays(labels, scores, failed)
    n_norm, n_anom = int((y == 0).sum()), int((y == 1).sum())
    out: dict = {"n": int(y.size), "n_normal": n_norm, "n_anomalous": n_anom, "n_failed": int(f.sum()),
                 "auroc": auroc(y, s, f), "ap": average_precision(y, s, f), "notes": []}
    if out["auroc"] is None:
        out["notes"].append(f"{undefined_reason(y, f)}: AUROC and AP undefined (null)")
    out["detection_at_far"] = [detection_at_far(y, s, r, f) for r in FAR_TARGETS]
    out["far_at_detection"] = [far_at_detection(y, s, d, f) for d in DETECTION_TARGETS]
    n_fail_norm = int(((y == 0) & f).sum())
    for row in out["detection_at_far"]:
        if n_norm and row["threshold"] is None:
            out["notes"].append(f"detection at {row['false_alarm_rate']:.1%} false alarms: n/a: {n_fail_norm} of the "
                                f"{n_norm} normal scans failed to score (INSPECT, fail-closed), more than the "
                                f"{row['false_alarm_rate']:.1%} allows")
        if n_norm and not row["resolvable"]:
            out["notes"].append(f"{n_norm} normal scans cannot resolve a {row['false_alarm_rate']:.1%} "
                                "false-alarm rate (fewer than one alarm allowed)")
        if row["achieved_rate"] is not None and row["achieved_rate"] > row["false_alarm_rate"]:
            top = int(((y == 0) & ~f & (s >= 1.0)).sum())   # the calibration caps thresholds at 1.0
            out["notes"].append(f"detection at {row['false_alarm_rate']:.1%} false alarms is measured at "
                                f"{row['achieved_rate']:.2%}: {top} normal scans score 1.0, which no threshold "
                                "releases")
    if decisions is not None:
        flagged = np.asarray([d != "RELEASE" for d in decisions]) | f  # fail-closed
        out["decisions"] = {
            "inspected": int(flagged.sum()),
            "detection_rate": float(flagged[y == 1].mean()) if n_anom else None,
            "false_alarm_rate": float(flagged[y == 0].mean()) if n_norm else None,
            "tp": int((flagged & (y == 1)).sum()), "fn": int((~flagged & (y == 1)).sum()),
            "fp": int((flagged & (y == 0)).sum()), "tn": int((~flagged & (y == 0)).sum())}
    return out

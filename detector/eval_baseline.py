"""`detector eval NEW.csv --baseline OLD.csv`: is the new model better than the one deployed, beyond the test set's luck?

Both results files are matched to the truth as eval matches one (evaluate.match), then to each other by the truth
scan. The paired figures (metrics.paired_figures: both models resampled on the same test sets) are over the scans
both scored: a scan scored in one file only, or failed in either, is counted, listed in metrics.json and left out,
never dropped without a word. A model's verdict "as shipped" is its own decision column (score >= its threshold;
an INSPECT a risk flag forced under the threshold counts as the model's RELEASE).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from detector import metrics as M
from detector.manifest import shown

FILE = "roc_compare.png"


def load(baseline: str | Path, truth: list, truth_file: Path) -> tuple[list, list]:
    """(pairs, orphans) of the baseline results matched to the truth; errors name the baseline file."""
    from detector.evaluate import load_results, match
    try:
        pairs, orphans, _ = match(load_results(baseline), truth, Path(baseline).resolve().parent)
    except ValueError as e:
        raise ValueError(f"--baseline {e}" if str(e).startswith(str(baseline)) else f"--baseline {baseline}: {e}") \
            from None
    if not pairs:
        raise ValueError(f"no result in --baseline {baseline} matches a scan of {truth_file}")
    return pairs, orphans


def _shipped(r) -> bool:
    """The model's own verdict on a scored row: INSPECT at its threshold (a risk flag's forced INSPECT is not)."""
    return r.decision != "RELEASE" and not r.forced


def _thresholds(rows: list) -> list[float]:
    """The distinct thresholds a results file was routed at (one, or a policy's tiers)."""
    return sorted({r.threshold for r in rows if r.threshold is not None})


def compare(pairs: list, base_pairs: list, base_orphans: list, truth: list, results: str | Path,
            baseline: str | Path) -> dict:
    """The `comparison` block of metrics.json: what was paired and left out, both models' figures with new - baseline
    and its paired interval, and the anomalies each misses at 1 % false alarms that the other finds."""
    from detector.evaluate import scored_by
    new, old = ({id(t): r for r, t in p} for p in (pairs, base_pairs))
    both = [t for t in truth if id(t) in new and id(t) in old]
    paired = [t for t in both if not (new[id(t)].failed or old[id(t)].failed)]
    names = lambda ts: [shown(t.rel) for t in ts]  # noqa: E731
    left_out = {"only_new": names(t for t in truth if id(t) in new and id(t) not in old),
                "only_baseline": names(t for t in truth if id(t) in old and id(t) not in new),
                "failed_new": names(t for t in both if new[id(t)].failed),
                "failed_baseline": names(t for t in both if old[id(t)].failed)}
    y = np.array([t.label for t in paired], dtype=np.int64)
    s_new, s_old = (np.array([rows[id(t)].score for t in paired], dtype=np.float64) for rows in (new, old))
    f_new, f_old = (np.array([_shipped(rows[id(t)]) for t in paired], dtype=np.float64) for rows in (new, old))
    out = {"baseline": {"results": shown(Path(baseline).resolve()), "model": scored_by(baseline),
                        "thresholds": _thresholds([old[id(t)] for t in paired])},
           "new": {"results": shown(Path(results).resolve()), "model": scored_by(results),
                   "thresholds": _thresholds([new[id(t)] for t in paired])},
           "n": len(paired), "n_normal": int((y == 0).sum()), "n_anomalous": int((y == 1).sum()),
           "resamples": M.COMPARE_RESAMPLES, "seed": M.COMPARE_SEED, "level": 0.95,
           "left_out": {k: len(v) for k, v in left_out.items()} | {"baseline_without_truth": len(base_orphans)},
           "left_out_scans": left_out,
           "figures": M.paired_figures(y, s_old, s_new, f_old, f_new, progress=True) if paired else {},
           "misses_at_1pct": _misses(y, s_old, s_new, paired)}
    out["notes"] = _notes(out)
    return out


def _misses(y: np.ndarray, s_old: np.ndarray, s_new: np.ndarray, paired: list) -> dict | None:
    """The anomalies each model releases at its own 1 % false-alarm threshold (on the paired normals) that the other
    inspects, by path, and how many both miss; None without normal and anomalous scans."""
    if not ((y == 0).any() and (y == 1).any()):
        return None
    m_old, m_new = M.missed_at_far(y, s_old, 0.01), M.missed_at_far(y, s_new, 0.01)
    return {"new_only": [shown(t.rel) for t, a, b in zip(paired, m_old, m_new) if b and not a],
            "baseline_only": [shown(t.rel) for t, a, b in zip(paired, m_old, m_new) if a and not b],
            "both": int((m_old & m_new).sum()), "new": int(m_new.sum()), "baseline": int(m_old.sum())}


def _notes(c: dict) -> list[str]:
    """What the comparison left out, and why its figures may say nothing, in words."""
    lo, notes = c["left_out"], []
    if lo["only_new"] or lo["only_baseline"]:
        notes.append(f"comparison: {lo['only_new']} truth scans scored in the new results only and "
                     f"{lo['only_baseline']} in the baseline only are left out of it (listed in metrics.json)")
    if lo["failed_new"] or lo["failed_baseline"]:
        notes.append(f"comparison: {lo['failed_new']} scans failed in the new results and {lo['failed_baseline']} "
                     "in the baseline (fail-closed INSPECTs, not scores) are left out of the paired figures (listed "
                     "in metrics.json)")
    if lo["baseline_without_truth"]:
        notes.append(f"comparison: {lo['baseline_without_truth']} baseline rows have no truth and were left out")
    coarse = [f"{r:.1%}" for r in M.FAR_TARGETS if c["n_normal"] and c["n_normal"] * r < 1]
    if coarse:
        notes.append(f"comparison: {c['n_normal']} normal scans cannot resolve {', '.join(coarse)} false alarms "
                     "(fewer than one alarm allowed): detection there is measured with no normal scan inspected")
    if not (c["n_normal"] and c["n_anomalous"]):
        notes.append(f"comparison: the {c['n']} scans both scored need normal and anomalous ones: no paired figure")
    models = [(c[k]["model"] or {}).get("sha256") for k in ("new", "baseline")]
    if models[0] and models[0] == models[1]:
        notes.append("comparison: both results were scored by the same model (sha256 "
                     f"{models[0][:12]}): any difference is the scans' or the routing's, not the model's")
    return notes


def _signed(v: float | None, points: bool) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}" if points else f"{v:+.3f}"


def phrase(figure: dict | None, name: str, points: bool) -> str:
    """'AUROC +0.012 (95 % -0.004..+0.028)': a figure's new - baseline with its paired interval."""
    if not figure or figure["difference"] is None:
        return f"{name} n/a"
    unit = " points" if points else ""
    return (f"{name} {_signed(figure['difference'], points)}{unit} (95 % {_signed(figure['low'], points)}.."
            f"{_signed(figure['high'], points)})")


def headline(c: dict) -> str:
    """The summary line's words on the comparison: new - baseline in AUROC and detection at 1 %."""
    f = c["figures"]
    return (f"new - baseline on the {c['n']} scans both scored: {phrase(f.get('auroc'), 'AUROC', False)}, "
            f"{phrase(f.get('detection_at_1pct'), 'detection at 1 %', True)}")


def plot(c: dict, pairs: list, base_pairs: list, out_dir: Path) -> Path | None:
    """Both models' ROC curves over the scans both scored on one plot (the baseline dashed), each one's shipped
    operating point marked; None where either has no curve (one class among them)."""
    from detector import report
    new, old = ({id(t): r for r, t in p} for p in (pairs, base_pairs))
    paired = [t for r, t in pairs if id(t) in old and not (r.failed or old[id(t)].failed)]
    y = np.array([t.label for t in paired], dtype=np.int64)
    curves, marks = {}, []
    for key, rows in (("new", new), ("baseline", old)):
        s = np.array([rows[id(t)].score for t in paired], dtype=np.float64)
        pts = M.roc_points(y, s) if paired else None
        if pts is None:
            return None
        curves[f"{key} (AUROC {c['figures']['auroc'][key]:.3f})"] = pts
        shipped = c["figures"].get("shipped_detection", {})
        far = c["figures"].get("shipped_false_alarm", {})
        if shipped.get(key) is not None and far.get(key) is not None:
            marks.append((far[key], shipped[key], f"{key} as shipped"))
    return report.plot_roc(curves, out_dir / FILE, marks, title=f"ROC on the {c['n']} scans both scored",
                           dashed=[n for n in curves if n.startswith("baseline")])

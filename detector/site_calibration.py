"""Re-threshold a model bundle on a site's own cleared traffic: `detector calibrate` (torch-free).

A bundle's thresholds come from its training validation scans. A site's trucks, cargo and scanner differ, so the
same threshold inspects another share of its traffic than the rate it was chosen for. Score the site's cleared
trucks with `detector score`, or take a station's audit log (`detector serve` stores each truck's score, and the
outcome officers record for it), then calibrate on those scores: every rate (the bundle's table and a policy's tiers)
is then set on the site's traffic. The graph is copied byte for byte; the metadata records where the thresholds
came from and what they were before.
"""
from __future__ import annotations

import hashlib
import json
import math
import shlex
import sqlite3
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from detector.audit import parse_time
from detector.audit_report import SQLITE_MAGIC, _head, is_audit_log, served_verdicts, shadow_verdicts
from detector.bundle import (BundleError, read_metadata, rewrite_metadata, rule_words, score_rule, unrecorded_rule,
                             untagged_pitch_mm)
from detector.calibration import rate_interval, threshold_table, threshold_texts
from detector.evaluate import load_results, load_truth, match
from detector.score import routing_file

ENOUGH_PER_RATE = 30   # ~30 / rate cleared scans pin a rate down to about +-35 % of itself (Wilson interval)


class CalibrationError(ValueError):
    """Site scores that cannot calibrate this model; says which file and why."""


@dataclass
class SiteScores:
    """The cleared-traffic scores a calibration uses, and what was left out of them."""
    scores: list[float]
    rows: int
    failed: int = 0        # scans that could not be scored (they were routed INSPECT)
    anomalous: int = 0     # scans the truth labels anomalous (an audit log: whose inspection found something)
    not_in_truth: int = 0  # scans the truth does not list
    other_model: int = 0   # audit log: verdicts another model served
    unchecked: int = 0     # audit log: INSPECTed trucks with no recorded outcome, taken as cleared (kept)
    pitch_mm: float | None = None   # the pitch their files without one were read at (score --pitch-mm); None: unknown
    shadow: bool = False   # audit log: the model's scores as a candidate in shadow (serve --shadow), not served ones
    shadow_scores: int = 0   # audit log: of `scores`, those it gave in shadow (all of them where `shadow`)

    def left_out(self) -> dict[str, int]:
        """The rows not calibrated on, by why."""
        return {"failed": self.failed, "anomalous": self.anomalous, "not_in_truth": self.not_in_truth,
                "other_model": self.other_model}


def load_site_scores(results: str | Path, model_sha256: str, truth: str | Path | None = None,
                     rules: tuple[str, str | None] | None = None) -> SiteScores:
    """Scores of the cleared scans in a `detector score` results CSV, which must have been scored by this very
    model (its .routing.json says which) by the rule it is served with; with `truth`, only the scans it labels
    normal. `rules`: (the bundle's score_rule, its unrecorded_rule); None: not checked."""
    results = Path(results)
    routing = routing_file(results)
    if not results.is_file():   # a mistyped path: not "score the scans again", an hour's work for nothing
        raise CalibrationError(f"{results}: no such results file (`detector score SCANS --model MODEL --out "
                               f"{results}` writes one)" if not results.exists() else
                               f"{results}: not a file: give the results CSV of `detector score`")
    if not routing.is_file():
        raise CalibrationError(f"{results}: no {routing.name} beside it, so which model scored these rows is unknown: "
                               f"score the cleared scans with `detector score SCANS --model MODEL --out {results}`")
    try:
        recorded = json.loads(routing.read_text(encoding="utf-8"))
        scored_with, pitch = recorded.get("model_sha256"), recorded.get("default_pitch_mm")
        rule = recorded.get("score_rule", rules[1] if rules else None)
    except (ValueError, AttributeError, OSError) as e:
        raise CalibrationError(f"{routing}: unreadable ({e})") from None
    if scored_with != model_sha256:
        raise CalibrationError(f"{results}: scored by another model (sha256 {str(scored_with)[:12]}, this one is "
                               f"{model_sha256[:12]}): a model's thresholds need its own scores; score the cleared "
                               "scans again with this model")
    if rules and rule != rules[0]:
        raise CalibrationError(f"{results}: scored {rule_words(rule)}, and this bundle is scored by the rule "
                               f"{rules[0]!r} ({routing.name}): its thresholds need scores of that rule; score the "
                               f"cleared scans again with `detector score SCANS --model MODEL --out {results} "
                               "--no-resume`")
    rows = load_results(results)
    site = SiteScores([], len(rows), pitch_mm=pitch if isinstance(pitch, (int, float)) else None)
    if truth is not None:
        pairs, orphans, _ = match(rows, load_truth(truth)[0], results.parent)
        site.not_in_truth = len(orphans)
        site.anomalous = sum(t.label == 1 for _, t in pairs)
        rows = [r for r, t in pairs if t.label == 0]
    for r in rows:
        if r.failed:
            site.failed += 1
        elif not 0.0 <= r.score <= 1.0:
            raise CalibrationError(f"{results}: row {r.row}: score {r.score:g} is outside [0, 1] (not as "
                                   "`detector score` writes it)")
        else:
            site.scores.append(float(r.score))
    if not site.scores:
        raise CalibrationError(f"{results}: no cleared scan with a score to calibrate on ({site.rows} rows: "
                               f"{site.failed} failed, {site.anomalous} anomalous, {site.not_in_truth} not in the truth)")
    return site


def load_audit_scores(audit: str | Path, model_sha256s: set[str], since: str | None = None,
                      rules: tuple[str, str | None] | None = None) -> SiteScores:
    """Scores of the trucks a station served with this model (an audit database or its CSV export): the released ones
    and the inspected ones, less those whose inspection found something. `model_sha256s`: the bundles whose scores
    are this model's (itself, and the one it was calibrated from: the graph is the same). Their pitch_mm: the one pitch
    their files without one were read at (serve --pitch-mm; None where none recorded it); CalibrationError for two.
    `rules`: (the bundle's score_rule, its unrecorded_rule): CalibrationError for a score of another rule, or of
    none known; None: not checked. A model that served no verdict there but scored trucks as a candidate in shadow
    (serve --shadow) is calibrated on those scores (`shadow` True), by the outcomes of the trucks they judged; one
    promoted since, on the trucks it scored in shadow and those it served (`shadow_scores` of them the former); a truck
    both served and shadowed by these bundles (serve --model C --shadow C's site bundle) counts once, as served."""
    try:
        start = parse_time(since) if since else None
    except ValueError:
        raise CalibrationError(f"--since {since!r}: not an ISO date or time (e.g. 2026-11-01 or "
                               "2026-11-01T06:00)") from None
    try:
        rows, shadow = served_verdicts(audit, start), False
        scored = shadow_verdicts(audit, start)
        if not any(r["model_sha256"] in model_sha256s for r in rows):   # never served: a candidate in shadow?
            if any(r["model_sha256"] in model_sha256s for r in scored):
                rows, shadow = [{**r, "_shadow": True} for r in scored], True
        else:   # promoted from shadow: its scores as a candidate are its scores too (the same graph, the same scans)
            served = {r["request_id"] for r in rows if r["model_sha256"] in model_sha256s}
            mine = [{**r, "_shadow": True} for r in scored   # a truck it served and shadowed counts once: as served
                    if r["model_sha256"] in model_sha256s and r["request_id"] not in served]
            rows = sorted(rows + mine, key=lambda r: r["time"]) if mine else rows
    except sqlite3.DatabaseError as e:
        raise CalibrationError(f"{audit}: not a readable audit database ({e})") from None
    site, pitches, other_rule = SiteScores([], len(rows), shadow=shadow), {}, None
    for r in rows:
        if r["model_sha256"] not in model_sha256s:
            site.other_model += 1
        elif r["outcome"] == "found":
            site.anomalous += 1
        elif r["score"] is None:
            site.failed += 1
        elif not 0.0 <= r["score"] <= 1.0:
            raise CalibrationError(f"{audit}: verdict of {r['time']}: score {r['score']:g} is outside [0, 1]")
        else:
            site.scores.append(float(r["score"]))
            site.shadow_scores += bool(r.get("_shadow"))
            site.unchecked += r["decision"] == "INSPECT" and r["outcome"] is None
            _note_pitch(pitches, r)
            if rules and (r["score_rule"] or rules[1]) != rules[0]:
                other_rule = r
    if other_rule is not None:
        _refuse_rule(audit, other_rule, rows, rules[0])
    if not site.scores:
        since_text = f" since {since}" if since else ""
        raise CalibrationError(f"{audit}: no verdict of this model with a score to calibrate on{since_text} "
                               f"({site.rows} verdicts: {site.other_model} by another model, {site.failed} failed, "
                               f"{site.anomalous} found something)" + _no_shadow_hint(audit, site))
    if len(pitches) > 1:   # scores of files read at two pitches: no one default pitch makes the thresholds hold
        *_, (last, since_last) = pitches.items()
        raise CalibrationError(f"{audit}: these verdicts read files without a pitch of their own at "
                               f"{' and at '.join(f'{p:g} mm' for p in sorted(pitches))} (serve --pitch-mm changed); a "
                               "bundle holds one pitch for such files: calibrate on verdicts served at one, e.g. "
                               f"those at {last:g} mm with --since {since_last}")
    site.pitch_mm = next(iter(pitches), None)
    return site


def _no_shadow_hint(audit: str | Path, site: SiteScores) -> str:
    """Where an export CSV holds only other models' verdicts: a candidate's shadow scores are in the database alone."""
    if site.other_model < site.rows or _head(Path(audit)).startswith(SQLITE_MAGIC):
        return ""
    return ("; an `audit export` CSV holds no shadow rows: to calibrate a candidate that ran in shadow "
            "(serve --shadow), give the audit database")


def _refuse_rule(audit: str | Path, last: dict, rows: list[dict], rule: str) -> None:
    """CalibrationError for verdicts scored by another rule than the bundle's (`last`: the latest of them), naming
    the --since that selects the verdicts after it."""
    after = next((r["time"] for r in rows if r["time"] > last["time"]), None)
    hint = (f"calibrate on the verdicts served since with --since {after}, or " if after else "")
    raise CalibrationError(f"{audit}: verdicts up to {last['time']} were scored {rule_words(last['score_rule'])}, "
                           f"and this bundle is scored by the rule {rule!r}: its thresholds need scores of that rule; "
                           f"{hint}score the cleared scans again with `detector score`")


def _note_pitch(pitches: dict[float, str], verdict: dict) -> None:
    """Keep, per pitch that untagged files were read at, the time from which all later verdicts were at it (the last
    change to it: the --since that selects them), latest last."""
    p = verdict["pitch_mm"]
    if p is not None and next(reversed(pitches), None) != p:
        pitches.pop(p, None)
        pitches[p] = verdict["time"]


def recalibrate(meta: dict, site: SiteScores, source: str, model_sha256: str, truth: str | None = None,
                since: str | None = None, score_rule: str | None = None) -> dict:
    """The bundle metadata with thresholds and normal_scores from the site's scores and a `site_calibration`
    record; CalibrationError when there are too few scores to set the default rate at all. Where the scores' files
    without a pitch were read at another pitch than the bundle's (score or serve --pitch-mm 4), that pitch becomes its
    default_pitch_mm: its thresholds hold for scans read so, and `detector serve --model SITE` reads them so."""
    n, default = len(site.scores), float(meta["default_false_alarm_rate"])
    if n * default < 1:
        raise CalibrationError(f"{source}: {n} cleared scans cannot set a {_pct(default)} false-alarm rate: at least "
                               f"{math.ceil(1 / default)} are needed, and ~{math.ceil(ENOUGH_PER_RATE / default):,} "
                               "would pin it down")
    rates = sorted({float(r["false_alarm_rate"]) for r in meta["thresholds"]} | {default}, reverse=True)
    old = meta.get("site_calibration")
    new = dict(meta)
    new["thresholds"] = threshold_table(site.scores, rates)
    new["normal_scores"] = sorted(site.scores)
    if site.pitch_mm is not None and site.pitch_mm != untagged_pitch_mm(meta):   # thresholds of scans read at it
        new["default_pitch_mm"] = float(site.pitch_mm)
    new["site_calibration"] = {
        "results": source, "truth": truth, "since": since, "scans": n, "scored_with_sha256": model_sha256,
        "left_out": site.left_out(), "default_pitch_mm": site.pitch_mm, "score_rule": score_rule,
        "shadow": site.shadow,
        "shadow_scores": site.shadow_scores,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "previous": {"thresholds": meta["thresholds"], "normal_scans": len(meta["normal_scores"]),
                     "source": old["results"] if old else "training validation"}}
    return new


def comparison(old: dict, new: dict, scores: list[float]) -> list[dict]:
    """Per rate: the old and new threshold, and the share of the site's cleared scans each would inspect
    (with its 95 % interval)."""
    s, out = np.asarray(scores, np.float64), []
    before = {float(r["false_alarm_rate"]): float(r["threshold"]) for r in old["thresholds"]}
    for row in new["thresholds"]:
        rate, thr = float(row["false_alarm_rate"]), float(row["threshold"])
        k_new = int(np.sum(s >= thr))
        item = {"rate": rate, "threshold": thr, "site_rate": k_new / s.size, "site_interval": rate_interval(k_new, s.size)}
        if rate in before:
            k_old = int(np.sum(s >= before[rate]))
            item.update(old_threshold=before[rate], old_site_rate=k_old / s.size,
                        old_site_interval=rate_interval(k_old, s.size))
        out.append(item)
    return out


def _pct(p: float) -> str:
    return f"{100 * p:.2f} %" if p < 0.1 else f"{100 * p:.1f} %"


def _span(lo_hi: tuple[float, float]) -> str:
    return f"{100 * lo_hi[0]:.2f}-{100 * lo_hi[1]:.2f} %"


def main(args) -> int:
    """CLI entry: `detector calibrate RESULTS --model MODEL --out SITE_MODEL [--truth DATA | --since TIME]`; RESULTS is
    a `detector score` results CSV, or a station's audit log (database or export)."""
    model, out, since = Path(args.model), Path(args.out), getattr(args, "since", None)
    if out.exists() and out.resolve() == model.resolve():
        print(f"detector calibrate: --out {out} is the model itself: write the site's bundle to a new file "
              "(the scores in the results belong to this one)", file=sys.stderr)
        return 2
    if out.is_dir():
        print(f"detector calibrate: --out {out} is a folder: give the site's bundle file, e.g. {out / 'site.onnx'}",
              file=sys.stderr)
        return 2
    try:
        meta = read_metadata(model)
        data = model.read_bytes()   # once: the bytes hashed are the bytes the site's bundle is written from
        sha = hashlib.sha256(data).hexdigest()
        audit = is_audit_log(args.results)
        rules = (score_rule(data), unrecorded_rule(data))   # the rule the bundle is served with; of unrecorded scores
        if audit and args.truth:
            raise CalibrationError(f"{args.results}: an audit log's outcomes say which trucks held something; "
                                   "--truth is for a `detector score` results CSV")
        if not audit and since:
            raise CalibrationError(f"{args.results}: --since selects verdicts of an audit log; this is not one")
        if audit:   # the bundle this one was calibrated from scored with the same graph
            before = (meta.get("site_calibration") or {}).get("scored_with_sha256")
            site = load_audit_scores(args.results, {sha, before} - {None}, since, rules)
        else:
            site = load_site_scores(args.results, sha, args.truth, rules)
        new = recalibrate(meta, site, str(args.results), sha, args.truth, since, rules[0])
        rows = comparison(meta, new, site.scores)
        rewrite_metadata(model, out, new, data)
    except (CalibrationError, BundleError, FileNotFoundError, ValueError, OSError) as e:
        print(f"detector calibrate: {e}", file=sys.stderr)
        return 2
    n = len(site.scores)
    names = {"anomalous": "found something" if audit else "anomalous", "other_model": "by another model"}
    left = [f"{v} {names.get(k, k.replace('_', ' '))}" for k, v in site.left_out().items() if v]
    if audit:
        how = (f"; released and inspected-clear trucks, and {site.unchecked} inspected without a recorded outcome "
               "taken as cleared (record outcomes: POST /v1/outcome)" if site.unchecked else
               "; released and inspected-clear trucks")
    else:
        how = "" if args.truth else "; all taken as cleared traffic (give --truth to leave labelled anomalies out)"
    source = (" (this model's scores in shadow beside the live model: serve --shadow)" if site.shadow else
              f" ({site.shadow_scores} of them scored by this model in shadow before it served: serve --shadow)"
              if site.shadow_scores else "")
    print(f"{n} cleared scans from {args.results}{source}" + (f" ({', '.join(left)} left out)" if left else "") + how)
    print(f"{'rate':>7}  {'threshold (was)':>19}  site scans inspected: at the old threshold -> at the new")
    for r in rows:
        pair = threshold_texts(r["threshold"], *([r["old_threshold"]] if "old_threshold" in r else []))
        was = f"{pair[0]} ({pair[1]})" if len(pair) > 1 else pair[0]
        old = f"{_pct(r['old_site_rate'])} ({_span(r['old_site_interval'])})" if "old_threshold" in r else "-"
        print(f"{_pct(r['rate']):>7}  {was:>19}  {old} -> {_pct(r['site_rate'])} ({_span(r['site_interval'])})")
    loose = [f"{_pct(r['rate'])} only to {_span(r['site_interval'])}" for r in rows if n * r["rate"] < ENOUGH_PER_RATE]
    if loose:
        sys.stdout.flush()
        print(f"warning: {n} scans pin {', '.join(loose)} (~{ENOUGH_PER_RATE} / rate cleared scans pin a rate to "
              "about +-35 %)", file=sys.stderr, flush=True)
    default = next(r for r in rows if r["rate"] == float(new["default_false_alarm_rate"]))
    if untagged_pitch_mm(new) != untagged_pitch_mm(meta):
        print(f"files without a pitch of their own: read at {untagged_pitch_mm(new):g} mm by {out}, as these scores "
              f"were ({'serve' if audit else 'score'} --pitch-mm), not at {untagged_pitch_mm(meta):g} mm")
    pair = threshold_texts(default["threshold"], *([default["old_threshold"]] if "old_threshold" in default else []))
    print(f"calibrated on {n} cleared scans: {_pct(default['rate'])} false alarms at threshold {pair[0]}"
          + (f" (was {pair[1]})" if len(pair) > 1 else "") + f" -> {out}")
    out = shlex.quote(str(out))   # pasted into a shell: a folder with a space is one argument
    print(f"next: detector serve --model {out}   (or: detector score SCANS --model {out} --out results.csv)")
    return 0

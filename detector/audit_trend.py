"""The audit log's figures over time (`detector audit summary --by day|week|month`): per UTC period and model, the
verdicts, the INSPECT share with its 95 % interval, the score's median and 90th/99th percentiles, the outcomes and the
hit rate, and a flag on a period whose share of scores at or over their threshold departs from what the model should
give: the tiers' calibrated false-alarm rates where the verdicts' reasons record them, else the earlier periods'.
A scanner's ageing detectors, a new cargo mix, a policy edit or a model swap show here long before in the totals.
Aggregated in SQL (one pass for the counts, one for the percentiles); readers never write to the database.
"""
from __future__ import annotations

import math
import sqlite3
from collections import Counter, defaultdict
from datetime import date, timedelta
from pathlib import Path
from statistics import NormalDist
from typing import Any

from detector.audit_report import _BY_SCORE, _LATEST, _figures, _pct, _reader, _since
from detector.calibration import rate_interval

PERIODS = ("day", "week", "month")
# each verdict's period as the UTC date it starts on (date() converts a stored zone to UTC); ISO weeks start on Monday
_START = {"day": "date(v.time)", "week": "date(v.time, 'weekday 0', '-6 days')",
          "month": "date(v.time, 'start of month')"}
QUANTILES = (50, 90, 99)   # score percentiles per period (nearest rank: the score of the verdict at that rank)
ALPHA = 0.01   # chance that a window without drift shows any flag at all (Bonferroni over the periods tested)
MAX_FLAG_LINES = 10   # the table marks every flagged period; the lines after it name the first ones
# |z| where the expectation has no spread (a tier calibrated at rate 0 or 1) and the count departs from it: over any
# bound the test can set, and a number --json can write (Infinity is no JSON)
Z_MAX = 99.0
_RATE_TEXT = " at false-alarm rate "   # policy.decide's reason for a score's verdict ends with it and the tier's rate
_RATE_TAIL = len(_RATE_TEXT) + 24      # characters at a reason's end that hold the marker and the rate ({rate:g})


def trend(audit: str | Path, by: str, since: str | None = None) -> dict[str, Any]:
    """The figures per `by` period (UTC) and model at or after `since`, empty periods between included, with each
    period's drift test; the flags as lines."""
    if by not in PERIODS:
        raise ValueError(f"--by must be one of {', '.join(PERIODS)}, got {by!r}")
    db = _reader(Path(audit))
    try:
        where, params = _since(since)
        counts = db.execute(f"SELECT {_START[by]}, v.model_sha256, v.tier, v.threshold, v.decision, {_BY_SCORE}, "
                            f"o.outcome, COUNT(*), MIN(v.time) FROM {_LATEST}{where} GROUP BY 1, 2, 3, 4, 5, 6, 7",
                            params).fetchall()
        quantiles = _quantiles(db, by, where, params)
        rates = _recorded_rates(db, where, params)
    finally:
        db.close()
    rows = _rows(counts, quantiles, by)
    _test(rows, rates)
    return {"by": by, "timezone": "UTC", "alpha": ALPHA, "periods": rows,
            "empty": [r["period"] for r in rows if not r["verdicts"]], "flags": _flags(rows, by)}


def _quantiles(db: sqlite3.Connection, by: str, where: str, params: list[str]) -> dict[tuple, dict[int, float]]:
    """{(period start, model): {q: score}} for QUANTILES, ranked in SQL (a window function, not a row loop here)."""
    cond = " OR ".join(f"(r * 100 >= {q} * n AND (r - 1) * 100 < {q} * n)" for q in QUANTILES)
    sql = (f"SELECT p, m, r, n, s FROM (SELECT p, m, s, ROW_NUMBER() OVER w AS r, COUNT(*) OVER w AS n FROM "
           f"(SELECT {_START[by]} AS p, v.model_sha256 AS m, v.score AS s FROM verdicts v"
           f"{where + ' AND' if where else ' WHERE'} v.score IS NOT NULL) "
           f"WINDOW w AS (PARTITION BY p, m ORDER BY s ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) "
           f"WHERE {cond}")
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for p, m, r, n, s in db.execute(sql, params):
        for q in QUANTILES:
            if r == -(-q * n // 100):
                out[p, m or ""][q] = s
    return out


def _recorded_rates(db: sqlite3.Connection, where: str, params: list[str]) -> dict[tuple, float]:
    """{(model, tier, threshold): the false-alarm rate its threshold was set for}, from the reasons of the verdicts a
    score decided under a tier with its own rate (a tier at "the model's default rate" records none). The rate is
    read after the marker's last occurrence, in the reason's tail: a tier name or a quoted request may hold it too."""
    cond = f"{where + ' AND' if where else ' WHERE'} v.score IS NOT NULL AND instr(v.reason, ?) > 0"
    rows = db.execute(f"SELECT v.model_sha256, v.tier, v.threshold, substr(v.reason, -{_RATE_TAIL}) FROM verdicts v"
                      f"{cond} GROUP BY 1, 2, 3", [*params, _RATE_TEXT]).fetchall()
    out = {}
    for model, tier, threshold, tail in rows:
        try:
            rate = float(tail.rsplit(_RATE_TEXT, 1)[1])
        except (IndexError, ValueError):   # a reason worded otherwise: that tier is compared with its earlier periods
            continue
        if 0.0 <= rate <= 1.0:
            out[model or "", tier or "", threshold] = rate
    return out


def _rows(counts: list[tuple], quantiles: dict[tuple, dict[int, float]], by: str) -> list[dict[str, Any]]:
    """One row per period and model that served in it (first served first), and one empty row per period without a
    verdict between the first and the last."""
    tally: dict[tuple, Counter] = defaultdict(Counter)
    scored: dict[tuple, Counter] = defaultdict(Counter)   # (period, model) -> {(tier, threshold, by score): n}
    first: dict[str, str] = {}
    for start, model, tier, threshold, decision, by_score, outcome, n, t0 in counts:
        model = model or ""
        tally[start, model][decision, by_score, outcome] += n
        if by_score is not None:
            scored[start, model][tier or "", threshold, by_score] += n
        first[model] = min(first.get(model, t0), t0)
    order = sorted(first, key=first.get)
    starts = {s for s, _ in tally}
    rows = []
    for start in _all_starts(min(starts), max(starts), by) if starts else []:
        models = [m for m in order if (start, m) in tally] or [None]
        rows += [_row(start, m, by, tally.get((start, m), Counter()), scored.get((start, m), Counter()),
                      quantiles.get((start, m), {})) for m in models]
    return rows


def _row(start: str, model: str | None, by: str, tally: Counter, cells: Counter,
         q: dict[int, float]) -> dict[str, Any]:
    """One period's row for one model: the summary's figures, the INSPECT share's interval, the scores' percentiles and
    the scored verdicts per tier and threshold (what the drift test takes)."""
    f, n = _figures(tally), sum(cells.values())
    k = sum(c for (_, _, d), c in cells.items() if d == "INSPECT")
    tiers = [{"tier": t, "threshold": thr, "scored": cells[t, thr, "INSPECT"] + cells[t, thr, "RELEASE"],
              "score_inspect": cells[t, thr, "INSPECT"]} for t, thr in sorted({c[:2] for c in cells}, key=str)]
    return {"period": _label(start, by), "start": start, "model_sha256": model, **f,
            "inspect_interval": list(rate_interval(f["inspect"], f["verdicts"])) if f["verdicts"] else None,
            "unscored": f["verdicts"] - n, **{f"score_p{x}": q.get(x) for x in QUANTILES},
            "scored": n, "score_inspect": k, "score_inspect_share": k / n if n else None, "tiers": tiers}


def _all_starts(first: str, last: str, by: str) -> list[str]:
    """Every period's start date from `first` to `last` (ISO dates), the empty ones included."""
    d, end, out = date.fromisoformat(first), date.fromisoformat(last), []
    while d <= end:
        out.append(d.isoformat())
        d = d + timedelta(days=1 if by == "day" else 7) if by != "month" else date(d.year + d.month // 12,
                                                                                    d.month % 12 + 1, 1)
    return out


def _label(start: str, by: str) -> str:
    """A period's name: 2026-11-28, ISO week 2026-W48 (its year is the ISO year: 2021-01-03 is in 2020-W53), 2026-11."""
    if by == "day":
        return start
    if by == "month":
        return start[:7]
    year, week, _ = date.fromisoformat(start).isocalendar()
    return f"{year}-W{week:02d}"


def _test(rows: list[dict[str, Any]], rates: dict[tuple, float]) -> None:
    """Give each row its expected share of scores at or over the threshold (per tier: its calibrated rate, else its
    share in the model's earlier periods, weighted by the period's own tier mix, so a tier mix alone is no drift) and
    the z score of the difference, for all its tiers and, where several, for each; a row is a flag where any of them
    passes the bound (Bonferroni over every test in the window), naming the tiers that moved."""
    earlier: dict[tuple, Counter] = defaultdict(Counter)   # (model, tier) -> {"n": scored, "k": at or over}
    zs: list[float] = []
    for r in rows:
        r.update(expected_share=None, expected_from=None, z=None, drift=False, by_tier=[])
        per_tier: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])   # tier -> [n, k, mean, var]
        sources = set()
        for t in r["tiers"]:
            e = _expect(r["model_sha256"], t, rates, earlier)
            if e is not None:
                cell = per_tier[t["tier"]]
                cell[0], cell[1], cell[2], cell[3] = (cell[0] + t["scored"], cell[1] + t["score_inspect"],
                                                      cell[2] + e[0], cell[3] + e[1])
                sources.add(e[2])
        for t in r["tiers"]:
            earlier[r["model_sha256"], t["tier"]].update(n=t["scored"], k=t["score_inspect"])
        if not per_tier:
            continue
        n, k, mean, var = (sum(c[i] for c in per_tier.values()) for i in range(4))
        r.update(expected_share=mean / n, z=_z(k, mean, var), expected_from=" and ".join(sorted(sources)),
                 tested=n, tested_inspect=k)
        zs.append(r["z"])
        if len(per_tier) > 1:
            r["by_tier"] = [{"tier": name, "scored": c[0], "score_inspect": c[1], "share": c[1] / c[0],
                             "expected_share": c[2] / c[0], "z": _z(c[1], c[2], c[3])} for name, c in per_tier.items()]
            zs += [t["z"] for t in r["by_tier"]]
    bound = NormalDist().inv_cdf(1 - ALPHA / (2 * len(zs))) if zs else math.inf
    for r in rows:
        for t in r["by_tier"]:
            t["drift"] = abs(t["z"]) > bound
        r["drift"] = r["z"] is not None and (abs(r["z"]) > bound or any(t["drift"] for t in r["by_tier"]))


def _expect(model: str | None, tier: dict[str, Any], rates: dict[tuple, float],
            earlier: dict[tuple, Counter]) -> tuple[float, float, str] | None:
    """(expected count at or over the threshold, its variance, where from) of one tier's scored verdicts in a period;
    None where nothing tells (no recorded rate, no earlier period)."""
    n = tier["scored"]
    rate = rates.get((model, tier["tier"], tier["threshold"]))
    if rate is not None:
        return n * rate, n * rate * (1 - rate), "calibrated"
    before = earlier.get((model, tier["tier"]))
    if not before or not before["n"]:
        return None
    p = (before["k"] + 0.5) / (before["n"] + 1)   # smoothed: a share of 0 before still has a spread
    return n * before["k"] / before["n"], n * p * (1 - p) * (1 + n / before["n"]), "earlier"


def _z(k: int, mean: float, var: float) -> float:
    """Signed z score of a count against its expectation, with a continuity correction (counts are whole); +-Z_MAX
    for a count an expectation without spread rules out."""
    gap = k - mean
    if var <= 0:
        return 0.0 if gap == 0 else math.copysign(Z_MAX, gap)
    return math.copysign(min(Z_MAX, max(0.0, abs(gap) - 0.5) / math.sqrt(var)), gap)


def _flags(rows: list[dict[str, Any]], by: str) -> list[str]:
    """One line per flagged period: its share by score with the 95 % interval, against what was expected."""
    several = len({r["model_sha256"] for r in rows if r["model_sha256"] is not None}) > 1
    out = []
    for r in rows:
        if not r["drift"]:
            continue
        lo, hi = rate_interval(r["tested_inspect"], r["tested"])
        against = {"calibrated": "calibrated", "earlier": f"the {by}s before",
                   "calibrated and earlier": f"calibrated and the {by}s before"}[r["expected_from"]]
        model = f" model {r['model_sha256'][:12]}" if several else ""
        share = r["tested_inspect"] / r["tested"]
        line = (f"{by} {r['period']}{model}: INSPECT by score {_pct(share)} ({_pct(lo)}-{_pct(hi)}) against "
                f"{_pct(r['expected_share'])} {against}")
        moved = [t for t in r["by_tier"] if t["drift"]] or sorted(r["by_tier"], key=lambda t: -abs(t["z"]))[:1]
        line += "".join(f"; tier {t['tier'] or '?'}{' moved' if t['drift'] else ' moved most'}: {_pct(t['share'])} "
                        f"against {_pct(t['expected_share'])}" for t in moved)
        out.append(line)
    return out


def format_trend(t: dict[str, Any]) -> str:
    """trend's result as a table (a row per period, per model where several served) and the flags, one line each."""
    rows = t["periods"]
    if not rows:
        return f"no verdicts to show by {t['by']}"
    several = len({r["model_sha256"] for r in rows if r["model_sha256"] is not None}) > 1
    head = [t["by"], *(["model"] if several else []), "verdicts", "INSPECT", "95 % interval", "unscored", "median",
            "p90", "p99", "by score", "outcomes", "hits/checked", "hit rate"]
    table = [head] + [[r["period"], *([(r["model_sha256"] or "-")[:12]] if several else []), str(r["verdicts"]),
                       f"{r['inspect']} ({_pct(r['inspect_share'])})", _span(r["inspect_interval"]), str(r["unscored"]),
                       *(_score(r[f"score_p{q}"]) for q in QUANTILES),
                       _pct(r["score_inspect_share"]) + (" *" if r["drift"] else ""), str(r["outcomes"]),
                       f"{r['inspected_found']}/{r['inspected_found'] + r['inspected_clear']}", _pct(r["hit_rate"])]
                      for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.append(f"periods in UTC{' (ISO weeks, Monday to Sunday)' if t['by'] == 'week' else ''}; by score: the share "
                 f"of scored verdicts at or over their threshold (forced and failed INSPECTs left out), * where it "
                 f"departs from the expected (tested at {t['alpha']:g} for the whole window)")
    if t["empty"]:
        lines.append(f"no verdicts in {t['by']} {', '.join(t['empty'])} (station or service down?)")
    tested = [r for r in rows if r["z"] is not None]
    if t["flags"]:
        more = len(t["flags"]) - MAX_FLAG_LINES
        lines += t["flags"][:MAX_FLAG_LINES] + ([f"... and {more} more (* in the table)"] if more > 0 else [])
    elif not tested:
        lines.append(f"no {t['by']} has a calibrated rate recorded or a {t['by']} with scores before it: nothing to "
                     "compare its INSPECT share with")
    else:
        lines.append(f"no {t['by']}'s INSPECT share by score departs from the expected ({len(tested)} tested)")
    return "\n".join(lines)


def _span(lo_hi: list[float] | None) -> str:
    return "-" if lo_hi is None else f"{_pct(lo_hi[0])} - {_pct(lo_hi[1])}"


def _score(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"

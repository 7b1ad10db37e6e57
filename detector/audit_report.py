"""Reading the audit log that `detector serve` writes (detector.audit): its CSV export, a summary with the hit rate
of inspection from the recorded outcomes, the verdicts served (what `detector calibrate` takes from a station), and
the `detector audit` verb. Readers never write to the database: another process may be serving from it.
"""
from __future__ import annotations

import csv
import json
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from detector.atomic import replacing
from detector.audit import COLUMNS, LATER_COLUMNS, OUTCOME_COLUMNS, SPOOL_SUFFIX, missing_columns, parse_time
from detector.calibration import rate_interval

SQLITE_MAGIC = b"SQLite format 3\x00"   # the first bytes of every SQLite database file
EXPORT_START = ",".join(COLUMNS[:2]).encode() + b","   # the first bytes of an `audit export` CSV (after a BOM)
# a spreadsheet runs a cell starting with one of these as a formula (CSV injection); the export's text cells start
# with a ' there, which spreadsheets show as text (OWASP's advice)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# each verdict with its latest outcome (NULLs where none): the highest id, not the latest time, is the last recorded
_LATEST = "verdicts v LEFT JOIN outcomes o ON o.id = (SELECT MAX(id) FROM outcomes WHERE request_id = v.request_id)"


def export_csv(audit: str | Path, out: str | Path, since: str | None = None) -> int:
    """Write the rows at or after `since` (ISO, UTC if naive) to a CSV, each with its latest outcome in the columns
    after COLUMNS (empty where none), then LATER_COLUMNS (empty in a database written before them); returns the row
    count."""
    audit, out = Path(audit), Path(out)
    if any(_same_file(out, Path(f"{audit}{end}")) for end in ("", "-wal", "-shm", "-journal", SPOOL_SUFFIX)):
        # opening --out for writing would truncate the log of every verdict before a row is read
        raise FileExistsError(f"{out}: is the audit database itself; give --out a new .csv path")
    db = _reader(audit)
    try:
        where, params = _since(since)
        cols = ", ".join([*(f"v.{c}" for c in COLUMNS), "o.outcome", "o.time", "o.officer", "o.note", *_later(db)])
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS + OUTCOME_COLUMNS + tuple(LATER_COLUMNS))
            for row in db.execute(f"SELECT {cols} FROM {_LATEST}{where} ORDER BY v.time, v.id", params):
                w.writerow([_cell(v) for v in row])
                n += 1
        return n
    finally:
        db.close()


def _cell(value: Any) -> Any:
    """One export cell: '' for NULL; text a spreadsheet would run as a formula gets a leading ' (vehicle_id, file_name,
    officer and note are the station client's text: '=HYPERLINK(...)' ran when an officer opened the export)."""
    if value is None:
        return ""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


# what served_verdicts gives of each verdict; pitch_mm: the pitch its file was read at where the file carried none;
# score_rule: how its score was made (None: not recorded)
SERVED = ("time", "model_sha256", "decision", "score", "outcome", "pitch_mm", "score_rule", "request_id")


def served_verdicts(source: str | Path, since: str | None = None) -> list[dict[str, Any]]:
    """Each verdict at or after `since` as a dict of SERVED (score, outcome, pitch_mm and score_rule None where there
    is none), from an audit database or its `detector audit export` CSV (one written before outcomes, the pitch or the
    rule were recorded has none). ValueError names the file if it is neither."""
    source = Path(source)
    if _head(source).startswith(SQLITE_MAGIC):
        db = _reader(source)
        try:
            where, params = _since(since)
            pitch, rule = (_later(db)[list(LATER_COLUMNS).index(c)] for c in ("untagged_pitch_mm", "score_rule"))
            rows = db.execute(f"SELECT v.time, v.model_sha256, v.decision, v.score, o.outcome, {pitch}, {rule}, "
                              f"v.request_id FROM {_LATEST}{where} ORDER BY v.time, v.id", params).fetchall()
        finally:
            db.close()
        return [dict(zip(SERVED, r)) for r in rows]
    with open(source, newline="", encoding="utf-8-sig") as f:   # -sig: a spreadsheet saved it with a byte-order mark
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ())[:len(COLUMNS)] != COLUMNS:
            raise ValueError(f"{source}: neither an audit database nor a `detector audit export` CSV "
                             f"(its header must start with {', '.join(COLUMNS[:4])}, ...)")
        start = parse_time(since) if since else ""
        out = []
        for i, r in enumerate(reader, start=2):
            if r["time"] < start:
                continue
            score, pitch = (_number(source, i, name, r.get(name)) for name in ("score", "untagged_pitch_mm"))
            out.append({"time": r["time"], "model_sha256": r["model_sha256"], "decision": r["decision"],
                        "score": score, "outcome": r.get("outcome") or None, "pitch_mm": pitch,
                        "score_rule": r.get("score_rule") or None, "request_id": r.get("request_id") or None})
        return out


def _number(source: Path, line: int, name: str, text: str | None) -> float | None:
    """An export's number cell; None where empty or absent (an older export); ValueError naming the line if not one."""
    try:
        return float(text) if text else None
    except ValueError:
        raise ValueError(f"{source}: line {line}: {name} {text!r} is not a number") from None


def _later(db: sqlite3.Connection) -> list[str]:
    """What to select for each of LATER_COLUMNS: the column, or NULL where the database was written before it (it is
    read as it is: another process may be serving from it)."""
    missing = missing_columns(db)
    return [f"NULL AS {c}" if c in missing else f"v.{c}" for c in LATER_COLUMNS]


def summarise(audit: str | Path, since: str | None = None) -> dict[str, Any]:
    """The verdicts at or after `since` and their latest outcomes, for all and per model (first served first): how
    many, the INSPECT share, the hit rate of inspection (found among inspected trucks with an outcome, with its
    Wilson 95 % interval) and the misses (found among RELEASEd trucks that were checked anyway)."""
    db = _reader(Path(audit))
    try:
        where, params = _since(since)
        rows = db.execute(f"SELECT v.model_sha256, v.decision, {_BY_SCORE}, o.outcome, COUNT(*), MIN(v.time), "
                          f"MAX(v.time) FROM {_LATEST}{where} GROUP BY 1, 2, 3, 4 ORDER BY 6", params).fetchall()
    finally:
        db.close()
    models: dict[str, Counter] = {}
    for model, decision, by_score, outcome, n, _, _ in rows:
        models.setdefault(model or "", Counter())[decision, by_score, outcome] += n
    return {"audit": str(audit), "since": parse_time(since) if since else None,
            "first": min((r[5] for r in rows), default=None), "last": max((r[6] for r in rows), default=None),
            "all": _figures(sum(models.values(), Counter())),
            "models": [{"model_sha256": m, **_figures(c)} for m, c in models.items()], **shadow_section(audit, since)}


# what the model's score alone decided: a risk flag's forced INSPECT of a truck it scored under the threshold is its
# RELEASE, and a failed scan (no score) is neither
_BY_SCORE = ("CASE WHEN v.score IS NULL OR v.threshold IS NULL THEN NULL WHEN v.score >= v.threshold THEN 'INSPECT' "
             "ELSE 'RELEASE' END")


def _figures(tally: Counter) -> dict[str, Any]:
    """summarise's figures from a count of verdicts by (decision, the score's own decision or None, latest outcome or
    None): the station's routing (forced and failed INSPECTs included), and the model's scores alone (`score_*`)."""
    routed, scored = Counter(), Counter()
    for (decision, by_score, outcome), k in tally.items():
        routed[decision, outcome] += k
        scored[by_score, outcome] += k
    n, inspect = sum(routed.values()), sum(k for (d, _), k in routed.items() if d == "INSPECT")
    found, clear = routed["INSPECT", "found"], routed["INSPECT", "clear"]
    checked = found + clear
    hits, score_checked = scored["INSPECT", "found"], scored["INSPECT", "found"] + scored["INSPECT", "clear"]
    return {"verdicts": n, "inspect": inspect, "inspect_share": inspect / n if n else None,
            "outcomes": sum(k for (_, o), k in routed.items() if o is not None),
            "inspected_found": found, "inspected_clear": clear, "hit_rate": found / checked if checked else None,
            "hit_rate_interval": list(rate_interval(found, checked)) if checked else None,
            "released_checked": routed["RELEASE", "found"] + routed["RELEASE", "clear"],
            "released_found": routed["RELEASE", "found"],
            "score_found": hits, "score_checked": score_checked,
            "score_hit_rate": hits / score_checked if score_checked else None,
            "score_missed": scored["RELEASE", "found"],
            "score_released_checked": scored["RELEASE", "found"] + scored["RELEASE", "clear"]}


def format_summary(s: dict[str, Any]) -> str:
    """summarise's result as a table (a row per model where more than one served, then all of them) and a one-line
    summary. hits: found among INSPECTed trucks with an outcome; misses: found among RELEASEd trucks checked anyway."""
    a, since = s["all"], f" since {s['since']}" if s["since"] else ""
    if not a["verdicts"]:
        return f"no verdicts{since} in {s['audit']}"
    rows = [(m["model_sha256"][:12] or "?", m) for m in s["models"]]
    rows += [("all", a)] if len(rows) > 1 else []
    table = [("model", "verdicts", "INSPECT", "outcomes", "hits/checked", "hit rate", "95 % interval",
              "misses/checked", "score: hits", "score: misses")]
    table += [(name, str(f["verdicts"]), f"{f['inspect']} ({_pct(f['inspect_share'])})", str(f["outcomes"]),
               f"{f['inspected_found']}/{f['inspected_found'] + f['inspected_clear']}", _pct(f["hit_rate"]),
               _interval(f), f"{f['released_found']}/{f['released_checked']}",
               f"{f['score_found']}/{f['score_checked']}", f"{f['score_missed']}/{f['score_released_checked']}")
              for name, f in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    hit = (f"hit rate {_pct(a['hit_rate'])} ({a['inspected_found']} found of "
           f"{a['inspected_found'] + a['inspected_clear']} inspected, 95 % {_interval(a)})"
           if a["hit_rate"] is not None else "no inspected truck has an outcome yet")
    lines += ["", f"{a['verdicts']} verdicts{since} ({s['first']} to {s['last']}), {_pct(a['inspect_share'])} INSPECT; "
                  f"{a['outcomes']} with an outcome: {hit}; misses: {a['released_found']} found of "
                  f"{a['released_checked']} released trucks checked; by the model's scores alone (forced and failed "
                  f"INSPECTs left out): hit rate {_pct(a['score_hit_rate'])} ({a['score_found']} found of "
                  f"{a['score_checked']}), misses {a['score_missed']} found of {a['score_released_checked']} checked "
                  f"<- {s['audit']}"]
    return "\n".join(lines + format_shadow(s))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _interval(figures: dict[str, Any]) -> str:
    lo_hi = figures["hit_rate_interval"]
    return "-" if lo_hi is None else f"{_pct(lo_hi[0])} - {_pct(lo_hi[1])}"


# each candidate row (serve --shadow) with the live verdict of its truck and that truck's latest outcome
_SHADOW = ("shadow_verdicts s JOIN verdicts v ON v.request_id = s.request_id LEFT JOIN outcomes o ON o.id = "
           "(SELECT MAX(id) FROM outcomes WHERE request_id = v.request_id)")


def _has_shadow(db: sqlite3.Connection) -> bool:
    """Whether the database has the shadow_verdicts table (none where no service of this version opened it since)."""
    return bool(db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shadow_verdicts'").fetchone())


def shadow_section(audit: str | Path, since: str | None = None) -> dict[str, Any]:
    """{"shadow": [figures per (live model, candidate)]} where the log holds candidate rows (serve --shadow) of
    verdicts at or after `since`, else {}: on the trucks both judged, the INSPECT share of each, agreement, the trucks
    each alone would inspect, and from the latest outcomes the finds each would have inspected and the finds the
    candidate would have released."""
    db = _reader(Path(audit))
    try:
        if not _has_shadow(db):
            return {}
        where, params = _since(since)
        rows = db.execute(f"SELECT v.model_sha256, s.model_sha256, v.decision, s.decision, s.error IS NOT NULL, "
                          f"o.outcome, COUNT(*), MIN(s.time) FROM {_SHADOW}{where} GROUP BY 1, 2, 3, 4, 5, 6 "
                          "ORDER BY 8", params).fetchall()
    finally:
        db.close()
    pairs: dict[tuple[str, str], Counter] = {}
    for live, cand, d_live, d_cand, failed, outcome, n, _ in rows:
        pairs.setdefault((live or "", cand), Counter())[d_live, d_cand, bool(failed), outcome] += n
    return {"shadow": [{"live_sha256": live, "shadow_sha256": cand, **_shadow_figures(c)}
                       for (live, cand), c in pairs.items()]} if pairs else {}


def _shadow_figures(tally: Counter) -> dict[str, Any]:
    """shadow_section's figures from a count of trucks by (live decision, candidate's, candidate failed, outcome)."""
    def count(test: Any) -> int:
        return sum(k for key, k in tally.items() if test(*key))
    n = count(lambda *_: True)
    live, cand = count(lambda a, b, f, o: a == "INSPECT"), count(lambda a, b, f, o: b == "INSPECT")
    agree = count(lambda a, b, f, o: a == b)
    return {"trucks": n, "live_inspect": live, "live_inspect_share": live / n,
            "shadow_inspect": cand, "shadow_inspect_share": cand / n, "agree": agree, "agreement": agree / n,
            "live_only_inspect": count(lambda a, b, f, o: a == "INSPECT" and b == "RELEASE"),
            "shadow_only_inspect": count(lambda a, b, f, o: a == "RELEASE" and b == "INSPECT"),
            "shadow_failed": count(lambda a, b, f, o: f),
            "outcomes": count(lambda a, b, f, o: o is not None), "found": count(lambda a, b, f, o: o == "found"),
            "live_found": count(lambda a, b, f, o: o == "found" and a == "INSPECT"),
            "shadow_found": count(lambda a, b, f, o: o == "found" and b == "INSPECT"),
            "shadow_released_found": count(lambda a, b, f, o: o == "found" and b == "RELEASE")}


def format_shadow(s: dict[str, Any]) -> list[str]:
    """The summary's shadow lines (none without candidate rows): a row per live model and candidate, and how to read
    the finds."""
    if not s.get("shadow"):
        return []
    table = [("shadow: live vs candidate", "trucks", "live INSPECT", "candidate INSPECT", "agree", "live only",
              "candidate only", "candidate failed", "found: live / candidate", "found, candidate RELEASE")]
    table += [(f"{f['live_sha256'][:12] or '?'} vs {f['shadow_sha256'][:12]}", str(f["trucks"]),
               f"{f['live_inspect']} ({_pct(f['live_inspect_share'])})",
               f"{f['shadow_inspect']} ({_pct(f['shadow_inspect_share'])})", _pct(f["agreement"]),
               str(f["live_only_inspect"]), str(f["shadow_only_inspect"]), str(f["shadow_failed"]),
               f"{f['live_found']} / {f['shadow_found']} of {f['found']}", str(f["shadow_released_found"]))
              for f in s["shadow"]]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["", *("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                   for r in table)]
    lines.append("shadow: the trucks both models judged, each routed by the same policy at its own thresholds; finds "
                 "come from the recorded outcomes, so a truck the live model released is known only where it was "
                 "checked anyway")
    return lines


def shadow_verdicts(source: str | Path, since: str | None = None) -> list[dict[str, Any]]:
    """Each candidate row (serve --shadow) of an audit database at or after `since`, as served_verdicts gives a
    verdict (SERVED): the candidate's model, score, pitch and rule, with the decision its truck was served (whether
    it was inspected) and its latest outcome; [] for an export CSV or a database without such rows."""
    source = Path(source)
    if not _head(source).startswith(SQLITE_MAGIC):
        return []
    db = _reader(source)
    try:
        if not _has_shadow(db):
            return []
        where, params = _since(since)
        rows = db.execute(f"SELECT s.time, s.model_sha256, v.decision, s.score, o.outcome, s.untagged_pitch_mm, "
                          f"s.score_rule, s.request_id FROM {_SHADOW}{where} ORDER BY s.time, s.id", params).fetchall()
    finally:
        db.close()
    return [dict(zip(SERVED, r)) for r in rows]


def is_audit_log(path: str | Path) -> bool:
    """True for an audit database (`detector serve`) or its `detector audit export` CSV, from their first bytes."""
    head = _head(Path(path))
    return head.startswith(SQLITE_MAGIC) or head.removeprefix(b"\xef\xbb\xbf").startswith(EXPORT_START)


def _head(path: Path, n: int = 64) -> bytes:
    """A file's first `n` bytes; b"" where it cannot be read (the reader that opens it then says why)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _reader(audit: Path) -> sqlite3.Connection:
    """A connection for reading the log; one written before outcomes were recorded reads as holding none (an empty
    TEMP table stands in: nothing is written to the file, which another process may be serving from)."""
    if not audit.is_file():
        raise FileNotFoundError(f"{audit}: no audit database (run `detector serve` first, or pass --audit)")
    db = sqlite3.connect(str(audit), timeout=30)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outcomes'").fetchone():
            db.execute("CREATE TEMP TABLE outcomes (id INTEGER PRIMARY KEY, time TEXT, request_id TEXT, outcome TEXT, "
                       "officer TEXT, note TEXT)")
    except BaseException:
        db.close()
        raise
    return db


def _since(since: str | None) -> tuple[str, list[str]]:
    """The WHERE clause (on the verdict's time) and its parameters for --since; ValueError if unreadable."""
    return (" WHERE v.time >= ?", [parse_time(since)]) if since else ("", [])


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links or another spelling)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _trend(audit: str, by: str, since: str | None) -> dict[str, Any]:
    """`summary --by`'s figures per period (detector.audit_trend, imported here: it builds on this module)."""
    from detector.audit_trend import trend
    return trend(audit, by, since)


def _trend_text(result: dict[str, Any]) -> str:
    """The per-period table and its flags after the summary (with --by and verdicts to show), else nothing."""
    from detector.audit_trend import format_trend
    return f"\n\n{format_trend(result['trend'])}" if result.get("trend", {}).get("periods") else ""


def main(args) -> int:
    """CLI entry: `detector audit export [--audit audit.sqlite] [--since T] --out audit.csv`, or
    `detector audit summary [--audit audit.sqlite] [--since T] [--json]`."""
    if args.action not in ("export", "summary"):
        print(f"detector audit: unknown action {args.action!r}", file=sys.stderr)
        return 2
    summary = args.action == "summary"
    as_json, by = getattr(args, "json", False), getattr(args, "by", None)
    if (args.out is None) != summary or ((as_json or by) and not summary):   # an option the action would ignore
        print("detector audit: export writes --out (a .csv); summary prints, as a table or with --json, "
              "per period with --by", file=sys.stderr)
        return 2
    if not summary and Path(args.out).is_dir():   # a site's exports/ folder: name the file to give, as score does
        print(f"detector audit: --out {args.out} is a folder: give the export file, e.g. "
              f"{Path(args.out) / 'audit.csv'}", file=sys.stderr)
        return 2
    try:
        parse_time(args.since) if args.since else None
    except ValueError as e:
        print(f"detector audit: --since {args.since!r} is not an ISO date/time ({e})", file=sys.stderr)
        return 2
    # exit 2 for an input it cannot use (no database there, a file that is none), as the other verbs; 1 for a read
    # that failed (a lock held past the timeout, an I/O error)
    try:
        result = summarise(args.audit, args.since) if summary else export_csv(args.audit, args.out, args.since)
        if by:
            result["trend"] = _trend(args.audit, by, args.since)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"detector audit: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # the export could not be written (a file where its folder should be, a full disk)
        print(f"detector audit: {e}", file=sys.stderr)
        return 1
    except ValueError as e:   # --since was read above: this is the log's own (a malformed export CSV)
        print(f"detector audit: {args.audit}: {e}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as e:
        print(f"detector audit: {args.audit}: not a readable audit database ({e})", file=sys.stderr)
        return 1 if isinstance(e, sqlite3.OperationalError) else 2
    if summary:
        print(json.dumps(result, indent=2) if as_json else format_summary(result) + _trend_text(result))
        return 0
    since = f" since {parse_time(args.since)}" if args.since else ""
    print(f"exported {result} verdicts{since} from {args.audit} -> {args.out}")
    return 0

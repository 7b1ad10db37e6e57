"""Durable audit log of served verdicts (SQLite, WAL, synchronous=FULL) and its CSV export.

Every verdict the service answers is committed here before the answer leaves, so after a crash or
power loss each answered request has its row. WAL keeps readers (the export) off the writer's back.
The one exception: a database locked by another writer past the request's deadline. The truck is then
answered INSPECT at once, and its row (saying so) is first appended, fsync'ed, to the spool beside the
database (`<audit>.pending.jsonl`, JSON lines), then retried until committed (see serve.Service._audit).
The spool is rewritten to hold only rows not yet committed; opening the log commits what an earlier run
left in it (by request_id, so a row committed just before a crash is not stored twice). Where the spool
cannot be written either (disk full), the row is kept in memory and logged to stderr in full.

Beside the verdicts, the `outcomes` table records what the manual inspection of a truck found (`found`: contraband
or undeclared goods, `clear`: nothing), so a site can measure the routing's hit rate and collect its own labelled
scans. It is append-only (triggers refuse UPDATE and DELETE): a correction is a new row; a request's latest counts.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from detector.calibration import rate_interval

COLUMNS = ("time", "request_id", "vehicle_id", "container_id", "file_name", "file_sha256", "file_bytes",
           "model_sha256", "model_version", "score", "threshold", "tier", "decision", "reason",
           "latency_ms", "risk_flags")
OUTCOME_COLUMNS = ("outcome", "outcome_time", "officer", "outcome_note")   # the export's, after COLUMNS
# manual inspection found contraband or undeclared goods / found nothing (the outcomes table's CHECK names them too)
OUTCOMES = ("found", "clear")
MAX_OFFICER, MAX_NOTE = 200, 2000   # characters; longer is refused, not cut short
BUSY_TIMEOUT_S = 30   # how long a write waits for a lock held by another connection, unless told otherwise
SPOOL_SUFFIX = ".pending.jsonl"   # beside the database: rows answered but not yet committed
REPLAY_WAIT_S = 1.0   # at open, how long replaying the spool waits for a locked database (the rest stays spooled)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL UNIQUE, vehicle_id TEXT, container_id TEXT,
    file_name TEXT, file_sha256 TEXT, file_bytes INTEGER, model_sha256 TEXT, model_version TEXT,
    score REAL, threshold REAL, tier TEXT, decision TEXT NOT NULL, reason TEXT, latency_ms REAL,
    risk_flags TEXT);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts(time);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL, outcome TEXT NOT NULL CHECK (outcome IN ('found', 'clear')),
    officer TEXT, note TEXT);
CREATE INDEX IF NOT EXISTS outcomes_request ON outcomes(request_id, id);
CREATE TRIGGER IF NOT EXISTS outcomes_no_update BEFORE UPDATE ON outcomes
    BEGIN SELECT RAISE(ABORT, 'outcomes are append-only: record a correction as a new row'); END;
CREATE TRIGGER IF NOT EXISTS outcomes_no_delete BEFORE DELETE ON outcomes
    BEGIN SELECT RAISE(ABORT, 'outcomes are append-only: record a correction as a new row'); END;
"""
# each verdict with its latest outcome (NULLs where none): the highest id, not the latest time, is the last recorded
_LATEST = "verdicts v LEFT JOIN outcomes o ON o.id = (SELECT MAX(id) FROM outcomes WHERE request_id = v.request_id)"


class OutcomeError(ValueError):
    """An outcome that cannot be recorded as given (unknown outcome, text too long, not text)."""


class UnknownRequest(OutcomeError):
    """An outcome for a request_id with no verdict in the audit log."""


def utc_now() -> str:
    """UTC ISO time with milliseconds; fixed width, so text order is time order."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(text: str) -> str:
    """ISO date or time (naive = UTC) -> the stored UTC text form; ValueError if unreadable."""
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


class AuditLog:
    """One writer connection shared by threads (serialised by a lock); each write is its own commit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_S)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL journal (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")  # fsync at every commit: a row answered is a row kept
            self._db.executescript(_SCHEMA)
            self._file = _file_id(self.path)   # what the path names now: a file deleted or replaced is refused
            self._check_writable()
        except sqlite3.Error as e:   # sqlite's own message ("unable to open database file") names no file
            if self._db is not None:
                self._db.close()
            raise type(e)(f"{self.path}: cannot open the audit log ({e})") from None
        self.spool = Path(f"{self.path}{SPOOL_SUFFIX}")
        self.recovered: list[dict] = self._replay_spool()   # spooled rows still not committed (database locked)

    def _check_writable(self) -> None:
        """sqlite opens a database it may not write (the file's mode, a read-only mount) read-only without a word: every
        verdict was then answered INSPECT as if the database were locked past the deadline. A write that changes nothing
        finds it; a lock held by another writer (a backup) is no reason to refuse."""
        try:
            with self._transaction(0) as db:
                db.execute("DELETE FROM verdicts WHERE 0")
        except sqlite3.OperationalError as e:
            if "readonly" in str(e):
                raise

    def write(self, record: dict[str, Any], wait_s: float | None = None, replay: bool = False) -> None:
        """Insert one verdict and commit (durable on return). A database locked by another connection is
        waited for up to `wait_s` (default BUSY_TIMEOUT_S), then sqlite3.OperationalError("database is locked").
        `replay`: a deferred row that may already be stored (committed before a crash) is skipped, not an error."""
        row = dict(record)
        row.setdefault("time", utc_now())
        if not isinstance(row.get("risk_flags"), (str, type(None))):
            row["risk_flags"] = json.dumps(list(row["risk_flags"]))
        values = [row.get(c) for c in COLUMNS]
        sql = f"INSERT INTO verdicts ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        if replay:   # not OR IGNORE: that would also drop a row breaking NOT NULL, silently
            sql += " ON CONFLICT(request_id) DO NOTHING"
        with self._transaction(wait_s) as db:
            db.execute(sql, values)

    def record_outcome(self, request_id: str, outcome: str, officer: str | None = None, note: str | None = None,
                       wait_s: float | None = None) -> dict[str, Any]:
        """Append what the manual inspection of a served truck found and commit (durable on return); returns the row
        (time, request_id, outcome, officer, note) with the decision served for it. A correction is another call: the
        latest row counts. OutcomeError for an unknown outcome or text too long, UnknownRequest for a request_id with no
        verdict; a database locked past `wait_s` raises sqlite3.OperationalError, as write() does."""
        _check_outcome(request_id, outcome, officer, note)
        with self._transaction(wait_s) as db:
            served = db.execute("SELECT decision FROM verdicts WHERE request_id = ?", (request_id,)).fetchone()
            if served is None:
                raise UnknownRequest(f"no verdict with request_id {request_id!r} in {self.path}")
            row = {"time": utc_now(), "request_id": request_id, "outcome": outcome, "officer": officer, "note": note}
            db.execute("INSERT INTO outcomes (time, request_id, outcome, officer, note) "
                       "VALUES (:time, :request_id, :outcome, :officer, :note)", row)
        return {**row, "decision": served[0]}

    @contextmanager
    def _transaction(self, wait_s: float | None) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock, committed on exit and rolled back on any error; a database locked
        by another connection is waited for up to `wait_s` (default BUSY_TIMEOUT_S). sqlite3.OperationalError when
        the path no longer names the file opened (deleted, or replaced by another): the connection would commit into
        a file without a name, lost at exit."""
        with self._lock:
            if _file_id(self.path) != self._file:
                raise sqlite3.OperationalError(f"{self.path} was removed or replaced since it was opened: restart to "
                                               "open it again")
            if wait_s is not None:
                self._db.execute(f"PRAGMA busy_timeout={max(0, int(wait_s * 1000))}")
            try:
                self._db.execute("BEGIN IMMEDIATE")   # the only step that waits for another connection's lock
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:   # a failed COMMIT too: else every later BEGIN fails
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if wait_s is not None:
                    self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")

    def spool_append(self, record: dict[str, Any]) -> None:
        """Append a row not yet committed to the spool and fsync it (durable on return); OSError if it cannot be."""
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            fd = os.open(self.spool, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.fstat(fd).st_size
                if start and os.pread(fd, 1, start - 1) != b"\n":   # a half line left by a failed rewrite
                    line = b"\n" + line
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)   # no half row for the next append to run into
                    raise
            finally:
                os.close(fd)
            _fsync_dir(self.spool.parent)   # the spool's name, when this append created it

    def spool_rewrite(self, records: list[dict[str, Any]]) -> None:
        """Make the spool hold exactly `records` (atomically; removed when empty); OSError if it cannot be."""
        tmp = self.spool.with_name(self.spool.name + ".tmp")
        with self._lock:
            try:
                if records:
                    with open(tmp, "wb") as f:
                        f.write("".join(json.dumps(r) + "\n" for r in records).encode())
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.spool)
                else:
                    self.spool.unlink(missing_ok=True)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.spool.parent)

    def _replay_spool(self) -> list[dict[str, Any]]:
        """Commit the rows an earlier run left in the spool, oldest first; returns those the still locked
        database refused (they stay spooled). Unreadable lines and rows are reported on stderr and dropped."""
        rows = self._read_spool()
        if rows is None:
            return []
        left: list[dict[str, Any]] = []
        stored = 0
        for n, row in rows:
            if left:
                left.append(row)
                continue
            try:
                self.write(row, wait_s=REPLAY_WAIT_S, replay=True)
                stored += 1
            except sqlite3.OperationalError:   # still locked: the service's retry commits it
                left.append(row)
            except (sqlite3.Error, ValueError, TypeError) as e:   # would fail every time: say so, keep going
                print(f"detector audit: {self.spool}: line {n}: row not stored ({e}): {json.dumps(row)}",
                      file=sys.stderr, flush=True)
        try:
            self.spool_rewrite(left)
        except OSError as e:   # committed rows stay in it; the next replay skips them
            print(f"detector audit: {self.spool}: cannot rewrite the spool ({e})", file=sys.stderr, flush=True)
        if rows:
            print(f"detector audit: {stored} deferred rows from {self.spool} now in {self.path}"
                  + (f", {len(left)} still pending (database locked)" if left else ""), file=sys.stderr, flush=True)
        return left

    def _read_spool(self) -> list[tuple[int, dict[str, Any]]] | None:
        """The spool's rows with their line numbers; None when there is no spool or it cannot be read
        (it is then left as it is). A bad line (half written when the service died) is reported and skipped."""
        try:
            lines = self.spool.read_bytes().split(b"\n")
        except FileNotFoundError:
            return None
        except OSError as e:
            print(f"detector audit: {self.spool}: cannot read the spool of deferred rows ({e}); left as it is",
                  file=sys.stderr, flush=True)
            return None
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("ascii"))   # json.dumps writes ASCII: any other byte is damage
                if not isinstance(row, dict) or not isinstance(row.get("request_id"), str):
                    raise ValueError("not a row with a request_id")
            except ValueError as e:
                print(f"detector audit: {self.spool}: line {n} unreadable ({e}), skipped: "
                      f"{line.decode('ascii', 'backslashreplace')!r}", file=sys.stderr, flush=True)
                continue
            rows.append((n, row))
        return rows

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def export_csv(audit: str | Path, out: str | Path, since: str | None = None) -> int:
    """Write the rows at or after `since` (ISO, UTC if naive) to a CSV, each with its latest outcome in the columns
    after COLUMNS (empty where none); returns the row count."""
    audit, out = Path(audit), Path(out)
    if any(_same_file(out, Path(f"{audit}{end}")) for end in ("", "-wal", "-shm", "-journal", SPOOL_SUFFIX)):
        # opening --out for writing would truncate the log of every verdict before a row is read
        raise FileExistsError(f"{out}: is the audit database itself; give --out a new .csv path")
    db = _reader(audit)
    try:
        where, params = _since(since)
        cols = ", ".join([*(f"v.{c}" for c in COLUMNS), "o.outcome", "o.time", "o.officer", "o.note"])
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS + OUTCOME_COLUMNS)
            for row in db.execute(f"SELECT {cols} FROM {_LATEST}{where} ORDER BY v.time, v.id", params):
                w.writerow(["" if v is None else v for v in row])
                n += 1
        return n
    finally:
        db.close()


SERVED = ("time", "model_sha256", "decision", "score", "outcome")   # what served_verdicts gives of each verdict


def served_verdicts(source: str | Path, since: str | None = None) -> list[dict[str, Any]]:
    """Each verdict at or after `since` as a dict of SERVED (score and outcome None where there is none), from an
    audit database or its `detector audit export` CSV (one written before outcomes were recorded has none).
    ValueError names the file if it is neither."""
    source = Path(source)
    with open(source, "rb") as f:
        head = f.read(16)
    if head == b"SQLite format 3\x00":
        db = _reader(source)
        try:
            where, params = _since(since)
            rows = db.execute(f"SELECT v.time, v.model_sha256, v.decision, v.score, o.outcome FROM {_LATEST}{where} "
                              "ORDER BY v.time, v.id", params).fetchall()
        finally:
            db.close()
        return [dict(zip(SERVED, r)) for r in rows]
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ())[:len(COLUMNS)] != COLUMNS:
            raise ValueError(f"{source}: neither an audit database nor a `detector audit export` CSV "
                             f"(its header must start with {', '.join(COLUMNS[:4])}, ...)")
        start = parse_time(since) if since else ""
        out = []
        for i, r in enumerate(reader, start=2):
            if r["time"] < start:
                continue
            try:
                score = float(r["score"]) if r["score"] else None
            except ValueError:
                raise ValueError(f"{source}: line {i}: score {r['score']!r} is not a number") from None
            out.append({"time": r["time"], "model_sha256": r["model_sha256"], "decision": r["decision"],
                        "score": score, "outcome": r.get("outcome") or None})
        return out


def summarise(audit: str | Path, since: str | None = None) -> dict[str, Any]:
    """The verdicts at or after `since` and their latest outcomes, for all and per model (first served first): how
    many, the INSPECT share, the hit rate of inspection (found among inspected trucks with an outcome, with its
    Wilson 95 % interval) and the misses (found among RELEASEd trucks that were checked anyway)."""
    db = _reader(Path(audit))
    try:
        where, params = _since(since)
        rows = db.execute(f"SELECT v.model_sha256, v.decision, o.outcome, COUNT(*), MIN(v.time), MAX(v.time) "
                          f"FROM {_LATEST}{where} GROUP BY 1, 2, 3 ORDER BY 5", params).fetchall()
    finally:
        db.close()
    models: dict[str, Counter] = {}
    for model, decision, outcome, n, _, _ in rows:
        models.setdefault(model or "", Counter())[decision, outcome] += n
    return {"audit": str(audit), "since": parse_time(since) if since else None,
            "first": min((r[4] for r in rows), default=None), "last": max((r[5] for r in rows), default=None),
            "all": _figures(sum(models.values(), Counter())),
            "models": [{"model_sha256": m, **_figures(c)} for m, c in models.items()]}


def _figures(tally: Counter) -> dict[str, Any]:
    """summarise's figures from a count of verdicts by (decision, latest outcome or None)."""
    n, inspect = sum(tally.values()), sum(k for (d, _), k in tally.items() if d == "INSPECT")
    found, clear = tally["INSPECT", "found"], tally["INSPECT", "clear"]
    checked = found + clear
    return {"verdicts": n, "inspect": inspect, "inspect_share": inspect / n if n else None,
            "outcomes": sum(k for (_, o), k in tally.items() if o is not None),
            "inspected_found": found, "inspected_clear": clear, "hit_rate": found / checked if checked else None,
            "hit_rate_interval": list(rate_interval(found, checked)) if checked else None,
            "released_checked": tally["RELEASE", "found"] + tally["RELEASE", "clear"],
            "released_found": tally["RELEASE", "found"]}


def format_summary(s: dict[str, Any]) -> str:
    """summarise's result as a table (a row per model where more than one served, then all of them) and a one-line
    summary. hits: found among INSPECTed trucks with an outcome; misses: found among RELEASEd trucks checked anyway."""
    a, since = s["all"], f" since {s['since']}" if s["since"] else ""
    if not a["verdicts"]:
        return f"no verdicts{since} in {s['audit']}"
    rows = [(m["model_sha256"][:12] or "?", m) for m in s["models"]]
    rows += [("all", a)] if len(rows) > 1 else []
    table = [("model", "verdicts", "INSPECT", "outcomes", "hits/checked", "hit rate", "95 % interval",
              "misses/checked")]
    table += [(name, str(f["verdicts"]), f"{f['inspect']} ({_pct(f['inspect_share'])})", str(f["outcomes"]),
               f"{f['inspected_found']}/{f['inspected_found'] + f['inspected_clear']}", _pct(f["hit_rate"]),
               _interval(f), f"{f['released_found']}/{f['released_checked']}") for name, f in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    hit = (f"hit rate {_pct(a['hit_rate'])} ({a['inspected_found']} found of "
           f"{a['inspected_found'] + a['inspected_clear']} inspected, 95 % {_interval(a)})"
           if a["hit_rate"] is not None else "no inspected truck has an outcome yet")
    lines += ["", f"{a['verdicts']} verdicts{since} ({s['first']} to {s['last']}), {_pct(a['inspect_share'])} INSPECT; "
                  f"{a['outcomes']} with an outcome: {hit}; misses: {a['released_found']} found of "
                  f"{a['released_checked']} released trucks checked <- {s['audit']}"]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _interval(figures: dict[str, Any]) -> str:
    lo_hi = figures["hit_rate_interval"]
    return "-" if lo_hi is None else f"{_pct(lo_hi[0])} - {_pct(lo_hi[1])}"


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


def _check_outcome(request_id: Any, outcome: Any, officer: Any, note: Any) -> None:
    """OutcomeError unless the fields can be stored as given (nothing is cut short or coerced)."""
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise OutcomeError(f"request_id must be the request_id of a served verdict, got {str(request_id)[:60]!r}")
    if outcome not in OUTCOMES:
        raise OutcomeError(f"outcome must be one of {', '.join(OUTCOMES)}, got {str(outcome)[:60]!r}")
    for name, text, most in (("officer", officer, MAX_OFFICER), ("note", note, MAX_NOTE)):
        if text is None:
            continue
        if not isinstance(text, str):
            raise OutcomeError(f"{name} must be text, got {type(text).__name__}")
        if len(text) > most:
            raise OutcomeError(f"{name} is {len(text)} characters long; at most {most}")
        try:   # "\ud800" parses from JSON, but cannot be stored as UTF-8
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise OutcomeError(f"{name} holds an unpaired \\u surrogate escape (not valid Unicode text)") from None


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file a path names now; None where it names none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a nearly full disk may take part of it, then refuse)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    """fsync a folder, so a file created, replaced or removed in it stays so after a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links or another spelling)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def main(args) -> int:
    """CLI entry: `detector audit export [--audit audit.sqlite] [--since T] --out audit.csv`, or
    `detector audit summary [--audit audit.sqlite] [--since T] [--json]`."""
    if args.action not in ("export", "summary"):
        print(f"detector audit: unknown action {args.action!r}", file=sys.stderr)
        return 2
    summary = args.action == "summary"
    as_json = getattr(args, "json", False)
    if (args.out is None) != summary or (as_json and not summary):   # an option the action would ignore
        print("detector audit: export writes --out (a .csv); summary prints, as a table or with --json",
              file=sys.stderr)
        return 2
    try:
        result = summarise(args.audit, args.since) if summary else export_csv(args.audit, args.out, args.since)
    except FileNotFoundError as e:
        print(f"detector audit: {e}", file=sys.stderr)
        return 1
    except FileExistsError as e:
        print(f"detector audit: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"detector audit: --since {args.since!r} is not an ISO date/time ({e})", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as e:
        print(f"detector audit: {args.audit}: not a readable audit database ({e})", file=sys.stderr)
        return 1
    if summary:
        print(json.dumps(result, indent=2) if as_json else format_summary(result))
        return 0
    since = f" since {parse_time(args.since)}" if args.since else ""
    print(f"exported {result} verdicts{since} from {args.audit} -> {args.out}")
    return 0

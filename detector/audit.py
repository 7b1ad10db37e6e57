"""Durable audit log of served verdicts (SQLite, WAL, synchronous=FULL); detector.audit_report reads it.

Every verdict the service answers is committed here before the answer leaves, so after a crash or
power loss each answered request has its row. WAL keeps readers (the export) off the writer's back.
The one exception: a database locked by another writer past the request's deadline. The truck is then
answered INSPECT at once, and its row (saying so) is first appended, fsync'ed, to the spool beside the
database (`<audit>.pending.jsonl`, JSON lines), then retried until committed (see serve.Service._audit).
The spool is rewritten without the rows committed (a service takes out only its own: two lanes' services on one
database share it, and an flock on `<spool>.lock` keeps their writes apart); opening the log commits what an earlier run
left in it, and a running service the rows a stopped lane left there (commit_spooled; by request_id, so a row committed
just before a crash, or by both lanes, is not stored twice). Where the spool
cannot be written either (disk full), the row is kept in memory and logged to stderr in full.

Beside the verdicts, the `outcomes` table records what the manual inspection of a truck found (`found`: contraband
or undeclared goods, `clear`: nothing), so a site can measure the routing's hit rate and collect its own labelled
scans. It is append-only (triggers refuse UPDATE and DELETE): a correction is a new row; a request's latest counts.
The `shadow_verdicts` table holds a candidate model's verdicts on the same trucks (serve --shadow, serve_shadow).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

try:
    import fcntl
except ImportError:   # Windows: one service per audit log
    fcntl = None

COLUMNS = ("time", "request_id", "vehicle_id", "container_id", "file_name", "file_sha256", "file_bytes",
           "model_sha256", "model_version", "score", "threshold", "tier", "decision", "reason",
           "latency_ms", "risk_flags")
OUTCOME_COLUMNS = ("outcome", "outcome_time", "officer", "outcome_note")   # the export's, after COLUMNS
# verdict columns added since (nullable; an older database gains them at open), exported after OUTCOME_COLUMNS so an
# older export still reads. untagged_pitch_mm: the pitch a file that carries none was read at (serve --pitch-mm, else
# the bundle's), NULL where the file had its own; `detector calibrate` gives it to the site bundle. score_rule: how the
# score was made (bundle.LOGITS_RULE or OUTPUT_RULE; NULL without a score, or in rows written before it was recorded):
# `detector calibrate` takes only scores of the rule the bundle is served with
LATER_COLUMNS = {"untagged_pitch_mm": "REAL", "score_rule": "TEXT"}
# manual inspection found contraband or undeclared goods / found nothing (the outcomes table's CHECK names them too)
OUTCOMES = ("found", "clear")
MAX_OFFICER, MAX_NOTE = 200, 2000   # characters; longer is refused, not cut short
BUSY_TIMEOUT_S = 30   # how long a write waits for a lock held by another connection, unless told otherwise
SPOOL_SUFFIX = ".pending.jsonl"   # beside the database: rows answered but not yet committed
MOUNTS = "/proc/self/mounts"   # Linux: device, mount point, filesystem type per line
# filesystems whose locks and shared memory are not coherent between hosts: SQLite's WAL (its index is shared memory)
# is safe there only while every process using the database runs on one host
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "davfs",
              "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.s3fs", "fuse.rclone")
REPLAY_WAIT_S = 1.0   # at open, how long replaying the spool waits for a locked database (the rest stays spooled)
# a candidate model's verdicts on the trucks the live one routed (serve --shadow): request_id names the live verdict;
# regions a JSON list as in the answer, error the candidate's own failure, untagged_pitch_mm and score_rule as in
# verdicts (what `detector calibrate --model CANDIDATE` needs). Never spooled: see serve_shadow
SHADOW_COLUMNS = ("time", "request_id", "model_sha256", "score", "decision", "threshold", "regions", "latency_ms",
                  "error", "untagged_pitch_mm", "score_rule")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL UNIQUE, vehicle_id TEXT, container_id TEXT,
    file_name TEXT, file_sha256 TEXT, file_bytes INTEGER, model_sha256 TEXT, model_version TEXT,
    score REAL, threshold REAL, tier TEXT, decision TEXT NOT NULL, reason TEXT, latency_ms REAL,
    risk_flags TEXT, untagged_pitch_mm REAL, score_rule TEXT);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts(time);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL, outcome TEXT NOT NULL CHECK (outcome IN ('found', 'clear')),
    officer TEXT, note TEXT);
CREATE INDEX IF NOT EXISTS outcomes_request ON outcomes(request_id, id);
CREATE TABLE IF NOT EXISTS shadow_verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL, model_sha256 TEXT NOT NULL, score REAL, decision TEXT NOT NULL,
    threshold REAL, regions TEXT, latency_ms REAL, error TEXT, untagged_pitch_mm REAL, score_rule TEXT,
    UNIQUE (request_id, model_sha256));
CREATE TRIGGER IF NOT EXISTS outcomes_no_update BEFORE UPDATE ON outcomes
    BEGIN SELECT RAISE(ABORT, 'outcomes are append-only: record a correction as a new row'); END;
CREATE TRIGGER IF NOT EXISTS outcomes_no_delete BEFORE DELETE ON outcomes
    BEGIN SELECT RAISE(ABORT, 'outcomes are append-only: record a correction as a new row'); END;
"""


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
            self._add_later_columns()
        except sqlite3.Error as e:   # sqlite's own message ("unable to open database file") names no file
            if self._db is not None:
                self._db.close()
            raise type(e)(f"{self.path}: cannot open the audit log ({e})") from None
        self.spool = Path(f"{self.path}{SPOOL_SUFFIX}")
        self.spool_lock = Path(f"{self.spool}.lock")   # flock'ed by every process writing the spool; never removed
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

    def _add_later_columns(self) -> None:
        """Give a database written before LATER_COLUMNS existed those columns (NULL in its rows), once. Only such a
        database takes the write lock (a locked one is waited for as a verdict is); the columns are looked for again
        under it, so a second process opening it at the same moment finds them added, not a duplicate."""
        if not missing_columns(self._db):
            return
        with self._transaction(None) as db:
            for name in missing_columns(db):
                db.execute(f"ALTER TABLE verdicts ADD COLUMN {name} {LATER_COLUMNS[name]}")

    def write(self, record: dict[str, Any], wait_s: float | None = None, replay: bool = False) -> bool:
        """Insert one verdict and commit (durable on return); True when stored, False for a `replay` row already there.
        A database locked by another connection is waited for up to `wait_s` (default BUSY_TIMEOUT_S), then
        sqlite3.OperationalError("database is locked"). `replay`: a deferred row that may already be stored (committed
        before a crash, or by another lane's service from the shared spool) is skipped, not an error."""
        row = dict(record)
        row.setdefault("time", utc_now())
        if not isinstance(row.get("risk_flags"), (str, type(None))):
            row["risk_flags"] = json.dumps(list(row["risk_flags"]))
        names = COLUMNS + tuple(LATER_COLUMNS)
        values = [row.get(c) for c in names]
        sql = f"INSERT INTO verdicts ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        if replay:   # not OR IGNORE: that would also drop a row breaking NOT NULL, silently
            sql += " ON CONFLICT(request_id) DO NOTHING"
        with self._transaction(wait_s) as db:
            return db.execute(sql, values).rowcount == 1

    def write_shadow(self, rows: list[dict[str, Any]], wait_s: float = 0.0) -> int:
        """Insert a candidate model's verdicts (SHADOW_COLUMNS) in one commit; returns how many were new (a row
        already stored for its request and model is skipped). Waits `wait_s` for a lock (default none: a live row may
        be queued behind it), then sqlite3.OperationalError as write() does."""
        sql = (f"INSERT INTO shadow_verdicts ({', '.join(SHADOW_COLUMNS)}) VALUES "
               f"({', '.join('?' * len(SHADOW_COLUMNS))}) ON CONFLICT(request_id, model_sha256) DO NOTHING")
        with self._transaction(wait_s) as db:
            return sum(db.execute(sql, [r.get(c) for c in SHADOW_COLUMNS]).rowcount for r in rows)

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

    @contextmanager
    def _spool_locked(self) -> Iterator[None]:
        """The spool to itself: this process's threads by the lock, other processes (two lanes' services on one audit
        log share its spool) by an flock on `<spool>.lock`, where the platform has flock."""
        with self._lock:
            if fcntl is None:
                yield
                return
            fd = os.open(self.spool_lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)   # releases the flock

    def spool_append(self, record: dict[str, Any]) -> None:
        """Append a row not yet committed to the spool and fsync it (durable on return); OSError if it cannot be."""
        line = (json.dumps(record) + "\n").encode()
        with self._spool_locked():
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

    def spool_update(self, done: set[str], queued: Iterable[dict[str, Any]] = (), drop_unreadable: bool = False) -> None:
        """Take the rows `done` names (committed, or never storable) out of the spool and add those of `queued` it lacks
        (kept in memory only when an append failed), atomically; removed when empty. Rows other processes spooled stay:
        rewriting it to this process's queue erased the rows a stopped lane had left there. Left as it is when nothing
        would change (a retry while the database stays locked: no rewrite, no fsync, every 0.5 s). OSError if it
        cannot be."""
        tmp = self.spool.with_name(self.spool.name + ".tmp")
        with self._spool_locked():
            lines = self._spool_lines()
            kept, held = [], set()
            for _, line, row in lines:
                if row is None and drop_unreadable:
                    continue
                if row is None or row["request_id"] not in done:
                    kept.append(line)
                    held |= {row["request_id"]} if row else set()
            kept += [json.dumps(r).encode() for r in queued if r["request_id"] not in held | done]
            if kept and kept == [line for _, line, _ in lines]:
                return
            try:
                if kept:
                    with open(tmp, "wb") as f:
                        f.write(b"".join(line + b"\n" for line in kept))
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.spool)
                else:
                    self.spool.unlink(missing_ok=True)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.spool.parent)

    def spooled(self, request_id: str) -> bool:
        """Whether the spool holds a row for `request_id` (answered by this or another service on this log, not yet
        committed); False where there is none or it cannot be read."""
        if not self.spool.exists():
            return False
        try:
            with self._spool_locked():
                return any(row and row["request_id"] == request_id for _, _, row in self._spool_lines())
        except OSError:
            return False

    def _replay_spool(self) -> list[dict[str, Any]]:
        """Commit the rows an earlier run left in the spool, oldest first; returns those the still locked
        database refused (they stay spooled). Unreadable lines and rows are reported on stderr and dropped."""
        if not self.spool.exists():   # the usual start: no lock file made
            return []
        stored, left = self.commit_spooled(wait_s=REPLAY_WAIT_S)
        if stored or left:
            print(f"detector audit: {stored} deferred rows from {self.spool} now in {self.path}"
                  + (f", {len(left)} still pending (database locked)" if left else ""), file=sys.stderr, flush=True)
        return left

    def commit_spooled(self, held: Collection[str] = (), wait_s: float = REPLAY_WAIT_S,
                       budget_s: float | None = None) -> tuple[int, list[dict[str, Any]]]:
        """Commit the spool's rows but those `held` (queued in the caller's memory: it commits them itself), oldest
        first, until the database refuses one (still locked) or `budget_s` is spent; take the rows done out of the
        spool. Returns (rows stored, rows left). By request_id: a row already stored (by the lane that spooled it, which
        may still be retrying it, or by another) is taken out, never stored twice. Unreadable lines are reported on
        stderr and dropped; so is a row that can never be stored, in full."""
        try:
            with self._spool_locked():
                rows = self._read_spool()
        except OSError as e:   # the lock file cannot be made: a read-only folder, which the database's WAL refuses too
            print(f"detector audit: {self.spool}: cannot read the spool of deferred rows ({e}); left as it is",
                  file=sys.stderr, flush=True)
            return 0, []
        if rows is None:
            return 0, []
        rows = [(n, row) for n, row in rows if row["request_id"] not in held]
        until = None if budget_s is None else time.monotonic() + budget_s
        done, stored = self._commit_rows(rows, wait_s, until)
        left = [row for _, row in rows if row["request_id"] not in done]
        try:   # only the rows done leave it: another lane's service may have spooled more meanwhile
            self.spool_update(done, drop_unreadable=True)
        except OSError as e:   # committed rows stay in it; the next replay skips them
            print(f"detector audit: {self.spool}: cannot rewrite the spool ({e})", file=sys.stderr, flush=True)
        return stored, left

    def _commit_rows(self, rows: list[tuple[int, dict[str, Any]]], wait_s: float,
                     until: float | None) -> tuple[set[str], int]:
        """Commit spooled (line, row)s in order until the database refuses one or the monotonic time `until` has
        passed; returns the request_ids done (committed, already stored, or never storable) and how many were stored."""
        done: set[str] = set()
        stored = 0
        for n, row in rows:
            if done and until is not None and time.monotonic() > until:   # one row at least: progress each time
                break
            try:
                stored += self.write(row, wait_s=wait_s, replay=True)
            except sqlite3.OperationalError:   # still locked: a later retry commits it
                break
            except (sqlite3.Error, ValueError, TypeError) as e:   # would fail every time: say so, keep going
                print(f"detector audit: {self.spool}: line {n}: row not stored ({e}): {json.dumps(row)}",
                      file=sys.stderr, flush=True)
            done.add(row["request_id"])
        return done, stored

    def _read_spool(self) -> list[tuple[int, dict[str, Any]]] | None:
        """The spool's rows with their line numbers; None when there is no spool or it cannot be read
        (it is then left as it is). A bad line (half written when the service died) is reported and skipped."""
        if not self.spool.exists():
            return None
        try:
            lines = self._spool_lines()
        except OSError as e:
            print(f"detector audit: {self.spool}: cannot read the spool of deferred rows ({e}); left as it is",
                  file=sys.stderr, flush=True)
            return None
        rows = []
        for n, line, row in lines:
            if row is None:
                why = _spool_row(line)[1]
                print(f"detector audit: {self.spool}: line {n} unreadable ({why}), skipped: "
                      f"{line.decode('ascii', 'backslashreplace')!r}", file=sys.stderr, flush=True)
                continue
            rows.append((n, row))
        return rows

    def _spool_lines(self) -> list[tuple[int, bytes, dict[str, Any] | None]]:
        """(line number, bytes, row or None where unreadable) of each non-blank line of the spool; [] when there is
        none. OSError when it cannot be read."""
        try:
            lines = self.spool.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        return [(n, line, _spool_row(line)[0]) for n, line in enumerate(lines, 1) if line.strip()]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


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


def missing_columns(db: sqlite3.Connection) -> list[str]:
    """The LATER_COLUMNS a database's verdicts table lacks (written before they existed)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(verdicts)")}
    return [c for c in LATER_COLUMNS if c not in have]


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file a path names now; None where it names none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def network_filesystem(path: str | Path) -> str | None:
    """The type of the network filesystem (nfs4, cifs, ...) a database path lies on; None on a local one or where the
    mount table cannot be read (not Linux). SQLite's WAL and locks are not safe across hosts on such a share."""
    folder = os.path.realpath(Path(path).parent)
    try:
        with open(MOUNTS, encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    best, kind = "", None
    for point, fs in mounts:
        point = point.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if (folder == point or folder.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fs
    return kind if kind in NETWORK_FS else None


def _spool_row(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the row, None) for a spool line that is one, else (None, why): half written when a service died, damaged."""
    try:
        row = json.loads(line.decode("ascii"))   # json.dumps writes ASCII: any other byte is damage
    except ValueError as e:
        return None, str(e)
    if not isinstance(row, dict) or not isinstance(row.get("request_id"), str):
        return None, "not a row with a request_id"
    return row, None


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

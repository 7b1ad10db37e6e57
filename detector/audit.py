"""Durable audit log of served verdicts (SQLite, WAL, synchronous=FULL) and its CSV export.

Every verdict the service answers is committed here before the answer leaves, so after a crash or
power loss each answered request has its row. WAL keeps readers (the export) off the writer's back.
The one exception: a database locked by another writer past the request's deadline. The truck is then
answered INSPECT at once and its row (saying so) is queued in memory and retried until written; it is
also logged to stderr in full, the only copy if the service dies first (see serve.Service._audit).
"""
from __future__ import annotations

import csv
import json
import sqlite3
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

COLUMNS = ("time", "request_id", "vehicle_id", "container_id", "file_name", "file_sha256", "file_bytes",
           "model_sha256", "model_version", "score", "threshold", "tier", "decision", "reason",
           "latency_ms", "risk_flags")
BUSY_TIMEOUT_S = 30   # how long a write waits for a lock held by another connection, unless told otherwise

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL UNIQUE, vehicle_id TEXT, container_id TEXT,
    file_name TEXT, file_sha256 TEXT, file_bytes INTEGER, model_sha256 TEXT, model_version TEXT,
    score REAL, threshold REAL, tier TEXT, decision TEXT NOT NULL, reason TEXT, latency_ms REAL,
    risk_flags TEXT);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts(time);
"""


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
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_S)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot switch to WAL journal (got {mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync at every commit: a row answered is a row kept
        self._db.executescript(_SCHEMA)

    def write(self, record: dict[str, Any], wait_s: float | None = None) -> None:
        """Insert one verdict and commit (durable on return). A database locked by another connection is
        waited for up to `wait_s` (default BUSY_TIMEOUT_S), then sqlite3.OperationalError("database is locked")."""
        row = dict(record)
        row.setdefault("time", utc_now())
        if not isinstance(row.get("risk_flags"), (str, type(None))):
            row["risk_flags"] = json.dumps(list(row["risk_flags"]))
        values = [row.get(c) for c in COLUMNS]
        sql = f"INSERT INTO verdicts ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._lock:
            if wait_s is not None:
                self._db.execute(f"PRAGMA busy_timeout={max(0, int(wait_s * 1000))}")
            try:
                self._db.execute("BEGIN IMMEDIATE")   # the only step that waits for another connection's lock
                try:
                    self._db.execute(sql, values)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:   # a failed COMMIT too: else every later BEGIN fails
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if wait_s is not None:
                    self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def export_csv(audit: str | Path, out: str | Path, since: str | None = None) -> int:
    """Write the rows at or after `since` (ISO, UTC if naive) to a CSV; returns the row count."""
    audit, out = Path(audit), Path(out)
    if not audit.is_file():
        raise FileNotFoundError(f"{audit}: no audit database (run `detector serve` first, or pass --audit)")
    if any(_same_file(out, Path(f"{audit}{end}")) for end in ("", "-wal", "-shm", "-journal")):
        # opening --out for writing would truncate the log of every verdict before a row is read
        raise FileExistsError(f"{out}: is the audit database itself; give --out a new .csv path")
    db = sqlite3.connect(str(audit), timeout=30)
    try:
        sql, params = f"SELECT {', '.join(COLUMNS)} FROM verdicts", []
        if since:
            sql += " WHERE time >= ?"
            params.append(parse_time(since))
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for row in db.execute(sql + " ORDER BY time, id", params):
                w.writerow(["" if v is None else v for v in row])
                n += 1
        return n
    finally:
        db.close()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links or another spelling)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def main(args) -> int:
    """CLI entry: `detector audit export [--audit audit.sqlite] [--since T] --out audit.csv`."""
    if args.action != "export":
        print(f"detector audit: unknown action {args.action!r}", file=sys.stderr)
        return 2
    try:
        n = export_csv(args.audit, args.out, args.since)
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
    since = f" since {parse_time(args.since)}" if args.since else ""
    print(f"exported {n} verdicts{since} from {args.audit} -> {args.out}")
    return 0

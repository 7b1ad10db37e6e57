"""Audit log: durable WAL settings, one row per verdict, CSV export with --since."""
import csv
import json
import sqlite3
from argparse import Namespace

import pytest

from detector import audit
from detector.audit import AuditLog, export_csv, parse_time


def _row(rid: str, time: str, decision: str = "RELEASE") -> dict:
    return {"time": time, "request_id": rid, "vehicle_id": "V", "container_id": "C", "file_sha256": "ab" * 32,
            "model_sha256": "cd" * 32, "model_version": "1", "score": 0.1, "threshold": 0.4, "tier": "standard",
            "decision": decision, "reason": "score 0.1 < threshold 0.4", "latency_ms": 12.5,
            "risk_flags": ["intel_hit"]}


@pytest.fixture
def log(tmp_path):
    db = AuditLog(tmp_path / "audit.sqlite")
    db.write(_row("r1", "2026-11-01T08:00:00.000+00:00"))
    db.write(_row("r2", "2026-11-02T08:00:00.000+00:00", "INSPECT"))
    db.write(_row("r3", "2026-11-03T08:00:00.000+00:00"))
    yield db
    db.close()


def test_durable_settings_and_unique_ids(log):
    assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(sqlite3.IntegrityError):
        log.write(_row("r1", "2026-11-04T08:00:00.000+00:00"))
    other = sqlite3.connect(str(log.path))  # committed rows are visible to a second reader at once
    assert other.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 3
    other.close()


def test_export_since(log, tmp_path):
    out = tmp_path / "all.csv"
    assert export_csv(log.path, out) == 3
    rows = list(csv.DictReader(out.open()))
    assert [r["request_id"] for r in rows] == ["r1", "r2", "r3"]
    assert rows[1]["decision"] == "INSPECT" and rows[0]["risk_flags"] == '["intel_hit"]'
    assert export_csv(log.path, out, since="2026-11-02") == 2
    assert [r["request_id"] for r in csv.DictReader(out.open())] == ["r2", "r3"]
    # a zone-aware --since is compared in UTC: 09:00+02:00 is 07:00Z, before r3's 08:00Z
    assert export_csv(log.path, out, since="2026-11-03T09:00+02:00") == 1


def test_cli_export(log, tmp_path, capsys):
    out = tmp_path / "x.csv"
    assert audit.main(Namespace(action="export", audit=str(log.path), since="2026-11-03", out=str(out))) == 0
    assert "exported 1 verdicts" in capsys.readouterr().out
    assert audit.main(Namespace(action="export", audit=str(log.path), since="yesterday", out=str(out))) == 2
    missing = tmp_path / "none.sqlite"
    assert audit.main(Namespace(action="export", audit=str(missing), since=None, out=str(out))) == 1
    assert not missing.exists()  # export never creates an empty database


def test_parse_time():
    assert parse_time("2026-11-28") == "2026-11-28T00:00:00.000+00:00"
    assert parse_time("2026-11-28T10:00Z") == "2026-11-28T10:00:00.000+00:00"
    with pytest.raises(ValueError):
        parse_time("28/11/2026")


def test_export_never_overwrites_the_log(log, tmp_path, monkeypatch, capsys):
    # `--out audit.sqlite` truncated the database to a CSV header: every verdict's record gone
    monkeypatch.chdir(tmp_path)
    for out in ("audit.sqlite", "./sub/../audit.sqlite", "audit.sqlite-wal", "audit.sqlite.pending.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert audit.main(Namespace(action="export", audit="audit.sqlite", since=None, out=out)) == 2
        assert "is the audit database itself" in capsys.readouterr().err
    (tmp_path / "link.csv").symlink_to(tmp_path / "audit.sqlite")
    with pytest.raises(FileExistsError):
        export_csv(log.path, tmp_path / "link.csv")
    assert log.count() == 3 and export_csv(log.path, tmp_path / "ok.csv") == 3


def test_spool_with_a_truncated_last_line_is_replayed(tmp_path, capsys):
    # a crash in the middle of appending a deferred row left half a line; the service must still start
    db = tmp_path / "audit.sqlite"
    spool = tmp_path / "audit.sqlite.pending.jsonl"
    good = [_row("s1", "2026-11-01T08:00:00.000+00:00", "INSPECT"), _row("s2", "2026-11-01T08:00:01.000+00:00")]
    spool.write_text("".join(json.dumps(r) + "\n" for r in good) + json.dumps(_row("s3", "x"))[:40])
    log = AuditLog(db)
    try:
        assert log.count() == 2 and log.recovered == []
        assert [r[0] for r in log._db.execute("SELECT request_id FROM verdicts ORDER BY id")] == ["s1", "s2"]
    finally:
        log.close()
    err = capsys.readouterr().err
    assert f"{spool}: line 3" in err and '"request_id": "s3"' in err
    assert not spool.exists()
    again = AuditLog(db)   # nothing replayed twice
    assert again.count() == 2
    again.close()

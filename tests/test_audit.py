"""Audit log: durable WAL settings, one row per verdict, CSV export with --since."""
import csv
import json
import sqlite3
from argparse import Namespace

import pytest

from detector import audit, audit_report
from detector.audit import AuditLog, parse_time
from detector.audit_report import export_csv
from detector.calibration import rate_interval


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
    assert audit_report.main(Namespace(action="export", audit=str(log.path), since="2026-11-03", out=str(out))) == 0
    assert "exported 1 verdicts" in capsys.readouterr().out
    assert audit_report.main(Namespace(action="export", audit=str(log.path), since="yesterday", out=str(out))) == 2
    assert "--since 'yesterday' is not an ISO date/time" in capsys.readouterr().err
    missing = tmp_path / "none.sqlite"
    assert audit_report.main(Namespace(action="export", audit=str(missing), since=None, out=str(out))) == 2
    assert not missing.exists()  # export never creates an empty database


@pytest.mark.parametrize("action, out", [("summary", None), ("export", "x.csv")])
def test_an_audit_database_that_is_missing_or_no_database_exits_2_as_other_input_errors(tmp_path, monkeypatch,
                                                                                         capsys, action, out):
    """`detector audit summary` where no audit.sqlite exists (the wrong folder, --audit not given) exited 1, where
    every other verb exits 2 for an input it cannot use (a missing results file, model or dataset); 1 is for a job
    that ran and failed. A file that is no SQLite database is such an input too."""
    monkeypatch.chdir(tmp_path)
    args = dict(action=action, since=None, out=out, json=False)
    assert audit_report.main(Namespace(audit="audit.sqlite", **args)) == 2
    assert capsys.readouterr().err == ("detector audit: audit.sqlite: no audit database (run `detector serve` first, "
                                       "or pass --audit)\n")
    (tmp_path / "notes.sqlite").write_text("not a database\n")
    assert audit_report.main(Namespace(audit="notes.sqlite", **args)) == 2
    assert "notes.sqlite: not a readable audit database" in capsys.readouterr().err
    assert not (tmp_path / "audit.sqlite").exists() and not (tmp_path / "x.csv").exists()


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
        assert audit_report.main(Namespace(action="export", audit="audit.sqlite", since=None, out=out)) == 2
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


def test_committing_the_spool_skips_held_rows_and_stores_none_twice(tmp_path):
    # a running service commits the rows another lane left in the shared spool; the rows it queues itself it commits
    # in its own order, and a row the other lane committed meanwhile is taken out, not stored again
    log = AuditLog(tmp_path / "audit.sqlite")
    rows = [_row(f"s{i}", f"2026-11-01T08:00:0{i}.000+00:00", "INSPECT") for i in range(3)]
    assert log.write(rows[0]) is True and log.write(rows[0], replay=True) is False
    log.spool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        assert log.commit_spooled(held={"s2"}, wait_s=0.1) == (1, [])   # s0 already stored, s1 stored, s2 held
        assert [r["request_id"] for r in map(json.loads, log.spool.read_text().splitlines())] == ["s2"]
        assert [r[0] for r in log._db.execute("SELECT request_id FROM verdicts ORDER BY id")] == ["s0", "s1"]
        assert log.commit_spooled(wait_s=0.1) == (1, []) and not log.spool.exists() and log.count() == 3
    finally:
        log.close()


def test_a_spool_nothing_left_is_not_rewritten_at_each_retry(tmp_path, monkeypatch, capsys):
    # a running service retries another lane's spooled rows every 0.5 s; while the database stays locked none leaves
    # the spool, which was rewritten all the same (two fsyncs under the lock the other lane's appends wait for), and
    # where it could not be (a full disk) each retry said so on stderr
    log = AuditLog(tmp_path / "audit.sqlite")
    log.spool_append(_row("other-lane", "2026-11-01T08:00:00.000+00:00", "INSPECT"))
    before = log.spool.stat()
    other = sqlite3.connect(str(log.path), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert log.commit_spooled(wait_s=0.01, budget_s=0.1) == (0, [json.loads(log.spool.read_text())])
        after = log.spool.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

        def full(*_):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(audit.os, "replace", full)
        for _ in range(3):
            assert log.commit_spooled(wait_s=0.01, budget_s=0.1)[0] == 0
        assert "cannot rewrite the spool" not in capsys.readouterr().err
        monkeypatch.undo()
        other.execute("ROLLBACK")
        assert log.commit_spooled(wait_s=0.1) == (1, []) and not log.spool.exists() and log.count() == 1
    finally:
        other.close()
        log.close()


def _outcomes(db) -> list[tuple]:
    return db.execute("SELECT request_id, outcome, officer, note FROM outcomes ORDER BY id").fetchall()


def test_outcomes_export_with_the_latest_per_request(log, tmp_path):
    first = log.record_outcome("r2", "clear", officer="K. Osei")
    assert first["decision"] == "INSPECT" and first["outcome"] == "clear" and first["time"]
    fixed = log.record_outcome("r2", "found", officer="K. Osei", note="cigarettes behind the front wall; was 'clear'")
    assert fixed["time"] >= first["time"]
    log.record_outcome("r1", "found", note="random check")
    out = tmp_path / "out.csv"
    assert export_csv(log.path, out) == 3
    with out.open() as f:
        assert next(csv.reader(f)) == list(audit.COLUMNS) + ["outcome", "outcome_time", "officer", "outcome_note",
                                                             "untagged_pitch_mm", "score_rule"]
    rows = {r["request_id"]: r for r in csv.DictReader(out.open())}
    assert (rows["r2"]["outcome"], rows["r2"]["officer"], rows["r2"]["outcome_time"]) == ("found", "K. Osei",
                                                                                          fixed["time"])
    assert rows["r2"]["outcome_note"].startswith("cigarettes") and rows["r2"]["decision"] == "INSPECT"
    assert (rows["r1"]["outcome"], rows["r1"]["officer"], rows["r1"]["outcome_note"]) == ("found", "", "random check")
    assert [rows["r3"][c] for c in ("outcome", "outcome_time", "officer", "outcome_note")] == ["", "", "", ""]
    # the correction is a new row: the audit trail keeps what was recorded first, and refuses to lose it
    assert _outcomes(log._db) == [("r2", "clear", "K. Osei", None), ("r2", "found", "K. Osei", fixed["note"]),
                                  ("r1", "found", None, "random check")]
    for sql in ("UPDATE outcomes SET outcome = 'clear'", "DELETE FROM outcomes"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            log._db.execute(sql)
    assert len(_outcomes(log._db)) == 3


@pytest.mark.parametrize("args, error, match", [
    (("r9", "found"), "UnknownRequest", "no verdict with request_id 'r9'"),
    (("r1", "seized"), "OutcomeError", "outcome must be one of found, clear, got 'seized'"),
    (("r1", "Found"), "OutcomeError", "outcome must be one of"),
    (("r1", "clear", "x" * 201), "OutcomeError", "officer is 201 characters long; at most 200"),
    (("r1", "clear", None, "n" * 2001), "OutcomeError", "note is 2001 characters long; at most 2000"),
    (("r1", "clear", 7), "OutcomeError", "officer must be text"),
    (("r1", "clear", None, "\ud800"), "OutcomeError", "surrogate"),
    ((None, "clear"), "OutcomeError", "request_id must be"),
], ids=["unknown-request", "unknown-outcome", "case", "long-officer", "long-note", "officer-number", "surrogate",
        "no-request"])
def test_record_outcome_refuses_what_it_cannot_store_as_given(log, args, error, match):
    with pytest.raises(getattr(audit, error), match=match):
        log.record_outcome(*args)
    assert _outcomes(log._db) == []
    assert log.record_outcome("r1", "clear", "x" * 200, "n" * 2000)["outcome"] == "clear"   # the bounds themselves


# the schema of the audit log before outcomes were recorded (622a288): a station's database written by it
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, request_id TEXT NOT NULL UNIQUE, vehicle_id TEXT, container_id TEXT,
    file_name TEXT, file_sha256 TEXT, file_bytes INTEGER, model_sha256 TEXT, model_version TEXT,
    score REAL, threshold REAL, tier TEXT, decision TEXT NOT NULL, reason TEXT, latency_ms REAL,
    risk_flags TEXT);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts(time);
"""


def _old_database(path, score: float, decision: str):
    """A station's database of OLD_SCHEMA holding one verdict, request_id 'old1'."""
    old = sqlite3.connect(str(path), isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO verdicts (time, request_id, model_sha256, score, decision, reason) VALUES "
                "('2026-11-01T08:00:00.000+00:00', 'old1', 'ab', ?, ?, 'old')", (score, decision))
    old.close()
    return path


def test_database_of_the_old_schema_opens_unchanged_and_gains_outcomes(tmp_path):
    path = _old_database(tmp_path / "old.sqlite", 0.7, "INSPECT")
    # exported and summarised as it is: no outcomes, and nothing written to a log a service may be serving from
    assert export_csv(path, tmp_path / "before.csv") == 1
    assert next(csv.DictReader((tmp_path / "before.csv").open()))["outcome"] == ""
    assert audit_report.summarise(path)["all"]["outcomes"] == 0
    peek = sqlite3.connect(str(path))
    assert peek.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'outcomes'").fetchone()[0] == 0
    before = peek.execute(f"SELECT id, {', '.join(audit.COLUMNS)} FROM verdicts").fetchall()
    peek.close()
    log = AuditLog(path)
    try:
        assert log._db.execute(f"SELECT id, {', '.join(audit.COLUMNS)} FROM verdicts").fetchall() == before
        assert log.record_outcome("old1", "found")["decision"] == "INSPECT"
        log.write(_row("new1", "2026-11-02T08:00:00.000+00:00"))
    finally:
        log.close()
    assert export_csv(path, tmp_path / "after.csv") == 2
    assert [r["outcome"] for r in csv.DictReader((tmp_path / "after.csv").open())] == ["found", ""]


def test_a_database_without_the_pitch_column_keeps_its_rows_and_gains_it(tmp_path):
    """The pitch an untagged file was read at (serve --pitch-mm) is a column added since: a station's database
    written before it is exported, summarised and calibrated on as it is (the pitch unknown), and the service's
    open adds the column (ALTER TABLE, rows kept, once) so its new rows record it."""
    path = _old_database(tmp_path / "old.sqlite", 0.2, "RELEASE")
    assert export_csv(path, tmp_path / "before.csv") == 1
    assert next(csv.DictReader((tmp_path / "before.csv").open()))["untagged_pitch_mm"] == ""
    assert audit_report.summarise(path)["all"]["verdicts"] == 1
    assert [r["pitch_mm"] for r in audit_report.served_verdicts(path)] == [None]
    for pitch in (4.0, None):   # opened twice: the column is added once
        log = AuditLog(path)
        try:
            log.write({**_row(f"new{pitch}", "2026-11-02T08:00:00.000+00:00"), "untagged_pitch_mm": pitch})
        finally:
            log.close()
    db = sqlite3.connect(str(path))
    rows = db.execute("SELECT request_id, score, untagged_pitch_mm FROM verdicts ORDER BY id").fetchall()
    db.close()
    assert rows == [("old1", 0.2, None), ("new4.0", 0.1, 4.0), ("newNone", 0.1, None)]
    assert export_csv(path, tmp_path / "after.csv") == 3
    with open(tmp_path / "after.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == audit.COLUMNS + audit.OUTCOME_COLUMNS + ("untagged_pitch_mm", "score_rule")
        assert [r["untagged_pitch_mm"] for r in reader] == ["", "4.0", ""]
    for source in (path, tmp_path / "after.csv"):
        assert [r["pitch_mm"] for r in audit_report.served_verdicts(source)] == [None, 4.0, None]
    assert [r["pitch_mm"] for r in audit_report.served_verdicts(tmp_path / "before.csv")] == [None]


def test_summary_figures(tmp_path, capsys):
    # model A: 5 INSPECT (found, found, clear, found corrected to clear, none), 3 RELEASE (one found by a random
    # check, one clear, one unchecked); model B, served later: 1 INSPECT clear, 1 RELEASE unchecked
    db = AuditLog(tmp_path / "audit.sqlite")
    rows = [("a1", "INSPECT", "A", ["found"]), ("a2", "INSPECT", "A", ["found"]), ("a3", "INSPECT", "A", ["clear"]),
            ("a4", "INSPECT", "A", ["found", "clear"]), ("a5", "INSPECT", "A", []),
            ("a6", "RELEASE", "A", ["found"]), ("a7", "RELEASE", "A", ["clear"]), ("a8", "RELEASE", "A", []),
            ("b1", "INSPECT", "B", ["clear"]), ("b2", "RELEASE", "B", [])]
    for i, (rid, decision, model, outcomes) in enumerate(rows):
        db.write({**_row(rid, f"2026-11-{i + 1:02d}T08:00:00.000+00:00", decision), "model_sha256": model * 64})
        for o in outcomes:
            db.record_outcome(rid, o)
    db.close()
    s = audit_report.summarise(tmp_path / "audit.sqlite")
    a = s["all"]
    assert (a["verdicts"], a["inspect"], a["outcomes"]) == (10, 6, 7)
    assert a["inspect_share"] == pytest.approx(0.6)
    assert (a["inspected_found"], a["inspected_clear"], a["released_found"], a["released_checked"]) == (2, 3, 1, 2)
    assert a["hit_rate"] == pytest.approx(0.4) and a["hit_rate_interval"] == pytest.approx(rate_interval(2, 5))
    assert [m["model_sha256"][0] for m in s["models"]] == ["A", "B"]
    ma, mb = s["models"]
    assert (ma["verdicts"], ma["inspected_found"], ma["inspected_clear"], ma["hit_rate"]) == (8, 2, 2, 0.5)
    assert (mb["verdicts"], mb["inspect"], mb["hit_rate"], mb["released_checked"]) == (2, 1, 0.0, 0)
    assert (s["first"], s["last"]) == ("2026-11-01T08:00:00.000+00:00", "2026-11-10T08:00:00.000+00:00")
    assert audit_report.summarise(tmp_path / "audit.sqlite", since="2026-11-09")["all"]["verdicts"] == 2

    args = dict(action="summary", audit=str(tmp_path / "audit.sqlite"), since=None, out=None)
    assert audit_report.main(Namespace(**args, json=True)) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(s))
    assert audit_report.main(Namespace(**args, json=False)) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["model", "verdicts", "INSPECT", "outcomes", "hits/checked", "hit", "rate", "95", "%",
                               "interval", "misses/checked", "score:", "hits", "score:", "misses"]
    assert [ln.split()[0] for ln in text[1:4]] == ["A" * 12, "B" * 12, "all"]
    # every truck here scored 0.1 under its 0.4 threshold: the INSPECTs were forced, and the finds are the model's misses
    assert text[3].split()[1:] == ["10", "6", "(60.0%)", "7", "2/5", "40.0%", "11.8%", "-", "76.9%", "1/2", "0/0", "3/7"]
    assert text[-1].startswith("10 verdicts (2026-11-01") and "hit rate 40.0% (2 found of 5 inspected" in text[-1]
    assert "misses: 1 found of 2 released trucks checked" in text[-1]
    # an option the action would ignore is refused
    assert audit_report.main(Namespace(**{**args, "out": "s.csv"}, json=False)) == 2
    assert audit_report.main(Namespace(**{**args, "action": "export"}, json=False)) == 2
    assert audit_report.main(Namespace(**{**args, "action": "export", "out": str(tmp_path / "x.csv")}, json=True)) == 2


def test_the_summary_tells_the_models_hits_from_the_forced_and_failed_inspections(tmp_path):
    """The hit rate is the station's routing: a truck a risk flag sent to inspection though the model scored it under
    the threshold, or one whose scan failed, counted as the model's hit when found, and the per-model rows judged models
    by it. The summary now also gives what the model's scores alone decided."""
    db = AuditLog(tmp_path / "audit.sqlite")
    rows = [("forced", "INSPECT", 0.1, "found"), ("failed", "INSPECT", None, "found"), ("hit", "INSPECT", 0.9, "found"),
            ("alarm", "INSPECT", 0.8, "clear"), ("cleared", "RELEASE", 0.2, "clear"), ("unchecked", "RELEASE", 0.3, None)]
    for i, (rid, decision, score, outcome) in enumerate(rows):
        db.write({**_row(rid, f"2026-11-{i + 1:02d}T08:00:00.000+00:00", decision), "score": score})
        if outcome:
            db.record_outcome(rid, outcome)
    db.close()
    a = audit_report.summarise(tmp_path / "audit.sqlite")["all"]
    assert (a["inspected_found"], a["inspected_clear"], a["hit_rate"]) == (3, 1, 0.75)    # the station's routing
    assert (a["score_found"], a["score_checked"], a["score_hit_rate"]) == (1, 2, 0.5)      # the model's own
    assert (a["score_missed"], a["score_released_checked"]) == (1, 2)   # the forced find is the model's miss
    text = audit_report.format_summary(audit_report.summarise(tmp_path / "audit.sqlite")).splitlines()
    assert "by the model's scores alone (forced and failed INSPECTs left out): hit rate 50.0% (1 found of 2), " \
           "misses 1 found of 2 checked" in text[-1]


def test_an_audit_log_that_cannot_be_opened_or_written_is_named_at_open(log, tmp_path, monkeypatch):
    # `detector serve` in a read-only folder printed "unable to open database file", naming no file; and sqlite opens
    # a database it may not write read-only without a word: the service started ready, then answered every truck
    # INSPECT "not committed within the deadline ... database locked"
    with pytest.raises(sqlite3.OperationalError, match=f"{tmp_path}: cannot open the audit log "
                                                       r"\(unable to open database file\)"):
        AuditLog(tmp_path)
    (tmp_path / "notes.txt").write_text("not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="notes.txt: cannot open the audit log"):
        AuditLog(tmp_path / "notes.txt")
    connect = sqlite3.connect
    with monkeypatch.context() as m:   # the file's mode or a read-only mount (root ignores a file's mode)
        m.setattr(sqlite3, "connect", lambda path, **kw: connect(f"file:{path}?mode=ro", uri=True, **kw))
        with pytest.raises(sqlite3.OperationalError, match=r"audit.sqlite: cannot open the audit log \(attempt to "
                                                           r"write a readonly database\)"):
            AuditLog(log.path)
    other = sqlite3.connect(str(log.path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")   # another writer holding the lock (a backup) is no reason to refuse
    try:
        AuditLog(log.path).close()
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_export_defuses_spreadsheet_formulas(tmp_path):
    # vehicle_id, the file name and an officer's note come from the station's client: opened in a spreadsheet, a cell
    # starting with = + - @ ran as a formula (=HYPERLINK to leak the sheet, a DDE command)
    db = AuditLog(tmp_path / "audit.sqlite")
    row = {**_row("r1", "2026-11-01T08:00:00.000+00:00"), "vehicle_id": "=1+1", "container_id": "@SUM(A1)",
           "file_name": '=HYPERLINK("http://x","y").tiff', "tier": "+standard"}
    db.write(row)
    db.record_outcome("r1", "clear", officer="-2+3", note="\t=cmd|' /C calc'!A0")
    db.close()
    out = tmp_path / "audit.csv"
    assert export_csv(db.path, out) == 1
    got = next(csv.DictReader(out.open()))
    assert (got["vehicle_id"], got["container_id"], got["tier"]) == ("'=1+1", "'@SUM(A1)", "'+standard")
    assert got["file_name"] == "'=HYPERLINK(\"http://x\",\"y\").tiff"
    assert (got["officer"], got["outcome_note"]) == ("'-2+3", "'\t=cmd|' /C calc'!A0")
    # numbers and the columns calibrate reads back stay as they are
    assert (got["score"], got["decision"], got["outcome"], got["request_id"]) == ("0.1", "RELEASE", "clear", "r1")
    assert audit_report.served_verdicts(out)[0]["score"] == 0.1


def test_export_to_a_folder_or_an_unwritable_place_is_one_line(log, tmp_path, capsys, monkeypatch):
    """`detector audit export --out exports/` (a folder, as a site keeps its exports) ended in an IsADirectoryError
    traceback, where `score` and `calibrate` name the file to give; a write that fails is one line too."""
    (tmp_path / "exports").mkdir()
    args = dict(action="export", audit=str(log.path), since=None)
    assert audit_report.main(Namespace(out=str(tmp_path / "exports"), **args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("detector audit: --out ") and "is a folder" in err and "audit.csv" in err
    assert list((tmp_path / "exports").iterdir()) == []
    assert audit_report.main(Namespace(out=str(tmp_path / "none" / "sub" / "x.csv"), **args)) == 0   # made
    (tmp_path / "plain").write_text("a file, not a folder\n")
    assert audit_report.main(Namespace(out=str(tmp_path / "plain" / "x.csv"), **args)) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("detector audit: ") and "plain" in err and "Traceback" not in err

    def full_disk(path):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(audit_report, "replacing", full_disk)
    assert audit_report.main(Namespace(out=str(tmp_path / "y.csv"), **args)) == 1
    assert capsys.readouterr().err.startswith("detector audit: [Errno 28] No space left on device")


def test_an_error_of_the_log_itself_is_not_blamed_on_a_since_never_given(log, monkeypatch, capsys):
    """Every ValueError of `detector audit` was printed as "--since None is not an ISO date/time", as manifest's
    audit source did before 1a82d97: a reader of the log that raises one says what it is."""
    def broken(*_):
        raise ValueError("row 7: score 'abc' is not a number")
    monkeypatch.setattr(audit_report, "summarise", broken)
    assert audit_report.main(Namespace(action="summary", audit=str(log.path), since=None, out=None)) == 2
    err = capsys.readouterr().err
    assert "--since" not in err and f"{log.path}: row 7: score 'abc' is not a number" in err

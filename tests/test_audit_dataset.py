"""`detector manifest audit.sqlite --images ARCHIVE`: a station's verified trucks (verdicts with an outcome) as a
dataset, their scans found in the archive by content."""
from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import write_test_scan
from detector.audit import AuditLog
from detector.audit_dataset import Archive, convert, read_verdicts
from detector.audit_report import export_csv
from detector.cli import main as cli
from detector.records import load_records
from detector.scan import ScanError

DAY = "2026-11-0{}T08:00:00.000+00:00"


def _scans(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_test_scan(folder / f"s{i}.tiff", height=40, width=120, seed=i) for i in range(n)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve(log: AuditLog, rid: str, scan: Path, day: int = 1, name: str | None = None, decision: str = "RELEASE",
           **kw) -> None:
    """A verdict as `detector serve` records it for the upload of `scan` (named `name` by the client)."""
    log.write({"time": DAY.format(day), "request_id": rid, "file_name": name or scan.name, "file_sha256": _sha(scan),
               "file_bytes": scan.stat().st_size, "model_sha256": "cd" * 32, "score": 0.2, "threshold": 0.5,
               "tier": "standard", "decision": decision, "reason": "r", "latency_ms": 3.0, **kw})


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def site(tmp_path):
    """An archive of 5 scans and an audit log; yields (log, archive folder, its scans)."""
    scans = _scans(tmp_path / "archive" / "2026-11", 5)
    log = AuditLog(tmp_path / "audit.sqlite")
    yield log, tmp_path / "archive", scans
    log.close()


def test_labels_from_the_latest_outcome(site, tmp_path):
    log, archive, s = site
    _serve(log, "r0", s[0])
    _serve(log, "r1", s[1], decision="INSPECT", untagged_pitch_mm=4.0)
    _serve(log, "r2", s[2])
    _serve(log, "r3", s[3])                      # released, never checked: not known normal
    log.record_outcome("r0", "clear")
    log.record_outcome("r1", "clear")
    log.record_outcome("r1", "found", note="cigarettes behind the front wall")   # a correction: the latest counts
    log.record_outcome("r2", "found")
    log.record_outcome("r2", "clear")
    summary = convert(log.path, archive, tmp_path / "ds")
    assert (summary.verdicts, summary.no_outcome, summary.left_out) == (4, 1, [])
    rows = {r["request_id"]: r for r in _rows(tmp_path / "ds" / "manifest.csv")}
    assert {k: (r["label"], r["anomaly_type"]) for k, r in rows.items()} == \
        {"r0": ("0", "none"), "r1": ("1", "found"), "r2": ("0", "none")}
    assert rows["r1"]["decision"] == "INSPECT" and rows["r1"]["note"] == "cigarettes behind the front wall"
    assert rows["r1"]["mask"] == rows["r1"]["boxes"] == ""
    recs = {Path(r.path).name: r for r in load_records(tmp_path / "ds")}   # training reads it as written
    assert {n: r.label for n, r in recs.items()} == {"s0.tiff": 0, "s1.tiff": 1, "s2.tiff": 0}
    assert Path(recs["s1.tiff"].path).resolve() == s[1].resolve() and recs["s1.tiff"].label_alone
    assert recs["s1.tiff"].pitch_mm == 4.0 and recs["s0.tiff"].pitch_mm is None   # the pitch the station read it at


def test_found_by_content_where_the_names_differ(site, tmp_path):
    log, archive, s = site
    _serve(log, "r0", s[0], name="upload.tiff")                 # the client's own name
    _serve(log, "r1", s[1], name="s2.tiff")                     # the name of another scan: its hash tells
    _serve(log, "r2", s[2], name="C:\\lane2\\s2.tiff")          # a client's path: its last part is the name
    for rid in ("r0", "r1", "r2"):
        log.record_outcome(rid, "clear")
    convert(log.path, archive, tmp_path / "ds")
    paths = {r["request_id"]: Path(tmp_path / "ds" / r["path"]).resolve()
             for r in _rows(tmp_path / "ds" / "manifest.csv")}
    assert paths == {"r0": s[0].resolve(), "r1": s[1].resolve(), "r2": s[2].resolve()}


def test_names_first_hash_only_those(site):
    """Where every served name is in the archive, only those files are read: an archive holds 100,000 scans."""
    log, archive, s = site
    _serve(log, "r0", s[0])
    _serve(log, "r1", s[1])
    verdicts = read_verdicts(log.path, None, None)
    a = Archive(archive)
    placed = a.locate(verdicts)
    assert {k: v for k, v in placed.items()} == {_sha(s[0]): [s[0]], _sha(s[1]): [s[1]]}
    assert set(a.hashes) == {s[0], s[1]}


def test_missing_mismatch_and_duplicates_left_out_and_listed(site, tmp_path):
    log, archive, s = site
    gone = write_test_scan(tmp_path / "elsewhere" / "gone.tiff", height=40, width=120, seed=9)
    shutil.copy(s[0], archive / "copy_of_s0.tiff")              # the archive holds s0 twice
    _serve(log, "r0", s[0])
    _serve(log, "r1", gone)                                     # not in the archive at all
    changed = write_test_scan(tmp_path / "old" / "s3.tiff", height=40, width=120, seed=33)
    _serve(log, "r3", changed)                                  # s3.tiff is in the archive, with other content
    _serve(log, "r4", s[4], day=2)
    _serve(log, "r5", s[4], day=3)                              # the same scan served again (a retry)
    for rid, outcome in (("r0", "clear"), ("r1", "found"), ("r3", "found"), ("r5", "found"), ("r4", "clear")):
        log.record_outcome(rid, outcome)
    summary = convert(log.path, archive, tmp_path / "ds")
    rows = _rows(tmp_path / "ds" / "manifest.csv")
    assert sorted((r["request_id"], r["label"]) for r in rows) == [("r0", "0"), ("r4", "0")]   # r4's outcome is later
    left = {r["file"]: r["reason"] for r in _rows(tmp_path / "ds" / "left_out.csv")}
    assert left["gone.tiff"].startswith("missing: request r1 (found")
    assert left["s3.tiff"].startswith("hash mismatch: request r3") and "bear(s) its name but other content" in \
        left["s3.tiff"]
    assert left[str(archive / "copy_of_s0.tiff")].startswith("duplicate file: the same scan as")
    assert left["s4.tiff"].startswith("served again: request r5 (found)")
    assert len(summary.left_out) == 4


def test_since_and_until_select_the_verdicts(site, tmp_path):
    log, archive, s = site
    for i in range(4):
        _serve(log, f"r{i}", s[i], day=i + 1)
        log.record_outcome(f"r{i}", "clear")
    summary = convert(log.path, archive, tmp_path / "ds", since="2026-11-02", until="2026-11-04")
    assert sorted(r["request_id"] for r in _rows(tmp_path / "ds" / "manifest.csv")) == ["r1", "r2"]
    assert summary.verdicts == 2


def test_no_outcome_at_all_is_refused(site, tmp_path):
    log, archive, s = site
    _serve(log, "r0", s[0])
    with pytest.raises(ScanError, match="none of its 1 verdicts has an outcome"):
        convert(log.path, archive, tmp_path / "ds")


def test_cli_end_to_end_from_the_database_and_its_export(site, tmp_path, capsys):
    log, archive, s = site
    _serve(log, "r0", s[0], name="=cmd.tiff")
    _serve(log, "r1", s[1], decision="INSPECT")
    _serve(log, "r2", s[2])
    log.record_outcome("r0", "clear", note="-nothing")
    log.record_outcome("r1", "found")
    assert cli(["manifest", str(log.path), "--images", str(archive), "--out", str(tmp_path / "ds")]) == 0
    out, err = capsys.readouterr()
    assert "3 verdicts, 2 with an outcome -> 2 trucks (1 cleared, 1 found)" in out
    assert "1 without an outcome" in out and "data.normal_only=true" in out and "--init" in out
    assert "detector eval" in out and "label alone" in err and "data.label_only_crops" in err
    rows = _rows(tmp_path / "ds" / "manifest.csv")
    assert [r["note"] for r in rows] == ["'-nothing", ""]      # a spreadsheet shows it as text
    export_csv(log.path, tmp_path / "audit.csv")
    assert cli(["manifest", str(tmp_path / "audit.csv"), "--images", str(archive), "--out",
                str(tmp_path / "ds2")]) == 0
    assert _rows(tmp_path / "ds2" / "manifest.csv") == rows
    assert [r.label for r in load_records(tmp_path / "ds2")] == [0, 1]


def test_cli_refuses_options_that_do_not_apply(site, tmp_path, capsys):
    log, archive, s = site
    assert cli(["manifest", str(log.path), "--out", str(tmp_path / "ds")]) == 2
    assert "--images names the scanner's archive" in capsys.readouterr().err
    assert cli(["manifest", str(log.path), "--images", str(archive), "--classes", "gun", "--out",
                str(tmp_path / "ds")]) == 2
    assert "--classes apply to a labelling tool's export" in capsys.readouterr().err
    assert cli(["manifest", str(log.path), "--images", str(archive), "--append", "--out", str(tmp_path / "ds")]) == 2
    assert "--append apply to a labelling tool's export" in capsys.readouterr().err   # was silently ignored
    coco = tmp_path / "instances.json"
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    assert cli(["manifest", str(coco), "--since", "2026-11-01", "--out", str(tmp_path / "ds")]) == 2
    assert "is none" in capsys.readouterr().err
    assert cli(["manifest", str(log.path), "--images", str(archive), "--since", "yesterday", "--out",
                str(tmp_path / "ds")]) == 2
    assert "not an ISO date/time" in capsys.readouterr().err


def test_cli_names_the_reason_a_dataset_is_refused(site, tmp_path, capsys):
    """Every refusal of the conversion (a ScanError is a ValueError) was printed as "--since/--until is not an ISO
    date/time": a weekly re-run into the same --out, or a log without outcomes, named a time nobody gave."""
    log, archive, s = site
    _serve(log, "r0", s[0])
    out = tmp_path / "ds"
    assert cli(["manifest", str(log.path), "--images", str(archive), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has an outcome" in err and "ISO" not in err
    log.record_outcome("r0", "clear")
    assert cli(["manifest", str(log.path), "--images", str(archive), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli(["manifest", str(log.path), "--images", str(archive), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists: pass --force" in err and "ISO" not in err
    assert cli(["manifest", str(log.path), "--images", str(archive), "--since", "yesterday", "--out",
                str(tmp_path / "ds2")]) == 2
    assert "--since/--until is not an ISO date/time" in capsys.readouterr().err

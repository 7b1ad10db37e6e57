"""Result files replaced whole (detector.atomic.replacing): a write that fails midway (a full disk, a kill) leaves the
previous file byte for byte and no temporary beside it. Each file was written in place (opened, truncated, written),
so such a failure left a cut file where a whole one had been."""
import csv
import errno
import json
import os
import resource
import signal
import stat
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

PREVIOUS = b"the previous whole file\n"


@contextmanager
def disk_full(limit: int = 16):
    """Every file this process writes past `limit` bytes fails (EFBIG), as on a disk that fills midway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def previous(path: Path, data: bytes = PREVIOUS) -> bytes:
    """Put an earlier run's file at `path`; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def assert_kept(path: Path, before: bytes) -> None:
    """`path` is still `before`, byte for byte, and nothing of the failed write is left in its folder."""
    assert path.read_bytes() == before
    left = [p.name for p in path.parent.iterdir() if ".tmp" in p.name or p.name.startswith(f".{path.name}")]
    assert not left, left


def cut_writes_of(monkeypatch, name: str) -> None:
    """Path.write_text of a file whose name holds `name` writes half its text, then the disk is full."""
    write_text = Path.write_text

    def half(self, data, *a, **k):
        if name not in self.name:
            return write_text(self, data, *a, **k)
        write_text(self, data[: len(data) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", half)


# ------------------------------------------------------------------ the helper

def test_replacing_writes_whole_or_leaves_the_previous_file(tmp_path):
    from detector.atomic import replacing
    path = tmp_path / "out.json"
    before = previous(path)
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert_kept(path, before)
    with replacing(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_a_failed_write_names_the_file_asked_for_not_the_hidden_temporary(tmp_path):
    """An error writing the temporary (a folder that is missing or read-only, a full disk) named
    `.metrics.json.1234.9f3a.tmp`, a file the user never asked for; it now names the target, and the temporary."""
    from detector.atomic import replacing
    target = tmp_path / "gone" / "metrics.json"
    with pytest.raises(FileNotFoundError) as e:
        with replacing(target) as tmp:
            tmp.write_text("{}")
    assert e.value.filename == str(target) and tmp.name in str(e.value) and not target.parent.exists()


def test_replacing_keeps_links_permissions_and_writes_pipes_in_place(tmp_path):
    """Writing in place kept a link (the file it names was written), the file's permissions (an audit CSV made
    private) and wrote into a pipe or /dev/stdout: replacing does the same."""
    from detector.atomic import replacing
    real = tmp_path / "models" / "v3.csv"
    previous(real)
    real.chmod(0o600)
    link = tmp_path / "current.csv"
    link.symlink_to(real)
    with replacing(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and real.read_text() == "new" and stat.S_IMODE(real.stat().st_mode) == 0o600
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with replacing(fifo) as tmp:
            assert tmp == fifo
            tmp.write_text("through")
        assert os.read(r, 100) == b"through" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    finally:
        os.close(r)


# ------------------------------------------------------------------ train

def test_train_config_yaml_cut_by_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    from test_train import TINY, write_dataset

    from detector.train import run_training
    data, run = write_dataset(tmp_path / "data"), tmp_path / "run"
    before = previous(run / "config.yaml", b"name: earlier\n")
    cut_writes_of(monkeypatch, "config.yaml")
    with pytest.raises(OSError, match="No space left"):
        run_training(None, data, run, TINY, quiet=True)
    assert_kept(run / "config.yaml", before)


def test_train_metrics_json_cut_by_a_full_disk_is_not_left_half_written(tmp_path, monkeypatch):
    """A cut metrics.json marked the run finished (checkpoint.unfinished_run) and failed every reader of it."""
    from test_train import TINY, write_dataset

    from detector.train import run_training
    data, run = write_dataset(tmp_path / "data"), tmp_path / "run"
    cut_writes_of(monkeypatch, "metrics.json")
    with pytest.raises(OSError, match="No space left"):
        run_training(None, data, run, [*TINY, "trainer.max_epochs=1", "trainer.test=false"], quiet=True)
    assert not (run / "metrics.json").exists()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_train_csv_files_cut_by_a_full_disk_keep_the_previous_ones(tmp_path):
    from detector.data import ScanDataModule
    from detector.train import _merge_logs, write_test_scores
    scores = tmp_path / "test_scores.csv"
    before = previous(scores)
    rows = [{"index": i, "label": i % 2, "type": "", "score": 0.5, "hit": None} for i in range(20)]
    with disk_full(), pytest.raises(OSError):
        write_test_scores(scores, rows, [SimpleNamespace(path=f"images/{i}.tiff") for i in range(20)])
    assert_kept(scores, before)

    skipped = tmp_path / "skipped_scans.csv"
    before = previous(skipped)
    with disk_full(), pytest.raises(OSError):
        ScanDataModule.write_skipped(SimpleNamespace(skipped={f"{i}.tiff": ("train", "truncated") for i in range(9)}),
                                     skipped)
    assert_kept(skipped, before)

    earlier, log = tmp_path / "logs" / "metrics.before_resume.csv", tmp_path / "logs" / "metrics.csv"
    previous(earlier, b"step,loss\n" + b"".join(b"%d,0.5\n" % i for i in range(10)))
    before = previous(log, b"step,loss\n10,0.4\n11,0.3\n")
    with disk_full(), pytest.raises(OSError):
        _merge_logs(earlier, log)
    assert_kept(log, before)


def test_hard_types_json_cut_by_a_full_disk_leaves_no_temporary(tmp_path, monkeypatch):
    """write_atomic renamed a whole file, but a failed write left its NAME.PID.tmp in the run folder."""
    from detector.hard_types import write_atomic
    path = tmp_path / "hard_types.json"
    before = previous(path)
    cut_writes_of(monkeypatch, "hard_types.json")
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, {"weights": {"cash": 1.0}})
    assert_kept(path, before)


# ------------------------------------------------------------------ eval, export, score, synth, audit

def test_eval_files_cut_by_a_full_disk_keep_the_previous_ones(tmp_path):
    from test_evaluate import _dataset

    from detector import evaluate, report
    data, res = _dataset(tmp_path)
    m = evaluate.evaluate(res, data / "manifest.csv", tmp_path / "first", thumbs=False)
    out = tmp_path / "report"
    before = previous(out / "metrics.json")
    with disk_full(), pytest.raises(OSError):
        evaluate.evaluate(res, data / "manifest.csv", out, thumbs=False)
    assert_kept(out / "metrics.json", before)

    report._plt()   # matplotlib's caches written before the disk fills
    for name, draw in (("roc.png", lambda p: report.plot_roc({"all": (np.r_[0, 1.0], np.r_[0, 1.0])}, p)),
                       ("hist.png", lambda p: report.plot_histogram(np.r_[0.1, 0.2], np.r_[0.8], p)),
                       ("report.html", lambda p: report.html_report(p, m, {}, {}))):
        before = previous(out / name)
        with disk_full(), pytest.raises(OSError):
            draw(out / name)
        assert_kept(out / name, before)
    report.plot_roc({"all": (np.r_[0, 1.0], np.r_[0, 1.0])}, out / "roc.png")   # the format its name says
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_bundle_cut_by_a_full_disk_keeps_the_previous_model(tmp_path, heuristic_model):
    pytest.importorskip("onnx")
    from detector.bundle import read_metadata
    from detector.export import write_bundle
    out = tmp_path / "model.onnx"
    before = previous(out)
    with disk_full(1000), pytest.raises(OSError):
        write_bundle(heuristic_model, read_metadata(heuristic_model), out)
    assert_kept(out, before)


def test_score_rewrites_cut_by_a_full_disk_keep_the_previous_files(tmp_path):
    """A retry drops earlier rows by rewriting the CSV and JSON lines: a fixed NAME.tmp was left behind."""
    from detector import score
    out, jsonl = tmp_path / "results.csv", tmp_path / "results.jsonl"
    rows = [[f"/scans/{i}.tiff", "0.5", "INSPECT", "0.4", "[]", "1.0", ""] for i in range(10)]
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([score.COLUMNS, *rows])
    before = out.read_bytes()
    with disk_full(), pytest.raises(OSError):
        score._drop_paths(out, None, {"/scans/0.tiff"}, set())
    assert_kept(out, before)
    before = previous(jsonl, "".join(json.dumps({"path": r[0], "score": 0.5}) + "\n" for r in rows).encode())
    with disk_full(), pytest.raises(OSError):
        score._drop_paths(out, jsonl, set(), {"/scans/0.tiff"})
    assert_kept(jsonl, before)


def test_score_routing_json_cut_by_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch, heuristic_model,
                                                                       normal_scan_path):
    from detector.cli import main
    out = tmp_path / "results.csv"
    routing = tmp_path / "results.csv.routing.json"
    assert main(["score", str(normal_scan_path), "--model", str(heuristic_model), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "routing" in p.name) == [routing.name]
    before = routing.read_bytes()
    out.unlink()
    cut_writes_of(monkeypatch, routing.name)
    assert main(["score", str(normal_scan_path), "--model", str(heuristic_model), "--out", str(out)]) != 0
    assert_kept(routing, before)


def test_synth_files_cut_by_a_full_disk_keep_the_previous_ones(tmp_path, monkeypatch):
    from detector.synth.dataset import SYNTH_INFO, write_dataset
    out = tmp_path / "synth"
    before = previous(out / SYNTH_INFO)
    with disk_full(), pytest.raises(OSError):
        write_dataset(out, 2, workers=1, height=96, progress=False)
    assert_kept(out / SYNTH_INFO, before)

    before = previous(out / "manifest.csv")

    def disk_fills(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(csv.DictWriter, "writerows", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        write_dataset(out, 2, workers=1, height=96, progress=False)
    assert_kept(out / "manifest.csv", before)


def test_audit_export_cut_by_a_full_disk_keeps_the_previous_export(tmp_path):
    from detector.audit import AuditLog
    from detector.audit_report import export_csv
    from test_audit import _row
    log = AuditLog(tmp_path / "audit.sqlite")
    for i in range(5):
        log.write(_row(f"r{i}", f"2026-11-0{i + 1}T08:00:00.000+00:00"))
    out = tmp_path / "audit.csv"
    export_csv(log.path, out)
    before = out.read_bytes()
    with disk_full(len(before) // 2), pytest.raises(OSError):
        export_csv(log.path, out)
    log.close()
    assert_kept(out, before)

"""A candidate model in shadow beside the live one (serve --shadow), its audit rows, summary and calibration."""
import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import make_heuristic_bundle

LOW_SCORES = np.linspace(0.0001, 0.004, 300).round(6).tolist()   # a candidate whose 1 % threshold is ~0.004


@pytest.fixture(scope="module")
def candidate(tmp_path_factory) -> Path:
    """The heuristic graph with much lower normal scores: its thresholds inspect trucks the live model releases."""
    return make_heuristic_bundle(tmp_path_factory.mktemp("cand") / "candidate.onnx", normal_scores=LOW_SCORES)


def _build(tmp_path, model, shadow=None, **cfg):
    from detector.serve import ServeConfig, build_service
    svc = build_service(ServeConfig(model=str(model), audit=str(tmp_path / "audit.sqlite"), threads=1,
                                    shadow=str(shadow) if shadow else None, **cfg))
    svc.ready = True
    return svc


async def _posts(svc, files: list[Path], meta: dict | None = None) -> list[httpx.Response]:
    from detector.serve import create_app
    transport = httpx.ASGITransport(app=create_app(svc))
    out = []
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        for f in files:
            data = {"meta": json.dumps(meta)} if meta else None
            out.append(await c.post("/v1/inspect", files={"scan": (f.name, f.read_bytes())}, data=data))
    return out


def _settle(svc) -> None:
    """Let the candidate score what is queued and write its rows, as the service's tick does."""
    assert svc.shadow.wait_idle(30)
    svc.shadow.write_pending(svc.audit)


def _rows(db: Path, table: str) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY id")]
    finally:
        con.close()


VOLATILE = ("request_id", "latency_ms", "time", "id")


def test_the_live_answer_and_row_are_the_same_with_a_shadow(heuristic_model, candidate, normal_scan_path,
                                                           anomalous_scan_path, tmp_path):
    scans = [normal_scan_path, anomalous_scan_path]
    plain = _build(tmp_path / "plain", heuristic_model)
    shadowed = _build(tmp_path / "shadow", heuristic_model, shadow=candidate)
    try:
        a = asyncio.run(_posts(plain, scans))
        b = asyncio.run(_posts(shadowed, scans))
        _settle(shadowed)
    finally:
        plain.close()
        shadowed.close()
    strip = lambda d: {k: v for k, v in d.items() if k not in VOLATILE}  # noqa: E731
    assert [strip(r.json()) for r in a] == [strip(r.json()) for r in b]
    assert [r.json()["decision"] for r in b] == ["RELEASE", "INSPECT"]
    live_a, live_b = _rows(tmp_path / "plain" / "audit.sqlite", "verdicts"), _rows(tmp_path / "shadow" / "audit.sqlite",
                                                                                   "verdicts")
    assert [strip(r) for r in live_a] == [strip(r) for r in live_b]
    # the candidate's rows name the live verdicts, and its lower thresholds inspect the normal truck too
    shadow = _rows(tmp_path / "shadow" / "audit.sqlite", "shadow_verdicts")
    assert [r["request_id"] for r in shadow] == [r.json()["request_id"] for r in b]
    assert {r["model_sha256"] for r in shadow} == {shadowed.shadow.model_sha256} != {live_b[0]["model_sha256"]}
    assert [r["decision"] for r in shadow] == ["INSPECT", "INSPECT"] and all(r["error"] is None for r in shadow)
    assert shadow[0]["score"] == pytest.approx(live_b[0]["score"])   # same graph, same scan
    assert shadow[0]["threshold"] < 0.005 < live_b[0]["threshold"] and shadow[0]["score_rule"] == live_b[0]["score_rule"]
    assert json.loads(shadow[1]["regions"]) and shadow[0]["latency_ms"] > 0
    assert shadowed.shadow.scored == 2 and shadowed.shadow.disagree["RELEASE", "INSPECT"] == 1


def test_metrics_and_start_line_name_the_shadow(heuristic_model, candidate, normal_scan_path, tmp_path, monkeypatch,
                                                capsys):
    import uvicorn

    from detector import serve
    svc = _build(tmp_path, heuristic_model, shadow=candidate)
    try:
        asyncio.run(_posts(svc, [normal_scan_path]))
        _settle(svc)
        text = svc.metrics.render(svc)
    finally:
        svc.close()
    assert 'detector_shadow_scans_total{result="scored"} 1' in text
    assert 'detector_shadow_disagreements_total{live="RELEASE",shadow="INSPECT"} 1' in text
    assert 'detector_shadow_skipped_total{reason="queue_full"} 0' in text
    assert f'detector_shadow_model_info{{sha256="{svc.shadow.model_sha256}"}} 1' in text
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.setattr(serve, "create_app", lambda s: s)
    args = SimpleNamespace(model=str(heuristic_model), host="127.0.0.1", port=0, audit=str(tmp_path / "b.sqlite"),
                           policy=None, threads=1, max_upload_mb=1.0, max_queue=1, concurrency=1, deadline_ms=1000.0,
                           shadow=str(candidate), shadow_threads=1)
    assert serve.main(args) == 0
    started[0].close()
    assert f"shadow {candidate} (sha256 {svc.shadow.model_sha256[:12]}, 1 onnxruntime thread" in capsys.readouterr().err


def test_a_shadow_bundle_that_cannot_load_refuses_the_start_in_one_line(heuristic_model, tmp_path, monkeypatch,
                                                                       capsys):
    import uvicorn

    from detector import serve
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("served without its shadow"))
    bad = tmp_path / "candidate.onnx"
    bad.write_bytes(b"not a model")
    args = SimpleNamespace(model=str(heuristic_model), host="127.0.0.1", port=0, audit=str(tmp_path / "a.sqlite"),
                           policy=None, threads=1, max_upload_mb=1.0, max_queue=1, concurrency=1, deadline_ms=1000.0,
                           shadow=str(bad), shadow_threads=1)
    assert serve.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"detector serve: --shadow {bad}: cannot load the candidate model") and "\n" not in err


class _Raising:
    """A candidate whose inspect_safe raises (it never should): its row records the error."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def inspect_safe(self, *a, **kw):
        raise RuntimeError("candidate crashed")


def test_a_candidate_that_refuses_or_raises_leaves_the_live_answer_and_row(heuristic_model_1ch, heuristic_model,
                                                                          normal_scan_1ch_path, tmp_path):
    # the candidate takes two channels: the single-energy truck is one it cannot take
    svc = _build(tmp_path, heuristic_model_1ch, shadow=heuristic_model)
    try:
        r = asyncio.run(_posts(svc, [normal_scan_1ch_path]))[0]
        _settle(svc)
        svc.shadow.inspector = _Raising(svc.shadow.inspector)
        r2 = asyncio.run(_posts(svc, [normal_scan_1ch_path]))[0]
        _settle(svc)
    finally:
        svc.close()
    assert r.json()["decision"] == r2.json()["decision"] == "RELEASE" and r.json()["reason"].startswith("score")
    db = tmp_path / "audit.sqlite"
    assert [v["decision"] for v in _rows(db, "verdicts")] == ["RELEASE", "RELEASE"]
    shadow = _rows(db, "shadow_verdicts")
    assert [s["request_id"] for s in shadow] == [r.json()["request_id"], r2.json()["request_id"]]
    assert [s["decision"] for s in shadow] == ["INSPECT", "INSPECT"] and shadow[0]["score"] is None
    assert "channel" in shadow[0]["error"] and shadow[1]["error"] == "RuntimeError: candidate crashed"
    assert svc.shadow.failed == 2 and svc.shadow.scored == 0


class _Blocking:
    """A candidate that holds each scan until released, so the queue fills."""

    def __init__(self, real):
        self.real, self.started, self.go = real, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def inspect_safe(self, *a, **kw):
        self.started.set()
        self.go.wait(30)
        return self.real.inspect_safe(*a, **kw)


def test_a_full_shadow_queue_skips_the_truck_for_the_candidate_and_counts_it(heuristic_model, candidate,
                                                                             normal_scan_path, tmp_path):
    from detector.serve_shadow import SHADOW_QUEUE
    svc = _build(tmp_path, heuristic_model, shadow=candidate)
    blocking = svc.shadow.inspector = _Blocking(svc.shadow.inspector)
    try:
        first = asyncio.run(_posts(svc, [normal_scan_path]))
        assert blocking.started.wait(10)   # the worker holds the first truck
        more = asyncio.run(_posts(svc, [normal_scan_path] * (SHADOW_QUEUE + 2)))
        assert svc.shadow.skipped["queue_full"] == 2
        # the trucks waiting hold the attenuation the candidate reads, not the file's original counts beside it
        waiting = [j.scan for j in list(svc.shadow.jobs.queue)]
        assert len(waiting) == SHADOW_QUEUE and all(s.counts is None and s.attenuation.size for s in waiting)
        assert all(r.status_code == 200 and r.json()["decision"] == "RELEASE" for r in first + more)
        blocking.go.set()
        _settle(svc)
    finally:
        blocking.go.set()
        svc.close()
    db = tmp_path / "audit.sqlite"
    assert len(_rows(db, "verdicts")) == SHADOW_QUEUE + 3 and len(_rows(db, "shadow_verdicts")) == SHADOW_QUEUE + 1
    assert 'detector_shadow_skipped_total{reason="queue_full"} 2' in svc.metrics.render(svc)


def test_shadow_rows_wait_out_a_locked_database_and_never_hold_a_live_row(heuristic_model, candidate,
                                                                          normal_scan_path, tmp_path):
    svc = _build(tmp_path, heuristic_model, shadow=candidate)
    db = tmp_path / "audit.sqlite"
    try:
        asyncio.run(_posts(svc, [normal_scan_path]))
        assert svc.shadow.wait_idle(30)
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")   # a backup holds the write lock
        assert svc.shadow.write_pending(svc.audit) == 0 and len(svc.shadow.pending) == 1   # kept, not waited for
        lock.execute("ROLLBACK")
        lock.close()
        assert svc.shadow.write_pending(svc.audit) == 1 and not svc.shadow.pending
    finally:
        svc.close()
    assert len(_rows(db, "shadow_verdicts")) == 1 and svc.shadow.dropped == 0


def test_metrics_show_shadow_rows_waiting_for_a_locked_database_and_written_after(heuristic_model, candidate,
                                                                                   normal_scan_path, tmp_path):
    """/metrics accounts for every candidate row while a backup holds the database: pending, then written."""
    svc = _build(tmp_path, heuristic_model, shadow=candidate)
    db = tmp_path / "audit.sqlite"
    try:
        asyncio.run(_posts(svc, [normal_scan_path, normal_scan_path]))
        assert svc.shadow.wait_idle(30)
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        svc.shadow.write_pending(svc.audit)
        held = svc.metrics.render(svc)
        lock.execute("ROLLBACK")
        lock.close()
        svc.shadow.write_pending(svc.audit)
        free = svc.metrics.render(svc)
    finally:
        svc.close()
    assert "detector_shadow_rows_pending 2\n" in held and "detector_shadow_rows_written_total 0\n" in held
    assert "detector_shadow_rows_pending 0\n" in free and "detector_shadow_rows_written_total 2\n" in free


def _verdict(rid: str, model: str, decision: str, score: float = 0.3) -> dict:
    return {"request_id": rid, "model_sha256": model, "decision": decision, "score": score, "threshold": 0.4,
            "reason": "r", "score_rule": "heatmap_logits"}


def _shadow(rid: str, model: str, decision: str, score: float = 0.3, error: str | None = None) -> dict:
    from detector.audit import utc_now
    return {"time": utc_now(), "request_id": rid, "model_sha256": model, "score": None if error else score,
            "decision": decision, "threshold": 0.2, "regions": "[]", "latency_ms": 5.0, "error": error,
            "score_rule": None if error else "heatmap_logits"}


def test_summary_compares_the_models_on_the_same_trucks(tmp_path, capsys):
    from detector.audit import AuditLog
    from detector.audit_report import format_summary, main, summarise
    log = AuditLog(tmp_path / "audit.sqlite")
    # live, candidate, outcome: 2 agree INSPECT (1 found), 1 only the live inspects (found: the candidate's miss),
    # 3 only the candidate inspects (1 found on a spot check), 3 agree RELEASE, 1 the candidate failed on
    plan = [("INSPECT", "INSPECT", "found"), ("INSPECT", "INSPECT", "clear"), ("INSPECT", "RELEASE", "found"),
            ("RELEASE", "INSPECT", "found"), ("RELEASE", "INSPECT", None), ("RELEASE", "INSPECT", None),
            ("RELEASE", "RELEASE", None), ("RELEASE", "RELEASE", "clear"), ("RELEASE", "RELEASE", None),
            ("RELEASE", "FAIL", None)]
    for i, (live, cand, outcome) in enumerate(plan):
        log.write(_verdict(f"r{i}", "L" * 64, live))
        failed = cand == "FAIL"
        log.write_shadow([_shadow(f"r{i}", "C" * 64, "INSPECT" if failed else cand, error="bad" if failed else None)])
        if outcome:
            log.record_outcome(f"r{i}", outcome)
    log.write(_verdict("r-none", "L" * 64, "RELEASE"))   # a truck the candidate skipped: not compared
    log.close()
    s = summarise(tmp_path / "audit.sqlite")
    assert s["all"]["verdicts"] == 11
    (f,) = s["shadow"]
    assert (f["live_sha256"], f["shadow_sha256"]) == ("L" * 64, "C" * 64)
    assert {k: f[k] for k in ("trucks", "live_inspect", "shadow_inspect", "agree", "live_only_inspect",
                              "shadow_only_inspect", "shadow_failed", "outcomes", "found", "live_found",
                              "shadow_found", "shadow_released_found")} == {
        "trucks": 10, "live_inspect": 3, "shadow_inspect": 6, "agree": 5, "live_only_inspect": 1,
        "shadow_only_inspect": 4, "shadow_failed": 1, "outcomes": 5, "found": 3, "live_found": 2, "shadow_found": 2,
        "shadow_released_found": 1}
    assert f["live_inspect_share"] == 0.3 and f["shadow_inspect_share"] == 0.6 and f["agreement"] == 0.5
    text = format_summary(s)
    assert "LLLLLLLLLLLL vs CCCCCCCCCCCC" in text and "3 (30.0%)" in text and "2 / 2 of 3" in text
    assert main(SimpleNamespace(action="summary", audit=str(tmp_path / "audit.sqlite"), since=None, out=None,
                                json=True)) == 0
    assert json.loads(capsys.readouterr().out)["shadow"][0]["shadow_released_found"] == 1


def test_an_older_database_gains_the_shadow_table_at_open_and_reads_without_it(tmp_path):
    from detector.audit import AuditLog
    from detector.audit_report import format_summary, shadow_verdicts, summarise
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)   # a log written before shadow rows (and outcomes, and the later columns) existed
    con.execute("CREATE TABLE verdicts (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, request_id TEXT NOT "
                "NULL UNIQUE, vehicle_id TEXT, container_id TEXT, file_name TEXT, file_sha256 TEXT, file_bytes "
                "INTEGER, model_sha256 TEXT, model_version TEXT, score REAL, threshold REAL, tier TEXT, decision TEXT "
                "NOT NULL, reason TEXT, latency_ms REAL, risk_flags TEXT)")
    con.execute("INSERT INTO verdicts (time, request_id, model_sha256, score, threshold, decision) VALUES "
                "('2026-12-01T00:00:00.000+00:00', 'r0', 'L', 0.1, 0.4, 'RELEASE')")
    con.commit()
    con.close()
    s = summarise(db)   # read as it is
    assert "shadow" not in s and "shadow" not in format_summary(s) and shadow_verdicts(db) == []
    log = AuditLog(db)
    assert log.write_shadow([_shadow("r0", "C" * 64, "INSPECT")]) == 1
    assert log.write_shadow([_shadow("r0", "C" * 64, "INSPECT")]) == 0   # stored once per truck and model
    log.close()
    assert summarise(db)["shadow"][0]["shadow_only_inspect"] == 1
    assert [r["model_sha256"] for r in shadow_verdicts(db)] == ["C" * 64]


def _calibrated(tmp_path, candidate, capsys) -> tuple:
    """`detector calibrate tmp_path/audit.sqlite --model candidate --out tmp_path/site.onnx`: (out, its args, what it
    printed)."""
    from detector.site_calibration import main
    out = tmp_path / "site.onnx"
    args = SimpleNamespace(results=str(tmp_path / "audit.sqlite"), model=str(candidate), out=str(out), truth=None,
                           since=None)
    assert main(args) == 0, capsys.readouterr().err
    return out, args, capsys.readouterr().out


def test_calibrate_takes_a_candidates_shadow_scores_of_cleared_traffic(candidate, tmp_path, capsys):
    import hashlib

    from detector.audit import AuditLog
    from detector.bundle import read_metadata
    from detector.site_calibration import main
    sha = hashlib.sha256(candidate.read_bytes()).hexdigest()
    log = AuditLog(tmp_path / "audit.sqlite")
    rng = np.random.default_rng(0)
    want = []
    for i in range(300):
        log.write(_verdict(f"r{i}", "L" * 64, "INSPECT" if i % 10 == 0 else "RELEASE"))
        score = float(rng.uniform(0.0, 0.5))
        log.write_shadow([_shadow(f"r{i}", sha, "RELEASE", score)])
        if i % 30 == 0:   # found: left out
            log.record_outcome(f"r{i}", "found")
        else:
            want.append(score)
    log.write_shadow([_shadow("r-x", "D" * 64, "RELEASE", 0.9)])   # another candidate's: not this model's
    log.close()
    out, args, said = _calibrated(tmp_path, candidate, capsys)
    assert "290 cleared scans" in said and "shadow" in said and "10 found something" in said
    meta = read_metadata(out)
    assert meta["normal_scores"] == pytest.approx(sorted(want))
    assert meta["site_calibration"]["shadow"] is True
    # `detector info` says what the thresholds rest on: the candidate's scores in shadow, by the sha256 that
    # `audit summary` names it by (it said only "cleared scans of audit.sqlite", as for the site's own verdicts)
    from detector.bundle_info import describe
    site_line = next(ln for ln in describe(out) if ln.strip().startswith("site "))
    assert f"scored by {sha[:12]} in shadow (serve --shadow)" in site_line
    # its `audit export` CSV holds no shadow rows: the refusal said only "300 by another model"
    from detector.audit_report import export_csv
    export_csv(tmp_path / "audit.sqlite", tmp_path / "audit.csv")
    args.results, args.out = str(tmp_path / "audit.csv"), str(tmp_path / "site2.onnx")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "300 by another model" in err and "holds no shadow rows" in err and "give the audit database" in err


def test_a_running_service_writes_shadow_rows_at_its_tick_and_says_so_at_shutdown(heuristic_model, candidate,
                                                                                  normal_scan_path, tmp_path, capsys):
    from detector.serve import create_app
    svc = _build(tmp_path, heuristic_model, shadow=candidate)
    app = create_app(svc)
    db = tmp_path / "audit.sqlite"

    async def run() -> list[dict]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                await c.post("/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())})
            for _ in range(100):   # the audit thread's tick, while serving
                await asyncio.sleep(0.1)
                if _rows(db, "shadow_verdicts"):
                    break
            return _rows(db, "shadow_verdicts")

    assert len(asyncio.run(run())) == 1
    assert "; shadow " in capsys.readouterr().out and "1 scored, 0 failed, 0 skipped, 1 disagreeing" in svc.summary()


def test_calibrate_takes_a_promoted_models_shadow_scores_with_its_served_ones(candidate, tmp_path, capsys):
    """A candidate promoted to live after its shadow weeks was calibrated on its own served verdicts alone: its 150
    shadow scores of the same graph were ignored without a word, and 150 served trucks were refused as too few for
    a 1 % rate where 300 were there."""
    import hashlib

    from detector.audit import AuditLog
    from detector.bundle import read_metadata
    from detector.bundle_info import describe
    sha = hashlib.sha256(candidate.read_bytes()).hexdigest()
    log = AuditLog(tmp_path / "audit.sqlite")
    rng = np.random.default_rng(1)
    want = []
    for i in range(150):   # weeks 1-2: L live, the candidate in shadow
        log.write(_verdict(f"s{i}", "L" * 64, "RELEASE"))
        want.append(float(rng.uniform(0.0, 0.5)))
        log.write_shadow([_shadow(f"s{i}", sha, "RELEASE", want[-1])])
    for i in range(150):   # weeks 3-4: the candidate promoted, served live
        row = {**_verdict(f"p{i}", sha, "RELEASE"), "score": float(rng.uniform(0.0, 0.5))}
        log.write(row)
        want.append(row["score"])
    log.close()
    out, _, said = _calibrated(tmp_path, candidate, capsys)
    assert "300 cleared scans" in said and "150 of them scored by this model in shadow before it served" in said
    meta = read_metadata(out)
    assert meta["normal_scores"] == pytest.approx(sorted(want))
    assert meta["site_calibration"]["shadow"] is False and meta["site_calibration"]["shadow_scores"] == 150
    assert "(150 of them in shadow, serve --shadow)" in next(ln for ln in describe(out) if ln.strip().startswith("site "))


def test_calibrate_counts_a_truck_once_where_the_model_served_it_and_its_site_bundle_shadowed_it(candidate,
                                                                                                 tmp_path, capsys):
    """`serve --model C --shadow C_site` (the site's thresholds tried in shadow before the switch): calibrating C_site
    took C's served verdict and C_site's shadow row of each truck, the same graph on the same scan, so every truck
    counted twice: 150 trucks read as 300 cleared scans, enough for a 1 % rate they cannot support."""
    import hashlib

    from detector.audit import AuditLog
    from detector.bundle import read_metadata
    from detector.site_calibration import main
    sha = hashlib.sha256(candidate.read_bytes()).hexdigest()
    first = AuditLog(tmp_path / "first.sqlite")   # C served: its site bundle calibrated from those verdicts
    rng = np.random.default_rng(2)
    for i in range(150):
        first.write({**_verdict(f"f{i}", sha, "RELEASE"), "score": float(rng.uniform(0.0, 0.5))})
    first.close()
    site1 = tmp_path / "site1.onnx"
    args = SimpleNamespace(results=str(tmp_path / "first.sqlite"), model=str(candidate), out=str(site1), truth=None,
                           since=None)
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    site_sha = hashlib.sha256(site1.read_bytes()).hexdigest()
    log = AuditLog(tmp_path / "audit.sqlite")   # then: C live, C_site in shadow on the same trucks
    want = []
    for i in range(150):
        score = float(rng.uniform(0.0, 0.5))
        log.write({**_verdict(f"t{i}", sha, "RELEASE"), "score": score})
        log.write_shadow([_shadow(f"t{i}", site_sha, "RELEASE", score)])
        want.append(score)
    log.close()
    args = SimpleNamespace(results=str(tmp_path / "audit.sqlite"), model=str(site1), out=str(tmp_path / "s2.onnx"),
                           truth=None, since=None)
    assert main(args) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "150 cleared scans" in said, said
    assert read_metadata(tmp_path / "s2.onnx")["normal_scores"] == pytest.approx(sorted(want))

"""The station HTTP service, run as a real process on loopback (plus a few in-process ASGI checks)."""
import asyncio
import csv
import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import I0, NORMAL_SCORES, make_scan_counts

from detector.calibration import threshold_for_rate
from detector.scan import write_scan

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-test-token"
RATES = {"whitelist": 0.001, "standard": 0.01, "high_risk": 0.5}
POLICY = """tiers:
  whitelist: 0.001
  standard: 0.01
  high_risk: 0.5
default_tier: standard
risk_flags:
  force: [intel_hit, manifest_mismatch]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_open_files(soft: int, hard: int) -> None:
    """In the child before exec: the open-file limit of a station's shell (`ulimit -n 256`)."""
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Server:
    """`python -m detector.cli serve` on a free loopback port; always killed by stop()."""

    def __init__(self, model: Path, workdir: Path, *extra: str, token: str | None = None,
                 open_files: tuple[int, int] | None = None, tls: Any = None):
        self.port = _free_port()
        self.tls = tls   # an ssl.SSLContext trusting the server (and holding a client certificate): an https server
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.audit = workdir / "audit.sqlite"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("DETECTOR_TOKEN", None)
        if token:
            env["DETECTOR_TOKEN"] = token
        self.log = open(workdir / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detector.cli", "serve", "--model", str(model), "--port", str(self.port),
             "--audit", str(self.audit), "--threads", "1", *extra],
            cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else lambda: _limit_open_files(*open_files))
        self._wait_ready(workdir)

    def _wait_ready(self, workdir: Path, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                self.log.flush()
                raise RuntimeError(f"server exited {self.proc.returncode}: "
                                   f"{(workdir / f'server-{self.port}.log').read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1, verify=self.tls or True).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _moderate_scan(path: Path, att: float = 2.0) -> Path:
    """A scan whose heuristic score (~0.31) lies between the standard and high_risk thresholds."""
    c = make_scan_counts(seed=5).astype(np.float64)
    block = np.stack([I0 * np.exp(-att * r) * np.ones((60, 96)) for r in (1.0, 1.3)])
    c[:, 80:140, 240:336] = np.random.default_rng(7).poisson(block)
    return write_scan(path, c.astype(np.uint16), i0=(I0, I0), pitch_mm=5.0, energies=("high", "low"))


@pytest.fixture(scope="module")
def server(heuristic_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    (work / "policy.yaml").write_text(POLICY)
    srv = Server(heuristic_model, work, "--policy", str(work / "policy.yaml"), "--max-upload-mb", "1",
                 token=TOKEN)
    yield srv
    srv.stop()


def _post(srv, path: Path | None = None, meta=None, token=TOKEN, data: bytes | None = None, name=None):
    files = {"scan": (name or (path.name if path else "scan.tiff"), data if data is not None else path.read_bytes())}
    form = {} if meta is None else {"meta": meta if isinstance(meta, str) else json.dumps(meta)}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(srv.url + "/v1/inspect", files=files, data=form, headers=headers, timeout=30)


def test_normal_released_anomalous_inspected(server, heuristic_model, normal_scan_path, anomalous_scan_path):
    sha = hashlib.sha256(Path(heuristic_model).read_bytes()).hexdigest()
    r = _post(server, normal_scan_path, {"vehicle_id": "V-1", "container_id": "C-1"})
    assert r.status_code == 200
    v = r.json()
    assert set(v) >= {"decision", "score", "threshold", "tier", "reason", "regions", "model_sha256",
                      "request_id", "latency_ms"}
    assert v["decision"] == "RELEASE" and v["tier"] == "standard" and v["model_sha256"] == sha
    assert v["threshold"] == pytest.approx(threshold_for_rate(NORMAL_SCORES, 0.01))
    assert v["score"] < v["threshold"] and "standard" in v["reason"]
    a = _post(server, anomalous_scan_path).json()
    assert a["decision"] == "INSPECT" and a["score"] >= a["threshold"] and a["regions"]
    assert a["request_id"] != v["request_id"]


def test_tiers_route_the_same_score_differently(server, tmp_path):
    scan = _moderate_scan(tmp_path / "moderate.tiff")
    got = {t: _post(server, scan, {"tier": t}).json() for t in RATES}
    assert len({g["score"] for g in got.values()}) == 1
    for t, g in got.items():
        assert g["tier"] == t and g["threshold"] == pytest.approx(threshold_for_rate(NORMAL_SCORES, RATES[t]))
    assert got["whitelist"]["decision"] == got["standard"]["decision"] == "RELEASE"
    assert got["high_risk"]["decision"] == "INSPECT" and "high_risk" in got["high_risk"]["reason"]


def test_unknown_tier_gets_strictest(server, tmp_path):
    v = _post(server, _moderate_scan(tmp_path / "m.tiff"), {"tier": "vip-no-check"}).json()
    assert v["tier"] == "high_risk" and v["decision"] == "INSPECT"
    assert "unknown tier 'vip-no-check'" in v["reason"]


def test_risk_flag_forces_inspection(server, normal_scan_path):
    v = _post(server, normal_scan_path, {"tier": "whitelist", "risk_flags": ["intel_hit"]}).json()
    assert v["decision"] == "INSPECT" and "intel_hit" in v["reason"]
    other = _post(server, normal_scan_path, {"tier": "whitelist", "risk_flags": ["late_arrival"]}).json()
    assert other["decision"] == "RELEASE"  # not in the policy's forcing list


def test_failures_are_inspect_with_reason(server, normal_scan_path):
    corrupt = normal_scan_path.read_bytes()[:3000]
    v = _post(server, data=corrupt, name="truncated.tiff")
    assert v.status_code == 200 and v.json()["decision"] == "INSPECT"
    assert v.json()["score"] is None and "truncated.tiff" in v.json()["reason"]
    bad_meta = _post(server, normal_scan_path, "{not json").json()
    assert bad_meta["decision"] == "INSPECT" and "meta" in bad_meta["reason"]
    no_file = httpx.post(server.url + "/v1/inspect", data={"meta": "{}"},
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert no_file.status_code == 200 and no_file.json()["decision"] == "INSPECT"
    assert "multipart/form-data with the file in field 'scan'" in no_file.json()["reason"]
    raw = httpx.post(server.url + "/v1/inspect", content=normal_scan_path.read_bytes(), timeout=10,
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"})
    assert raw.status_code == 200 and raw.json()["decision"] == "INSPECT"
    assert "(got Content-Type application/octet-stream)" in raw.json()["reason"]
    empty = httpx.post(server.url + "/v1/inspect", files={"meta": (None, "{}")},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert empty.json()["decision"] == "INSPECT" and "no file in form field 'scan'" in empty.json()["reason"]
    scan = normal_scan_path.read_bytes()
    two = httpx.post(server.url + "/v1/inspect", files=[("scan", ("a.tiff", scan)), ("scan", ("b.tiff", scan))],
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert two.json()["decision"] == "INSPECT" and "2 parts named 'scan'" in two.json()["reason"]


def test_token_required(server, normal_scan_path):
    assert _post(server, normal_scan_path, token="wrong").status_code == 401
    assert _post(server, normal_scan_path, token=None).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_oversized_upload_413(server):
    big = os.urandom(1_300_000)  # limit is 1 MB
    assert _post(server, data=big, name="big.tiff").status_code == 413

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"big.tiff\"\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n")
        yield body
        for _ in range(20):
            yield b"\0" * 65536

    r = httpx.post(server.url + "/v1/inspect", content=chunks(), timeout=10,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 413


def _score_histogram(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith("detector_score"))}


def test_metrics_and_audit_rows(server, normal_scan_path, tmp_path):
    from detector.serve_metrics import SCORE_BUCKETS
    before = _score_histogram(server)
    answer = _post(server, normal_scan_path, {"vehicle_id": "V-77"}).json()
    rid = answer["request_id"]
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    for name in ("detector_requests_total", 'detector_decisions_total{decision="RELEASE"}', "detector_errors_total",
                 "detector_inspect_latency_seconds_bucket", "detector_model_info{sha256="):
        assert name in text
    # the score histogram (a site's drift): this scan added one to every bucket at or above its score, none below
    after = _score_histogram(server)
    added = {k: after[k] - before[k] for k in after}
    assert added["detector_score_count"] == added['detector_score_bucket{le="+Inf"}'] == 1
    assert abs(added["detector_score_sum"] - answer["score"]) < 1e-5
    assert [added[f'detector_score_bucket{{le="{b:g}"}}'] for b in SCORE_BUCKETS] == \
           [float(b >= answer["score"]) for b in SCORE_BUCKETS]
    (tmp_path / "cut.tiff").write_bytes(normal_scan_path.read_bytes()[:300])   # a failure has no score to count
    assert _post(server, tmp_path / "cut.tiff", {}).json()["decision"] == "INSPECT"
    assert _score_histogram(server) == after
    out = tmp_path / "audit.csv"
    res = subprocess.run([sys.executable, "-m", "detector.cli", "audit", "export", "--audit", str(server.audit),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "exported" in res.stdout
    rows = {r.split(",")[1]: r for r in out.read_text().splitlines()[1:]}
    assert rid in rows and "V-77" in rows[rid] and "RELEASE" in rows[rid]


def _outcome(srv, body, token=TOKEN) -> httpx.Response:
    """POST /v1/outcome with a JSON body (a str or bytes is sent as it is)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, (str, bytes)):
        return httpx.post(srv.url + "/v1/outcome", content=body, timeout=10,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(srv.url + "/v1/outcome", json=body, headers=headers, timeout=10)


def _outcome_counts(srv) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines()
                                     if ln.startswith("detector_outcomes_total{"))}


def test_outcome_recorded_counted_and_exported(server, normal_scan_path, tmp_path):
    rid = _post(server, normal_scan_path, {"vehicle_id": "V-88"}).json()["request_id"]
    before = _outcome_counts(server)
    assert len(before) == 4   # every decision x outcome from the start, so rate() works on the first one
    r = _outcome(server, {"request_id": rid, "outcome": "clear", "officer": "K. Osei"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"request_id", "outcome", "decision", "recorded_at"}
    assert (r.json()["request_id"], r.json()["outcome"], r.json()["decision"]) == (rid, "clear", "RELEASE")
    fixed = _outcome(server, {"request_id": rid, "outcome": "found", "note": "random check: undeclared tyres"})
    assert fixed.status_code == 200 and fixed.json()["recorded_at"] >= r.json()["recorded_at"]
    added = {k: v - before[k] for k, v in _outcome_counts(server).items()}
    assert added == {'detector_outcomes_total{decision="INSPECT",outcome="clear"}': 0,
                     'detector_outcomes_total{decision="INSPECT",outcome="found"}': 0,
                     'detector_outcomes_total{decision="RELEASE",outcome="clear"}': 1,
                     'detector_outcomes_total{decision="RELEASE",outcome="found"}': 1}
    out = tmp_path / "audit.csv"
    res = subprocess.run([sys.executable, "-m", "detector.cli", "audit", "export", "--audit", str(server.audit),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    row = next(r for r in csv.DictReader(out.open()) if r["request_id"] == rid)
    assert (row["vehicle_id"], row["outcome"], row["outcome_note"], row["outcome_time"]) == \
           ("V-88", "found", "random check: undeclared tyres", fixed.json()["recorded_at"])


def test_outcome_refusals_are_http_errors_not_verdicts(server, normal_scan_path):
    rid = _post(server, normal_scan_path).json()["request_id"]
    before = _outcome_counts(server)
    cases = [({"request_id": "0" * 32, "outcome": "found"}, 404, "no verdict with request_id"),
             ({"request_id": rid, "outcome": "seized"}, 400, "outcome must be one of found, clear"),
             ({"request_id": rid}, 400, "outcome must be one of"),
             ({"request_id": rid, "outcome": "found", "officer": "o" * 201}, 400, "at most 200"),
             ({"request_id": rid, "outcome": "found", "notes": "misspelt"}, 400, "unknown key(s) 'notes'"),
             ('{"request_id": "' + rid + '", "outcome": ', 400, "must be a JSON object"),
             ('["found"]', 400, "must be a JSON object, got list"),
             ('{"note": "' + "n" * 70000 + '"}', 413, "at most 65536 bytes")]
    for body, code, why in cases:
        r = _outcome(server, body)
        assert r.status_code == code and why in r.json()["detail"], (body, r.status_code, r.text)
        assert "decision" not in r.json() and ".sqlite" not in r.json()["detail"]
    for token in (None, "wrong"):
        r = _outcome(server, {"request_id": rid, "outcome": "found"}, token=token)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _outcome_counts(server) == before


def test_kill9_under_load_keeps_every_answered_verdict(heuristic_model, normal_scan_path, tmp_path):
    srv = Server(heuristic_model, tmp_path, "--max-queue", "2")
    answered: list[str] = []
    codes: list[int] = []
    stop = threading.Event()
    data = normal_scan_path.read_bytes()

    def client() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post(srv.url + "/v1/inspect", files={"scan": ("n.tiff", data)})
                except httpx.HTTPError:
                    continue
                codes.append(r.status_code)
                if r.status_code == 200:
                    answered.append(r.json()["request_id"])

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.5)
        srv.proc.kill()  # SIGKILL mid-load: no shutdown hooks, no final flush
        srv.proc.wait()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        srv.stop()
    assert len(answered) >= 5, codes
    again = Server(heuristic_model, tmp_path, "--max-queue", "2")  # restarts on the same audit log
    try:
        assert httpx.post(again.url + "/v1/inspect", files={"scan": ("n.tiff", data)}).status_code == 200
    finally:
        again.stop()
    db = sqlite3.connect(str(tmp_path / "audit.sqlite"))
    logged = {r[0] for r in db.execute("SELECT request_id FROM verdicts")}
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    missing = [r for r in answered if r not in logged]
    assert not missing, f"{len(missing)} of {len(answered)} answered verdicts not in the audit log"


# ---------------------------------------------------------------- in-process: queue, deadline, crashes

class _FakeInspector:
    """Stands in for Inspector: sleeps `delay` s, then answers a fixed score (or raises)."""

    def __init__(self, delay: float = 0.0, score: float = 0.2, boom: bool = False):
        self.delay, self.score, self.boom = delay, score, boom
        self.model_sha256, self.channels, self.threshold = "f" * 64, 2, 0.5
        self.metadata = {"normal_scores": list(np.linspace(0, 1, 101)), "created": "test"}

    def inspect_safe(self, src, deadline_ms=None, threshold=None):
        if self.boom:
            raise RuntimeError("kaboom")
        time.sleep(self.delay)
        return SimpleNamespace(score=self.score, regions=[], error=None)


def _service(tmp_path, inspector, **cfg):
    from detector.audit import AuditLog
    from detector.policy import Policy
    from detector.serve import ServeConfig, Service
    policy = Policy()
    policy.bind(inspector)
    svc = Service(ServeConfig(model="fake.onnx", **cfg), inspector, policy, AuditLog(tmp_path / "a.sqlite"))
    svc.ready = True
    return svc


async def _burst(svc, n: int) -> list[httpx.Response]:
    from detector.serve import create_app
    transport = httpx.ASGITransport(app=create_app(svc))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*[c.post("/v1/inspect", files={"scan": ("x.npy", b"123")}) for _ in range(n)])


def test_queue_full_gives_429(tmp_path):
    svc = _service(tmp_path, _FakeInspector(delay=0.3), concurrency=1, max_queue=1)
    codes = sorted(r.status_code for r in asyncio.run(_burst(svc, 5)))
    assert codes == [200, 200, 429, 429, 429]
    assert svc.audit.count() == 2


def test_deadline_and_internal_errors_fail_closed(tmp_path):
    slow = _service(tmp_path, _FakeInspector(delay=1.5), deadline_ms=100)
    r = asyncio.run(_burst(slow, 1))[0]
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT" and "deadline" in r.json()["reason"]
    boom = _service(tmp_path / "b", _FakeInspector(boom=True), deadline_ms=300)
    for _ in range(2):   # the crash freed its inference slot: the next truck is not left "queued"
        r = asyncio.run(_burst(boom, 1))[0]
        assert r.status_code == 200 and r.json()["decision"] == "INSPECT" and "kaboom" in r.json()["reason"]
    assert boom.audit.count() == 2


async def _post_parts(svc, parts: list) -> httpx.Response:
    from detector.serve import create_app
    transport = httpx.ASGITransport(app=create_app(svc))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.post("/v1/inspect", files=parts)


class _NameRecorder(_FakeInspector):
    """A _FakeInspector that keeps the name each scan was handed to the readers under."""

    names: list = []

    def inspect_safe(self, src, deadline_ms=None, threshold=None):
        self.names.append(src[1])
        return super().inspect_safe(src, deadline_ms, threshold)


def test_file_name_control_characters_escaped(tmp_path):
    # the upload's file name names the scan in the readers' warnings, printed to the service's stderr: an ESC sequence
    # (erase line, cursor up), NEL or a right-to-left override in it rewrote or forged the log an operator reads
    from detector.serve import create_app
    svc = _service(tmp_path, _NameRecorder())
    name = "V1.png\x1b[1A\x1b[2K\x85detector serve: forged\u202egnp.exe".encode()
    body = b'--B\r\nContent-Disposition: form-data; name="scan"; filename="' + name + b'"\r\n\r\n123\r\n--B--\r\n'

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
            return await c.post("/v1/inspect", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})

    assert asyncio.run(run()).status_code == 200
    stored = svc.audit._db.execute("SELECT file_name FROM verdicts").fetchone()[0]
    for got in (svc.inspector.names[-1], stored):
        assert got.isprintable() and "\\x1b[1A" in got and "\\x85" in got, got
        assert got.startswith("V1.png") and got.endswith("gnp.exe")


def test_two_meta_parts_inspect(tmp_path):
    # the first part carries the forcing flag; routing by the last one alone would release the truck
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    r = asyncio.run(_post_parts(svc, [("scan", ("x.npy", b"123")),
                                      ("meta", (None, '{"risk_flags": ["intel_hit"]}')), ("meta", (None, "{}"))]))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
    assert "2 parts named 'meta'" in r.json()["reason"]
    assert svc.audit.count() == 1


@pytest.mark.parametrize("parts", [
    [("meta", (None, '{"riskflags": ["intel_hit"], "vehicle_id": "V-9"}'))],     # misspelt key
    [("meta", (None, '{"Risk_Flags": ["intel_hit"]}'))],                          # key in another case
    [("meta", (None, '{"vehicle_id": "V-9"}')), ("risk_flags", (None, "intel_hit"))],  # flags beside meta
], ids=["misspelt", "case", "form-field"])
def test_ignored_request_parts_inspect(tmp_path, parts):
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    r = asyncio.run(_post_parts(svc, [("scan", ("x.npy", b"123")), *parts]))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT", r.json()
    assert "unknown" in r.json()["reason"] and "expected" in r.json()["reason"]
    ok = asyncio.run(_post_parts(svc, [("scan", ("x.npy", b"123")), ("meta", (None, json.dumps(
        {"vehicle_id": "V-9", "container_id": "C", "tier": None, "risk_flags": []})))]))
    assert ok.json()["decision"] == "RELEASE"   # every documented key still routes by score
    assert svc.audit.count() == 2


async def _post_raw(svc, body: bytes, boundary: str = "B") -> httpx.Response:
    """`body` posted to `svc`'s /v1/inspect as it is, as a station client's own multipart writer sends it."""
    from detector.serve import create_app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
        return await c.post("/v1/inspect", content=body,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _part(disposition: bytes, data: bytes, ctype: bytes | None = None) -> bytes:
    return (b"--B\r\nContent-Disposition: " + disposition + b"\r\n" + (b"Content-Type: " + ctype + b"\r\n" if ctype
            else b"") + b"\r\n" + data + b"\r\n")


@pytest.mark.parametrize("tail", [b"", b"--B\r\n", b"--B"], ids=["cut-after-meta", "open-part", "no-dashes"])
def test_a_body_without_its_closing_boundary_inspects_and_says_so(tmp_path, tail):
    """A station's own multipart writer that leaves out the closing `--B--` (or a body cut short with a clean end):
    the parser dropped the last part unseen, so a meta carrying a forcing risk flag was lost and the truck RELEASEd."""
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    body = (_part(b'form-data; name="scan"; filename="V7.tiff"', b"123")
            + _part(b'form-data; name="meta"', b'{"vehicle_id": "V7", "risk_flags": ["intel_hit"]}')[:-2] + tail)
    r = asyncio.run(_post_raw(svc, body))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT", r.json()
    assert "closing boundary" in r.json()["reason"], r.json()
    whole = asyncio.run(_post_raw(svc, body[:-len(tail) or None] + b"\r\n--B--\r\n"))
    assert whole.json()["decision"] == "INSPECT" and "intel_hit" in whole.json()["reason"], whole.json()
    assert svc.audit.count() == 2


@pytest.mark.parametrize("disposition, stored", [
    (b"form-data; name=scan; filename*=UTF-8''%E5%8D%A1%E8%BD%A6.tiff", "\u5361\u8f66.tiff"),    # RFC 5987 alone
    (b'form-data; name="scan"; filename="=?utf-8?B?5Y2h6L2mLnRpZmY=?="; filename*=utf-8\'\'%E5%8D%A1%E8%BD%A6.tiff',
     "\u5361\u8f66.tiff"),                                                          # .NET's MultipartFormDataContent
    (b"form-data; name=scan; filename*=iso-8859-1'de'Gr%FCn.tiff", "Gr\u00fcn.tiff"),
    (b"form-data; name=scan", "scan"),                    # .NET's ByteArrayContent, Java's addBinaryBody(name, bytes)
    (b'form-data; name=scan; filename="a; filename*=UTF-8\'\'b.tiff"', "a; filename*=UTF-8''b.tiff"),
], ids=["filename*", "dotnet", "latin-1", "no-filename", "quoted"])
def test_a_scan_part_named_as_other_languages_clients_name_it_is_routed_and_audited_under_its_name(
        tmp_path, disposition, stored):
    """A scan part with only an RFC 5987 `filename*`, or none at all, was read as a text field: every truck INSPECT
    ("no file in form field 'scan'", or "Part exceeded maximum size of 1024KB" past 1 MB); .NET's non-ASCII names were
    audited as the MIME word of its `filename` ("=?utf-8?B?...?="). The part named scan is the scan, and its name is
    its `filename*` where one is given."""
    svc = _service(tmp_path, _NameRecorder(score=0.2))
    data = b"\x00\xff" * 600_000                          # over 1 MB, and not text
    r = asyncio.run(_post_raw(svc, _part(disposition, data, b"application/octet-stream") + b"--B--\r\n"))
    assert r.status_code == 200 and r.json()["decision"] == "RELEASE", r.json()
    row = svc.audit._db.execute("SELECT file_name, file_bytes, file_sha256 FROM verdicts").fetchone()
    assert svc.inspector.names[-1] == stored and row == (stored, len(data), hashlib.sha256(data).hexdigest()), row


@pytest.mark.parametrize("body, named", [
    (b'--B\nContent-Disposition: form-data; name="scan"; filename="a.tiff"\n\n123\n--B--\n', "CRLF"),
    (b'preamble\r\n' + _part(b'form-data; name="scan"; filename="a.tiff"', b"123") + b"--B--\r\n", "boundary"),
], ids=["lf-only", "preamble"])
def test_a_malformed_multipart_body_is_inspected_with_what_is_wrong(tmp_path, body, named):
    """A body with bare LF line ends (a hand-written writer on Linux), or text before the first boundary, was answered
    'Invalid multipart data.' alone: an integrator could not tell what to change. The reason now says where the parser
    stopped, and what it expects."""
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    r = asyncio.run(_post_raw(svc, body))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT", r.json()
    assert named in r.json()["reason"] and "at byte" in r.json()["reason"], r.json()["reason"]


def _serve_args(model, tmp_path) -> SimpleNamespace:
    return SimpleNamespace(model=str(model), host="127.0.0.1", port=0, audit=str(tmp_path / "a.sqlite"), policy=None,
                           threads=1, max_upload_mb=1.0, max_queue=1, concurrency=1, deadline_ms=1000.0)


def test_blank_or_padded_token(heuristic_model, tmp_path, monkeypatch, capsys):
    import uvicorn

    from detector import serve
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.setattr(serve, "create_app", lambda svc: svc)
    # an empty DETECTOR_TOKEN ($UNSET_VAR in a unit file) used to serve without authentication
    monkeypatch.setenv("DETECTOR_TOKEN", "")
    assert serve.main(_serve_args(heuristic_model, tmp_path)) == 2 and not started
    assert "DETECTOR_TOKEN is set but empty" in capsys.readouterr().err
    # a token read with its newline could never match: HTTP strips the header value
    monkeypatch.setenv("DETECTOR_TOKEN", "tok\n")
    assert serve.main(_serve_args(heuristic_model, tmp_path)) == 0 and len(started) == 1
    svc = started[0]
    ask = lambda value: SimpleNamespace(headers={"authorization": value})  # noqa: E731
    assert svc.authorised(ask("Bearer tok")) and not svc.authorised(ask("Bearer tok2"))
    assert not svc.authorised(ask(""))
    svc.close()
    assert "DETECTOR_TOKEN is 3 characters" in capsys.readouterr().err   # a guessable secret is warned about
    # a token outside printable ASCII could never match (a header is read as Latin-1): every request was 401
    monkeypatch.setenv("DETECTOR_TOKEN", "geheim-schlüssel-2026-station")
    assert serve.main(_serve_args(heuristic_model, tmp_path)) == 2 and len(started) == 1
    assert "not printable ASCII (at position 12)" in capsys.readouterr().err
    # the token never shows in a logged config
    assert "s3cret" not in repr(serve.ServeConfig(model="m.onnx", token="s3cret-token-of-the-station"))


def test_scan_warnings_of_served_trucks_are_not_remembered(heuristic_model_1ch, tmp_path, monkeypatch):
    # Python remembers each warning text it has shown in the warning module's registry, and a reader's warning names
    # the file: a station sending RGB renderings (or scans without open beam) grew it by one entry per truck, for
    # as long as the service ran
    import cv2
    import uvicorn

    from detector import scan, serve
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.setattr(serve, "create_app", lambda svc: svc)
    monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    assert serve.main(_serve_args(heuristic_model_1ch, tmp_path)) == 0
    svc = started[0]
    rgb = np.repeat((make_scan_counts(seed=1)[0] // 256).astype(np.uint8)[..., None], 3, axis=2)
    data = cv2.imencode(".png", rgb)[1].tobytes()
    before = len(getattr(scan, "__warningregistry__", {}))
    scan._SHOWN.clear()
    with warnings.catch_warnings(record=True) as shown:   # under the filters serve.main set
        for i in range(20):
            v = serve._run(svc.inspector, data, f"V{i:04d}.png", 10000.0, svc.inspector.threshold)
            assert v.error is None
    svc.close()
    assert len(getattr(scan, "__warningregistry__", {})) <= before + 1
    # each truck's warning is shown (the log names every warned file), and none is remembered (scan.warn_scan's own
    # bounded registry stays empty under the "always" action)
    assert sum("V0007.png" in str(w.message) for w in shown) == 1 and len(shown) == 20
    assert [k for k in scan._SHOWN if k != "version"] == []


def test_unpaired_surrogate_in_meta_is_audited_once(tmp_path):
    # '\ud800' parses as JSON but cannot be written as UTF-8: the audit write failed (no row), or the
    # answer failed after it and was answered and counted a second time
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    for meta in ('{"vehicle_id": "\\ud800"}', '{"risk_flags": ["\\ud800"]}'):
        r = asyncio.run(_post_parts(svc, [("scan", ("x.npy", b"123")), ("meta", (None, meta))]))
        assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
        assert "surrogate" in r.json()["reason"] and "audit write failed" not in r.json()["reason"]
    assert svc.audit.count() == 2 and svc.metrics.audit_failures == 0
    assert svc.metrics.latency.count == 2 and svc.metrics.by_status == {"200": 2}


def test_stalled_upload_frees_its_admission(tmp_path):
    # an upload that stops mid-body (station link lost, no FIN) held its queue place for good: a few of
    # them and every later truck got 429
    from detector.serve import create_app
    svc = _service(tmp_path, _FakeInspector(), concurrency=1, max_queue=1, deadline_ms=300)
    head = (b'--B\r\nContent-Disposition: form-data; name="scan"; filename="a.npy"\r\n\r\n' + b"\0" * 100)

    async def stalled():
        yield head
        await asyncio.sleep(30)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            hdr = {"Content-Type": "multipart/form-data; boundary=B"}
            stuck = [c.post("/v1/inspect", content=stalled(), headers=hdr) for _ in range(2)]
            return await asyncio.wait_for(asyncio.gather(*stuck), 5)

    for r in asyncio.run(run()):
        assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
        assert "exceeded while receiving the upload" in r.json()["reason"]
    assert svc.admitted == 0 and svc.audit.count() == 2
    assert asyncio.run(_burst(svc, 1))[0].status_code == 200


def _record_threads(monkeypatch) -> list:
    """The `threads` each Inspector the service builds is given, in order."""
    from detector import runtime
    built: list = []

    class Recording(runtime.Inspector):
        def __init__(self, path, threads=None, **kw):
            built.append(threads)
            super().__init__(path, threads=threads, **kw)

    monkeypatch.setattr(runtime, "Inspector", Recording)
    return built


def test_threads_sized_by_affinity_not_host_cpus(heuristic_model, tmp_path, monkeypatch):
    # a station container pinned to 2 of 16 host cores ran 16 onnxruntime threads per inference slot
    from detector import serve
    built = _record_threads(monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for concurrency, want in ((1, 2), (2, 1), (4, 1)):
        svc = serve.build_service(serve.ServeConfig(model=str(heuristic_model), audit=str(tmp_path / "a.sqlite"),
                                                    concurrency=concurrency))
        svc.close()
        assert built[-1] == want, (concurrency, built)
    svc = serve.build_service(serve.ServeConfig(model=str(heuristic_model), audit=str(tmp_path / "a.sqlite"),
                                                threads=3))
    svc.close()
    assert built[-1] == 3   # an explicit --threads is kept as given


def test_threads_sized_by_a_cpu_quota_and_the_start_line_says_so(heuristic_model, tmp_path, monkeypatch, capsys,
                                                                   cgroup):
    """A station container run with --cpus=2 on a 64-core host: every core in its affinity, a 2-CPU quota. Each slot
    ran 64 onnxruntime threads, throttled every period; the start line did not say how many."""
    import uvicorn

    from detector import serve
    built = _record_threads(monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    cgroup("0::/\n", {"cpu.max": "200000 100000\n"})
    for concurrency, want in ((1, 2), (2, 1)):
        svc = serve.build_service(serve.ServeConfig(model=str(heuristic_model), audit=str(tmp_path / "a.sqlite"),
                                                    concurrency=concurrency))
        svc.close()
        assert built[-1] == want, (concurrency, built)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(serve, "create_app", lambda svc: svc)
    monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    args = _serve_args(heuristic_model, tmp_path)
    args.threads = None
    assert serve.main(args) == 0
    assert "2 onnxruntime threads x 1 slot (a CPU quota of 2 of the 64 cores)" in capsys.readouterr().err


def test_locked_audit_db_answers_by_the_deadline_and_keeps_the_row(tmp_path, capsys):
    # another connection (an operator's sqlite3 shell, a backup) holding the audit database's write lock made
    # each truck wait sqlite's 30 s busy timeout, and the row of that verdict was then dropped
    # a 1 s deadline: on a loaded 2-core CI host this first locked request once took 1.03 s against 0.3 s, and once
    # ran past 0.3 s while its 3-byte upload was received
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=1000)
    other = sqlite3.connect(str(tmp_path / "a.sqlite"), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.perf_counter()
        r = asyncio.run(asyncio.wait_for(_burst(svc, 1), 10))[0]
        took = time.perf_counter() - t0
    finally:
        other.execute("ROLLBACK")
    v = r.json()
    assert took < 1.0 + 1.5, took   # sqlite's busy timeout was 30 s
    assert r.status_code == 200 and v["decision"] == "INSPECT" and "database is locked" in v["reason"]
    assert "score 0.2" in v["reason"]   # the model's reason is kept beside the audit one
    assert svc.metrics.audit_deferred == 1 and len(svc.audit_backlog) == 1 and svc.metrics.audit_failures == 0
    assert "detector_audit_pending 1" in svc.metrics.render(svc)
    assert v["request_id"] in capsys.readouterr().err
    asyncio.run(svc.flush_audit())   # what the service's retry task does every AUDIT_RETRY_S
    assert not svc.audit_backlog and "detector_audit_pending 0" in svc.metrics.render(svc)
    db = sqlite3.connect(str(tmp_path / "a.sqlite"))
    rows = db.execute("SELECT request_id, decision, reason FROM verdicts").fetchall()
    db.close()
    assert rows == [(v["request_id"], "INSPECT", v["reason"])]   # the row says what was answered
    # a lock released within the deadline is waited for: the truck is routed by its score
    svc = _service(tmp_path / "b", _FakeInspector(score=0.2), deadline_ms=3000)
    other = sqlite3.connect(str(tmp_path / "b" / "a.sqlite"), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: other.execute("ROLLBACK")).start()
    r = asyncio.run(_burst(svc, 1))[0]
    assert r.json()["decision"] == "RELEASE" and svc.audit.count() == 1 and svc.metrics.audit_deferred == 0


def test_deadline_holds_past_an_uninterruptible_stage_on_a_big_upload(tmp_path):
    # decoding a scan near max_upload_mb (a 66 MB zlib TIFF: ~2.5 s) cannot be interrupted; the service
    # waited for it a whole second past the deadline, and the audit row of that verdict lost the file's sha256
    svc = _service(tmp_path, _FakeInspector(delay=1.5), deadline_ms=300, max_upload_mb=8)
    data = os.urandom(7_900_000)

    async def run() -> tuple[httpx.Response, float, int]:
        from detector.serve import create_app
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
            t0 = time.perf_counter()
            r = await c.post("/v1/inspect", files={"scan": ("big.tiff", data)})
            took = time.perf_counter() - t0
        held = svc.slots.locked()   # the abandoned run keeps its slot until it ends, then frees it
        await asyncio.get_running_loop().run_in_executor(None, svc.pool.shutdown)
        await asyncio.sleep(0)
        return r, took, held and not svc.slots.locked()

    r, took, slot_freed = asyncio.run(run())
    v = r.json()
    assert r.status_code == 200 and v["decision"] == "INSPECT" and "deadline of 300 ms exceeded" in v["reason"]
    assert took < 0.3 + 0.3, took
    db = sqlite3.connect(str(tmp_path / "a.sqlite"))
    row = db.execute("SELECT decision, file_bytes, file_sha256 FROM verdicts WHERE request_id = ?",
                     (v["request_id"],)).fetchone()
    db.close()
    assert row == ("INSPECT", len(data), hashlib.sha256(data).hexdigest()) and slot_freed


def _spooled(db: Path) -> list[dict]:
    """The rows in the audit database's spool of deferred rows ([] when there is none)."""
    spool = Path(f"{db}.pending.jsonl")
    return [json.loads(line) for line in spool.read_text().splitlines()] if spool.exists() else []


def _answer_while_locked(svc, db: Path) -> dict:
    """One request answered while another connection holds the audit database's write lock."""
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        return asyncio.run(asyncio.wait_for(_burst(svc, 1), 10))[0].json()
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_deferred_row_is_spooled_before_the_answer_and_unspooled_once_committed(tmp_path):
    # the row queued behind a locked database lived in memory only: a kill before the retry lost it
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    v = _answer_while_locked(svc, db)
    assert v["decision"] == "INSPECT" and "database is locked" in v["reason"]
    spooled = _spooled(db)
    assert [(r["request_id"], r["decision"], r["reason"]) for r in spooled] == [(v["request_id"], "INSPECT",
                                                                                  v["reason"])]
    assert "detector_audit_pending 1" in svc.metrics.render(svc)
    asyncio.run(svc.flush_audit())   # the retry task, now that the lock is gone
    assert svc.audit.count() == 1 and not svc.audit_backlog and _spooled(db) == []
    assert "detector_audit_pending 0" in svc.metrics.render(svc)
    svc.close()


def test_spooled_row_is_committed_once_at_restart(tmp_path):
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    v = _answer_while_locked(svc, db)
    spool_text = Path(f"{db}.pending.jsonl").read_text()
    svc.audit.close()   # killed: no retry, no shutdown flush
    again = _service(tmp_path, _FakeInspector(score=0.2))
    rows = again.audit._db.execute("SELECT request_id, decision, reason FROM verdicts").fetchall()
    assert rows == [(v["request_id"], "INSPECT", v["reason"])] and not again.audit_backlog and _spooled(db) == []
    again.close()
    # killed after the retry committed the row but before the spool was rewritten: replayed, not duplicated
    Path(f"{db}.pending.jsonl").write_text(spool_text)
    third = _service(tmp_path, _FakeInspector(score=0.2))
    assert third.audit.count() == 1 and third.metrics.audit_failures == 0 and _spooled(db) == []
    third.close()


def test_spool_left_while_the_database_is_still_locked_is_retried(tmp_path):
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    rid = _answer_while_locked(svc, db)["request_id"]
    svc.audit.close()
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:   # the service starts anyway; the row stays spooled and queued for the retry task
        again = _service(tmp_path, _FakeInspector(score=0.2))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [r["request_id"] for r in again.audit_backlog] == [rid] and len(_spooled(db)) == 1
    asyncio.run(again.flush_audit())
    assert again.audit.count() == 1 and _spooled(db) == []
    again.close()


def _two_lanes(tmp_path):
    """Two lanes' services on one audit database (tmp_path/a.sqlite) and its spool, at a 0.3 s deadline."""
    return (tmp_path / "a.sqlite", *(_service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300) for _ in "ab"))


def test_two_lanes_on_one_audit_log_keep_each_others_spooled_rows(tmp_path):
    # two services (two lanes) share one database, so one spool: a lane whose rows were committed rewrote the spool to
    # its own queue, erasing the rows the other lane (stopped, or restarting onto a new model) had left there
    db, lane_a, lane_b = _two_lanes(tmp_path)
    other = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")   # a backup holds the write lock
    try:
        rid_a = asyncio.run(_burst(lane_a, 1))[0].json()["request_id"]
        rid_b = asyncio.run(_burst(lane_b, 1))[0].json()["request_id"]
        assert {r["request_id"] for r in _spooled(db)} == {rid_a, rid_b}
        lane_b.audit.close()   # lane B stops while the lock is held: its row is left in the spool
    finally:
        other.execute("ROLLBACK")
        other.close()
    lane_a._flush_backlog(0.05)   # lane A commits its own queued row and rewrites the spool without it
    assert not lane_a.audit_backlog and [r["request_id"] for r in _spooled(db)] == [rid_b]
    lane_b = _service(tmp_path, _FakeInspector(score=0.2))   # lane B's restart commits its row
    ids = {r[0] for r in lane_b.audit._db.execute("SELECT request_id FROM verdicts")}
    assert ids == {rid_a, rid_b} and _spooled(db) == []
    lane_a.close()
    lane_b.close()


def test_outcome_at_one_lane_for_a_verdict_the_other_lane_still_queues_is_503_not_404(tmp_path):
    # the officer's desk posts to lane B for a truck lane A answered while the database was locked: B answered 404 "no
    # verdict with that request_id" (a client gives up on a 404) though the row was spooled and would be committed
    db, lane_a, lane_b = _two_lanes(tmp_path)
    rid = _answer_while_locked(lane_a, db)["request_id"]
    r = asyncio.run(_post_outcome(lane_b, {"request_id": rid, "outcome": "clear"}))
    assert r.status_code == 503 and "still queued" in r.json()["detail"]
    asyncio.run(lane_a.flush_audit())
    assert asyncio.run(_post_outcome(lane_b, {"request_id": rid, "outcome": "clear"})).status_code == 200
    assert asyncio.run(_post_outcome(lane_b, {"request_id": "nope", "outcome": "clear"})).status_code == 404
    lane_a.close()
    lane_b.close()


def test_a_running_lane_commits_the_rows_a_stopped_lane_left_in_the_spool(tmp_path):
    # lane B was killed while a backup held the database: its row waited in the shared spool until some service next
    # started (missing from exports, summary and calibrate), and lane A answered its outcome 503 "retry" for good
    db, lane_a, lane_b = _two_lanes(tmp_path)
    v = _answer_while_locked(lane_b, db)
    lane_b.audit.close()   # killed: no retry, no shutdown flush
    asyncio.run(lane_a.flush_audit())   # lane A's retry tick, its own queue empty
    rows = lane_a.audit._db.execute("SELECT request_id, decision, reason FROM verdicts").fetchall()
    assert rows == [(v["request_id"], "INSPECT", v["reason"])] and _spooled(db) == []
    r = asyncio.run(_post_outcome(lane_a, {"request_id": v["request_id"], "outcome": "clear"}))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
    asyncio.run(lane_a.flush_audit())   # no spool: nothing to do
    assert lane_a.audit.count() == 1 and lane_a.metrics.audit_failures == 0
    lane_a.close()


def test_a_row_both_lanes_retry_is_stored_once_and_the_loser_takes_it_as_done(tmp_path, capsys):
    db, lane_a, lane_b = _two_lanes(tmp_path)
    rid = _answer_while_locked(lane_b, db)["request_id"]
    assert [r["request_id"] for r in lane_b.audit_backlog] == [rid]
    asyncio.run(lane_a.flush_audit())   # lane A commits lane B's spooled row first
    assert lane_a.audit.count() == 1 and _spooled(db) == []
    asyncio.run(lane_b.flush_audit())   # lane B's own retry finds it stored: done, not a second row, not a failure
    assert lane_b.audit.count() == 1 and not lane_b.audit_backlog and _spooled(db) == []
    assert lane_b.metrics.audit_failures == 0 and "already committed from the spool by another service" in \
        capsys.readouterr().err
    lane_a.close()
    lane_b.close()


def test_committing_another_lanes_rows_is_bounded_per_retry(tmp_path, monkeypatch):
    # fresh verdicts wait behind these commits in the one audit thread: a big spool is taken a slice per retry tick
    from detector import serve
    monkeypatch.setattr(serve, "AUDIT_ADOPT_BUDGET_S", 0.0)
    db, lane_a, lane_b = _two_lanes(tmp_path)
    rids = [_answer_while_locked(lane_b, db)["request_id"] for _ in range(3)]
    lane_b.audit.close()
    counts = []
    for _ in range(3):
        asyncio.run(lane_a.flush_audit())
        counts.append(lane_a.audit.count())
    assert counts == [1, 2, 3] and _spooled(db) == []
    assert [r[0] for r in lane_a.audit._db.execute("SELECT request_id FROM verdicts ORDER BY id")] == rids
    lane_a.close()


def test_a_lane_stopped_while_locked_says_the_running_lane_commits_its_rows(tmp_path, monkeypatch, capsys):
    # its shutdown line said only "the next start commits them": an operator restarted a lane to get them in
    from detector import serve
    monkeypatch.setattr(serve, "AUDIT_CLOSE_WAIT_S", 0.1)
    db, lane_a, lane_b = _two_lanes(tmp_path)
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        rid = asyncio.run(_burst(lane_b, 1))[0].json()["request_id"]
        lane_b.close()   # stopped while the lock is held
        assert "in " + str(lane_b.audit.spool) + " until a service on that log commits them" in lane_b.summary()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "a service running on this audit log commits them once the lock is gone" in capsys.readouterr().err
    asyncio.run(lane_a.flush_audit())
    assert [r[0] for r in lane_a.audit._db.execute("SELECT request_id FROM verdicts")] == [rid]
    lane_a.close()


def test_unwritable_spool_keeps_the_row_in_memory(tmp_path, monkeypatch, capsys):
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)

    def disk_full(record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(svc.audit, "spool_append", disk_full)
    v = _answer_while_locked(svc, db)
    assert v["decision"] == "INSPECT" and len(svc.audit_backlog) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "memory only" in err and v["request_id"] in err
    asyncio.run(svc.flush_audit())
    assert svc.audit.count() == 1 and not svc.audit_backlog
    svc.close()


class _FullDisk:
    """A stderr on a full disk (a station's `2>> serve.log` beside the audit database): every write fails."""

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_a_stderr_that_cannot_be_written_neither_hides_a_deferral_nor_stops_the_retry(tmp_path, monkeypatch):
    # the log line about a deferred row raised out of the audit thread: the answer said "audit write failed", the
    # deferral went uncounted, and the retry that committed the row raised too, ending the retry task for good
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    monkeypatch.setattr(sys, "stderr", _FullDisk())
    v = _answer_while_locked(svc, db)
    assert v["decision"] == "INSPECT" and "queued for the audit log" in v["reason"]
    assert svc.metrics.audit_deferred == 1 and len(svc.audit_backlog) == 1
    asyncio.run(svc.flush_audit())
    assert svc.audit.count() == 1 and not svc.audit_backlog and _spooled(db) == []
    svc.close()


def test_the_audit_retry_task_outlives_a_failed_retry(tmp_path, monkeypatch):
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    svc.audit_backlog.append({"request_id": "r1", "decision": "INSPECT", "reason": "queued"})
    flush, calls = svc._flush_backlog, []

    def flaky(wait_s):
        calls.append(wait_s)
        if len(calls) == 1:
            raise RuntimeError("one bad retry")
        flush(wait_s)

    monkeypatch.setattr(svc, "_flush_backlog", flaky)

    async def run() -> None:
        task = asyncio.create_task(svc.retry_audit(every_s=0.01))
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(run())
    assert len(calls) >= 2 and svc.audit.count() == 1 and not svc.audit_backlog
    svc.close()


def test_kill9_while_the_audit_db_is_locked_keeps_the_answered_row(heuristic_model, normal_scan_path, tmp_path):
    srv = Server(heuristic_model, tmp_path, "--deadline-ms", "300")
    other = sqlite3.connect(str(srv.audit), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")   # a backup holding the write lock
    try:
        v = httpx.post(srv.url + "/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())},
                       timeout=10).json()
        assert v["decision"] == "INSPECT" and "database is locked" in v["reason"]
        srv.proc.kill()   # SIGKILL before the lock is gone: the retry never ran
        srv.proc.wait()
    finally:
        other.execute("ROLLBACK")
        other.close()
        srv.stop()
    again = Server(heuristic_model, tmp_path, "--deadline-ms", "300")
    again.stop()
    db = sqlite3.connect(str(srv.audit))
    rows = db.execute("SELECT request_id, decision, reason FROM verdicts").fetchall()
    db.close()
    assert rows == [(v["request_id"], "INSPECT", v["reason"])]


def test_lane_killed_while_the_audit_db_is_locked_has_its_row_committed_by_the_other_lane(heuristic_model,
                                                                                           normal_scan_path, tmp_path):
    # two lanes' services on one audit log; lane B is killed while a backup holds the database. Its answered row waited
    # in the spool for the next start of some service, and lane A answered its outcome 503 "retry" until then
    lane_a = Server(heuristic_model, tmp_path, "--deadline-ms", "300")
    lane_b = Server(heuristic_model, tmp_path, "--deadline-ms", "300")
    try:
        other = sqlite3.connect(str(lane_b.audit), isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            v = httpx.post(lane_b.url + "/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())},
                           timeout=10).json()
            assert v["decision"] == "INSPECT" and "database is locked" in v["reason"]
            lane_b.proc.kill()
            lane_b.proc.wait()
        finally:
            other.execute("ROLLBACK")
            other.close()
        deadline = time.monotonic() + 10
        while True:   # the officer's client retries on 503, as told
            r = httpx.post(lane_a.url + "/v1/outcome", json={"request_id": v["request_id"], "outcome": "clear"},
                           timeout=10)
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
    finally:
        lane_a.stop()
        lane_b.stop()
    db = sqlite3.connect(str(lane_a.audit))
    rows = db.execute("SELECT request_id, decision, reason FROM verdicts").fetchall()
    db.close()
    assert rows == [(v["request_id"], "INSPECT", v["reason"])] and _spooled(lane_a.audit) == []


def test_readyz_shows_thresholds_only_to_an_authorised_caller(tmp_path):
    # exact thresholds tell a smuggler how far under them to tune a load; orchestrators probe without a token
    from detector.serve import create_app

    async def readyz(svc, headers=None) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
            return await c.get("/readyz", headers=headers or {})

    svc = _service(tmp_path, _FakeInspector(), token=TOKEN)
    for headers in (None, {"Authorization": "Bearer wrong"}):
        r = asyncio.run(readyz(svc, headers))
        assert r.status_code == 200 and r.json() == {"ready": True, "model_sha256": "f" * 64}
    r = asyncio.run(readyz(svc, {"Authorization": f"Bearer {TOKEN}"}))
    assert r.status_code == 200 and r.json()["tiers"] == svc.policy.thresholds
    svc.ready = False
    r = asyncio.run(readyz(svc))
    assert r.status_code == 503 and r.json() == {"ready": False, "model_sha256": "f" * 64}
    svc.close()
    open_svc = _service(tmp_path / "b", _FakeInspector())   # no token configured: as before
    r = asyncio.run(readyz(open_svc))
    assert r.status_code == 200 and r.json()["tiers"] == open_svc.policy.thresholds
    open_svc.close()


async def _post_outcome(svc, body: dict) -> httpx.Response:
    from detector.serve import create_app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
        return await c.post("/v1/outcome", json=body)


def test_outcome_behind_a_locked_audit_db_is_503_with_a_retry_hint(tmp_path, monkeypatch):
    from detector import serve
    monkeypatch.setattr(serve, "AUDIT_OUTCOME_WAIT_S", 0.2)
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    rid = asyncio.run(_burst(svc, 1))[0].json()["request_id"]
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.perf_counter()
        r = asyncio.run(asyncio.wait_for(_post_outcome(svc, {"request_id": rid, "outcome": "found"}), 10))
        took = time.perf_counter() - t0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert r.status_code == 503 and "database is locked" in r.json()["detail"] and took < 0.2 + 1.5, took
    assert r.headers["retry-after"] == str(serve.OUTCOME_RETRY_AFTER_S)
    # a verdict answered while the database was locked and not yet committed is not "unknown": retry, not 404
    queued = _answer_while_locked(svc, db)["request_id"]
    r = asyncio.run(_post_outcome(svc, {"request_id": queued, "outcome": "clear"}))
    assert r.status_code == 503 and "still queued" in r.json()["detail"]
    asyncio.run(svc.flush_audit())
    for req in (rid, queued):
        r = asyncio.run(_post_outcome(svc, {"request_id": req, "outcome": "clear"}))
        assert r.status_code == 200 and r.json()["decision"] == ("RELEASE" if req == rid else "INSPECT")
    assert svc.metrics.outcomes == {("INSPECT", "clear"): 1, ("INSPECT", "found"): 0,
                                    ("RELEASE", "clear"): 1, ("RELEASE", "found"): 0}
    svc.close()


def test_outcome_internal_error_is_500_not_a_verdict(tmp_path, monkeypatch, capsys):
    # create_app's last-resort handler answers INSPECT: an officer's client would read that as recorded
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    rid = asyncio.run(_burst(svc, 1))[0].json()["request_id"]

    def broken(*args, **kw):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(svc.audit, "record_outcome", broken)
    r = asyncio.run(_post_outcome(svc, {"request_id": rid, "outcome": "found"}))
    assert r.status_code == 500 and "RuntimeError" in r.json()["detail"] and "decision" not in r.json()
    assert "kaboom" in capsys.readouterr().err
    svc.close()



@pytest.mark.parametrize("path", ["/readyz", "/metrics"])
def test_an_error_outside_inspect_is_a_500_not_a_verdict(tmp_path, monkeypatch, path):
    # a 200 INSPECT body from /readyz reads as "ready" to an orchestrator, and from /metrics as a scrape to parse
    from detector.serve import create_app
    svc = _service(tmp_path, _FakeInspector())

    def broken(*args, **kw):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(svc, "refusal", broken)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(svc), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})

    r = asyncio.run(get())
    assert r.status_code == 500 and "decision" not in r.json() and "RuntimeError" in r.json()["detail"]
    svc.close()


def test_a_key_given_twice_in_meta_or_an_outcome_is_refused(tmp_path):
    # JSON keeps the last of two equal keys without a word: the forcing flag in the first risk_flags was dropped
    # and the truck released (two meta parts were refused for this very reason), and an outcome went to the
    # second request_id
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    meta = '{"risk_flags": ["intel_hit"], "vehicle_id": "V-9", "risk_flags": []}'
    r = asyncio.run(_post_parts(svc, [("scan", ("x.npy", b"123")), ("meta", (None, meta))]))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
    assert "'risk_flags' given twice" in r.json()["reason"]
    rid = asyncio.run(_burst(svc, 1))[0].json()["request_id"]

    async def post(body: bytes) -> httpx.Response:
        from detector.serve import create_app
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
            return await c.post("/v1/outcome", content=body, headers={"Content-Type": "application/json"})

    r = asyncio.run(post(f'{{"request_id": "x", "outcome": "found", "request_id": "{rid}"}}'.encode()))
    assert r.status_code == 400 and "'request_id' given twice" in r.json()["detail"]
    assert asyncio.run(post(f'{{"request_id": "{rid}", "outcome": "found"}}'.encode())).status_code == 200
    svc.close()


def test_meta_nested_too_deep_is_named_and_the_scan_still_audited(tmp_path):
    # json's RecursionError escaped the meta check: "internal error", and the audit row lost the scan's name and hash
    svc = _service(tmp_path, _FakeInspector(score=0.2))
    meta = '{"vehicle_id": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = asyncio.run(_post_parts(svc, [("scan", ("x.npy", b"123")), ("meta", (None, meta))]))
    assert r.status_code == 200 and r.json()["decision"] == "INSPECT"
    assert "form field 'meta'" in r.json()["reason"] and "internal error" not in r.json()["reason"]
    db = sqlite3.connect(str(tmp_path / "a.sqlite"))
    assert db.execute("SELECT file_name, file_sha256 FROM verdicts").fetchall() == [
        ("x.npy", hashlib.sha256(b"123").hexdigest())]
    db.close()
    svc.close()


@pytest.mark.parametrize("option,value", [("deadline_ms", math.inf), ("deadline_ms", math.nan), ("deadline_ms", 0.0),
                                          ("deadline_ms", -5.0), ("max_upload_mb", -1.0), ("max_upload_mb", math.nan),
                                          ("threads", -2)])
def test_settings_that_route_no_truck_are_refused_at_start(heuristic_model, tmp_path, monkeypatch, capsys, option,
                                                           value):
    # --deadline-ms inf lost every verdict's audit row (sqlite's busy timeout took int(inf)); 0, a negative or NaN
    # answered every truck INSPECT "deadline exceeded", and a negative upload limit every one 413, all while ready
    import uvicorn

    from detector import serve
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    args = _serve_args(heuristic_model, tmp_path)
    setattr(args, option, value)
    assert serve.main(args) == 2 and not started
    err = capsys.readouterr().err
    assert f"--{option.replace('_', '-')} must be " in err and ("> 0" in err or ">= 1" in err), err


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_an_audit_db_removed_while_serving_releases_no_truck_without_a_kept_row(tmp_path, how):
    # the open connection went on committing into a file that no longer had a name: trucks were RELEASED with rows
    # that vanished when the service stopped
    db = tmp_path / "a.sqlite"
    svc = _service(tmp_path, _FakeInspector(score=0.2), deadline_ms=300)
    assert asyncio.run(_burst(svc, 1))[0].json()["decision"] == "RELEASE"
    for end in ("", "-wal", "-shm"):
        Path(f"{db}{end}").unlink(missing_ok=True)
    if how == "replaced":   # e.g. a backup moved over it
        sqlite3.connect(str(db)).close()
    v = asyncio.run(_burst(svc, 1))[0].json()
    assert v["decision"] == "INSPECT" and "was removed or replaced since it was opened" in v["reason"]
    assert [r["request_id"] for r in _spooled(db)] == [v["request_id"]]
    svc.close()
    again = _service(tmp_path, _FakeInspector(score=0.2))   # the next start commits the spooled row
    assert again.audit._db.execute("SELECT request_id FROM verdicts").fetchall() == [(v["request_id"],)]
    again.close()


@pytest.mark.parametrize("value", [0.0, -4.0, float("nan"), float("inf"), 500.0])
def test_a_pitch_that_is_no_pitch_is_refused_at_start(heuristic_model, tmp_path, monkeypatch, capsys, value):
    """--pitch-mm (the scanner's pitch for scan files that carry none) that is no pitch stops the service in one
    line before it listens: it would misread or refuse every untagged truck."""
    import uvicorn

    from detector import serve
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    args = _serve_args(heuristic_model, tmp_path)
    args.pitch_mm = value
    assert serve.main(args) == 2 and not started
    err = capsys.readouterr().err
    assert err.startswith("detector serve: --pitch-mm: default pixel pitch") and err.count("\n") == 1, err


def test_serve_reads_untagged_uploads_at_the_pitch_given(heuristic_model_1ch, tmp_path, monkeypatch, capsys):
    """`detector serve --pitch-mm 4` reads an upload without a pitch (a 16-bit PNG) at 4 mm, and says so at start."""
    import uvicorn

    from detector import serve
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.setattr(serve, "create_app", lambda svc: svc)
    monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    args = _serve_args(heuristic_model_1ch, tmp_path)
    args.pitch_mm = 4.0
    assert serve.main(args) == 0 and len(started) == 1
    assert "scans without a pitch at 4 mm" in capsys.readouterr().err
    import cv2
    from conftest import make_scan_counts
    ok, png = cv2.imencode(".png", make_scan_counts(channels=1, dense=True, seed=7)[0])
    v = started[0].inspector.inspect_safe((png.tobytes(), "bare.png"))
    assert v.error is None and v.heatmap.shape == (10, 30)                   # 200 x 600 px at 4 mm: 80 x 240 model px


async def _deadline_server(app):
    """A listening server of `app` on a free local port through serve_protocol.HeadDeadlineProtocol (keep-alive 60 s,
    so only the head deadline closes an idle connection)."""
    import uvicorn

    from detector import serve_protocol
    cfg = uvicorn.Config(app, http=serve_protocol.HeadDeadlineProtocol, lifespan="off", timeout_keep_alive=60,
                         log_level="critical")
    server = uvicorn.Server(cfg)
    return await asyncio.get_running_loop().create_server(
        lambda: serve_protocol.HeadDeadlineProtocol(config=cfg, server_state=server.server_state, app_state={}),
        "127.0.0.1", 0)


def test_a_connection_that_sends_no_request_head_is_closed_and_a_begun_request_is_not(monkeypatch):
    """uvicorn timed a connection out only between requests, and any byte reset that: connections that sent nothing,
    or trickled their headers, each held a file descriptor for good, and ~1024 of them left the station's service
    answering nobody. Now a request's head must arrive within HEAD_TIMEOUT_S of connecting or of the last response;
    a request whose head is in is answered however long its answer takes."""
    from detector import serve_protocol

    monkeypatch.setattr(serve_protocol, "HEAD_TIMEOUT_S", 0.3)

    async def app(scope, receive, send):   # answers after 3x the head deadline
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.9)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> dict:
        srv = await _deadline_server(app)
        port = srv.sockets[0].getsockname()[1]

        async def closed_after(send: bytes) -> float | None:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(send)
            t0 = time.monotonic()
            try:
                data = await asyncio.wait_for(r.read(), 3.0)
            except asyncio.TimeoutError:
                return None
            finally:
                w.close()
            return time.monotonic() - t0 if data == b"" else None

        async def answered_then_closed() -> tuple[bytes, float | None]:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"ok"), 3.0)
            t0 = time.monotonic()
            rest = await asyncio.wait_for(r.read(), 3.0)   # kept alive, then idle: the deadline again
            w.close()
            return head, (time.monotonic() - t0 if rest == b"" else None)

        out = {"silent": await closed_after(b""), "trickle": await closed_after(b"GET / HTTP/1.1\r\nHo"),
               "request": await answered_then_closed()}
        srv.close()
        await srv.wait_closed()
        return out

    out = asyncio.run(run())
    assert out["silent"] is not None and out["silent"] < 1.5
    assert out["trickle"] is not None and out["trickle"] < 1.5
    head, idle = out["request"]
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"ok")   # not cut at 0.3 s while it was answered
    assert idle is not None and idle < 1.5


@pytest.mark.skipif(os.name != "posix", reason="the open-file limit is POSIX's")
def test_a_low_open_file_limit_is_raised_so_a_burst_of_connections_leaves_readyz_answering(heuristic_model, tmp_path):
    """A station whose shell's soft open-file limit is 256: 300 connections at once (a client leaking them, a burst)
    took every descriptor and /readyz went unanswered until the head deadline closed them (10 s). The service now
    raises its soft limit to the hard one at start and says the limit in its start line; where the hard limit itself
    is low it says so, with the way to raise it."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open-file limit here is {hard}")
    srv = Server(heuristic_model, tmp_path, open_files=(256, hard))
    socks = []
    try:
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(300)]
        assert httpx.get(srv.url + "/readyz", timeout=3).status_code == 200
    finally:
        for s in socks:
            s.close()
        srv.stop()
    log = (tmp_path / f"server-{srv.port}.log").read_text()
    assert "open files " in log and "(raised from 256)" in log, log
    low = Server(heuristic_model, tmp_path, open_files=(256, 256))
    low.stop()
    log = (tmp_path / f"server-{low.port}.log").read_text()
    assert "open files 256 (low" in log and "LimitNOFILE" in log and "ulimit -Hn" in log, log


def test_a_connection_idle_after_a_request_answered_before_its_body_is_closed_too(monkeypatch):
    """A request answered before its body was read (401 for a wrong token, 413 by its Content-Length: the service
    reads no further) left its connection without a head deadline: the response came while the body was still
    arriving, so none was armed, and the rest of the body cancelled uvicorn's keep-alive timer. Once the body is in,
    the connection waits for its next request's head under the deadline as after any other answer."""
    from detector import serve_protocol

    monkeypatch.setattr(serve_protocol, "HEAD_TIMEOUT_S", 0.3)

    async def app(scope, receive, send):   # refuses at once, reading no body (as a wrong token is answered)
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no"})

    async def run() -> tuple[bytes, float | None]:
        srv = await _deadline_server(app)
        r, w = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        w.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"no"), 3.0)
        await asyncio.sleep(0.4)
        w.write(b"12345")                      # the rest of the body, after the answer and past the deadline
        t0 = time.monotonic()
        try:
            rest = await asyncio.wait_for(r.read(), 3.0)
            idle = time.monotonic() - t0 if rest == b"" else None
        except asyncio.TimeoutError:
            idle = None
        w.close()
        srv.close()
        await srv.wait_closed()
        return head, idle

    head, idle = asyncio.run(run())
    assert head.startswith(b"HTTP/1.1 401")
    assert idle is not None and idle < 1.5, idle


def test_the_audit_row_records_the_pitch_an_untagged_upload_was_read_at(heuristic_model_1ch, tmp_path):
    """`serve --pitch-mm 4`: the row of a file without a pitch (a 16-bit PNG) says it was read at 4 mm, so `detector
    calibrate` on the log can give the site bundle that pitch; a file with its own pitch (NPZ at 5 mm) records none."""
    import cv2

    from detector.runtime import Inspector
    svc = _service(tmp_path, Inspector(heuristic_model_1ch, threads=1, default_pitch_mm=4.0))
    counts = make_scan_counts(channels=1, seed=7)
    ok, png = cv2.imencode(".png", counts[0])
    tagged = write_scan(tmp_path / "tagged.npz", counts, i0=(I0,), pitch_mm=5.0, energies=("single",)).read_bytes()

    async def post() -> list[dict]:
        from detector.serve import create_app
        transport = httpx.ASGITransport(app=create_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [(await c.post("/v1/inspect", files={"scan": (name, data)})).json()
                    for name, data in (("bare.png", png.tobytes()), ("tagged.npz", tagged))]
    answers = asyncio.run(post())
    svc.close()
    assert all(a["score"] is not None for a in answers), answers
    db = sqlite3.connect(str(tmp_path / "a.sqlite"))
    rows = dict(db.execute("SELECT file_name, untagged_pitch_mm FROM verdicts").fetchall())
    rules = {r for (r,) in db.execute("SELECT score_rule FROM verdicts")}
    db.close()
    assert rows == {"bare.png": 4.0, "tagged.npz": None}
    assert rules == {"heatmap_logits"}   # how the scores were made: `detector calibrate` takes only the bundle's rule


# ---------------------------------------------------------------- failed token checks: lock-out by address

class _CountingInspector(_FakeInspector):
    """A _FakeInspector that counts the scans it was handed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def inspect_safe(self, src, deadline_ms=None, threshold=None):
        self.calls += 1
        return super().inspect_safe(src, deadline_ms, threshold)


async def _as(svc, address: str, method: str, path: str, token: str | None = None, headers: dict | None = None,
              **kw) -> httpx.Response:
    """One request to `svc`'s app from the socket peer `address`."""
    from detector.serve import create_app
    transport = httpx.ASGITransport(app=create_app(svc), client=(address, 50000))
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.request(method, path, headers=headers, **kw)


def test_wrong_tokens_lock_out_their_address_without_a_verdict_or_slowing_the_others(tmp_path, capsys):
    """Wrong tokens were not limited: a device on the station network could try DETECTOR_TOKEN as fast as it could
    send. Ten within a minute now lock its address out for 60 s: 429 with Retry-After, even for the right token (else
    the guessing goes on), the body unread, no model call, no verdict, no audit row; other addresses are untouched."""
    from detector.serve_throttle import AuthThrottle
    now = [1000.0]
    svc = _service(tmp_path, _CountingInspector(score=0.2), token=TOKEN)
    svc.throttle = AuthThrottle(clock=lambda: now[0])
    guesser, station, probe = "10.0.0.66", "10.0.0.2", "10.0.0.7"
    scan = {"scan": ("x.npy", b"123")}
    for i in range(10):
        r = asyncio.run(_as(svc, guesser, "POST", "/v1/inspect", f"guess-{i}", files=scan))
        assert r.status_code == 401, i
    for _ in range(20):   # sending no token guesses nothing: never locked out
        assert asyncio.run(_as(svc, probe, "POST", "/v1/inspect", files=scan)).status_code == 401
    read: list = []

    async def body():
        read.append(True)
        yield b"--B\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"x.npy\"\r\n\r\n123\r\n--B--\r\n"

    r = asyncio.run(_as(svc, guesser, "POST", "/v1/inspect", TOKEN, content=body(),
                        headers={"Content-Type": "multipart/form-data; boundary=B"}))
    assert r.status_code == 429 and r.headers["retry-after"] == "60" and "decision" not in r.json(), r.text
    assert "too many wrong tokens" in r.json()["detail"] and not read and svc.inspector.calls == 0
    assert asyncio.run(_as(svc, guesser, "POST", "/v1/outcome", TOKEN, json={})).status_code == 429
    assert asyncio.run(_as(svc, guesser, "GET", "/metrics", TOKEN)).status_code == 429
    ready = asyncio.run(_as(svc, guesser, "GET", "/readyz", TOKEN))   # readiness as ever, the tiers withheld
    assert ready.status_code == 200 and ready.json() == {"ready": True, "model_sha256": "f" * 64}
    assert asyncio.run(_as(svc, guesser, "GET", "/healthz")).status_code == 200
    ok = asyncio.run(_as(svc, station, "POST", "/v1/inspect", TOKEN, files=scan))
    assert ok.status_code == 200 and ok.json()["decision"] == "RELEASE" and svc.inspector.calls == 1
    assert asyncio.run(_as(svc, probe, "POST", "/v1/inspect", TOKEN, files=scan)).status_code == 200
    assert svc.audit.count() == 2   # the two verdicts; refusals are not verdicts
    metrics = asyncio.run(_as(svc, station, "GET", "/metrics", TOKEN)).text
    assert "detector_auth_lockouts_total 1\n" in metrics and 'detector_requests_total{code="429"} 1\n' in metrics
    err = capsys.readouterr().err
    assert err.count("wrong tokens from 10.0.0.66") == 1 and "10 wrong tokens" in err and "guess-" not in err
    now[0] += 59.5
    assert asyncio.run(_as(svc, guesser, "GET", "/metrics", TOKEN)).headers["retry-after"] == "1"
    now[0] += 1.0   # the lock-out is over: the right token works again
    assert asyncio.run(_as(svc, guesser, "POST", "/v1/inspect", TOKEN, files=scan)).json()["decision"] == "RELEASE"
    svc.close()


def test_auth_fail_limit_0_turns_the_lock_out_off_for_a_service_behind_a_proxy(tmp_path):
    """Behind a reverse proxy every client has the proxy's address, so one guesser would lock out every station
    client: --auth-fail-limit 0 leaves the limiting to the proxy; the default locks out after 10; below 0 is refused."""
    from detector.serve import ServeConfig
    scan = {"scan": ("x.npy", b"123")}
    for limit, after in ((0, 200), (10, 429)):
        svc = _service(tmp_path / str(limit), _CountingInspector(score=0.2), token=TOKEN, auth_fail_limit=limit)
        for i in range(10):
            assert asyncio.run(_as(svc, "10.0.0.1", "POST", "/v1/inspect", f"guess-{i}", files=scan)).status_code == 401
        assert asyncio.run(_as(svc, "10.0.0.1", "POST", "/v1/inspect", TOKEN, files=scan)).status_code == after
        svc.close()
    with pytest.raises(ValueError, match="--auth-fail-limit"):
        ServeConfig(model="m.onnx", auth_fail_limit=-1)


def test_wrong_tokens_spread_beyond_the_window_do_not_lock_out():
    from detector.serve_throttle import AuthThrottle
    now = [0.0]
    t = AuthThrottle(limit=3, window_s=60.0, lockout_s=30.0, clock=lambda: now[0])
    for _ in range(6):   # one every 40 s: never 3 within a minute
        assert not t.failed("a")
        now[0] += 40.0
    assert t.locked_for("a") == 0
    now[0] += 60.0   # the last one (at 200 s) has left the window
    assert not t.failed("a") and not t.failed("a") and t.failed("a") and t.locked_for("a") == 30


def test_the_throttle_keeps_a_bounded_number_of_addresses():
    """A flood of wrong tokens from many addresses (an IPv6 /64 has 2**64) must not grow the process: at most
    max_tracked are kept, and those past their window and lock-out are dropped."""
    from detector.serve_throttle import AuthThrottle
    now = [0.0]
    t = AuthThrottle(limit=2, window_s=10.0, lockout_s=20.0, max_tracked=100, clock=lambda: now[0])
    for i in range(5000):
        t.failed(f"fd00::{i:x}")
    assert len(t) == 100
    t.failed("10.0.0.1")
    assert t.failed("10.0.0.1") and t.locked_for("10.0.0.1") == 20
    now[0] += 15.0   # the flood's window is over; the lock-out is not
    t.failed("10.0.0.2")
    assert len(t) == 2 and t.locked_for("10.0.0.1") == 5


def test_a_forwarded_for_header_names_no_new_address(heuristic_model, tmp_path):
    """The lock-out is by socket peer: uvicorn's default trusted X-Forwarded-For from loopback (and from any address
    with FORWARDED_ALLOW_IPS=*), so a guesser could name a new client address for each try."""
    env = os.environ.get("FORWARDED_ALLOW_IPS")
    os.environ["FORWARDED_ALLOW_IPS"] = "*"
    try:
        srv = Server(heuristic_model, tmp_path, token=TOKEN)
    finally:
        os.environ.pop("FORWARDED_ALLOW_IPS") if env is None else os.environ.update(FORWARDED_ALLOW_IPS=env)
    try:
        for i in range(10):
            r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer guess-{i}",
                                                         "X-Forwarded-For": f"192.0.2.{i}"})
            assert r.status_code == 401
        r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}",
                                                     "X-Forwarded-For": "192.0.2.99"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    finally:
        srv.stop()
    assert "wrong tokens from 127.0.0.1" in (tmp_path / f"server-{srv.port}.log").read_text()


def test_an_audit_log_on_a_network_share_is_warned_about_at_start(heuristic_model, tmp_path, monkeypatch, capsys):
    # two lanes pointed at one audit database on an NFS/SMB share: SQLite's WAL index is shared memory, coherent only
    # between processes of one host, so their commits can overwrite each other's; the service started without a word
    import uvicorn

    from detector import audit, serve
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(serve, "create_app", lambda svc: svc)
    share = tmp_path / "share dir"
    share.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nnas:/audit {str(share).replace(' ', chr(92) + '040')} nfs4 rw 0 0\n")
    monkeypatch.setattr(audit, "MOUNTS", str(mounts), raising=False)
    assert serve.main(_serve_args(heuristic_model, share)) == 0
    err = capsys.readouterr().err
    assert f"warning: audit log {share / 'a.sqlite'} is on a network filesystem (nfs4)" in err
    assert serve.main(_serve_args(heuristic_model, tmp_path)) == 0   # a local disk: no warning
    assert "network filesystem" not in capsys.readouterr().err


def test_serve_refuses_to_start_when_starlettes_parser_cannot_read_an_upload(heuristic_model, tmp_path, monkeypatch,
                                                                             capsys):
    """serve_form.ScanFormParser reaches into starlette's multipart parser: were a starlette upgrade to rename what it
    uses, every truck would be answered INSPECT by a service that looks healthy. The service now checks its parser
    at start and refuses, in one line, where it reads an upload wrongly or not at all."""
    import uvicorn
    from starlette.formparsers import MultiPartParser

    from detector import serve, serve_form
    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    serve_form.check_parser()   # today's starlette: reads the scan as a file, refuses a body cut short
    ours = serve_form.ScanFormParser.on_headers_finished
    for broken in (MultiPartParser.on_headers_finished,   # a scan part without a filename read as text
                   lambda self: self.no_such_attribute):   # a private name gone
        monkeypatch.setattr(serve_form.ScanFormParser, "on_headers_finished", broken)
        assert serve.main(_serve_args(heuristic_model, tmp_path)) == 2 and not started
        err = capsys.readouterr().err
        assert err.startswith("detector serve: the multipart parser of this starlette") and "install" in err, err
    monkeypatch.setattr(serve_form.ScanFormParser, "on_headers_finished", ours)
    monkeypatch.setattr(serve_form.ScanFormParser, "on_end", lambda self: None)   # the closing boundary unseen
    assert serve.main(_serve_args(heuristic_model, tmp_path)) == 2 and not started
    assert capsys.readouterr().err.startswith("detector serve: the multipart parser of this starlette")


def test_serve_form_imports_where_starlettes_formparsers_lacks_formparsererror(tmp_path):
    """serve_form took FormParserError from starlette.formparsers, which imports it only in its recent releases
    (fastapi>=0.110 allows starlette 0.36, whose formparsers has no such name): `detector serve` then died on an
    ImportError traceback before check_parser could refuse in one line. It now takes python-multipart's error from
    python-multipart, and the parser check decides."""
    code = ("import starlette.formparsers as f\n"
            "del f.FormParserError\n"   # as an older starlette's module
            "from detector import serve_form\n"
            "serve_form.check_parser()\n"
            "print('parser ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert res.returncode == 0 and res.stdout.strip() == "parser ok", res.stderr[-600:]


def _exchange(port: int, head: bytes, body: bytes | None = None, then: bytes = b"") -> tuple[bytes, float | None]:
    """Send a request head (Expect: 100-continue), its body only after a 100 Continue, then `then` on the same
    connection; returns what came back and the seconds from the first final answer to the close (None: still open
    after 3 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(head)
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        if got.startswith(b"HTTP/1.1 100") and body is not None:
            s.sendall(body)
            while not (b'"decision"' in got and got.endswith(b"}")):   # the verdict, whole
                got += s.recv(65536)
        t0 = time.monotonic()
        if then:
            s.sendall(then)
        try:
            while True:
                more = s.recv(65536)
                if not more:
                    return got, time.monotonic() - t0
                got += more
        except ConnectionResetError:   # closed before `then` arrived: the kernel answers it with a reset
            return got, time.monotonic() - t0
        except socket.timeout:
            return got, None


def _continue_head(port: int, length: int, token: str | None, ctype: str = "multipart/form-data; boundary=B") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n").encode()


def test_a_refusal_before_the_body_of_an_expect_100_continue_request_closes_its_connection(server, normal_scan_path):
    """A 401 or 413 answered to a client waiting for 100 Continue (curl, .NET, libcurl-based station software) came
    without `Connection: close`: the client rightly sends no body, the service waited its keep-alive (~5 s) for one,
    and a client reusing the connection had its next request read as that body, unanswered until the close. Such a
    refusal now closes the connection; a request whose body was asked for (100 sent) keeps it for the next one."""
    port = server.port
    healthz = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for token, length, code in ((None, 100, b"401"), (TOKEN, 5_000_000, b"413")):
        got, closed = _exchange(port, _continue_head(port, length, token), then=healthz)
        head = got.split(b"\r\n\r\n", 1)[0].lower()
        assert got.startswith(b"HTTP/1.1 " + code) and b"connection: close" in head, got
        assert b"HTTP/1.1 100" not in got and got.count(b"HTTP/1.1 ") == 1, got   # the GET is not read as a body
        assert closed is not None and closed < 1.5, closed
    part = (b"--B\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"n.tiff\"\r\n\r\n"
            + normal_scan_path.read_bytes() + b"\r\n--B--\r\n")
    got, closed = _exchange(port, _continue_head(port, len(part), TOKEN), part, then=healthz)
    assert got.startswith(b"HTTP/1.1 100") and b'"decision"' in got and b'{"status":"ok"}' in got, got
    assert b"connection: close" not in got.lower() and closed is None

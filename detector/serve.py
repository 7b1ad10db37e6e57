"""Station HTTP service: POST a scan, get a fail-closed routing verdict, every verdict audited.

FastAPI + uvicorn because both are maintained and widely deployed, parse multipart uploads
asynchronously (spooling big files to disk instead of memory), and publish an OpenAPI schema
(/docs, /openapi.json) that station integrators can generate clients from. Inference runs in a
thread pool behind a bounded queue so the event loop keeps answering health checks and 429s.

Fail-closed contract (DESIGN.md "HTTP"): any failure answers 200 with decision INSPECT and the
reason; the only non-200 answers are 401 (token), 413 (too large) and 429 (queue full, or an address locked out
after too many wrong tokens: retry, no verdict).
POST /v1/outcome, where officers record what the manual inspection of a served truck found, routes nothing: its
failures are plain 4xx/5xx with the reason, never a verdict.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import math
import os
import sqlite3
import sys
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import FormData, UploadFile

from detector.audit import (MAX_NOTE, MAX_OFFICER, OUTCOMES, AuditLog, OutcomeError, UnknownRequest, network_filesystem,
                            utc_now)
from detector.cpus import quota_words, usable_cpus
from detector.policy import Policy, PolicyError, load_policy, parse_flags
from detector.serve_form import ScanFormParser, check_parser
from detector.serve_metrics import Metrics
from detector.serve_shadow import Shadow, build_shadow
from detector.serve_throttle import FAIL_LIMIT, AuthThrottle
from detector.serve_tls import TlsFiles, check_tls, tls_files

TOKEN_ENV = "DETECTOR_TOKEN"
FORM_FIELDS = ("scan", "meta")
META_KEYS = ("vehicle_id", "container_id", "tier", "risk_flags")
OUTCOME_KEYS = ("request_id", "outcome", "officer", "note")
OUTCOME_MAX_BYTES = 65536   # an outcome's JSON body: a note at its longest, every character escaped, fits
# the audit commit waits for a database locked by another process (an export, a backup, an operator's sqlite3
# shell) until the request's deadline, and at least this long once the deadline is spent
AUDIT_MIN_WAIT_S = 0.2
AUDIT_RETRY_S = 0.5          # how often rows queued behind a locked database are retried
AUDIT_RETRY_WAIT_S = 0.05    # how long each retry waits for the lock (the writer thread is busy meanwhile)
AUDIT_CLOSE_WAIT_S = 10.0    # at shutdown, how long the last retry of queued rows waits for the lock
# how long one retry spends committing spooled rows no service holds (a stopped lane's): each is a commit (an fsync),
# and fresh verdicts wait behind them in the one audit thread
AUDIT_ADOPT_BUDGET_S = 0.1
# how long an outcome's write waits for a locked database before 503 (the officer's client retries); short, as
# verdicts wait behind it in the one audit thread
AUDIT_OUTCOME_WAIT_S = 2.0
OUTCOME_RETRY_AFTER_S = 5
# how long past the deadline an inference thread may still hand over its own verdict (say, "deadline exceeded
# after read"); after that the answer is INSPECT at once and the thread keeps its slot until it ends
DEADLINE_GRACE_S = 0.05
SHORT_TOKEN = 16   # a DETECTOR_TOKEN shorter than this is warned about at start (a guessable secret)
OPEN_FILES_CAP = 65536   # the soft open-file limit the service raises itself to, where the hard one allows
OPEN_FILES_LOW = 1024    # under it, the start line says how to raise the hard limit


@dataclass
class ServeConfig:
    """Everything `detector serve` needs; token None = no authentication."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    audit: str = "audit.sqlite"
    policy: str | None = None
    threads: int | None = None
    max_upload_mb: float = 64.0
    max_queue: int = 8
    concurrency: int = 1
    deadline_ms: float = 10000.0
    token: str | None = field(default=None, repr=False)   # never in a logged config's repr
    pitch_mm: float | None = None   # pitch of scan files that carry none; None: the bundle's, else 5 mm
    auth_fail_limit: int = FAIL_LIMIT   # wrong tokens from one address per window before a lock-out; 0 = no lock-out
    shadow: str | None = None   # a candidate model scoring the same trucks after each live answer (serve_shadow)
    shadow_threads: int = 1     # its onnxruntime threads: the live model keeps the cores
    tls_cert: str | None = None        # PEM certificate (chain) and key: serve https (serve_tls)
    tls_key: str | None = None
    tls_client_ca: str | None = None   # CA of the lane PCs' client certificates: mutual TLS, none without one

    def __post_init__(self) -> None:
        """Refuse a deadline or upload limit that routes no truck: a deadline of 0, below 0 or NaN answered every truck
        INSPECT while /readyz said ready, an infinite one lost every audit row (sqlite's busy timeout took int(inf)),
        and an upload limit of 0 or below answered every request 413."""
        for name in ("deadline_ms", "max_upload_mb"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number > 0 and finite, got {value!r}")
        if not (isinstance(self.auth_fail_limit, int) and self.auth_fail_limit >= 0):
            raise ValueError("--auth-fail-limit must be a whole number >= 0 (0: no lock-out), "
                             f"got {self.auth_fail_limit!r}")
        if self.threads is not None and self.threads < 1:   # else onnxruntime was handed -2
            raise ValueError(f"--threads must be >= 1 (or left out: the usable cores per slot), got {self.threads}")
        if not (isinstance(self.shadow_threads, int) and self.shadow_threads >= 1):
            raise ValueError(f"--shadow-threads must be a whole number >= 1, got {self.shadow_threads!r}")
        tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)   # a certificate alone: no TLS, or none at all
        from detector.runtime import InspectionError, valid_default_pitch
        try:   # before the model loads: a wrong pitch would misread (or refuse) every untagged truck
            valid_default_pitch(self.pitch_mm)
        except InspectionError as e:
            raise ValueError(f"--pitch-mm: {e}") from None

    @property
    def tls(self) -> TlsFiles | None:
        """The TLS files, None for plain HTTP; ValueError for a certificate or key given alone."""
        return tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)


class UploadTooLarge(Exception):
    """The request body passed the size limit while it was being received."""


class Service:
    """The loaded model, policy and audit log, plus admission control for /v1/inspect."""

    def __init__(self, cfg: ServeConfig, inspector: Any, policy: Policy, audit: AuditLog, shadow: Shadow | None = None):
        self.cfg, self.inspector, self.policy, self.audit, self.shadow = cfg, inspector, policy, audit, shadow
        self.model_sha256 = str(inspector.model_sha256)
        meta = inspector.metadata
        self.model_version = str(meta.get("model_version") or meta.get("created") or meta.get("package_version") or "")
        self.max_bytes = int(cfg.max_upload_mb * 1024 * 1024)
        self.capacity = max(1, cfg.concurrency) + max(0, cfg.max_queue)
        self.admitted = 0
        self.ready = False
        self._served_at_trim = -1
        self.metrics = Metrics()
        self.throttle = AuthThrottle(limit=cfg.auth_fail_limit) if cfg.auth_fail_limit else None
        self.slots = asyncio.Semaphore(max(1, cfg.concurrency))
        self.pool = ThreadPoolExecutor(max(1, cfg.concurrency), thread_name_prefix="infer")
        self.audit_pool = ThreadPoolExecutor(1, thread_name_prefix="audit")  # one writer, off the loop
        # rows answered but not yet committed, oldest first (also in the audit log's spool); changed only in the
        # audit thread, the spool's one writer, so the spool rewritten from it never misses a row just deferred
        self.audit_backlog: deque[dict] = deque(audit.recovered)

    def warm(self) -> None:
        """Run a scan-sized dummy through the full path so the first truck pays no start-up cost."""
        from detector.scan import scan_from_counts
        att = np.full((256, 1024), 0.57, np.float32)
        att[64:224, 128:896] = 1.77   # a load in the beam: a blank scan is refused as bad input
        ratios = (1.0, 1.3)[: int(self.inspector.channels)]   # the low energy attenuates more: the order is checked
        counts = np.stack([53000.0 * np.exp(-att * r) for r in ratios]).astype(np.uint16)
        v = self.inspector.inspect_safe(scan_from_counts(counts, i0=53000.0, source="<warm-up>"))
        if v.error:   # the model cannot route a truck: stay not ready (503), and say why
            _say(f"detector serve: warm-up failed ({v.error}); /readyz stays 503")
            return
        self.ready = True

    def authorised(self, request: Request) -> bool:
        if not self.cfg.token:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.cfg.token.encode())

    def refusal(self, request: Request) -> tuple[int, str, dict] | None:
        """None when the request may use an authenticated endpoint, else (status, reason, headers): 429 while its
        address is locked out by wrong tokens (the token is not compared: a right one too would end the guessing's
        lock-out), else 401 for a missing or wrong token. A wrong one counts towards the lock-out; a request sending
        none guesses nothing and does not (a client left without the token must not lock out its host's others)."""
        if not self.cfg.token:
            return None
        address = _peer(request)
        wait = self.throttle.locked_for(address) if self.throttle is not None else 0
        if wait:
            return 429, (f"too many wrong tokens from {address}: refused for {wait} s more (no verdict: retry with the "
                         "right token then)"), {"Retry-After": str(wait)}
        if self.authorised(request):
            return None
        if self.throttle is not None and request.headers.get("authorization") and self.throttle.failed(address):
            self.metrics.auth_lockouts += 1
            _say(f"detector serve: {self.throttle.limit} wrong tokens from {address} within "
                 f"{self.throttle.window_s:g} s: its requests are refused (429) for {self.throttle.lockout_s:g} s")
        return 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}

    async def handle(self, request: Request) -> JSONResponse:
        """Admission (401/413/429), then a verdict that is audited before it is answered."""
        t0 = time.perf_counter()
        refused = self.refusal(request)
        if refused:   # before the body is read
            return self._reject(*refused)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            return self._reject(413, f"upload of {int(length)} bytes exceeds the {self.cfg.max_upload_mb:g} MB limit")
        if self.admitted >= self.capacity:
            return self._reject(429, f"queue full ({self.capacity} requests admitted); retry shortly",
                                {"Retry-After": "1"})
        self.admitted += 1
        rid = uuid.uuid4().hex
        try:
            return await self._verdict(request, rid, t0)
        except UploadTooLarge:
            return self._reject(413, f"upload exceeds the {self.cfg.max_upload_mb:g} MB limit")
        except Exception as e:  # fail closed: still a verdict, still audited
            return await self._answer(rid, t0, {}, None, None, None, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.admitted -= 1

    def _reject(self, code: int, why: str, headers: dict | None = None) -> JSONResponse:
        self.metrics.request(code)
        return _refusal(code, why, headers)

    async def record_outcome(self, request: Request) -> JSONResponse:
        """Record what the manual inspection of a served truck found: 200 with the decision served for it, else
        401 (429 while locked out), 400 (malformed body, unknown outcome), 404 (no such verdict), 413, 503 (audit log
        locked: retry) or 500, each with the reason; the write runs in the audit thread, off the event loop."""
        refused = self.refusal(request)
        if refused:
            return _refusal(*refused)
        try:
            body = await _outcome_body(request)
            row = await asyncio.get_running_loop().run_in_executor(self.audit_pool, self._write_outcome, body)
        except UploadTooLarge:
            return _refusal(413, f"an outcome's body is at most {OUTCOME_MAX_BYTES} bytes")
        except UnknownRequest:   # its message names the audit file: not the client's business
            return _refusal(404, f"no verdict with request_id {str(body.get('request_id'))[:200]!r} in the audit log")
        except OutcomeError as e:
            return _refusal(400, str(e))
        except sqlite3.OperationalError as e:   # locked past AUDIT_OUTCOME_WAIT_S, disk full, I/O
            return _refusal(503, f"audit log unavailable ({e}): outcome not recorded, retry",
                            {"Retry-After": str(OUTCOME_RETRY_AFTER_S)})
        except Exception as e:   # not the fail-closed verdict of create_app: this answer routes no truck
            _say(f"detector serve: outcome not recorded: {type(e).__name__}: {e}")
            return _refusal(500, f"internal error: {type(e).__name__}: outcome not recorded")
        self.metrics.outcome(row["decision"], row["outcome"])
        return JSONResponse({"request_id": row["request_id"], "outcome": row["outcome"], "decision": row["decision"],
                             "recorded_at": row["time"]})

    def _write_outcome(self, body: dict) -> dict:
        """In the audit thread: append the outcome; a verdict still queued behind a locked database (not yet in the
        log, queued here or in the spool) raises sqlite3.OperationalError, to be retried, not UnknownRequest."""
        try:
            return self.audit.record_outcome(body.get("request_id"), body.get("outcome"), body.get("officer"),
                                             body.get("note"), wait_s=AUDIT_OUTCOME_WAIT_S)
        except UnknownRequest:
            rid = body.get("request_id")   # queued here, or spooled by another service on this log (another lane)
            if any(r["request_id"] == rid for r in self.audit_backlog) or self.audit.spooled(rid):
                raise sqlite3.OperationalError("its verdict is still queued for the audit log") from None
            raise

    async def _verdict(self, request: Request, rid: str, t0: float) -> JSONResponse:
        error, meta, data, name = None, {}, None, "scan"
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):   # e.g. raw bytes: they parsed as "too many fields"
            form, error = None, (f"send the scan as multipart/form-data with the file in field 'scan' (got "
                                 f"Content-Type {ctype.split(';')[0] or 'none'})")
        else:
            # the upload counts against the deadline: a stalled one (link lost mid-body, no FIN) held its
            # admission for good, and a few of them answered 429 to every truck after
            left_s = max(0.0, self.cfg.deadline_ms / 1000.0 - (time.perf_counter() - t0))
            try:
                form = await asyncio.wait_for(_parse_form(request, self.max_bytes), left_s)
            except UploadTooLarge:
                raise
            except asyncio.TimeoutError:
                form, error = None, f"deadline of {self.cfg.deadline_ms:g} ms exceeded while receiving the upload"
            except Exception as e:
                form, error = None, f"unreadable multipart form ({type(e).__name__}: {e})"
        if form is not None:
            uploads = form.getlist("scan")
            upload = uploads[0] if uploads else None
            if len(uploads) > 1:   # which one is this truck? neither is routed
                error = f"{len(uploads)} parts named 'scan': send one scan per request"
            elif isinstance(upload, UploadFile):
                data, name = await upload.read(), _file_name(upload.filename)
            else:
                error = "no file in form field 'scan'"
            metas = form.getlist("meta")
            if len(metas) > 1:   # which risk flags and tier apply? neither: a flag may be in the one dropped
                meta, meta_error = {}, f"{len(metas)} parts named 'meta': send one meta per request"
            else:
                meta, meta_error = _parse_meta(metas[0] if metas else None)
            error = error or meta_error or _unknown("form field", form.keys(), FORM_FIELDS)
            await form.close()  # delete spooled temp files now, not at garbage collection
        verdict, sha, request_error = None, None, error
        seen: list | None = [] if self.shadow is not None else None   # the Scan the live model read, for the shadow
        if data is not None:
            verdict, sha, timeout = await self._infer(data, name, meta.get("tier"), t0, seen)
            error = error or timeout or getattr(verdict, "error", None)
        response = await self._answer(rid, t0, meta, verdict, sha, (name, len(data) if data is not None else None),
                                      error)
        if self.shadow is not None:   # after the answer has left; a timed-out live thread's scan is not waited for
            self.shadow.follow(response, rid, seen if verdict is not None else [], meta, request_error)
        return response

    async def _infer(self, data: bytes, name: str, tier: Any, t0: float,
                     seen: list | None = None) -> tuple[Any, str | None, str | None]:
        """Hash the upload and run inspect_safe in the pool under the deadline; returns (verdict, sha256, timeout).

        Where the time goes on an upload near max_upload_mb (64 MB, 2-core station, h11 parser): receiving and
        parsing the multipart body ~0.5-1 s (bounded by the deadline in _verdict), reading the spooled file
        back ~40-90 ms, sha256 ~55-75 ms, decoding ~0.2 s (raw TIFF) to ~2.5 s (zlib TIFF) -- decoding cannot
        be interrupted, so the answer leaves at the deadline (+ DEADLINE_GRACE_S) while the thread runs on,
        holding its slot. Not bounded: reading the spooled file back, and the sha256 for the audit row (it
        runs beside inference, so it delays the answer only when the upload itself used up the deadline)."""
        loop = asyncio.get_running_loop()
        sha = loop.run_in_executor(None, _sha, data)   # hashlib drops the GIL: runs beside the decode
        verdict, timeout = await self._run_inspector(data, name, tier, t0, seen)
        return verdict, await sha, timeout

    async def _run_inspector(self, data: bytes, name: str, tier: Any, t0: float,
                             seen: list | None = None) -> tuple[Any, str | None]:
        """(verdict, None), or (None, why the deadline was missed); the slot is held until the thread ends,
        even after the answer has left. `seen` (a list) gets the Scan read, for the shadow model."""
        budget_s = self.cfg.deadline_ms / 1000.0
        deadline = f"deadline of {self.cfg.deadline_ms:g} ms exceeded"
        if budget_s - (time.perf_counter() - t0) <= 0:   # no thread: inspect_safe would decode, then give up
            return None, f"{deadline} while receiving the upload ({len(data) / 1e6:.1f} MB)"
        thr = self.policy.threshold_for(tier)
        try:
            await asyncio.wait_for(self.slots.acquire(), max(0.0, budget_s - (time.perf_counter() - t0)))
        except asyncio.TimeoutError:
            return None, f"{deadline} while queued"
        left_s = max(0.001, budget_s - (time.perf_counter() - t0))
        fut = asyncio.get_running_loop().run_in_executor(self.pool, _run, self.inspector, data, name,
                                                         left_s * 1000.0, thr, seen)
        fut.add_done_callback(lambda _: self.slots.release())
        try:
            # inspect_safe checks the deadline between stages; one it cannot interrupt (decoding) runs on
            return await asyncio.wait_for(asyncio.shield(fut), left_s + DEADLINE_GRACE_S), None
        except asyncio.TimeoutError:
            return None, f"{deadline} (inference still running)"

    async def _answer(self, rid: str, t0: float, meta: dict, verdict: Any, sha: str | None,
                      file: tuple[str, int | None] | None, error: str | None) -> JSONResponse:
        """Decide by policy, commit the audit row, then (and only then) answer (INSPECT if it cannot be)."""
        score = None if verdict is None else _finite(verdict.score)
        try:
            d = self.policy.decide(score, meta.get("tier"), meta.get("risk_flags"), error=error)
            decision, thr, tier, reason = d.decision, d.threshold, d.tier, d.reason
        except Exception as e:
            decision, thr, tier, reason = "INSPECT", None, str(meta.get("tier") or ""), f"error: policy failed ({e})"
        latency_ms = (time.perf_counter() - t0) * 1000.0
        try:
            flags = parse_flags(meta.get("risk_flags"))
        except ValueError:
            flags = [str(meta.get("risk_flags"))]
        body = {"decision": decision, "score": score, "threshold": thr, "tier": tier, "reason": reason,
                "regions": [] if verdict is None else [r.to_dict() for r in verdict.regions],
                "model_sha256": self.model_sha256, "request_id": rid, "latency_ms": round(latency_ms, 3)}
        record = {"time": utc_now(), "request_id": rid, "vehicle_id": _text(meta.get("vehicle_id")),
                  "container_id": _text(meta.get("container_id")), "file_name": file[0] if file else None,
                  "file_bytes": file[1] if file else None, "file_sha256": sha, "model_sha256": self.model_sha256,
                  "model_version": self.model_version, "score": score, "threshold": thr, "tier": tier,
                  "decision": decision, "reason": reason, "latency_ms": latency_ms, "risk_flags": json.dumps(flags),
                  "untagged_pitch_mm": getattr(verdict, "untagged_pitch_mm", None),   # for `detector calibrate`
                  "score_rule": getattr(verdict, "score_rule", None) if score is not None else None}
        why = await self._audit(record, t0)
        if why:   # no RELEASE leaves without its committed row
            body.update(decision="INSPECT", reason=f"{reason}; {why}")
        self.metrics.request(200)
        self.metrics.verdict(body["decision"], bool(error), latency_ms / 1000.0, None if error else score)
        return JSONResponse(body, headers={"X-Request-ID": rid})

    async def _audit(self, record: dict, t0: float) -> str | None:
        """Commit the verdict's row before it is answered; None when committed, else why not (answer INSPECT).

        A database locked by another connection is waited for until the deadline (at least AUDIT_MIN_WAIT_S),
        not sqlite's 30 s busy timeout: past it the truck is routed to INSPECT at once and the row, amended to
        say so, is spooled beside the database (fsync'ed, so a kill cannot lose it), logged to stderr in full,
        and retried until written (detector_audit_pending)."""
        wait_s = max(AUDIT_MIN_WAIT_S, self.cfg.deadline_ms / 1000.0 - (time.perf_counter() - t0))
        until = time.monotonic() + wait_s   # absolute: a write queued behind another one starts late
        try:
            why = await asyncio.get_running_loop().run_in_executor(self.audit_pool, self._write_until, record, until)
        except Exception as e:   # the row itself cannot be stored (counted and logged in full by _lost)
            return f"audit write failed ({e})"
        if why:
            self.metrics.audit_deferred += 1
        return why

    def _write_until(self, record: dict, until: float) -> str | None:
        """In the audit thread: commit one row, waiting for a lock no later than `until` (monotonic); None when
        committed, else why not (the row, amended to say so, is then deferred)."""
        try:
            self.audit.write(record, wait_s=max(0.0, until - time.monotonic()))
            return None
        except sqlite3.OperationalError as e:   # locked, busy, disk full or I/O: worth retrying
            why = f"audit log unavailable ({e}): verdict queued for the audit log"
            record.update(decision="INSPECT", reason=f"{record['reason']}; {why}")
            self._defer(record, e)
            return why
        except Exception as e:
            self._lost(record, e)
            raise

    def _defer(self, record: dict, e: Exception) -> None:
        """In the audit thread: spool the row (durable before its answer leaves) and queue it for retry; a spool
        that cannot be written (disk full) leaves the row in memory and on stderr only."""
        try:
            self.audit.spool_append(record)
            kept = f"row spooled to {self.audit.spool} and queued for retry"
        except Exception as se:
            kept = f"row NOT spooled ({self.audit.spool}: {se}), queued for retry in memory only"
        self.audit_backlog.append(record)
        _say(f"detector serve: audit row for {record['request_id']} not committed within the deadline ({e}); "
             f"answered INSPECT, {kept}: {json.dumps(record)}")

    def _flush_backlog(self, wait_s: float) -> None:
        """In the audit thread: commit queued rows oldest first until the database refuses (still locked), then
        take the rows done out of the spool."""
        done: set[str] = set()
        while self.audit_backlog:
            record = self.audit_backlog[0]
            try:
                stored = self.audit.write(record, wait_s=wait_s, replay=True)
            except sqlite3.OperationalError:
                break
            except Exception as e:
                self._lost(record, e)
            else:   # not stored: another service on this log committed it from the spool first
                _say(f"detector serve: queued audit row for {record['request_id']} "
                     + ("written" if stored else "already committed from the spool by another service"))
            done.add(self.audit_backlog.popleft()["request_id"])
        if done:
            self._respool(done)

    def _retry_audit(self, wait_s: float) -> None:
        """In the audit thread: the retry tick; this service's queued rows first, then (with none left, so the
        database takes writes) the spooled rows it does not hold."""
        self._flush_backlog(wait_s)
        if not self.audit_backlog:
            self._commit_spooled(wait_s)

    def _commit_spooled(self, wait_s: float) -> None:
        """In the audit thread: commit the spool's rows this service does not queue (another lane's, left when it was
        killed or stopped while the database was locked; an earlier run's), AUDIT_ADOPT_BUDGET_S at a time. Until
        then they are missing from the log, and an outcome for one is 503. A row the lane that spooled it is still
        retrying is stored once: by request_id, whichever commits it first; the other skips it."""
        if not self.audit.spool.exists():   # the usual case: a stat, no lock file made, nothing read
            return
        held = {r["request_id"] for r in self.audit_backlog}   # none at the retry tick; kept apart all the same
        stored, _ = self.audit.commit_spooled(held, wait_s, AUDIT_ADOPT_BUDGET_S)
        if stored:
            _say(f"detector serve: {stored} audit rows from the shared spool {self.audit.spool} committed (another "
                 "service's on this log, running or stopped)")

    def _respool(self, done: set[str]) -> bool:
        """Take the rows `done` out of the spool and put the queued ones it lacks in (rows another service on this
        audit log spooled stay); False (said on stderr) when it cannot be."""
        try:
            self.audit.spool_update(done, list(self.audit_backlog))
            return True
        except OSError as e:   # committed rows left in it are skipped when it is replayed
            _say(f"detector serve: cannot rewrite the audit spool {self.audit.spool} ({e}); "
                 f"{len(self.audit_backlog)} rows still queued")
            return False

    def _lost(self, record: dict, e: Exception) -> None:
        """A row that will never be stored: count it, and log it whole (then stderr holds the only copy)."""
        self.metrics.audit_failures += 1
        _say(f"detector serve: audit write failed for {record['request_id']}: {e}; row not stored: "
             f"{json.dumps(record)}")

    async def flush_audit(self, wait_s: float = AUDIT_RETRY_WAIT_S) -> None:
        """Retry the rows queued behind a locked database, and those spooled by a service that stopped (in the audit
        thread, between fresh writes); with nothing queued and no spool, a stat."""
        if self.audit_backlog or self.audit.spool.exists():
            await asyncio.get_running_loop().run_in_executor(self.audit_pool, self._retry_audit, wait_s)

    async def retry_audit(self, every_s: float = AUDIT_RETRY_S) -> None:
        """Background task: keep retrying queued audit rows until each is written, whatever one retry raises."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush_audit()
            except Exception as e:   # one failed retry must not end the task: the rows would wait for a restart
                _say(f"detector serve: retrying queued audit rows failed ({type(e).__name__}: {e}); retrying")

    def summary(self) -> str:
        m = self.metrics
        lost = f", {m.audit_failures} audit rows NOT stored (see stderr)" if m.audit_failures else ""
        lost += (f", {len(self.audit_backlog)} in {self.audit.spool} until a service on that log commits them"
                 if self.audit_backlog else "")
        shadow = self.shadow.summary() if self.shadow is not None else ""
        return (f"served {m.latency.count} verdicts ({m.decisions.get('RELEASE', 0)} RELEASE, "
                f"{m.decisions.get('INSPECT', 0)} INSPECT, {m.errors} errors{lost}){shadow} -> audit {self.cfg.audit}")

    async def trim_when_idle(self, every_s: float = 0.5) -> None:
        """Background task: after traffic, once the queue is empty, return freed heap to the OS."""
        while True:
            await asyncio.sleep(every_s)
            served = self.metrics.latency.count
            if self.admitted == 0 and served != self._served_at_trim:
                self._served_at_trim = served
                await asyncio.get_running_loop().run_in_executor(self.audit_pool, _trim_heap)

    def close(self) -> None:
        """Finish running work, give queued audit rows a last chance, then leave any still locked out in the
        spool (committed by a service running on this log, else at the next start), or log them as not stored where it
        cannot be written."""
        self.pool.shutdown(wait=True)
        self.audit_pool.shutdown(wait=True)
        self._flush_backlog(AUDIT_CLOSE_WAIT_S)
        if self.audit_backlog and self._respool(set()):
            _say(f"detector serve: {len(self.audit_backlog)} audit rows still not committed (database locked) are "
                 f"kept in {self.audit.spool}; a service running on this audit log commits them once the lock is "
                 "gone, else the next start")
        elif self.audit_backlog:
            while self.audit_backlog:
                self._lost(self.audit_backlog.popleft(), sqlite3.OperationalError("database still locked at shutdown"))
        if self.shadow is not None:   # after the live rows: the candidate's never go first
            self.shadow.close(self.audit)
        self.audit.close()


def _libc() -> Any:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def _trim_heap() -> None:
    # glibc keeps freed scan buffers (MBs each, freed across many threads) in its arenas; handing
    # them back when the queue drains keeps a long-running station's RSS flat
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _say(text: str) -> None:
    """One line to stderr, never raising: a log on a full disk (or a closed pipe) made the line about a deferred row
    fail the row's write, and the line about a committed one end the retry of the queued rows."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):   # ValueError: stderr closed
        pass


def raise_open_files(cap: int = OPEN_FILES_CAP) -> tuple[int | None, int | None]:
    """Raise the soft open-file limit to the hard one (at most `cap`), as nginx and most daemons do: each connection
    holds a descriptor, and a shell's 256 or 1024 let a burst of connections leave /readyz, uploads and the audit
    database without one. Returns (the limit now, the one before); (None, None) where there is none (Windows)."""
    try:
        import resource
    except ImportError:
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want, soft
        except (ValueError, OSError):   # a kernel cap under the hard limit (macOS's kern.maxfilesperproc)
            pass
    return soft, soft


def open_files_words(now: int | None, before: int | None) -> str:
    """The start line's part on the open-file limit; where it is low, how to raise it."""
    if now is None:
        return ""
    words = f", open files {now}" + (f" (raised from {before})" if before != now else "")
    if now < OPEN_FILES_LOW:
        words += (f" (low: a burst of {now} connections leaves /readyz unanswered until they close; raise the hard "
                  "limit: ulimit -Hn, or systemd's LimitNOFILE=)")
    return words


def _peer(request: Request) -> str:
    """The client's address as the socket gave it (main runs uvicorn without proxy headers: an X-Forwarded-For would
    let a guesser name a new address for each try), escaped like a file name: it is logged."""
    return _file_name(request.client.host) if request.client else "unknown"


def _run(inspector: Any, data: bytes, name: str, deadline_ms: float, threshold: float, seen: list | None = None) -> Any:
    if seen is None:   # no shadow: as ever
        return inspector.inspect_safe((data, name), deadline_ms=deadline_ms, threshold=threshold)
    return inspector.inspect_safe((data, name), deadline_ms=deadline_ms, threshold=threshold, on_scan=seen.append)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _text(v: Any) -> str | None:
    return None if v is None else str(v)[:200]


def _file_name(raw: str | None) -> str:
    """The upload's file name with its unprintable characters escaped (\\x1b, \\x85, \\u202e): it names the scan in the
    readers' warnings on stderr and in the audit row, where an ESC sequence, NEL or right-to-left override rewrote
    or forged the log an operator reads."""
    if not raw:
        return "scan"
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in raw)


def _parse_meta(raw: Any) -> tuple[dict, str | None]:
    """The optional `meta` JSON object; a bad one yields ({}, reason) and the scan is inspected."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}, None
    if not isinstance(raw, str):
        return {}, "form field 'meta' must be a JSON string, not a file"
    try:
        meta = json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        return {}, f"form field 'meta' is not valid JSON ({e.msg})"
    except ValueError as e:   # a key given twice: which risk_flags or tier applies? neither
        return {}, f"form field 'meta': {e}"
    except RecursionError:   # else it escaped as an internal error, and the audit row lost the scan's name and hash
        return {}, "form field 'meta' is nested too deep to parse"
    if not isinstance(meta, dict):
        return {}, f"form field 'meta' must be a JSON object, got {type(meta).__name__}"
    try:   # "\ud800" parses, but neither the audit row nor the answer can be written as UTF-8
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return {}, "form field 'meta' holds an unpaired \\u surrogate escape (not valid Unicode text)"
    # kept for the audit row, but a misspelt key (riskflags, Risk_Flags) would drop a forcing flag or tier
    return meta, _unknown("meta key", meta, META_KEYS)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object_pairs_hook: ValueError for a key given twice, which json.loads keeps the last of without a
    word (the forcing flag of a first `risk_flags` was dropped and the truck released)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key[:40]!r} given twice")
        out[key] = value
    return out


def _unknown(what: str, names: Any, known: tuple[str, ...]) -> str | None:
    """The reason to inspect when a request names something the service would silently ignore."""
    unknown = sorted({str(n) for n in names if n not in known})
    if not unknown:
        return None
    shown = ", ".join(repr(n[:40]) for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    return f"unknown {what}(s) {shown} (expected {', '.join(known)}): nothing in the request may be ignored"


def _refusal(code: int, why: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": why}, status_code=code, headers=headers)


async def _outcome_body(request: Request) -> dict:
    """POST /v1/outcome's JSON object (OutcomeError if it is not one, or names a key that would be ignored);
    UploadTooLarge past OUTCOME_MAX_BYTES."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > OUTCOME_MAX_BYTES:
        raise UploadTooLarge(int(length))
    raw = await Request(request.scope, _limited(request.receive, OUTCOME_MAX_BYTES)).body()
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise OutcomeError(f"the body must be a JSON object {{{', '.join(OUTCOME_KEYS)}}} ({type(e).__name__}: "
                           f"{str(e)[:100]})") from None
    if not isinstance(body, dict):
        raise OutcomeError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = _unknown("key", body, OUTCOME_KEYS)
    if unknown:
        raise OutcomeError(unknown)
    return body


async def _parse_form(request: Request, limit: int) -> FormData:
    """The upload's multipart form, cut off past `limit` bytes (UploadTooLarge); MultiPartException when malformed,
    or when it ends before its closing boundary (serve_form)."""
    async with aclosing(Request(request.scope, _limited(request.receive, limit)).stream()) as stream:
        return await ScanFormParser(request.headers, stream, max_files=2, max_fields=4).parse()


def _limited(receive: Any, limit: int) -> Any:
    """Wrap an ASGI receive so the body is counted as it arrives and cut off past `limit`."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        msg = await receive()
        if msg.get("type") == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise UploadTooLarge(seen)
        return msg

    return wrapped


def create_app(svc: Service) -> FastAPI:
    """The ASGI app around a Service (warm-up runs after start, so /healthz answers at once)."""
    from detector.serve_protocol import CloseUnreadContinue

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.get_running_loop().run_in_executor(svc.pool, svc.warm)
        trimmer = asyncio.create_task(svc.trim_when_idle())
        retrier = asyncio.create_task(svc.retry_audit())
        tasks = [trimmer, retrier]
        if svc.shadow is not None:
            tasks.append(asyncio.create_task(svc.shadow.write_every(svc.audit_pool, svc.audit,
                                                                    lambda: bool(svc.audit_backlog))))
        yield
        for t in tasks:
            t.cancel()
        await asyncio.gather(task, *tasks, return_exceptions=True)
        svc.close()
        # here, not after uvicorn.run: uvicorn re-raises SIGTERM/SIGINT once shut down
        print(svc.summary(), flush=True)

    app = FastAPI(title="detector", summary="Cargo X-ray anomaly routing (fail-closed)", lifespan=lifespan)
    # a refusal before the body (401/413/429) to a client waiting for 100 Continue closes its connection; past this
    # wrapper only an unexpected error's answer goes out, and uvicorn closes the connection after that one itself
    app.add_middleware(CloseUnreadContinue)

    @app.exception_handler(Exception)
    async def fail_closed(request: Request, exc: Exception) -> JSONResponse:
        # last resort: a client must never read a 5xx as "no verdict, release"
        _say(f"detector serve: unexpected {type(exc).__name__}: {exc}")
        if request.url.path != "/v1/inspect":   # a verdict (or a 200) from /readyz or /metrics would read as "fine"
            return _refusal(500, f"internal error: {type(exc).__name__}")
        return JSONResponse({"decision": "INSPECT", "score": None, "threshold": None, "tier": None,
                             "reason": f"internal error: {type(exc).__name__}", "regions": [],
                             "model_sha256": svc.model_sha256, "request_id": None, "latency_ms": None})

    @app.post("/v1/inspect", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["scan"], "properties": {
            "scan": {"type": "string", "format": "binary", "description": "TIFF/PNG/NPY/DICOS scan file"},
            "meta": {"type": "string", "description": 'JSON: {"vehicle_id","container_id","tier","risk_flags"}'}}}}}}})
    async def inspect(request: Request) -> JSONResponse:
        """Route one scan: RELEASE or INSPECT with the reason (always INSPECT on any failure)."""
        return await svc.handle(request)

    @app.post("/v1/outcome", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": ["request_id", "outcome"], "properties": {
            "request_id": {"type": "string", "description": "the request_id of the verdict served for the truck"},
            "outcome": {"type": "string", "enum": list(OUTCOMES),
                        "description": "found: contraband or undeclared goods; clear: inspected, nothing found"},
            "officer": {"type": "string", "maxLength": MAX_OFFICER},
            "note": {"type": "string", "maxLength": MAX_NOTE}}}}}}})
    async def outcome(request: Request) -> JSONResponse:
        """Record what the manual inspection of a served truck found; a correction is another POST (the latest
        counts)."""
        return await svc.record_outcome(request)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Readiness for anyone (orchestrators probe without a token); the thresholds for an authorised caller
        only: knowing them helps tune a concealment to score just under them."""
        body: dict[str, Any] = {"ready": svc.ready, "model_sha256": svc.model_sha256}
        if svc.refusal(request) is None:   # the tiers answer a guess: a wrong token here counts as anywhere
            body["tiers"] = svc.policy.thresholds
        return JSONResponse(body, status_code=200 if svc.ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        refused = svc.refusal(request)
        if refused:
            code, why, headers = refused
            return PlainTextResponse(why + "\n", status_code=code, headers=headers)
        return PlainTextResponse(svc.metrics.render(svc), media_type="text/plain; version=0.0.4")

    return app


def slot_threads(cfg: ServeConfig) -> int:
    """onnxruntime threads per inference slot: --threads, else the slot's share of the CPUs this process may use (a
    station's cpuset/taskset, capped by a container's CPU quota; not the host's cores), so `concurrency` slots never
    run more threads than CPUs: past a quota, every thread waits out each 100 ms period and deadlines are missed."""
    return cfg.threads or max(1, usable_cpus() // max(1, cfg.concurrency))


def threads_words(cfg: ServeConfig) -> str:
    """'2 onnxruntime threads x 1 slot', and the CPU quota where one set the count: for the start line."""
    n, c = slot_threads(cfg), max(1, cfg.concurrency)
    return (f"{n} onnxruntime thread{'s' if n != 1 else ''} x {c} slot{'s' if c != 1 else ''}"
            f"{quota_words() if not cfg.threads else ''}")


def build_service(cfg: ServeConfig) -> Service:
    """Load model, policy and audit log; raises with a clear message if any is unusable."""
    from detector.runtime import Inspector
    inspector = Inspector(cfg.model, threads=slot_threads(cfg), default_pitch_mm=cfg.pitch_mm)
    policy = load_policy(cfg.policy)
    policy.bind(inspector)
    shadow = build_shadow(cfg.shadow, cfg.policy, cfg.shadow_threads, cfg.pitch_mm) if cfg.shadow else None
    try:
        return Service(cfg, inspector, policy, AuditLog(cfg.audit), shadow)
    except BaseException:
        if shadow is not None:   # its worker thread and session
            shadow.discard()
        raise


def env_token() -> str | None:
    """DETECTOR_TOKEN without surrounding whitespace (HTTP strips it from the header, so a token
    ending in a space or newline could never match); unset = None, set but blank = ValueError:
    `DETECTOR_TOKEN=$UNSET_VAR` must not quietly serve without authentication."""
    raw = os.environ.get(TOKEN_ENV)
    if raw is None:
        return None
    if not raw.strip():
        raise ValueError(f"{TOKEN_ENV} is set but empty: set a token, or unset it to serve without authentication")
    odd = next((i for i, c in enumerate(raw.strip()) if not (c.isascii() and c.isprintable())), None)
    if odd is not None:   # a header carries Latin-1 bytes: every request would be answered 401
        raise ValueError(f"{TOKEN_ENV} holds a character that is not printable ASCII (at position {odd + 1}), which "
                         "no HTTP client's header can match: use letters, digits and punctuation")
    return raw.strip()


def main(args) -> int:
    """CLI entry: `detector serve --model model.onnx [--host] [--port] [--audit] [--policy] ...`."""
    import uvicorn
    try:
        cfg = ServeConfig(model=args.model, host=args.host, port=args.port, audit=args.audit, policy=args.policy,
                          threads=args.threads, max_upload_mb=args.max_upload_mb, max_queue=args.max_queue,
                          concurrency=args.concurrency, deadline_ms=args.deadline_ms, token=env_token(),
                          pitch_mm=getattr(args, "pitch_mm", None),
                          auth_fail_limit=getattr(args, "auth_fail_limit", FAIL_LIMIT),
                          shadow=getattr(args, "shadow", None), shadow_threads=getattr(args, "shadow_threads", 1),
                          tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
                          tls_client_ca=getattr(args, "tls_client_ca", None))
        tls = cfg.tls   # before the model loads, as the parser: a bad file would end the start after it
        tls_warnings = check_tls(tls) if tls is not None else []
        check_parser()   # before the model loads: a parser that cannot read uploads would INSPECT every truck
        svc = build_service(cfg)
    except (PolicyError, ValueError, OSError, sqlite3.Error) as e:
        print(f"detector serve: {e}", file=sys.stderr)
        return 2
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.token:
        print(f"detector serve: warning: listening on {cfg.host} without a token (set {TOKEN_ENV})", file=sys.stderr)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.token and tls is None:
        print(f"detector serve: warning: listening on {cfg.host} over plain HTTP: {TOKEN_ENV}, the scans and the "
              "verdicts cross the network in clear (serve TLS: --tls-cert, --tls-key)", file=sys.stderr)
    for words in tls_warnings:
        print(f"detector serve: warning: {words}", file=sys.stderr)
    if cfg.token and len(cfg.token) < SHORT_TOKEN:
        print(f"detector serve: warning: {TOKEN_ENV} is {len(cfg.token)} characters: a station network's token should "
              f"be {SHORT_TOKEN} or more random ones (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')",
              file=sys.stderr)
    share = network_filesystem(cfg.audit)
    if share:   # two lanes' services on one such file: commits can overwrite each other's; the service cannot tell
        print(f"detector serve: warning: audit log {cfg.audit} is on a network filesystem ({share}): SQLite's WAL and "
              "locks hold only between processes of one host, so services on two hosts writing it can lose or corrupt "
              "rows; keep it on a local disk (lanes on one host may share it), and copy exports to the share",
              file=sys.stderr)
    files = open_files_words(*raise_open_files())
    print(f"detector serve: model {cfg.model} (sha256 {svc.model_sha256[:12]}), tiers {svc.policy.describe()}, "
          f"scans without a pitch at {svc.inspector.default_pitch_mm:g} mm, {threads_words(cfg)}"
          f"{svc.shadow.describe() if svc.shadow is not None else ''}, audit {cfg.audit}{files}, "
          f"{'https' if tls else 'http'}://{cfg.host}:{cfg.port}/v1/inspect{f' ({tls.describe()})' if tls else ''}",
          file=sys.stderr, flush=True)
    from detector.scan import ScanWarning
    from detector.serve_protocol import HeadDeadlineProtocol
    # shown as before (each names its file, so each was new), but not remembered: Python's "default" action keeps
    # every text it has shown, one entry per truck for as long as the service runs
    warnings.filterwarnings("always", category=ScanWarning)
    uvicorn.run(create_app(svc), host=cfg.host, port=cfg.port, log_level=getattr(args, "log_level", "warning"),
                access_log=False, http=HeadDeadlineProtocol, proxy_headers=False,
                **(tls.uvicorn_kwargs() if tls is not None else {}))
    return 0

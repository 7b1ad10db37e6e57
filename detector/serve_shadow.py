"""A candidate model in shadow beside the live one (`detector serve --shadow CANDIDATE.onnx`), torch-free.

A site never swaps the model that routes its trucks on faith: the candidate scores the same trucks for a while, and
`detector audit summary` compares the two on them. The live model's answer, latency and audit row are as without a
shadow: once the live answer has left, the Scan the live model read (never read again) is offered to one background
worker through a queue of SHADOW_QUEUE scans; a full queue skips the truck for the candidate (counted). The candidate
scores it with its own bundle (its channels, pitch and thresholds: the same policy file bound to it; a file without
a pitch is read at the candidate's pitch for such files, as `serve --model CANDIDATE` would), on `--shadow-threads`
onnxruntime threads (1: the live model keeps the cores), with no deadline. A scan it cannot take is its row's error.

Its rows go to the audit database's `shadow_verdicts` table (audit.SHADOW_COLUMNS), in one commit per retry tick
from the audit thread, between live rows, never waiting for a lock: a live row never waits behind one. While the
database is locked (or the service still holds live rows queued behind a lock) they wait in memory, up to
SHADOW_PENDING_MAX, the oldest dropped past it; at shutdown those still not written are dropped. Dropped rows are
counted (detector_shadow_rows_dropped_total) and never spooled: the spool is for answered verdicts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import queue
import sqlite3
import sys
import threading
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable

from detector.audit import AuditLog, utc_now
from detector.policy import Policy, load_policy

SHADOW_QUEUE = 4              # scans waiting for the candidate; past it a truck is skipped for it (counted)
SHADOW_PENDING_MAX = 1000     # candidate rows waiting for the audit database; past it the oldest are dropped (counted)
SHADOW_WRITE_EVERY_S = 0.5    # how often the audit thread writes the candidate's rows
SHADOW_CLOSE_WAIT_S = 1.0     # at shutdown, how long the last write of its rows waits for a lock
SKIP_REASONS = ("queue_full", "no_scan", "shutdown")


@dataclasses.dataclass
class ShadowJob:
    """One truck for the candidate: the live verdict's request_id and decision, the Scan the live model read, the
    request's tier and risk flags, and its own error (a bad meta: the live answer was INSPECT for it too)."""

    request_id: str
    scan: Any
    live_decision: str
    tier: Any = None
    risk_flags: Any = None
    request_error: str | None = None


class Shadow:
    """The candidate Inspector, its policy, its worker thread and queue, the rows it scored and its counters."""

    def __init__(self, inspector: Any, policy: Policy, path: str = "", threads: int = 1):
        self.inspector, self.policy, self.path, self.threads = inspector, policy, path, threads
        self.model_sha256 = str(inspector.model_sha256)
        self.jobs: queue.Queue = queue.Queue(maxsize=SHADOW_QUEUE)
        self.pending: deque[dict] = deque()
        self._lock = threading.Lock()   # pending: filled by the worker, taken by the audit thread
        # each counter changes in one thread: skipped in the event loop, scored/failed/disagree in the worker,
        # written/dropped under _lock
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.scored = self.failed = self.written = self.dropped = 0
        self.writing = 0   # rows taken out of pending by the audit thread, being committed (under _lock)
        self.disagree: dict[tuple[str, str], int] = {("INSPECT", "RELEASE"): 0, ("RELEASE", "INSPECT"): 0}
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ the event loop's side

    def offer(self, job: ShadowJob | None) -> bool:
        """Queue a truck for the candidate, never waiting; False (counted) when the queue is full or there is no scan
        (the upload was unreadable, or the live answer left at its deadline before the scan was read)."""
        if job is None or job.scan is None:
            self.skipped["no_scan"] += 1
            return False
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            self.skipped["queue_full"] += 1
            return False

    def follow(self, response: Any, rid: str, seen: list, meta: dict, request_error: str | None) -> None:
        """Offer the truck once `response` (the live answer) has been sent: a starlette background task."""
        from starlette.background import BackgroundTask
        try:
            live = json.loads(response.body)["decision"]
        except Exception:   # the answer is the live path's; the candidate only follows it
            live = "INSPECT"
        # the scan less its original counts (the candidate reads the attenuation alone): a third of a queued truck's
        # memory, ~60 MB for a 64 MB upload
        scan = dataclasses.replace(seen[0], counts=None) if seen else None
        job = ShadowJob(rid, scan, live, meta.get("tier"), meta.get("risk_flags"), request_error) if seen else None

        async def offer() -> None:
            self.offer(job)

        response.background = BackgroundTask(offer)

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        """The worker thread: score queued trucks until stopped; one that fails is its row's error, never the end."""
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if self._stop.is_set():
                    self.skipped["shutdown"] += 1
                    continue
                self._keep(self.score(job), job)
            except Exception as e:   # a bug here must not end the worker: later trucks still get scored
                _say(f"detector serve: shadow model failed on {job.request_id}: {type(e).__name__}: {e}")
            finally:
                job.scan = None   # the scan's memory, now
                self.jobs.task_done()

    def score(self, job: ShadowJob) -> dict[str, Any]:
        """The candidate's row for one truck: its score, and the decision the same policy gives with its thresholds."""
        scan = self._at_own_pitch(job.scan)
        try:
            thr = self.policy.threshold_for(job.tier)
        except Exception:
            thr = None
        try:
            v = self.inspector.inspect_safe(scan, threshold=thr)
            error = v.error or None
        except Exception as e:   # inspect_safe never raises; a candidate that does is its row's error all the same
            v, error = None, f"{type(e).__name__}: {e}"
        score = _finite(getattr(v, "score", None))
        try:
            d = self.policy.decide(score, job.tier, job.risk_flags, error=error or job.request_error)
            decision, thr = d.decision, d.threshold
        except Exception as e:
            decision, error = "INSPECT", error or f"policy failed ({e})"
        return {"time": utc_now(), "request_id": job.request_id, "model_sha256": self.model_sha256, "score": score,
                "decision": decision, "threshold": thr,
                "regions": json.dumps([r.to_dict() for r in getattr(v, "regions", None) or []]),
                "latency_ms": getattr(v, "latency_ms", None), "error": error,
                "untagged_pitch_mm": getattr(v, "untagged_pitch_mm", None),
                "score_rule": getattr(v, "score_rule", None) if score is not None else None}

    def _at_own_pitch(self, scan: Any) -> Any:
        """The scan as the candidate would read its file: one that carried no pitch at the candidate's pitch for such
        files (the live model read it at its own; equal where serve --pitch-mm gave it)."""
        own = getattr(self.inspector, "default_pitch_mm", None)
        if getattr(scan, "pitch_default", False) and own is not None and scan.pitch_mm != own:
            return dataclasses.replace(scan, pitch_mm=float(own))
        return scan

    def _keep(self, row: dict, job: ShadowJob) -> None:
        """Count the row and queue it for the audit thread (the oldest dropped past SHADOW_PENDING_MAX)."""
        if row["error"]:
            self.failed += 1
        else:
            self.scored += 1
        if row["decision"] != job.live_decision and (job.live_decision, row["decision"]) in self.disagree:
            self.disagree[job.live_decision, row["decision"]] += 1
        with self._lock:
            self.pending.append(row)
            while len(self.pending) > SHADOW_PENDING_MAX:
                self.pending.popleft()
                self.dropped += 1

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Whether every queued truck was scored within `timeout_s` (tests, and a graceful stop)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self.jobs.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    # ------------------------------------------------------------ the audit thread's side

    def write_pending(self, audit: AuditLog, wait_s: float = 0.0) -> int:
        """In the audit thread: commit the rows scored so far in one transaction; returns how many were stored. A
        locked database keeps them for the next tick (within SHADOW_PENDING_MAX); a row that can never be stored
        is dropped and counted."""
        with self._lock:
            rows = list(self.pending)
            self.pending.clear()
            self.writing = len(rows)
        if not rows:
            return 0
        try:
            stored = audit.write_shadow(rows, wait_s)
        except sqlite3.OperationalError:   # locked, or busy: the next tick
            with self._lock:
                self.pending.extendleft(reversed(rows))
                self.writing = 0
                while len(self.pending) > SHADOW_PENDING_MAX:
                    self.pending.popleft()
                    self.dropped += 1
            return 0
        except Exception as e:
            with self._lock:
                self.dropped += len(rows)
                self.writing = 0
            _say(f"detector serve: {len(rows)} shadow rows not stored ({type(e).__name__}: {e})")
            return 0
        with self._lock:
            self.written += stored
            self.writing = 0
        return stored

    async def write_every(self, pool: Executor, audit: AuditLog, live_queued: Callable[[], bool],
                          every_s: float = SHADOW_WRITE_EVERY_S) -> None:
        """Background task: write the candidate's rows in the audit thread each tick, unless live rows are queued
        behind a locked database (they go first, and the database is not taking rows anyway)."""
        while True:
            await asyncio.sleep(every_s)
            if self.pending and not live_queued():
                try:
                    await asyncio.get_running_loop().run_in_executor(pool, self.write_pending, audit)
                except Exception as e:   # a failed tick must not end the task
                    _say(f"detector serve: writing shadow rows failed ({type(e).__name__}: {e}); retrying")

    def close(self, audit: AuditLog, wait_s: float = SHADOW_CLOSE_WAIT_S) -> None:
        """Stop the worker (the truck it is scoring is finished, queued ones skipped), then a last write of its rows;
        those the database still refuses are dropped and counted."""
        self._stop.set()
        self._worker.join()
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
            self.skipped["shutdown"] += 1
            self.jobs.task_done()
        self.write_pending(audit, wait_s)
        with self._lock:
            if self.pending:
                _say(f"detector serve: {len(self.pending)} shadow rows not stored (audit database locked at shutdown)")
                self.dropped += len(self.pending)
                self.pending.clear()
        self.inspector.close()

    def discard(self) -> None:
        """Stop the worker and free the candidate where the service never started (its audit log failed to open)."""
        self._stop.set()
        self._worker.join()
        self.inspector.close()

    # ------------------------------------------------------------ what it says

    def describe(self) -> str:
        """The start line's part: the candidate, its digest and threads."""
        return (f", shadow {self.path} (sha256 {self.model_sha256[:12]}, {self.threads} onnxruntime "
                f"thread{'s' if self.threads != 1 else ''}, queue {SHADOW_QUEUE})")

    def summary(self) -> str:
        """The shutdown line's part."""
        return (f"; shadow {self.model_sha256[:12]}: {self.scored} scored, {self.failed} failed, "
                f"{sum(self.skipped.values())} skipped, {sum(self.disagree.values())} disagreeing with the live "
                f"verdict, {self.written} rows stored" + (f", {self.dropped} NOT stored" if self.dropped else ""))

    def metrics_lines(self) -> list[str]:
        """Its /metrics lines, in the Prometheus text format."""
        out = ["# HELP detector_shadow_scans_total Trucks the shadow (candidate) model judged: scored, or failed (its "
               "error recorded).", "# TYPE detector_shadow_scans_total counter",
               f'detector_shadow_scans_total{{result="scored"}} {self.scored}',
               f'detector_shadow_scans_total{{result="failed"}} {self.failed}',
               "# HELP detector_shadow_skipped_total Trucks the shadow model did not judge: its queue full, no scan "
               "read by the live model, or queued at shutdown.", "# TYPE detector_shadow_skipped_total counter"]
        out += [f'detector_shadow_skipped_total{{reason="{r}"}} {n}' for r, n in self.skipped.items()]
        out += ["# HELP detector_shadow_disagreements_total Trucks the shadow model routed otherwise than the live "
                "verdict.", "# TYPE detector_shadow_disagreements_total counter"]
        out += [f'detector_shadow_disagreements_total{{live="{a}",shadow="{b}"}} {n}'
                for (a, b), n in self.disagree.items()]
        with self._lock:   # one moment's figures: written + pending + dropped = scored + failed
            written, pending, dropped = self.written, len(self.pending) + self.writing, self.dropped
        out += ["# HELP detector_shadow_rows_written_total Shadow rows stored in the audit log.",
                "# TYPE detector_shadow_rows_written_total counter", f"detector_shadow_rows_written_total {written}",
                "# HELP detector_shadow_rows_pending Shadow rows scored, waiting in memory for the audit database "
                f"(locked); past {SHADOW_PENDING_MAX} the oldest are dropped.",
                "# TYPE detector_shadow_rows_pending gauge", f"detector_shadow_rows_pending {pending}",
                "# HELP detector_shadow_rows_dropped_total Shadow rows not stored in the audit log (database locked "
                "too long, or at shutdown).", "# TYPE detector_shadow_rows_dropped_total counter",
                f"detector_shadow_rows_dropped_total {dropped}",
                "# HELP detector_shadow_queue Trucks waiting for the shadow model.",
                "# TYPE detector_shadow_queue gauge", f"detector_shadow_queue {self.jobs.qsize()}",
                "# HELP detector_shadow_model_info The shadow (candidate) model bundle.",
                "# TYPE detector_shadow_model_info gauge",
                f'detector_shadow_model_info{{sha256="{self.model_sha256}"}} 1']
        return out


def build_shadow(path: str, policy_path: str | None, threads: int, pitch_mm: float | None) -> Shadow:
    """Load the candidate and bind the station's policy to it; ValueError in one line naming --shadow when either
    cannot be (the operator asked for it: no start without it)."""
    from detector.runtime import Inspector
    try:
        inspector = Inspector(path, threads=threads, default_pitch_mm=pitch_mm)
        policy = load_policy(policy_path)
        policy.bind(inspector)
    except Exception as e:
        raise ValueError(f"--shadow {path}: cannot load the candidate model ({' '.join(str(e).split())})") from None
    return Shadow(inspector, policy, path, threads)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _say(text: str) -> None:
    """One line to stderr, never raising (as serve._say)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass

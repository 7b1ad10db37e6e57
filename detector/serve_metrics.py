"""The station service's /metrics: Prometheus counters, gauges and histograms kept by hand (no client library to
install at a station), rendered in the Prometheus text format."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any

from detector.audit import OUTCOMES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass
class Histogram:
    """A Prometheus histogram kept by hand: how many observations fell at or below each bucket's bound, their sum
    and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            self.counts[i] += value <= b
        self.total += value
        self.count += 1

    def render(self, name: str, text: str) -> list[str]:
        """Its lines in the Prometheus text format, under `name` with HELP `text`."""
        return [f"# HELP {name} {text}", f"# TYPE {name} histogram",
                *(f'{name}_bucket{{le="{b:g}"}} {n}' for b, n in zip(self.bounds, self.counts)),
                f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


@dataclass
class Metrics:
    """Prometheus counters kept by hand; no lock: each is updated from one thread only (the event loop, or the
    audit writer thread for audit_failures)."""

    by_status: dict[str, int] = field(default_factory=dict)      # status code -> count
    decisions: dict[str, int] = field(default_factory=lambda: {"RELEASE": 0, "INSPECT": 0})
    errors: int = 0
    audit_failures: int = 0   # rows that could not be stored at all (logged to stderr in full)
    audit_deferred: int = 0   # verdicts answered INSPECT before their row was committed (row queued)
    auth_lockouts: int = 0    # client addresses locked out after too many wrong tokens (serve_throttle)
    # inspection outcomes recorded since start, by (decision served, outcome)
    outcomes: dict[tuple[str, str], int] = field(
        default_factory=lambda: dict.fromkeys(product(("INSPECT", "RELEASE"), OUTCOMES), 0))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))   # seconds, every verdict
    # the scores of the scans scored (not the failures): against the bundle's normal scores they show a site's
    # traffic or scanner drifting away from what the thresholds were set on
    scores: Histogram = field(default_factory=lambda: Histogram(SCORE_BUCKETS))

    def request(self, code: int) -> None:
        self.by_status[str(code)] = self.by_status.get(str(code), 0) + 1

    def verdict(self, decision: str, error: bool, seconds: float, score: float | None = None) -> None:
        self.decisions[decision] = self.decisions.get(decision, 0) + 1
        self.errors += bool(error)
        self.latency.observe(seconds)
        if score is not None:
            self.scores.observe(score)

    def outcome(self, decision: str, outcome: str) -> None:
        self.outcomes[decision, outcome] = self.outcomes.get((decision, outcome), 0) + 1

    def render(self, svc: Any) -> str:
        """Every metric in the Prometheus text format; `svc`: the serve.Service whose gauges (queue, readiness, model)
        are read."""
        esc = lambda s: str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")  # noqa: E731
        out = ["# HELP detector_requests_total Inspection requests by HTTP status.",
               "# TYPE detector_requests_total counter"]
        out += [f'detector_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.by_status.items())]
        out += ["# HELP detector_decisions_total Verdicts by routing decision.",
                "# TYPE detector_decisions_total counter"]
        out += [f'detector_decisions_total{{decision="{d}"}} {n}' for d, n in sorted(self.decisions.items())]
        out += ["# HELP detector_outcomes_total Inspection outcomes recorded (POST /v1/outcome) by the decision "
                "served and what the inspection found.", "# TYPE detector_outcomes_total counter"]
        out += [f'detector_outcomes_total{{decision="{d}",outcome="{o}"}} {n}'
                for (d, o), n in sorted(self.outcomes.items())]
        out += ["# HELP detector_errors_total Verdicts forced to INSPECT by an error (bad scan, timeout, ...).",
                "# TYPE detector_errors_total counter", f"detector_errors_total {self.errors}",
                "# HELP detector_audit_failures_total Verdicts whose audit row could not be stored (row logged to "
                "stderr).", "# TYPE detector_audit_failures_total counter",
                f"detector_audit_failures_total {self.audit_failures}",
                "# HELP detector_audit_deferred_total Verdicts answered INSPECT because the audit database stayed "
                "locked past the deadline (row queued and retried).", "# TYPE detector_audit_deferred_total counter",
                f"detector_audit_deferred_total {self.audit_deferred}",
                "# HELP detector_auth_lockouts_total Client addresses locked out (429) after too many wrong tokens.",
                "# TYPE detector_auth_lockouts_total counter", f"detector_auth_lockouts_total {self.auth_lockouts}",
                "# HELP detector_audit_pending Audit rows queued behind a locked database, not yet committed.",
                "# TYPE detector_audit_pending gauge", f"detector_audit_pending {len(svc.audit_backlog)}"]
        out += self.latency.render("detector_inspect_latency_seconds", "Time from request to verdict.")
        out += self.scores.render("detector_score", "Model scores of the scans scored (failures left out): their drift "
                                  "from the bundle's normal validation scores shows traffic or a scanner unlike the one "
                                  "the thresholds were set on.")
        out += ["# HELP detector_queue_requests Requests admitted and not yet answered (queued + running).",
                "# TYPE detector_queue_requests gauge", f"detector_queue_requests {svc.admitted}",
                "# HELP detector_ready 1 when the model is loaded and warmed.",
                "# TYPE detector_ready gauge", f"detector_ready {int(svc.ready)}",
                "# HELP detector_model_info The served model bundle.", "# TYPE detector_model_info gauge",
                f'detector_model_info{{sha256="{esc(svc.model_sha256)}",version="{esc(svc.model_version)}"}} 1']
        if getattr(svc, "shadow", None) is not None:   # serve --shadow: the candidate's counters
            out += svc.shadow.metrics_lines()
        return "\n".join(out) + "\n"

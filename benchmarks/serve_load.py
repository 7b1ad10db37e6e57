"""Load test of `detector serve` on loopback: throughput, latency percentiles, decisions, server RSS.

Starts the server (or targets --url), runs N client threads for a bounded time posting scans, and
prints requests/s, p50/p95/p99 latency, status and decision counts, and the server's resident
memory after warm-up and at the end (it must not grow under steady load). With --kill-after S it is
the crash test instead: SIGKILL the server S s into the load, restart it on the same audit log, and
count how many answered verdicts have their row (all must) and whether SQLite's integrity check passes.

    .venv/bin/python benchmarks/serve_load.py --duration 15
    .venv/bin/python benchmarks/serve_load.py --model model.onnx --scan a.tiff --scan b.tiff --clients 8
    .venv/bin/python benchmarks/serve_load.py --model model.onnx --kill-after 20   # crash test
    .venv/bin/python benchmarks/serve_load.py --model live.onnx --shadow cand.onnx --clients 1 --interval 2

--shadow runs a candidate beside the live model (serve --shadow) and counts its rows in the audit log against the
verdicts; --interval paces each client (one post every S s, a station's trucks) instead of posting back to back.
--tls-cert/--tls-key (and --tls-client-ca) serve https (its certificate must name 127.0.0.1); the clients trust
--cacert (default: the --tls-cert itself, a self-signed one) and present --cert/--key where client certificates are
required:

    .venv/bin/python benchmarks/serve_load.py --tls-cert station.pem --tls-key station.key --cacert site-ca.pem \
        --tls-client-ca lanes-ca.pem --cert lane1.pem --key lane1.key
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(work: Path, height: int, width: int) -> tuple[Path, list[Path]]:
    """The torch-free heuristic test bundle and a normal + an anomalous scan of the given size."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_heuristic_bundle, write_test_scan
    model = make_heuristic_bundle(work / "heuristic.onnx")
    scans = [write_test_scan(work / "normal.tiff", height=height, width=width, seed=1),
             write_test_scan(work / "anomalous.tiff", height=height, width=width, dense=True, seed=2)]
    return model, scans


def start_server(args, model: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "detector.cli", "serve", "--model", str(model), "--port", str(port),
           "--audit", str(work / "audit.sqlite"), "--concurrency", str(args.concurrency),
           "--max-queue", str(args.max_queue)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.policy:
        cmd += ["--policy", args.policy]
    if args.shadow:
        cmd += ["--shadow", args.shadow]
    for option in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, option):
            cmd += [f"--{option.replace('_', '-')}", getattr(args, option)]
    proc = subprocess.Popen(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    url = f"{'https' if args.tls_cert else 'http'}://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if proc.poll() is not None:
            sys.exit(f"server exited: {(work / 'server.log').read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1, verify=args.verify).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("server not ready in 60 s")


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """What the clients verify an https server with (--cacert, else --tls-cert) and present to it (--cert/--key)."""
    if not (args.cacert or args.tls_cert or args.cert):
        return True
    ctx = ssl.create_default_context(cafile=args.cacert or args.tls_cert)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


def run_load(url: str, payloads: list[tuple[str, bytes]], clients: int, seconds: float, token: str | None,
             ids: list[str] | None = None, interval: float = 0.0, verify: ssl.SSLContext | bool = True):
    """Each client posts the payloads round-robin until time is up (one post every `interval` s where > 0, else back
    to back); returns (latencies s, codes, decisions).

    ids, when given, collects the request_id of every answered verdict (for the crash test)."""
    lat: list[float] = []
    codes: Counter = Counter()
    decisions: Counter = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def client(i: int) -> None:
        with httpx.Client(timeout=60, headers=headers, verify=verify) as c:
            k, due = i, time.monotonic() + interval * i / max(1, clients)
            while time.monotonic() < end:
                if interval > 0:   # a station's pace: the next truck arrives on time, whatever this one took
                    time.sleep(max(0.0, due - time.monotonic()))
                    due += interval
                    if time.monotonic() >= end:
                        break
                name, data = payloads[k % len(payloads)]
                k += 1
                t0 = time.perf_counter()
                try:
                    r = c.post(url + "/v1/inspect", files={"scan": (name, data)})
                except httpx.HTTPError as e:
                    with lock:
                        codes[type(e).__name__] += 1
                    time.sleep(0.05)  # server gone (crash test): do not spin
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        lat.append(dt)
                        body = r.json()
                        decisions[body["decision"]] += 1
                        if ids is not None:
                            ids.append(body["request_id"])
                    elif r.status_code == 429:
                        time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, codes, decisions


def shadow_rows(db: Path) -> str:
    """The candidate's rows against the verdicts in the audit log (warm-up included), after the server stopped."""
    con = sqlite3.connect(str(db))
    try:
        verdicts = con.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        rows, failed = con.execute("SELECT COUNT(*), COUNT(error) FROM shadow_verdicts").fetchone()
        agree = con.execute("SELECT COUNT(*) FROM shadow_verdicts s JOIN verdicts v USING (request_id) "
                            "WHERE s.decision = v.decision").fetchone()[0]
    finally:
        con.close()
    return (f"{rows} candidate rows for {verdicts} verdicts ({rows / max(1, verdicts):.0%}; warm-up included), "
            f"{failed} failed, {agree} agreeing")


def crash_test(args, model: Path, payloads: list[tuple[str, bytes]], work: Path, token: str | None) -> None:
    """kill -9 mid-load, restart on the same audit log: every answered verdict must have its row."""
    proc, url = start_server(args, model, work)
    answered: list[str] = []
    killer = threading.Timer(args.kill_after, proc.kill)  # SIGKILL: no shutdown hook, no final flush
    killer.start()
    _, codes, _ = run_load(url, payloads, args.clients, args.kill_after + 2.0, token, answered, verify=args.verify)
    proc.wait()
    proc2, url2 = start_server(args, model, work)  # a station restarting on its audit log
    try:
        r = httpx.post(url2 + "/v1/inspect", files={"scan": payloads[0]},
                       headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=60, verify=args.verify)
        after = r.status_code
    finally:
        proc2.terminate()
        proc2.wait(10)
    db = sqlite3.connect(str(work / "audit.sqlite"))
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    logged = {row[0] for row in db.execute("SELECT request_id FROM verdicts")}
    db.close()
    found = sum(rid in logged for rid in answered)
    print(f"crash test: {args.clients} clients, server killed -9 after {args.kill_after:g} s of load; "
          f"client outcomes {dict(codes)}")
    print(f"  {len(answered)} verdicts answered before the kill, {found}/{len(answered)} in the audit log after "
          f"restart ({len(logged)} rows in all); integrity_check {integrity}; restarted server answered {after}")
    if found != len(answered) or integrity != "ok":
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle (default: the torch-free heuristic test bundle)")
    ap.add_argument("--scan", action="append", default=None, help="scan file(s) to post (default: generated)")
    ap.add_argument("--height", type=int, default=600, help="generated scan height")
    ap.add_argument("--width", type=int, default=2000, help="generated scan width")
    ap.add_argument("--url", default=None, help="target a running server instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="with --url: server pid for RSS")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the start RSS")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--shadow", default=None, help="a candidate bundle to serve in shadow (serve --shadow)")
    ap.add_argument("--interval", type=float, default=0.0,
                    help="seconds between one client's posts (a station's pace); 0: back to back")
    ap.add_argument("--kill-after", type=float, default=None,
                    help="crash test: SIGKILL the server this many seconds into the load, then count audit rows")
    ap.add_argument("--tls-cert", default=None, help="serve https with this certificate (serve --tls-cert)")
    ap.add_argument("--tls-key", default=None, help="its key (serve --tls-key)")
    ap.add_argument("--tls-client-ca", default=None, help="require client certificates of this CA (serve "
                                                          "--tls-client-ca)")
    ap.add_argument("--cacert", default=None, help="https: the CA the clients trust (default: --tls-cert)")
    ap.add_argument("--cert", default=None, help="https: the clients' certificate (with --key)")
    ap.add_argument("--key", default=None, help="https: the clients' key")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (generated model, scans, audit log)")
    args = ap.parse_args()
    if args.kill_after is not None and args.url:
        sys.exit("--kill-after needs a server this script starts (no --url)")
    if bool(args.cert) != bool(args.key):
        sys.exit("--cert and --key go together (the clients' certificate and its key)")
    args.verify = client_tls(args)
    for option in ("tls_cert", "tls_key", "tls_client_ca"):   # absolute: the server runs in the work dir
        if getattr(args, option):
            setattr(args, option, str(Path(getattr(args, option)).resolve()))
    if missing := [s for s in args.scan or [] if not Path(s).is_file()]:
        sys.exit(f"serve_load: no such scan file: {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:   # the work dir goes whatever happens, unless --keep
        load_test(args, work)
    finally:
        if args.keep:
            print(f"  work dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def load_test(args: argparse.Namespace, work: Path) -> None:
    """The load test (or with --kill-after the crash test) with its inputs and audit log in work."""
    # absolute: the server runs in the work dir
    model = Path(args.model).resolve() if args.model else None
    if args.policy:
        args.policy = str(Path(args.policy).resolve())
    if args.shadow:
        args.shadow = str(Path(args.shadow).resolve())
    scans = [Path(s) for s in args.scan or []]
    if (model is None and not args.url) or not scans:   # --url without --scan still needs scans to post
        gen_model, gen_scans = make_inputs(work, args.height, args.width)
        model, scans = model or gen_model, scans or gen_scans
    payloads = [(p.name, p.read_bytes()) for p in scans]
    token = os.environ.get("DETECTOR_TOKEN")
    if args.kill_after is not None:
        crash_test(args, model, payloads, work, token)
        return
    proc, url, pid = None, args.url, args.pid
    if not url:
        proc, url = start_server(args, model, work)
        pid = proc.pid
    try:
        run_load(url, payloads, args.clients, args.warmup, token, verify=args.verify)
        time.sleep(1.0)  # idle RSS: in-flight scans (uploads, decoded arrays) are not counted
        rss0 = rss_mb(pid) if pid else float("nan")
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:  # RSS every tenth of the run, to tell a plateau from a leak
            while pid and not done.wait(args.duration / 10):
                samples.append(rss_mb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        lat, codes, decisions = run_load(url, payloads, args.clients, args.duration, token, interval=args.interval,
                                         verify=args.verify)
        wall = time.monotonic() - t0
        done.set()
        time.sleep(1.0)
        rss1 = rss_mb(pid) if pid else float("nan")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    ms = np.asarray(lat) * 1000.0
    sizes = ", ".join(f"{n} {len(d) / 1e6:.2f} MB" for n, d in payloads)
    from detector.cpus import quota_words, usable_cpus   # this process's: a local server's, in the same container
    print(f"serve_load: {args.clients} clients x {args.duration:g} s on {url} "
          f"(concurrency {args.concurrency}, max-queue {args.max_queue}, cpus {usable_cpus()}{quota_words()}); "
          f"scans: {sizes}")
    if ms.size:
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        print(f"  {ms.size / wall:.1f} verdicts/s   latency ms p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  "
              f"max {ms.max():.1f}")
    print(f"  status {dict(codes)}   decisions {dict(decisions)}" + (f"   interval {args.interval:g} s per client"
                                                                    if args.interval > 0 else ""))
    if args.shadow and proc is not None:
        print(f"  shadow: {shadow_rows(work / 'audit.sqlite')}")
    if pid:
        print(f"  server RSS idle after warm-up {rss0:.1f} MB, idle at end {rss1:.1f} MB ({rss1 - rss0:+.1f} MB); "
              f"under load: {' '.join(f'{v:.0f}' for v in samples)}")


if __name__ == "__main__":
    main()

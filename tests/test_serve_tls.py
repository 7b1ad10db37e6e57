"""`detector serve` over TLS: https verdicts, mutual TLS, and the certificate files checked at start.

Certificates come from the openssl command (a throwaway CA, server, lane and rogue lane per module); skipped where
there is none."""
import asyncio
import re
import shutil
import ssl
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from test_serve import TOKEN, Server

from detector.serve_tls import TlsFiles, cert_validity, check_tls

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command to make certificates")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str, days: int = 365) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(days),
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", cwd=d)


def _signed(d: Path, name: str, ca: str, ext: str = "") -> None:
    """name.pem/name.key, a 60-day certificate signed by ca (with the extensions `ext`, one per line)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext or "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "60", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """site CA -> server (localhost, 127.0.0.1) and lane1; a rogue CA -> rogue lane; a CA of one day; the server's
    key encrypted."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue_ca")
    _ca(d, "short_ca", days=1)
    _signed(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _signed(d, "lane1", "ca")
    _signed(d, "rogue", "rogue_ca")
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:station", "-out", "encrypted.key", cwd=d)
    return d


def _client(pki: Path, cert: str | None = "lane1") -> ssl.SSLContext:
    """A client trusting the site CA, presenting `cert` (None: no certificate)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def _tls_args(pki: Path, client_ca: bool = True) -> list[str]:
    return ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            *(["--tls-client-ca", str(pki / "ca.pem")] if client_ca else [])]


def test_a_verdict_over_mutual_tls_and_a_client_without_the_sites_certificate_refused(
        heuristic_model, normal_scan_path, pki, tmp_path):
    """The token, scans and verdicts crossed the station LAN in clear; now https, and with --tls-client-ca a lane PC
    without a certificate of the site's CA gets no connection at all. A plain-http request to the port fails and the
    service goes on answering."""
    srv = Server(heuristic_model, tmp_path, *_tls_args(pki), token=TOKEN, tls=_client(pki))
    try:
        lane = httpx.Client(verify=_client(pki), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        r = lane.post(srv.url + "/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())})
        assert r.status_code == 200 and r.json()["decision"] == "RELEASE", r.text
        rid = r.json()["request_id"]
        assert lane.get(srv.url + "/healthz").json() == {"status": "ok"}
        assert lane.get(srv.url + "/readyz").json()["ready"] is True
        assert 'detector_requests_total{code="200"} 1' in lane.get(srv.url + "/metrics").text
        for who in (_client(pki, None), _client(pki, "rogue")):   # no certificate; one from another CA
            with pytest.raises(httpx.TransportError):
                httpx.post(srv.url + "/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())},
                           headers={"Authorization": f"Bearer {TOKEN}"}, verify=who, timeout=10).raise_for_status()
        with pytest.raises(httpx.TransportError):   # plain http on the TLS port
            httpx.get(srv.url.replace("https", "http") + "/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError):      # a client that does not trust the site CA
            httpx.get(srv.url + "/healthz", timeout=10)
        again = lane.post(srv.url + "/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())})
        assert again.status_code == 200 and again.json()["decision"] == "RELEASE"
        lane.close()
        assert srv.proc.poll() is None
    finally:
        srv.stop()
    log = (tmp_path / f"server-{srv.port}.log").read_text()
    assert f"https://127.0.0.1:{srv.port}/v1/inspect (TLS, client certificates signed by {pki / 'ca.pem'} required)" \
        in log, log
    assert "Traceback" not in log, log
    import sqlite3
    with sqlite3.connect(str(srv.audit)) as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts WHERE request_id = ?", (rid,)).fetchone()[0] == 1


def test_https_without_client_certificates(heuristic_model, normal_scan_path, pki, tmp_path):
    """--tls-cert and --tls-key alone: https for any client trusting the certificate; none is asked for."""
    srv = Server(heuristic_model, tmp_path, *_tls_args(pki, client_ca=False), tls=_client(pki, None))
    try:
        r = httpx.post(srv.url + "/v1/inspect", files={"scan": ("n.tiff", normal_scan_path.read_bytes())},
                       verify=_client(pki, None), timeout=30)
        assert r.status_code == 200 and r.json()["decision"] == "RELEASE", r.text
    finally:
        srv.stop()
    assert "(TLS, no client certificates asked for)" in (tmp_path / f"server-{srv.port}.log").read_text()


def _start(monkeypatch, model: str, tmp_path: Path, *, host: str = "127.0.0.1", token: str | None = None,
           **tls) -> tuple[int, list[dict]]:
    """serve.main with uvicorn.run recorded, not run: (exit status, uvicorn.run's keyword arguments)."""
    import uvicorn

    from detector import serve
    runs: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    monkeypatch.setattr(serve, "create_app", lambda svc: svc)
    if token:
        monkeypatch.setenv("DETECTOR_TOKEN", token)
    else:
        monkeypatch.delenv("DETECTOR_TOKEN", raising=False)
    args = SimpleNamespace(model=model, host=host, port=0, audit=str(tmp_path / "a.sqlite"), policy=None, threads=1,
                           max_upload_mb=1.0, max_queue=1, concurrency=1, deadline_ms=1000.0,
                           **{f"tls_{k}": v and str(v) for k, v in tls.items()})
    return serve.main(args), runs


def test_bad_tls_files_are_refused_in_one_line_before_the_model_loads(monkeypatch, capsys, pki, tmp_path):
    """Each is refused at start in one line naming the file and the reason, before the model is read (the model here
    does not exist: its error would come first were the files checked after it). Before, a certificate alone served
    plain http, and a wrong key ended the start only once the model was loaded, in uvicorn's traceback."""
    p = {n: pki / n for n in ("server.pem", "server.key", "lane1.key", "encrypted.key", "lane1.pem", "ca.pem",
                              "lane1.ext")}
    cases = [
        (dict(cert=pki / "nope.pem", key=p["server.key"]), f"--tls-cert {pki / 'nope.pem'}: cannot be read"),
        (dict(cert=p["server.pem"], key=pki), f"--tls-key {pki}: cannot be read (Is a directory)"),
        (dict(cert=p["server.pem"], key=p["lane1.key"]), "the key does not match the certificate"),
        (dict(cert=p["server.pem"], key=p["encrypted.key"]), "the key is encrypted with a passphrase"),
        (dict(cert=p["server.pem"], key=None), f"--tls-cert {p['server.pem']} needs --tls-key too"),
        (dict(cert=None, key=p["server.key"]), f"--tls-key {p['server.key']} needs --tls-cert too"),
        (dict(cert=None, key=None, client_ca=p["ca.pem"]), "needs --tls-cert and --tls-key"),
        (dict(cert=p["lane1.ext"], key=p["server.key"]), f"--tls-cert {p['lane1.ext']}: holds no PEM certificate"),
        (dict(cert=p["server.pem"], key=p["server.pem"]), f"--tls-key {p['server.pem']}: holds no PEM private key"),
        (dict(cert=p["server.pem"], key=p["server.key"], client_ca=p["lane1.pem"]),
         f"--tls-client-ca {p['lane1.pem']}: holds no CA certificate"),
    ]
    for tls, said in cases:
        code, runs = _start(monkeypatch, str(tmp_path / "missing.onnx"), tmp_path, **tls)
        err = capsys.readouterr().err
        assert code == 2 and not runs, (tls, err)
        assert said in err and len(err.strip().splitlines()) == 1 and "missing.onnx" not in err, (tls, err)


def test_expired_or_not_yet_valid_certificate_refused_and_one_expiring_soon_warned(pki, tmp_path):
    """An expired certificate would be refused by every lane at the handshake, every truck then sent to manual
    inspection with no word on the service's side: refused at start; expiring within 30 days: a warning."""
    not_before, not_after = cert_validity(ssl.PEM_cert_to_DER_cert((pki / "server.pem").read_text()))
    told = subprocess.run(["openssl", "x509", "-in", str(pki / "server.pem"), "-noout", "-enddate"],
                          capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    assert abs(not_after.timestamp() - ssl.cert_time_to_seconds(told)) < 1
    files = TlsFiles(str(pki / "server.pem"), str(pki / "server.key"))
    with pytest.raises(ValueError, match=f"--tls-cert {pki / 'server.pem'}: the certificate expired on"):
        check_tls(files, now=not_after + timedelta(minutes=1))
    with pytest.raises(ValueError, match=r"not valid before .* \(check this machine's clock\)"):
        check_tls(files, now=not_before - timedelta(days=1))
    assert check_tls(files, now=not_before + timedelta(minutes=1)) == []
    soon = check_tls(files, now=not_after - timedelta(days=9, hours=1))
    assert len(soon) == 1 and "expires on" in soon[0] and "in 9 days" in soon[0], soon
    world = tmp_path / "world.key"   # a key every user of the station PC may read
    world.write_bytes((pki / "server.key").read_bytes())
    world.chmod(0o644)
    said = check_tls(TlsFiles(files.cert, str(world)), now=not_before + timedelta(minutes=1))
    assert said == [f"--tls-key {world} is readable by every user (mode 644): chmod 600 it"], said
    ca_expired = TlsFiles(files.cert, files.key, str(pki / "short_ca.pem"))   # every lane's certificate refused
    with pytest.raises(ValueError, match=f"--tls-client-ca {pki / 'short_ca.pem'}: no CA certificate in it is valid"):
        check_tls(ca_expired, now=not_before + timedelta(days=2))


def test_start_line_says_https_and_plain_http_on_the_lan_with_a_token_is_warned(monkeypatch, capsys, pki, tmp_path,
                                                                                heuristic_model):
    """On 0.0.0.0 with a token and no TLS the token crossed the LAN in clear without a word: one warning line. With
    TLS: no such line, the start line says https and that client certificates are required, and uvicorn is asked for
    them (CERT_REQUIRED, the CA)."""
    code, runs = _start(monkeypatch, str(heuristic_model), tmp_path, host="0.0.0.0", token=TOKEN)
    err = capsys.readouterr().err
    assert code == 0 and "ssl_certfile" not in runs[0]
    assert [line for line in err.splitlines() if "in clear" in line] == [
        "detector serve: warning: listening on 0.0.0.0 over plain HTTP: DETECTOR_TOKEN, the scans and the verdicts "
        "cross the network in clear (serve TLS: --tls-cert, --tls-key)"], err
    assert "http://0.0.0.0:0/v1/inspect" in err
    code, runs = _start(monkeypatch, str(heuristic_model), tmp_path, host="0.0.0.0", token=TOKEN,
                        cert=pki / "server.pem", key=pki / "server.key", client_ca=pki / "ca.pem")
    err = capsys.readouterr().err
    assert code == 0 and "in clear" not in err, err
    assert f"https://0.0.0.0:0/v1/inspect (TLS, client certificates signed by {pki / 'ca.pem'} required)" in err
    assert runs[0]["ssl_cert_reqs"] == ssl.CERT_REQUIRED and runs[0]["ssl_ca_certs"] == str(pki / "ca.pem")
    assert runs[0]["ssl_certfile"] == str(pki / "server.pem") and runs[0]["ssl_keyfile"] == str(pki / "server.key")
    code, _ = _start(monkeypatch, str(heuristic_model), tmp_path, token=TOKEN)   # loopback: nothing crosses a LAN
    assert code == 0 and "in clear" not in capsys.readouterr().err


def test_the_head_deadline_holds_over_tls(monkeypatch, pki):
    """serve_protocol.HeadDeadlineProtocol under uvicorn's TLS: a connection whose handshake is done but that sends no
    request head is still closed after HEAD_TIMEOUT_S, and a request is answered."""
    import uvicorn

    from detector import serve_protocol
    monkeypatch.setattr(serve_protocol, "HEAD_TIMEOUT_S", 0.3)

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> tuple[float | None, bytes]:
        files = TlsFiles(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
        cfg = uvicorn.Config(app, http=serve_protocol.HeadDeadlineProtocol, lifespan="off", timeout_keep_alive=60,
                             log_level="critical", **files.uvicorn_kwargs())
        cfg.load()
        server = uvicorn.Server(cfg)
        srv = await asyncio.get_running_loop().create_server(
            lambda: serve_protocol.HeadDeadlineProtocol(config=cfg, server_state=server.server_state, app_state={}),
            "127.0.0.1", 0, ssl=cfg.ssl)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_client(pki), server_hostname="localhost")
        t0 = time.monotonic()
        silent = await asyncio.wait_for(r.read(), 3.0)
        closed_after = time.monotonic() - t0 if silent == b"" else None
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_client(pki), server_hostname="localhost")
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(r.readuntil(b"ok"), 3.0)
        w.close()
        srv.close()
        return closed_after, answer

    closed_after, answer = asyncio.run(run())
    assert closed_after is not None and 0.15 < closed_after < 2.0, closed_after
    assert answer.startswith(b"HTTP/1.1 200")


def test_serve_load_benchmark_over_mutual_tls(pki):
    """benchmarks/serve_load.py starts the service with TLS and loads it over https with a lane's certificate."""
    from test_benchmarks import bench
    p = bench("serve_load.py", "--duration", "1", "--warmup", "0.3", "--clients", "1", "--height", "200", "--width",
              "400", *_tls_args(pki), "--cacert", str(pki / "ca.pem"), "--cert", str(pki / "lane1.pem"),
              "--key", str(pki / "lane1.key"))
    assert p.returncode == 0, p.stderr
    assert "on https://127.0.0.1:" in p.stdout and re.search(r"status \{200: \d+\}", p.stdout), p.stdout


def _lane_answer(pki: Path, client_ca: Path, lane: str) -> bytes:
    """What a lane presenting `lane`.pem gets from a uvicorn TLS server asking for certificates of `client_ca`."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> bytes:
        files = TlsFiles(str(pki / "server.pem"), str(pki / "server.key"), str(client_ca))
        cfg = uvicorn.Config(app, lifespan="off", log_level="critical", **files.uvicorn_kwargs())
        cfg.load()
        server = uvicorn.Server(cfg)
        srv = await asyncio.get_running_loop().create_server(
            lambda: cfg.http_protocol_class(config=cfg, server_state=server.server_state, app_state={}),
            "127.0.0.1", 0, ssl=cfg.ssl)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1], ssl=_client(pki, lane),
                                                 server_hostname="localhost")
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(r.readuntil(b"ok"), 3.0)
            w.close()
            return answer
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            return b""
        finally:
            srv.close()

    return asyncio.run(run())


def test_a_client_ca_that_is_an_intermediate_without_its_root_is_refused_at_start(pki, tmp_path):
    """A site's two-tier PKI: the lanes' certificates are issued by an intermediate 'lanes' CA under the site root.
    Given that intermediate alone as --tls-client-ca, the start passed, said client certificates signed by it were
    required, and then every lane was refused at the handshake (OpenSSL verifies a client up to a self-signed root):
    no truck routed. It is refused at start, naming the issuer to append; with the root appended lanes connect."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "lanes_ca.key",
             "-out", "lanes_ca.csr", "-subj", "/CN=lanes_ca", cwd=tmp_path)
    (tmp_path / "lanes_ca.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n")
    _openssl("x509", "-req", "-in", "lanes_ca.csr", "-CA", str(pki / "ca.pem"), "-CAkey", str(pki / "ca.key"),
             "-CAcreateserial", "-CAserial", "ca.srl", "-days", "200", "-out", "lanes_ca.pem",
             "-extfile", "lanes_ca.ext", cwd=tmp_path)
    for name in ("server.pem", "server.key", "ca.pem"):   # _lane_answer's server, and the CA its lanes trust
        shutil.copy(pki / name, tmp_path / name)
    _signed(tmp_path, "lane2", "lanes_ca")
    assert _lane_answer(tmp_path, tmp_path / "lanes_ca.pem", "lane2") == b""   # what the start let through
    files = TlsFiles(str(pki / "server.pem"), str(pki / "server.key"), str(tmp_path / "lanes_ca.pem"))
    with pytest.raises(ValueError, match=f"--tls-client-ca {tmp_path / 'lanes_ca.pem'}: .*CN=lanes_ca.* issued by "
                                         r"CN=ca, .*not in the file.*append"):
        check_tls(files)
    both = tmp_path / "lanes_and_root.pem"
    both.write_text((tmp_path / "lanes_ca.pem").read_text() + (pki / "ca.pem").read_text())
    assert check_tls(TlsFiles(files.cert, files.key, str(both))) == []
    assert _lane_answer(tmp_path, both, "lane2").startswith(b"HTTP/1.1 200")

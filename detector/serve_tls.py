"""TLS for `detector serve`: the certificate, key and client CA checked at start, before the model loads.

On a station LAN the bearer token, the scans and the verdicts cross the network; customs IT asks for TLS, often mutual
(a client certificate per lane PC). uvicorn terminates it (ssl_certfile, ssl_keyfile, ssl_ca_certs, ssl_cert_reqs,
in every uvicorn the package allows); what uvicorn would only find once the model is loaded, or never (a cert that
expired, a key that needs a passphrase typed at a terminal the service does not have), is refused here in one line
that names the file and the reason.
"""
from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

EXPIRY_WARN_DAYS = 30   # a certificate expiring within this many days is warned about at start
CERT_BEGIN, CERT_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


class _Passphrase(Exception):
    """Raised from load_cert_chain's password callback: the key is encrypted."""


@dataclass(frozen=True)
class TlsFiles:
    """The service's certificate (chain), its private key and, for mutual TLS, the CA its clients' certs are signed
    by (None: no client certificate asked for)."""

    cert: str
    key: str
    client_ca: str | None = None

    def describe(self) -> str:
        """For the start line: that it is TLS, and whether client certificates are required."""
        return (f"TLS, client certificates signed by {self.client_ca} required" if self.client_ca
                else "TLS, no client certificates asked for")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """uvicorn.run's TLS arguments: CERT_REQUIRED where a client CA is given (no certificate, no connection)."""
        kw: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca:
            kw.update(ssl_ca_certs=self.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return kw


def tls_files(cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
    """The TLS options as given, None for plain HTTP; ValueError for a certificate or key alone (a key would be
    ignored, or TLS quietly not served), or a client CA without them."""
    if cert and key:
        return TlsFiles(cert, key, client_ca or None)
    if cert or key:
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} {cert or key} needs {missing} too (a PEM holding both: give it to both)")
    if client_ca:
        raise ValueError(f"--tls-client-ca {client_ca} needs --tls-cert and --tls-key (client certificates are asked "
                         "for over TLS only)")
    return None


def check_tls(tls: TlsFiles, now: datetime | None = None) -> list[str]:
    """Load the files as uvicorn will; ValueError naming the file and the reason for one that is missing, unreadable,
    not PEM, a key that does not match the certificate or needs a passphrase, a certificate expired or not yet valid,
    a client CA file holding no CA certificate valid now. Returns the warnings to print (expiring soon, a key every
    user may read)."""
    now = now or datetime.now(timezone.utc)
    cert_pem = _read("--tls-cert", tls.cert, CERT_BEGIN)
    _read("--tls-key", tls.key, "PRIVATE KEY-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    except _Passphrase:
        raise ValueError(f"--tls-key {tls.key}: the key is encrypted with a passphrase, which the service cannot ask "
                         "for at start: give it the key decrypted (openssl pkey -in KEY -out KEY.pem), readable by "
                         "its user only") from None
    except ssl.SSLError as e:
        why = ("the key does not match the certificate" if e.reason == "KEY_VALUES_MISMATCH"
               else f"cannot be loaded ({e})")
        raise ValueError(f"--tls-key {tls.key} with --tls-cert {tls.cert}: {why}") from None
    try:
        not_before, not_after = cert_validity(_first_cert(cert_pem))
    except (ValueError, IndexError) as e:
        raise ValueError(f"--tls-cert {tls.cert}: cannot read the certificate's validity dates ({e})") from None
    warnings = _validity_words("--tls-cert", tls.cert, not_before, not_after, now)
    if tls.client_ca:
        warnings += _check_client_ca(tls.client_ca, now)
    mode = os.stat(tls.key).st_mode
    if mode & stat.S_IROTH:   # a group's (Debian's ssl-cert) is the usual way to share it with a service's user
        warnings.append(f"--tls-key {tls.key} is readable by every user (mode {stat.S_IMODE(mode):o}): "
                        f"chmod 600 it")
    return warnings


def _read(option: str, path: str, marker: str) -> str:
    """The file's text; ValueError when it is missing, unreadable, or holds no PEM block with `marker`."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("ascii", "replace")
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be read ({e.strerror or e})") from None
    if marker not in text:
        what = "certificate" if marker == CERT_BEGIN else "private key"
        raise ValueError(f"{option} {path}: holds no PEM {what} (no {marker.strip('-')} block)")
    return text


def _first_cert(text: str) -> bytes:
    """The DER of the first certificate in a PEM text (the service's own: a chain file lists it first)."""
    begin = text.index(CERT_BEGIN)
    return ssl.PEM_cert_to_DER_cert(text[begin:text.index(CERT_END, begin) + len(CERT_END)])


def _no_passphrase() -> str:
    raise _Passphrase()


def _check_client_ca(path: str, now: datetime) -> list[str]:
    """ValueError unless the file holds a CA certificate valid now whose issuers up to a self-signed root are in it and
    valid too (else every client would be refused); warnings for one expiring soon."""
    _read("--tls-client-ca", path, CERT_BEGIN)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        raise ValueError(f"--tls-client-ca {path}: cannot be loaded ({e})") from None
    cas = ctx.get_ca_certs()
    if not cas:
        raise ValueError(f"--tls-client-ca {path}: holds no CA certificate (basicConstraints CA:TRUE), so no client "
                         "certificate could be verified")
    by_subject = {c["subject"]: c for c in cas}
    chains = [chain for chain in (_to_root(c, by_subject) for c in cas) if chain]
    if not chains:   # OpenSSL verifies a client up to a self-signed root: an intermediate alone verifies no one
        c = cas[0]
        raise ValueError(f"--tls-client-ca {path}: its CA {_name(c['subject'])} is issued by {_name(c['issuer'])}, "
                         "which is not in the file, and a client certificate is verified up to a self-signed root, "
                         "so every client would be refused: append the issuer's certificate (up to the root) to it")
    spans = [(max(nb for nb, _ in span), min(na for _, na in span))
             for span in ([(_cert_time(c["notBefore"]), _cert_time(c["notAfter"])) for c in chain] for chain in chains)]
    valid = [(nb, na) for nb, na in spans if nb <= now < na]
    if not valid:
        raise ValueError(f"--tls-client-ca {path}: no CA certificate in it is valid now (expired or not yet valid, "
                         "or its issuer is), so every client certificate would be refused")
    return _validity_words("--tls-client-ca", path, *max(valid, key=lambda v: v[1]), now)


def _to_root(ca: dict, by_subject: dict) -> list[dict]:
    """The CA and its issuers up to a self-signed one, as get_ca_certs gives them; [] where one is not in the file."""
    chain = [ca]
    while chain[-1]["issuer"] != chain[-1]["subject"]:
        issuer = by_subject.get(chain[-1]["issuer"])
        if issuer is None or issuer in chain:
            return []
        chain.append(issuer)
    return chain


def _name(rdns: tuple) -> str:
    """A certificate's subject or issuer as get_ca_certs gives it, written as openssl does (CN=..., O=...)."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST"}
    return ", ".join(f"{short.get(k, k)}={v}" for rdn in rdns for k, v in rdn) or "(no name)"


def _validity_words(option: str, path: str, not_before: datetime, not_after: datetime, now: datetime) -> list[str]:
    """ValueError for a certificate outside its validity (every client refuses it); a warning when it ends soon."""
    if now >= not_after:
        raise ValueError(f"{option} {path}: the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC: every client "
                         "would refuse it")
    if now < not_before:
        raise ValueError(f"{option} {path}: the certificate is not valid before {not_before:%Y-%m-%d %H:%M} UTC "
                         "(check this machine's clock): clients would refuse it")
    if not_after - now < timedelta(days=EXPIRY_WARN_DAYS):
        days = (not_after - now).days
        return [f"{option} {path}: the certificate expires on {not_after:%Y-%m-%d %H:%M} UTC, "
                f"{'in under a day' if days < 1 else f'in {days} day' + ('s' if days > 1 else '')}: renew it"]
    return []


def _cert_time(text: str) -> datetime:
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(text), timezone.utc)


def cert_validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a DER X.509 certificate, read from its TBSCertificate (RFC 5280 4.1)."""
    _, i, _ = _tlv(der, 0)              # Certificate: into it
    _, i, _ = _tlv(der, i)              # tbsCertificate: into it
    tag, _, end = _tlv(der, i)
    if tag == 0xA0:                     # [0] version, absent in v1
        i = end
    for _ in range(3):                  # serialNumber, signature, issuer
        i = _tlv(der, i)[2]
    _, i, _ = _tlv(der, i)              # validity: into it
    tag, start, end = _tlv(der, i)
    not_before = _asn1_time(tag, der[start:end])
    tag, start, end = _tlv(der, end)
    return not_before, _asn1_time(tag, der[start:end])


def _tlv(der: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at i."""
    tag, n = der[i], der[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n, i = int.from_bytes(der[i:i + k], "big"), i + k
    return tag, i, i + n


def _asn1_time(tag: int, raw: bytes) -> datetime:
    """UTCTime (YYMMDDHHMMSSZ, 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    text = raw.decode("ascii")
    if tag == 0x17:
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)

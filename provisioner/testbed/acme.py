"""The testbed's ACME server: Debian's pebble and pebble-challtestsrv on the host side of the
bridge, so that role letsencrypt gets real certificates (real HTTP-01 validation) on the test
network. See shared/TESTBED-NOTES.md, "A real ACME issuance on the testbed".

- pebble serves its ACME API over TLS with a certificate of our own: a small CA made here with
  openssl (`acme/listener-ca.pem`, installed into every server's trust store by servers.py) and
  a leaf for the gateway's address. It validates on the servers' ports 80/443, with no sleep
  before a validation (PEBBLE_VA_NOSLEEP), no deliberately refused nonces
  (PEBBLE_WFE_NONCEREJECT=0) and never PEBBLE_VA_ALWAYS_VALID.
- pebble-challtestsrv is pebble's DNS: every name answers the address of ACME_HOST (the load
  balancer of inventories/local.yml) and no IPv6 address (its default would be ::1).
- pebble keeps everything in memory and makes a new root at each start: its root is written to
  `.testbed/pebble-root.pem` after each start, for clients that check served certificates.
"""
from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

from . import network, procs
from .config import STATE_DIR, Layout, TestbedError

ACME_HOST = "lb1"            # every name pebble looks up resolves to this server
ACME_PORT = 14000            # pebble's ACME API: https://<gateway>:14000/dir
MANAGEMENT_PORT = 15000      # pebble's management API: /roots/0 is the issuing root
DNS_PORT = 8053              # pebble-challtestsrv's DNS
CHALLTESTSRV_MANAGEMENT = "127.0.0.1:8055"
CERT_DAYS = 90               # like Let's Encrypt (pebble's default is 5 years)
ACME_DIR = STATE_DIR / "acme"
LISTENER_CA = ACME_DIR / "listener-ca.pem"
ROOT_FILE = STATE_DIR / "pebble-root.pem"
PEBBLE_MARKER = "pebble-config.json"
CHALLTESTSRV_MARKER = "pebble-challtestsrv"


def directory_url(gateway: str) -> str:
    return f"https://{gateway}:{ACME_PORT}/dir"


def _openssl(*args: str) -> None:
    p = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise TestbedError(f"openssl {args[0]} failed: {p.stderr.strip()}")


def listener_certificate(gateway: str, directory: Path = ACME_DIR) -> tuple[Path, Path]:
    """(certificate, key) for pebble's own listeners, for the gateway's address, issued by a CA
    kept in `directory` (made once; a new leaf when the gateway's address changed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "listener-ca.pem", directory / "listener-ca.key"
    cert, key = directory / "listener.pem", directory / "listener.key"
    if not (ca.exists() and ca_key.exists()):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-days", "3650", "-subj", "/CN=provisioner testbed ACME listener CA",
                 "-keyout", str(ca_key), "-out", str(ca))
        cert.unlink(missing_ok=True)
    stamp = directory / "listener.address"
    if not cert.exists() or not stamp.exists() or stamp.read_text().strip() != gateway:
        csr = directory / "listener.csr"
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-subj", "/CN=pebble", "-keyout", str(key), "-out", str(csr))
        ext = directory / "listener.ext"
        ext.write_text(f"subjectAltName=IP:{gateway},IP:127.0.0.1\n"
                       "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-days", "825", "-extfile", str(ext), "-out", str(cert))
        csr.unlink()
        stamp.write_text(gateway + "\n")
    return cert, key


def argvs(gateway: str, dns_address: str, cert: Path, key: Path, directory: Path = ACME_DIR,
          http_port: int = 80, management: str = CHALLTESTSRV_MANAGEMENT) -> tuple[list[str], list[str]]:
    """The command lines of pebble and pebble-challtestsrv (pebble's config file written).
    http_port: where pebble fetches HTTP-01 tokens (the servers' port 80); management: the DNS
    server's management API (a test on loopback takes another port than the testbed's)."""
    config = directory / PEBBLE_MARKER
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"{gateway}:{ACME_PORT}",
        "managementListenAddress": f"{gateway}:{MANAGEMENT_PORT}",
        "certificate": str(cert), "privateKey": str(key),
        "httpPort": http_port, "tlsPort": 443,
        "ocspResponderURL": "", "externalAccountBindingRequired": False,
        "certificateValidityPeriod": CERT_DAYS * 86400}}, indent=1) + "\n")
    # pebble refuses 5% of nonces by default, to exercise clients' retry; certbot retries once,
    # so two in a row failed an issuance now and then (seen on this machine): none here
    pebble = ["env", "PEBBLE_VA_NOSLEEP=1", "PEBBLE_AUTHZREUSE=0", "PEBBLE_WFE_NONCEREJECT=0", "pebble", "-config", str(config),
              "-dnsserver", f"{gateway}:{DNS_PORT}"]
    challtestsrv = ["pebble-challtestsrv", "-dns01", f"{gateway}:{DNS_PORT}", "-http01", "",
                    "-https01", "", "-tlsalpn01", "", "-management", management,
                    "-defaultIPv4", dns_address, "-defaultIPv6", ""]
    return pebble, challtestsrv


def _context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(LISTENER_CA))


def fetch_root(gateway: str) -> str:
    """pebble's issuing root (PEM), from its management API."""
    url = f"https://{gateway}:{MANAGEMENT_PORT}/roots/0"
    with urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                     urllib.request.HTTPSHandler(context=_context())).open(url, timeout=10) as r:
        return r.read().decode()


def up(lay: Layout, log=print) -> None:
    """Start (or keep) pebble and pebble-challtestsrv on the gateway; write pebble's root."""
    names = {s.name: s.address for s in lay.servers}
    if ACME_HOST not in names:
        log(f"no {ACME_HOST} in the testbed: the ACME server is not started")
        return
    run, logs = STATE_DIR / "run", STATE_DIR / "logs"
    run.mkdir(parents=True, exist_ok=True)
    cert, key = listener_certificate(lay.gateway)
    pebble, challtestsrv = argvs(lay.gateway, names[ACME_HOST], cert, key)
    dns_pid, pebble_pid = run / "pebble-challtestsrv.pid", run / "pebble.pid"
    procs.ensure(challtestsrv, logs / "pebble-challtestsrv.log", dns_pid, CHALLTESTSRV_MARKER)
    host, _, port = CHALLTESTSRV_MANAGEMENT.rpartition(":")
    network.wait_port(host, int(port), "pebble-challtestsrv", dns_pid, CHALLTESTSRV_MARKER)
    started = procs.ensure(pebble, logs / "pebble.log", pebble_pid, PEBBLE_MARKER)
    network.wait_port(lay.gateway, ACME_PORT, "pebble", pebble_pid, PEBBLE_MARKER)
    network.wait_port(lay.gateway, MANAGEMENT_PORT, "pebble", pebble_pid, PEBBLE_MARKER)
    if started or not ROOT_FILE.exists():
        ROOT_FILE.write_text(fetch_root(lay.gateway))


def down() -> list[str]:
    run = STATE_DIR / "run"
    return [name for name, marker in (("pebble", PEBBLE_MARKER),
                                      ("pebble-challtestsrv", CHALLTESTSRV_MARKER))
            if procs.stop(run / f"{name}.pid", marker)]


def health(lay: Layout) -> list[tuple[str, str | None]]:
    """(what, None when it works or the error): pebble's directory over TLS (the listener CA),
    its root matching `.testbed/pebble-root.pem`, and the DNS server's process."""
    if ACME_HOST not in {s.name for s in lay.servers}:
        return []
    run = STATE_DIR / "run"
    if procs.running(run / "pebble.pid", PEBBLE_MARKER) is None:
        return [("pebble", "not running: `invoke testbed.up` starts it")]
    checks: list[tuple[str, str | None]] = []
    url = directory_url(lay.gateway)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=_context())).open(url, timeout=10) as r:
            ok = "newOrder" in json.loads(r.read())
        checks.append((f"pebble {url}", None if ok else "the directory names no newOrder"))
    except (OSError, ValueError) as e:
        checks.append((f"pebble {url}", str(e)))
    try:
        same = ROOT_FILE.exists() and ROOT_FILE.read_text() == fetch_root(lay.gateway)
        checks.append(("pebble root", None if same else f"{ROOT_FILE} is not pebble's current "
                       "root: `invoke testbed.up` writes it"))
    except OSError as e:
        checks.append(("pebble root", str(e)))
    checks.append(("pebble-challtestsrv", None if procs.running(
        run / "pebble-challtestsrv.pid", CHALLTESTSRV_MARKER) else
        "not running: `invoke testbed.up` starts it"))
    return checks

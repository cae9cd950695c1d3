"""The testbed's ACME server, run on this machine's loopback: pebble and pebble-challtestsrv
started the way `invoke testbed.up` starts them (its listener certificate, its config, its
process tracking), then role letsencrypt's own certbot command lines against it, with real
HTTP-01 validation of a token served from a webroot. No test server is involved."""
from __future__ import annotations

import functools
import json
import http.server
import shutil
import socket
import subprocess
import threading
import time

import pytest

import roles.letsencrypt as le
from provisioner.facts import Facts
from provisioner.testbed import acme, network, procs
from test_agent import facts_of          # the agent run on this machine

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("pebble", "pebble-challtestsrv", "certbot", "openssl")),
    reason="needs Debian's pebble and certbot on this machine (`bash .ci/setup` installs pebble; "
           "apt-get install certbot)")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
def acme_server(tmp_path):
    """pebble + challtestsrv on loopback; HTTP-01 tokens fetched from a webroot served here."""
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(webroot))
    web = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    state = tmp_path / "acme"
    cert, key = acme.listener_certificate(LOOPBACK, state)
    management = free_port()              # the testbed's own DNS server may hold 8055
    pebble, dns = acme.argvs(LOOPBACK, LOOPBACK, cert, key, state, http_port=web.server_address[1],
                             management=f"{LOOPBACK}:{management}")
    pids = [(tmp_path / "dns.pid", acme.CHALLTESTSRV_MARKER), (tmp_path / "pebble.pid", acme.PEBBLE_MARKER)]
    try:
        for argv, (pidfile, marker) in zip((dns, pebble), pids):
            assert procs.ensure(argv, tmp_path / f"{pidfile.stem}.log", pidfile, marker)
        network.wait_port(LOOPBACK, management, "challtestsrv", *pids[0])
        network.wait_port(LOOPBACK, acme.ACME_PORT, "pebble", *pids[1])
        yield {"webroot": webroot, "ca": state / "listener-ca.pem", "tmp": tmp_path}
    finally:
        for pidfile, marker in pids:
            procs.stop(pidfile, marker)
        web.shutdown()


def test_pebble_validates_for_real_and_its_dns_answers_only_the_load_balancer(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    pebble, dns = acme.argvs("10.77.0.1", "10.77.0.15", cert, key, tmp_path)
    assert "PEBBLE_VA_NOSLEEP=1" in pebble and not any("ALWAYS_VALID" in a for a in pebble)
    assert "PEBBLE_WFE_NONCEREJECT=0" in pebble           # no issuance failed by a refused nonce
    assert pebble[pebble.index("-dnsserver") + 1] == "10.77.0.1:8053"
    assert dns[dns.index("-defaultIPv4") + 1] == "10.77.0.15"
    assert dns[dns.index("-defaultIPv6") + 1] == ""                 # not ::1
    config = json.loads((tmp_path / acme.PEBBLE_MARKER).read_text())["pebble"]
    assert config["listenAddress"] == "10.77.0.1:14000" and config["httpPort"] == 80
    assert config["certificate"] == str(cert)


def certbot(server, argv: list[str]) -> subprocess.CompletedProcess:
    """The role's command line, with certbot's state in a temporary folder and the webroot
    served here (the server's /etc/letsencrypt and /var/www/acme are not this machine's)."""
    d = server["tmp"]
    argv = [str(server["webroot"]) if a == le.WEBROOT else a for a in argv]
    argv += ["--config-dir", str(d / "le"), "--work-dir", str(d / "work"), "--logs-dir", str(d / "logs")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                               "REQUESTS_CA_BUNDLE": str(server["ca"])})


@needs_tools
def test_the_role_s_certbot_commands_issue_and_reissue_against_pebble(acme_server):
    c = {"url": acme.directory_url(LOOPBACK), "email": "ops@app.test"}
    site = {"name": "app", "names": ["app.test"]}
    first = certbot(acme_server, le.certbot_argv(c, site, renew=False))
    assert first.returncode == 0, first.stdout + first.stderr
    pem = str(acme_server["tmp"] / "le" / "live" / "app" / "fullchain.pem")
    fact = Facts(facts_of({"certs": [pem]})).cert(pem)
    assert fact["sans"] == ["app.test"]
    days = (le.not_after_seconds(fact["not_after"]) - time.time()) / 86400
    assert acme.CERT_DAYS - 1 < days <= acme.CERT_DAYS          # like Let's Encrypt's
    # a name added: the role's re-issue command replaces the certificate in the same lineage
    site["names"].append("www.app.test")
    again = certbot(acme_server, le.certbot_argv(c, site, renew=True))
    assert again.returncode == 0, again.stdout + again.stderr
    new = Facts(facts_of({"certs": [pem]})).cert(pem)
    assert sorted(new["sans"]) == ["app.test", "www.app.test"] and new["serial"] != fact["serial"]
    renewal = (acme_server["tmp"] / "le" / "renewal" / "app.conf").read_text()
    assert f"server = {c['url']}" in renewal            # the timer renews against the same ACME server

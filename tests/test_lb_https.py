"""Live: the local env's load balancer lb1 (roles nginx + letsencrypt) serving the sample app of
web1 and web2 over HTTPS at app.test, its certificate issued by the testbed's ACME server
(pebble, on the host side of the bridge). Everything is checked from the host, as a browser
would, with pebble's root as the only trust anchor.

Needs the testbed (`invoke testbed.up`: it runs pebble) and, for the testssl test, Debian's
testssl.sh on the host (`bash .ci/setup` installs both)."""
from __future__ import annotations

import http.client
import re
import shutil
import ssl
import subprocess
import time

import pytest
from cryptography import x509

from conftest import provision_env
from engine_helpers import ADDRESSES, Run, inventory, report, sh, wait_for
from http_load import Connection, PlainConnection, get, load, trusting
from provisioner.inventory import load_inventory
from provisioner.testbed import acme

LB = "lb1"
ADDRESS = ADDRESSES[LB]
NAME, ALIAS = "app.test", "www.app.test"
FAILOVER_REQUESTS = 3000             # bounded: a fixed count, each request with a 10 s timeout


def provision(*args: str):
    return provision_env("--limit", "app,db,lb", *args)


@pytest.fixture(scope="module")
def served(local_env):
    """lb1 from never-provisioned with the rest of the env, the sample app deployed, the env
    provisioned again (conftest's shared session fixture)."""
    assert acme.ROOT_FILE.exists(), "no pebble root: `invoke testbed.up` starts pebble"
    # mon1's probes before the first deploy found nothing on :3000, and nginx skips an app
    # server for nginx_fail_timeout (10 s) after nginx_max_fails: the env has just been deployed
    wait_for("app.test to answer 200 through lb1", lambda: https("/health").status == 200, 30, every=1)
    return local_env


def root() -> str:
    return str(acme.ROOT_FILE)


def https(path="/", name=NAME, **versions):
    return get(Connection(name, ADDRESS, trusting(root(), **versions)), path)


def served_serial() -> int:
    return x509.load_der_x509_certificate(https().cert_der).serial_number


def nginx_master_pid() -> str:
    return sh(LB, "cat /run/nginx.pid").stdout.strip()


def test_first_run_bootstraps_http_certificate_then_tls_and_the_second_changes_nothing(served):
    (r1, e1), (r2, e2) = served["first"], served["second"]
    assert r1.returncode == 0, report(e1, "failed", "unreachable")
    lb_steps = [(e["role"], e["resource"]) for e in e1 if e.get("event") == "step"
                and e.get("host") == LB and e.get("status") == "changed"]
    order = [lb_steps.index(s) for s in (("nginx", "file group nginx"),
                                         ("letsencrypt", "certificate app"),
                                         ("letsencrypt", "file group tls app"))]
    assert order == sorted(order), lb_steps
    assert r2.returncode == 0
    recap = e2[-1]
    assert recap["changed"] == 0 and recap["failed"] == 0, report(e2, "changed", "failed")


def test_the_site_answers_over_https_with_a_certificate_chaining_to_pebble(served):
    a = https()
    assert a.status == 200 and a.body.startswith(b"sample-app ")
    assert {v for k, v in a.cert["subjectAltName"]} == {NAME, ALIAS}
    assert https(name=ALIAS).status == 200
    with pytest.raises(ssl.SSLCertVerificationError):       # and only pebble's root makes it so
        get(Connection(NAME, ADDRESS, ssl.create_default_context()))


def test_security_headers_are_sent(served):
    h = https().headers
    assert h["strict-transport-security"].startswith("max-age=31536000")
    assert h["x-content-type-options"] == "nosniff"
    assert h["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in h["content-security-policy"]
    assert h["referrer-policy"] and h["permissions-policy"]
    assert "server" not in h or h["server"] == "nginx"          # no version


def test_plain_http_redirects_except_the_acme_challenge(served):
    a = get(PlainConnection(NAME, ADDRESS), "/some/page?x=1")
    assert a.status == 301 and a.headers["location"] == f"https://{NAME}/some/page?x=1"
    assert get(PlainConnection(NAME, ADDRESS), "/.well-known/acme-challenge/none").status == 404


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_accepted(served, version):
    a = https(minimum_version=version, maximum_version=version)
    assert a.status == 200 and a.protocol == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]


def test_tls_1_1_is_refused_by_the_server(served):
    ctx = trusting(root(), minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")          # so that this client can offer TLS 1.1 at all
    with pytest.raises(ssl.SSLError) as e:
        get(Connection(NAME, ADDRESS, ctx))
    assert "NO_PROTOCOLS_AVAILABLE" not in str(e.value), "this client could not offer TLS 1.1"


def test_an_unknown_host_gets_no_tls_handshake_and_no_http_answer(served):
    ctx = trusting(root())
    ctx.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
        get(Connection("other.test", ADDRESS, ctx))
    with pytest.raises(http.client.RemoteDisconnected):         # 444: closed without a word
        get(PlainConnection("other.test", ADDRESS))


def test_traffic_reaches_both_app_servers_and_the_log_has_upstream_times(served):
    for _ in range(10):
        assert https().status == 200
    log = sh(LB, "tail -n 10 /var/log/nginx/access.log").stdout
    assert {f"{ADDRESSES['web1']}:3000", f"{ADDRESSES['web2']}:3000"} <= set(re.findall(r"upstream=(\S+)", log)), log
    assert re.search(r"request_time=\d+\.\d+ .*upstream_time=\d+\.\d+", log), log


def test_failover_under_load_loses_no_request(served):
    """A fixed number of requests through lb1; web2's app stops a third of the way in and
    starts again at two thirds. Target: every request answered 200."""
    stop = lambda: sh("web2", "systemctl stop pm2-app.service")              # noqa: E731
    start = lambda: sh("web2", "systemctl start pm2-app.service")            # noqa: E731
    try:
        result = load(lambda: Connection(NAME, ADDRESS, trusting(root())), FAILOVER_REQUESTS,
                      threads=8, at={FAILOVER_REQUESTS // 3: stop, 2 * FAILOVER_REQUESTS // 3: start})
    finally:
        start()
    print(f"\nfailover through lb1: {result.summary()}")
    assert len(result.statuses) == FAILOVER_REQUESTS
    assert result.failed == [], result.failed[:5]


def test_a_forced_renewal_through_certbot_s_own_service_is_served_without_a_restart(served):
    before, pid = served_serial(), nginx_master_pid()
    # certbot's own unit (`certbot -q renew`), told once through its config file to renew what
    # is not due yet (and, should a release's unit lack the flag, not to sleep first); its
    # deploy hook checks and reloads nginx
    lines = "\nforce-renewal = True\nno-random-sleep-on-renew = True\n"   # the file may lack a last newline
    sh(LB, f"printf '{lines}' >> /etc/letsencrypt/cli.ini")
    try:
        sh(LB, "systemctl start certbot.service")
    finally:
        sh(LB, "sed -i '/^force-renewal = True$/d; /^no-random-sleep-on-renew = True$/d' "
               "/etc/letsencrypt/cli.ini")
    deadline = time.monotonic() + 20
    while served_serial() == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert served_serial() != before
    assert nginx_master_pid() == pid
    r, events = provision()
    assert events[-1]["changed"] == 0, report(events, "changed")     # the renewed one is valid


def test_a_change_nginx_t_refuses_is_reverted_and_nginx_keeps_serving(served, tmp_path):
    """A stray upstream of the same name planted on the server: the role's next change makes
    the configuration fail `nginx -t`; every file of the group goes back, nginx is not
    reloaded, and the site keeps answering."""
    local = load_inventory("local")
    sites = local.hostvars(LB)["nginx_sites"]
    sh(LB, "echo 'upstream app_app { server 127.0.0.1:9; }' > /etc/nginx/conf.d/zz-stray.conf")
    before = sh(LB, "sha256sum /etc/nginx/sites-available/app-tls.conf").stdout
    try:
        inv = inventory(tmp_path, ["web1", "web2", LB], [], name="lbbad",
                        ssh={"user": "deploy", "bootstrap_user": "root"},
                        groups={"app": {"hosts": ["web1", "web2"], "roles": []},
                                "lb": {"hosts": [LB], "roles": ["nginx"],
                                       "vars": {"nginx_sites": sites, "nginx_keepalive": 8}}})
        run = Run(inv, limit=LB)
        assert run.exit_code == 1
        [failed] = run.steps(LB, "failed")
        assert failed["resource"] == "file group nginx" and "duplicate upstream" in failed["output"]
        assert sh(LB, "sha256sum /etc/nginx/sites-available/app-tls.conf").stdout == before
        assert https().status == 200
    finally:
        sh(LB, "rm -f /etc/nginx/conf.d/zz-stray.conf")


@pytest.mark.skipif(not shutil.which("testssl"), reason="Debian's testssl.sh is not installed on the "
                    "host (`bash .ci/setup` installs it)")
def test_testssl_finds_nothing_not_ok_and_nothing_vulnerable(served):
    p = subprocess.run(["testssl", "--quiet", "--color", "0", "--nodns", "none", "--ip", ADDRESS,
                        "--add-ca", root(), "-p", "-S", "-U", "-h", f"https://{NAME}/"],
                       capture_output=True, text=True, timeout=600)
    out = p.stdout
    print(out)
    # What testssl calls "NOT ok" about pebble's certificates themselves, not about our nginx:
    # they have no OCSP or CRL address, and their serial is a random number below 2^63 (pebble's
    # ca.makeSerial), which 1 certificate in 128 encodes in 7 bytes, under testssl's 8
    pebble = r"Certificate Revocation List|OCSP URI|neither CRL nor OCSP|" \
             r"^\s*Serial\s.*NOT ok: length should be >= 64 bits entropy \(is: 7 bytes\)"
    not_ok = [line for line in out.splitlines() if "NOT ok" in line
              and not re.search(pebble, line)]
    assert not_ok == [], "\n".join(not_ok)
    assert "VULNERABLE" not in out.replace("not vulnerable", "")
    assert "Testing protocols" in out or "SSLv2" in out, "testssl printed no protocol section"


def test_a_site_taken_out_of_nginx_sites_is_no_longer_served(served, tmp_path):
    """A second site, then the same inventory without it: nginx stops answering for it on that
    run (its links in sites-enabled go, its files stay in sites-available), the first site keeps
    answering, and the env's own run still finds lb1 converged."""
    local = load_inventory("local")
    lb_vars = {k: v for k, v in local.hostvars(LB).items() if k.startswith("nginx_")}
    app = lb_vars["nginx_sites"][0]
    old = dict(app, name="old", server_names=["old.test"])

    def run_with(sites):
        inv = inventory(tmp_path, ["web1", "web2", LB], [], name="lbsites",
                        ssh={"user": "deploy", "bootstrap_user": "root"},
                        groups={"app": {"hosts": ["web1", "web2"], "roles": []},
                                "lb": {"hosts": [LB], "roles": ["nginx"],
                                       "vars": dict(lb_vars, nginx_sites=sites)}})
        run = Run(inv, limit=LB)
        assert run.exit_code == 0, run.report("failed")
        return run

    def old_site() -> int | None:
        """old.test's answer on port 80: a status, or None for nginx's 444 (closed)."""
        try:
            return get(PlainConnection("old.test", ADDRESS), "/").status
        except http.client.RemoteDisconnected:
            return None

    def settles_on(want) -> None:
        # a graceful reload returns before the new workers take over: old ones may answer
        # for a moment, so look again for up to 10 s
        wait_for(f"old.test to answer {want}", lambda: old_site() == want, 10, every=0.2)

    run_with([app, old])
    settles_on(301)
    run = run_with([app])
    [step] = [e for e in run.steps(LB) if e["resource"] == "sites enabled in /etc/nginx/sites-enabled"]
    assert step["status"] == "changed" and "old.conf" in step["reason"], step
    settles_on(None)                     # 444, like any unknown name
    assert https().status == 200
    assert sh(LB, "test -f /etc/nginx/sites-available/old.conf", check=False).returncode == 0
    r, events = provision()
    assert r.returncode == 0 and events[-1]["changed"] == 0, report(events, "changed", "failed")

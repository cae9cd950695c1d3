"""Live: monitoring of the local env. mon1 (role monitoring) scrapes every host's exporters
(role monitoring_agent), probes lb1's site over HTTPS, and mails alerts to the testbed's sink
on the gateway (provisioner/testbed/sinks.py); the local inventory shortens the timings
(scrape 5 s, `for: 15s`, group_wait 5 s, host metrics every 10 s).

The env comes from conftest's `local_env` (six fresh servers provisioned, the sample app
deployed with `invoke deploy`, the env provisioned again), shared with the other env modules. Every wait is bounded; every test undoes what it planted, in
`finally`.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.parse
import urllib.request

import pytest

from conftest import invoke
from engine_helpers import ADDRESSES, Run, report, sh
from provisioner.cli.common import inventory as load_env, with_secrets
from provisioner.testbed import sinks

MON = "mon1"
PROMETHEUS = f"http://{ADDRESSES[MON]}:9090"
ALERT_WAIT = 150           # s: metrics job 10 + scrape 5 + for 15 + group_wait 5, with margin
APP_USER, APP_HOME = "app", "/home/app"
TEXTFILE = "/var/lib/prometheus/node-exporter"


@pytest.fixture(scope="module")
def monitored(local_env):
    """The env with mon1, the sample app deployed (conftest's shared session fixture)."""
    return local_env


def api(path: str, **params) -> dict:
    """Prometheus' HTTP API, from the controller (the UI port is open to the test network)."""
    url = f"{PROMETHEUS}{path}?{urllib.parse.urlencode(params)}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())["data"]


def wait_alert(name: str, timeout: float = ALERT_WAIT, **labels) -> dict | None:
    """The firing alert `name` whose labels include `labels`, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in api("/api/v1/alerts")["alerts"]:
            if a["labels"].get("alertname") == name and a["state"] == "firing" \
                    and all(a["labels"].get(k) == v for k, v in labels.items()):
                return a
        time.sleep(2)
    return None


def pm2(host: str, *args: str) -> None:
    sh(host, f"runuser -u {APP_USER} -- env -i HOME={APP_HOME} PM2_HOME={APP_HOME}/.pm2 "
             f"PATH=/usr/local/bin:/usr/bin:/bin /usr/local/bin/pm2 {' '.join(args)}")


def test_the_env_provisions_and_converges_with_monitoring(monitored):
    r, events = monitored["first"]
    assert r.returncode == 0, report(events, "failed", "unreachable")
    r, events = monitored["second"]
    recap = events[-1]
    assert r.returncode == 0 and recap["changed"] == 0, report(events, "changed", "failed")
    assert recap["hosts"][MON]["remote_commands"] == 2          # facts (os kept), finish


def test_prometheus_scrapes_every_target_the_inventory_implies(monitored):
    expected = {("node", h) for h in ("web1", "web2", "db1", "vault", "lb1", "mon1")} | {
        ("postgres", "db1"), ("redis", "db1"), ("nginx", "lb1"), ("blackbox", "app@lb1"),
        ("prometheus", "prometheus"), ("alertmanager", "alertmanager")}
    # Prometheus answers with each series' last scrape (every 30 s), and web2's pm2 figures are
    # written every 30 s: right after the env's deploy, the probe through lb1 and the count of
    # online instances can still say what was true before it. Wait for both to catch up.
    deadline = time.monotonic() + 100
    while True:
        seen = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1]
                for s in api("/api/v1/query", query="up")["result"]}
        [probe] = api("/api/v1/query", query='probe_success{site="app"}')["result"] or [None]
        [online] = api("/api/v1/query", query='pm2_app_online_instances{instance="web2",'
                                              'app="sample"}')["result"] or [None]
        settled = (set(seen) == expected and set(seen.values()) == {"1"} and probe and online
                   and probe["value"][1] == "1" and online["value"][1] == "2")
        if settled or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert set(seen) == expected and set(seen.values()) == {"1"}, seen
    assert probe and probe["value"][1] == "1", probe
    assert online and online["value"][1] == "2", online
    # series for the deployed app (and its colours) only; pm2's modules are left out, in
    # tests/test_role_monitoring.py (no module runs here: logrotate rotates pm2's logs)
    apps = {s["metric"]["app"] for s in api("/api/v1/query", query='{__name__=~"pm2_.+", app!=""}')["result"]}
    assert "sample" in apps and all(a == "sample" or a.startswith("sample-") for a in apps), apps


def test_exporters_answer_mon1_only_and_listen_on_the_private_address(monitored):
    db = ADDRESSES["db1"]
    listening = sh("db1", "ss -Hltn").stdout
    for port in (9100, 9187, 9121):
        assert f"{db}:{port} " in listening and f"0.0.0.0:{port} " not in listening \
            and f"*:{port} " not in listening
    with pytest.raises(OSError):             # the controller is not the monitoring server
        socket.create_connection((db, 9100), timeout=3).close()
    fetch = ("import urllib.request as u; o = u.build_opener(u.ProxyHandler({})); "   # no proxy env
             f"print(o.open('http://{db}:9100/metrics', timeout=5).status)")
    got = sh(MON, f'python3 -c "{fetch}"').stdout
    assert got.strip() == "200"


def test_stopping_the_app_mails_an_alert_then_a_resolved_one(monitored):
    """The issue's check: sample stopped on web2, AppDown mailed to the sink within a bounded
    time (and POSTed to the webhook), then RESOLVED after the restart."""
    before_mail, before_hooks = len(sinks.mails()), len(sinks.webhooks())
    t0 = time.monotonic()
    pm2("web2", "stop", "sample")
    try:
        fired = sinks.wait_mail(lambda s: "FIRING" in s and "AppDown" in s, ALERT_WAIT,
                                after=before_mail)
        fired_s = time.monotonic() - t0
        assert fired is not None, f"no AppDown mail in {ALERT_WAIT} s; alerts: {api('/api/v1/alerts')}"
        body = fired.get_body(("plain", "html")).get_content()
        assert "web2" in body and "sample" in body and "pm2 status" in body   # the runbook line
        assert any(a["labels"]["alertname"] == "AppDown" and h["status"] == "firing"
                   for h in sinks.webhooks()[before_hooks:] for a in h["alerts"])
    finally:
        pm2("web2", "start", "sample")
    resolved = sinks.wait_mail(lambda s: "RESOLVED" in s and "AppDown" in s, ALERT_WAIT,
                               after=before_mail)
    print(f"\nAppDown mailed {fired_s:.0f} s after the stop; resolved "
          f"{time.monotonic() - t0 - fired_s:.0f} s later")
    assert resolved is not None


def test_a_filling_disk_raises_the_disk_alert(monitored):
    """A bounded tmpfs (8 MiB) filled to 94 %: nothing outside it is touched. Under /mnt, where
    volumes are mounted and Debian's node exporter looks away by default (found live: no
    series at all); the role has it watched (roles/monitoring_agent MOUNT_POINTS_EXCLUDE)."""
    mnt = "/mnt/provisioner-disktest"
    sh("web1", f"mkdir -p {mnt} && mount -t tmpfs -o size=8m provisioner-disktest {mnt} && "
               f"head -c 7900000 /dev/zero > {mnt}/fill")
    try:
        assert wait_alert("DiskAlmostFull", instance="web1", mountpoint=mnt), \
            api("/api/v1/query", query=f'node_filesystem_avail_bytes{{mountpoint="{mnt}"}}')
    finally:
        sh("web1", f"umount {mnt} && rmdir {mnt}")


def test_a_stale_backup_status_raises_the_backup_alert(monitored):
    """The textfile contract backup jobs keep (roles/monitoring/rules.py): last success two
    hours ago, one hour allowed."""
    now = int(time.time())
    prom = (f'provisioner_backup_last_success_timestamp_seconds{{backup="livetest"}} {now - 7200}\n'
            f'provisioner_backup_max_age_seconds{{backup="livetest"}} 3600\n')
    sh("db1", f"printf '{prom}' > {TEXTFILE}/.livetest.tmp && "
              f"mv {TEXTFILE}/.livetest.tmp {TEXTFILE}/livetest_backup.prom")
    try:
        assert wait_alert("BackupStale", instance="db1", backup="livetest")
    finally:
        sh("db1", f"rm -f {TEXTFILE}/livetest_backup.prom")


def _mon1_run(**monitoring_vars) -> Run:
    """The local env with other monitoring vars, run on mon1 only (the targets still come from
    the whole inventory)."""
    inv = load_env("local")
    inv.groups["monitoring"].vars.update(monitoring_vars)
    return Run(with_secrets(inv, False), limit=MON)


def test_a_certificate_inside_the_threshold_raises_the_expiry_alert(monitored, forget_secrets):
    """pebble's certificates live 90 days: a 365-day threshold makes lb1's one 'expiring'."""
    try:
        run = _mon1_run(monitoring_cert_days=365)
        assert run.exit_code == 0, run.report("failed")
        assert wait_alert("CertificateExpiring", site="app", host="lb1")
    finally:
        run = _mon1_run()
        assert run.exit_code == 0, run.report("failed")


def test_a_bad_rule_fails_the_run_and_prometheus_keeps_its_rules(monitored, forget_secrets):
    rules = "/etc/prometheus/rules/provisioner.yml"
    before = sh(MON, f"sha256sum {rules} /etc/prometheus/prometheus.yml").stdout
    run = _mon1_run(monitoring_extra_rules=[{"alert": "Broken", "expr": "rate(up[5m]"}])
    assert run.exit_code == 1
    [failed] = run.steps(MON, "failed")
    assert failed["resource"] == "file group prometheus config and rules"
    assert sh(MON, f"sha256sum {rules} /etc/prometheus/prometheus.yml").stdout == before
    assert sh(MON, "systemctl is-active prometheus").stdout.strip() == "active"
    names = {r["name"] for g in api("/api/v1/rules")["groups"] for r in g["rules"]}
    assert "AppDown" in names and "Broken" not in names


def _vault_secret(name: str) -> str:
    from provisioner.cli.common import REPO_ROOT
    from provisioner.vault import open_env_vault
    return open_env_vault("local", REPO_ROOT, False)[name].reveal()


def test_status_names_a_stopped_app_and_exits_non_zero(monitored):
    """One table row per host; with sample stopped on web2, `status` exits 1 and says so."""
    r = invoke("status", "--env", "local", "--json", "--yes", check=False, timeout=120)
    doc = json.loads(r.stdout)
    assert set(doc["hosts"]) == {"web1", "web2", "db1", "vault", "lb1", "mon1"}
    assert all(h["reachable"] for h in doc["hosts"].values()), doc
    assert r.returncode == (0 if doc["ok"] else 1)
    web2 = doc["hosts"]["web2"]
    assert web2["apps"][0]["name"] == "sample" and web2["apps"][0]["online"] == 2
    # the release `invoke deploy` made current
    current = sh("web2", "readlink /srv/sample/current").stdout.strip()
    assert current and web2["apps"][0]["release"] == current.rsplit("/", 1)[-1]
    assert doc["hosts"]["lb1"]["certificates"][0]["days_left"] > 14
    assert isinstance(doc["hosts"]["mon1"]["alerts"], list)      # Alertmanager answered
    pm2("web2", "stop", "sample")
    try:
        r = invoke("status", "--env", "local", "--limit", "web2", "--yes", check=False, timeout=120)
        assert r.returncode == 1 and "! web2: app sample: 0 of 2 instances online" in r.stdout
    finally:
        pm2("web2", "start", "sample")


def test_logs_merge_hosts_and_redact_the_vaults_secrets(monitored, forget_secrets):
    secret = _vault_secret("pg_app_password")
    for host in ("web1", "web2"):
        sh(host, f"logger -t livetest 'from {host}: the password is {secret}'")
    r = invoke("logs", "--env", "local", "--limit", "app", "--grep", "livetest|from web",
               "--since", "5m", "--yes", timeout=120)
    lines = [l for l in r.stdout.splitlines() if "the password is" in l]
    assert {l.split()[0] for l in lines} == {"web1", "web2"}
    assert all(l.endswith("the password is ***") for l in lines), lines
    assert secret not in r.stdout + r.stderr


def test_logs_follow_ends_on_ctrl_c_and_leaves_no_reader_behind(monitored):
    import signal
    import subprocess
    import sys
    from engine_helpers import REPO
    p = subprocess.Popen([sys.executable, "-m", "invoke", "logs", "--env", "local", "--limit",
                          "web1", "--unit", "ssh", "--follow", "--yes"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 130 and "Traceback" not in err, err
    time.sleep(7)                       # the reader notices the closed exec at its keepalive (5 s)
    # [{] keeps the pattern from matching this very shell's command line
    left = sh("web1", "pgrep -fc 'python3 - [{]\"since' || true").stdout.strip()
    assert left == "0"

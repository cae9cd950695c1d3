"""`invoke status`, pure: the probe run on this machine (it is the same script the server runs,
fed on stdin), what is judged to need attention, the table, and the per-host config the
inventory implies. The live check is in tests/test_provision_local_monitoring.py."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

from engine_helpers import REPO
from fake_pm2 import jlist_output, pm2_host, proc
from provisioner import status
from provisioner.cli import status as status_cli
from provisioner.connection import Result, Unreachable
from provisioner.inventory import load_inventory_file


def local():
    return load_inventory_file(REPO / "inventories" / "local.yml")


def run_probe(cfg: dict) -> dict:
    argv = status.probe_argv(cfg)
    p = subprocess.run([sys.executable, *argv[1:]], input=status.PROBE, capture_output=True,
                       text=True, timeout=60, check=True)
    return json.loads(p.stdout)


def test_the_inventory_says_what_each_host_probes():
    inv = local()
    web2 = status.probe_config(inv, inv.hosts["web2"])
    assert web2["apps"] == ["sample"] and web2["pm2"] == {"user": "app", "home": "/home/app",
                                                           "unit": "pm2-app.service"}
    assert web2["alertmanager"] is None
    assert status.probe_config(inv, inv.hosts["mon1"])["alertmanager"] == "http://10.77.0.16:9093"
    assert status.thresholds(inv) == {"monitoring_disk_percent": 85, "monitoring_memory_percent": 90,
                                      "monitoring_cert_days": 14}


def test_the_probe_reads_textfile_backups_and_the_audit_log(tmp_path):
    now = time.time()
    (tmp_path / "backup.prom").write_text(
        f'provisioner_backup_last_success_timestamp_seconds{{backup="pg"}} {now - 7200:.0f}\n'
        'provisioner_backup_max_age_seconds{backup="pg"} 3600\n')
    audit = tmp_path / "audit.log"
    audit.write_text(json.dumps({"ts": "2026-12-01T10:00:00+00:00", "task": "provision",
                                 "result": "failed", "who": "ci", "changed": 1, "failed": 1}) + "\n")
    doc = run_probe({"apps": ["sample"], "pm2": None, "textfile": str(tmp_path),
                     "alertmanager": None, "audit_log": str(audit)})
    assert doc["backups"][0]["name"] == "pg" and 7190 <= doc["backups"][0]["age_seconds"] <= 7300
    assert doc["apps"] == [{"name": "sample", "instances": 0, "online": 0, "restarts": 0,
                            "release": None}]
    attention = status.judge(doc, status.DEFAULTS)
    assert "backup pg is 2 h old" in attention
    assert "app sample: 0 of 0 instances online" in attention
    assert "last provision failed (2026-12-01T10:00:00+00:00)" in attention


def probe_apps(tmp_path, monkeypatch, procs: list[dict]) -> list[dict]:
    """The probe's apps on a host where app `sample`'s pm2 daemon runs and `pm2 jlist` lists
    `procs` after the lines of a daemon start."""
    monkeypatch.setenv("PATH", f"{pm2_host(tmp_path, jlist_output(procs))}:/usr/bin:/bin")
    return run_probe({"apps": ["sample"],
                      "pm2": {"user": "app", "home": "/home/app", "unit": "pm2-app.service"},
                      "textfile": str(tmp_path), "alertmanager": None,
                      "audit_log": str(tmp_path / "audit.log")})["apps"]


def test_the_probe_finds_the_apps_after_the_lines_pm2_prints_starting_its_daemon(tmp_path,
                                                                                monkeypatch):
    """pm2 jlist prints "[PM2] Spawning PM2 daemon ..." ahead of the list when it started its
    daemon: read from the first "[", the list was not JSON, and the probe saw no instance."""
    apps = probe_apps(tmp_path, monkeypatch, [proc("sample", 0), proc("sample", 1, "stopped")])
    assert apps == [{"name": "sample", "instances": 2, "online": 1, "restarts": 1, "release": None}]


def test_the_probe_counts_no_pm2_module_as_an_instance_of_an_app_of_its_name(tmp_path, monkeypatch):
    """pm2 lists its modules (pm2-logrotate) beside the apps, and nothing keeps an app from a
    module's name: as in role pm2's status check and the host metrics, a module is no app."""
    apps = probe_apps(tmp_path, monkeypatch, [proc("sample", 0), proc("sample", 1, module=True)])
    assert [(a["instances"], a["online"]) for a in apps] == [(1, 1)]


def test_a_healthy_host_needs_nothing_and_fills_one_row():
    doc = {"uptime_seconds": 90000, "load": [0.1, 0.1, 0.1], "memory": {"used_percent": 40.0},
           "disks": [{"mount": "/", "used_percent": 50.0}], "failed_units": [],
           "apps": [{"name": "sample", "instances": 2, "online": 2, "restarts": 1,
                     "release": "20261201T100000Z-abc1234"}],
           "certificates": [{"site": "app", "days_left": 80.2}], "backups": [],
           "last_run": {"ts": "2026-12-01T10:00:00+00:00", "result": "changed"},
           "alerts": []}
    assert status.judge(doc, status.DEFAULTS) == []
    s = status.HostStatus("web1", doc=doc)
    assert status.row(s) == ["web1", "1d", "0.10", "40%", "50%", "0", "sample 2/2 r1",
                             "20261201T100000Z-abc1234", "80d", "-",
                             "2026-12-01T10:00:00+00:00 changed", "0"]
    doc2 = dict(doc, alerts=[{"name": "AppDown", "instance": "web2", "severity": "critical",
                              "summary": "x"}], failed_units=["x.service"],
                disks=[{"mount": "/", "used_percent": 91.0}])
    assert status.judge(doc2, status.DEFAULTS) == ["unit x.service failed", "disk / 91% full",
                                                   "alert AppDown firing on web2"]


class FakeConnection:
    """Runs the probe on this machine instead of over SSH; counts execs."""
    execs = 0

    def __init__(self, host, known_hosts, sudo_password=None):
        self.host = host

    def run(self, argv, stdin=None, timeout=None):
        FakeConnection.execs += 1
        if self.host.name == "db1":
            raise Unreachable("db1 (deploy@10.77.0.13:22): cannot connect: timed out")
        p = subprocess.run([sys.executable, *argv[1:]], input=stdin, capture_output=True, timeout=60)
        return Result(p.returncode, p.stdout, p.stderr, 0.1)

    def close(self):
        pass


def test_one_exec_per_host_and_unreachable_hosts_need_attention(monkeypatch):
    monkeypatch.setattr(status_cli, "Connection", FakeConnection)
    inv = local()
    inv = SimpleNamespace(**{k: getattr(inv, k) for k in ("hosts", "known_hosts", "roles_for", "hostvars")})
    FakeConnection.execs = 0
    got = [status_cli.probe(inv, inv.hosts[h], status.DEFAULTS) for h in ("vault", "db1")]
    assert FakeConnection.execs == 2
    assert got[0].doc is not None and got[0].error is None
    assert got[1].doc is None and got[1].attention == ["unreachable"] and "timed out" in got[1].error
    text = status.table(got)
    assert text.splitlines()[0].split()[:3] == ["host", "up", "load"]
    assert "! db1: unreachable" in text

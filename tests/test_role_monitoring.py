"""Roles monitoring and monitoring_agent, pure: what the local inventory generates (targets,
probes, firewall), the files checked by the very tools the server runs (promtool, amtool,
the blackbox exporter's own check where installed), the rules' behaviour with `promtool test
rules`, and bad vars refused with the var's name before any server is touched.
The live half is tests/test_provision_local_monitoring.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import roles.harden
import roles.monitoring as mon
import roles.monitoring_agent as agent
from engine_helpers import REPO
from fake_pm2 import DAEMON_STARTED, jlist_output, pm2_host, proc
from provisioner.api import RoleContext, VarError
from provisioner.inventory import load_inventory_file
from provisioner.secret import Secret

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

SECRET = "smtp-Pw-not-shown-0001"


def local(**extra_vars):
    """inventories/local.yml with every vault reference resolved to a fake secret."""
    inv = load_inventory_file(REPO / "inventories" / "local.yml")
    inv = inv.resolve({name: Secret(f"{name}-0123456789abcdef") for name in inv.vault_refs()})
    for k, v in extra_vars.items():
        inv.groups["monitoring"].vars[k] = v
    return inv


def ctx(inv, host):
    return RoleContext(inv.hosts[host], inv, {"virt": "none", "version_id": "12"}, False)


def built(role, inv, host):
    return {r.id: r for r in role.resources(inv.hostvars(host), ctx(inv, host))}


def content(resources, path):
    for r in resources.values():
        for member in getattr(r, "members", None) or [r]:
            if getattr(member, "path", None) == path:
                return member.content.text
    raise KeyError(path)


def test_targets_come_from_the_inventory():
    inv = local()
    c = mon.check(inv.hostvars("mon1"), ctx(inv, "mon1"))
    jobs = {j["job_name"]: j for j in mon.scrape_configs(c, inv)}
    node = {sc["labels"]["instance"]: sc["targets"][0] for sc in jobs["node"]["static_configs"]}
    assert node == {"web1": "10.77.0.11:9100", "web2": "10.77.0.12:9100", "db1": "10.77.0.13:9100",
                    "vault": "10.77.0.14:9100", "lb1": "10.77.0.15:9100", "mon1": "10.77.0.16:9100"}
    assert [sc["labels"]["instance"] for sc in jobs["postgres"]["static_configs"]] == ["db1"]
    assert [sc["labels"]["instance"] for sc in jobs["redis"]["static_configs"]] == ["db1"]
    assert [sc["labels"]["instance"] for sc in jobs["nginx"]["static_configs"]] == ["lb1"]
    probe = jobs["blackbox"]["static_configs"]
    assert probe == [{"targets": ["https://10.77.0.15/health"],
                      "labels": {"instance": "app@lb1", "site": "app", "host": "lb1",
                                 "module": "https_app"}}]
    box = yaml.safe_load(mon.blackbox_yml(c, inv))["modules"]["https_app"]["http"]
    assert box["headers"] == {"Host": "app.test"} and box["tls_config"]["server_name"] == "app.test"


def test_harden_opens_the_exporters_to_the_monitoring_server_only(tmp_path):
    inv = local()
    # harden insists on the inventory key's public half once the testbed has made the key
    key = inv.hosts["db1"].key
    if not key.exists():
        key = tmp_path / "k"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], check=True, capture_output=True,
                         text=True).stdout.strip()
    keys = {"harden_deploy_inventory_key": False, "harden_deploy_keys": [pub]}

    def monitoring_rules(host):
        v = dict(inv.hostvars(host), **keys)
        return [(r.port, r.proto, r.src) for r in roles.harden.check(v, ctx(inv, host)).rules
                if r.comment == "monitoring"]
    assert monitoring_rules("db1") == [("9100:9187", "tcp", "10.77.0.16")]
    # mon1 scrapes itself over loopback: no rule for its own address
    assert monitoring_rules("mon1") == []


def test_agent_exporters_follow_the_host_roles_and_listen_on_the_private_address():
    inv = local()
    db = built(agent, inv, "db1")
    env = content(db, "/etc/default/prometheus-redis-exporter")
    assert "--web.listen-address=10.77.0.13:9121" in env and "redis_password-0123456789abcdef" in env
    redis = db["template /etc/default/prometheus-redis-exporter"]
    assert redis.mode == "0600" and "redis_password-0123456789abcdef" not in redis.content.display
    node = content(db, "/etc/default/prometheus-node-exporter")
    assert "--web.listen-address=10.77.0.13:9100" in node and "--collector.systemd" in node
    web = built(agent, inv, "web1")
    assert not any("postgres" in i or "nginx" in i for i in web)
    cfg = content(web, agent.METRICS_CONFIG)
    assert '"apps": [\n   "sample"\n  ]' in cfg and '"unit": "pm2-app.service"' in cfg
    lb = built(agent, inv, "lb1")
    assert "listen 127.0.0.1:8079;" in content(lb, agent.STUB_STATUS_CONF)


def test_a_public_listen_address_is_refused():
    inv = local()
    v = dict(inv.hostvars("web1"), monitoring_agent_listen_address="8.8.8.8")
    with pytest.raises(ValueError, match="monitoring_agent_listen_address.*public"):
        agent.check(v, ctx(inv, "web1"))


@pytest.mark.parametrize("var,value", [
    ("monitoring_alert_for", "15 seconds"), ("monitoring_disk_percent", 100),
    ("monitoring_retention_size", "5G"), ("monitoring_email_to", ["not-an-address"]),
    ("monitoring_smtp_host", "mail.example.com"), ("monitoring_webhook_urls", ["ftp://x"]),
    ("monitoring_smtp_password", "plain-text"), ("monitoring_extra_rules", [{"alert": "X"}]),
    ("monitoring_extra_rules", [{"alert": "X", "expr": "up\n== 0"}]),
])
def test_bad_vars_are_refused_naming_the_var(var, value):
    inv = local()
    v = dict(inv.hostvars("mon1"), **{var: value})
    with pytest.raises(VarError, match=var):
        mon.check(v, ctx(inv, "mon1"))


def test_the_smtp_password_is_in_the_file_and_never_in_its_diff():
    inv = local(monitoring_smtp_username="alerts", monitoring_smtp_password=Secret(SECRET))
    res = built(mon, inv, "mon1")
    f = res[f"template {mon.ALERTMANAGER}"]
    assert SECRET in f.content.text
    assert SECRET not in f.content.display and "smtp_auth_password: '***'" in f.content.display


need_promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian's "
                                   "prometheus package, .ci/setup) is not installed")


def _write_config(tmp_path: Path, inv) -> Path:
    res = built(mon, inv, "mon1")
    (tmp_path / "rules").mkdir()
    (tmp_path / "prometheus.yml").write_text(content(res, mon.CONFIG))
    (tmp_path / "rules" / "provisioner.yml").write_text(content(res, mon.RULES))
    (tmp_path / "alertmanager.yml").write_text(
        res[f"template {mon.ALERTMANAGER}"].content.text)
    return tmp_path


@need_promtool
def test_promtool_and_amtool_accept_what_the_role_writes(tmp_path):
    d = _write_config(tmp_path, local())
    p = subprocess.run(["promtool", "check", "config", str(d / "prometheus.yml")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS: 21 rules found" in p.stdout + p.stderr
    if shutil.which("amtool"):
        p = subprocess.run(["amtool", "check-config", str(d / "alertmanager.yml")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


@need_promtool
def test_a_bad_extra_rule_passes_the_var_check_and_fails_promtool(tmp_path):
    """What the file group relies on to roll back and keep Prometheus on its old rules."""
    inv = local(monitoring_extra_rules=[{"alert": "Broken", "expr": "rate(up[5m]"}])
    d = _write_config(tmp_path, inv)
    p = subprocess.run(["promtool", "check", "config", str(d / "prometheus.yml")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Broken" in p.stdout + p.stderr + "Broken"


RULE_TESTS = """
rule_files: [rules/provisioner.yml]
evaluation_interval: 5s
tests:
  - interval: 5s
    input_series:
      - series: 'pm2_app_online_instances{instance="web2",app="sample"}'
        values: '2 2 0 0 0 0 0 0 0'
      - series: 'node_filesystem_avail_bytes{instance="web1",mountpoint="/mnt/t",fstype="tmpfs"}'
        values: '1 1 1 1 1 1 1 1 1'
      - series: 'node_filesystem_size_bytes{instance="web1",mountpoint="/mnt/t",fstype="tmpfs"}'
        values: '10 10 10 10 10 10 10 10 10'
      - series: 'probe_ssl_earliest_cert_expiry{instance="app@lb1",site="app",host="lb1"}'
        values: '432000 432000 432000 432000 432000 432000 432000 432000 432000'
      - series: 'provisioner_backup_last_success_timestamp_seconds{instance="db1",backup="pg"}'
        values: '0 0 0 0 0 0 0 0 0'
      - series: 'provisioner_backup_max_age_seconds{instance="db1",backup="pg"}'
        values: '10 10 10 10 10 10 10 10 10'
    alert_rule_test:
      - eval_time: 40s
        alertname: AppDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: web2, app: sample}
            exp_annotations:
              summary: app sample on web2 has no instance online
              runbook: "`invoke logs --app <app>`; as the app user `pm2 status`, `pm2 logs`; `invoke rollback` if a deploy broke it"
      - eval_time: 5s
        alertname: AppDown
        exp_alerts: []
      - eval_time: 40s
        alertname: DiskAlmostFull
        exp_alerts:
          - exp_labels: {severity: critical, instance: web1, mountpoint: /mnt/t, fstype: tmpfs}
            exp_annotations:
              summary: /mnt/t on web1 is 90% full
              runbook: "`du -xh --max-depth=2 <mountpoint> | sort -h | tail`; old releases, logs, backups"
      - eval_time: 40s
        alertname: BackupStale
        exp_alerts:
          - exp_labels: {severity: critical, instance: db1, backup: pg}
            exp_annotations:
              summary: backup pg on db1 is older than its schedule allows
              runbook: "the backup job's journal (`systemctl list-timers`, `journalctl -u <job>`); run `invoke backup` once fixed"
"""


@need_promtool
def test_the_rules_fire_on_the_figures_they_watch(tmp_path):
    d = _write_config(tmp_path, local())
    (d / "rules.test.yml").write_text(RULE_TESTS)
    p = subprocess.run(["promtool", "test", "rules", "rules.test.yml"], cwd=d,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def host_metrics(cfg: Path, path: str | None = None) -> dict:
    """The host metrics script as the role installs it, run on this machine (PATH: `path`
    first): what it wrote for the textfile collector, {series: value}."""
    tool = cfg.parent / "host_metrics.py"
    tool.write_text(agent.METRICS_SOURCE)
    env = dict(os.environ, PATH=f"{path}:{os.environ['PATH']}") if path else None
    subprocess.run([sys.executable, str(tool), str(cfg)], check=True, env=env)
    out = json.loads(cfg.read_text())["out"]
    return dict(line.rsplit(" ", 1) for line in Path(out).read_text().splitlines())


def test_host_metrics_counts_each_nginx_line_once_and_follows_rotation(tmp_path):
    """The access log's new lines only, a rotated log read from its start."""
    log = tmp_path / "access.log"
    line = ('10.0.0.1 - - [01/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" {status} 12 "-" "x" '
            'host=a request_time={t} upstream=1 upstream_status={status} upstream_time={t}\n')
    log.write_text(line.format(status=200, t="0.004") + line.format(status=502, t="1.5"))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "out.prom"), "state": str(tmp_path / "st"),
                               "pm2": None, "fail2ban": False, "nginx_log": str(log)}))
    got = host_metrics(cfg)
    assert got['nginx_http_responses_total{code="5xx"}'] == "1"
    assert got['nginx_http_request_duration_seconds_bucket{le="1"}'] == "1"
    assert got["nginx_http_request_duration_seconds_count"] == "2"
    assert host_metrics(cfg)["nginx_http_request_duration_seconds_count"] == "2"   # nothing new
    log.rename(tmp_path / "access.log.1")                                  # logrotate
    log.write_text(line.format(status=503, t="0.2"))
    got = host_metrics(cfg)
    assert got['nginx_http_responses_total{code="5xx"}'] == "2" and got[
        "nginx_http_request_duration_seconds_count"] == "3"
    assert got['provisioner_host_metrics_ok{part="nginx"}'] == "1"


@pytest.mark.parametrize("before", ["", DAEMON_STARTED], ids=["list-alone", "after-daemon-start"])
def test_host_metrics_reports_pm2_apps_and_not_pm2_s_own_modules(tmp_path, before):
    """pm2-logrotate is in `pm2 jlist` beside the apps, marked as a module: as an app it made
    AppDown page when it stopped, and AppRestartLoop when it restarted. pm2's "[PM2] ..." lines
    ahead of the list (it started its daemon) once hid every app: all were down."""
    procs = [proc("sample", 0), proc("sample", 1, "stopped"),
             proc("pm2-logrotate", 2, "stopped", module=True)]
    bin_dir = pm2_host(tmp_path, jlist_output(procs, before))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "out.prom"), "state": str(tmp_path / "st"),
                               "pm2": {"user": "app", "home": "/home/app", "unit": "pm2-app.service",
                                       "apps": ["sample"]},
                               "fail2ban": False, "nginx_log": None}))
    got = host_metrics(cfg, bin_dir)
    assert got['provisioner_host_metrics_ok{part="pm2"}'] == "1"
    assert got["pm2_daemon_up"] == "1"
    assert got['pm2_app_online_instances{app="sample"}'] == "1"
    assert got['pm2_up{app="sample",pm2_instance="1"}'] == "0"
    assert got['pm2_restarts_total{app="sample",pm2_instance="1"}'] == "1"
    assert [s for s in got if "pm2-logrotate" in s] == []


# --- handlers (found live: alertmanager and the blackbox exporter dead after the first run) ------

def test_a_unit_s_reload_runs_before_its_restart_and_both_check_it_stayed_up():
    """A run that changed a unit's /etc/default file and its config notifies both handlers; the
    agent runs them in the order defined. A reload after the restart sent SIGHUP to a process
    that did not handle it yet: it died (systemd: a clean exit, so Restart=on-failure left it)."""
    inv = local()
    hs = mon.handlers(inv.hostvars("mon1"), ctx(inv, "mon1"))
    names = list(hs)
    for unit in mon.PACKAGES:
        assert names.index(f"reload {unit}") < names.index(f"restart {unit}")
        for action in ("reload", "restart"):
            steps = hs[f"{action} {unit}"]
            assert steps[-2]["run"] == ["systemctl", action, "--", f"{unit}.service"]
            assert steps[-1]["run"][:2] == ["sh", "-c"] and steps[-1]["run"][4:] == [
                f"{unit}.service", str(mon.STAY_UP), action]
    for steps in agent.handlers(inv.hostvars("db1"), ctx(inv, "db1")).values():
        if steps[-1]["run"][:2] == ["sh", "-c"]:
            assert steps[-2]["run"][1] == "restart"


def _stay_up(tmp_path, states: list[str], seconds: int):
    """The stay-up step's script with stand-in systemctl/journalctl: systemctl answers
    is-active with the next of `states`."""
    from provisioner.ops import systemd
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (bin_ / "systemctl").write_text(
        "#!/bin/sh\nf=%s\ns=$(head -1 $f); sed -i 1d $f; [ \"$2\" = --quiet ] || echo \"$s\"\n"
        "[ \"$s\" = active ]\n" % (tmp_path / "states"))
    (bin_ / "journalctl").write_text("#!/bin/sh\necho 'level=error msg=\"listen: bind failed\"'\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    step = systemd.stays_up("prometheus-alertmanager", seconds, "restart")
    return subprocess.run(step["run"], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_}:/usr/bin:/bin"})


def test_the_stay_up_step_passes_a_unit_that_stays_active(tmp_path):
    assert _stay_up(tmp_path, ["active", "active"], 2).returncode == 0


def test_the_stay_up_step_fails_a_unit_that_died_and_shows_its_journal(tmp_path):
    r = _stay_up(tmp_path, ["active", "inactive", "inactive"], 2)
    assert r.returncode == 1
    assert "prometheus-alertmanager.service did not stay up (inactive) 2 s after its restart" in r.stderr
    assert "bind failed" in r.stderr


def test_the_stay_up_step_fails_a_crash_loop(tmp_path):
    """Restart=on-failure between two crashes: `activating` (auto-restart) is not up."""
    r = _stay_up(tmp_path, ["activating", "activating"], 2)
    assert r.returncode == 1 and "(activating)" in r.stderr


def test_the_node_exporter_watches_volumes_under_mnt_and_media():
    """Debian's default --collector.filesystem.mount-points-exclude hides /mnt and /media."""
    import re
    inv = local()
    text = content(built(agent, inv, "web1"), "/etc/default/prometheus-node-exporter")
    [regex] = re.findall(r"--collector\.filesystem\.mount-points-exclude=(\S+?)\"?\s", text + " ")
    assert regex == agent.MOUNT_POINTS_EXCLUDE
    for kept in ("/", "/mnt/volume_fra1_01", "/media/backup", "/srv", "/var/lib/postgresql"):
        assert not re.search(regex, kept), kept
    for left in ("/run", "/run/user/0", "/dev/shm", "/proc", "/sys/fs/cgroup",
                 "/var/lib/docker/overlay2/x"):
        assert re.search(regex, left), left
    assert "\\" not in regex and not re.search(r"\$[A-Za-z_{]", regex)

"""Role `monitoring`: the monitoring server. Prometheus, Alertmanager and the blackbox exporter
from Debian's packages, configured from the inventory.

- Scrape targets are generated, never listed by hand: every host with role monitoring_agent
  (its node exporter, and the exporters of its roles: provisioner/monitoring.py), this
  server's own Prometheus and Alertmanager, and a blackbox probe of `monitoring_probe_path`
  over HTTPS on every site (role nginx's `nginx_sites`) of every nginx host, by address with
  the site's name for Host and SNI: each load balancer is checked, with its certificate's
  expiry. Every series carries `instance=<inventory host name>`.
- Alert rules (rules.py) with a runbook line each, plus `monitoring_extra_rules`. The config
  and the rules are one file group checked by `promtool check config` (which checks the
  rules it loads): a bad rule is rolled back and Prometheus keeps running on the old ones.
  The rules live in /etc/prometheus/rules/provisioner.yml, named one by one: no glob that
  would also load `promtool test rules` files.
- Alertmanager mails (SMTP from the vars, the password from the vault) and POSTs to webhooks,
  resolved notifications included; `amtool check-config` validates its file first. Gossip
  is off (a single instance).
- Prometheus and Alertmanager listen on the private address only; the blackbox exporter on
  loopback. Retention time and size are vars.
"""
from __future__ import annotations

import re

import yaml

from provisioner.api import (EXPORTERS, agent_hosts, apt, exporters_of, file_group, files,
                             handler, is_secret, private_address, reject, systemd, templates)

from .rules import alert_rules

CONFIG = "/etc/prometheus/prometheus.yml"
RULES = "/etc/prometheus/rules/provisioner.yml"
ALERTMANAGER = "/etc/prometheus/alertmanager.yml"
BLACKBOX = "/etc/prometheus/blackbox.yml"
BLACKBOX_LISTEN = "127.0.0.1:9115"
PROMETHEUS_PORT, ALERTMANAGER_PORT = 9090, 9093
PACKAGES = ["prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"]
DURATION_RE = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+\Z")
SIZE_RE = re.compile(r"[0-9]+(B|KB|MB|GB|TB|PB)\Z")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PATH_RE = re.compile(r"/[A-Za-z0-9._~/?=&%-]*\Z")
HOSTPORT_RE = re.compile(r"[A-Za-z0-9.-]+:[0-9]{1,5}\Z")
EMAIL_RE = re.compile(r"[^@\s'\"<>]+@[A-Za-z0-9.-]+\Z")
URL_RE = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/?=&%-]*)?\Z")
RULE_KEYS = {"alert", "expr", "for", "severity", "summary", "runbook"}
STAY_UP = 3              # seconds a (re)started daemon must stay active for its handler to pass
HEADER = "# Managed by provisioner (role monitoring): edits here are overwritten.\n"


def _duration(var: str, value) -> str:
    if not isinstance(value, str) or not DURATION_RE.match(value):
        reject(var, f"{value!r} is not a Prometheus duration", "write e.g. 30s, 5m, 4h or 15d")
    return value


def _number(var: str, value, low, high, example: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        reject(var, f"{value!r} is not a number from {low} to {high}", f"write e.g. {example}")
    return value


def _line(var: str, value, example: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(ord(c) < 32 for c in value):
        reject(var, f"{value!r} is not one line of text", f"write e.g. {example}")
    return value


def _extra_rules(rules) -> list[dict]:
    if not isinstance(rules, list):
        reject("monitoring_extra_rules", f"{rules!r} is not a list", "write a list of rules")
    out = []
    for i, r in enumerate(rules):
        at = f"monitoring_extra_rules[{i}]"
        if not isinstance(r, dict) or not {"alert", "expr"} <= set(r) or set(r) - RULE_KEYS:
            reject(at, f"{r!r} is not a rule", "write {alert: QueueLong, expr: 'queue_length > 100', "
                   f"for: 5m, severity: warning, summary: ..., runbook: ...}} (keys: {', '.join(sorted(RULE_KEYS))})")
        if not isinstance(r["alert"], str) or not NAME_RE.match(r["alert"]):
            reject(f"{at}.alert", f"{r['alert']!r} is not an alert name", "write e.g. QueueLong")
        rule = {"alert": r["alert"], "expr": _line(f"{at}.expr", r["expr"], "queue_length > 100")}
        if "for" in r:
            rule["for"] = _duration(f"{at}.for", r["for"])
        severity = r.get("severity", "warning")
        if not isinstance(severity, str) or not NAME_RE.match(severity):
            reject(f"{at}.severity", f"{severity!r} is not a word", "write critical or warning")
        rule["labels"] = {"severity": severity}
        rule["annotations"] = {k: _line(f"{at}.{k}", r.get(k, "-"), "what to check first")
                               for k in ("summary", "runbook")}
        out.append(rule)
    return out


def _smtp(v: dict) -> dict | None:
    to = v["monitoring_email_to"]
    if not isinstance(to, list) or not all(isinstance(a, str) and EMAIL_RE.match(a) for a in to):
        reject("monitoring_email_to", f"{to!r} is not a list of mail addresses",
               "write e.g. [ops@example.com]")
    if not to:
        return None
    host = v["monitoring_smtp_host"]
    if not isinstance(host, str) or not HOSTPORT_RE.match(host):
        reject("monitoring_smtp_host", f"{host!r} is not host:port",
               "write the mail server as e.g. smtp.example.com:587")
    sender = v["monitoring_email_from"]
    if not isinstance(sender, str) or not EMAIL_RE.match(sender):
        reject("monitoring_email_from", f"{sender!r} is not a mail address",
               "write e.g. alerts@example.com")
    user, password = v["monitoring_smtp_username"], v["monitoring_smtp_password"]
    if user and not (isinstance(user, str) and re.fullmatch(r"[^\s'\"\\]{1,200}", user)):
        reject("monitoring_smtp_username", "is not a login without spaces or quotes",
               "write the SMTP login")
    if user and not is_secret(password):
        reject("monitoring_smtp_password", "an SMTP login needs its password from the vault",
               "write `monitoring_smtp_password: !vault NAME`")
    if password is not None and not is_secret(password):
        reject("monitoring_smtp_password", "must come from the vault, never plain text",
               "write `monitoring_smtp_password: !vault NAME`")
    if is_secret(password) and not re.fullmatch(r"[^\x00-\x1f'\\]{1,512}", password.reveal()):
        reject("monitoring_smtp_password", "the vault value holds a quote, backslash or "
               "control character", "store a password without those")
    return {"host": host, "from": sender, "to": to, "username": user or "",
            "require_tls": bool(v["monitoring_smtp_require_tls"])}


def _sites(inventory) -> list[dict]:
    """(host, site, server name) for every site of every nginx host the inventory has."""
    out = []
    for h in inventory.hosts.values():
        if "nginx" not in inventory.roles_for(h.name):
            continue
        for s in inventory.hostvars(h.name).get("nginx_sites") or []:
            if isinstance(s, dict) and s.get("server_names"):
                out.append({"host": h.name, "address": h.address, "site": s["name"],
                            "server_name": s["server_names"][0]})
    return out


def check(v: dict, ctx) -> dict:
    # a public address is refused (ValueError naming the var: reported as bad input)
    ip = private_address("monitoring_listen_address", v["monitoring_listen_address"],
                         ctx.host, "Prometheus")
    for var in ("monitoring_retention_size",):
        if not isinstance(v[var], str) or not SIZE_RE.match(v[var]):
            reject(var, f"{v[var]!r} is not a size", "write e.g. 512MB or 5GB")
    path = v["monitoring_probe_path"]
    if not isinstance(path, str) or not PATH_RE.match(path):
        reject("monitoring_probe_path", f"{path!r} is not a URL path", "write e.g. /health")
    hooks = v["monitoring_webhook_urls"]
    if not isinstance(hooks, list) or not all(isinstance(u, str) and URL_RE.match(u) for u in hooks):
        reject("monitoring_webhook_urls", f"{hooks!r} is not a list of http(s) URLs",
               "write e.g. [https://hooks.example.com/alerts]")
    thresholds = {
        "for": _duration("monitoring_alert_for", v["monitoring_alert_for"]),
        "disk_percent": _number("monitoring_disk_percent", v["monitoring_disk_percent"], 1, 99, "85"),
        "memory_percent": _number("monitoring_memory_percent", v["monitoring_memory_percent"], 1, 99, "90"),
        "cert_days": _number("monitoring_cert_days", v["monitoring_cert_days"], 1, 365, "14"),
        "error_ratio": _number("monitoring_5xx_percent", v["monitoring_5xx_percent"], 0, 100, "5") / 100,
        "p99_seconds": _number("monitoring_p99_seconds", v["monitoring_p99_seconds"], 0.001, 600, "1.0"),
        "drill_max_days": _number("monitoring_drill_max_days", v["monitoring_drill_max_days"], 1, 365, "8"),
    }
    return {
        "address": str(ip), "thresholds": thresholds,
        "scrape_interval": _duration("monitoring_scrape_interval", v["monitoring_scrape_interval"]),
        "retention_time": _duration("monitoring_retention_time", v["monitoring_retention_time"]),
        "retention_size": v["monitoring_retention_size"],
        "extra_rules": _extra_rules(v["monitoring_extra_rules"]),
        "smtp": _smtp(v), "webhooks": hooks, "probe_path": path,
        "tls_verify": bool(v["monitoring_probe_tls_verify"]),
        "group_wait": _duration("monitoring_group_wait", v["monitoring_group_wait"]),
        "group_interval": _duration("monitoring_group_interval", v["monitoring_group_interval"]),
        "repeat_interval": _duration("monitoring_repeat_interval", v["monitoring_repeat_interval"]),
    }


def scrape_configs(c: dict, inventory) -> list[dict]:
    """One job per exporter kind, targets from the inventory; instance = the host's name."""
    me = c["address"]
    jobs = [{"job_name": "prometheus", "static_configs": [
                {"targets": [f"{me}:{PROMETHEUS_PORT}"], "labels": {"instance": "prometheus"}}]},
            {"job_name": "alertmanager", "static_configs": [
                {"targets": [f"{me}:{ALERTMANAGER_PORT}"], "labels": {"instance": "alertmanager"}}]}]
    for exporter in EXPORTERS:
        targets = [{"targets": [f"{h.address}:{port}"], "labels": {"instance": h.name}}
                   for h in agent_hosts(inventory)
                   for name, port in exporters_of(inventory, h.name).items() if name == exporter]
        if targets:
            jobs.append({"job_name": exporter, "static_configs": targets})
    sites = _sites(inventory)
    if sites:
        jobs.append({
            "job_name": "blackbox", "metrics_path": "/probe",
            "static_configs": [{"targets": [f"https://{s['address']}{c['probe_path']}"],
                                "labels": {"instance": f"{s['site']}@{s['host']}", "site": s["site"],
                                           "host": s["host"], "module": f"https_{s['site']}"}}
                               for s in sites],
            "relabel_configs": [
                {"source_labels": ["__address__"], "target_label": "__param_target"},
                {"source_labels": ["module"], "target_label": "__param_module"},
                {"target_label": "__address__", "replacement": BLACKBOX_LISTEN}]})
    return jobs


def prometheus_yml(c: dict, inventory) -> str:
    doc = {"global": {"scrape_interval": c["scrape_interval"],
                      "evaluation_interval": c["scrape_interval"]},
           "alerting": {"alertmanagers": [{"static_configs": [
               {"targets": [f"{c['address']}:{ALERTMANAGER_PORT}"]}]}]},
           "rule_files": ["rules/provisioner.yml"],        # relative to this file; no glob
           "scrape_configs": scrape_configs(c, inventory)}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=1000)


def rules_yml(c: dict) -> str:
    doc = {"groups": [{"name": "provisioner", "rules": alert_rules(c["thresholds"])}]}
    if c["extra_rules"]:
        doc["groups"].append({"name": "extra", "rules": c["extra_rules"]})
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=1000)


def blackbox_yml(c: dict, inventory) -> str:
    modules = {f"https_{s['site']}": {"prober": "http", "timeout": "5s", "http": {
        "method": "GET", "valid_status_codes": [200], "fail_if_not_ssl": True,
        "preferred_ip_protocol": "ip4", "headers": {"Host": s["server_name"]},
        "tls_config": {"server_name": s["server_name"],
                       "insecure_skip_verify": not c["tls_verify"]}}}
        for s in _sites(inventory)}
    return HEADER + yaml.safe_dump({"modules": modules}, sort_keys=False, width=1000)


def resources(v, ctx):
    c = check(v, ctx)
    addr = c["address"]
    yield apt.packages(PACKAGES)
    yield files.file("/etc/default/prometheus", HEADER + (
        f'ARGS="--web.listen-address={addr}:{PROMETHEUS_PORT} '
        f'--storage.tsdb.retention.time={c["retention_time"]} '
        f'--storage.tsdb.retention.size={c["retention_size"]}"\n'), notify="restart prometheus")
    yield files.directory("/etc/prometheus/rules", mode="0755")
    yield file_group("prometheus config and rules", [
        files.file(CONFIG, prometheus_yml(c, ctx.inventory)),
        files.file(RULES, rules_yml(c)),
    ], check=["promtool", "check", "config", CONFIG], notify="reload prometheus")
    yield files.file("/etc/default/prometheus-alertmanager", HEADER + (
        f'ARGS="--web.listen-address={addr}:{ALERTMANAGER_PORT} --cluster.listen-address="\n'),
        notify="restart prometheus-alertmanager")
    yield templates.template(ALERTMANAGER, "monitoring/alertmanager.yml.j2", {
        "smtp": c["smtp"], "smtp_password": v["monitoring_smtp_password"],
        "webhooks": c["webhooks"], "group_wait": c["group_wait"],
        "group_interval": c["group_interval"], "repeat_interval": c["repeat_interval"]},
        mode="0640", owner="root", group="prometheus",
        validate=["amtool", "check-config", "{path}"], notify="reload prometheus-alertmanager")
    yield files.file("/etc/default/prometheus-blackbox-exporter", HEADER + (
        f'ARGS="--config.file={BLACKBOX} --web.listen-address={BLACKBOX_LISTEN}"\n'),
        notify="restart prometheus-blackbox-exporter")
    yield files.file(BLACKBOX, blackbox_yml(c, ctx.inventory),
                     validate=["prometheus-blackbox-exporter", "--config.check",
                               "--config.file={path}"],
                     notify="reload prometheus-blackbox-exporter")
    for unit in PACKAGES:
        yield systemd.service(unit, enabled=True, running=True)


def handlers(v, ctx):
    """Handlers run in the order defined: a unit's reload before its restart. The other way
    round, a run that changed both a unit's /etc/default file and its config sent SIGHUP to the
    process the restart had just forked, before it handles SIGHUP: it died, and with the
    packages' Restart=on-failure (SIGHUP is a clean exit to systemd) stayed dead. When both are
    notified, the agent skips the reload: the restart reads the configuration too. Each handler
    then fails the run unless the unit is still active STAY_UP seconds later (the checks of all
    the handlers that ran are watched together, after the last one)."""
    out = {}
    for unit in PACKAGES:
        out[f"reload {unit}"] = handler("reload", unit, stay_up=STAY_UP)
        out[f"restart {unit}"] = handler("restart", unit, stay_up=STAY_UP)
    return out

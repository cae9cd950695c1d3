"""`invoke status`: what each host says about itself (remote/status_probe.py, one exec per
host) and what needs attention, judged here (pure: testable without a server).

A host needs attention when it is unreachable, has a failed unit, a disk or memory above the
monitoring thresholds (role monitoring's vars, or their defaults), an app with fewer online
instances than pm2 runs (or none), a certificate inside the expiry window, a backup older
than its schedule allows, a last provision run that failed, or when Alertmanager has firing
alerts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import humanize
from provisioner.lock import AUDIT_LOG
from provisioner.monitoring import SERVER_ROLE, TEXTFILE_DIR
from provisioner.remote import with_helpers
from provisioner.remote.pm2 import pm2_app_procs, pm2_jlist, pm2_processes, pm2_unit

PROBE = with_helpers((Path(__file__).parent / "remote" / "status_probe.py").read_text(encoding="utf-8"),
                     pm2_processes, pm2_jlist, pm2_app_procs)
ALERTMANAGER_PORT = 9093
DEFAULTS = {"monitoring_disk_percent": 85, "monitoring_memory_percent": 90, "monitoring_cert_days": 14}


@dataclass
class HostStatus:
    name: str
    doc: dict | None = None            # the probe's answer; None when unreachable
    error: str | None = None
    attention: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"reachable": self.doc is not None, "error": self.error,
                "attention": self.attention, **(self.doc or {})}


def thresholds(inv) -> dict:
    """The alert thresholds of the env's monitoring server (the first), else the defaults."""
    for h in inv.hosts.values():
        if SERVER_ROLE in inv.roles_for(h.name):
            v = inv.hostvars(h.name)
            return {k: v.get(k, d) for k, d in DEFAULTS.items()}
    return dict(DEFAULTS)


def probe_config(inv, host) -> dict:
    """What the probe on `host` looks at, from the inventory."""
    roles, v = inv.roles_for(host.name), inv.hostvars(host.name)
    cfg = {"apps": [], "pm2": None, "textfile": TEXTFILE_DIR, "alertmanager": None,
           "audit_log": AUDIT_LOG}
    if "pm2" in roles:
        cfg["apps"] = [a["name"] for a in v.get("pm2_apps") or [] if isinstance(a, dict)]
        user = v.get("node_app_user", "app")
        cfg["pm2"] = {"user": user, "home": v.get("node_app_home", "/home/app"), "unit": pm2_unit(user)}
    if SERVER_ROLE in roles:
        address = v.get("monitoring_listen_address") or host.address
        cfg["alertmanager"] = f"http://{address}:{ALERTMANAGER_PORT}"
    return cfg


def probe_argv(cfg: dict) -> list[str]:
    return ["python3", "-", json.dumps(cfg, separators=(",", ":"))]


def judge(doc: dict, t: dict) -> list[str]:
    """What needs attention on one host, from its probe answer."""
    out = [f"unit {u} failed" for u in doc.get("failed_units") or []]
    for d in doc.get("disks") or []:
        if d["used_percent"] > t["monitoring_disk_percent"]:
            out.append(f"disk {d['mount']} {d['used_percent']:.0f}% full")
    mem = (doc.get("memory") or {}).get("used_percent")
    if mem is not None and mem > t["monitoring_memory_percent"]:
        out.append(f"memory {mem:.0f}% used")
    for a in doc.get("apps") or []:
        if not a["online"] or a["online"] < a["instances"]:
            out.append(f"app {a['name']}: {a['online']} of {a['instances']} instances online")
    for c in doc.get("certificates") or []:
        if c["days_left"] is None or c["days_left"] < t["monitoring_cert_days"]:
            out.append(f"certificate {c['site']}: {c['days_left']} days left")
    for b in doc.get("backups") or []:
        if b["max_age_seconds"] is not None and b["age_seconds"] > b["max_age_seconds"]:
            out.append(f"backup {b['name']} is {b['age_seconds'] // 3600} h old")
    run = doc.get("last_run")
    if run and run.get("result") == "failed":
        out.append(f"last {run.get('task', 'run')} failed ({run.get('ts')})")
    alerts = doc.get("alerts")
    if isinstance(alerts, dict):
        out.append(f"Alertmanager unreadable: {alerts.get('error')}")
    elif alerts:
        out += [f"alert {a['name']} firing on {a['instance']}" for a in alerts]
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def row(s: HostStatus) -> list[str]:
    """One table row: host, up, load, mem, disk, failed, apps, release, cert, backup, last run, alerts."""
    d = s.doc
    if d is None:
        return [s.name, "NO"] + ["-"] * 10
    disk = max((x["used_percent"] for x in d["disks"]), default=None)
    apps = ", ".join(f"{a['name']} {a['online']}/{a['instances']} r{a['restarts']}" for a in d["apps"]) or "-"
    releases = ", ".join(a["release"] for a in d["apps"] if a["release"]) or "-"
    certs = min((c["days_left"] for c in d["certificates"] if c["days_left"] is not None), default=None)
    backup = max((b["age_seconds"] for b in d["backups"]), default=None)
    run = d.get("last_run") or {}
    alerts = d.get("alerts")
    return [s.name, _age(d["uptime_seconds"]), f"{d['load'][0]:.2f}",
            f"{d['memory']['used_percent']:.0f}%", "-" if disk is None else f"{disk:.0f}%",
            str(len(d["failed_units"])), apps, releases, "-" if certs is None else f"{certs:.0f}d",
            _age(backup), f"{run.get('ts', '-')} {run.get('result', '')}".strip() if run else "-",
            "-" if alerts is None else ("?" if isinstance(alerts, dict) else str(len(alerts)))]


HEADERS = ["host", "up", "load", "mem", "disk", "failed", "apps", "release", "cert", "backup",
           "last run", "alerts"]


def table(statuses: list[HostStatus]) -> str:
    lines = humanize.columns([HEADERS] + [row(s) for s in statuses])
    for s in statuses:
        lines += [f"! {s.name}: {a}" for a in s.attention]
    return "\n".join(lines)

"""`invoke logs`: journald and pm2 logs of many hosts at once (remote/log_reader.py, one exec
per host), merged by time, each line prefixed with its host, with every secret the env's vault
holds redacted and terminal escape codes from the servers stripped. Pure helpers here; the
task is provisioner/cli/logs.py.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from provisioner import secret
from provisioner.errors import InputError, Problem
from provisioner.output import _ESCAPES
from provisioner.remote.pm2 import pm2_unit

READER = (Path(__file__).parent / "remote" / "log_reader.py").read_text(encoding="utf-8")
SINCE_RE = re.compile(r"([1-9][0-9]{0,5})([smhd])\Z")
UNIT_RE = re.compile(r"[A-Za-z0-9:_.@-]{1,200}\Z")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _bad(flag: str, problem: str, fix: str) -> InputError:
    return InputError([Problem("command line", None, flag, problem, fix)])


def since_seconds(since: str) -> int:
    m = SINCE_RE.match(since or "")
    if not m:
        raise _bad("--since", f"{since!r} is not a duration", "write e.g. 30m, 1h or 2d")
    return int(m.group(1)) * SECONDS[m.group(2)]


def reader_config(inv, host, *, since: str, app: str | None, unit: str | None,
                  grep: str | None, follow: bool) -> dict | None:
    """What the reader on `host` reads; None when the host has nothing of it (the app is not
    among its pm2 apps)."""
    if app and unit:
        raise _bad("--app", "--app and --unit both given", "choose one")
    if unit is not None and not UNIT_RE.match(unit):
        raise _bad("--unit", f"{unit!r} is not a systemd unit name", "write e.g. nginx or ssh.service")
    if grep is not None:
        try:
            re.compile(grep)
        except re.error as e:
            raise _bad("--grep", f"{grep!r} is not a regular expression: {e}",
                       "write a Python regular expression, e.g. 'error|fail'") from None
    cfg = {"since": since_seconds(since), "units": [unit] if unit else [], "app": None,
           "grep": grep, "follow": bool(follow)}
    if app:
        v = inv.hostvars(host.name)
        names = [a.get("name") for a in v.get("pm2_apps") or [] if isinstance(a, dict)]
        if "pm2" not in inv.roles_for(host.name) or app not in names:
            return None
        user = v.get("node_app_user", "app")
        cfg["app"] = {"name": app, "home": v.get("node_app_home", f"/home/{user}"),
                      "unit": pm2_unit(user)}
    return cfg


def reader_argv(cfg: dict) -> list[str]:
    return ["python3", "-", json.dumps(cfg, separators=(",", ":"))]


def clean(text: str) -> str:
    """A server's text made safe to print: escape codes and control characters out, then every
    known secret as ***."""
    return secret.REDACTOR.redact(CONTROL.sub("", _ESCAPES.sub("", text)))


def parse(line: str) -> dict | None:
    """One reader line -> {ts, src, msg}; None for keepalives and anything else."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "ts" in doc else None


def format_line(host: str, entry: dict, width: int = 0) -> str:
    ts = datetime.fromtimestamp(entry["ts"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{host.ljust(width)} {ts[:23]}Z {clean(str(entry['src']))}: {clean(str(entry['msg']))}"


def merged(per_host: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """Every host's entries in one list ordered by time (a host's own order kept on ties)."""
    out = [(host, e) for host, entries in per_host.items() for e in entries]
    return sorted(out, key=lambda he: he[1]["ts"])

"""systemd services, unit files and handler steps.

    systemd.service(name, enabled=None, running=None)
    systemd.unit_file(name, content, mode="0644", notify=())   -> files.File (+ daemon-reload)
    systemd.handler(action, unit, validate=None, stay_up=0)     -> list of steps

enabled/running None = not managed. "nginx" means "nginx.service". A unit the facts do not
know yet (LoadState not-found: perhaps a package of the same role installs it) is planned
anyway; systemctl reports the error at apply time if it still does not exist. A masked unit
that must be enabled or running is unmasked first. Static/indirect/generated units have no
enablement to manage: enabled=True is satisfied by them. The agent folds the daemon-reloads of
a role's unit files and enables together (remote/agent.py Reloads).

Handlers are plain steps the role names, e.g.
    handlers = {"reload nginx": systemd.handler("reload", "nginx", validate=["nginx", "-t"])}
They run once at the end of the role when notified (see provisioner/remote/agent.py apply).
"""
from __future__ import annotations

import re
from typing import Sequence

from dataclasses import dataclass

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import _base as b
from provisioner.ops import files

UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]+\Z")
ACTIVE = ("active", "reloading", "activating")
NO_ENABLEMENT = ("static", "indirect", "generated", "transient", "alias")
ACTIONS = ("start", "stop", "restart", "reload", "try-restart", "reload-or-restart",
           "try-reload-or-restart")


def unit_name(name: str) -> str:
    if not isinstance(name, str) or not UNIT_RE.match(name) or name.startswith("-"):
        raise ValueError(f"bad unit name {name!r}")
    return name if "." in name else name + ".service"


def systemctl(*args: str) -> dict:
    return b.run(["systemctl", *args])


@dataclass(frozen=True)
class Service:
    unit: str
    enabled: bool | None = None
    running: bool | None = None

    @property
    def id(self) -> str:
        return f"service {self.unit}"

    def facts(self) -> dict:
        return {"services": [self.unit]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        s = facts.service(self.unit) or {}
        load, active, ufs = s.get("load"), s.get("active"), s.get("enabled")
        missing = load in (None, "not-found")
        note = " (unit not found yet)" if missing else ""
        out: list[Change | Noop] = []
        masked = load == "masked" or ufs in ("masked", "masked-runtime")
        if masked and (self.enabled or self.running):
            out.append(Change(self.id, "unmask", "masked", (systemctl("unmask", "--", self.unit),)))
        if self.enabled is True and (missing or masked or ufs not in ("enabled",) + NO_ENABLEMENT):
            out.append(Change(self.id, "enable", f"{ufs or 'unknown'}{note}",
                              (systemctl("enable", "--", self.unit),)))
        elif self.enabled is False and ufs in ("enabled", "enabled-runtime", "linked",
                                               "linked-runtime"):
            out.append(Change(self.id, "disable", ufs, (systemctl("disable", "--", self.unit),)))
        if self.running is True and active not in ACTIVE:
            out.append(Change(self.id, "start", f"{active or 'unknown'}"
                              f"{'/' + s['sub'] if s.get('sub') else ''}{note}",
                              (systemctl("start", "--", self.unit),)))
        elif self.running is False and active in ACTIVE:
            out.append(Change(self.id, "stop", active, (systemctl("stop", "--", self.unit),)))
        if out:
            return out
        parts = []
        if self.enabled is not None:
            parts.append(ufs or "unknown")
        if self.running is not None:
            parts.append(f"{active}/{s.get('sub')}" if active else "not found")
        return [Noop(self.id, "up to date: " + (", ".join(parts) or "not managed"))]

    def expect(self, facts: Facts) -> dict:
        new = {}
        if self.enabled is not None:
            new["enabled"] = "enabled" if self.enabled else "disabled"
        if self.running is not None:
            new["active"] = "active" if self.running else "inactive"
            new["sub"] = "running" if self.running else "dead"
        if self.enabled or self.running:
            new["load"] = "loaded"
        return {"services": {self.unit: new}} if new else {}


def service(name: str, *, enabled: bool | None = None, running: bool | None = None) -> Service:
    return Service(unit=unit_name(name), enabled=enabled, running=running)


def unit_file(name: str, content: str, *, mode: str | int = "0644",
              notify: Sequence[str] | str = ()) -> files.File:
    """/etc/systemd/system/<unit>, followed by `systemctl daemon-reload` when it changes."""
    unit = unit_name(name)
    return files.file(f"/etc/systemd/system/{unit}", content, mode=mode, owner="root",
                      group="root", notify=notify, after=[["systemctl", "daemon-reload"]])


# `systemctl start/restart` of a Type=simple unit succeeds as soon as the process is forked: a
# daemon that dies a moment later (a flag it refuses, an address it cannot bind, a SIGHUP that
# arrives before it handles SIGHUP, which systemd counts as a clean exit) would pass the run and
# be found dead by the next one. This step fails unless the unit is active at each of `seconds`
# checks, one a second, and shows the unit's last journal lines when it is not.
STAY_UP = """unit=$1 n=$2
i=0
while [ "$i" -lt "$n" ]; do
  sleep 1
  if ! systemctl is-active --quiet -- "$unit"; then
    echo "$unit did not stay up ($(systemctl is-active -- "$unit")) $((i + 1)) s after its $3:" >&2
    journalctl -u "$unit" -n 20 --no-pager -o cat >&2
    exit 1
  fi
  i=$((i + 1))
done
"""


def stays_up(unit: str, seconds: int, after: str = "start") -> dict:
    """A step failing unless `unit` is still active `seconds` seconds later (see STAY_UP)."""
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 1 <= seconds <= 60:
        raise ValueError(f"stay_up must be 1 to 60 seconds, not {seconds!r}")
    # settle: the agent runs a handler's check with the other handlers' ones, after them all;
    # its seconds let it pass a unit that has been up that long already (a handler not run)
    return {**b.run(["sh", "-c", STAY_UP, "stay-up", unit_name(unit), str(seconds), after]),
            "settle": seconds}


def handler(action: str, unit: str, validate: Sequence[str] | None = None,
            stay_up: int = 0) -> list[dict]:
    """Steps for a role handler: optionally validate (e.g. ["nginx", "-t"]), then act; with
    stay_up=N, then fail unless the unit is still active N seconds later (stays_up)."""
    if action not in ACTIONS:
        raise ValueError(f"handler action must be one of {ACTIONS}, not {action!r}")
    steps = [b.run(validate)] if validate else []
    steps.append(systemctl(action, "--", unit_name(unit)))
    if stay_up:
        steps.append(stays_up(unit, stay_up, action))
    return steps

"""The one module a role imports: what a role may use, and the contract it keeps.

A role is `roles/<name>/` (`defaults.yml` + `__init__.py`, importable as `roles.<name>`) with:

    def check(v, ctx) -> Any           PURE: judges the vars the type check cannot (paths,
                                       ranges, what must not hold a newline) and calls reject()
                                       on the first bad one. ctx: a VarContext (host and
                                       inventory, nothing from the server). Runs for every host
                                       in `invoke check` and before any connection; what it
                                       returns is the role's own (e.g. settings derived from v).
    def resources(v, ctx)              yields Resources, in order. ctx: a RoleContext (also the
                                       server's os facts and check mode). Call check(v, ctx)
                                       first if you need what it derives.
    def handlers(v, ctx) -> dict       optional: handler name -> steps (see `handler`).
    def guards(v, ctx) -> list         optional: Guards (a safety net after risky changes).

docs/roles.md is the guide; provisioner/ops/_base.py documents the step and drift helpers.
Nothing else from `provisioner` is a role's business: tests/test_role_api.py fails when a
role imports anything but this module.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from provisioner import colours
from provisioner.change import Change, Noop
from provisioner.connection import Connection, Unreachable
from provisioner.facts import Facts, FileFact, check_key
from provisioner.inventory import USER_RE, Host, Inventory
from provisioner.monitoring import (EXPORTERS, PORT_RANGE as EXPORTER_PORT_RANGE, TEXTFILE_DIR,
                                    agent_hosts, exporters_of, monitoring_sources)
from provisioner.ops import apt, commands, files, lines, links, sysctl, systemd, templates, ufw, users
from provisioner.ops.groups import group as file_group
from provisioner.ops._base import (PlanError, abs_path, directory as directory_step, file_fact,
                                   run as run_step, sha256, write as write_step)
from provisioner.remote import with_helpers
from provisioner.remote.pm2 import pm2_app_procs, pm2_jlist, pm2_processes, pm2_unit
from provisioner.remote.sql import sql_literal
from provisioner.secret import Secret
from provisioner.sshkeys import known_host_lines, ssh_keypair
from provisioner.templating import Rendered, is_secret, render

handler = systemd.handler          # steps for a handler: optional validate, then the action

__all__ = [
    "Change", "Connection", "EXPORTERS", "EXPORTER_PORT_RANGE", "Facts", "FileFact", "Guard", "Host", "Inventory", "NotAResource",
    "Noop", "PlanError", "Rendered", "Resource", "RoleContext", "Secret", "USER_RE",
    "Unreachable", "VarContext", "VarError", "abs_path", "agent_hosts", "apt", "check_key", "colours", "commands",
    "config_settings", "directory_step", "exporters_of", "file_fact", "file_group", "files", "handler",
    "is_secret", "known_host_lines", "package_version", "lines", "links", "monitoring_sources", "pm2_app_procs", "pm2_jlist", "pm2_processes", "pm2_unit", "private_address", "reject", "render", "run_step", "sha256", "sql_literal", "ssh_keypair", "sysctl", "systemd",
    "TEXTFILE_DIR", "templates", "ufw", "users", "with_helpers", "write_step",
]


@runtime_checkable
class Resource(Protocol):
    """What `resources()` yields. `id` names it in every report ("file /etc/x"); facts() is
    its fragment of the role's one facts request ({"files": ["/etc/x"]}); plan(facts) is PURE
    and returns Changes (what to do, why, the steps) or a Noop with its reason; expect(facts)
    returns the facts as they will be after its changes, so later resources of the role plan
    against that ({} when it changes nothing another resource reads)."""

    @property
    def id(self) -> str: ...

    def facts(self) -> dict: ...

    def plan(self, facts: Facts) -> list[Change | Noop]: ...

    def expect(self, facts: Facts) -> dict: ...


@dataclass(frozen=True)
class VarContext:
    """What a var check may look at besides the vars: the host as the inventory has it."""
    host: Host
    inventory: Inventory


@dataclass(frozen=True)
class RoleContext(VarContext):
    """What resources() may look at besides the vars."""
    os: dict                           # the host's os facts (id, version_id, virt, ...)
    check: bool                        # check mode: nothing will be applied


class VarError(ValueError):
    """A role var the role cannot use: reported as bad input (exit 2) with where it was set."""

    def __init__(self, var: str, problem: str, fix: str):
        super().__init__(f"{var}: {problem}; {fix}")
        self.var, self.problem, self.fix = var, problem, fix


def package_version(content: str | None) -> str | None:
    """The "version" of a package.json's text (a files fact's content); None when absent or
    unreadable."""
    try:
        doc = json.loads(content or "")
    except ValueError:
        return None
    v = doc.get("version") if isinstance(doc, dict) else None
    return v if isinstance(v, str) else None


def reject(var: str, problem: str, fix: str) -> VarError:
    """Refuse a var: `var` is its name (or a path in it: "harden_admin_users[0].name"),
    `problem` what is wrong with the value, `fix` what to write instead. Raises."""
    raise VarError(var, problem, fix)


# Where a service that must stay off the internet may listen: RFC 1918, RFC 6598 (carrier-grade
# NAT, used by some clouds' private networks), loopback, IPv6 unique-local. An allow-list, so
# that 0.0.0.0 / :: (every interface), link-local and anything new are refused too.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "fc00::/7", "::1/128"))


def private_address(var: str, given: str, host: Host, service: str):
    """The address a service listens on besides loopback: `given` (the var's value), or else the
    host's inventory address. One that is not an IP, or not in PRIVATE_NETWORKS, is refused
    (VarError): a database must never listen on the internet."""
    address = given or host.address
    what = f"{address!r}" if given else f"the host's inventory address {address!r}"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        reject(var, f"{what} is not an IP address", f"set {var} to the server's private IP "
               "address, e.g. 10.0.0.5")
    if not any(ip in net for net in PRIVATE_NETWORKS):
        reject(var, f"{what} is not a private address (RFC 1918, RFC 6598, loopback or IPv6 "
               f"unique-local), and {service} must not listen on a public one or on every "
               "interface", f"set {var} to the server's private IP address (or 127.0.0.1 "
               "for local clients only)")
    return ip


def config_settings(var: str, settings: Any, *, file: str, name_re, managed,
                    bools=("yes", "no"), quote: Callable[[str], str] = lambda s: s) -> dict[str, str]:
    """A role var that passes extra directives to a service's own config file ({name: value},
    e.g. redis_settings, postgresql_settings: `file` names it), judged the same way for every role: each name
    matches `name_re` and is not in `managed` (the role's own vars set those), each value is a
    number, a bool (written as bools[0] / bools[1]) or a one-line string (written quote(s)).
    Returns {name: value as the file writes it}; rejects the var otherwise."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        reject(var, f"{settings!r} is not a mapping", "write one `name: value` per directive")
    out = {}
    for name, value in settings.items():
        if not isinstance(name, str) or not name_re.match(name):
            reject(var, f"{name!r} is not a {file} directive name", "check the spelling in "
                   f"the documentation of {file}")
        if name in managed:
            reject(var, f"{name} is managed by the role", "set the role's own var for it")
        if isinstance(value, bool):
            out[name] = bools[0] if value else bools[1]
        elif isinstance(value, (int, float)):
            out[name] = str(value)
        elif isinstance(value, str) and (value or quote(value)) \
                and not any(ord(c) < 32 for c in value):      # "" only where it can be written
            out[name] = quote(value)
        else:
            reject(var, f"{name}: {value!r} is not a number, bool or one-line string",
                   "write one value on one line")
    return out


@dataclass(frozen=True)
class Guard:
    """A safety net for changes that can cut the controller off (sshd, firewall).

    When a change to one of `files` has been applied (handlers included, e.g. sshd reloaded),
    `check(host)` runs on the controller, typically opening a brand-new SSH connection. If it
    raises, each file goes back to what it was before the run (content, mode, owner; or
    removed if it did not exist), `after_rollback` steps run (e.g. reload sshd), over the
    connection still open, and the role fails with the check's error."""
    name: str
    files: tuple[str, ...]
    check: Callable[[Host], None]
    after_rollback: tuple[dict, ...] = ()
    resources: tuple[str, ...] = ()          # other resource ids whose change triggers it ("ufw")
    # the dead man's switch (see remote/agent.py arm_switch): before the first change it
    # watches, these paths are copied aside on the server and a timer armed that restores them
    # and runs revert_after (argv lists) in revert_seconds unless the passed check disarms it
    revert_paths: tuple[str, ...] = ()
    revert_after: tuple[tuple[str, ...], ...] = ()
    revert_seconds: int | None = None

    def watches(self, change: Change) -> bool:
        """Whether this change (applied, or failed part-way) must be checked by the guard."""
        return bool(set(change.paths) & set(self.files)) or change.resource in self.resources


class NotAResource(TypeError):
    """A role yielded something else than a Resource, at `file`:`line`."""

    def __init__(self, file: str, line: int | None, role: str, problem: str):
        super().__init__(f"{file}:{line}: role {role} yielded {problem}")
        self.file, self.line, self.problem = file, line, f"yielded {problem}"


_RESOURCE_ATTRS = ("id", "facts", "plan", "expect")
# Classes whose every instance is a Resource (the attributes are the class's own): checked
# once. isinstance() against the Protocol inspects it anew on each call, which was a sixth
# of the controller's CPU per host on a converged run (~90 resources per host).
_RESOURCE_CLASSES: set[type] = set()


def not_a_resource(item: Any) -> str | None:
    """Why `item` is not a Resource (None when it is)."""
    cls = type(item)
    if cls in _RESOURCE_CLASSES:
        return None
    if isinstance(item, Resource):
        if all(hasattr(cls, a) for a in _RESOURCE_ATTRS):
            _RESOURCE_CLASSES.add(cls)
        return None
    missing = [a for a in _RESOURCE_ATTRS if not hasattr(item, a)]
    return f"{type(item).__name__} is not a Resource (no {', '.join(missing)})"

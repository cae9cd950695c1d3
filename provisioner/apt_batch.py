"""One apt transaction for the packages a host's roles will install, right after the host's
firewall is up.

Each role installs its packages in its own step, one role after the other: on a fresh server
that is one `apt-get install` per role, each reading the package lists, downloading, then
unpacking and running dpkg's triggers (man-db, systemd) again. Installed together they cost
one of each. The roles still run as before: their own package steps then find the packages
installed and report ok.

Where it happens: a package's service starts listening when it is installed (nginx's default
site on :80, PostgreSQL, Redis, Prometheus and its exporters), so no package may be installed
before the host's firewall is up. The batch therefore takes place right after the host's first
role that brings the firewall up (one with an enabled `ufw.firewall` resource: role harden) and
covers only the roles after it; that role and the roles before it (base) install their own
packages in their own steps, as without a batch. If that role fails, or is reverted by its
guard, the roles after it do not run and neither does the batch. A host none of whose roles of
this run brings a firewall up (none in its inventory, or left out by --roles) batches from its
first role: nothing there is behind a firewall of this run anyway.

A package resource of a role moves into the batch only when installing it before its role
cannot change what the run does. It stays in its role's own step when:
- it is not a plain install (state `latest` or `absent`, or `install_recommends`): those have
  their own apt semantics, and are rare;
- a resource before it among the batch's roles changes where packages come from or which
  version wins (an apt repository, a file under sources.list.d, keyrings or preferences):
  installing first would take the package from elsewhere, or fail to find it;
- a resource before it in its own role changes something: the role put it first on purpose
  (postgresql's check that no older cluster holds the data, a config file the package's
  install reads);
- its role, or a role before it, cannot be planned: the run stops there, and a role that
  never runs must not have installed anything;
- another role asks for the same package at another version.
A role may write a file before its package on purpose: a service's settings, so that the
package's install starts the service on them (the exporters' /etc/default files), or
postgresql-common's settings before a server package creates its cluster. Such writes come
along (`Carried`): the batch makes them first, then installs, as the role would have, and the
package joins the batch instead of staying in its role. A write comes along only when it can
be made before any role after the firewall's ran: a whole file or a folder, owned by root (a
package's own user does not exist yet), with no command to validate it or to run after it (the
package's tools are not there yet), in a folder that is there already or that a write before it
makes, not under a guard of its role, and before its role's first package and first other
change. The handlers it notifies run in its role, as they would have: their role's apply is
told which ones and when the write was done, so a restart of a unit that the install started
on the new file gives way (remote/agent.py), and one of a unit that did not start still runs.
A write that notifies comes along only when every package it comes before is missing: none of
their units runs on the old file yet, so none is owed a restart that a failed batch (its roles
then not run) would lose.

A run plans the batch when it gets there, from the facts as the roles before it left them (one
facts exec for the batch's roles when one of those changed the host). Its roles are planned
against those facts, as check mode does: a role's changes that only show after an earlier role
ran are not seen. That is the check mode's limit too, and none of the roles' package steps
depends on an earlier role's files. Check mode (and `invoke apply`'s check of a saved plan)
plans it from the facts gathered before any role ran, with the packages the roles before it
would install counted as installed (`foresee`).

Everything here is pure: the runner applies the change in one exec and gathers the facts again.
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from provisioner.change import Change
from provisioner.facts import Facts, merge_fragments
from provisioner.ops import apt, files, plan_all, ufw

RESOURCE = "apt batch: "      # its step's resource: the names follow
PLAN_KEY = "(apt batch)"      # its change's key in a saved plan (no role can be named so)

# Where apt reads which packages exist and which version wins: a change there comes first.
# Not apt.conf.d: harden's unattended-upgrades settings live there, and apt's options do not
# move a package's origin (a proxy setting would only make the batch fail loudly).
APT_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d/", "/etc/apt/keyrings/",
               "/etc/apt/trusted.gpg", "/etc/apt/preferences", "/usr/share/keyrings/")


@dataclass(frozen=True)
class Left:
    """A package resource that stays in its role's own step, and why."""
    role: str
    resource: str
    why: str


@dataclass(frozen=True)
class Carried:
    """A write of a role that the batch makes before installing (see the module's doc)."""
    role: str
    change: Change


@dataclass(frozen=True)
class Batch:
    names: tuple[str, ...] = ()          # the package specs the batch installs
    roles: tuple[str, ...] = ()          # the roles they come from, in order
    left: tuple[Left, ...] = ()          # package resources with work left to their roles
    install: Change | None = None        # None: nothing to install before its roles
    expect: dict = dataclasses.field(default_factory=dict)   # the host after it (check mode)
    carried: tuple[Carried, ...] = ()    # the writes it makes first, in order

    @property
    def changes(self) -> list[Change]:
        """What the batch's apply sends: each carried write, then the install."""
        return [c.change for c in self.carried] + ([self.install] if self.install else [])

    @property
    def change(self) -> Change | None:
        """The batch as one change, for its report and a saved plan: the carried writes'
        steps and diffs, then the install's."""
        if self.install is None:
            return None
        diffs = "".join(c.change.diff for c in self.carried if c.change.diff)
        return dataclasses.replace(self.install, diff=diffs or None, steps=tuple(
            st for c in self.carried for st in c.change.steps) + self.install.steps)


NOTHING = Batch()


def batchable(r: Any) -> bool:
    return (isinstance(r, apt.Packages) and r.state == "present"
            and not r.install_recommends)


def brings_up_firewall(r: Any) -> bool:
    """A resource after which the host's firewall is on (role harden's ufw)."""
    return isinstance(r, ufw.Firewall) and r.enabled


def start(roles: Sequence[tuple[str, Sequence[Any] | None]]) -> int:
    """Where the batch takes place in the host's role order (an index into `roles`): right
    after the first role that brings the firewall up; 0, before every role, when none does."""
    for i, (_role, resources) in enumerate(roles):
        if resources is not None and any(brings_up_firewall(r) for r in resources):
            return i + 1
    return 0


def wanted(roles: Sequence[tuple[str, Sequence[Any] | None]]) -> bool:
    """Whether these roles hold a package resource the batch could take (installed or not):
    without one there is nothing to plan, and no facts to gather for it."""
    for _role, resources in roles:
        if resources is None:
            return False
        if any(batchable(r) for r in resources):
            return True
    return False


def foresee(roles: Sequence[tuple[str, Sequence[Any] | None]], at: int, facts: Facts,
            guards: Mapping[str, Sequence[Any]] | None = None,
            handlers: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Batch, Facts]:
    """The batch as check mode sees it at `at` (start(roles)), from the facts gathered before
    any role ran: the packages the roles before it install are counted as installed (with
    fresh lists when they refresh them), as they are when the batch runs. Also the facts the
    roles after it plan from. The same for check mode and for a saved plan's check."""
    if not wanted(roles[at:]) or any(rs is None for _role, rs in roles[:at]):
        return NOTHING, facts           # no batch, or the run stops before it
    before = facts
    try:
        for _role, resources in roles[:at]:
            for r in resources:
                if isinstance(r, apt.Packages) and _installs(r, before):
                    before = before.overlay(r.expect(before))
    except Exception:                   # facts it cannot read: the roles' own steps report it
        return NOTHING, facts
    batch = plan(roles[at:], before, guards, handlers)
    return batch, before.overlay(batch.expect)


def request(roles: Sequence[tuple[str, Sequence[Any] | None]]) -> dict:
    """The folders of the roles' files and folders: a write comes along only into a folder
    that is there already (its facts are gathered with the roles')."""
    return {"files": sorted({posixpath.dirname(r.path) for _role, rs in roles if rs for r in rs
                             if isinstance(r, (files.File, files.Directory))})}


def _carriable(r: Any, changes: list[Change], facts: Facts, made: set[str],
               guards: Sequence[Any], handlers: Mapping[str, Any]) -> bool:
    """Whether this change of a role can be made before any role after the firewall's ran."""
    if not isinstance(r, (files.File, files.Directory)):
        return False
    if r.owner not in (None, "root") or r.group not in (None, "root"):
        return False
    if isinstance(r, files.File) and (r.validate or r.after):
        return False
    if r.path.startswith(APT_SOURCES) or any(g.watches(c) for g in guards for c in changes):
        return False
    if any(n not in handlers for n in r.notify):
        return False
    parent = posixpath.dirname(r.path)
    if parent in made:
        return True
    try:
        f = facts.file(parent)
    except KeyError:            # not gathered (a caller without request()): not known to be there
        return False
    return f.exists and f.type == "dir"


def _installs(r: Any, facts: Facts) -> bool:
    return any(isinstance(c, Change) for c in r.plan(facts))


def _missing(spec: str, facts: Facts) -> bool:
    """Whether this package (name or name=version) is not installed as asked."""
    return _installs(apt.packages([spec]), facts)


def _changes_apt_sources(r: Any, changes: list[Change]) -> bool:
    if isinstance(r, apt.Repository):
        return True
    return any(p.startswith(APT_SOURCES) for c in changes for p in c.paths)


def _name(spec: str) -> str:
    return spec.split("=", 1)[0]


def plan(roles: Sequence[tuple[str, Sequence[Any] | None]], facts: Facts,
         guards: Mapping[str, Sequence[Any]] | None = None,
         handlers: Mapping[str, Mapping[str, Any]] | None = None) -> Batch:
    """The batch of the roles it covers, in run order (from start() on: (name, resources),
    None for a role that could not be prepared), planned from the facts as they are before
    the first of them runs. `guards` and `handlers`: each role's, by its name (a write under a
    guard, or notifying a handler its role lacks, does not come along).

    On a host where every plain package is installed (a converged one), this is a lookup per
    package and nothing more: no role is planned."""
    try:
        if not any(batchable(r) and _installs(r, facts)
                   for _role, rs in roles if rs is not None for r in rs):
            return NOTHING
    except Exception:           # facts it cannot read: the roles' own steps report it
        return NOTHING
    names: dict[str, str] = {}            # package -> the spec batched for it
    max_ages: list[int | None] = []
    from_roles: list[str] = []
    left: list[Left] = []
    carried: list[Carried] = []
    made: set[str] = set()                # the folders the carried writes make
    expect: dict = {}
    sources_changed_by = None             # the first earlier resource that changes apt's sources
    for role, resources in roles:
        if resources is None:
            break                         # the run stops at this role: none after it runs
        try:
            planned = plan_all(resources, facts)
        except Exception:                 # its run will report it; it stops there too
            break
        first_change = None               # the first resource of this role that changes something
        ahead: list[tuple[Any, list[Change]]] = []  # writes before all that, that could come along
        early = True                      # before this role's first package with a change
        for r, result in planned:
            changes = [c for c in result if isinstance(c, Change)]
            if not changes:
                continue
            if isinstance(r, apt.Packages):
                early = False
                if any(w.notify for w, _cs in ahead) and not all(_missing(n, facts) for n in r.names):
                    # one of them runs already: should the batch fail after the writes, the
                    # restart they owe it would be lost, so they stay in their role
                    first_change, ahead = ahead[0][0].id, []
                why = _why_not(r, sources_changed_by, first_change, names)
                if why is None:
                    for spec in r.names:
                        names.setdefault(_name(spec), spec)
                    max_ages.append(r.update_cache_max_age)
                    if role not in from_roles:
                        from_roles.append(role)
                    for w, cs in ahead:   # made first: not changes of its role any more
                        carried += [Carried(role, c) for c in cs]
                        expect = merge_fragments(expect, w.expect(facts))
                    made.update(_folders(ahead))
                    ahead = []
                    continue              # it moves into the batch: not a change of its role
                left.append(Left(role, r.id, why))
            elif early and first_change is None and _carriable(
                    r, changes, facts, made | _folders(ahead), (guards or {}).get(role, ()),
                    (handlers or {}).get(role, {})):
                ahead.append((r, changes))
                continue
            first_change = first_change or (ahead[0][0].id if ahead else r.id)
            ahead = []                    # they stay in their role, before this change
            if _changes_apt_sources(r, changes):
                sources_changed_by = sources_changed_by or r.id
    if not names:
        return Batch(left=tuple(left))
    ages = [a for a in max_ages if a is not None]
    # only what is missing (a resource may list some installed ones too), and the strictest
    # wish of the batched resources: a refresh when any of them would refresh
    missing = [s for s in names.values() if _missing(s, facts)]
    together = apt.packages(missing, update_cache_max_age=min(ages) if ages else None)
    install = next(c for c in together.plan(facts) if isinstance(c, Change))
    why = f"{install.why}; for role{'s' if len(from_roles) > 1 else ''} {', '.join(from_roles)}"
    if carried:
        why += "; written first: " + ", ".join(f"{c.change.resource} ({c.role})" for c in carried)
    if left:
        why += "; left to their roles: " + "; ".join(f"{x.resource} ({x.role}: {x.why})" for x in left)
    install = dataclasses.replace(install, resource=RESOURCE + " ".join(together.names), why=why)
    return Batch(together.names, tuple(from_roles), tuple(left), install,
                 merge_fragments(expect, together.expect(facts)), tuple(carried))


def _folders(writes) -> set[str]:
    return {w.path for w, _changes in writes if isinstance(w, files.Directory)}


def _why_not(r: apt.Packages, sources_changed_by: str | None, first_change: str | None,
             names: dict[str, str]) -> str | None:
    if not batchable(r):
        return ("installs recommended packages" if r.install_recommends
                else f"state {r.state}") + ": its own transaction"
    if sources_changed_by:
        return f"after {sources_changed_by}, which changes where packages come from"
    if first_change:
        return f"after {first_change} of its role, which changes something first"
    other = [f"{names[_name(s)]} != {s}" for s in r.names
             if _name(s) in names and names[_name(s)] != s]
    if other:
        return f"another role asks for another version ({', '.join(other)})"
    return None


_APT_ERROR = re.compile(r"^(E: |dpkg: error)")


def failure(names: Sequence[str], output: str | None, error: str | None, rc: Any) -> str:
    """A failed batch's reason: the packages, and apt's own error lines (or the last line)."""
    lines = [x.strip() for x in (output or "").splitlines() if x.strip()]
    said = [x for x in lines if _APT_ERROR.match(x)] or lines[-1:]
    cause = "; ".join(said[-3:]) or error or f"exit {rc}"
    return f"install of {' '.join(names)} failed: {cause}"

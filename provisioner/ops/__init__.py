"""Operations: one module per resource (apt, files, templates, lines, links, users, systemd,
sysctl, commands, groups). Each constructor returns a frozen dataclass with .id, .facts(),
.plan(facts) (pure) and .expect(facts); see provisioner/ops/_base.py.

A role's flow, per host:
    req = request(resources)                         # one facts exec
    facts = Facts(agent.parse(out)["facts"])
    planned = plan_all(resources, facts)             # pure, threads predicted facts
    changes = [c for _, result in planned for c in result]
    agent.apply_request(changes, handlers)           # one apply exec (handlers included)
"""
from __future__ import annotations

from typing import Any, Iterable

from provisioner.change import Change, Noop
from provisioner.facts import Facts, merge_requests
from provisioner.ops._base import PlanError

__all__ = ["PlanError", "request", "plan_all"]


def request(resources: Iterable[Any]) -> dict:
    """The one facts request for these resources."""
    return merge_requests(r.facts() for r in resources)


def plan_all(resources: Iterable[Any], facts: Facts) -> list[tuple[Any, list[Change | Noop]]]:
    """Plan each resource in order. After a resource that changes something, the facts the
    next ones see are overlaid with its .expect(): a line edited in a file a package install
    just changed, a user joining a group created just before, are planned against that
    future state, not the stale one. PlanError propagates (nothing of the role is applied).

    A role that fights itself is refused up front (PlanError): a file whose whole content a
    resource manages and that another resource also writes or edits lines in would change
    on every run."""
    resources = list(resources)
    check_conflicts(resources)
    out = []
    for r in resources:
        result = r.plan(facts)
        out.append((r, result))
        if any(isinstance(c, Change) for c in result):
            expect = getattr(r, "expect", None)
            if expect is not None:
                facts = facts.overlay(expect(facts))
    return out


def check_conflicts(resources: Iterable[Any]) -> None:
    """Refuse a role whose resources would undo each other on every run: a path managed as a
    whole (file, template, directory, link, absent) by one resource and also managed by a
    different one, either as a whole or by lines (lines.line, sysctl's file)."""
    from provisioner.ops.files import Absent, Directory, File
    from provisioner.ops.lines import Line
    from provisioner.ops.links import Link
    from provisioner.ops.sysctl import Sysctl

    whole: dict[str, Any] = {}
    partial: dict[str, Any] = {}
    for r in [m for r in resources for m in getattr(r, "members", (r,))]:    # groups: theirs
        if isinstance(r, (File, Directory, Link, Absent)):
            first = whole.get(r.path)
            if first is not None and first != r:
                raise PlanError(f"{r.id} conflicts with {first.id}: both manage {r.path} and "
                                "would undo each other on every run")
            whole.setdefault(r.path, r)
        elif isinstance(r, (Line, Sysctl)):
            partial.setdefault(r.path if isinstance(r, Line) else r.file, r)
    for path, r in partial.items():
        if path in whole:
            raise PlanError(f"{r.id} conflicts with {whole[path].id}: that resource manages "
                            f"the whole of {path}, so they would undo each other on every "
                            "run; put the line into the file's content instead")

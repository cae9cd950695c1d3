"""File groups: several files of a role written together, then one command that checks the
whole configuration in place (`nginx -t`, `sshd -t`, `promtool check config ...`).

    groups.group(name, members, check, notify=(), timeout=None)

members are files, templates, links and lines (each may keep its own `validate`). When any of
them differs, the group is ONE change: the agent remembers every member's file, applies the
members' steps, runs `check`; if a step or the check fails, every member goes back to what it
was (removed if it was new), the change fails with the command's output, and no handler it
notifies runs. A per-file `validate` sees one file alone; a group's check sees them all where
the service will read them, which is what a vhost needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts, merge_fragments, merge_requests
from provisioner.ops import _base as b
from provisioner.ops.files import File, _notify
from provisioner.ops.lines import Line
from provisioner.ops.links import Link

MEMBER_TYPES = (File, Link, Line)


@dataclass(frozen=True)
class FileGroup:
    name: str
    members: tuple[Any, ...]
    check: tuple[str, ...]
    notify: tuple[str, ...] = ()
    timeout: float | None = None

    @property
    def id(self) -> str:
        return f"file group {self.name}"

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(m.path for m in self.members))

    def facts(self) -> dict:
        return merge_requests(m.facts() for m in self.members)

    def _planned(self, facts: Facts) -> list[Change | Noop]:
        from provisioner.ops import plan_all          # ops/__init__ imports the op modules
        return [c for _, result in plan_all(self.members, facts) for c in result]

    def plan(self, facts: Facts) -> list[Change | Noop]:
        planned = self._planned(facts)
        changes = [c for c in planned if isinstance(c, Change)]
        if not changes:
            return [Noop(self.id, f"{len(self.members)} files as wanted")]
        step = {"file_group": self.paths, "steps": [s for c in changes for s in c.steps],
                "check": list(self.check)}
        if self.timeout is not None:
            step["timeout"] = self.timeout
        notify = tuple(dict.fromkeys(self.notify + tuple(n for c in changes for n in c.notify)))
        why = "; ".join(f"{c.resource}: {c.why}" for c in changes)
        diff = "".join(c.diff or "" for c in changes) or None
        return [Change(self.id, "write and check", why, (step,), diff, notify)]

    def expect(self, facts: Facts) -> dict:
        out: dict = {}
        for m in self.members:
            if any(isinstance(c, Change) for c in m.plan(facts)):
                frag = m.expect(facts)
                facts = facts.overlay(frag)
                out = merge_fragments(out, frag)
        return out


def group(name: str, members: Sequence[Any], check: Sequence[str], *,
          notify: Sequence[str] | str = (), timeout: float | None = None) -> FileGroup:
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise ValueError(f"a file group needs a one-line name, not {name!r}")
    members = tuple(members)
    if not members:
        raise ValueError(f"file group {name}: no members")
    for m in members:
        if not isinstance(m, MEMBER_TYPES):
            raise TypeError(f"file group {name}: {type(m).__name__} cannot be a member; "
                            "members are files, templates, links and lines")
    return FileGroup(name=name, members=members, check=tuple(b.check_argv(check, "check")),
                     notify=_notify(notify), timeout=timeout)

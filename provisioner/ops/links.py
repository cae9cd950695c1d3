"""Symbolic links, switched atomically.

    links.link(path, to, notify=())

A new link is made beside the target under a temp name (`ln -sfn`), then renamed over the path
(`mv -T`): readers see the old link or the new one, never nothing (the Capistrano `current`
switch). An existing file at the path is replaced; a directory is refused (PlanError), and
`mv -T` also refuses to replace a directory at apply time.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import _base as b
from provisioner.ops.files import _notify


@dataclass(frozen=True)
class Link:
    path: str
    to: str
    notify: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"link {self.path}"

    @property
    def tmp(self) -> str:
        d, base = posixpath.split(self.path)
        return posixpath.join(d, f".{base}.provisioner-tmp")

    def facts(self) -> dict:
        return {"files": [self.path]}

    def steps(self) -> tuple[dict, ...]:
        return (b.run(["ln", "-s", "-f", "-n", "--", self.to, self.tmp]),
                b.run(["mv", "-f", "-T", "--", self.tmp, self.path]))

    def plan(self, facts: Facts) -> list[Change | Noop]:
        f = facts.file(self.path)
        if f.exists and f.type == "link" and f.target == self.to:
            return [Noop(self.id, f"points to {self.to}")]
        if f.exists and f.type == "dir":
            raise b.PlanError(f"{self.path} is a directory; refusing to replace it with a link")
        if not f.exists:
            why = "absent"
        elif f.type == "link":
            why = f"points to {f.target} != {self.to}"
        else:
            why = f"is {f.describe()}; replacing it with a link"
        return [Change(self.id, "link", why, self.steps(), None, self.notify)]

    def expect(self, facts: Facts) -> dict:
        return {"files": {self.path: {"__replace__": True, "exists": True, "type": "link",
                                      "target": self.to, "mode": "0777", "owner": "root",
                                      "group": "root"}}}


def link(path: str, to: str, *, notify: Sequence[str] | str = ()) -> Link:
    if not isinstance(to, str) or not to or "\0" in to or "\n" in to:
        raise ValueError(f"link target must be a non-empty path, not {to!r}")
    return Link(path=b.abs_path(path), to=to, notify=_notify(notify))

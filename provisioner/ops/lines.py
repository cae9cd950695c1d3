"""One line in a text file, like Ansible's lineinfile.

    lines.line(path, line, regexp=None, state="present", insert_after=None,
               mode=None, owner=None, group=None, create=True, validate=None, notify=())

present: the last line matching `regexp` is replaced by `line`; when none matches and `line`
is not already there, it is inserted after the last line matching `insert_after` (or at the
end). absent: every line matching `regexp` (or equal to `line`) is removed.

The edit itself runs ON THE SERVER at apply time (step "line") with the same function the plan
uses (provisioner.remote.agent.edit_lines): a line added to a file that an earlier change of
the same role (re)wrote, e.g. a package install, edits the file as it is then, never a stale
copy. The plan's diff and decision are computed from the facts (threaded through
ops.plan_all). mode/owner/group default to None: an existing file keeps its attributes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import _base as b
from provisioner.ops.files import _notify, _tuple, _validate_arg
from provisioner.remote.agent import edit_lines
from provisioner.templating import MASK, Rendered, is_secret


@dataclass(frozen=True)
class Line:
    path: str
    line: Any                     # str or a secret
    regexp: str | None = None
    state: str = "present"
    insert_after: str | None = None
    mode: str | None = None
    owner: str | None = None
    group: str | None = None
    create: bool = True
    validate: str | tuple[str, ...] | None = None
    notify: tuple[str, ...] = ()

    @property
    def _text(self) -> str:
        return str(self.line.reveal()) if is_secret(self.line) else self.line

    @property
    def id(self) -> str:
        what = self.regexp or (MASK if is_secret(self.line) else self.line)
        return f"line {self.path} {what}"

    def facts(self) -> dict:
        return {"files": [self.path]}

    def _step(self) -> dict:
        v = list(self.validate) if isinstance(self.validate, tuple) else self.validate
        return {"line": self.path, "text": self._text, "regexp": self.regexp,
                "state": self.state, "insert_after": self.insert_after, "mode": self.mode,
                "owner": self.owner, "group": self.group, "create": self.create,
                "validate": v, "after": []}

    def _new(self, old: str | None) -> str | None:
        return edit_lines(old, self._text, self.regexp, self.state, self.insert_after)

    def _shown(self, new: str) -> Rendered:
        if is_secret(self.line):
            return Rendered(text=new, display=None, hidden="the line is a secret",
                            secrets=(self._text,))
        return Rendered.plain(new)

    def plan(self, facts: Facts) -> list[Change | Noop]:
        f = facts.file(self.path)
        if not f.exists:
            if self.state == "absent":
                return [Noop(self.id, "file absent: nothing to remove")]
            new = self._new(None)
            why = "file absent" + ("" if self.create else
                                   " (create=False: an earlier change must create it)")
            return [Change(self.id, "create" if self.create else "edit", why, (self._step(),),
                           b.file_diff(self.path, f, self._shown(new)), self.notify)]
        if f.predicted and f.content is None:
            return [Change(self.id, "edit", "file to be created by an earlier change: edited "
                           "on the server once it exists", (self._step(),), None, self.notify)]
        if f.type != "file":
            raise b.PlanError(f"{self.path} is {f.describe()}, not a file")
        if f.content is None:
            raise b.PlanError(f"{self.path} is binary or larger than 256 KiB: cannot manage "
                              "lines in it")
        new = self._new(f.content)
        drift = b.drift(f, self.mode, self.owner, self.group)
        if new != f.content:
            if self.state == "absent":
                why = "matching line present"
            elif self.regexp and any(re.search(self.regexp, x) for x in f.content.splitlines()):
                why = "line matching regexp differs"
            else:
                why = "line missing"
            return [Change(self.id, "edit", "; ".join([why] + drift), (self._step(),),
                           b.file_diff(self.path, f, self._shown(new)), self.notify)]
        if drift:
            return [Change(self.id, "attrs", "; ".join(drift),
                           (b.attrs(self.path, self.mode, self.owner, self.group),), None,
                           self.notify)]
        return [Noop(self.id, "line already absent" if self.state == "absent"
                     else "line already present")]

    def expect(self, facts: Facts) -> dict:
        f = facts.file(self.path)
        if not f.exists and self.state == "absent":
            return {}
        if f.exists and (f.type != "file" or f.content is None):
            return {}
        new = self._new(f.content if f.exists else None)
        return {"files": {self.path: b.file_fact(self.path, new, self.mode, self.owner,
                                                 self.group, f)}}


def line(path: str, line: Any, *, regexp: str | None = None, state: str = "present",
         insert_after: str | None = None, mode: str | int | None = None,
         owner: str | None = None, group: str | None = None, create: bool = True,
         validate: str | Sequence[str] | None = None,
         notify: Sequence[str] | str = ()) -> Line:
    if state not in ("present", "absent"):
        raise ValueError(f"state must be present or absent, not {state!r}")
    text = str(line.reveal()) if is_secret(line) else line
    if not isinstance(text, str) or "\n" in text or "\r" in text:
        raise ValueError("line must be a single line of text")
    for rx in (regexp, insert_after):
        if rx is not None:
            try:
                re.compile(rx)      # bad input fails here, not on the server
            except re.error as e:
                raise ValueError(f"bad regular expression {rx!r}: {e}") from None
    return Line(path=b.abs_path(path), line=line, regexp=regexp, state=state,
                insert_after=insert_after, mode=b.norm_mode(mode),
                owner=b.check_name(owner, "user"), group=b.check_name(group, "group"),
                create=create, validate=_tuple(_validate_arg(validate)), notify=_notify(notify))

"""Kernel parameters: live value and the persisted one.

    sysctl.sysctl(key, value, file="/etc/sysctl.d/60-provisioner.conf", live=True)

Persisted as one `key = value` line in `file` (edited on the server with the shared line
editor, so several keys in one role end up in the same file); applied live with
`sysctl -w key=value` when live=True and the key exists under /proc/sys. A key that another
sysctl.d file sets differently AND that would be applied after ours at boot (systemd-sysctl
order: file name) is refused with a PlanError naming that file, since writing ours would not
make it stick. Inside containers many kernel.* keys are read-only: use live=False there.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import _base as b
from provisioner.remote.agent import edit_lines

KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*\Z")
DEFAULT_FILE = "/etc/sysctl.d/60-provisioner.conf"


def _norm(v: object) -> str:
    return " ".join(str(v).split())


@dataclass(frozen=True)
class Sysctl:
    key: str
    value: str
    file: str = DEFAULT_FILE
    live: bool = True

    @property
    def id(self) -> str:
        return f"sysctl {self.key}"

    @property
    def line(self) -> str:
        return f"{self.key} = {self.value}"

    @property
    def regexp(self) -> str:
        return r"^\s*-?" + re.escape(self.key) + r"\s*="

    def facts(self) -> dict:
        return {"sysctl": [self.key], "files": [self.file]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        s = facts.sysctl(self.key)
        f = facts.file(self.file)
        if f.exists and (f.type != "file" or f.content is None):
            raise b.PlanError(f"{self.file} is not a text file")
        old = f.content if f.exists else None
        new = edit_lines(old, self.line, self.regexp, "present")
        # which file wins at boot once ours holds the line
        entries = [(posixpath.basename(p), p, _norm(v)) for p, v in s.get("persisted") or ()
                   if p != self.file and posixpath.basename(p) != posixpath.basename(self.file)]
        entries.append((posixpath.basename(self.file), self.file, self.value))
        entries.sort(key=lambda e: e[0])
        _, win_path, win_value = entries[-1]
        if win_path != self.file and win_value != self.value:
            raise b.PlanError(f"{self.key}: {win_path} sets {win_value!r} and is applied after "
                              f"{self.file} at boot; change or remove it there first")
        live = s.get("value")
        why, steps = [], []
        if new != old:
            why.append(f"not persisted in {self.file}" if old is None or not any(
                re.search(self.regexp, x) for x in old.splitlines())
                else f"{self.file} has another value")
            steps.append({"line": self.file, "text": self.line, "regexp": self.regexp,
                          "state": "present", "insert_after": None, "mode": "0644",
                          "owner": "root", "group": "root", "create": True,
                          "validate": None, "after": []})
        elif b.drift(f, "0644", "root", "root"):
            why += b.drift(f, "0644", "root", "root")
            steps.append(b.attrs(self.file, "0644", "root", "root"))
        if self.live and live is not None and _norm(live) != self.value:
            why.append(f"live value {live} != {self.value}")
            steps.append(b.run(["sysctl", "-w", f"{self.key}={self.value}"]))
        if not steps:
            state = (f"live {live}" if live is not None else "no /proc/sys entry (not live)")
            return [Noop(self.id, f"up to date: {self.value} in {self.file}, {state}")]
        if self.live and live is None:
            why.append("no /proc/sys entry: persisted only")
        diff = b.file_diff(self.file, f, b.Rendered.plain(new)) if new != old else None
        return [Change(self.id, "set", "; ".join(why), tuple(steps), diff)]

    def expect(self, facts: Facts) -> dict:
        s = facts.sysctl(self.key)
        f = facts.file(self.file)
        if f.exists and (f.type != "file" or f.content is None):
            return {}
        new = edit_lines(f.content if f.exists else None, self.line, self.regexp, "present")
        persisted = [e for e in s.get("persisted") or () if e[0] != self.file]
        persisted.append([self.file, self.value])
        value = self.value if (self.live and s.get("value") is not None) else s.get("value")
        return {"files": {self.file: b.file_fact(self.file, new, "0644", "root", "root", f)},
                "sysctl": {self.key: {"value": value, "persisted": persisted}}}


def sysctl(key: str, value: object, *, file: str = DEFAULT_FILE, live: bool = True) -> Sysctl:
    if not isinstance(key, str) or not KEY_RE.match(key) or ".." in key:
        raise ValueError(f"bad sysctl key {key!r}")
    v = _norm(value if not isinstance(value, bool) else int(value))
    if not v or "\0" in v:
        raise ValueError(f"bad sysctl value {value!r}")
    return Sysctl(key=key.replace("/", "."), value=v, file=b.abs_path(file), live=live)

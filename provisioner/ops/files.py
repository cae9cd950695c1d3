"""Files, directories, absent paths.

    files.file(path, content="", mode="0644", owner="root", group="root",
               validate=None, notify=(), after=())
    files.directory(path, mode="0755", owner="root", group="root", notify=())
    files.absent(path, recursive=False, notify=())

mode/owner/group None = not managed (kept as they are; new files get 0644 and the agent's
user). `content` is a str or a secret (then the diff is withheld). `validate` is a command
("visudo -cf {path}" or an argv list) run on the temp file before it replaces the old one;
`after` is a list of argvs run once the file is in place (e.g. systemctl daemon-reload).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts, FileFact
from provisioner.ops import _base as b
from provisioner.templating import Rendered

_PROTECTED = {"/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc",
              "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"}


def _validate_arg(validate: str | Sequence[str] | None) -> str | list[str] | None:
    """A command that checks the new file before it replaces the old one; `{path}` stands for
    the temp file. Required: a command that does not read the new file (`nginx -t -c
    /etc/nginx/nginx.conf` checks the old configuration) would pass anything."""
    if validate is None:
        return None
    if isinstance(validate, str):
        if not validate.strip():
            raise ValueError("validate must not be empty")
        argv = validate.split()
    else:
        argv = validate = b.check_argv(validate, "validate")
    if not any("{path}" in a for a in argv):
        raise ValueError(f"validate {validate!r} does not name the new file: put {{path}} where "
                         "the command takes the file to check (e.g. ['sshd', '-t', '-f', "
                         "'{path}']); a command that checks a whole configuration in place "
                         "(nginx -t) belongs in a file group")
    return validate


@dataclass(frozen=True)
class File:
    path: str
    content: Rendered
    mode: str | None = "0644"
    owner: str | None = "root"
    group: str | None = "root"
    validate: str | tuple[str, ...] | None = None
    notify: tuple[str, ...] = ()
    after: tuple[tuple[str, ...], ...] = ()
    kind: str = "file"
    src: str | None = None          # template source, for templates

    @property
    def id(self) -> str:
        return f"{self.kind} {self.path}"

    def facts(self) -> dict:
        return {"files": [self.path]}

    def _write(self) -> dict:
        v = list(self.validate) if isinstance(self.validate, tuple) else self.validate
        return b.write(self.path, self.content.text, self.mode, self.owner, self.group, v,
                       self.after)

    def plan(self, facts: Facts) -> list[Change | Noop]:
        f = facts.file(self.path)
        if f.exists and f.type in ("dir", "other"):
            raise b.PlanError(f"{self.path} is {f.describe()}; refusing to replace it with a file")
        want_sha = b.sha256(self.content.text)
        notify = self.notify
        if not f.exists or f.type == "link":
            why = "absent" if not f.exists else f"{f.describe()}; replacing it with a file"
            return [Change(self.id, "create" if not f.exists else "write", why,
                           (self._write(),), b.file_diff(self.path, f, self.content), notify)]
        drift = b.drift(f, self.mode, self.owner, self.group)
        if f.sha256 != want_sha:
            why = "; ".join(["content differs"] + drift)
            return [Change(self.id, "write", why, (self._write(),),
                           b.file_diff(self.path, f, self.content), notify)]
        if drift:
            return [Change(self.id, "attrs", "; ".join(drift),
                           (b.attrs(self.path, self.mode, self.owner, self.group),), None, notify)]
        return [Noop(self.id, f"up to date: sha256 {want_sha[:12]}, "
                              f"{b.attrs_text(self.mode, self.owner, self.group, f)}")]

    def expect(self, facts: Facts) -> dict:
        old = facts.file(self.path)
        return {"files": {self.path: b.file_fact(self.path, self.content.text, self.mode,
                                                 self.owner, self.group, old)}}


def file(path: str, content: Any = "", *, mode: str | int | None = "0644",
         owner: str | None = "root", group: str | None = "root",
         validate: str | Sequence[str] | None = None, notify: Sequence[str] | str = (),
         after: Sequence[Sequence[str]] = ()) -> File:
    return File(path=b.abs_path(path), content=Rendered.of(content), mode=b.norm_mode(mode),
                owner=b.check_name(owner, "user"), group=b.check_name(group, "group"),
                validate=_tuple(_validate_arg(validate)), notify=_notify(notify),
                after=tuple(tuple(b.check_argv(a, "after")) for a in after))


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def _notify(notify: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(notify, str):
        notify = (notify,)
    out = tuple(notify)
    if not all(isinstance(n, str) and n for n in out):
        raise TypeError(f"notify must be handler names, not {notify!r}")
    return out


@dataclass(frozen=True)
class Directory:
    path: str
    mode: str | None = "0755"
    owner: str | None = "root"
    group: str | None = "root"
    notify: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"directory {self.path}"

    def facts(self) -> dict:
        return {"files": [self.path]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        f = facts.file(self.path)
        step = b.directory(self.path, self.mode, self.owner, self.group)
        if not f.exists:
            return [Change(self.id, "create", "absent", (step,), None, self.notify)]
        if f.type != "dir":
            raise b.PlanError(f"{self.path} is {f.describe()}; refusing to replace it with a "
                              "directory")
        drift = b.drift(f, self.mode, self.owner, self.group)
        if drift:
            return [Change(self.id, "attrs", "; ".join(drift), (step,), None, self.notify)]
        return [Noop(self.id, f"up to date: {b.attrs_text(self.mode, self.owner, self.group, f)}")]

    def expect(self, facts: Facts) -> dict:
        return {"files": {self.path: b.file_fact(self.path, None, self.mode, self.owner,
                                                 self.group, facts.file(self.path), "dir")}}


def directory(path: str, *, mode: str | int | None = "0755", owner: str | None = "root",
              group: str | None = "root", notify: Sequence[str] | str = ()) -> Directory:
    return Directory(path=b.abs_path(path), mode=b.norm_mode(mode),
                     owner=b.check_name(owner, "user"), group=b.check_name(group, "group"),
                     notify=_notify(notify))


@dataclass(frozen=True)
class Absent:
    path: str
    recursive: bool = False
    notify: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"absent {self.path}"

    def facts(self) -> dict:
        return {"files": [self.path]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        f = facts.file(self.path)
        if not f.exists:
            return [Noop(self.id, "already absent")]
        if f.type == "dir":
            if self.recursive:
                argv = ["rm", "-r", "-f", "--", self.path]
            else:
                argv = ["rmdir", "--", self.path]      # fails (safely) when not empty
        else:
            argv = ["rm", "-f", "--", self.path]
        return [Change(self.id, "remove", f"exists: {f.describe()}", (b.run(argv),), None,
                       self.notify)]

    def expect(self, facts: Facts) -> dict:
        return {"files": {self.path: {"__replace__": True, "exists": False}}}


def absent(path: str, *, recursive: bool = False, notify: Sequence[str] | str = ()) -> Absent:
    path = b.abs_path(path)
    if path in _PROTECTED or path.count("/") < 2 and recursive:
        raise ValueError(f"refusing to manage {path} as absent")
    return Absent(path=path, recursive=recursive, notify=_notify(notify))


__all__ = ["File", "Directory", "Absent", "file", "directory", "absent", "FileFact"]

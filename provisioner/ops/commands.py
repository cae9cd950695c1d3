"""Arbitrary commands, guarded so that a second run changes nothing.

    commands.command(argv, creates=None, unless=None, unless_stdin=None, stdin=None, env=None,
                     ok=(0,), notify=(), name=None)

`creates`: a path; when it exists the command is not run. `unless`: an argv run read-only
while gathering facts; exit 0 means "already done" (read-only by contract: it must not
change anything, it runs even in check mode); `unless_stdin` (str or a secret) is fed to it
on stdin, e.g. a password it compares with a stored hash. Without a guard the command runs on every run
and says so. argv is a list, never a shell string; a secret is refused on argv (TypeError) and
belongs in `stdin` or `env`, which travel inside the request on stdin.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import _base as b
from provisioner.ops.files import _notify
from provisioner.templating import is_secret


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    creates: str | None = None
    unless: tuple[str, ...] | None = None
    unless_stdin: Any = field(default=None, repr=False)
    stdin: Any = field(default=None, repr=False)
    env: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    ok: tuple[int, ...] = (0,)
    notify: tuple[str, ...] = ()
    name: str | None = None

    @property
    def id(self) -> str:
        if self.name:
            return f"command {self.name}"
        text = shlex.join(self.argv)
        return "command " + (text if len(text) <= 80 else text[:77] + "...")

    def facts(self) -> dict:
        frag: dict = {}
        if self.creates:
            frag["files"] = [self.creates]
        if self.unless:
            if self.unless_stdin is None:
                frag["checks"] = [list(self.unless)]
            else:
                stdin = self.unless_stdin
                frag["checks"] = [{"argv": list(self.unless),
                                   "stdin": stdin.reveal() if is_secret(stdin) else stdin}]
        return frag

    def plan(self, facts: Facts) -> list[Change | Noop]:
        if self.creates and facts.file(self.creates).exists:
            return [Noop(self.id, f"{self.creates} exists")]
        if self.unless:
            rc = facts.check(self.unless)
            if rc == 0:
                return [Noop(self.id, f"`{shlex.join(self.unless)}` succeeded")]
            why = f"`{shlex.join(self.unless)}` exited {rc}"
        elif self.creates:
            why = f"{self.creates} absent"
        else:
            why = "no guard (creates/unless): runs every time"
        if self.creates and self.unless:
            why = f"{self.creates} absent and {why}"
        stdin = self.stdin.reveal() if is_secret(self.stdin) else self.stdin
        env = {k: (v.reveal() if is_secret(v) else v) for k, v in self.env}
        return [Change(self.id, "run", why, (b.run(self.argv, stdin, env, self.ok),), None,
                       self.notify)]

    def expect(self, facts: Facts) -> dict:
        if self.creates:
            return {"files": {self.creates: {"__replace__": True, "exists": True,
                                             "type": None, "predicted": True}}}
        if self.unless:
            from provisioner.facts import check_key
            return {"checks": {check_key(self.unless): 0}}
        return {}


def command(argv: Sequence[Any], *, creates: str | None = None,
            unless: Sequence[Any] | None = None, unless_stdin: Any = None, stdin: Any = None,
            env: Mapping[str, Any] | None = None, ok: Sequence[int] = (0,),
            notify: Sequence[str] | str = (), name: str | None = None) -> Command:
    for what, value in (("stdin", stdin), ("unless_stdin", unless_stdin)):
        if value is not None and not (isinstance(value, str) or is_secret(value)):
            raise TypeError(f"{what} must be str or a secret")
    if unless_stdin is not None and not unless:
        raise ValueError("unless_stdin needs an unless command")
    env_t = tuple((str(k), v) for k, v in (env or {}).items())
    for k, _ in env_t:
        if not k or "=" in k or "\0" in k:
            raise ValueError(f"bad environment variable name {k!r}")
    return Command(argv=tuple(b.check_argv(argv)), creates=b.abs_path(creates) if creates
                   else None, unless=tuple(b.check_argv(unless, "unless")) if unless else None,
                   unless_stdin=unless_stdin, stdin=stdin, env=env_t, ok=tuple(ok), notify=_notify(notify), name=name)

"""Role input checked for every host before any server is touched (`invoke check`, and every run
before it connects): each role's pure `check(v, ctx)` (see provisioner/api.py), then its
resources built as far as they can be without the server (a role that reads `ctx.os` is built
only once connected). A refused var is reported where it was set; a resource that cannot be
built (a validate without {path}, a template missing a variable, something yielded that is
not a Resource) where the role's code says so. All of it is bad input: exit 2."""
from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable

from provisioner.api import NotAResource, RoleContext, VarContext, VarError
from provisioner.errors import InputError, Problem
from provisioner.inventory import Host, Inventory
from provisioner.roles import RoleCode

VAR_RE = re.compile(r"[a-z][a-z0-9_]*")


def _build_errors() -> tuple[type[Exception], ...]:
    """What a resource that cannot be built raises. A template's errors are jinja2's, and
    jinja2 is imported only when a template is rendered: then they are among them."""
    jinja2 = sys.modules.get("jinja2")
    return (ValueError, TypeError, KeyError) + ((jinja2.TemplateError,) if jinja2 else ())


class _NeedsServer(Exception):
    """The role reads the server's os facts: it can only be built once connected."""


class _OsNotYet(dict):
    def _not_yet(self, *args, **kwargs):
        raise _NeedsServer

    __getitem__ = __len__ = __iter__ = __contains__ = get = keys = items = values = _not_yet


def check_vars(inv: Inventory, hosts: Iterable[Host], code: Callable[[str], RoleCode],
               roles: Callable[[Host], list[str]] | None = None) -> None:
    """InputError listing every problem, once per place (with the hosts it concerns)."""
    from provisioner.runner import resource_list     # the runner's own way to build them

    found: dict[tuple, list[str]] = {}
    for host in hosts:
        v = inv.hostvars(host.name)
        for name in (roles or (lambda h: inv.roles_for(h.name)))(host):
            role = code(name)
            try:
                if role.check is not None:
                    role.check(v, VarContext(host, inv))
                resource_list(role, v, RoleContext(host, inv, _OsNotYet(), True))
            except _NeedsServer:
                pass
            except _build_errors() as e:
                found.setdefault(_where(inv, host, role, v, e), []).append(host.name)
    if found:
        raise InputError([Problem(file, line, key, f"{problem} (for {', '.join(names)})", fix)
                          for (file, line, key, problem, fix), names in found.items()])


def _where(inv: Inventory, host: Host, role: RoleCode, v: dict, e: Exception) -> tuple:
    """(file, line, key, problem, fix) of a refusal: where the var was set when the error
    names one ("<var>: problem"), else the line of the role's code it came from."""
    if isinstance(e, VarError):
        return (*inv.where(host.name, e.var), e.problem, e.fix)
    if isinstance(e, NotAResource):
        return (Path(e.file), e.line, f"role {role.name}", e.problem, "yield only resources "
                "(provisioner.api's constructors, or a class with id, facts, plan, expect)")
    var, _, rest = str(e).partition(":")
    if rest and VAR_RE.match(var) and VAR_RE.match(var).group() in v:
        return (*inv.where(host.name, var), rest.strip(), None)
    init = Path(role.module.__file__) if role.module is not None else None
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if init is not None and Path(frame.filename) == init:
            line = frame.lineno
    return (init or inv.path, line, f"role {role.name}", f"{type(e).__name__}: {e}", None)

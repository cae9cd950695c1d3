"""Role var checks, run for every host before any server is touched (`invoke check`, and
`invoke provision` before it connects): each role's pure `check(v, ctx)` (see
provisioner/api.py), its rejections reported as bad input with where the var was set."""
from __future__ import annotations

import re
from typing import Callable, Iterable

from provisioner.api import VarContext, VarError
from provisioner.errors import InputError, Problem
from provisioner.inventory import Host, Inventory
from provisioner.roles import RoleCode

VAR_RE = re.compile(r"[a-z][a-z0-9_]*")


def check_vars(inv: Inventory, hosts: Iterable[Host], code: Callable[[str], RoleCode],
               roles: Callable[[Host], list[str]] | None = None) -> None:
    """InputError listing every var a role refuses, once per place it was set."""
    found: dict[tuple, list[str]] = {}
    for host in hosts:
        ctx = VarContext(host, inv)
        v = inv.hostvars(host.name)
        for name in (roles or (lambda h: inv.roles_for(h.name)))(host):
            check = code(name).check
            if check is None:
                continue
            try:
                check(v, ctx)
            except VarError as e:
                file, line, key = inv.where(host.name, e.var)
                found.setdefault((file, line, key, e.problem, e.fix), []).append(host.name)
            except (ValueError, TypeError, KeyError) as e:   # a check that did not use reject()
                var, _, rest = str(e).partition(":")
                if rest and VAR_RE.match(var) and VAR_RE.match(var).group() in v:
                    file, line, key = inv.where(host.name, var)    # "<var>: problem; fix"
                    found.setdefault((file, line, key, rest.strip(), None), []).append(host.name)
                else:
                    found.setdefault((inv.path, None, f"role {name}", f"{type(e).__name__}: {e}",
                                      None), []).append(host.name)
    if found:
        raise InputError([Problem(file, line, key, f"{problem} (for {', '.join(names)})", fix)
                          for (file, line, key, problem, fix), names in found.items()])

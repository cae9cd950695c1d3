"""`invoke vars`: a host's resolved vars, where each was set and what it overrode."""
from __future__ import annotations

import difflib
import json
from typing import TYPE_CHECKING, Any

from invoke import task

from provisioner.cli.common import FLAG_HELP, fail_input, inventory
from provisioner.errors import InputError, Problem, display_path
from provisioner.yamlfile import VaultRef

if TYPE_CHECKING:                 # the validation library loads only when a task runs
    from provisioner.inventory import Inventory


def _value(value: Any) -> str:
    """A var's value on one line; a `!vault` secret as *** (its name is not a secret)."""
    if isinstance(value, VaultRef):
        return f"*** (!vault {value.name})"
    return json.dumps(value, default=lambda v: "***" if isinstance(v, VaultRef) else str(v),
                      ensure_ascii=False)


def describe(inv: Inventory, host: str, only: str | None = None) -> list[str]:
    """Lines: each var (or only `only`) with its value and where it was set, then every lower
    layer it overrode, with that layer's value."""
    sources: dict[str, list[tuple[str, Any]]] = {}
    for layer in inv.var_layers(host):
        for var, value in layer.vars.items():
            line = layer.line(var)
            where = display_path(layer.file) + (f":{line}" if line else "")
            sources.setdefault(var, []).append((f"{where} ({layer.label})", value))
    if only is not None and only not in sources:
        close = difflib.get_close_matches(only, list(sources), n=1, cutoff=0.6)
        raise InputError(Problem(None, None, "--var", f"host {host} has no var {only!r}",
                                 (f"did you mean {close[0]!r}? " if close else "") +
                                 f"`invoke vars --env {inv.env} {host}` lists them all"))
    lines = []
    for var in sorted(sources) if only is None else [only]:
        (where, value), *lower = reversed(sources[var])
        lines.append(f"{var} = {_value(value)}")
        lines.append(f"    from {where}")
        lines += [f"    overrides {w}: {_value(v)}" for w, v in lower]
    return lines


@task(name="vars", positional=["host"], auto_shortflags=False,
      help={"env": FLAG_HELP["env"], "host": "the host whose vars to show",
            "var": "only this var"})
def show_vars(c, host, env="local", var=None):
    """A host's vars after precedence, where each was set and what it overrode (secrets ***).

    Precedence, lowest first: role defaults < env vars < group vars < host vars. Touches no
    server and needs no vault password."""
    try:
        inv = inventory(env)
        if host not in inv.hosts:
            close = difflib.get_close_matches(host, list(inv.hosts), n=1, cutoff=0.6)
            raise InputError(Problem(inv.path, None, "HOST", f"no host named {host!r} in env "
                                     f"{inv.env!r}", (f"did you mean {close[0]!r}? " if close else "")
                                     + f"hosts: {', '.join(inv.hosts)}"))
        lines = describe(inv, host, var)
    except InputError as e:
        raise fail_input(str(e)) from None
    print("\n".join(lines))

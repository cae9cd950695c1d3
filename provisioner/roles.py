"""Role discovery: a role is a folder `roles/<name>/` holding a `defaults.yml`.

`defaults.yml` is a flat mapping of the role's variables and their default values. Every key is
prefixed with the role name (`base_timezone` in role `base`), so vars never collide between roles
and an inventory var names the role it configures. A default's YAML type is the var's type: the
inventory loader rejects a value of another type (a `null` default accepts any type; a `!vault`
default only accepts a `!vault` reference, so a secret never lands in a file as plain text).

Folders without a `defaults.yml` (and names starting with `.` or `_`, like `__pycache__`) are not
roles. Role code (the steps a role applies) lives beside `defaults.yml`; this module only reads
the defaults.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from provisioner.errors import InputError, Problem
from provisioner.yamlfile import read_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROLES_ROOT = REPO_ROOT / "roles"

ROLE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*\Z")

Roots = Path | str | Iterable[Path | str] | None


@dataclass(frozen=True)
class RoleInfo:
    name: str
    path: Path                                   # the role folder
    defaults: dict[str, Any]                     # var -> default value, file order
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    # vars the role had and no longer has (retired.yml): var -> what to write instead
    retired: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def defaults_file(self) -> Path:
        return self.path / "defaults.yml"


def _root_list(roots: Roots) -> list[Path]:
    if roots is None:
        return [DEFAULT_ROLES_ROOT]
    if isinstance(roots, (str, Path)):
        return [Path(roots)]
    return [Path(r) for r in roots]


def discover_roles(roots: Roots, problems: list[Problem]) -> dict[str, RoleInfo]:
    """Like `available_roles`, but appends problems to `problems` instead of raising.

    Roles come back sorted by name. When several roots hold the same role name, the first root
    wins (a search path).
    """
    found: dict[str, RoleInfo] = {}
    declared_by: dict[str, str] = {}
    for root in _root_list(roots):
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            name = folder.name
            defaults_file = folder / "defaults.yml"
            if name.startswith((".", "_")) or not defaults_file.is_file() or name in found:
                continue
            if not ROLE_NAME_RE.match(name):
                problems.append(Problem(
                    folder, None, None,
                    f"invalid role name '{name}'",
                    "rename the folder: lowercase letters, digits and '_', starting with a letter "
                    "(the name prefixes every var of the role)"))
                continue
            doc = read_yaml(defaults_file, problems)
            defaults: dict[str, Any] = {}
            lines: dict[str, int] = {}
            if doc is not None and doc.data is not None and not isinstance(doc.data, dict):
                problems.append(Problem(
                    defaults_file, doc.line(()), None,
                    f"expected a mapping of {name}_* vars to their defaults, "
                    f"got {type(doc.data).__name__}",
                    f"write one `{name}_<var>: <default>` per line"))
            elif doc is not None and doc.data:
                for key, value in doc.data.items():
                    line = doc.line((key,))
                    if not isinstance(key, str) or not key.startswith(f"{name}_") \
                            or len(key) == len(name) + 1:
                        problems.append(Problem(
                            defaults_file, line, str(key),
                            f"var '{key}' is not prefixed with the role name '{name}_'",
                            f"rename it to '{name}_{key}' (and its uses in the role), so vars of "
                            "different roles never collide"))
                        continue
                    if key in declared_by:
                        problems.append(Problem(
                            defaults_file, line, key,
                            f"var '{key}' is also declared by role '{declared_by[key]}'",
                            "rename one of them: a var must belong to exactly one role"))
                        continue
                    declared_by[key] = name
                    defaults[key] = value
                    lines[key] = line
            retired = _retired(folder / "retired.yml", name, defaults, problems)
            found[name] = RoleInfo(name, folder, defaults, lines, retired)
    return dict(sorted(found.items()))


def _retired(path: Path, name: str, defaults: dict[str, Any],
             problems: list[Problem]) -> dict[str, str]:
    """A role's retired.yml, when it has one: `<name>_<var>: what to write instead` for each var
    it no longer has, so that an inventory still setting one is told what to do."""
    if not path.is_file():
        return {}
    doc = read_yaml(path, problems)
    if doc is None or doc.data is None:
        return {}
    if not isinstance(doc.data, dict):
        problems.append(Problem(path, doc.line(()), None, "expected a mapping of retired vars",
                                f"write one `{name}_<var>: <what to write instead>` per line"))
        return {}
    out: dict[str, str] = {}
    for key, why in doc.data.items():
        line = doc.line((key,))
        if not isinstance(key, str) or not key.startswith(f"{name}_") or not isinstance(why, str):
            problems.append(Problem(path, line, str(key), f"'{key}' is not a retired var of role "
                                    f"'{name}' with a text", f"write `{name}_<var>: <what to "
                                    "write instead>`"))
        elif key in defaults:
            problems.append(Problem(path, line, key, f"var '{key}' is in defaults.yml too",
                                    "a var is either declared or retired: remove one"))
        else:
            out[key] = why
    return out


def available_roles(roots: Roots = None) -> dict[str, RoleInfo]:
    """Roles found under `roots` (default: the repo's `roles/`), by name.

    Raises InputError listing every problem in every `defaults.yml` (file:line, fix).
    """
    problems: list[Problem] = []
    roles = discover_roles(roots, problems)
    if problems:
        raise InputError(problems)
    return roles


@dataclass(frozen=True)
class RoleCode:
    """What a role does (the contract is in provisioner/api.py): `check(v, ctx)` judges its
    vars before any server is touched, `resources(v, ctx)` yields its resources in order,
    `handlers(v, ctx)` maps handler names to steps, `guards(v, ctx)` lists Guards."""
    name: str
    resources: Any
    handlers: Any
    guards: Any = None
    check: Any = None
    module: Any = field(default=None, compare=False, repr=False)


def role_module(info: RoleInfo):
    """The role's code as the module `roles.<name>`: the one a test gets with
    `import roles.<name>` when the role lives in the repository's roles/."""
    import importlib.util

    init = info.path / "__init__.py"
    if not init.exists():
        raise InputError([Problem(str(init), None, info.name, "the role has defaults but no code",
                                  f"create {init} with a `resources(v, ctx)` generator")])
    package = _roles_package()
    name = f"roles.{info.name}"
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == init.resolve():
        return module
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[str(info.path)])
    module = importlib.util.module_from_spec(spec)
    # registered before it runs: dataclasses (and pickling) look their module up by name
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    setattr(package, info.name, module)        # `roles.<name>` as an import would leave it
    return module


def _roles_package():
    """The package `roles` (the repository's roles/), imported once, wherever we run from."""
    import importlib.util

    if "roles" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "roles", DEFAULT_ROLES_ROOT / "__init__.py",
            submodule_search_locations=[str(DEFAULT_ROLES_ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["roles"] = package
        spec.loader.exec_module(package)
    return sys.modules["roles"]


def load_role(info: RoleInfo) -> RoleCode:
    module = role_module(info)
    init = info.path / "__init__.py"
    if not callable(getattr(module, "resources", None)):
        raise InputError([Problem(str(init), None, info.name, "no `resources(v, ctx)` function",
                                  "define it: it yields the role's resources in order")])
    return RoleCode(info.name, module.resources, getattr(module, "handlers", lambda v, ctx: {}),
                    getattr(module, "guards", lambda v, ctx: []), getattr(module, "check", None),
                    module)

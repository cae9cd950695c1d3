"""Inventories: `inventories/<env>.yml` -> a validated `Inventory`.

Format
------
```yaml
env: local                         # required; must equal the file's stem (local.yml -> local)
known_hosts: ../.testbed/known_hosts   # required; relative to this file. Host keys are checked
                                       # strictly against it, never accepted on first sight.
ssh:                               # required; connection defaults for every host
  user: root                       # required; the login user
  bootstrap_user: null             # tried only while `user` cannot log in yet (fresh VM: root)
  key: ../.testbed/id_ed25519      # private key, relative to this file; optional (agent/default keys)
  port: 22                         # 1-65535
  jump: null                       # bastion: {address: .., port: 22, user: ..} (user defaults to ssh.user)
  connect_timeout: 10              # seconds, > 0
  command_timeout: 900             # seconds, > 0
  sudo_password: null              # null or a vault reference: !vault sudo_password (never plain text)
vars: {}                           # env-level vars
hosts:                             # required, at least one; name -> host, in the order runs use
  web1: {address: 10.77.0.11}      # address: IP or DNS name. Optional: port, user, bootstrap_user, vars
  db1: {address: 10.77.0.13, vars: {postgresql_max_connections: 200}}
groups:                            # required; name -> group
  app:
    hosts: [web1]                  # required; names from `hosts:`
    roles: [base]                  # applied in this order; names of folders in roles/
    vars: {}
apps:                              # optional; name -> app that `invoke deploy` ships (/srv/<name>)
  shop:
    source: ../shop                # required; a git repository folder (relative to this file; a
                                   # subfolder of a repository works) or a URL git can clone
    ref: HEAD                      # the git ref deployed by default (--ref overrides it)
    group: app                     # required; the group it runs on (its pm2 app has its name)
    port: 3000                     # the app's port: the health check asks 127.0.0.1:<port>
    health_path: /health           # must answer 200 and name the release id
    health_timeout: 30             # seconds
    shared: [.env, uploads/]       # kept across releases in /srv/<name>/shared (/ = a folder)
    keep: 5                        # releases kept per host (>= 2)
    migrate: [node, migrate.js, up]          # argv, once per deploy, in the new release, before
                                   # any switch, as the app user with its pm2 env (secrets too)
    migrate_down: [node, migrate.js, down]   # argv for `rollback --with-migrations`, run in the
                                   # release rolled back, TARGET_RELEASE_DIR = the one going live
    database: {host: db1, name: shop}   # PostgreSQL, backed up before each migration: a
                                   # pgBackRest restore point when the env's pgbackrest role
                                   # backs the host up, else `pg_dump -Fc` there
```
Names of hosts and groups: letters, digits, `.`, `_`, `-` (a host and a group may not share a
name: `--limit` takes either). Every host must be in at least one group. Two hosts may not share
address and port.

Vars
----
Every var must be declared in the `defaults.yml` of some available role (any role: one group's
role may read vars set for another, e.g. the app reading `postgresql_port`), and its value must
have the YAML type of that default (int, float, str, bool, list, mapping; an int is accepted
where a float is expected; a `null` default accepts anything). Precedence, lowest first:

    role defaults (of the host's roles) < env `vars` < group `vars` (groups in file order,
    later groups win) < host `vars`

Merging replaces whole values per top-level var: a list or mapping var is never merged key by key.
A host's roles are the roles of its groups, in group file order, de-duplicated keeping the
first occurrence.

Secrets
-------
`!vault NAME` (in vars, at any depth, or as `ssh.sudo_password`) loads as `VaultRef(NAME)`.
`Inventory.vault_refs()` names what the vault must provide; `Inventory.resolve(secrets)` returns a
new Inventory where every VaultRef is replaced by `secrets[NAME]`. A `!vault` reference is
accepted wherever a var's default is a string.

YAML
----
Plain YAML 1.1 as PyYAML reads it (anchors, aliases and `<<` merge keys work), except that a
duplicated mapping key is an error instead of silently keeping the last one. Remember that
YAML 1.1 reads unquoted yes/no/on/off as booleans.

Errors
------
Every problem found is reported together in one `InputError`, each with file:line, key path
(`groups.app.hosts[1]`), what was expected and how to fix it.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (Annotated, Any, Callable, ClassVar, Iterable, Literal, Mapping, Union, get_args,
                    get_origin)

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from provisioner.errors import InputError, Problem, display_path
from provisioner.platforms import DEBIAN
from provisioner.roles import REPO_ROOT, RoleInfo, Roots, discover_roles
from provisioner.yamlfile import KeyPath, VaultRef, YamlDoc, format_path, read_yaml

__all__ = [
    "VaultRef", "Jump", "Host", "Group", "Inventory", "load_inventory", "load_inventory_file",
    "available_envs", "read_yaml", "YamlDoc",
]

ENV_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


# --------------------------------------------------------------------------------------------
# The typed spec (what the file must look like)
# --------------------------------------------------------------------------------------------

def _custom(kind: str, message: str, fix: str) -> PydanticCustomError:
    # The message travels in the context: braces in user values are never read as template fields.
    return PydanticCustomError(kind, "{message}", {"message": message, "fix": fix})


def is_valid_address(value: str) -> bool:
    """An IPv4/IPv6 address or a DNS name (RFC 1123 labels; the last label not all digits)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    return (0 < len(name) <= 253 and all(DNS_LABEL_RE.match(label) for label in labels)
            and not labels[-1].isdigit())


def _check_address(value: str) -> str:
    if is_valid_address(value):
        return value
    fix = "write an IP address (10.0.0.5, 2001:db8::5) or a DNS name (web1.example.com)"
    head, _, tail = value.rpartition(":")
    if tail.isdigit() and head and is_valid_address(head.strip("[]")):
        fix = f"write `address: {head.strip('[]')}` and put the port in `port: {tail}`"
    elif "://" in value or "/" in value:
        fix += "; no scheme or path"
    elif value.startswith("[") and value.endswith("]"):
        fix = f"write the IPv6 address without brackets: {value[1:-1]}"
    raise _custom("address", f"'{value}' is not an IP address or a DNS name", fix)


def _matching(regex: re.Pattern, kind: str, problem: str, fix: str):
    """A string type that must match `regex`; else an error of `kind` saying `problem` (with
    {value}) and `fix`."""
    def check(value: str) -> str:
        if regex.match(value):
            return value
        raise _custom(kind, problem.format(value=value), fix)
    return Annotated[str, AfterValidator(check)]


def _vault_only(value: Any) -> VaultRef:
    if isinstance(value, VaultRef):
        return value
    # Never echo the value: it is probably the password itself.
    raise _custom("vault_only", f"expected a vault reference, got {describe(value, reveal=False)}",
                  "write `sudo_password: !vault NAME` and store the password in the vault; "
                  "passwords never go into the inventory as plain text")


Address = Annotated[str, AfterValidator(_check_address)]
User = _matching(USER_RE, "user", "'{value}' is not a valid Linux user name",
                 "use lowercase letters, digits, '_' and '-', starting with a letter or '_' "
                 "(at most 32 characters)")
Name = _matching(NAME_RE, "name", "invalid name '{value}'",
                 "use letters, digits, '.', '_' and '-' (no spaces or commas: names are used "
                 "in --limit)")
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
PathStr = Annotated[str, Field(min_length=1)]
Vars = dict[str, Any]
SecretRef = Annotated[VaultRef, PlainValidator(_vault_only)]


def _f(default: Any = ..., *, expect: str, example: str, **kw: Any) -> Any:
    return Field(default, description=expect, examples=[example], **kw)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    example: ClassVar[str] = "{}"


class JumpSpec(_Spec):
    example: ClassVar[str] = "{address: bastion.example.com, user: jump}"
    address: Address = _f(expect="the bastion's IP address or DNS name",
                          example="bastion.example.com")
    port: Port = _f(22, expect="a TCP port (1-65535)", example="22")
    user: User | None = _f(None, expect="a user name on the bastion (default: ssh.user)",
                           example="jump")


class SshSpec(_Spec):
    example: ClassVar[str] = "{user: root}"
    user: User = _f(expect="the login user name", example="root")
    bootstrap_user: User | None = _f(None, expect="a user name, or null",
                                     example="root")
    key: PathStr | None = _f(None, expect="a path to a private key file, relative to the inventory",
                             example="../.testbed/id_ed25519")
    port: Port = _f(22, expect="a TCP port (1-65535)", example="22")
    jump: JumpSpec | None = _f(None, expect="a mapping {address, port, user}, or null",
                               example="{address: bastion.example.com, port: 22, user: jump}")
    connect_timeout: Seconds = _f(10, expect="a number of seconds (> 0)", example="10")
    command_timeout: Seconds = _f(900, expect="a number of seconds (> 0)", example="900")
    sudo_password: SecretRef | None = _f(None, expect="a vault reference `!vault NAME`, or null",
                                         example="!vault sudo_password")


TESTBED_RELEASES = tuple(DEBIAN.values())      # the testbed builds every supported release


def _check_release(value: str) -> str:
    if value in TESTBED_RELEASES:
        return value
    raise _custom("release", f"'{value}' is not a Debian release the testbed builds",
                  f"write one of {', '.join(TESTBED_RELEASES)} (Debian {', '.join(DEBIAN)})")


class TestbedHostSpec(_Spec):
    """Settings for `invoke testbed.up`, which builds the hosts of the local env."""
    example: ClassVar[str] = "{release: trixie}"
    release: Annotated[str, AfterValidator(_check_release)] = _f(
        "bookworm", expect="the Debian codename of the test server", example="trixie")


class HostSpec(_Spec):
    example: ClassVar[str] = "{address: 10.0.0.5}"
    address: Address = _f(expect="the host's IP address or DNS name", example="10.0.0.5")
    port: Port | None = _f(None, expect="a TCP port (1-65535)", example="22")
    user: User | None = _f(None, expect="a user name (default: ssh.user)", example="admin")
    bootstrap_user: User | None = _f(None, expect="a user name (default: ssh.bootstrap_user)",
                                     example="root")
    vars: Vars = _f(default_factory=dict, expect="a mapping of vars",
                    example="{base_timezone: UTC}")
    testbed: TestbedHostSpec | None = _f(None, expect="testbed settings (local env): {release}",
                                         example="{release: trixie}")


class GroupSpec(_Spec):
    example: ClassVar[str] = "{hosts: [web1], roles: [base]}"
    hosts: list[str] = _f(expect="a list of host names", example="[web1, web2]")
    roles: list[str] = _f(default_factory=list, expect="a list of role names",
                          example="[base]")
    vars: Vars = _f(default_factory=dict, expect="a mapping of vars",
                    example="{base_timezone: UTC}")


APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")      # as pm2_apps / node_apps: /srv/<name>


def _check_shared(value: str) -> str:
    parts = value.rstrip("/").split("/")
    if value.startswith("/") or not value.rstrip("/") or any(p in ("", ".", "..") for p in parts):
        raise _custom("shared", f"'{value}' is not a plain relative path inside a release",
                      "write a path relative to the release, e.g. `.env` or `uploads/` "
                      "(a trailing / makes it a folder), without `..`")
    return value


def _check_health_path(value: str) -> str:
    if value.startswith("/") and not any(c.isspace() or ord(c) < 32 for c in value):
        return value
    raise _custom("health_path", f"'{value}' is not a URL path",
                  "write a path starting with /, e.g. /health")


def _check_ref(value: str) -> str:
    if value and not value.startswith("-") and not any(c.isspace() or ord(c) < 32 for c in value):
        return value
    raise _custom("ref", f"'{value}' is not a git ref",
                  "write a branch, tag or commit, e.g. main, v1.2.0 or HEAD")


AppName = _matching(APP_NAME_RE, "app_name", "invalid app name '{value}'",
                    "use lowercase letters, digits, '.', '_' and '-' (it names /srv/<app> and "
                    "the pm2 app)")
Argv = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class DatabaseSpec(_Spec):
    example: ClassVar[str] = "{host: db1, name: app}"
    host: Name = _f(expect="the inventory host PostgreSQL runs on", example="db1")
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")] = _f(
        expect="the database name", example="app")


class AppSpec(_Spec):
    """An app `invoke deploy` ships (see provisioner/releases.py)."""
    example: ClassVar[str] = "{source: ../examples/sample-app, group: app}"
    source: PathStr = _f(expect="a git repository: a folder (relative to the inventory, may be a "
                                "subfolder of a repository) or a URL git can clone",
                         example="../examples/sample-app")
    ref: Annotated[str, AfterValidator(_check_ref)] = _f(
        "HEAD", expect="the git ref deployed by default", example="main")
    group: Name = _f(expect="the inventory group the app runs on", example="app")
    port: Port = _f(3000, expect="the TCP port the app listens on (its health check on loopback)",
                    example="3000")
    health_path: Annotated[str, AfterValidator(_check_health_path)] = _f(
        "/health", expect="the URL path of the health check", example="/health")
    health_timeout: Seconds = _f(30, expect="seconds the health check may take to pass",
                                 example="30")
    shared: list[Annotated[str, AfterValidator(_check_shared)]] = _f(
        default_factory=list, expect="paths kept across releases (a trailing / for a folder)",
        example="[.env, uploads/, logs/]")
    keep: Annotated[int, Field(ge=2)] = _f(5, expect="releases kept per host (2 or more)",
                                            example="5")
    migrate: Argv | None = _f(None, expect="a command as a list (argv), run once per deploy in "
                                           "the new release before any switch", example="[node, migrate.js, up]")
    migrate_down: Argv | None = _f(None, expect="a command as a list (argv), run by `rollback "
                                                "--with-migrations` in the release rolled back",
                                   example="[node, migrate.js, down]")
    database: DatabaseSpec | None = _f(None, expect="the app's PostgreSQL database, backed up "
                                                    "before each migration: {host, name}",
                                       example="{host: db1, name: app}")
    strategy: Literal["reload", "blue-green"] = _f(
        "reload", expect="how a release goes live: reload (pm2 reload of the app in place) or "
                         "blue-green (two pm2 apps, <app>-blue on `port` and <app>-green on "
                         "`green_port`; the load balancer flips between them)",
        example="blue-green")
    green_port: Port | None = _f(None, expect="the port of the green colour (strategy blue-green; "
                                              "default: port + 1)", example="3001")
    canary_hold: Seconds = _f(60, expect="seconds `deploy --canary N` holds its canary hosts, "
                                         "watching their health and 5xx rate", example="60")
    canary_max_5xx: Annotated[float, Field(ge=0, le=100)] = _f(
        1.0, expect="the percentage (0-100) of the canaries' answers through the load balancer "
                    "that may be 5xx during the hold", example="1")


class InventorySpec(_Spec):
    env: str = _f(expect="the environment name (the file name without .yml)", example="local")
    known_hosts: PathStr = _f(expect="a path to the known_hosts file, relative to the inventory",
                              example="known_hosts/prod")
    ssh: SshSpec = _f(expect="a mapping of SSH settings", example="{user: root}")
    vars: Vars = _f(default_factory=dict, expect="a mapping of vars",
                    example="{base_timezone: UTC}")
    hosts: dict[Name, HostSpec] = _f(expect="a mapping of host names to hosts (at least one)",
                                     example="{web1: {address: 10.0.0.5}}", min_length=1)
    groups: dict[Name, GroupSpec] = _f(expect="a mapping of group names to groups",
                                       example="{app: {hosts: [web1], roles: [base]}}")
    apps: dict[AppName, AppSpec] = _f(default_factory=dict,
                                      expect="a mapping of app names to apps (invoke deploy)",
                                      example="{sample: {source: ../examples/sample-app, group: app}}")


# --- pydantic errors -> problems -------------------------------------------------------------

_TYPE_EXPECT = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number",
    "bool_type": "true or false", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "list_type": "a list",
}


def describe(value: Any, reveal: bool = True) -> str:
    """How a YAML value reads to a user: "the string 'abc'", "the integer 5", ...

    reveal=False names only the type, for values that may be secrets.
    """
    if not reveal and value is not None and not isinstance(value, VaultRef):
        kind = {"str": "string", "int": "number", "float": "number", "bool": "boolean",
                "list": "list", "dict": "mapping"}.get(_kind(value), "value")
        return f"a plain {kind} (not shown)"
    if value is None:
        return "an empty value (null)"
    if isinstance(value, VaultRef):
        return f"a vault reference ({value})"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r})"


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _spec_at(path: KeyPath) -> tuple[Any, Any]:
    """(FieldInfo or None, type) of the spec at `path` (mapping keys and list indexes skipped)."""
    tp: Any = InventorySpec
    info = None
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return None, None
            tp = info.annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]
            info = None
        else:
            return None, None
    return info, _unwrap(tp)


def _leaf(path: KeyPath) -> str:
    return str(path[-1]) if path else "the file"


def _problems_from_validation(err: ValidationError, doc: YamlDoc) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        is_key = bool(loc) and loc[-1] == "[key]"
        path = loc[:-1] if is_key else loc
        if path in doc.broken:          # already reported while reading the YAML
            continue
        kind, value, ctx = e["type"], e.get("input"), e.get("ctx") or {}
        info, tp = _spec_at(path)
        expect = info.description if info is not None else None
        example = info.examples[0] if info is not None and info.examples else None
        if info is None and isinstance(tp, type) and issubclass(tp, _Spec):
            expect = f"a mapping with keys {', '.join(tp.model_fields)}"
            example = tp.example
        leaf = _leaf(path)
        parent = format_path(path[:-1]) or "the top level"

        if kind == "missing":
            message = f"missing required key '{leaf}'"
            fix = f"add `{leaf}: {example}` under {parent}" if example else f"add `{leaf}:` under {parent}"
            if expect:
                fix += f" ({expect})"
        elif kind == "extra_forbidden":
            _, parent_tp = _spec_at(path[:-1])
            allowed = list(parent_tp.model_fields) if isinstance(parent_tp, type) and \
                issubclass(parent_tp, BaseModel) else []
            message = f"unknown key '{leaf}'"
            close = difflib.get_close_matches(str(leaf), allowed, n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'? " if close else ""
            fix += f"allowed keys under {parent}: {', '.join(allowed)}"
        elif "fix" in ctx:                       # our own validators explain themselves
            message, fix = e["msg"], ctx["fix"]
        elif is_key:
            message = f"expected a name (a string), got {describe(value)}"
            fix = "quote the name, or use letters, digits, '.', '_' and '-'"
        else:
            expect = expect or _TYPE_EXPECT.get(kind) or e["msg"].lower()
            message = f"expected {expect}, got {describe(value)}"
            if kind == "too_short" and isinstance(value, (dict, list)):
                empty = "list" if isinstance(value, list) else "mapping"
                message = f"expected {expect}, got an empty {empty}"
            if value is None:
                fix = (f"give it a value, e.g. `{leaf}: {example}`; if the lines below belong "
                       "to it, indent them" if example else "give it a value")
            elif isinstance(value, VaultRef):
                fix = ("`!vault` is only allowed in vars and ssh.sudo_password; "
                       f"write the value itself{f', e.g. `{leaf}: {example}`' if example else ''}")
            elif isinstance(value, bool) and kind == "string_type":
                raw = doc.raw_bools.get(path, str(value).lower())
                fix = (f"quote it: `{leaf}: \"{raw}\"` (YAML reads unquoted yes/no/on/off/"
                       "true/false as booleans)")
            elif example is not None:
                fix = f"write e.g. `{leaf}: {example}`"
            else:
                fix = f"write {expect}"
        if value is None and kind != "missing" and example is None:
            fix = "give it a value; if the lines below belong to it, indent them"
        out.append(Problem(doc.path, doc.line(path), format_path(path) or None, message, fix))
    return out


# --------------------------------------------------------------------------------------------
# Checks across the file (names, references, vars) on the raw data, so they run even when
# other parts failed the typed spec.
# --------------------------------------------------------------------------------------------

_KIND_TEXT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
              "list": "a list", "dict": "a mapping", "secret": "a vault reference `!vault NAME`"}


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, VaultRef):
        return "secret"
    for kind, tp in (("bool", bool), ("int", int), ("float", float), ("str", str),
                     ("list", list), ("dict", dict)):
        if isinstance(value, tp):
            return kind
    return type(value).__name__


def _type_fits(default: Any, value: Any) -> bool:
    want, got = _kind(default), _kind(value)
    return (want is None or want == got or (want == "str" and got == "secret")
            or (want == "float" and got == "int"))


def _type_fix(key: str, default: Any, value: Any, raw: str | None) -> str:
    want = _kind(default)
    if want == "str" and _kind(value) in ("int", "float", "bool"):
        shown = raw or (str(value).lower() if isinstance(value, bool) else value)
        return f"quote it to make it a string: `{key}: \"{shown}\"`"
    if want == "list":
        return f"write a list: `{key}: [a, b]`, or one `- item` per line below it"
    if want == "dict":
        return f"write a mapping: `{key}: {{name: value}}`, or indented `name: value` lines"
    if want == "secret":
        return (f"write `{key}: !vault NAME` and store the value in the vault; secrets never go "
                "into the inventory as plain text")
    if want == "bool":
        return f"write `{key}: true` or `{key}: false`, without quotes"
    if want in ("int", "float"):
        return f"write a number without quotes, e.g. `{key}: {default}`"
    return f"write {_KIND_TEXT.get(want, want)}, like the default"


class _Checker:
    def __init__(self, doc: YamlDoc, env: str, roles: dict[str, RoleInfo],
                 problems: list[Problem]):
        self.doc, self.env, self.roles, self.problems = doc, env, roles, problems
        self.declared: dict[str, RoleInfo] = {
            var: role for role in roles.values() for var in role.defaults}

    def add(self, path: KeyPath, message: str, fix: str) -> None:
        if path in self.doc.broken:     # already reported while reading the YAML
            return
        self.problems.append(Problem(self.doc.path, self.doc.line(path), format_path(path),
                                     message, fix))

    def run(self) -> None:
        data = self.doc.data
        env = data.get("env")
        if isinstance(env, str) and env != self.env:
            self.add(("env",), f"env '{env}' does not match the file name {self.doc.path.name}",
                     f"write `env: {self.env}`, or rename the file to {env}.yml")
        hosts = _mapping(data.get("hosts"))
        groups = _mapping(data.get("groups"))
        self.check_vars(data.get("vars"), ("vars",))
        used: set = set()
        for gname, group in groups.items():
            if gname in hosts:
                self.add(("groups", gname), f"group '{gname}' has the same name as a host",
                         "rename the group or the host: --limit takes both kinds of names")
            group = _mapping(group)
            self.check_group_hosts(gname, group.get("hosts"), hosts, used)
            self.check_group_roles(gname, group.get("roles"))
            self.check_vars(group.get("vars"), ("groups", gname, "vars"))
        for hname, host in hosts.items():
            if hname not in used and isinstance(hname, str):
                self.add(("hosts", hname), f"host '{hname}' is in no group",
                         "add it to the `hosts:` list of a group (a host no group uses is "
                         "almost always a typo), or remove it")
            self.check_vars(_mapping(host).get("vars"), ("hosts", hname, "vars"))
        self.check_addresses(hosts, _mapping(data.get("ssh")).get("port"))
        for aname, app in _mapping(data.get("apps")).items():
            app = _mapping(app)
            db_host = _mapping(app.get("database")).get("host")
            if isinstance(db_host, str) and db_host not in hosts:
                self.add(("apps", aname, "database", "host"), f"app '{aname}' keeps its "
                         f"database on host '{db_host}', which the inventory does not define",
                         f"name one of the hosts: {', '.join(map(str, hosts))}")
            if app.get("migrate") and not app.get("database"):
                self.add(("apps", aname, "migrate"), f"app '{aname}' migrates but names no "
                         "database to back up first", "add `database: {host: db1, name: app}`")
            green, port = app.get("green_port"), app.get("port", 3000)
            if green is not None and app.get("strategy") != "blue-green":
                self.add(("apps", aname, "green_port"), f"app '{aname}' has a green_port but "
                         f"its strategy is {app.get('strategy', 'reload')}",
                         "add `strategy: blue-green`, or remove green_port")
            elif app.get("strategy") == "blue-green" and green in (None, port) \
                    and port == 65535:
                self.add(("apps", aname, "port"), f"app '{aname}': the green colour's port "
                         "would be port + 1 = 65536", "give `green_port` another port")
            elif app.get("strategy") == "blue-green" and green == port:
                self.add(("apps", aname, "green_port"), f"app '{aname}': blue and green both "
                         f"listen on {port}", "give green_port another port than `port`")
            group = app.get("group")
            if isinstance(group, str) and group not in groups:
                self.add(("apps", aname, "group"), f"app '{aname}' runs on group '{group}', "
                         "which the inventory does not define",
                         f"name one of the groups: {', '.join(map(str, groups)) or '(none)'}")

    def check_group_hosts(self, gname: str, listed: Any, hosts: dict, used: set) -> None:
        if not isinstance(listed, list):
            return
        first: dict[str, int] = {}
        for i, hname in enumerate(listed):
            if not isinstance(hname, str):
                continue
            path = ("groups", gname, "hosts", i)
            if hname in first:
                self.add(path, f"host '{hname}' is listed twice in group '{gname}' "
                               f"(first at line {self.doc.line(path[:-1] + (first[hname],))})",
                         "remove one of them")
                continue
            first[hname] = i
            if hname in hosts:
                used.add(hname)
                continue
            known = [h for h in hosts if isinstance(h, str)]
            close = difflib.get_close_matches(hname, known, n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'? " if close else ""
            fix += f"define '{hname}' under `hosts:`, or use a defined host: {', '.join(known)}"
            self.add(path, f"unknown host '{hname}' in group '{gname}'", fix)

    def check_group_roles(self, gname: str, listed: Any) -> None:
        if not isinstance(listed, list):
            return
        seen: set[str] = set()
        for i, rname in enumerate(listed):
            if not isinstance(rname, str):
                continue
            path = ("groups", gname, "roles", i)
            if rname in seen:
                self.add(path, f"role '{rname}' is listed twice in group '{gname}'",
                         "remove the second one: a role is applied once per host")
                continue
            seen.add(rname)
            if rname in self.roles:
                continue
            close = difflib.get_close_matches(rname, list(self.roles), n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'? " if close else ""
            fix += (f"available roles: {', '.join(self.roles)}" if self.roles else
                    "no roles were found (a role is a folder roles/<name>/ with a defaults.yml)")
            self.add(path, f"unknown role '{rname}'", fix)

    def check_vars(self, vars_: Any, path: KeyPath) -> None:
        if not isinstance(vars_, dict):
            return
        for key, value in vars_.items():
            if not isinstance(key, str):
                continue
            role = self.declared.get(key)
            if role is None:
                gone = next((r for r in self.roles.values() if key in r.retired), None)
                if gone is not None:
                    self.add(path + (key,), f"var '{key}' is no longer a var of role '{gone.name}'",
                             gone.retired[key])
                else:
                    self.add(path + (key,), f"unknown var '{key}'", self.unknown_var_fix(key))
                continue
            default = role.defaults[key]
            if not _type_fits(default, value):
                where = display_path(role.defaults_file)
                if key in role.lines:
                    where += f":{role.lines[key]}"
                shown = "!vault " + default.name if isinstance(default, VaultRef) else repr(default)
                self.add(path + (key,),
                         f"'{key}' must be {_KIND_TEXT.get(_kind(default), _kind(default))} "
                         f"(its default in {where} is {shown}), "
                         f"got {describe(value, reveal=_kind(default) != 'secret')}",
                         _type_fix(key, default, value, self.doc.raw_bools.get(path + (key,))))

    def unknown_var_fix(self, key: str) -> str:
        close = difflib.get_close_matches(key, list(self.declared), n=1, cutoff=0.6)
        fix = f"did you mean '{close[0]}'? " if close else ""
        owner = next((r for r in sorted(self.roles, key=len, reverse=True)
                      if key.startswith(r + "_")), None)
        if owner is not None:
            fix += (f"role '{owner}' declares: {', '.join(self.roles[owner].defaults) or 'nothing'}; ")
        fix += ("every var must be declared, with its default, in the defaults.yml of a role "
                "(roles/<role>/defaults.yml, prefixed <role>_)")
        return fix

    def check_addresses(self, hosts: dict, default_port: Any) -> None:
        if default_port is None or not _is_int(default_port):
            default_port = 22
        seen: dict[tuple, str] = {}
        for hname, host in hosts.items():
            host = _mapping(host)
            address, port = host.get("address"), host.get("port", default_port)
            if not isinstance(address, str) or not is_valid_address(address) or not _is_int(port):
                continue
            if port is None:
                port = default_port
            key = (_normal_address(address), port)
            if key in seen:
                other = seen[key]
                self.add(("hosts", hname, "address"),
                         f"host '{hname}' has the same address and port as '{other}' "
                         f"({address}:{port}, line {self.doc.line(('hosts', other))})",
                         "each entry must be a distinct server: fix the address or port, or "
                         "remove the duplicate and list the one host in several groups")
            else:
                seen[key] = hname


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _is_int(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _normal_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.lower().rstrip(".")


# --------------------------------------------------------------------------------------------
# The Inventory the rest of the tool uses
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Jump:
    """A bastion to connect through. Host-like: same key and timeouts as the hosts behind it."""

    address: str
    port: int
    user: str
    key: Path | None
    connect_timeout: float

    @property
    def name(self) -> str:
        return f"jump {self.address}"


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    port: int
    user: str
    bootstrap_user: str | None
    key: Path | None
    jump: Jump | None
    connect_timeout: float
    command_timeout: float
    sudo_password: Any = field(default=None, compare=False, repr=False)  # VaultRef, Secret, None
    groups: tuple[str, ...] = ()                                          # file order
    vars: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # own vars only
    line: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class App:
    """An app as `invoke deploy` ships it; see AppSpec for each field's meaning."""
    name: str
    source: str                      # a folder (absolute) or a URL
    ref: str
    group: str
    port: int
    health_path: str
    health_timeout: float
    shared: tuple[str, ...]
    keep: int
    line: int | None = None
    migrate: tuple[str, ...] | None = None
    migrate_down: tuple[str, ...] | None = None
    database: tuple[str, str] | None = None      # (host, database name)
    canary_hold: float = 60.0
    canary_max_5xx: float = 1.0                  # percent
    strategy: str = "reload"                     # or "blue-green"
    green_port: int | None = None                # blue-green: green's port (blue: `port`)

    @property
    def colours(self) -> dict[str, int]:
        """blue-green: each colour's port ({} for reload)."""
        return {"blue": self.port, "green": self.green_port} if self.green_port else {}


@dataclass(frozen=True)
class Group:
    name: str
    hosts: tuple[str, ...]
    roles: tuple[str, ...]
    vars: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _tree_map(value: Any, fn) -> Any:
    """Copy dicts/lists/tuples, applying fn to every other value."""
    if isinstance(value, dict):
        return {k: _tree_map(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree_map(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_tree_map(v, fn) for v in value)
    return fn(value)


def _refs_in(value: Any, out: list[VaultRef]) -> None:
    _tree_map(value, lambda v: out.append(v) if isinstance(v, VaultRef) else None)


@dataclass(frozen=True)
class VarLayer:
    """One level of var precedence for a host: where its vars are written and on which line."""
    label: str
    file: Path
    vars: dict[str, Any]
    line: Callable[[str], int | None]
    path: tuple = ()                 # where in the inventory: ("groups", "app", "vars"); () for defaults


@dataclass(frozen=True)
class Inventory:
    env: str
    path: Path
    known_hosts: Path
    hosts: dict[str, Host]              # file order
    groups: dict[str, Group]            # file order
    vars: dict[str, Any]                # env-level vars
    roles: dict[str, RoleInfo]          # the roles the groups use
    lines: dict[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)
    apps: dict[str, App] = field(default_factory=dict, compare=False)    # file order

    def app(self, name: str | None) -> App:
        """The app `name` (None: the only one), or InputError naming the choices."""
        if name is None and len(self.apps) == 1:
            return next(iter(self.apps.values()))
        if name in self.apps:
            return self.apps[name]
        what = (f"no app '{name}' in {display_path(self.path)}" if name else
                f"{display_path(self.path)} has {len(self.apps)} apps: name one with --app")
        fix = (f"choose from: {', '.join(self.apps)}" if self.apps else
               "add an `apps:` section to the inventory (see provisioner/inventory.py)")
        raise InputError(Problem(self.path, self.lines.get(("apps",)), "--app" if name else "apps",
                                 what, fix))

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host '{name}' in {display_path(self.path)}") from None

    def roles_for(self, name: str) -> list[str]:
        """The host's roles: its groups' roles in group file order, first occurrence kept."""
        host = self._host(name)
        out: list[str] = []
        for gname in host.groups:
            out += [r for r in self.groups[gname].roles if r not in out]
        return out

    def var_layers(self, name: str) -> list[VarLayer]:
        """The host's vars by precedence, lowest first: role defaults < env vars < group vars
        (file order) < host vars."""
        host = self._host(name)

        def layer(label: str, vars: dict, *path: str) -> VarLayer:
            return VarLayer(label, self.path, vars, lambda var: self.lines.get((*path, var)), path)
        out = [VarLayer(f"role {r} defaults", self.roles[r].defaults_file, self.roles[r].defaults,
                        self.roles[r].lines.get) for r in self.roles_for(name)]
        out.append(layer("env vars", self.vars, "vars"))
        out += [layer(f"group {g} vars", self.groups[g].vars, "groups", g, "vars") for g in host.groups]
        out.append(layer(f"host {name} vars", host.vars, "hosts", name, "vars"))
        return out

    def hostvars(self, name: str) -> dict[str, Any]:
        """Merged vars (see var_layers: a later layer wins). A copy."""
        merged: dict[str, Any] = {}
        for layer in self.var_layers(name):
            merged.update(layer.vars)
        return _tree_map(merged, lambda v: v)

    def where(self, host: str, key: str) -> tuple[Path, int | None, str]:
        """Where the value of `key` that `host` gets was set: (file, line, key path). `key` is a
        var (or a path into one, "harden_admin_users[0].name": the var is its first word), or
        an inventory key path ("ssh.user")."""
        var = re.match(r"[A-Za-z0-9_]*", key).group()
        for layer in reversed(self.var_layers(host)):        # the one that wins
            if var in layer.vars:
                return layer.file, layer.line(var), ".".join(layer.path + (key,))
        path = tuple(key.split("."))
        return self.path, self.lines.get(("hosts", host) + path, self.lines.get(path)), key

    def hosts_in(self, group: str) -> list[Host]:
        """The hosts of a group, in the group's list order."""
        if group not in self.groups:
            raise InputError(self._unknown([group], "group", list(self.groups)))
        return [self.hosts[h] for h in self.groups[group].hosts]

    def select(self, limit: str | None) -> list[Host]:
        """Hosts named by `limit` (comma-separated host and group names), in file order.

        None selects every host. An empty limit is an error rather than "everything", so an
        empty variable in a script never widens a run to all hosts.
        """
        if limit is None:
            return list(self.hosts.values())
        names = [n.strip() for n in limit.split(",") if n.strip()]
        if not names:
            raise InputError(Problem(None, None, "--limit", "the limit is empty",
                                     "name hosts or groups (comma-separated), or leave out "
                                     "--limit to run on every host"))
        unknown = [n for n in names if n not in self.hosts and n not in self.groups]
        if unknown:
            raise InputError(self._unknown(unknown, "host or group",
                                           list(self.hosts) + list(self.groups)))
        chosen: set[str] = set()
        for n in names:
            chosen.update(self.groups[n].hosts if n in self.groups else [n])
        return [h for name, h in self.hosts.items() if name in chosen]

    def _unknown(self, names: list[str], what: str, known: list[str]) -> list[Problem]:
        out = []
        for n in names:
            close = difflib.get_close_matches(n, known, n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'? " if close else ""
            fix += (f"hosts: {', '.join(self.hosts)}; groups: {', '.join(self.groups)}")
            out.append(Problem(self.path, None, "--limit" if "host" in what else None,
                               f"no {what} named '{n}' in env '{self.env}'", fix))
        return out

    def known_hosts_problems(self, hosts: Iterable[Host]) -> list[Problem]:
        """What strict host-key checking would refuse for `hosts` (and their jump hosts), found
        without a server: a missing or unreadable known_hosts file, lines that are not host
        keys, hosts with no key on record."""
        import paramiko
        path, shown = self.known_hosts, display_path(self.known_hosts)
        trust = f"`invoke hosts.trust --env {self.env}` shows each key's fingerprint and records it"
        where = (self.path, self.lines.get(("known_hosts",)), "known_hosts")
        if not path.is_file():
            return [Problem(*where, f"{shown} does not exist", f"create it: {trust}")]
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            return [Problem(*where, f"cannot read {shown}: {e}", "make it a readable text file")]
        problems, keys = [], paramiko.HostKeys()
        for n, line in enumerate(text.splitlines(), 1):
            # markers (@cert-authority, @revoked) are OpenSSH's; the connections here ignore them
            if not line.strip() or line.lstrip().startswith(("#", "@")):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, n)
            except Exception:                          # bad base64, a truncated key ...
                entry = None
            if entry is None:
                fields = line.split()
                what = (f"an unreadable {fields[1]} key" if len(fields) >= 3 else
                        "not a host key line (names, key type, base64 key)")
                problems.append(Problem(path, n, None, what, f"remove the line, then run {trust}"))
                continue
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
        wanted: dict[str, tuple[str, int | None, str]] = {}
        for h in hosts:
            if h.jump is not None:
                wanted.setdefault(known_host_name(h.jump.address, h.jump.port),
                                  (f"jump host {h.jump.address}", self.lines.get(("ssh", "jump")),
                                   "ssh.jump"))
            wanted.setdefault(known_host_name(h.address, h.port),
                              (f"host {h.name}", h.line, f"hosts.{h.name}"))
        for name, (what, line, key) in wanted.items():
            if keys.lookup(name) is None:
                problems.append(Problem(self.path, line, key,
                                        f"no key for {what} ({name}) in {shown}: strict host-key "
                                        "checking will refuse to connect",
                                        f"{trust} (add --limit to trust only some hosts)"))
        return problems

    def vault_refs(self) -> set[str]:
        """Names of every secret referenced by the inventory (and the defaults of its roles)."""
        return {ref.name for ref in self._refs()}

    def _refs(self) -> list[VaultRef]:
        refs: list[VaultRef] = []
        _refs_in(self.vars, refs)
        for g in self.groups.values():
            _refs_in(g.vars, refs)
        for h in self.hosts.values():
            _refs_in(h.vars, refs)
            _refs_in(h.sudo_password, refs)
        for r in self.roles.values():
            _refs_in(r.defaults, refs)
        return refs

    def resolve(self, secrets: Mapping[str, object], missing_vault: str | None = None) -> Inventory:
        """A new Inventory with every VaultRef replaced by `secrets[name]`.

        Raises InputError naming each secret the vault does not hold (with where it is used);
        `missing_vault` names the vault file when it does not exist at all.
        """
        missing: dict[str, list[VaultRef]] = {}
        for ref in self._refs():
            if ref.name not in secrets:
                missing.setdefault(ref.name, []).append(ref)
        if missing:
            problems = []
            for name, refs in sorted(missing.items()):
                first = refs[0]
                also = f" (used {len(refs)} times)" if len(refs) > 1 else ""
                message = (f"secret '{name}' is not in the vault of env '{self.env}'{also}"
                           if missing_vault is None else
                           f"secret '{name}'{also} has no vault: {missing_vault} does not exist")
                problems.append(Problem(
                    first.file, first.line, first.key, message,
                    f"add it: `invoke vault.set --env {self.env} {name}`, or correct the name "
                    "after !vault"))
            raise InputError(problems)

        def sub(value: Any) -> Any:
            return _tree_map(value, lambda v: secrets[v.name] if isinstance(v, VaultRef) else v)

        return replace(
            self,
            vars=sub(self.vars),
            groups={n: replace(g, vars=sub(g.vars)) for n, g in self.groups.items()},
            hosts={n: replace(h, vars=sub(h.vars), sudo_password=sub(h.sudo_password))
                   for n, h in self.hosts.items()},
            roles={n: replace(r, defaults=sub(r.defaults)) for n, r in self.roles.items()},
        )


def known_host_name(address: str, port: int) -> str:
    """A host's name in known_hosts: `[address]:port` unless the port is 22."""
    return address if port == 22 else f"[{address}]:{port}"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def available_envs(root: Path | None = None) -> list[str]:
    inv_dir = Path(root or REPO_ROOT) / "inventories"
    return sorted(p.stem for p in inv_dir.glob("*.yml")) if inv_dir.is_dir() else []


def load_inventory(env: str, root: Path | None = None, roles_root: Roots = None) -> Inventory:
    """Load and validate `<root>/inventories/<env>.yml` (root: the repo; roles: `<root>/roles`)."""
    root = Path(root) if root is not None else REPO_ROOT
    if not isinstance(env, str) or not ENV_RE.match(env):
        raise InputError(Problem(None, None, "--env", f"invalid env name {env!r}: an env name is "
                                 "lowercase letters, digits, '-' and '_', starting with a letter "
                                 "or digit (it names inventories/<env>.yml)",
                                 f"use one of: {', '.join(available_envs(root)) or '(none)'}"))
    path = root / "inventories" / f"{env}.yml"
    if not path.is_file():
        envs = available_envs(root)
        close = difflib.get_close_matches(env, envs, n=1, cutoff=0.6)
        fix = f"did you mean '{close[0]}'? " if close else ""
        if path.with_suffix(".yaml").is_file():
            fix += f"rename {display_path(path.with_suffix('.yaml'))} to {path.name}; "
        fix += (f"existing envs: {', '.join(envs)}" if envs else
                f"no inventories found in {display_path(path.parent)}")
        raise InputError(Problem(path, None, "--env",
                                 f"no inventory for env '{env}': {display_path(path)} does not exist",
                                 fix))
    return load_inventory_file(path, roles_root if roles_root is not None else root / "roles")


def load_inventory_file(path: Path, roles_root: Roots = None) -> Inventory:
    """Load and validate one inventory file; its env is the file's stem."""
    path = Path(path).absolute()
    problems: list[Problem] = []
    roles = discover_roles(roles_root, problems)
    doc = read_yaml(path, problems)
    if doc is not None and not isinstance(doc.data, dict):
        problems.append(Problem(path, doc.line(()), None,
                                "expected a mapping with env, known_hosts, ssh, hosts and groups, "
                                f"got {'an empty file' if doc.data is None else describe(doc.data)}",
                                "see the format in provisioner/inventory.py or inventories/local.yml"))
    if doc is None or not isinstance(doc.data, dict):
        raise InputError(problems)
    spec = None
    try:
        spec = InventorySpec.model_validate(doc.data)
    except ValidationError as e:
        problems.extend(_problems_from_validation(e, doc))
    _Checker(doc, path.stem, roles, problems).run()
    if problems or spec is None:
        raise InputError(list(dict.fromkeys(problems)))
    return _build(spec, doc, roles)


def _rel(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _build(spec: InventorySpec, doc: YamlDoc, roles: dict[str, RoleInfo]) -> Inventory:
    base = doc.path.parent
    ssh = spec.ssh
    key = _rel(base, ssh.key) if ssh.key else None
    jump = None
    if ssh.jump is not None:
        jump = Jump(ssh.jump.address, ssh.jump.port, ssh.jump.user or ssh.user, key,
                    ssh.connect_timeout)
    groups = {name: Group(name, tuple(g.hosts), tuple(g.roles), dict(g.vars))
              for name, g in spec.groups.items()}
    hosts = {}
    for name, h in spec.hosts.items():
        hosts[name] = Host(
            name=name, address=h.address,
            port=h.port if h.port is not None else ssh.port,
            user=h.user or ssh.user,
            bootstrap_user=h.bootstrap_user or ssh.bootstrap_user,
            key=key, jump=jump,
            connect_timeout=ssh.connect_timeout, command_timeout=ssh.command_timeout,
            sudo_password=ssh.sudo_password,
            groups=tuple(g for g in groups if name in groups[g].hosts),
            vars=dict(h.vars), line=doc.lines.get(("hosts", name)))
    used_roles = {r for g in groups.values() for r in g.roles}
    return Inventory(
        env=spec.env, path=doc.path, known_hosts=_rel(base, spec.known_hosts),
        hosts=hosts, groups=groups, vars=dict(spec.vars),
        roles={n: r for n, r in roles.items() if n in used_roles}, lines=dict(doc.lines),
        apps={name: App(name, a.source if "://" in a.source or a.source.startswith("git@")
                        else str(_rel(base, a.source)), a.ref, a.group, a.port, a.health_path,
                        a.health_timeout, tuple(a.shared), a.keep, doc.lines.get(("apps", name)),
                        tuple(a.migrate) if a.migrate else None,
                        tuple(a.migrate_down) if a.migrate_down else None,
                        (a.database.host, a.database.name) if a.database else None,
                        a.canary_hold, a.canary_max_5xx, a.strategy,
                        (a.green_port or a.port + 1) if a.strategy == "blue-green" else None)
              for name, a in spec.apps.items()})

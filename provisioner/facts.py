"""Facts: what resources ask the agent for, and small pure accessors over its answer.

A resource's .facts() returns a request fragment such as {"files": ["/etc/x"]};
merge_requests() unions the fragments of a role into ONE request for the agent (see
provisioner/agent.py for the formats). Facts wraps the answer; the ops read it only through
these accessors. Asking for a fact that was not gathered is a programming error (KeyError
naming the missing fact), never a silent "absent".

Facts.overlay() returns new Facts with part of the answer replaced: ops.plan_all() uses it to
let a resource see what earlier resources of the same role will have done (a file written
before a line is edited in it, a group created before a user joins it).
"""
from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Every fact kind, declared here once: kind -> (what a request lists, the Facts accessor).
# Its collector is `fact_<kind>` in provisioner/remote/agent.py (tests/test_facts_kinds.py
# holds the three together). To add one: a line here, the collector, the accessor.
KINDS = {
    "files": ("paths", "file"),
    "packages": ("package names", "package"),
    "package_candidates": ("package names", "candidate"),
    "services": ("unit names", "service"),
    "users": ("user names", "user"),
    "groups": ("group names", "group"),
    "sysctl": ("keys", "sysctl"),
    "checks": ("argv lists, or {argv, stdin}", "check"),
    "dirs": ("directory paths", "dir"),
    "hashes": ("file paths", "sha256"),
    "certs": ("PEM file paths", "cert"),
    "timers": ("timer names", "timer"),
    "http": ("http:// URLs on the loopback", "http"),
    "last_lines": ("text file paths", "last_line"),
}
LIST_KINDS = tuple(KINDS)


def check_key(argv: Iterable[str]) -> str:
    """Key of an `unless` check in the agent's answer (same as remote/agent.py check_key)."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def merge_requests(fragments: Iterable[Mapping[str, Any]]) -> dict:
    """Union of request fragments: lists deduplicated in first-seen order; os always on."""
    out: dict[str, list] = {}
    seen: dict[str, dict] = {}
    for frag in fragments:
        for kind, keys in (frag or {}).items():
            if kind == "os":
                continue
            if kind not in LIST_KINDS:
                raise ValueError(f"unknown fact kind {kind!r}")
            bucket = out.setdefault(kind, [])
            s = seen.setdefault(kind, {})
            for k in keys:
                if isinstance(k, Mapping):       # a check with input: {"argv": [..], "stdin": str}
                    argv = list(k["argv"])
                    item = argv if k.get("stdin") is None else {"argv": argv, "stdin": k["stdin"]}
                    marker = tuple(argv)
                else:
                    item = list(k) if isinstance(k, (list, tuple)) else k
                    marker = tuple(k) if isinstance(k, (list, tuple)) else k
                if marker not in s:
                    s[marker] = item
                    bucket.append(item)
                elif s[marker] != item:          # answers are keyed by argv alone
                    raise ValueError(f"two {kind} run `{check_key(marker)}` with different "
                                     "stdin; give them different argv")
    return {"os": True, **out}


@dataclass(frozen=True)
class FileFact:
    path: str
    exists: bool
    type: str | None = None        # file | dir | link | other
    mode: str | None = None        # "0644"
    owner: str | None = None
    group: str | None = None
    sha256: str | None = None
    content: str | None = None     # UTF-8 text up to 256 KiB, else None
    target: str | None = None      # for links
    size: int | None = None
    error: str | None = None
    predicted: bool = False        # from an earlier change's .expect(), not read on the server

    @classmethod
    def from_json(cls, path: str, d: Mapping | None) -> "FileFact":
        d = d or {"exists": False}
        if d.get("exists") is None or (d.get("exists") and d.get("error")):
            raise FactError(f"cannot read {path} on the server: {d.get('error')}")
        return cls(path=path, exists=bool(d.get("exists")), type=d.get("type"),
                   mode=d.get("mode"), owner=d.get("owner"), group=d.get("group"),
                   sha256=d.get("sha256"), content=d.get("content"), target=d.get("target"),
                   size=d.get("size"), error=d.get("error"),
                   predicted=bool(d.get("predicted")))

    def describe(self) -> str:
        if not self.exists:
            return "absent"
        if self.type == "link":
            return f"a symlink to {self.target}"
        return {"file": "a file", "dir": "a directory"}.get(self.type or "", "a special file")


class FactError(RuntimeError):
    """A fact the plan needs could not be read on the server."""


def merge_fragments(base: Mapping, over: Mapping) -> dict:
    """`over` merged into a copy of `base`; only the touched paths are copied. A mapping
    value merges into a mapping; anything else (including a file fact's full dict given as
    a leaf by the ops) replaces. Merging two .expect() fragments gives one that does both."""
    new = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping) and not v.get("__replace__"):
            new[k] = merge_fragments(base[k], v)
        else:
            new[k] = copy.deepcopy({a: b for a, b in v.items() if a != "__replace__"}
                                   if isinstance(v, Mapping) else v)
    return new


class Facts:
    """Read-only view over the agent's facts answer (the value of its "facts" key)."""

    def __init__(self, data: Mapping[str, Any]):
        self._d = data

    @property
    def raw(self) -> Mapping[str, Any]:
        return self._d

    def _kind(self, kind: str) -> Mapping[str, Any]:
        v = self._d.get(kind)
        if v is None:
            err = (self._d.get("errors") or {}).get(kind)
            if err:
                raise FactError(f"the agent could not gather {kind}: {err}")
            raise KeyError(f"facts of kind {kind!r} were not gathered (missing from .facts())")
        return v

    def _get(self, kind: str, key: str, container: Mapping | None = None) -> Any:
        c = self._kind(kind) if container is None else container
        if key not in c:
            raise KeyError(f"fact not gathered: {kind} {key!r} (missing from .facts())")
        return c[key]

    # --- accessors ----------------------------------------------------------------------
    @property
    def os(self) -> Mapping[str, Any]:
        return self._d.get("os") or {}

    def file(self, path: str) -> FileFact:
        return FileFact.from_json(path, self._get("files", path))

    def package(self, name: str) -> str | None:
        """Installed version, or None when not installed."""
        pk = self._kind("packages")
        return self._get("packages", name, pk.get("installed") or {})

    @property
    def apt_lists_age(self) -> int | None:
        """Seconds since apt's package lists were last refreshed; None if never."""
        return self._kind("packages").get("lists_age")

    def candidate(self, name: str) -> str | None:
        return self._get("package_candidates", name)

    def service(self, unit: str) -> Mapping[str, Any] | None:
        s = self._get("services", unit)
        if s and s.get("error"):
            raise FactError(f"cannot read the state of {unit}: {s['error']}")
        return s

    def user(self, name: str) -> Mapping[str, Any] | None:
        return self._get("users", name)

    def group(self, name: str) -> Mapping[str, Any] | None:
        return self._get("groups", name)

    def sysctl(self, key: str) -> Mapping[str, Any]:
        return self._get("sysctl", key)

    def check(self, argv: Iterable[str]) -> int:
        return self._get("checks", check_key(argv))

    def dir(self, path: str) -> Mapping[str, Mapping[str, Any]] | None:
        """{name: {type, target, mtime}} of a directory's entries; None when it is absent."""
        return self._ok("dirs", path, lambda d: d["entries"])

    def sha256(self, path: str) -> str | None:
        """sha256 of a regular file (any size); None when it is not one."""
        return self._ok("hashes", path)

    def cert(self, path: str) -> Mapping[str, Any] | None:
        """{subject: {commonName..}, sans: [..], serial, not_after, not_before} of a PEM
        certificate file; None when the file is absent."""
        return self._ok("certs", path)

    def timer(self, name: str) -> Mapping[str, Any] | None:
        """{active, unit, last, next, result, exit_status} of a systemd timer; None when
        systemd does not know it."""
        return self._ok("timers", name)

    def http(self, url: str) -> Mapping[str, Any]:
        """{status, headers, body (first KB)} of a GET on the server's loopback, or
        {error} when nothing answered: an answer either way, a health gate decides."""
        return self._get("http", url)

    def last_line(self, path: str) -> str | None:
        """The last non-empty line of a text file (read from its end); None when the file is
        absent or empty."""
        return self._ok("last_lines", path)

    def _ok(self, kind: str, key: str, pick=lambda v: v) -> Any:
        v = self._get(kind, key)
        if isinstance(v, Mapping) and v.get("error"):
            raise FactError(f"cannot read {key} on the server: {v['error']}")
        return None if v is None else pick(v)

    # --- prediction -----------------------------------------------------------------------
    def overlay(self, fragment: Mapping[str, Any] | None) -> "Facts":
        """New Facts with `fragment` merged over this answer (this one is unchanged).
        A mapping carrying "__replace__": True replaces instead of merging (a predicted file
        fact must not keep the old "target" of the link it replaced)."""
        if not fragment:
            return self
        return Facts(merge_fragments(self._d, fragment))

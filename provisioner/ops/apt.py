"""Debian packages and apt repositories.

    apt.packages(names, state="present", update_cache_max_age=3600,
                 install_recommends=False, purge=False)
    apt.repository(name, uri, suites, components=("main",), key_b64=None, key_url=None,
                   key_sha256=None, arch=None, types=("deb",), update=True)

packages: ONE apt-get call for all the names of a resource; non-interactive, waits for the
dpkg lock (DPkg::Lock::Timeout=300) instead of failing, keeps locally changed conffiles
(--force-confdef/--force-confold). A name may pin a version: "nginx=1.22.1-9".
The package lists are refreshed first (apt-get update) only when something must be installed
or upgraded and they are older than update_cache_max_age seconds (or were never fetched).
state "latest" compares with apt-cache's candidate; when the lists are stale it plans a
refresh-then-upgrade change, since the candidate cannot be known without it.

repository: a deb822 file /etc/apt/sources.list.d/<name>.sources whose Signed-By points at
/etc/apt/keyrings/<name>.asc (armored key) or .gpg (binary key), which this op also writes. A
legacy /etc/apt/sources.list.d/<name>.list is removed. Any change ends with apt-get update,
unless update=False: for a repository set up ahead of its use (nothing installed from it in this
run, e.g. its host is not reachable yet); apt.packages then refreshes the lists itself when they
are stale (give it update_cache_max_age=0 to refresh whenever it installs).
key_b64 is compared by content; key_url is fetched on the server (stdlib urllib) and, unless
key_sha256 pins it, an existing keyring is trusted as is.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Sequence

from provisioner import humanize
from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import _base as b
from provisioner.templating import Rendered

PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?\Z")
REPO_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*\Z")
LOCK = ["-o", "DPkg::Lock::Timeout=300"]
APT_GET = ["apt-get", "-q", "-y", *LOCK]
CONFFILES = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
KEYRINGS = "/etc/apt/keyrings"
SOURCES = "/etc/apt/sources.list.d"


# the version expect() gives a package a step before installs, when no candidate says which:
# check mode plans the roles after the batch against it (apt_batch.foresee)
FORESEEN = "(installed by this run)"
STAMP = "/var/lib/apt/periodic/provisioner-update-stamp"   # remote/agent.py APT_STAMP
UPDATE_TIMEOUT = 420     # seconds: the 300 s lock wait plus a slow mirror


def update_steps() -> tuple[dict, ...]:
    """apt-get update, then our stamp: apt leaves unchanged lists' mtimes alone, so without it
    the lists of a quiet repository would look stale forever (see agent apt_lists_age)."""
    # --error-on=any: a source that fails to update (a key that does not verify its signature,
    # an unreachable repository) fails the step instead of a warning apt exits 0 after, which
    # would leave the host on the previous, stale index files.
    # A timeout and a second attempt: an http method that loses its proxy's connection
    # mid-file can wait forever (seen behind apt-cacher-ng). Longer than the lock wait above.
    return (b.run([*APT_GET, "update", "--error-on=any"], timeout=UPDATE_TIMEOUT, attempts=2),
            b.run(["touch", STAMP], ok=(0, 1)))


def _age(seconds: int | None) -> str:
    return "never fetched" if seconds is None else f"{humanize.age(seconds)} old"


@dataclass(frozen=True)
class Packages:
    names: tuple[str, ...]
    state: str = "present"
    update_cache_max_age: int | None = 3600
    install_recommends: bool = False
    purge: bool = False

    @property
    def id(self) -> str:
        return "apt " + " ".join(self.names)

    def facts(self) -> dict:
        frag = {"packages": list(self.names)}
        if self.state == "latest":
            frag["package_candidates"] = list(self.names)
        return frag

    def _stale(self, facts: Facts) -> bool:
        age = facts.apt_lists_age
        return age is None or (self.update_cache_max_age is not None
                               and age > self.update_cache_max_age)

    def _install(self, names: Sequence[str]) -> dict:
        rec = [] if self.install_recommends else ["--no-install-recommends"]
        return b.run([*APT_GET, *CONFFILES, "install", *rec, *names])

    def plan(self, facts: Facts) -> list[Change | Noop]:
        have = {n: facts.package(n) for n in self.names}
        if self.state == "absent":
            gone = [n for n in self.names if have[n] is not None]
            if not gone:
                return [Noop(self.id, "already absent: " + ", ".join(self.names))]
            argv = [*APT_GET, "purge" if self.purge else "remove", *gone]
            return [Change(self.id, "purge" if self.purge else "remove",
                           "installed: " + ", ".join(f"{n} {have[n]}" for n in gone),
                           (b.run(argv),))]
        if self.state == "latest":
            if self._stale(facts):
                steps = update_steps() + (self._install([n.split("=")[0] for n in self.names]),)
                return [Change(self.id, "upgrade",
                               f"package lists are {_age(facts.apt_lists_age)} (max "
                               f"{self.update_cache_max_age} s): refresh, then install or "
                               "upgrade to the newest candidate", steps)]
            todo, why = [], []
            for n in self.names:
                cand = facts.candidate(n)
                if have[n] is None:
                    todo.append(n)
                    why.append(f"{n} absent" + (f" (candidate {cand})" if cand else ""))
                elif cand is not None and cand != have[n]:
                    todo.append(n)
                    why.append(f"{n} {have[n]} != candidate {cand}")
            if not todo:
                return [Noop(self.id, "already latest: " + ", ".join(
                    f"{n} {have[n]}" for n in self.names))]
            return [Change(self.id, "upgrade", "; ".join(why), (self._install(todo),))]
        # present (a pinned "name=version" must match that version)
        todo, why = [], []
        for n in self.names:
            pinned = n.split("=", 1)[1] if "=" in n else None
            if have[n] is None:
                todo.append(n)
                why.append(f"{n} absent")
            elif pinned is not None and have[n] != pinned:
                todo.append(n)
                why.append(f"{n.split('=')[0]} {have[n]} != {pinned}")
        if not todo:
            return [Noop(self.id, "already present: " + ", ".join(
                f"{n.split('=')[0]} {have[n]}" for n in self.names))]
        steps = (update_steps() if self._stale(facts) else ()) + (self._install(todo),)
        why_s = ", ".join(why)
        if self._stale(facts):
            why_s += f" (package lists {_age(facts.apt_lists_age)}: refreshing first)"
        return [Change(self.id, "install", why_s, steps)]

    def expect(self, facts: Facts) -> dict:
        inst = {}
        for n in self.names:
            if self.state == "absent":
                inst[n] = None
            elif "=" in n:
                inst[n] = n.split("=", 1)[1]
            else:
                cand = None
                if self.state == "latest":
                    try:
                        cand = facts.candidate(n)
                    except KeyError:
                        cand = None
                inst[n] = cand or facts.package(n) or FORESEEN
        frag: dict = {"packages": {"installed": inst}}
        if self.state != "absent" and any(isinstance(c, Change) for c in self.plan(facts)) \
                and self._stale(facts):
            frag["packages"]["lists_age"] = 0
        return frag


def packages(names: Sequence[str] | str, *, state: str = "present",
             update_cache_max_age: int | None = 3600, install_recommends: bool = False,
             purge: bool = False) -> Packages:
    if isinstance(names, str):
        names = [names]
    names = tuple(dict.fromkeys(names))
    if not names:
        raise ValueError("apt.packages needs at least one package name")
    bad = [n for n in names if not isinstance(n, str) or not PKG_RE.match(n)]
    if bad:
        raise ValueError(f"bad package name(s): {bad}")
    if state not in ("present", "absent", "latest"):
        raise ValueError(f"state must be present, absent or latest, not {state!r}")
    if state != "present" and any("=" in n for n in names):
        raise ValueError("version pins (name=version) only go with state='present'")
    if update_cache_max_age is not None and update_cache_max_age < 0:
        raise ValueError("update_cache_max_age must be >= 0 or None")
    return Packages(names=names, state=state, update_cache_max_age=update_cache_max_age,
                    install_recommends=install_recommends, purge=purge)


@dataclass(frozen=True)
class Repository:
    name: str
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...] = ("main",)
    key_b64: str | None = None
    key_url: str | None = None
    key_sha256: str | None = None
    arch: tuple[str, ...] = ()
    types: tuple[str, ...] = ("deb",)
    keyring: str = ""
    update: bool = True               # apt-get update after a change

    @property
    def id(self) -> str:
        return f"apt repository {self.name}"

    @property
    def sources_path(self) -> str:
        return f"{SOURCES}/{self.name}.sources"

    @property
    def legacy_path(self) -> str:
        return f"{SOURCES}/{self.name}.list"

    def sources(self) -> str:
        lines = [f"Types: {' '.join(self.types)}", f"URIs: {self.uri}",
                 f"Suites: {' '.join(self.suites)}"]
        if self.components:
            lines.append(f"Components: {' '.join(self.components)}")
        if self.arch:
            lines.append(f"Architectures: {' '.join(self.arch)}")
        lines.append(f"Signed-By: {self.keyring}")
        return "# managed by provisioner\n" + "\n".join(lines) + "\n"

    def facts(self) -> dict:
        return {"files": [self.keyring, self.sources_path, self.legacy_path, KEYRINGS]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        steps: list[dict] = []
        why: list[str] = []
        diff = None
        kd = facts.file(KEYRINGS)
        if not kd.exists:
            steps.append(b.directory(KEYRINGS, "0755", "root", "root"))
            why.append(f"{KEYRINGS} absent")
        key = facts.file(self.keyring)
        if self.key_b64 is not None:
            data = base64.b64decode(self.key_b64)
            if not key.exists or key.sha256 != b.sha256(data) or key.type != "file":
                steps.append(b.write(self.keyring, data, "0644", "root", "root"))
                why.append(f"keyring {self.keyring} " + ("absent" if not key.exists
                                                         else "differs"))
        else:
            if not key.exists or (self.key_sha256 and key.sha256 != self.key_sha256):
                steps.append({"fetch": self.key_url, "path": self.keyring,
                              "sha256": self.key_sha256, "mode": "0644", "owner": "root",
                              "group": "root"})
                why.append(f"keyring {self.keyring} " + ("absent" if not key.exists
                                                         else "sha256 differs"))
        if key.exists and key.type == "file":
            d = b.drift(key, "0644", "root", "root")
            if d and not any(s.get("write") == self.keyring or s.get("path") == self.keyring
                             for s in steps):
                steps.append(b.attrs(self.keyring, "0644", "root", "root"))
                why.append(f"keyring {'; '.join(d)}")
        src = facts.file(self.sources_path)
        content = self.sources()
        if not src.exists or src.sha256 != b.sha256(content):
            steps.append(b.write(self.sources_path, content, "0644", "root", "root"))
            why.append(f"{self.sources_path} " + ("absent" if not src.exists else "differs"))
            diff = b.file_diff(self.sources_path, src, Rendered.plain(content))
        elif b.drift(src, "0644", "root", "root"):
            steps.append(b.attrs(self.sources_path, "0644", "root", "root"))
            why.append(f"{self.sources_path} " + "; ".join(b.drift(src, "0644", "root", "root")))
        if facts.file(self.legacy_path).exists:
            steps.append(b.run(["rm", "-f", "--", self.legacy_path]))
            why.append(f"legacy {self.legacy_path} present")
        if not steps:
            return [Noop(self.id, f"up to date: {self.sources_path}, {self.keyring}")]
        if self.update:
            steps.extend(update_steps())
        return [Change(self.id, "configure", "; ".join(why), tuple(steps), diff)]

    def expect(self, facts: Facts) -> dict:
        old_key = facts.file(self.keyring)
        key = (base64.b64decode(self.key_b64) if self.key_b64 is not None else None)
        kfact = b.file_fact(self.keyring, key, "0644", "root", "root", old_key)
        if key is None:
            kfact["sha256"] = self.key_sha256 or old_key.sha256
        frag: dict = {"files": {
            self.keyring: kfact,
            self.sources_path: b.file_fact(self.sources_path, self.sources(), "0644", "root",
                                           "root", facts.file(self.sources_path)),
            self.legacy_path: {"__replace__": True, "exists": False},
            KEYRINGS: b.file_fact(KEYRINGS, None, "0755", "root", "root",
                                  facts.file(KEYRINGS), "dir"),
        }}
        if self.update:
            frag["packages"] = {"lists_age": 0}
        return frag


def _words(v: Sequence[str] | str, what: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = v.split()
    out = tuple(v)
    for w in out:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w) or "\0" in w:
            raise ValueError(f"bad {what}: {w!r}")
    return out


def repository(name: str, uri: str, suites: Sequence[str] | str,
               components: Sequence[str] | str = ("main",), *, key_b64: str | None = None,
               key_url: str | None = None, key_sha256: str | None = None,
               arch: Sequence[str] | str = (), types: Sequence[str] | str = ("deb",),
               update: bool = True) -> Repository:
    if not isinstance(name, str) or not REPO_NAME_RE.match(name):
        raise ValueError(f"bad repository name {name!r}")
    if not isinstance(uri, str) or not re.match(r"^(https?|file|cdrom|mirror\+\w+)://\S+\Z", uri):
        raise ValueError(f"bad repository URI {uri!r}")
    if (key_b64 is None) == (key_url is None):
        raise ValueError("give exactly one of key_b64 or key_url")
    if key_b64 is not None:
        try:
            data = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("key_b64 is not valid base64") from None
        ext = ".asc" if data.lstrip().startswith(b"-----BEGIN PGP") else ".gpg"
    else:
        if not re.match(r"^https?://\S+\Z", key_url):
            raise ValueError(f"bad key URL {key_url!r}")
        ext = ".gpg" if key_url.endswith(".gpg") else ".asc"
    if key_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", key_sha256):
        raise ValueError("key_sha256 must be 64 lowercase hex digits")
    suites_t = _words(suites, "suite")
    if not suites_t:
        raise ValueError("at least one suite is needed")
    types_t = _words(types, "type")
    if not set(types_t) <= {"deb", "deb-src"}:
        raise ValueError(f"types must be deb and/or deb-src, not {types_t}")
    return Repository(name=name, uri=uri, suites=suites_t,
                      components=_words(components, "component"), key_b64=key_b64,
                      key_url=key_url, key_sha256=key_sha256, arch=_words(arch, "arch"),
                      types=types_t, keyring=f"{KEYRINGS}/{name}{ext}", update=bool(update))

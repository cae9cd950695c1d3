"""Releases of an app: the artifact built on the controller, the release id, the one-exec calls
to the server side (provisioner/remote/deploy.py) and the pure choices the flows make (which
release a rollback goes to, the batches of a rollout). provisioner/deploy.py runs the flows.

Layout on a server (see remote/deploy.py): /srv/<app>/{releases/<id>/, shared/, current,
releases.json, .deploy.lock/}.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from provisioner.connection import Unreachable
from provisioner.errors import InputError, Problem

MARKER = b"\n--provisioner-deploy-v1--\n"      # must match provisioner/remote/deploy.py
SOURCE = Path(__file__).resolve().parent / "remote" / "deploy.py"
BOOTSTRAP = ('import sys,json;f=sys.stdin.buffer;d=json.loads(f.readline());'
             'exec(compile(d.pop("code"),"provisioner-deploy","exec"),'
             '{"REQ":d,"DATA":f,"__name__":"__provisioner_deploy__"})')
GOOD = ("live", "retired")                      # passed a health gate: rollback targets
CACHE = Path.home() / ".cache" / "provisioner" / "git"


class RemoteError(RuntimeError):
    """The server side did not answer with its JSON."""


@dataclass(frozen=True)
class Artifact:
    data: bytes          # tar.gz of the app's tree at `commit`
    sha256: str
    commit: str          # full sha
    ref: str             # as asked


def _git(*args: str, cwd: str | Path) -> str:
    r = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, timeout=300)
    if r.returncode != 0:
        raise InputError(Problem(None, None, "source", f"git {' '.join(args[:2])} in {cwd} failed: "
                                 f"{r.stderr.decode(errors='replace').strip()}",
                                 "check the app's `source` and `ref` (--ref) in the inventory"))
    return r.stdout.decode()


def _checkout(source: str) -> tuple[Path, str]:
    """(the git directory to archive from, the app's folder inside the tree). A URL is cloned
    (bare) once into ~/.cache/provisioner/git and fetched again at every build."""
    if "://" in source or source.startswith("git@"):
        where = CACHE / hashlib.sha256(source.encode()).hexdigest()[:16]
        if not where.exists():
            where.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "clone", "--bare", "--quiet", "--", source, str(where)],
                           check=False, capture_output=True, timeout=600)
            if not where.exists():
                raise InputError(Problem(None, None, "source", f"cannot clone {source}",
                                         "check the URL and that this machine may read it"))
        _git("fetch", "--quiet", "--prune", "origin", "+refs/heads/*:refs/heads/*",
             "+refs/tags/*:refs/tags/*", cwd=where)
        return where, ""
    folder = Path(source)
    if not folder.is_dir():
        raise InputError(Problem(None, None, "source", f"{source} is not a folder",
                                 "set the app's `source` to a git checkout (or a folder in one)"))
    top = _git("rev-parse", "--show-toplevel", cwd=folder).strip()
    return Path(top), _git("rev-parse", "--show-prefix", cwd=folder).strip()


def build(source: str, ref: str) -> Artifact:
    """`git archive` of the app's folder at `ref`, once per deploy, gzip'd; its sha256 is
    checked on every host after the upload. What is not committed is not deployed."""
    where, prefix = _checkout(source)
    commit = _git("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}", cwd=where).strip()
    tar = subprocess.run(["git", "-C", str(where), "archive", "--format=tar", f"{commit}:{prefix}"],
                         capture_output=True, timeout=600, check=True).stdout
    stamp = int(_git("show", "-s", "--format=%ct", commit, cwd=where))
    data = gzip.compress(_stamped(tar, stamp), mtime=0)     # the same commit gives the same sha256
    return Artifact(data, hashlib.sha256(data).hexdigest(), commit, ref)


def _stamped(tar: bytes, mtime: int) -> bytes:
    """The tar with every member dated `mtime`. git archive dates the files of a tree (the app's
    folder, not a whole commit) with the current time, so two builds of one commit differed."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            member.mtime = mtime
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    return out.getvalue()


def release_id(commit: str, when: datetime | None = None) -> str:
    """Sorts by time (UTC, to the second) and names the commit: 20260601T100427Z-3f2a9c1b7d4e."""
    when = when or datetime.now(timezone.utc)
    return f"{when:%Y%m%dT%H%M%SZ}-{commit[:12]}"


@lru_cache(maxsize=1)
def source() -> str:
    """What the server runs: remote/deploy.py with the helpers it shares with the agent and
    the roles (one copy of each, in remote/agent.py and remote/sql.py) ahead of it."""
    from provisioner.remote import agent, sql, with_helpers
    return with_helpers(SOURCE.read_text(encoding="utf-8"), agent.flock_held, sql.sql_literal)


def command() -> list[str]:
    """The fixed argv; the code, the request and the artifact come on stdin."""
    return ["python3", "-c", BOOTSTRAP]


def call(conn, request: dict, data: bytes = b"", timeout: float | None = None) -> dict:
    """One exec of the server side: its answer ({"ok": bool, ...}), RemoteError, or
    Unreachable when no answer came within `timeout` (default: the host's command timeout)."""
    head = json.dumps({**request, "code": source()}, separators=(",", ":")).encode()
    r = conn.run(command(), stdin=head + b"\n" + data, timeout=timeout)
    pos = r.stdout.rfind(MARKER)
    if pos < 0 and r.rc == 124 and timeout:
        conn.close()
        raise Unreachable(f"{conn.label}: no answer within {timeout:.0f} s (network cut, or the "
                          "host hangs); what it did is not known")
    if pos < 0:
        detail = (r.stderr or r.stdout).decode("utf-8", "replace").strip()[-2000:]
        raise RemoteError(f"the deploy helper did not answer (exit {r.rc}): {detail}")
    return json.loads(r.stdout[pos + len(MARKER):])


def batches(items: list, size: int) -> list[list]:
    """The rollout's batches: `size` hosts each (0: all at once)."""
    size = size or len(items) or 1
    return [items[i:i + size] for i in range(0, len(items), size)]


def rollback_target(manifests: dict[str, dict], to: str | None) -> str:
    """The release a rollback makes live on every host: `to`, or the newest release older than
    the current one that passed its health gate. It must be good on every host; else
    ValueError saying where it is not."""
    if to is None:
        first_host, first = next(iter(manifests.items()))
        current = first.get("current")
        older = [e["id"] for e in first["manifest"] if e["state"] in GOOD
                 and e["id"] != current and (current is None or e["id"] < current)]
        if not older:
            raise ValueError(f"{first_host}: no earlier release passed its health gate "
                             f"(current: {current or 'none'}); see `invoke releases`")
        to = max(older)
    for host, m in manifests.items():
        states = {e["id"]: e["state"] for e in m["manifest"]}
        if states.get(to) not in GOOD:
            why = f"it is {states[to]}" if to in states else "it is not there"
            raise ValueError(f"{host}: release {to} cannot go live ({why}): only releases that "
                             "passed their health gate are rollback targets")
    return to

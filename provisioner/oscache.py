"""The os facts each host gave this controller last time, kept so that the next run can ask for
its roles' facts in its first exec, beside the os facts and the run lock (runner.run_host): a
converged run then costs two execs (facts, finish) instead of three.

It is a guess, never trusted: the roles are planned from the os facts the host gives in that
exec, and the facts gathered with the guess are used only when those equal the cached ones
(the roles' plans, and so their facts requests, depend on nothing else from the server).
Otherwise, or with no cache file, the run asks again in a second exec, as it would without a
cache. A cache that cannot be read or written costs that exec, never the run.

One small JSON file per environment and host, in the user's cache folder beside the deploy's
git cache (releases.CACHE).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

DIR = Path.home() / ".cache" / "provisioner" / "os-facts"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")      # no separators, no ..


def _path(env: str, host: str) -> Path | None:
    if not (NAME_RE.match(env) and NAME_RE.match(host)):
        return None
    return DIR / env / f"{host}.json"


def load(env: str, host: str) -> dict | None:
    """The os facts `host` of `env` gave last time, or None."""
    p = _path(env, host)
    try:
        doc = json.loads(p.read_text(encoding="utf-8")) if p else None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def store(env: str, host: str, os_facts: dict) -> None:
    """Keep `os_facts` for the next run."""
    p = _path(env, host)
    if p is None:
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{host}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(os_facts, f, sort_keys=True)
            os.replace(tmp, p)                  # whole or not at all, also with parallel runs
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass

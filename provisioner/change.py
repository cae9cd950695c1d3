"""The contract between operations, the remote agent and the runner.

An operation plans, purely, from desired state plus facts: it returns Changes (what to do, why,
the remote steps that do it) or a Noop (with the reason nothing is needed). Applying is separate:
the runner ships the steps of a role's changes to the remote agent in one exec.

Steps are plain JSON-able dicts so the agent (provisioner/remote/agent.py, run by python3 on the
server) needs nothing from this package:
  {"run": [argv...], "stdin": str | None, "env": {..}, "ok": [0]}
  {"write": path, "b64": content, "mode": "0644", "owner": "root", "group": "root",
   "validate": "sshd -t -f {path}" | None}     # temp file beside target, validate, rename
A step never carries a secret on a command line: secrets travel in "stdin" or "b64".
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Change:
    resource: str                 # e.g. "file /etc/ssh/sshd_config", "apt nginx"
    action: str                   # e.g. "install", "write", "restart"
    why: str                      # the fact that differed: "absent", "mode 0644 != 0600"
    steps: tuple[dict, ...]
    diff: str | None = None       # unified diff for files (already redacted by the op's renderer)
    notify: tuple[str, ...] = ()  # handler names to run once at the end of the role


@dataclass(frozen=True)
class Noop:
    resource: str
    why: str                      # "already present: nginx 1.22.1-9"


Result = list[Change | Noop]

"""The contract between operations, the remote agent and the runner.

An operation plans, purely, from desired state plus facts: it returns Changes (what to do, why,
the remote steps that do it) or a Noop (with the reason nothing is needed). Applying is separate:
the runner ships the steps of a role's changes to the remote agent in one exec.

Steps are plain JSON-able dicts so the agent (provisioner/remote/agent.py, run by python3 on the
server) needs nothing from this package:
  {"run": [argv...], "stdin": str | None, "env": {..}, "ok": [0]}
       (optional "timeout": seconds; "attempts": n, "delay": seconds between them (2);
        DEBIAN_FRONTEND=noninteractive, LC_ALL=C.UTF-8 are set)
  {"write": path, "b64": content, "mode": "0644", "owner": "root", "group": "root",
   "validate": "sshd -t -f {path}" | [argv with "{path}"] | None,
   "after": [[argv...]..]}                      # temp file beside target, validate, rename,
                                                # then the "after" commands
Added by the ops/agent work (same rules, all handled by the agent itself):
  {"line": path, "text": str, "regexp": str | None, "state": "present" | "absent",
   "insert_after": str | None, "create": bool, "mode", "owner", "group", "validate", "after"}
                                                # lineinfile edit done on the server at apply
                                                # time, written like "write" when it changes
  {"dir": path, "mode", "owner", "group"}       # mkdir -p, then chown/chmod
  {"attrs": path, "mode", "owner", "group"}     # chown/chmod an existing path (not a symlink)
  {"fetch": url, "path": path, "sha256": hex | None, "mode", "owner", "group"}
                                                # download (stdlib urllib), check, write
  {"file_group": [path..], "steps": [step..], "check": [argv..], "timeout"?}
                                                # a file group (provisioner/ops/groups.py):
                                                # the steps, then the check; on any failure
                                                # every path goes back as it was
mode/owner/group None = keep the existing value (new files: 0644 / dirs 0755, the agent's
user; owner given and group None: the owner's primary group).
A step never carries a secret on a command line: secrets travel in "stdin", "env", "b64" or
"text", all inside the request on the agent's stdin.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    resource: str                 # e.g. "file /etc/ssh/sshd_config", "apt nginx"
    action: str                   # e.g. "install", "write", "restart"
    why: str                      # the fact that differed: "absent", "mode 0644 != 0600"
    steps: tuple[dict, ...]
    diff: str | None = None       # unified diff for files (already redacted by the op's renderer)
    notify: tuple[str, ...] = ()  # handler names to run once at the end of the role

    @property
    def paths(self) -> tuple[str, ...]:
        """The files its steps write (write, line, fetch, and a file group's): what a Guard
        watches."""
        return tuple(dict.fromkeys(_paths(self.steps)))


def _paths(steps) -> list[str]:
    out: list[str] = []
    for step in steps:
        if "file_group" in step:
            out += list(step["file_group"]) + _paths(step.get("steps") or ())
        for kind in ("write", "line"):
            if kind in step:
                out.append(step[kind])
        if "fetch" in step:
            out.append(step["path"])
    return out


@dataclass(frozen=True)
class Noop:
    resource: str
    why: str                      # "already present: nginx 1.22.1-9"


Result = list[Change | Noop]

"""The run lock on each host, and the audit line written when a run changed it.

The lock is a directory made with one atomic mkdir, holding owner.json (who, from where, pid,
CI job, run id, started, TTL). Every apply exec of the run holds it for its whole life (a flock
on a file inside) and refreshes the TTL; a lock not refreshed within its TTL, with no exec of
its run alive, is stale and taken over (under a mutex, by one rename), and the takeover is
reported. A run from a systemd timer and one from a laptop therefore never apply
changes to the same host at once; the second stops with exit code 4 and says who holds it.
The remote side is in the agent (run_lock in the first facts exec, finish in the last exec);
this module builds the requests and reads the answers.

A run that was killed (kill -9, a closed laptop lid, a cancelled CI job) leaves its lock behind.
When the holder ran on this same machine, in this same process namespace since the same boot,
and its process is gone (or its PID now belongs to a younger process), no one holds the lock:
it is taken over at once, reported, instead of blocking every run until the TTL.
"""
from __future__ import annotations

import functools
import json
import getpass
import os
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_DIR = "/var/lib/provisioner/run.lock"
AUDIT_LOG = "/var/log/provisioner/audit.log"
DEFAULT_TTL = 4 * 3600

class LockHeld(Exception):
    exit_code = 4


@functools.lru_cache(maxsize=None)       # once per run, not once per host
def git_state(repo: Path) -> tuple[str | None, bool]:
    """(the config checkout's HEAD commit, whether it has uncommitted changes); (None, False)
    outside a git checkout. The audit line and saved plans name the config by it."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return (sha, bool(dirty)) if sha else (None, False)


def _git_sha(repo: Path) -> str:
    sha, dirty = git_state(repo)
    return (sha[:12] + ("-dirty" if dirty else "")) if sha else "unknown"


def _ci_job() -> str | None:
    for var in ("CI_JOB_URL", "GITHUB_RUN_ID", "CI_JOB_ID", "BUILD_URL", "INVOCATION_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def _pid_space() -> str | None:
    """Where a PID means one process: this boot of the kernel and this PID namespace (two
    containers share a kernel, and may share a hostname and a machine-id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): tells a reused PID from ours."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner(run_id: str, task: str, env: str, ttl: int = DEFAULT_TTL) -> dict:
    now = time.time()
    pid = os.getpid()
    return {"run_id": run_id, "who": getpass.getuser(), "from": socket.gethostname(),
            "pid": pid, "pid_space": _pid_space(), "pid_start": _start_ticks(pid),
            "ci_job": _ci_job(), "task": task, "env": env,
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "started_epoch": now, "ttl": ttl}


def dead_here(holder: dict) -> bool:
    """True when the holder's run was on this machine and its process no longer exists."""
    space, pid, began = holder.get("pid_space"), holder.get("pid"), holder.get("pid_start")
    if not space or space != _pid_space() or not isinstance(pid, int) or pid <= 0 \
            or not isinstance(began, int):
        return False
    start = _start_ticks(pid)
    return start is None or start != began


def holder_text(holder: dict) -> str:
    job = f", CI job {holder['ci_job']}" if holder.get("ci_job") else ""
    return (f"{holder.get('who', '?')}@{holder.get('from', '?')} (pid {holder.get('pid', '?')}"
            f"{job}), task {holder.get('task', '?')} on env {holder.get('env', '?')}, started "
            f"{holder.get('started', '?')}")


def describe(holder: dict, age: float) -> str:
    return (f"held by {holder_text(holder)} ({age / 60:.0f} min ago; stale after "
            f"{holder.get('ttl', 0) / 60:.0f} min). Wait for it to finish; if that run is dead, "
            f"remove {LOCK_DIR} on the host")


def request(owner_doc: dict, take_from: str | None = None) -> dict:
    """The `run_lock` fact request: the agent takes the lock while it gathers facts.
    take_from: the run id of a dead holder (dead_here) whose lock is taken over."""
    req = {"dir": LOCK_DIR, "owner": owner_doc}
    if take_from:
        req["take_from"] = take_from
    return req


def dead_holder(answer: dict) -> dict | None:
    """The holder of a lock we did not get, when its run is dead (see dead_here)."""
    holder = answer.get("holder") or {}
    return holder if not answer.get("acquired") and holder.get("run_id") and dead_here(holder) \
        else None


def check(host_name: str, answer: dict) -> dict:
    """Raise LockHeld unless the agent's run_lock answer says we hold the lock now."""
    if not answer.get("acquired"):
        busy = ("; a command of that run is still running on the host, so it is not taken "
                "over" if answer.get("busy") else "")
        raise LockHeld(f"{host_name}: run lock {describe(answer['holder'], answer['age'])}{busy}")
    return answer


def hold_request(run_id: str) -> dict:
    """Put in an apply request: the agent checks the lock is still this run's, holds it for
    its whole exec (a stale-lock takeover and finish wait for it) and refreshes the TTL."""
    return {"dir": LOCK_DIR, "run_id": run_id}


def finish_request(run_id: str, audit: dict | None) -> dict:
    return {"dir": LOCK_DIR, "run_id": run_id, "audit": audit, "audit_log": AUDIT_LOG}


def audit_line(owner_doc: dict, repo: Path, result: str, changed: int, failed: int) -> dict:
    return {"ts": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "who": owner_doc["who"], "from": owner_doc["from"], "ci_job": owner_doc["ci_job"],
            "task": owner_doc["task"], "env": owner_doc["env"], "run_id": owner_doc["run_id"],
            "config": _git_sha(repo), "result": result, "changed": changed, "failed": failed}


def audit_entry(line: str | None) -> dict | None:
    """An audit log line read back (the `last_lines` fact): the run that last changed a host;
    None when there is none or it is not one of ours."""
    if not isinstance(line, str):
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and "ts" in doc else None

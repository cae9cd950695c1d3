"""The run lock on each host, and the audit line written when a run changed it.

The lock is a directory made with one atomic mkdir, holding owner.json (who, from where, pid,
CI job, run id, started, TTL). A lock older than its TTL is stale and taken over, and the
takeover is reported. A run from a systemd timer and one from a laptop therefore never apply
changes to the same host at once; the second stops with exit code 4 and says who holds it.
Both scripts run with python3 on the server (stdlib only); their input comes on stdin.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_DIR = "/var/lib/provisioner/run.lock"
AUDIT_LOG = "/var/log/provisioner/audit.log"
DEFAULT_TTL = 4 * 3600

_ACQUIRE = r'''
import json, os, sys, time
req = json.loads(sys.stdin.read())
d = req["dir"]
os.makedirs(os.path.dirname(d), mode=0o755, exist_ok=True)
def take():
    os.mkdir(d, 0o700)
    with open(os.path.join(d, "owner.json"), "w") as f:
        json.dump(req["owner"], f)
    return {"acquired": True}
try:
    out = take()
except FileExistsError:
    try:
        holder = json.load(open(os.path.join(d, "owner.json")))
    except (OSError, ValueError):
        holder = {"started_epoch": os.stat(d).st_mtime, "ttl": req["owner"]["ttl"], "who": "unknown (no owner.json)"}
    age = time.time() - holder.get("started_epoch", 0)
    if age > holder.get("ttl", 0):
        import shutil
        shutil.rmtree(d, ignore_errors=True)
        out = take(); out["stale"] = holder
    else:
        out = {"acquired": False, "holder": holder, "age": age}
print(json.dumps(out))
'''

_FINISH = r'''
import json, os, sys
req = json.loads(sys.stdin.read())
if req.get("audit"):
    log = req["audit_log"]
    os.makedirs(os.path.dirname(log), mode=0o750, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.write(fd, (json.dumps(req["audit"], sort_keys=True) + "\n").encode())
    os.fsync(fd); os.close(fd)
d = req["dir"]
try:
    mine = json.load(open(os.path.join(d, "owner.json"))).get("run_id") == req["run_id"]
except (OSError, ValueError):
    mine = False
if mine:
    os.unlink(os.path.join(d, "owner.json")); os.rmdir(d)
print(json.dumps({"released": mine}))
'''


class LockHeld(Exception):
    exit_code = 4


def _git_sha(repo: Path) -> str:
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _ci_job() -> str | None:
    for var in ("CI_JOB_URL", "GITHUB_RUN_ID", "CI_JOB_ID", "BUILD_URL", "INVOCATION_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def owner(run_id: str, task: str, env: str, ttl: int = DEFAULT_TTL) -> dict:
    now = time.time()
    return {"run_id": run_id, "who": getpass.getuser(), "from": socket.gethostname(),
            "pid": os.getpid(), "ci_job": _ci_job(), "task": task, "env": env,
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "started_epoch": now, "ttl": ttl}


def describe(holder: dict, age: float) -> str:
    job = f", CI job {holder['ci_job']}" if holder.get("ci_job") else ""
    return (f"held by {holder.get('who', '?')}@{holder.get('from', '?')} (pid {holder.get('pid', '?')}"
            f"{job}), task {holder.get('task', '?')} on env {holder.get('env', '?')}, started "
            f"{holder.get('started', '?')} ({age / 60:.0f} min ago; stale after "
            f"{holder.get('ttl', 0) / 60:.0f} min). Wait for it to finish; if that run is dead, "
            f"remove {LOCK_DIR} on the host")


def acquire(conn, owner_doc: dict) -> dict:
    r = conn.run(["python3", "-c", _ACQUIRE], stdin=json.dumps({"dir": LOCK_DIR, "owner": owner_doc}).encode())
    if r.rc != 0:
        raise RuntimeError(f"could not take the run lock {LOCK_DIR}: {r.stderr.decode(errors='replace').strip()}")
    out = json.loads(r.stdout)
    if not out["acquired"]:
        raise LockHeld(f"{conn.host.name}: run lock {describe(out['holder'], out['age'])}")
    return out


def finish(conn, run_id: str, audit: dict | None) -> None:
    """Append the audit line (if the run changed this host) and release the lock, in one exec."""
    req = {"dir": LOCK_DIR, "run_id": run_id, "audit": audit, "audit_log": AUDIT_LOG}
    r = conn.run(["python3", "-c", _FINISH], stdin=json.dumps(req).encode())
    if r.rc != 0:
        raise RuntimeError(f"could not write the audit log / release the lock: "
                           f"{r.stderr.decode(errors='replace').strip()}")


def audit_line(owner_doc: dict, repo: Path, result: str, changed: int, failed: int) -> dict:
    return {"ts": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "who": owner_doc["who"], "from": owner_doc["from"], "ci_job": owner_doc["ci_job"],
            "task": owner_doc["task"], "env": owner_doc["env"], "run_id": owner_doc["run_id"],
            "config": _git_sha(repo), "result": result, "changed": changed, "failed": failed}

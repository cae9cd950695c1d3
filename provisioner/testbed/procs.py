"""Processes the testbed starts, tracked by PID file and checked by command line before any
signal, so a recycled PID never gets a process we did not start killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def recorded(pidfile: Path) -> int | None:
    """The PID a pidfile records (its first line), alive or not."""
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def running(pidfile: Path, marker: str) -> int | None:
    """The PID in pidfile if that process is alive and its command line contains marker."""
    pid = recorded(pidfile)
    if pid is None:
        return None
    args = cmdline(pid)
    if not any(marker in a for a in args):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def spawn(argv: list[str], log: Path, pidfile: Path | None = None, env=None) -> int:
    """Start a detached process (own session, no stdin) and record its PID, and the command
    line it was started with (which `ensure` compares)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=env)
    if pidfile:
        pidfile.write_text(f"{proc.pid}\n{json.dumps([str(a) for a in argv])}\n")
    return proc.pid


def ensure(argv: list[str], log: Path, pidfile: Path, marker: str) -> bool:
    """Start argv unless it already runs with this very command line. One started with other
    arguments (settings of an older checkout) is stopped first. True when it was started."""
    if running(pidfile, marker) is not None:
        try:
            started_with = json.loads(pidfile.read_text().split("\n", 1)[1])
        except (OSError, ValueError, IndexError):
            started_with = None
        if started_with == [str(a) for a in argv]:
            return False
        stop(pidfile, marker)
    spawn(argv, log, pidfile)
    return True


def stop(pidfile: Path, marker: str, timeout: float = 15.0) -> bool:
    """SIGTERM the recorded process (if it is ours), wait, then SIGKILL. True if one was running."""
    pid = running(pidfile, marker)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running(pidfile, marker):
        _reap(pid)
        time.sleep(0.05)
    if running(pidfile, marker):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    _reap(pid)                 # our child (tests start them): no zombie left behind
    pidfile.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

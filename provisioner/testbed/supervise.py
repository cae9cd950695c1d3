"""Keeps one test server running: boots it with systemd-nspawn and boots it again when the server
rebooted itself (nspawn exits 133 then, by design). SIGTERM shuts the server down cleanly.

Run as: python3 -m provisioner.testbed.supervise NAME ROOT BRIDGE NSPAWN_PIDFILE CGROUP
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REBOOTED = 133
CGROUP_FS = Path("/sys/fs/cgroup")


def cgroup_roots() -> list[Path]:
    """The hierarchies nspawn places a container in: the unified one, and name=systemd when
    the machine runs the hybrid layout."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    return [p for p in (CGROUP_FS / "systemd", CGROUP_FS / "unified") if (p / "cgroup.procs").exists()]


def cgroup_paths(cgroup: str) -> list[Path]:
    return [root / "provisioner-testbed" / cgroup for root in cgroup_roots()]


def enter_own_cgroup(cgroup: str) -> None:
    """Without a systemd on this machine, nspawn puts the container under the caller's cgroup:
    every server would share one, and one server's systemd would manage (and kill) another's
    units. A cgroup per server keeps them apart."""
    for path in cgroup_paths(cgroup):
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.procs").write_text(f"{os.getpid()}\n")


def remove_cgroup(cgroup: str) -> None:
    """Remove the server's (empty) cgroup tree, deepest first."""
    for path in cgroup_paths(cgroup):
        if path.exists():
            for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                path.rmdir()
            except OSError:
                pass


def nspawn_argv(name: str, root: str, bridge: str) -> list[str]:
    return ["systemd-nspawn", "--quiet", "-D", root, "--boot", "--register=no", "--keep-unit",
            f"--machine={name}", f"--network-bridge={bridge}", "--resolv-conf=off",
            "--timezone=off", "--link-journal=no", "--console=read-only"]


def main(name: str, root: str, bridge: str, pidfile: str, cgroup: str) -> int:
    enter_own_cgroup(cgroup)
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(signum, frame):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.send_signal(signal.SIGTERM)   # nspawn turns this into a clean poweroff

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        child = subprocess.Popen(nspawn_argv(name, root, bridge), stdin=subprocess.DEVNULL)
        Path(pidfile).write_text(f"{child.pid}\n")
        rc = child.wait()
        if stopping or rc != REBOOTED:
            Path(pidfile).unlink(missing_ok=True)
            return 0 if stopping else rc
        print(f"[supervise] {name} rebooted itself; booting it again", flush=True)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))

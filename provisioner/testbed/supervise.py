"""Keeps one test server running: boots it with systemd-nspawn and boots it again when the server
rebooted itself (nspawn exits 133 then, by design). SIGTERM shuts the server down cleanly.

Run as: python3 -m provisioner.testbed.supervise NAME ROOT BRIDGE NSPAWN_PIDFILE
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REBOOTED = 133


def nspawn_argv(name: str, root: str, bridge: str) -> list[str]:
    return ["systemd-nspawn", "--quiet", "-D", root, "--boot", "--register=no", "--keep-unit",
            f"--machine={name}", f"--network-bridge={bridge}", "--resolv-conf=off",
            "--timezone=off", "--link-journal=no", "--console=read-only"]


def main(name: str, root: str, bridge: str, pidfile: str) -> int:
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
    sys.exit(main(*sys.argv[1:5]))

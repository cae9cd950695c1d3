"""`pm2 jlist` as the scripts that ask it on a server see it (role pm2's status check,
role monitoring_agent's host metrics, `invoke status`'s probe), and stand-ins for the
commands they run."""
from __future__ import annotations

import json
from pathlib import Path

# What pm2 6 prints ahead of the list when the call started its daemon (lib/Client.js); the
# list itself is JSON.stringify's one line, with no newline after it (lib/API.js, jlist).
DAEMON_STARTED = ("[PM2] Spawning PM2 daemon with pm2_home=/home/app/.pm2\n"
                  "[PM2] PM2 Successfully daemonized\n")


def proc(name: str, pm_id: int, status: str = "online", module: bool = False) -> dict:
    """One entry of the list, with the fields the scripts read."""
    env = {"status": status, "restart_time": pm_id, "pm_uptime": 1_700_000_000_000,
           "exec_mode": "fork_mode" if module else "cluster_mode", "pmx_module": module}
    if not module:
        env["NODE_APP_INSTANCE"] = pm_id
    return {"pid": 4000 + pm_id, "name": name, "pm_id": pm_id, "pm2_env": env,
            "monit": {"memory": 50_000_000, "cpu": 0.5}}


def jlist_output(procs: list[dict], before: str = DAEMON_STARTED) -> str:
    return before + json.dumps(procs, separators=(",", ":"))


def pm2_host(tmp_path: Path, output: str) -> str:
    """A folder for the head of PATH: systemctl says every unit is active (and lists no failed
    one), runuser prints `output` whatever it is asked (it only ever runs `pm2 jlist` here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "jlist.out").write_text(output)
    for name, script in (("systemctl", "exit 0"), ("runuser", f"cat {tmp_path / 'jlist.out'}")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)

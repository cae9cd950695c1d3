"""`pm2 jlist` as the scripts that ask it on a server see it (role pm2's status check,
role monitoring_agent's host metrics, `invoke status`'s probe), stand-ins for the
commands they run, and for pm2's node API (deploy's reload)."""
from __future__ import annotations

import json
from pathlib import Path

# What pm2 6 prints ahead of the list when the call started its daemon (lib/Client.js); the
# list itself is JSON.stringify's one line, with no newline after it (lib/API.js, jlist).
DAEMON_STARTED = ("[PM2] Spawning PM2 daemon with pm2_home=/home/app/.pm2\n"
                  "[PM2] PM2 Successfully daemonized\n")


def proc(name: str, pm_id: int, status: str = "online", module: bool = False,
         cwd: str | None = None) -> dict:
    """One entry of the list, with the fields the scripts read. cwd: where it runs (pm_cwd;
    default: an app's /srv/<name>/current, a module's folder in PM2_HOME)."""
    home = f"/home/app/.pm2/modules/{name}/node_modules/{name}"
    env = {"status": status, "restart_time": pm_id, "pm_uptime": 1_700_000_000_000,
           "exec_mode": "fork_mode" if module else "cluster_mode", "pmx_module": module,
           "pm_cwd": cwd or (home if module else f"/srv/{name}/current")}
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


# pm2's node API as deploy's reload uses it (remote/deploy.py PM2_RELOAD): connect, list,
# reload(id), disconnect, and lib/Common.js's reload lock. The list is list.json beside it;
# each reload appends the id to `reloaded` there.
API = """const fs = require('fs');
const path = require('path');
const list = JSON.parse(fs.readFileSync(path.join(__dirname, 'list.json'), 'utf8'));
module.exports = {
  connect: (noDaemon, cb) => cb(null),
  list: (cb) => cb(null, list),
  reload: (id, opts, cb) => {
    fs.appendFileSync(path.join(__dirname, 'reloaded'), id + '\\n');
    cb(null);
  },
  disconnect: () => {},
};
"""
COMMON = "module.exports = {lockReload: () => 0, unlockReload: () => {}};\n"


def pm2_api(tmp_path: Path, procs: list[dict]) -> Path:
    """pm2's install folder (<it>/bin/pm2 is what remote/deploy.py's PM2 names) whose API
    lists `procs`. The ids reloaded: reloaded(folder)."""
    folder = tmp_path / "pm2"
    (folder / "lib").mkdir(parents=True)
    (folder / "bin").mkdir()
    (folder / "bin" / "pm2").write_text("")
    (folder / "index.js").write_text(API)
    (folder / "lib" / "Common.js").write_text(COMMON)
    (folder / "list.json").write_text(json.dumps(procs))
    return folder


def reloaded(folder: Path) -> list[int]:
    done = folder / "reloaded"
    return [int(x) for x in done.read_text().split()] if done.exists() else []

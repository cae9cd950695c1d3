"""The floor under the fresh env's figure on this machine: what installing the local env's
software alone costs, with nothing else done, beside a fresh provision of the env, in turns.

    invoke testbed.up
    python3 bench/install_floor.py [--rounds 2] [--json]

First, on never-provisioned servers, `invoke provision --check` says what a fresh run would
install: per host, the packages each apt step names as absent (harden's own step, then the
package batch), and whether npm and pm2 come from the registry. Then, in turns, `--rounds`
times each:
- the floor: the servers reset, then on all of them at once, through the testbed's root shell
  (no SSH, no agent, no check): apt-get update, each of those apt steps as one `apt-get install
  --no-install-recommends`, npm's tarball (roles/node/npm_install.py, its pinned integrity) and
  `npm install --global pm2@<pm2_version>`. The packages' own scripts run (services start on
  their defaults); no database cluster is created (the env creates db1's itself, in its role).
  Nothing of ours: no file, user, firewall, service setting, handler or guard.
- the env: `fresh_provision.py`'s fresh run of the whole local env.
Each prints its wall time and the CPU-s the whole machine was busy. On these 2 cores a fresh
env cannot take less than the floor's time, whatever a tool did: the floor is what stands
between the env's 60 s target and this machine.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
from fresh_provision import _busy, fresh, json_events, reset  # noqa: E402
from provisioner.ops import apt  # noqa: E402

# the roles' own apt-get command line (provisioner/ops/apt.py Packages), its lock wait included
APT = "DEBIAN_FRONTEND=noninteractive " + shlex.join([*apt.APT_GET, *apt.CONFFILES, "install",
                                                      "--no-install-recommends"])
NO_CLUSTER = ("mkdir -p /etc/postgresql-common/createcluster.d && echo 'create_main_cluster = "
              "false' > /etc/postgresql-common/createcluster.d/40-floor.conf")
ABSENT_RE = re.compile(r"([a-z0-9][a-z0-9+.-]*) absent")


def installs(evs: list[dict]) -> dict[str, dict]:
    """{host: {"apt": [[package..] per apt step], "npm": bool, "pm2": bool}} from the events of
    a check run on fresh servers: the packages each changed apt step names as absent."""
    out: dict[str, dict] = {}
    for e in evs:
        if e.get("event") != "step" or e.get("status") != "changed":
            continue
        h = out.setdefault(e["host"], {"apt": [], "npm": False, "pm2": False})
        reason = (e.get("reason") or "").split(";")[0]
        if e["resource"].startswith("apt ") and reason.startswith("would install:"):
            h["apt"].append(ABSENT_RE.findall(reason))
        elif e["resource"] == "npm from the registry":
            h["npm"] = True
        elif e["resource"] == "npm -g pm2":
            h["pm2"] = True
    return out


def commands(want: dict, npm: tuple[str, str, str], pm2_version: str) -> list[str]:
    """The shell commands of one host's floor, in order."""
    from roles.node import NPM_INSTALL_SOURCE
    cmds = ["apt-get -q update", NO_CLUSTER] + [f"{APT} {' '.join(p)}" for p in want["apt"] if p]
    if want["npm"]:
        version, integrity, builtin = npm
        cmds.append(f"python3 - /usr/local {version} {integrity} '' {shlex.quote(builtin)} "
                    f"<<'PYEOF'\n{NPM_INSTALL_SOURCE}\nPYEOF")
    if want["pm2"]:
        cmds.append("HOME=/root /usr/local/lib/node_modules/npm/bin/npm-cli.js install --global "
                    "--prefix=/usr/local --no-audit --no-fund --no-update-notifier "
                    f"pm2@{pm2_version}")
    return cmds


def plan() -> tuple[dict[str, list[str]], dict[str, dict]]:
    """{host: its floor's commands} and {host: what it installs}, from a check run on reset
    servers."""
    from provisioner.inventory import load_inventory_file
    from roles.node import NPM_BUILTIN, NPM_PINS
    reset("env")
    p = subprocess.run([sys.executable, "-m", "invoke", "provision", "--env", "local", "--check",
                        "--yes", "--json"], cwd=BENCH.parent, capture_output=True, text=True,
                       timeout=900)
    if p.returncode not in (0, 5):
        raise SystemExit(f"check run exited {p.returncode}: {p.stderr[-2000:]}")
    inv = load_inventory_file(BENCH.parent / "inventories" / "local.yml")
    out, wants = {}, installs(json_events(p.stdout))
    for host, want in wants.items():
        v = inv.hostvars(host)
        npm = (v["node_npm_version"], v["node_npm_integrity"] or NPM_PINS[v["node_npm_version"]],
               NPM_BUILTIN) if want["npm"] else ("", "", "")
        out[host] = commands(want, npm, v.get("pm2_version") or "")
    return out, wants


def floor(cmds: dict[str, list[str]]) -> tuple[float, float]:
    """Wall time and the machine's busy CPU-s of the floor on reset servers."""
    from provisioner.testbed import shell_argv
    reset("env")
    failed: list[str] = []

    def host(name: str) -> None:
        for c in cmds[name]:
            r = subprocess.run(shell_argv(name, ["bash", "-c", c]), capture_output=True,
                               text=True, timeout=1800)
            if r.returncode:
                failed.append(f"{name}: `{c[:80]}` exited {r.returncode}: {r.stderr[-800:]}")
                return
    busy0, t0 = _busy(), time.monotonic()
    threads = [threading.Thread(target=host, args=(n,)) for n in cmds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, busy = time.monotonic() - t0, _busy() - busy0
    if failed:
        raise SystemExit("the floor failed:\n" + "\n".join(failed))
    return wall, busy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each, in turns (median)")
    ap.add_argument("--json", action="store_true", help="also the medians as one JSON line")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be 1 or more")
    cmds, wants = plan()
    for h, want in sorted(wants.items()):
        print(f"{h}: apt " + "; apt ".join(" ".join(p) for p in want["apt"] if p)
              + ("; npm's tarball" if want["npm"] else "") + ("; npm -g pm2" if want["pm2"] else ""),
              flush=True)
    runs: dict[str, list[tuple[float, float]]] = {"floor": [], "env": []}
    for _ in range(a.rounds):
        runs["floor"].append(floor(cmds))
        print(f"floor: {runs['floor'][-1][0]:.1f} s, the machine busy {runs['floor'][-1][1]:.0f} "
              "CPU-s", flush=True)
        wall, _evs, busy = fresh("env", True)
        runs["env"].append((wall, busy))
        print(f"env:   {wall:.1f} s, the machine busy {busy:.0f} CPU-s", flush=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(b for _, b in v))
           for k, v in runs.items()}
    print(f"medians of {a.rounds}: floor {med['floor'][0]:.1f} s ({med['floor'][1]:.0f} CPU-s), "
          f"env {med['env'][0]:.1f} s ({med['env'][1]:.0f} CPU-s); the env's target: 60 s")
    if a.json:
        print(json.dumps({"floor": {"wall": med["floor"][0], "busy": med["floor"][1]},
                          "env": {"wall": med["env"][0], "busy": med["env"][1]}}))


if __name__ == "__main__":
    main()

"""Monitoring's cost on the testbed's servers: RSS and CPU of the exporters and the monitoring
stack at idle, per host, over a window; and the converged provision's execs per host (must
stay 3 with the monitoring roles in).

    python3 bench/monitoring_cost.py [--window 60]

Needs the local env provisioned (`invoke testbed.up && invoke provision --env local`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from engine_helpers import json_events, sh  # noqa: E402
from provisioner.testbed import config  # noqa: E402

# RSS (kB) and CPU ticks (utime + stime) of every process whose name is one of ours
SAMPLE = r"""
for p in /proc/[0-9]*; do
  c=$(cat $p/comm 2>/dev/null) || continue
  case "$c" in prometheus*|alertmanager*) ;; *) continue ;; esac
  rss=$(awk '/^VmRSS/ {print $2}' $p/status 2>/dev/null)
  t=$(awk '{print $14 + $15}' $p/stat 2>/dev/null)
  echo "$c $rss $t"
done
"""


def sample(host: str) -> dict[str, tuple[int, int]]:
    out = {}
    for line in sh(host, SAMPLE).stdout.splitlines():
        name, rss, ticks = line.split()
        out[name] = (int(rss), int(ticks))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=60, help="seconds between the two samples")
    a = ap.parse_args()
    hosts = [s.name for s in config.inventory_servers()]
    before = {h: sample(h) for h in hosts}
    time.sleep(a.window)
    after = {h: sample(h) for h in hosts}
    hz = 100
    rows = []
    for h in hosts:
        for name, (rss, ticks) in sorted(after[h].items()):
            cpu = (ticks - before[h].get(name, (0, ticks))[1]) / hz / a.window * 100
            rows.append({"host": h, "process": name, "rss_mb": round(rss / 1024, 1),
                         "cpu_percent": round(cpu, 2)})
            print(f"{h:6} {name:32} {rss / 1024:7.1f} MB  {cpu:5.2f} % CPU")
    r = subprocess.run([sys.executable, "-m", "invoke", "provision", "--env", "local", "--json",
                        "--yes"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    recap = json_events(r.stdout)[-1]
    execs = {h: recap["hosts"][h]["remote_commands"] for h in hosts}
    print(f"converged provision: changed {recap['changed']}, execs per host {execs}")
    print(json.dumps({"processes": rows, "execs_per_host": execs}))


if __name__ == "__main__":
    main()

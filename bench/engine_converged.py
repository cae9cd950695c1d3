"""Engine speed on the testbed: a converged run on 10 hosts in parallel against 1 host, and the
SSH execs per host. Ratios, not absolute targets (the issue's target: 10 hosts <= 1.5x of 1).

    python3 bench/engine_converged.py [--hosts bench09,...] [--roles base,opsdemo] [--rounds 5]

Needs the testbed with enough bench servers: `invoke testbed.up --count 18`.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from engine_helpers import Run, inventory  # noqa: E402


def machine_cpu() -> float:
    """CPU seconds used by the whole machine (controller and every test server) so far."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))   # all but idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def timed(inv, limit=None, cpu=None):
    t0, c0, r0 = time.monotonic(), machine_cpu(), resource.getrusage(resource.RUSAGE_SELF)
    run = Run(inv, limit=limit)
    seconds = time.monotonic() - t0
    if cpu is not None:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append((machine_cpu() - c0, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime))
    if run.recap["failed"] or run.recap["unreachable"] or run.recap["skipped"]:
        raise SystemExit(f"run failed: {[e for e in run.lines if e.get('status') in ('failed', 'unreachable')]}")
    return seconds, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default=",".join(f"bench{i:02d}" for i in range(9, 19)))
    ap.add_argument("--roles", default="base,opsdemo")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    hosts, roles = a.hosts.split(","), a.roles.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        inv = inventory(Path(tmp), hosts, roles, name="bench")
        t0 = time.monotonic()
        timed(inv)                                     # converge first (not measured as converged)
        fresh = time.monotonic() - t0
        one, many, cpu = [], [], []
        for _ in range(a.rounds):                      # interleaved, so drift hits both alike
            s, r1 = timed(inv, limit=hosts[0])
            one.append(s)
            s, rn = timed(inv, cpu=cpu)
            many.append(s)
        changed = rn.recap["changed"]
        execs = [rn.host(h)["remote_commands"] for h in hosts]
    m1, mn = statistics.median(one), statistics.median(many)
    print(f"roles {roles}; first run on {len(hosts)} hosts: {fresh:.1f} s")
    print(f"converged, 1 host:   median {m1:.2f} s over {a.rounds} runs")
    print(f"converged, {len(hosts)} hosts: median {mn:.2f} s -> ratio {mn / m1:.2f} (target <= 1.5)")
    machine, controller = statistics.median(c[0] for c in cpu), statistics.median(c[1] for c in cpu)
    cores = os.cpu_count()
    print(f"CPU per {len(hosts)}-host converged run: {machine:.2f} CPU-s on the whole machine "
          f"({controller:.2f} in the controller, the rest in the test servers and sshd); on "
          f"{cores} cores that alone takes >= {machine / cores:.2f} s: the servers share this machine's CPUs")
    print(f"changed on converged runs: {changed}; SSH execs per host: {min(execs)}..{max(execs)} "
          f"for {len(roles)} roles (converged: os facts + lock, every role's facts, audit + unlock)")


if __name__ == "__main__":
    main()

"""CPU per host of converged runs on 1, 10, 20 and 50 testbed servers, in one run.

The controller's (this process, its SSH threads included) and the servers' (each test server's
cgroup: sshd, sudo, python3 and what the agent runs), against the issue's targets of 15 ms and
0.15 CPU-s per host. On our machines the servers share the controller's cores, so wall time
across many hosts mostly measures their CPU; the cgroups tell the two apart, and other work on
this machine counts in neither.

    invoke testbed.up --count 50
    python3 bench/fleet_cpu.py [--sizes 1,10,20,50] [--roles base,opsdemo] [--rounds 3] [--json]

The first run converges every server (not measured; it also leaves the agent in each server's
cache); then each size runs `--rounds` times, interleaved, and the medians are printed
(`--json`: then also as one JSON line, for bench/all.py).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from engine_helpers import Run, inventory  # noqa: E402
from provisioner.testbed import servers, supervise  # noqa: E402


def server_cpu(names: list[str]) -> float | None:
    """CPU seconds the servers' cgroups used so far (None where the cgroup v2 figure is
    missing: then the servers' CPU is not reported)."""
    total = 0.0
    for name in names:
        stats = [p / "cpu.stat" for p in supervise.cgroup_paths(servers.cgroup(name))]
        stat = next((s for s in stats if s.exists()), None)
        if stat is None:
            return None
        fields = dict(line.split() for line in stat.read_text().splitlines())
        total += int(fields["usage_usec"]) / 1e6
    return total


def controller_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(inv, names: list[str]) -> dict:
    s0, c0, t0 = server_cpu(names), controller_cpu(), time.monotonic()
    run = Run(inv, limit=",".join(names))
    wall, c1, s1 = time.monotonic() - t0, controller_cpu(), server_cpu(names)
    bad = {k: run.recap[k] for k in ("failed", "unreachable", "skipped") if run.recap[k]}
    if bad or run.recap["changed"]:
        raise SystemExit(f"not a converged run on {len(names)} hosts: {run.recap}")
    return {"wall": wall, "controller": c1 - c0,
            "server": None if s0 is None or s1 is None else s1 - s0,
            "execs": max(run.host(n)["remote_commands"] for n in names)}


def medians(got: dict[int, list[dict]]) -> dict[str, dict]:
    """Per size (a string: JSON's keys are), the medians per host: wall s, controller ms,
    server CPU-s (None when the cgroups gave none) and execs."""
    out = {}
    for n, runs in got.items():
        servers_s = [r["server"] for r in runs if r["server"] is not None]
        out[str(n)] = {"wall": statistics.median(r["wall"] for r in runs),
                       "controller_ms": statistics.median(r["controller"] for r in runs) / n * 1000,
                       "server_cpu_s": statistics.median(servers_s) / n if servers_s else None,
                       "execs": statistics.median(r["execs"] for r in runs)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,20,50")
    ap.add_argument("--roles", default="base,opsdemo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also the medians as one JSON line")
    a = ap.parse_args(argv)
    sizes = [int(n) for n in a.sizes.split(",")]
    names = [f"bench{i:02d}" for i in range(1, max(sizes) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        inv = inventory(Path(tmp), names, a.roles.split(","), name="fleetcpu")
        t0 = time.monotonic()
        first = Run(inv)
        if first.recap["failed"] or first.recap["unreachable"]:
            raise SystemExit(f"the first run failed: {first.report('failed', 'unreachable')}")
        print(f"first run (converges {len(names)} servers): {time.monotonic() - t0:.1f} s")
        got: dict[int, list[dict]] = {n: [] for n in sizes}
        for _ in range(a.rounds):
            for n in sizes:
                got[n].append(measured(inv, names[:n]))
    print(f"converged runs, roles {a.roles}; medians of {a.rounds}")
    print(f"{'hosts':>5} {'wall s':>7} {'controller ms/host':>19} {'server CPU-s/host':>18} "
          f"{'execs/host':>10}")
    per_size = medians(got)
    for n in sizes:
        m = per_size[str(n)]
        server = "n/a" if m["server_cpu_s"] is None else f"{m['server_cpu_s']:.3f}"
        print(f"{n:>5} {m['wall']:>7.2f} {m['controller_ms']:>19.1f} {server:>18} "
              f"{m['execs']:>10.0f}")
    print("targets: controller 15 ms per host, server 0.15 CPU-s per host, 3 execs per host")
    if a.json:
        print(json.dumps({"rounds": a.rounds, "roles": a.roles, "hosts": per_size}))


if __name__ == "__main__":
    main()

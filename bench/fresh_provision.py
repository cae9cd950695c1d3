"""Fresh servers: `invoke provision` of web1 with the roles the issue names (base, harden, node,
pm2), of web1 with all its roles in the local inventory (also restic and monitoring_agent) and
of the whole local env, on never-provisioned servers with a warm package cache, then a converged
run of each; wall time, and SSH execs per host of the converged run. The issue's targets: web1
(base, harden, node, pm2) in 35 s, the env in 60 s, the converged run still 3 execs per host.

    invoke testbed.up
    python3 bench/fresh_provision.py [--rounds 3] [--only web1,web1-all,env] [--unbatched] [--json]

Each fresh run first replaces the servers it provisions with never-provisioned ones
(provisioner.testbed.reset: the same base image, new host keys): whatever was on them is gone.
One unmeasured fresh run of the env comes first: the testbed's apt proxy then holds every
.deb (npm's registry is tunnelled, not cached). `--unbatched` also runs each fresh provision
with the package batch off (each role installs its own packages, as before provisioner/
apt_batch.py), interleaved, so that one run shows what the batch is worth. After each fresh
run it prints where the time went per host: the batch step and each role, from the run's
--json events, and the CPU time the whole machine spent meanwhile (/proc/stat): the controller and
every test server share its cores, so that time over the number of cores is the least the run
could take here, however its work were overlapped. `--json` adds the medians and the converged
runs as one JSON line (bench/all.py reads it).

A cost of our machines that real servers do not have: the servers' writable layers sit on ext4
without a journal, where the kernel does not reuse an inode freed in the last 60 s (360 s while
its inode table block is unwritten) and checks each such inode again on every file it creates.
A reset deletes a server's ~10,000 files just before its fresh run, so the run's package
installs pay that check: about 9% of the machine's CPU samples (perf) in a fresh env. Syncing
the disk after the reset did not remove it: the new server's own writes dirty those blocks again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from engine_helpers import json_events  # noqa: E402

TARGETS = {"web1": 35.0, "web1-all": None, "env": 60.0}
LIMITS = {"web1": ["--limit", "web1", "--roles", "base,harden,node,pm2"],
          "web1-all": ["--limit", "web1"], "env": []}
# the real `invoke` program with the batch planned as empty: every role installs its own
UNBATCHED = """
import sys
from provisioner import apt_batch
apt_batch.plan = lambda roles, facts: apt_batch.NOTHING
from invoke.main import program
program.run(["invoke", *sys.argv[1:]])
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh runs of each (median)")
    ap.add_argument("--only", default="web1,web1-all,env", help="some of web1, web1-all, env")
    ap.add_argument("--unbatched", action="store_true",
                    help="also each fresh run with the package batch off")
    ap.add_argument("--json", action="store_true",
                    help="also the medians and converged runs as one JSON line")
    a = ap.parse_args(argv)
    a.only = [x for x in a.only.split(",") if x]
    if not a.only or any(x not in TARGETS for x in a.only):
        ap.error(f"--only: {','.join(a.only) or 'nothing'}: choose from {', '.join(TARGETS)}")
    if a.rounds < 1:
        ap.error("--rounds must be 1 or more")
    return a


def argv(what: str, batched: bool = True) -> list[str]:
    head = [sys.executable, "-m", "invoke"] if batched else [sys.executable, "-c", UNBATCHED]
    return [*head, "provision", "--env", "local", *LIMITS[what], "--yes", "--json"]


def where_time_went(evs: list[dict]) -> dict[str, dict[str, float]]:
    """{host: {"apt batch" or role: seconds}}. A step's `seconds` count from the start of its
    role (or of the batch), so a role took as long as its last step says."""
    out: dict[str, dict[str, float]] = {}
    for e in evs:
        if e.get("event") != "step":
            continue
        if e["role"] is None and not e["resource"].startswith("apt batch: "):
            continue
        key = e["role"] or "apt batch"
        host = out.setdefault(e["host"], {})
        host[key] = max(host.get(key, 0.0), e["seconds"])
    return out


def time_lines(evs: list[dict]) -> list[str]:
    return [f"    {host}: " + ", ".join(f"{k} {s:.1f}" for k, s in parts.items())
            for host, parts in sorted(where_time_went(evs).items())]


def recap(evs: list[dict]) -> dict:
    last = evs[-1] if evs else {}
    if last.get("event") != "recap":
        raise SystemExit("the run printed no recap")
    return last


def machine_busy_seconds(stat: str) -> float:
    """CPU seconds every core of the machine spent busy, from /proc/stat's text: user, nice,
    system, irq, softirq and steal of its "cpu" line (not idle, not iowait)."""
    fields = stat.split("\n", 1)[0].split()
    if fields[0] != "cpu":
        raise ValueError("/proc/stat does not start with the cpu line")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _busy() -> float:
    with open("/proc/stat", encoding="ascii") as f:
        return machine_busy_seconds(f.read())


def provision(what: str, batched: bool = True) -> tuple[float, list[dict]]:
    t0 = time.monotonic()
    p = subprocess.run(argv(what, batched), cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    evs = json_events(p.stdout)
    r = recap(evs)
    if p.returncode != 0 or r["failed"] or r["unreachable"]:
        bad = [e for e in evs if e.get("status") in ("failed", "unreachable")]
        raise SystemExit(f"provision {what} exited {p.returncode}: {bad[:5]}\n{p.stderr[-3000:]}")
    return wall, evs


def reset(what: str) -> None:
    from provisioner import testbed
    from provisioner.testbed import config
    names = ["web1"] if what.startswith("web1") else [s.name for s in config.inventory_servers()]
    for name in names:
        testbed.reset(name, log=lambda m: None)


def fresh(what: str, batched: bool) -> tuple[float, list[dict], float]:
    """Wall time, events and the machine's busy CPU-s of a fresh run."""
    reset(what)
    busy0 = _busy()
    wall, evs = provision(what, batched)
    return wall, evs, _busy() - busy0


def results(walls: dict[tuple[str, bool], list[float]], converged: dict[str, tuple]) -> dict:
    """{"fresh": {what: median s}, "unbatched": {what: median s}, "converged": {what: {"wall",
    "changed", "execs": the distinct SSH execs per host}}}."""
    out: dict = {"fresh": {}, "unbatched": {}}
    for (what, batched), w in walls.items():
        out["fresh" if batched else "unbatched"][what] = statistics.median(w)
    out["converged"] = {what: {"wall": wall, "changed": changed, "execs": execs}
                        for what, (wall, changed, execs) in converged.items()}
    return out


def main(argv_: list[str] | None = None) -> None:
    a = parse_args(argv_)
    variants = [True, False] if a.unbatched else [True]
    print("warming the package cache: one fresh run of the env (not measured)", flush=True)
    fresh("env", True)
    walls: dict[tuple[str, bool], list[float]] = {}
    cpus: dict[tuple[str, bool], list[float]] = {}
    for _ in range(a.rounds):
        for what in a.only:
            for batched in variants:
                wall, evs, cpu = fresh(what, batched)
                walls.setdefault((what, batched), []).append(wall)
                cpus.setdefault((what, batched), []).append(cpu)
                print(f"fresh {what}{'' if batched else ' (unbatched)'}: {wall:.1f} s, "
                      f"{recap(evs)['changed']} changed; the machine busy {cpu:.0f} CPU-s, "
                      f"{cpu / CORES:.1f} s on its {CORES} cores", flush=True)
                print("\n".join(time_lines(evs)), flush=True)
    converged = {}
    for what in a.only:
        wall, evs = provision(what)
        r = recap(evs)
        converged[what] = (wall, r["changed"], sorted({h["remote_commands"] for h in r["hosts"].values()}))
    print(f"medians of {a.rounds} fresh runs (warm package cache)")
    for (what, batched), w in walls.items():
        target = (" (package batch off)" if not batched else
                  f" (target {TARGETS[what]:.0f} s)" if TARGETS[what] else "")
        cpu = statistics.median(cpus[(what, batched)])
        print(f"fresh {what:<8}{'' if batched else ' unbatched'}: {statistics.median(w):6.1f} s{target}; "
              f"runs {' '.join(f'{x:.1f}' for x in w)}; the machine busy {cpu:.0f} CPU-s: "
              f"no less than {cpu / CORES:.1f} s on its {CORES} cores")
    for what, (wall, changed, execs) in converged.items():
        print(f"converged {what}: {wall:.2f} s, {changed} changed, SSH execs per host "
              f"{'/'.join(map(str, execs))} (target 3)")
    if a.json:
        print(json.dumps({"rounds": a.rounds, **results(walls, converged)}))


if __name__ == "__main__":
    main()

"""One controller on a fleet of simulated servers that answer like converged ones: the
controller's own cost per host (planning, requests, answers, events, recap), no server needed.

    python3 bench/simulated_fleet.py [--hosts 500] [--forks 50] [--latency 0.1] [--rounds 3] [--json]

The hosts get web1's roles (base, harden, node, pm2). Each simulated server answers every fact
the roles ask for as a converged server would: the answers are learnt once, before timing, by
planning the roles against an empty server and taking each change's own prediction of the
state after it (.expect(), what check mode uses), so a run plans only Noops. Every exec waits
`--latency` seconds (SSH and the server's work; the issue measured ~0.1 s per exec) and the
connection `--latency`/2 more to open, with the GIL released, as a real one would.

Prints the controller's CPU per host (target 15 ms), the wall time against the floor the
latency sets for these forks, and what a run did (changed, execs per host); `--json` adds
them as one JSON line (bench/all.py reads it).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_agent import AgentConn  # noqa: E402
from provisioner import ops  # noqa: E402
from provisioner.api import RoleContext  # noqa: E402
from provisioner.change import Change  # noqa: E402
from provisioner.connection import Result  # noqa: E402
from provisioner.events import Events  # noqa: E402
from provisioner.facts import Facts, check_key  # noqa: E402
from provisioner.inventory import load_inventory_file  # noqa: E402
from provisioner.runner import Options, Runner  # noqa: E402

OS = {"id": "debian", "version_id": "12", "codename": "bookworm",
      "pretty_name": "Debian GNU/Linux 12 (bookworm)", "virt": "kvm", "hostname": "sim",
      "pid1": "systemd", "systemd": True, "arch": "amd64", "machine": "x86_64",
      "python": "3.11.2", "uid": 0}
WEB1_VARS = {"node_apps": ["sample"],
             "pm2_apps": [{"name": "sample", "script": "server.js",
                           "env": {"PORT": "3000", "DATABASE_PASSWORD": "x" * 24}}]}
# what an empty server answers for a key of each kind (the agent's answer when it is absent)
ABSENT = {"files": {"exists": False}, "sysctl": {"value": None, "persisted": []}, "checks": 1,
          "http": {"error": "ConnectionRefusedError: nothing listens"}}


def public_key() -> str:
    """A throwaway login key's public half, for harden's deploy user."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " sim"


def fleet_inventory(tmp: Path, count: int):
    doc = {"env": "simfleet", "known_hosts": str(tmp / "known_hosts"), "ssh": {"user": "deploy"},
           "vars": {"harden_trusted_sources": ["192.0.2.1"], "harden_deploy_keys": [public_key()]},
           "hosts": {f"sim{i:03d}": {"address": f"10.{i >> 8}.{i & 255}.1"} for i in range(count)},
           "groups": {"app": {"hosts": [f"sim{i:03d}" for i in range(count)],
                              "roles": ["base", "harden", "node", "pm2"], "vars": WEB1_VARS}}}
    (tmp / "simfleet.yml").write_text(json.dumps(doc))
    return load_inventory_file(tmp / "simfleet.yml", roles_root=[REPO / "roles"])


def answer(request: dict, known: dict) -> dict:
    """The agent's facts for `request`, from `known` (learnt) facts, else as on an empty server."""
    out: dict = {"os": OS}
    for kind, keys in request.items():
        if kind == "os":
            continue
        if kind == "run_lock":
            out["run_lock"] = {"acquired": True}
            continue
        have = known.get(kind) or {}
        if kind == "packages":
            installed = have.get("installed") or {}
            out[kind] = {"installed": {k: installed.get(k) for k in keys}, "lists_age": 3600}
            continue
        names = [check_key(k["argv"] if isinstance(k, dict) else k) if kind == "checks" else k
                 for k in keys]
        out[kind] = {k: have.get(k, ABSENT.get(kind)) for k in names}
    return out


def learn_converged(runner: Runner, host) -> tuple[dict, int]:
    """(facts of a converged server for this host's roles, changes still planned against them:
    0 when the simulation is faithful)."""
    ctx = RoleContext(host, runner.inv, OS, False)
    plans = [runner._prepare(host, name, ctx) for name in runner.roles_for(host)]
    for p in plans:
        if not hasattr(p, "resources"):
            raise SystemExit(f"role {p.name}: {p.error}")
    request = ops.merge_requests(p.request for p in plans)
    facts = Facts(answer(request, {}))
    for p in plans:                            # as check mode would: predicted, role by role
        for r in p.resources:
            if any(isinstance(c, Change) for c in r.plan(facts)):
                expect = getattr(r, "expect", None)
                facts = facts.overlay(expect(facts) if expect else {})
    known = dict(facts.raw)
    left = sum(1 for p in plans for r in p.resources
               for c in r.plan(Facts(answer(request, known))) if isinstance(c, Change))
    return known, left


class SimulatedServer:
    """Answers the agent's requests like a converged server. Every host asks the same, so an
    answer is encoded once and reused: the simulation's own CPU stays small next to the
    controller's, which still decodes every answer."""

    def __init__(self, known: dict, latency: float):
        self.known, self.latency = known, latency
        self.encoded: dict[bytes, bytes] = {}         # stdin -> stdout (dict ops: thread-safe)

    def answer(self, op: str, request: dict) -> dict:
        if op == "facts":
            return {"facts": answer(request, self.known)}
        if op == "finish":
            return {"released": True}
        raise AssertionError(f"a converged run sent {op!r}: {request}")


class SimulatedConnection(AgentConn):
    """What the runner needs of provisioner.connection.Connection, on a SimulatedServer: the
    connection and each exec take the server's latency (sleeping, the GIL released)."""

    def __init__(self, server: SimulatedServer):
        super().__init__(server.answer)
        self.server, self.agent_cache = server, True

    def open(self) -> None:
        time.sleep(self.server.latency / 2)

    def run(self, argv, stdin=None, sudo=True, timeout=None) -> Result:
        out = self.server.encoded.get(stdin)
        if out is None:
            out = self.server.encoded[stdin] = super().run(argv, stdin).stdout
        else:
            self.commands += 1
        time.sleep(self.server.latency)
        return Result(0, out, b"", self.server.latency)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)            # every thread of this process
    return r.ru_utime + r.ru_stime


def one_run(inv, hosts, server, forks: int) -> tuple[float, float, dict, list]:
    """(wall s, controller CPU s, recap, execs per host) of one converged run with its events."""
    sink = io.StringIO()
    events = Events(task="provision", env=inv.env, json_out=True, verbose=0, diff=False,
                    check=False, stream_out=sink, stream_err=io.StringIO(), tty=False)
    runner = Runner(inv, events, Options(forks=forks),
                    connect=lambda h: SimulatedConnection(server))
    t0, c0 = time.monotonic(), cpu()
    events.start([h.name for h in hosts])
    results = runner.run(hosts)
    recap = events.recap()
    return time.monotonic() - t0, cpu() - c0, recap, [r.remote_commands for r in results]


def results(runs: list[tuple[float, float, dict, list]], hosts: int, forks: int,
            latency: float) -> dict:
    """The figures of `runs` (one_run's answers): medians, and what the last run did."""
    wall = statistics.median(r[0] for r in runs)
    used = statistics.median(r[1] for r in runs)
    recap, execs = runs[-1][2], runs[-1][3]
    per_host_latency = latency / 2 + max(execs) * latency
    converged = [h for h in recap.get("hosts", {}).values()
                 if not (h["changed"] or h["failed"] or h["unreachable"])]
    return {"hosts": hosts, "forks": forks, "latency": latency, "rounds": len(runs),
            "wall_s": wall, "controller_cpu_s": used, "controller_ms_per_host": used / hosts * 1000,
            "floor_s": math.ceil(hosts / forks) * per_host_latency,
            "changed": recap.get("changed"), "failed": recap.get("failed"),
            "unreachable": recap.get("unreachable"), "converged_hosts": len(converged),
            "execs_min": min(execs), "execs_max": max(execs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=500)
    ap.add_argument("--forks", type=int, default=50, help="as --forks (the task caps it at 50)")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds each exec waits")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also the figures as one JSON line")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        inv = fleet_inventory(Path(tmp), a.hosts)
        hosts = inv.select(None)
        known, left = learn_converged(Runner(inv, None, Options()), hosts[0])
        server = SimulatedServer(known, a.latency)
        one_run(inv, hosts[:min(len(hosts), a.forks)], server, a.forks)   # warm-up: role code
        runs = [one_run(inv, hosts, server, a.forks) for _ in range(a.rounds)]
    r = results(runs, a.hosts, a.forks, a.latency)
    print(f"{a.hosts} simulated converged hosts (roles base, harden, node, pm2), forks "
          f"{a.forks}, {a.latency * 1000:.0f} ms per exec; medians of {a.rounds} runs")
    print(f"controller CPU: {r['controller_cpu_s']:.2f} s, {r['controller_ms_per_host']:.1f} ms "
          "per host (target 15 ms)")
    print(f"wall time:      {r['wall_s']:.2f} s (latency floor at these forks {r['floor_s']:.2f} s; "
          f"CPU {r['controller_cpu_s']:.2f} s on one GIL)")
    print(f"per run: changed {r['changed']}, failed {r['failed']}, "
          f"unreachable {r['unreachable']}; execs per host {r['execs_min']}..{r['execs_max']}")
    if left:
        print(f"note: {left} change(s) per host the simulation could not predict were planned")
    if a.json:
        print(json.dumps({**r, "unpredicted_changes": left}))


if __name__ == "__main__":
    main()

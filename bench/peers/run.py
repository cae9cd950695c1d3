"""Us against pyinfra and ansible-core (and plain Fabric, no idempotence) on the same kind of
testbed server, same workloads, in one run: medians and ratios against ours.

    invoke testbed.up --count 5       # bench01..bench05: one per tool (x --hosts)
    python3 bench/peers/run.py [--hosts 1] [--first 1] [--rounds 3] [--workloads small,provision]
                               [--no-real-roles] [--check-peers] [--json]

Workloads (bench/peers/workload.py), converged (each tool converges its own servers once, not
measured, then `--rounds` runs each, interleaved so that drift on the machine hits all alike):
- small: create a user, touch a file, copy a file, set its owner;
- provision: harden + node + pm2 + postgresql in small (packages, users, sudo, sshd drop-in,
  fail2ban, sysctls, pm2 under systemd, a PostgreSQL role): the same spec for every tool;
- ours also runs our real roles base, harden, node, pm2, postgresql on its own servers (a row
  for reference: about 100 resources where the spec has about 20; --no-real-roles skips it).
Each tool gets its own servers (tools.assign), so none finds another's state. Every measured
run must report no change (else the run stops, naming the tool): converged means converged.

The peers come from the benchmark's own venv (bench/peers/.venv, git-ignored; made by
peer_venv.py with pip's configured index), never the product's environment. `--check-peers`
only makes the venv and checks the files the peers would run (ansible-playbook --syntax-check,
pyinfra's operations and arguments) without any server.
`--json` adds the medians and ratios as one JSON line at the end (bench/all.py reads it).

Servers the real roles ran on are hardened afterwards (root cannot log in over SSH any more):
`invoke testbed.reset benchNN` before another benchmark uses them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
from peers import ansible_play, peer_venv, tools, workload  # noqa: E402

WORKLOADS = ("small", "provision")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=1, help="servers per tool (default 1)")
    ap.add_argument("--first", type=int, default=1, help="the first bench server's number")
    ap.add_argument("--rounds", type=int, default=3, help="measured runs per tool and workload")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--no-real-roles", action="store_true", help="skip the row of our real roles")
    ap.add_argument("--check-peers", action="store_true",
                    help="make the venv and check the peers' files; no server is touched")
    ap.add_argument("--json", action="store_true", help="also the results as one JSON line")
    a = ap.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    bad = [w for w in a.workloads if w not in WORKLOADS]
    if bad or not a.workloads:
        ap.error(f"--workloads: {','.join(bad) or 'none'}: choose from {','.join(WORKLOADS)}")
    for name in ("hosts", "first", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be 1 or more")
    return a


def tools_for(a: argparse.Namespace) -> list[str]:
    return [t for t in tools.TOOLS if not (t == "ours-roles" and a.no_real_roles)]


@dataclass
class Job:
    """One tool on one workload: its command, environment and output parser."""
    tool: str
    workload: str
    argv: list[str]
    parse: object                            # output -> tools.Outcome, or None: no report
    env: dict = field(default_factory=dict)
    walls: list[float] = field(default_factory=list)
    execs: int | None = None


def jobs(a: argparse.Namespace, tmp: Path, venv: Path) -> list[Job]:
    from provisioner.testbed import config
    layout = config.layout(150)
    where = tools.assign(tools_for(a), a.hosts, a.first)
    address = {s.name: s.address for s in layout.servers}
    src = tmp / "copied.txt"
    src.write_text(workload.COPY_TEXT)
    specs = {"small": workload.small(src), "provision": workload.provision()}
    specs = {w: specs[w] for w in a.workloads}
    out: list[Job] = []
    inventories = {}
    for w in a.workloads:
        inventories[w] = tools.ours_inventory(w, {h: address[h] for h in where["ours"]},
                                              [tools.SPEC_ROLES[w]], real=False, gateway=layout.gateway)
    if "ours-roles" in where and "provision" in a.workloads:
        inventories["roles"] = tools.ours_inventory("roles", {h: address[h] for h in where["ours-roles"]},
                                                    list(tools.ROLES), real=True, gateway=layout.gateway)
    root = tools.ours_root(tmp / "ours", specs, inventories)
    for w, spec in specs.items():
        spec_file = workload.write(spec, tmp / f"{w}.json")
        out.append(Job("ours", w, tools.ours_argv(root, w), tools.ours_outcome))
        hosts = {h: address[h] for h in where["pyinfra"]}
        inv = tmp / f"pyinfra-{w}.py"
        inv.write_text(tools.pyinfra_inventory(hosts))
        out.append(Job("pyinfra", w, tools.pyinfra_argv(venv, inv), tools.pyinfra_outcome,
                       {"PEERS_SPEC": str(spec_file)}))
        files = ansible_play.write(spec, {h: address[h] for h in where["ansible"]}, tools.KEY,
                                   tools.KNOWN_HOSTS, tmp / f"ansible-{w}")
        out.append(Job("ansible", w, tools.ansible_argv(venv, files), tools.ansible_outcome,
                       {"ANSIBLE_CONFIG": str(files["config"]), "ANSIBLE_NOCOLOR": "1"}))
        if w == "small":
            out.append(Job("fabric", w, tools.fabric_argv(spec_file, [address[h] for h in where["fabric"]]),
                           None))
        if w == "provision" and "roles" in inventories:
            out.append(Job("ours-roles", w, tools.ours_argv(root, "roles"), tools.ours_outcome))
    return out


def run(job: Job, *, converged: bool) -> float:
    """One run of the job; its wall time. SystemExit when it failed, or changed something on
    a run that must be converged."""
    t0 = time.monotonic()
    p = subprocess.run(job.argv, env={**os.environ, **job.env}, capture_output=True, text=True,
                       timeout=1800)
    wall = time.monotonic() - t0
    output = p.stdout + "\n" + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"{job.tool} {job.workload}: exit {p.returncode}\n{output[-3000:]}")
    if job.parse is not None:
        outcome = job.parse(p.stdout if job.tool.startswith("ours") else output)
        if outcome.failed or (converged and outcome.changed):
            raise SystemExit(f"{job.tool} {job.workload}: not a converged run ({outcome})\n"
                             f"{output[-3000:]}")
        job.execs = outcome.execs
    return wall


def results(done: list[Job]) -> dict[str, dict[str, dict]]:
    """{workload: {tool: {"median" s, "ratio" to ours (None without ours), "runs", "execs"}}}."""
    out: dict[str, dict[str, dict]] = {}
    for w in WORKLOADS:
        rows = [j for j in done if j.workload == w]
        ours = next((statistics.median(j.walls) for j in rows if j.tool == "ours"), None)
        for j in rows:
            m = statistics.median(j.walls)
            out.setdefault(w, {})[j.tool] = {"median": m, "ratio": m / ours if ours else None,
                                             "runs": j.walls, "execs": j.execs}
    return out


def table(done: list[Job]) -> list[str]:
    """The lines printed: per workload, each tool's median and its ratio to ours."""
    lines = [f"{'workload':<10} {'tool':<11} {'median s':>9} {'x ours':>7}  runs"]
    for w, tools_ in results(done).items():
        for tool, r in tools_.items():
            ratio = f"{r['ratio']:>7.2f}" if r["ratio"] is not None else f"{'-':>7}"
            runs = " ".join(f"{x:.2f}" for x in r["runs"])
            extra = f"  ({r['execs']} SSH execs per host)" if r["execs"] is not None else ""
            lines.append(f"{w:<10} {tool:<11} {r['median']:>9.2f} {ratio}  {runs}{extra}")
    return lines


def check_peers(venv: Path, tmp: Path) -> None:
    """Without any server: ansible's syntax check of both playbooks, and every pyinfra
    operation and argument the deploy uses, looked up in the installed pyinfra."""
    src = tmp / "copied.txt"
    src.write_text(workload.COPY_TEXT)
    for w, spec in (("small", workload.small(src)), ("provision", workload.provision())):
        files = ansible_play.write(spec, {"bench01": "192.0.2.1"}, tools.KEY, tools.KNOWN_HOSTS,
                                   tmp / f"ansible-{w}")
        subprocess.run([*tools.ansible_argv(venv, files), "--syntax-check"], check=True,
                       env={**os.environ, "ANSIBLE_CONFIG": str(files["config"])})
        check_ansible_arguments(venv, spec)
    subprocess.run([str(venv / "bin" / "python"), "-c", PYINFRA_CHECK,
                    str(tools.HERE / "pyinfra_deploy.py")], check=True)
    print("peers' files: ok")


def check_ansible_arguments(venv: Path, spec: dict) -> None:
    """Every module argument of the playbook is one the module documents (ansible-doc), which
    --syntax-check does not look at."""
    used = ansible_play.arguments(ansible_play.playbook(spec))
    p = subprocess.run([str(venv / "bin" / "ansible-doc"), "-j", *sorted(used)], check=True,
                       capture_output=True, text=True)
    docs = {m: d["doc"]["options"] for m, d in json.loads(p.stdout).items()}
    for module, args in used.items():
        known = {a for name, o in docs[module].items() for a in (name, *(o.get("aliases") or ()))}
        if args - known:
            raise SystemExit(f"{module}: unknown arguments {sorted(args - known)}")
    print(f"ansible: arguments of {', '.join(sorted(used))} checked")


# Every `module.operation(..., keyword=...)` call in the deploy file names an operation
# pyinfra has and keywords it takes (its own or the global ones: name, _if, _sudo ...).
PYINFRA_CHECK = """
import ast, inspect, sys
from pyinfra.api.arguments import all_global_arguments
import pyinfra.operations as ops
tree = ast.parse(open(sys.argv[1]).read())
glob = {k for k, _ in all_global_arguments()} | {"name"}
n = 0
for call in ast.walk(tree):
    f = call.func if isinstance(call, ast.Call) else None
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in ("apt", "files", "server", "systemd"):
        __import__("pyinfra.operations." + f.value.id)
        op = getattr(getattr(ops, f.value.id), f.attr)
        params = set(inspect.signature(op).parameters)
        bad = [k.arg for k in call.keywords if k.arg not in params | glob]
        assert not bad, f"{f.value.id}.{f.attr}: unknown arguments {bad}"
        n += 1
print(f"pyinfra: {n} operation calls checked")
"""


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    venv = peer_venv.ensure()
    with tempfile.TemporaryDirectory() as tmp:
        if a.check_peers:
            check_peers(venv, Path(tmp))
            return
        todo = jobs(a, Path(tmp), venv)
        where = tools.assign(tools_for(a), a.hosts, a.first)
        print("servers: " + "; ".join(f"{t} {','.join(h)}" for t, h in where.items()))
        print("versions: " + ", ".join(f"{k} {v}" for k, v in peer_venv.versions(venv).items()))
        for job in todo:                      # converge, not measured
            t = run(job, converged=False)
            print(f"converged {job.tool} {job.workload} in {t:.1f} s", flush=True)
        for _ in range(a.rounds):
            for job in todo:
                job.walls.append(run(job, converged=True))
    print(f"converged runs on {a.hosts} host(s) per tool, median of {a.rounds}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print("\n".join(table(todo)))
    if "ours-roles" in where and "provision" in a.workloads:
        print(f"hardened by our real roles: {', '.join(where['ours-roles'])} (root cannot log in "
              "any more): `invoke testbed.reset NAME` before another benchmark uses them")
    if a.json:
        print(json.dumps({"rounds": a.rounds, "hosts": a.hosts, "servers": where,
                          "results": results(todo)}))


if __name__ == "__main__":
    main()

"""Issue 18's benchmarks in one run, then one table: each figure against its target, met or not.

    python3 bench/all.py [--rounds N] [--skip startup,simulated,peers,fleet,fresh]

In this order: the ones without a server (startup.py, simulated_fleet.py with 500 hosts),
then `invoke testbed.up --count 50` (a no-op when they are up; more bench servers than that
are kept), peers/run.py on bench01..05, those five servers reset, fleet_cpu.py on bench01..50
and fresh_provision.py on the local env's servers (it resets them itself).

Each benchmark runs as its own process with `--json`, exactly as it runs alone: its figures are
the ones it gives alone (fleet_cpu.py counts its controller's CPU with getrusage(RUSAGE_SELF),
which then holds nothing of the others'), and one that fails leaves the next ones running. Its
output passes through as it comes; its JSON line is kept for the table. `--rounds` goes to
every benchmark (else each uses its own default); `--skip` leaves benchmarks out, and the table
says so. Exit status 1 when a benchmark failed: a missed target is a result, not a failure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]
from peers import tools  # noqa: E402
from provisioner.humanize import columns  # noqa: E402

# name: (script, the arguments the figures below rely on), in the order they run
PARTS = {
    "startup": ("startup.py", []),
    "simulated": ("simulated_fleet.py", ["--hosts", "500", "--forks", "50"]),
    "peers": ("peers/run.py", ["--hosts", "1", "--first", "1"]),
    "fleet": ("fleet_cpu.py", ["--sizes", "1,10,20,50"]),
    "fresh": ("fresh_provision.py", []),
}
ON_SERVERS = ("peers", "fleet", "fresh")
FLEET_SIZES = (1, 10, 20, 50)
SIMULATED_HOSTS = 500
# the servers peers/run.py gives its tools with --hosts 1 --first 1: bench05 is hardened by our
# real roles (root cannot log in, as fleet_cpu.py does), and the others keep their workloads'
# services running (PostgreSQL, pm2, fail2ban), whose CPU fleet_cpu.py's server figure would count
PEER_SERVERS = [n for names in tools.assign(list(tools.TOOLS), 1, 1).values() for n in names]
PEER_TOOLS = {"small": ("ours", "pyinfra", "ansible", "fabric"),
              "provision": ("ours", "pyinfra", "ansible", "ours-roles")}
STARTUP_FIRST_CONNECT = "provision web1: to 1st connect"          # startup.py's row name


class PartFailed(Exception):
    pass


@dataclass(frozen=True)
class Figure:
    part: str                   # the benchmark it comes from (a key of PARTS)
    name: str
    value: float | None         # None: not measured
    fmt: str                    # how value and target print, e.g. "{:.2f} s"
    target: float | None = None  # None: shown for reference, nothing to meet
    at_least: bool = False      # the target is a floor (else a ceiling)
    note: str = ""              # printed after the value, e.g. "1.31x ours"


def dig(d: dict | None, *keys):
    """d[k1][k2]... or None where a level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def figures(res: dict[str, dict]) -> list[Figure]:
    """Every figure of the table, from the benchmarks' JSON lines (`res`: part -> its dict; a
    part that gave none is absent and its figures have no value)."""
    st, sim, peers, fleet, fresh = (res.get(p) for p in PARTS)
    out = [Figure("startup", "invoke --list, wall", dig(st, "wall", "invoke --list"), "{:.2f} s"),
           Figure("startup", "provision web1 up to its first connect, wall",
                  dig(st, "wall", STARTUP_FIRST_CONNECT), "{:.2f} s"),
           Figure("simulated", f"controller CPU per host, {SIMULATED_HOSTS} simulated hosts",
                  dig(sim, "controller_ms_per_host"), "{:.1f} ms", 15.0),
           Figure("simulated", "simulated hosts planned and reported converged, forks 50",
                  dig(sim, "converged_hosts"), "{:.0f} hosts", SIMULATED_HOSTS, at_least=True)]
    for w, what, target in (("small", "four-step workload, converged", 0.5),
                            ("provision", "provision (harden, node, pm2, postgresql), converged", 1.0)):
        for tool in PEER_TOOLS[w]:
            r = dig(peers, "results", w, tool) or {}
            ratio = r.get("ratio")
            note = f"{ratio:.2f}x ours" if ratio is not None and tool != "ours" else ""
            out.append(Figure("peers", f"{what}: {tool}", r.get("median"), "{:.2f} s",
                              target if tool == "ours" else None, note=note))
    for n in FLEET_SIZES:
        r = dig(fleet, "hosts", str(n)) or {}
        servers = f"{n} server{'s' if n > 1 else ''}"
        out += [Figure("fleet", f"controller CPU per host, {servers}", r.get("controller_ms"),
                       "{:.1f} ms", 15.0),
                Figure("fleet", f"server CPU per host, {servers}", r.get("server_cpu_s"),
                       "{:.3f} CPU-s", 0.15)]
    execs = [e for n in FLEET_SIZES if (e := dig(fleet, "hosts", str(n), "execs")) is not None]
    out += [Figure("fleet", "SSH execs per host, converged (most of any size)",
                   max(execs) if execs else None, "{:.0f}", 3),
            Figure("fresh", "fresh provision of web1 (base, harden, node, pm2), warm package cache",
                   dig(fresh, "fresh", "web1"), "{:.1f} s", 35.0),
            Figure("fresh", "fresh provision of web1, all its roles, warm package cache",
                   dig(fresh, "fresh", "web1-all"), "{:.1f} s", None),
            Figure("fresh", "fresh provision of the local env, warm package cache",
                   dig(fresh, "fresh", "env"), "{:.1f} s", 60.0),
            Figure("fresh", "converged provision of web1, all its roles",
                   dig(fresh, "converged", "web1-all", "wall"), "{:.2f} s", 1.0)]
    for what in ("web1-all", "env"):
        per_host = dig(fresh, "converged", what, "execs")
        out.append(Figure("fresh", f"SSH execs per host, converged {what}",
                          max(per_host) if per_host else None, "{:.0f}", 3))
    return out


def verdict(f: Figure, status: str) -> str:
    """met / MISSED against the target; "-" without one; without a value, why: the part's
    status (skipped, failed ...) or "not measured" when it ran and still gave none."""
    if f.value is None:
        return "not measured" if status == "ran" else status
    if f.target is None:
        return "-"
    ok = f.value >= f.target if f.at_least else f.value <= f.target
    return "met" if ok else "MISSED"


def summary(figs: list[Figure], status: dict[str, str]) -> list[str]:
    """The closing table (a row per figure) and a line of counts. `status`: part -> "ran",
    "skipped" or "failed (...)"."""
    rows = [("benchmark", "figure", "measured", "target", "verdict")]
    verdicts = []
    for f in figs:
        measured = "-" if f.value is None else f.fmt.format(f.value) + (f" ({f.note})" if f.note else "")
        target = "-" if f.target is None else (">= " if f.at_least else "<= ") + f.fmt.format(f.target)
        verdicts.append(verdict(f, status[f.part]))
        rows.append((f.part, f.name, measured, target, verdicts[-1]))
    with_target = [v for v, f in zip(verdicts, figs) if f.target is not None]
    met, missed = with_target.count("met"), with_target.count("MISSED")
    line = f"targets: {met} met, {missed} missed"
    if len(with_target) > met + missed:
        line += f", {len(with_target) - met - missed} not measured"
    for what in ("skipped", "failed"):
        parts = [f"{p} ({PARTS[p][0]})" for p in PARTS if status.get(p, "").startswith(what)]
        if parts:
            line += f"; {what}: {', '.join(parts)}"
    return columns(rows) + [line]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, help="passed to every benchmark (default: each its own)")
    ap.add_argument("--skip", default="", help=f"leave out some of {','.join(PARTS)}")
    a = ap.parse_args(argv)
    a.skip = [s for s in a.skip.split(",") if s]
    bad = [s for s in a.skip if s not in PARTS]
    if bad:
        ap.error(f"--skip: {','.join(bad)}: choose from {','.join(PARTS)}")
    if a.rounds is not None and a.rounds < 1:
        ap.error("--rounds must be 1 or more")
    return a


def run_part(argv: list[str]) -> dict:
    """Run one benchmark (argv ends with --json): its output printed as it comes, and the JSON
    object it printed (the last one, should there be more). PartFailed if it failed."""
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    found = None
    for line in p.stdout:
        try:
            doc = json.loads(line) if line.startswith("{") else None
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            found = doc
        else:
            print(line, end="", flush=True)
    code = p.wait()
    if code != 0:
        raise PartFailed(f"exit {code}")
    if found is None:
        raise PartFailed("no JSON line")
    return found


def bench_servers_up() -> int:
    from provisioner.testbed import current_layout
    return sum(1 for s in current_layout().servers if s.name.startswith("bench"))


def testbed_up(count: int) -> None:
    subprocess.run([sys.executable, "-m", "invoke", "testbed.up", "--count", str(count)],
                   cwd=REPO, check=True)


def reset(names: list[str]) -> None:
    from provisioner import testbed
    for name in names:
        testbed.reset(name, log=lambda m: None)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rounds = [] if a.rounds is None else ["--rounds", str(a.rounds)]
    status = {p: "skipped" for p in a.skip}           # every part gets one: ran, failed (...)
    results: dict[str, dict] = {}

    def bench(part: str) -> None:
        script, args = PARTS[part]
        print(f"\n=== {script} ===", flush=True)
        try:
            # -u: its progress as it comes. Not PYTHONUNBUFFERED, which the tools it measures
            # (ansible, pyinfra, invoke) would inherit
            results[part] = run_part([sys.executable, "-u", str(BENCH / script), *args, *rounds,
                                      "--json"])
            status[part] = "ran"
        except PartFailed as e:
            status[part] = f"failed ({e})"

    for part in ("startup", "simulated"):
        if part not in status:
            bench(part)
    todo = [p for p in ON_SERVERS if p not in status]
    if todo:
        wanted = FLEET_SIZES[-1] if "fleet" in todo else len(PEER_SERVERS) if "peers" in todo else 0
        count = max(wanted, bench_servers_up())     # never take down bench servers others use
        print(f"\n=== invoke testbed.up --count {count} ===", flush=True)
        try:
            testbed_up(count)
        except subprocess.CalledProcessError as e:
            status.update((p, f"failed (testbed.up exit {e.returncode})") for p in todo)
            todo = []
    if "peers" in todo:
        try:
            bench("peers")
        finally:             # also after a failure: the real roles may have hardened bench05
            print(f"resetting {', '.join(PEER_SERVERS)}, the peers' servers", flush=True)
            try:
                reset(PEER_SERVERS)
            except Exception as e:      # whatever it was, the summary still comes
                print(f"reset: {e}", file=sys.stderr, flush=True)
                if "fleet" in todo:     # it logs in as root on those servers
                    status["fleet"] = "failed (the peers' servers were not reset)"
                    todo.remove("fleet")
    for part in ("fleet", "fresh"):
        if part in todo:
            bench(part)
    said = f"--rounds {a.rounds}" if a.rounds else "each benchmark's own rounds"
    print(f"\n=== summary ({said}; medians) ===")
    print("\n".join(summary(figures(results), status)), flush=True)
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

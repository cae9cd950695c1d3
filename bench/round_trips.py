"""What each round-trip saving is worth on a converged run of one testbed server, in one run:
the run as shipped against the same run without TCP_NODELAY, without the agent's cache on the
server (the source sent and compiled on every exec), and without either nor `python3 -I -S`
(as before issue 18). Prints medians of wall time and of the server's CPU, and each ratio.

    invoke testbed.up --count 1
    python3 bench/round_trips.py [--host bench01] [--roles base,opsdemo] [--rounds 7]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
from engine_helpers import inventory  # noqa: E402
from fleet_cpu import server_cpu  # noqa: E402
from provisioner import agent, connection  # noqa: E402
from provisioner.events import Events  # noqa: E402
from provisioner.runner import Options, Runner  # noqa: E402

SHIPPED = {"nodelay": True, "cache": True, "isolated": True}
VARIANTS = {
    "as shipped": SHIPPED,
    "without TCP_NODELAY": {**SHIPPED, "nodelay": False},
    "agent sent every exec": {**SHIPPED, "cache": False},
    "as before issue 18": {"nodelay": False, "cache": False, "isolated": False},
}


def run_once(inv, name: str, variant: dict) -> tuple[float, float | None, dict]:
    """(wall s, server CPU s, the host's recap) of one run with `variant`'s settings."""
    no_delay, command = connection._no_delay, agent.command

    def connect(h):
        c = connection.Connection(h, inv.known_hosts, h.sudo_password)
        c.agent_cache = True if variant["cache"] else None
        return c
    if not variant["nodelay"]:
        connection._no_delay = lambda conn: None
    if not variant["isolated"]:
        agent.command = lambda python="python3", cache_dir=None: \
            [python, "-c", agent.BOOTSTRAP, cache_dir or agent.CACHE_DIR]
    try:
        events = Events(task="provision", env=inv.env, json_out=True, verbose=0, diff=False,
                        check=False, stream_out=io.StringIO(), stream_err=io.StringIO())
        hosts = inv.select(name)
        s0, t0 = server_cpu([name]), time.monotonic()
        events.start([name])
        Runner(inv, events, Options(), connect=connect).run(hosts)
        wall, s1 = time.monotonic() - t0, server_cpu([name])
        recap = events.recap()
    finally:
        connection._no_delay, agent.command = no_delay, command
    return wall, None if s0 is None or s1 is None else s1 - s0, recap["hosts"][name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="bench01")
    ap.add_argument("--roles", default="base,opsdemo")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    got: dict[str, list] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        inv = inventory(Path(tmp), [a.host], a.roles.split(","), name="roundtrips")
        run_once(inv, a.host, SHIPPED)                      # converge (and cache the agent)
        for _ in range(a.rounds):                           # interleaved: drift hits all alike
            for v, settings in VARIANTS.items():
                wall, server, host = run_once(inv, a.host, settings)
                if host["changed"] or host["failed"] or host["unreachable"]:
                    raise SystemExit(f"{v}: not a converged run: {host}")
                got[v].append((wall, server, host["remote_commands"]))
    base_wall = statistics.median(r[0] for r in got["as shipped"])
    servers = [r[1] for r in got["as shipped"] if r[1] is not None]
    base_server = statistics.median(servers) if servers else None
    print(f"converged run of {a.host}, roles {a.roles}; medians of {a.rounds} runs")
    print(f"{'':<24} {'wall s':>7} {'ratio':>6} {'server CPU-s':>13} {'ratio':>6} {'execs':>6}")
    for v, rows in got.items():
        wall = statistics.median(r[0] for r in rows)
        server_s = [r[1] for r in rows if r[1] is not None]
        server = statistics.median(server_s) if server_s else None
        ratio = f"{server / base_server:>6.2f}" if server and base_server else f"{'n/a':>6}"
        print(f"{v:<24} {wall:>7.3f} {wall / base_wall:>6.2f} "
              f"{server if server is not None else float('nan'):>13.3f} {ratio} "
              f"{max(r[2] for r in rows):>6}")


if __name__ == "__main__":
    main()

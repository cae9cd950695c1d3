"""The load balancer's cost, measured in one run: the same bounded load (a fixed number of
GETs of the sample app's /, a few keep-alive connections) through lb1 over HTTPS, then
straight to one app server's port 3000. Reports requests/s and p50/p99 latency of each; no
target, nothing asserted.

    python3 bench/lb_latency.py [--requests 2000] [--threads 8] [--direct web1]

Needs the testbed with the local env provisioned (`invoke testbed.up`, then
`invoke provision --env local`): lb1 serving app.test with a certificate from the testbed's
pebble, whose root (`.testbed/pebble-root.pem`) is the only trust anchor used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from engine_helpers import ADDRESSES  # noqa: E402
from http_load import Connection, PlainConnection, load, trusting  # noqa: E402
from provisioner.testbed import acme  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="GETs per measurement (bounded)")
    p.add_argument("--threads", type=int, default=8, help="concurrent keep-alive connections")
    p.add_argument("--direct", default="web1", help="the app server measured directly")
    a = p.parse_args()
    if not 1 <= a.requests <= 20000 or not 1 <= a.threads <= 64:
        p.error("--requests 1..20000 and --threads 1..64 keep the load bounded")
    ctx = trusting(str(acme.ROOT_FILE))
    runs = {
        "through lb1 (https)": lambda: Connection("app.test", ADDRESSES["lb1"], ctx),
        f"direct {a.direct}:3000 (http)": lambda: PlainConnection("app.test", ADDRESSES[a.direct], 3000),
    }
    for what, connect in runs.items():
        load(connect, min(100, a.requests), a.threads)              # warm-up, not counted
        print(f"{what:<28} {load(connect, a.requests, a.threads).summary()}")


if __name__ == "__main__":
    main()

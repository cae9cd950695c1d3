"""Measures the testbed targets: `up` of the 4 default servers from a cached base, `up` of 20
servers, and the memory of an idle server. Run as root: python3 bench/testbed_up.py"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provisioner import testbed as tb  # noqa: E402


def timed_up(count: int) -> float:
    tb.down(log=lambda m: None)
    t0 = time.monotonic()
    tb.up(count, log=lambda m: None)
    return time.monotonic() - t0


def main() -> None:
    tb.up(0, log=print)                         # make sure the base is cached first
    four = timed_up(0)
    twenty = timed_up(20 - len(tb.current_layout(0).servers))
    time.sleep(20)                              # let boot-time jobs finish: measure idle
    mem = [r.memory_mib for r in tb.status() if r.memory_mib]
    again = time.monotonic()
    tb.up(20 - 4, log=lambda m: None)
    again = time.monotonic() - again
    tb.down(log=lambda m: None)
    print(f"up, 4 servers, cached base: {four:.1f} s (target <= 20 s)")
    print(f"up, 20 servers:             {twenty:.1f} s (target <= 60 s)")
    print(f"up again (no-op), 20:       {again:.2f} s")
    print(f"idle server memory (PSS):   median {statistics.median(mem):.1f} MiB, max {max(mem):.1f} MiB "
          f"(target <= 60 MB)")


if __name__ == "__main__":
    main()

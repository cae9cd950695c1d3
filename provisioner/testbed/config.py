"""Where the testbed keeps things, and which servers it builds.

The servers of the default testbed are the hosts of `inventories/local.yml`: the inventory is the
one place that names them and their addresses, so the testbed and the engine cannot disagree.
`--count N` adds N benchmark servers (`bench01`...) on the same subnet.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("PROVISIONER_TESTBED_STATE", REPO / ".testbed"))
# Outside the work tree: the base image is shared by every checkout on this machine.
CACHE_DIR = Path(os.environ.get("PROVISIONER_TESTBED_CACHE", "/var/cache/provisioner-testbed"))
# Servers' writable layers; one folder per checkout so two clones never share a server.
def run_dir_of(checkout: Path | str) -> Path:
    return Path(os.environ.get("PROVISIONER_TESTBED_RUN", "/var/lib/provisioner-testbed")) / (
        hashlib.sha256(str(checkout).encode()).hexdigest()[:10])


RUN_DIR = run_dir_of(REPO)
BRIDGE = os.environ.get("PROVISIONER_TESTBED_BRIDGE", "pvtb0")
PROXY_PORT = 8888        # package_proxy.py: HTTPS CONNECT for npm and pip
APT_CACHE_PORT = 3142    # package_proxy.py: plain-HTTP apt, .debs cached across runs
BENCH_FIRST_HOST = 101   # bench01 gets .101 of the subnet
LOCAL_INVENTORY = REPO / "inventories" / "local.yml"


@dataclass(frozen=True)
class ServerSpec:
    name: str
    address: str
    release: str = "bookworm"       # a key of base.RELEASES


@dataclass(frozen=True)
class Layout:
    subnet: ipaddress.IPv4Network
    gateway: str                      # the host side of the bridge; proxies listen here
    servers: tuple[ServerSpec, ...]

    def server(self, name: str) -> ServerSpec:
        for s in self.servers:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.servers)
        raise TestbedError(f"no test server named {name!r}; the testbed has: {known}")


class TestbedError(Exception):
    """Bad input or an unmet precondition: the message says what to do."""

    exit_code = 2


def inventory_servers(path: Path = LOCAL_INVENTORY) -> list[ServerSpec]:
    from provisioner.inventory import read_yaml   # the inventory's own reader: it knows !vault

    if not path.exists():
        raise TestbedError(f"{path} is missing: the testbed builds the hosts it lists")
    problems: list = []
    doc = read_yaml(path, problems)
    from .base import DEFAULT_RELEASE, RELEASES
    try:
        hosts = doc.data["hosts"]
        specs = [ServerSpec(name, str(h["address"]),
                            str((h.get("testbed") or {}).get("release", DEFAULT_RELEASE)))
                 for name, h in hosts.items()]
    except (KeyError, TypeError, AttributeError) as e:
        detail = "; ".join(str(p) for p in problems) or f"no {e}"
        raise TestbedError(f"{path}: cannot read hosts and their addresses ({detail}); "
                           "fix the file, `invoke check --env local` lists every problem") from None
    for spec in specs:
        if spec.release not in RELEASES:
            raise TestbedError(f"{path}: host {spec.name}: testbed release {spec.release!r} is not "
                               f"one the testbed builds; choose one of {', '.join(RELEASES)}")
    return specs


def layout(count: int = 0, inventory: Path = LOCAL_INVENTORY) -> Layout:
    servers = inventory_servers(inventory)
    if not servers:
        raise TestbedError(f"{inventory} lists no hosts")
    subnet = ipaddress.ip_network(f"{servers[0].address}/24", strict=False)
    for s in servers:
        addr = ipaddress.ip_address(s.address)
        if addr not in subnet:
            raise TestbedError(f"{inventory}: host {s.name} has address {s.address}, outside "
                               f"the testbed subnet {subnet} set by the first host; keep all local "
                               "hosts on one /24")
        if int(addr) & 0xFF in (0, 1, 255) or int(addr) & 0xFF >= BENCH_FIRST_HOST:
            raise TestbedError(f"{inventory}: host {s.name} address {s.address} is reserved "
                               f"(.1 is the host side, .{BENCH_FIRST_HOST}+ are bench servers)")
    if count < 0 or count > 150:
        raise TestbedError(f"--count {count}: choose between 0 and 150 benchmark servers")
    base = int(subnet.network_address)
    servers += [ServerSpec(f"bench{i:02d}", str(ipaddress.ip_address(base + BENCH_FIRST_HOST + i - 1)))
                for i in range(1, count + 1)]
    return Layout(subnet, str(ipaddress.ip_address(base + 1)), tuple(servers))

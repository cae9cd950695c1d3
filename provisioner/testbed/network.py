"""The test network: one host bridge and the two package proxies listening on its host side.

No NAT and no forwarding: servers reach the package registries only through the proxies.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import procs
from .config import APT_CACHE_PORT, BRIDGE, CACHE_DIR, PROXY_PORT, REPO, STATE_DIR, Layout, TestbedError

CONNECT_PROXY = str(Path(__file__).with_name("connect_proxy.py"))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def interfaces() -> list[dict]:
    return json.loads(ip("-j", "addr", "show").stdout)


def check_subnet(lay: Layout) -> None:
    """Refuse a subnet that overlaps an address this machine already uses (other than ours)."""
    for iface in interfaces():
        if iface["ifname"] == BRIDGE:
            continue
        for a in iface.get("addr_info", []):
            if a.get("family") != "inet":
                continue
            net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            if net.overlaps(lay.subnet):
                raise TestbedError(
                    f"the test subnet {lay.subnet} clashes with {a['local']}/{a['prefixlen']} on "
                    f"{iface['ifname']}; move the hosts of inventories/local.yml to a free private "
                    "/24 (for example 10.77.0.0/24) and run again")


OWNERS = Path("/run/provisioner-testbed")     # tmpfs: gone after a reboot, like the bridge


def _owner_file() -> Path:
    return OWNERS / f"{BRIDGE}.owner"


def check_owner() -> None:
    """One testbed per bridge: another checkout's servers would clash with ours on the same
    addresses, and its teardown would cut ours off."""
    try:
        owner = _owner_file().read_text().strip()
    except OSError:
        return
    if owner != str(REPO) and ip("link", "show", BRIDGE, check=False).returncode == 0:
        raise TestbedError(
            f"the bridge {BRIDGE} belongs to the testbed of the checkout at {owner}; run "
            f"`invoke testbed.down` there first, or give this checkout its own bridge and subnet "
            f"(PROVISIONER_TESTBED_BRIDGE and the addresses in inventories/local.yml)")


def bridge_up(lay: Layout) -> None:
    check_owner()
    OWNERS.mkdir(parents=True, exist_ok=True)
    _owner_file().write_text(f"{REPO}\n")
    cidr = f"{lay.gateway}/{lay.subnet.prefixlen}"
    if ip("link", "show", BRIDGE, check=False).returncode != 0:
        ip("link", "add", BRIDGE, "type", "bridge")
    addrs = {f"{a['local']}/{a['prefixlen']}" for i in interfaces() if i["ifname"] == BRIDGE
             for a in i.get("addr_info", []) if a.get("family") == "inet"}
    for stale in addrs - {cidr}:          # a crashed run with another subnet
        ip("addr", "del", stale, "dev", BRIDGE)
    if cidr not in addrs:
        ip("addr", "add", cidr, "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")


def bridge_down() -> bool:
    """Remove our bridge; another checkout's is left alone (its servers are on it)."""
    try:
        check_owner()
    except TestbedError:
        return False
    _owner_file().unlink(missing_ok=True)
    if ip("link", "show", BRIDGE, check=False).returncode != 0:
        return False
    ip("link", "del", BRIDGE)
    return True


def _wait_port(host: str, port: int, what: str, pidfile: Path, marker: str,
               timeout: float = 10.0) -> None:
    """Until the port answers, and it is our process that answers it (not one that held the
    port before ours started, which then failed to bind)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            if procs.running(pidfile, marker) is None:
                raise TestbedError(f"{host}:{port} answers, but not {what}, which exited; "
                                   f"see {STATE_DIR / 'logs'}. Stop what listens there "
                                   f"(`ss -ltnp 'sport = :{port}'`) and run again")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TestbedError(f"{what} did not start listening on {host}:{port}; "
                                   f"see {STATE_DIR / 'logs'}") from None
            time.sleep(0.05)


def proxies_up(lay: Layout, registry_hosts) -> None:
    """registry_hosts(): the host names of the registries servers may reach over HTTPS (read
    from this machine's configuration only when the CONNECT proxy must be started)."""
    run = STATE_DIR / "run"
    logs = STATE_DIR / "logs"
    run.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)

    pidfile = run / "connect-proxy.pid"
    if procs.running(pidfile, CONNECT_PROXY) is None:
        hosts = [a for h in registry_hosts() for a in ("--allow-host", h)]
        procs.spawn([sys.executable, CONNECT_PROXY, "--listen", str(lay.gateway), "--port",
                     str(PROXY_PORT), "--allow", str(lay.subnet), "--port-allowed", "443",
                     *hosts, "--user", "nobody"],
                    logs / "connect-proxy.log", pidfile)
    _wait_port(lay.gateway, PROXY_PORT, "the HTTPS proxy", pidfile, CONNECT_PROXY)

    # apt-cacher-ng keeps downloaded .debs under the shared cache, across runs and checkouts.
    cache = CACHE_DIR / "apt-cacher-ng"
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(cache)], check=True)
    acng_logs = run / "apt-cacher-ng-logs"
    acng_logs.mkdir(exist_ok=True)
    subprocess.run(["chown", "nobody:nogroup", str(acng_logs)], check=True)
    # Its own config folder: Debian's holds a root-only security.conf, and clients name the full
    # mirror URL (proxy mode), so no backend remapping is needed.
    acng_conf = run / "apt-cacher-ng-conf"
    acng_conf.mkdir(exist_ok=True)
    (acng_conf / "acng.conf").write_text("# settings are passed on the command line\n")
    pidfile = run / "apt-cacher-ng.pid"
    marker = f"BindAddress={lay.gateway}"
    procs.ensure(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 "/usr/sbin/apt-cacher-ng", "-c", str(acng_conf), "ForeGround=1",
                 marker, f"Port={APT_CACHE_PORT}", f"CacheDir={cache}", f"LogDir={acng_logs}",
                 "SocketPath=", "ReportPage=", "ExThreshold=0",
                 # Index files (dists/) pass through uncached: servers that refresh the same
                 # InRelease in the same second hit apt-cacher-ng's rename race ("Failure to
                 # move file ... File exists"), which sent one of them a truncated file that
                 # hung its apt-get update. Only pool/ files (.debs, immutable) are cached.
                 "DontCacheRequested=/dists/",
                 # No PassThroughPattern: CONNECT is refused here. HTTPS goes through
                 # connect_proxy.py, which tunnels to the registries only.
                 ],
                 logs / "apt-cacher-ng.log", pidfile, marker)
    _wait_port(lay.gateway, APT_CACHE_PORT, "apt-cacher-ng", pidfile, marker)


def proxies_down() -> list[str]:
    run = STATE_DIR / "run"
    stopped = []
    # tinyproxy: what testbeds started before connect_proxy.py replaced it
    for name, marker in (("connect-proxy", CONNECT_PROXY), ("apt-cacher-ng", "BindAddress="),
                         ("tinyproxy", "tinyproxy.conf")):
        if procs.stop(run / f"{name}.pid", marker):
            stopped.append(name)
    return stopped

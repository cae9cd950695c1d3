"""The test network: one host bridge and the package proxy listening on its host side.

No NAT and no forwarding: servers reach the package registries only through the proxies.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from . import procs
from .config import (APT_CACHE_PORT, BRIDGE, CACHE_DIR, PROXY_PORT, REPO, STATE_DIR, Layout,
                     TestbedError, run_dir_of)

PACKAGE_PROXY = str(Path(__file__).with_name("package_proxy.py"))
APT_CACHE = CACHE_DIR / "apt-files"     # .debs and by-hash indexes, shared by every checkout
# What testbeds of earlier versions started, by pidfile name and command-line marker: stopped
# before ours binds their ports, and by `down`.
LEGACY = (("connect-proxy", "connect_proxy.py"), ("apt-cacher-ng", "BindAddress="),
          ("tinyproxy", "tinyproxy.conf"))


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


def _still_runs(checkout: str) -> bool:
    """Whether anything of the testbed of `checkout` runs: a supervisor of its servers (their
    folders are under its run dir) or its package proxy."""
    marks = (f"{run_dir_of(checkout)}/", f"{checkout}/provisioner/testbed/package_proxy.py")
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and any(m in a for a in procs.cmdline(int(p.name)) for m in marks):
            return True
    return False


def check_owner(log=None) -> None:
    """One testbed per bridge: another checkout's servers would clash with ours on the same
    addresses, and its teardown would cut ours off. A bridge whose checkout's testbed no longer
    runs (its processes were ended, e.g. with the session that started them) is taken over."""
    try:
        owner = _owner_file().read_text().strip()
    except OSError:
        return
    if owner == str(REPO) or ip("link", "show", BRIDGE, check=False).returncode != 0:
        return
    if not _still_runs(owner):
        _owner_file().write_text(f"{REPO}\n")
        if log:
            log(f"the bridge {BRIDGE} was left by the testbed of the checkout at {owner}, which "
                "no longer runs: taken over")
        return
    raise TestbedError(
        f"the bridge {BRIDGE} belongs to the testbed of the checkout at {owner}, which still "
        f"runs; run `invoke testbed.down` there first, or give this checkout its own bridge and "
        f"subnet (PROVISIONER_TESTBED_BRIDGE and the addresses in inventories/local.yml)")


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


def wait_port(host: str, port: int, what: str, pidfile: Path, marker: str,
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


def _drop_old_apt_cache() -> None:
    """apt-cacher-ng's cache of earlier testbeds, once no checkout's apt-cacher-ng uses it."""
    old = CACHE_DIR / "apt-cacher-ng"
    if old.is_dir() and not any(f"CacheDir={old}" in arg for p in Path("/proc").iterdir()
                                if p.name.isdigit() for arg in procs.cmdline(int(p.name))):
        shutil.rmtree(old, ignore_errors=True)


def apt_origins() -> list[str]:
    """host:port of every plain-HTTP mirror this machine's apt uses (the servers use the same)."""
    from .base import host_apt_sources
    found = set()
    for stanza in host_apt_sources():
        for uri in stanza["URIs"].split():
            u = urllib.parse.urlsplit(uri)
            if u.scheme == "http" and u.hostname:
                found.add(f"{u.hostname.lower()}:{u.port or 80}")
    return sorted(found)


def proxies_up(lay: Layout, registry_hosts) -> None:
    """registry_hosts(): the host names of the registries servers may reach over HTTPS. A proxy
    that runs with other settings (this machine's configuration changed) is restarted."""
    run = STATE_DIR / "run"
    logs = STATE_DIR / "logs"
    run.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    for name, marker in LEGACY:
        procs.stop(run / f"{name}.pid", marker)
    _drop_old_apt_cache()
    APT_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(APT_CACHE)], check=True)
    pidfile = run / "package-proxy.pid"
    argv = [sys.executable, PACKAGE_PROXY, "--listen", str(lay.gateway),
            "--allow", str(lay.subnet), "--user", "nobody",
            "--port", str(PROXY_PORT), "--port-allowed", "443",
            *(a for h in registry_hosts() for a in ("--allow-host", h)),
            "--apt-port", str(APT_CACHE_PORT), "--apt-cache", str(APT_CACHE),
            *(a for o in apt_origins() for a in ("--apt-origin", o))]
    procs.ensure(argv, logs / "package-proxy.log", pidfile, PACKAGE_PROXY)
    wait_port(lay.gateway, PROXY_PORT, "the package proxy", pidfile, PACKAGE_PROXY)
    wait_port(lay.gateway, APT_CACHE_PORT, "the package proxy", pidfile, PACKAGE_PROXY)


def proxies_down() -> list[str]:
    run = STATE_DIR / "run"
    return [name for name, marker in (("package-proxy", PACKAGE_PROXY), *LEGACY)
            if procs.stop(run / f"{name}.pid", marker)]


def _through(proxy: tuple[str, int], method: str, url: str) -> tuple[int, bytes]:
    """One request through one of our proxies, leaving from the bridge's own address (so that
    nothing can take the default route off this machine)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(*proxy, timeout=15, source_address=(proxy[0], 0),
                                           context=ssl.create_default_context())
        conn.set_tunnel(u.hostname, u.port or 443)
        target = u.path or "/"
    else:
        conn = http.client.HTTPConnection(*proxy, timeout=15, source_address=(proxy[0], 0))
        target = url
    try:
        conn.request(method, target)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def package_path(lay: Layout, bases: dict[str, Path],
                 registry_urls: list[str]) -> list[tuple[str, str | None]]:
    """What servers fetch packages through, checked from the host side of the bridge: per
    release, an apt index and a .deb through the apt proxy; each registry over HTTPS through the
    tunnel. (what, None when it works or the error)."""
    from .base import a_pool_file, apt_sources
    # Nothing is sent unless our bridge and proxy are up: with no bridge, the gateway address
    # would be routed off this machine.
    if procs.running(STATE_DIR / "run" / "package-proxy.pid", PACKAGE_PROXY) is None \
            or not any(i["ifname"] == BRIDGE and any(a.get("local") == lay.gateway
                                                     for a in i.get("addr_info", []))
                       for i in interfaces()):
        return [("proxy", "the package proxy or the bridge is not up: `invoke testbed.up` "
                          "starts them")]
    checks: list[tuple[str, str | None]] = []
    apt = (lay.gateway, APT_CACHE_PORT)
    for release, base in bases.items():
        mirror = next((s["URIs"].split()[0].rstrip("/") for s in apt_sources(release)
                       if s["URIs"].startswith("http://") and release in s["Suites"].split()), None)
        if mirror is None:
            checks.append((f"apt {release}", "no plain-HTTP mirror in this machine's apt sources"))
            continue
        for what, method, url, ok in (
                (f"apt index {release}", "GET", f"{mirror}/dists/{release}/InRelease",
                 lambda body: body.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")),
                (f"apt .deb {release}", "HEAD",
                 f"{mirror}/{a_pool_file(base, mirror, release) or ''}", lambda body: True)):
            if url.endswith("/"):
                checks.append((what, "the base image's package lists name no .deb to try"))
                continue
            try:
                status, body = _through(apt, method, url)
                checks.append((what, None if status == 200 and ok(body) else
                               f"HTTP {status} for {url}: {body[:200].decode(errors='replace').strip()}"))
            except OSError as exc:
                checks.append((what, f"{url}: {exc}"))
    for url in registry_urls:
        what = f"https {urllib.parse.urlsplit(url).hostname}"
        try:
            status, _ = _through((lay.gateway, PROXY_PORT), "HEAD", url)
            # any answer of the registry's own proves the tunnel and the TLS trust
            checks.append((what, None if status < 500 else f"HTTP {status} from {url}"))
        except (OSError, ValueError) as exc:
            checks.append((what, f"{url}: {exc}"))
    return checks

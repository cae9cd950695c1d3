"""One test server: an overlay of the base, its identity written before the first boot, kept
running by a supervisor process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import procs, supervise
from .base import trust
from .config import APT_CACHE_PORT, BRIDGE, PROXY_PORT, REPO, RUN_DIR, Layout, ServerSpec

SUPERVISOR = "provisioner.testbed.supervise"
SERVER_RECIPE = 4     # bump when create() writes something new: existing servers are rebuilt


def server_dir(name: str) -> Path:
    return RUN_DIR / name


def merged(name: str) -> Path:
    return server_dir(name) / "merged"


def _meta(name: str) -> dict | None:
    try:
        return json.loads((server_dir(name) / "server.json").read_text())
    except (OSError, ValueError):
        return None


def is_created(spec: ServerSpec, base: Path) -> bool:
    """Complete and current: made for this address on this base (else it is rebuilt)."""
    meta = _meta(spec.name)
    return bool(meta) and meta.get("address") == spec.address and meta.get("base") == str(base) \
        and meta.get("recipe") == SERVER_RECIPE


def mounted_on(base: Path) -> list[str]:
    """Servers whose overlay of base is mounted (running or not): base must not change then."""
    return [n for n in existing() if (_meta(n) or {}).get("base") == str(base)
            and os.path.ismount(merged(n))]


def existing() -> list[str]:
    return sorted(p.name for p in RUN_DIR.glob("*") if p.is_dir()) if RUN_DIR.exists() else []


def _mount(name: str, base: Path) -> None:
    d = server_dir(name)
    for sub in ("upper", "work", "merged"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(d / "merged"):
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={base},upperdir={d / 'upper'},workdir={d / 'work'}", str(d / "merged")],
                       check=True, capture_output=True)


def _umount(name: str) -> None:
    m = merged(name)
    if os.path.ismount(m):
        subprocess.run(["umount", str(m)], check=True, capture_output=True)


def create(spec: ServerSpec, lay: Layout, base: Path, authorized_key: str, proxy_env: dict,
           trusted: dict[str, str] | None = None) -> None:
    """trusted: CA certificates ({name: PEM}) the server trusts besides the base's (the test
    ACME server's listener CA)."""
    destroy(spec.name)                         # half-made or outdated: start from nothing
    _mount(spec.name, base)
    root = merged(spec.name)
    gw = lay.gateway

    def put(path: str, text: str, mode: int = 0o644) -> None:
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chmod(p, mode)

    put("/etc/hostname", f"{spec.name}\n")
    put("/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {spec.name}\n::1 localhost ip6-localhost\n")
    put("/etc/systemd/network/10-host0.network",
        f"[Match]\nName=host0\n\n[Network]\nAddress={spec.address}/{lay.subnet.prefixlen}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    put("/etc/apt/apt.conf.d/01testbed-proxy",
        f'Acquire::http::Proxy "http://{gw}:{APT_CACHE_PORT}";\n'
        f'Acquire::https::Proxy "http://{gw}:{PROXY_PORT}";\n'
        # repositories the tests serve on the host side of the bridge are reached directly
        f'Acquire::http::Proxy::{gw} "DIRECT";\n'
        'Acquire::Retries "3";\n')
    proxy = f"http://{gw}:{PROXY_PORT}"
    put("/etc/environment", f"http_proxy={proxy}\nhttps_proxy={proxy}\nHTTP_PROXY={proxy}\n"
        # the gateway by address too: Python's urllib matches no_proxy by name suffix, not CIDR,
        # and the proxy serves only CONNECT to port 443 (tests serve files on the gateway)
        f"HTTPS_PROXY={proxy}\nno_proxy=localhost,127.0.0.1,{gw},{lay.subnet}\n")
    npmrc = [f"proxy={proxy}", f"https-proxy={proxy}", "cafile=/etc/ssl/certs/ca-certificates.crt"]
    if proxy_env.get("npm_registry"):
        npmrc.append(f"registry={proxy_env['npm_registry']}")
    put("/etc/npmrc", "\n".join(npmrc) + "\n")
    pip = ["[global]", f"proxy = {proxy}", "cert = /etc/ssl/certs/ca-certificates.crt"]
    if proxy_env.get("pip_index"):
        pip.append(f"index-url = {proxy_env['pip_index']}")
    put("/etc/pip.conf", "\n".join(pip) + "\n")
    put("/root/.ssh/authorized_keys", authorized_key.strip() + "\n", 0o600)
    os.chmod(root / "root/.ssh", 0o700)
    subprocess.run(["ssh-keygen", "-A", "-f", str(root)], check=True, capture_output=True)
    trust(root, trusted or {})
    (server_dir(spec.name) / "server.json").write_text(
        json.dumps({"name": spec.name, "address": spec.address, "base": str(base),
                    "recipe": SERVER_RECIPE}) + "\n")


def host_keys(name: str) -> list[str]:
    return [p.read_text().split()[0] + " " + p.read_text().split()[1]
            for p in sorted((merged(name) / "etc/ssh").glob("ssh_host_*_key.pub"))]


def _pidfiles(name: str) -> tuple[Path, Path]:
    d = server_dir(name)
    return d / "supervisor.pid", d / "nspawn.pid"


def supervisor_pid(name: str) -> int | None:
    return procs.running(_pidfiles(name)[0], SUPERVISOR)


def init_pid(name: str) -> int | None:
    """PID (on this machine) of the server's systemd: the child of its nspawn process."""
    nspawn = procs.running(_pidfiles(name)[1], "systemd-nspawn")
    if nspawn is None:
        return None
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def start(name: str, base: Path) -> bool:
    if supervisor_pid(name):
        return False
    _kill_orphans(name)         # a crashed run's server still holds its overlay
    # a veth left behind by a crashed run makes nspawn fail with "File exists"
    subprocess.run(["ip", "link", "del", host_interface(name)], capture_output=True)
    _mount(name, base)
    sup, nsp = _pidfiles(name)
    procs.spawn([sys.executable, "-m", SUPERVISOR, name, str(merged(name)), BRIDGE, str(nsp), cgroup(name)],
                server_dir(name) / "console.log", sup,
                env={**os.environ, "PYTHONPATH": str(REPO)})
    return True


def stop(name: str) -> bool:
    sup, nsp = _pidfiles(name)
    was = procs.stop(sup, SUPERVISOR, timeout=20)
    procs.stop(nsp, "systemd-nspawn", timeout=5)     # only if the supervisor died uncleanly
    _kill_orphans(name)
    supervise.remove_cgroup(cgroup(name))
    return was


def cgroup(name: str) -> str:
    return f"{RUN_DIR.name}-{name}"


def _kill_orphans(name: str) -> None:
    """After a crash (nspawn killed), the server's systemd lives on in its own mount namespace,
    rooted in this server's overlay. Killing a PID namespace's init ends every process in it."""
    upper = f"upperdir={server_dir(name) / 'upper'},"
    deadline = time.monotonic() + 5
    while (pids := _processes_on(upper)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        time.sleep(0.05)


def _processes_on(upper: str) -> list[int]:
    own_ns = os.readlink("/proc/self/ns/mnt")
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "ns/mnt") == own_ns:
                continue
            for line in (p / "mountinfo").read_text().splitlines():
                fields = line.split()
                if fields[4] == "/" and upper in line:
                    found.append(int(p.name))
                    break
        except (OSError, IndexError):
            continue
    return found


def destroy(name: str) -> None:
    stop(name)
    if server_dir(name).exists():
        _umount(name)
        shutil.rmtree(server_dir(name))


def wait_ssh(specs: list[ServerSpec], gateway: str, timeout: float = 60.0) -> list[str]:
    """Wait until every server's sshd sends its banner; return the names that never did.
    Probes leave from the bridge's own address: with the testbed down, binding fails and no
    packet can take the default route to whatever else answers for these addresses."""
    pending = {s.name: s.address for s in specs}
    deadline = time.monotonic() + timeout
    while True:
        for name, addr in list(pending.items()):
            try:
                with socket.create_connection((addr, 22), timeout=0.3,
                                              source_address=(gateway, 0)) as sock:
                    sock.settimeout(2)
                    if sock.recv(4).startswith(b"SSH-"):
                        del pending[name]
            except OSError:
                pass
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        time.sleep(0.1)


def host_interface(name: str) -> str:
    """nspawn's host-side name for the server's veth on the bridge."""
    return f"vb-{name}"[:15]


def memory_kib(name: str) -> int | None:
    """Proportional resident memory (PSS: shared pages split fairly) of every process in the
    server's PID namespace."""
    init = init_pid(name)
    if init is None:
        return None
    try:
        ns = os.readlink(f"/proc/{init}/ns/pid")
    except OSError:
        return None
    total = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "ns/pid") != ns:
                continue
            for line in (p / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total

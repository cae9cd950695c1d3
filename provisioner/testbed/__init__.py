"""Local test servers: real Debian 12 with systemd as PID 1, each with its own address and sshd,
booted with systemd-nspawn on a host bridge. See shared/TESTBED-NOTES.md for the checked facts.

    up(count)      base image (cached), bridge, proxies, ACME server, alert sink (SMTP +
                   webhook, sinks.py), servers; twice is a no-op
    down()         stops what the testbed started (by PID), removes servers and interfaces
    status()       one row per server; package_path(), acme_health(): the host-side services
    stop/start/reset/cut/heal(name), shell(name)
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import base as base_image
from . import acme, network, servers, sinks
from .secrets import ensure_local_vault
from .config import APT_CACHE_PORT, CACHE_DIR, RUN_DIR, STATE_DIR, Layout, ServerSpec, TestbedError, layout

__all__ = ["TestbedError", "up", "down", "status", "package_path", "acme_health", "stop", "start", "reset", "cut", "heal",
           "shell_argv", "key_path", "known_hosts_path", "ssh_config_path"]

TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "ip": "iproute2",
         "nsenter": "util-linux", "ssh-keygen": "openssh-client",
         "mount": "mount", "openssl": "openssl", "pebble": "pebble"}
MIN_FREE_GIB = 2


def key_path():
    return STATE_DIR / "id_ed25519"


def known_hosts_path():
    return STATE_DIR / "known_hosts"


def preflight(lay: Layout, log=print) -> None:
    """Everything that can be checked before anything is created."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the testbed needs root (it mounts overlays, makes a bridge, boots "
                        "containers): run it as root, e.g. `sudo invoke testbed.up`")
    missing = sorted({pkg for tool, pkg in TOOLS.items()
                      if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")})
    if not sinks.available():
        missing.append("python3-aiosmtpd")
    if missing:
        problems.append(f"missing tools; install them with `apt-get install -y {' '.join(missing)}`")
    CACHE_DIR.mkdir(parents=True, exist_ok=True) if os.geteuid() == 0 else None
    probe = CACHE_DIR if CACHE_DIR.exists() else CACHE_DIR.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free < MIN_FREE_GIB:
        problems.append(f"only {free:.1f} GiB free at {probe}; the testbed needs {MIN_FREE_GIB} GiB "
                        "(free space or set PROVISIONER_TESTBED_CACHE to a larger disk)")
    if not problems:
        network.check_owner(log)
        network.check_subnet(lay)
    if problems:
        raise TestbedError("cannot start the testbed:\n  - " + "\n  - ".join(problems))


# Every server's systemd, journald, networkd, logind... takes inotify instances, all counted
# against root on this machine: the kernel's default of 128 stalls the boot of the ~20th server
# ("Failed to create inotify object: Too many open files", every job left waiting).
SYSCTL_FLOORS = {"fs.inotify.max_user_instances": 8192, "fs.inotify.max_user_watches": 524288}


def _raise_sysctl_floors(log) -> None:
    for key, floor in SYSCTL_FLOORS.items():
        path = "/proc/sys/" + key.replace(".", "/")
        with open(path) as f:
            have = int(f.read().split()[0])
        if have < floor:
            with open(path, "w") as f:
                f.write(str(floor))
            log(f"raised {key} from {have} to {floor} (many servers' systemd need it)")


def _ensure_key() -> str:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    if not key_path().exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "provisioner-testbed",
                        "-f", str(key_path())], check=True)
    return key_path().with_suffix(".pub").read_text()


@functools.lru_cache(maxsize=None)
def _registry_settings() -> dict:
    """The npm registry and pip index this machine is configured with, read at run time."""
    out = {}
    if shutil.which("npm"):
        r = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip().startswith("http"):
            out["npm_registry"] = r.stdout.strip()
    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        r = subprocess.run(["python3", "-m", "pip", "config", "get", "global.index-url"],
                           capture_output=True, text=True)
        index = r.stdout.strip() if r.returncode == 0 else ""
    if index.startswith("http"):
        out["pip_index"] = index
    return out


def _registry_hosts() -> list[str]:
    return sorted({urllib.parse.urlsplit(url).hostname for url in _registry_settings().values()
                   if urllib.parse.urlsplit(url).hostname})


def _write_known_hosts(lay: Layout) -> None:
    lines = [f"{s.address} {key}" for s in lay.servers if servers.server_dir(s.name).exists()
             for key in servers.host_keys(s.name)]
    tmp = known_hosts_path().with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(known_hosts_path())


def ssh_config_path():
    return STATE_DIR / "ssh_config"


def _write_ssh_config(lay: Layout) -> None:
    """`ssh -F .testbed/ssh_config web1`: the same strict settings the engine and tests use."""
    blocks = [f"Host {s.name} {s.address}\n  HostName {s.address}\n" for s in lay.servers]
    common = (f"Host *\n  User root\n  IdentityFile {key_path()}\n  IdentitiesOnly yes\n"
              f"  UserKnownHostsFile {known_hosts_path()}\n  StrictHostKeyChecking yes\n"
              f"  BatchMode yes\n  ConnectTimeout 5\n  BindAddress {lay.gateway}\n")
    ssh_config_path().write_text("".join(blocks) + common)


def _save_layout(lay: Layout) -> None:
    (STATE_DIR / "layout.json").write_text(json.dumps(
        {"subnet": str(lay.subnet), "gateway": lay.gateway,
         "servers": [{"name": s.name, "address": s.address, "release": s.release}
                     for s in lay.servers]}, indent=1) + "\n")


def current_layout(count: int | None = None) -> Layout:
    """The layout of the running testbed (bench servers included) or, if none, the default."""
    if count is None:
        try:
            saved = json.loads((STATE_DIR / "layout.json").read_text())
            count = sum(1 for s in saved["servers"] if s["name"].startswith("bench"))
        except (OSError, ValueError, KeyError):
            count = 0
    return layout(count)


@dataclass
class UpReport:
    created: list[str]
    started: list[str]
    seconds: float
    base_seconds: float


def up(count: int | None = None, log=print) -> UpReport:
    """count: benchmark servers wanted; None keeps as many as are up (0 on a first run)."""
    t0 = time.monotonic()
    lay = current_layout(count)
    preflight(lay, log)
    pub = _ensure_key()
    ensure_local_vault(log)
    _raise_sysctl_floors(log)
    releases = sorted({s.release for s in lay.servers})
    with ThreadPoolExecutor(max_workers=len(releases)) as pool:    # debootstrap waits on I/O
        bases = dict(zip(releases, pool.map(lambda r: base_image.ensure_base(r, log), releases)))
    base_seconds = time.monotonic() - t0
    network.bridge_up(lay)
    network.proxies_up(lay, _registry_hosts)
    acme.up(lay, log)
    sinks.up(lay)                       # where the monitoring server sends its alerts
    for release, base in bases.items():
        said = base_image.refresh_lists(base, f"http://{lay.gateway}:{APT_CACHE_PORT}",
                                        servers.mounted_on(base))
        if said:
            log(f"Debian {base_image.RELEASES[release]}: {said}")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    wanted = {s.name for s in lay.servers}
    for name in servers.existing():              # bench servers no longer asked for
        if name not in wanted:
            servers.destroy(name)
    todo = [s for s in lay.servers if not servers.is_created(s, bases[s.release])]
    registry = _registry_settings() if todo else {}
    with ThreadPoolExecutor(max_workers=8) as pool:   # host keys: CPU-bound ssh-keygen
        list(pool.map(lambda s: servers.create(s, lay, bases[s.release], pub, registry,
                                               _trusted()), todo))
    _write_known_hosts(lay)
    _write_ssh_config(lay)
    _save_layout(lay)
    started = [s.name for s in lay.servers if servers.start(s.name, bases[s.release])]
    # Only servers booted now are waited for: one already running may be hardened (another SSH
    # port, a firewall) and is none of up's business.
    late = servers.wait_ssh([s for s in lay.servers if s.name in started], lay.gateway, timeout=90)
    if late:
        raise TestbedError(f"servers did not answer on SSH within 90 s: {', '.join(late)}; "
                           f"see {RUN_DIR}/<name>/console.log")
    base_image.prune_bases(list(bases.values()))
    return UpReport([s.name for s in todo], started, time.monotonic() - t0, base_seconds)


def down(log=print) -> list[str]:
    """Stop and remove every server, the proxies and the bridge. Idempotent."""
    done = []
    names = servers.existing()
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(names)))) as pool:
        for name, stopped in zip(names, pool.map(servers.stop, names)):
            done.append(f"stopped {name}" if stopped else f"removed {name}")
    for name in names:
        servers.destroy(name)
    done += [f"stopped {p}" for p in network.proxies_down() + acme.down() + sinks.down()]
    if network.bridge_down():
        done.append(f"removed bridge {network.BRIDGE}")
    (STATE_DIR / "layout.json").unlink(missing_ok=True)
    return done


@dataclass
class ServerStatus:
    name: str
    address: str
    release: str         # Debian version, e.g. "12"
    state: str           # running / stopped / absent
    ssh: bool
    memory_mib: float | None
    cut: bool


def status() -> list[ServerStatus]:
    lay = current_layout()
    rows = []
    answering = set(s.name for s in lay.servers) - set(servers.wait_ssh(list(lay.servers), lay.gateway, 0))
    for s in lay.servers:
        if not servers.server_dir(s.name).exists():
            rows.append(ServerStatus(s.name, s.address, base_image.RELEASES[s.release], "absent",
                                     False, None, False))
            continue
        running = servers.supervisor_pid(s.name) is not None
        mem = servers.memory_kib(s.name) if running else None
        rows.append(ServerStatus(s.name, s.address, base_image.RELEASES[s.release],
                                 "running" if running else "stopped",
                                 s.name in answering, mem / 1024 if mem else None, _is_cut(s.name)))
    return rows


def package_path() -> list[tuple[str, str | None]]:
    """The proxies' health: (what, None or the error); see network.package_path."""
    lay = current_layout()
    bases = {r: base_image.base_path(r) for r in sorted({s.release for s in lay.servers})}
    missing = [r for r, base in bases.items() if not base.is_dir()]
    if missing:
        return [("packages", f"no base image of {', '.join(missing)} yet: `invoke testbed.up` "
                             "builds it")]
    return network.package_path(lay, bases, list(_registry_settings().values()))


def acme_health() -> list[tuple[str, str | None]]:
    """The test ACME server's health: (what, None or the error); see acme.health."""
    return acme.health(current_layout())


def _trusted() -> dict[str, str]:
    """CAs every server trusts besides Debian's: the test ACME server's listener CA."""
    ca = acme.LISTENER_CA
    return {"testbed-acme-listener": ca.read_text()} if ca.exists() else {}


def _server(name: str) -> ServerSpec:
    return current_layout().server(name)


def stop(name: str) -> bool:
    _server(name)
    return servers.stop(name)


def start(name: str) -> bool:
    lay = current_layout()
    spec = lay.server(name)
    base = base_image.base_path(spec.release)
    if not servers.is_created(spec, base):
        raise TestbedError(f"{name} does not exist yet (or is outdated): run `invoke testbed.up`")
    started = servers.start(name, base)
    if servers.wait_ssh([spec], lay.gateway, timeout=60):
        raise TestbedError(f"{name} did not answer on SSH within 60 s; see {servers.server_dir(name)}/console.log")
    return started


def reset(name: str, log=print) -> None:
    """Replace one server with a never-provisioned one (new host keys too)."""
    lay = current_layout()
    spec = lay.server(name)
    base = base_image.ensure_base(spec.release, log)
    servers.destroy(name)
    servers.create(spec, lay, base, _ensure_key(), _registry_settings(), _trusted())
    _write_known_hosts(lay)
    servers.start(name, base)
    if servers.wait_ssh([spec], lay.gateway, timeout=60):
        raise TestbedError(f"{name} did not answer on SSH within 60 s after reset")


def _is_cut(name: str) -> bool:
    r = network.ip("-j", "link", "show", servers.host_interface(name), check=False)
    return r.returncode == 0 and json.loads(r.stdout)[0].get("master") != network.BRIDGE


def _running_iface(name: str) -> str:
    _server(name)
    if servers.init_pid(name) is None:
        raise TestbedError(f"{name} is not running: `invoke testbed.start {name}`")
    return servers.host_interface(name)


def cut(name: str) -> None:
    """Take the server off the bridge: packets to and from it are dropped, as on a pulled cable,
    while its own link and address stay up so that `heal` restores it exactly."""
    network.ip("link", "set", _running_iface(name), "nomaster")


def heal(name: str) -> None:
    network.ip("link", "set", _running_iface(name), "master", network.BRIDGE)


def shell_argv(name: str, command: list[str] | None = None) -> list[str]:
    """A root shell inside the server without SSH (works after hardening closed root login)."""
    _server(name)
    pid = servers.init_pid(name)
    if pid is None:
        raise TestbedError(f"{name} is not running: `invoke testbed.start {name}`")
    return ["nsenter", "-t", str(pid), "-a", "--", *(command or ["/bin/bash", "-l"])]

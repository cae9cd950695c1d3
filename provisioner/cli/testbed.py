"""`invoke testbed.*`: local Debian test servers (see provisioner/testbed)."""
from __future__ import annotations

import os
import sys

from invoke import Collection, Exit, task



def _guard(name: str, *args, **kw):
    """Run provisioner.testbed's function `name`: a testbed error ends the task with its exit
    code. The package (containers, networks, the local vault) is imported here, when a testbed
    task runs: `invoke --list` and the other tasks need none of it."""
    from provisioner import testbed as tb
    try:
        return getattr(tb, name)(*args, **kw)
    except tb.TestbedError as e:
        raise Exit(f"testbed: {e}", code=e.exit_code) from None


def _state_dir():
    from provisioner.testbed import STATE_DIR
    return STATE_DIR


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@task(help={"count": "benchmark servers bench01..benchNN besides the inventory's "
                      "(default: keep as many as are up; 0 removes them)"})
def up(c, count=None):
    """Build (once) and boot the local test servers; a second run changes nothing."""
    r = _guard("up", None if count is None else int(count), log=_say)
    what = (f"created {', '.join(r.created)}" if r.created else "no server created") + "; " + \
           (f"started {', '.join(r.started)}" if r.started else "all servers already running")
    print(f"testbed up in {r.seconds:.1f} s ({what})")
    _print_status()
    _print_package_path()


@task
def down(c):
    """Stop and remove every test server, the proxies and the bridge (idempotent)."""
    done = _guard("down", log=_say)
    print("\n".join(done) if done else "testbed already down")


def _print_status() -> None:
    rows = _guard("status")
    print(f"{'server':<10} {'address':<15} {'debian':<7} {'state':<8} {'ssh':<4} {'memory':>9}  "
          "network")
    for r in rows:
        mem = f"{r.memory_mib:.0f} MiB" if r.memory_mib else "-"
        print(f"{r.name:<10} {r.address:<15} {r.release:<7} {r.state:<8} {'yes' if r.ssh else 'no':<4} "
              f"{mem:>9}  {'CUT' if r.cut else 'ok'}")
    print(f"ssh with strict host keys: ssh -F {_guard('ssh_config_path')} NAME")


def _print_package_path() -> bool:
    checks = _guard("package_path")
    for what, error in checks:
        print(f"package path: {what:<30} {'ok' if error is None else 'FAILED: ' + error}")
    healthy = all(error is None for _, error in checks)
    if not healthy:
        print(f"the proxy's log: {_state_dir() / 'logs' / 'package-proxy.log'}; "
              "`invoke testbed.up` restarts a proxy that stopped")
    acme = _guard("acme_health")
    for what, error in acme:
        print(f"acme server:  {what:<30} {'ok' if error is None else 'FAILED: ' + error}")
    if any(error is not None for _, error in acme):
        print(f"pebble's logs: {_state_dir() / 'logs'}/pebble*.log; `invoke testbed.up` "
              "restarts them")
        healthy = False
    from provisioner import testbed as tb
    for what, error in tb.sinks.health():
        print(f"alerts:       {what:<30} {'ok' if error is None else 'FAILED: ' + error}")
        healthy = healthy and error is None
    return healthy


@task
def status(c):
    """One line per test server (address, state, SSH answering, memory, network), then the
    package path servers use (apt index, .deb, HTTPS registries), the test ACME server
    (pebble) and the alert sink: exit 1 when any part fails."""
    _print_status()
    if not _print_package_path():
        raise Exit(code=1)


@task(help={"name": "server name, e.g. web1", "command": "run this instead of a login shell"})
def ssh(c, name, command=""):
    """A root shell inside a server without SSH (nsenter): works after hardening closed root login."""
    argv = _guard("shell_argv", name, ["/bin/bash", "-lc", command] if command else None)
    os.execvp(argv[0], argv)


@task(help={"name": "server name"})
def stop(c, name):
    """Shut one server down cleanly (its disk stays)."""
    print(f"stopped {name}" if _guard("stop", name) else f"{name} was not running")


@task(help={"name": "server name"})
def start(c, name):
    """Boot a stopped server again and wait for its sshd."""
    print(f"started {name}" if _guard("start", name) else f"{name} was already running")


@task(help={"name": "server name"})
def reset(c, name):
    """Replace one server with a fresh, never-provisioned one (new host keys)."""
    _guard("reset", name, log=_say)
    print(f"{name} is fresh")


@task(help={"name": "server name"})
def cut(c, name):
    """Drop a server's network (fault tests); `testbed.heal` restores it."""
    _guard("cut", name)
    print(f"{name}: network cut")


@task(help={"name": "server name"})
def heal(c, name):
    """Restore a server's network after `testbed.cut`."""
    _guard("heal", name)
    print(f"{name}: network restored")


ns = Collection("testbed", up, down, status, ssh, stop, start, reset, cut, heal)

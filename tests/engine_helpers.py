"""Helpers for the engine's tests over SSH: an inventory aimed at testbed servers with the test
roles, a run through the real runner and event stream, and state snapshots."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from provisioner.events import Events
from provisioner.inventory import load_inventory_file
from provisioner.runner import Options, Runner
from provisioner.testbed import config

REPO = Path(__file__).resolve().parents[1]
TEST_ROLES = REPO / "tests" / "roles"
# every name the testbed can have (bench servers' addresses are fixed by their number)
ADDRESSES = {s.name: s.address for s in config.layout(150).servers}


def test_server(default: str) -> str:
    """The server a role test works on: `default` in CI; PROVISIONER_TEST_SERVER=bench03 while
    developing, so that people working at once keep off each other's servers."""
    return os.environ.get("PROVISIONER_TEST_SERVER", default)


def inventory(tmp_path: Path, hosts: list[str], roles: list[str], *, vars: dict | None = None,
              host_vars: dict | None = None, ssh: dict | None = None, name: str = "enginetest",
              groups: dict | None = None, apps: dict | None = None):
    """`apps`: the inventory's `apps:` section.
    `groups` ({name: {"hosts": [..], "roles": [..], "vars"?: {..}}}) replaces the one group
    "all" (every host, `roles`), e.g. for a role that reads another group's hosts."""
    ssh_doc = {"user": "root", "key": str(REPO / ".testbed" / "id_ed25519"), "connect_timeout": 5,
               **(ssh or {})}
    doc = {
        "env": name,
        "known_hosts": str(REPO / ".testbed" / "known_hosts"),
        "ssh": ssh_doc,
        "vars": vars or {},
        "hosts": {h: {"address": ADDRESSES[h], **({"vars": host_vars[h]} if host_vars and h in host_vars else {})}
                  for h in hosts},
        "groups": groups if groups is not None else {"all": {"hosts": hosts, "roles": roles}},
    }
    if apps:
        doc["apps"] = apps
    path = tmp_path / f"{name}.yml"
    path.write_text(json.dumps(doc, indent=1))          # JSON is YAML
    return load_inventory_file(path, roles_root=[TEST_ROLES, REPO / "roles"])


def json_events(stdout: str, *, strict: bool = False) -> list[dict]:
    """The events of a `--json` run's stdout, one JSON object a line. Lines that do not start
    with "{" are passed over, unless strict: then every line must be an event, and any other
    raises json.JSONDecodeError (for tests that the stream holds nothing else)."""
    return [json.loads(line) for line in stdout.splitlines() if strict or line.startswith("{")]


def report(events: list[dict], *statuses: str) -> str:
    """The steps with these statuses, whole (reason and command output), as an assertion
    message. Also printed: pytest cuts long assertion messages, never captured output."""
    lines = []
    for e in events:
        if e.get("status") in statuses:
            lines.append(f"{e.get('host')} {e.get('role')} {e.get('resource')}: {e['status']}: "
                         f"{e.get('reason')}")
            lines += ["    " + line for line in (e.get("output") or "").splitlines()]
    text = "\n".join(lines) or f"no step {' or '.join(statuses)}"
    print(text)
    return text


class Run:
    """One run through Runner + Events in JSON mode; events parsed back for assertions."""

    def __init__(self, inv, *, check=False, diff=False, verbose=0, serial=0, limit=None,
                 max_fail_percentage=0.0, task="provision"):
        self.out, self.err = io.StringIO(), io.StringIO()
        self.events = Events(task=task, env=inv.env, json_out=True, verbose=verbose, diff=diff,
                             check=check, stream_out=self.out, stream_err=self.err)
        hosts = inv.select(limit)
        self.events.start([h.name for h in hosts])
        self.results = Runner(inv, self.events, Options(serial=serial,
                                                         max_fail_percentage=max_fail_percentage)).run(hosts)
        self.recap = self.events.recap()
        self.exit_code = self.events.exit_code(detailed=check)
        self.lines = json_events(self.out.getvalue(), strict=True)

    def steps(self, host=None, status=None):
        return [e for e in self.lines if e["event"] == "step"
                and (host is None or e["host"] == host) and (status is None or e["status"] == status)]

    def report(self, *statuses: str) -> str:
        return report(self.lines, *statuses)

    def host(self, name):
        return self.recap["hosts"][name]


def provision_twice(inv, *, reset=(), prepare=None, **run_kw) -> SimpleNamespace:
    """The idempotence check every role test makes: `reset` servers made never-provisioned,
    `prepare()` (e.g. files a deploy would have copied), then `inv` run twice. Returns inv,
    both Runs and each run's wall time (fresh_s, converged_s)."""
    from conftest import invoke
    for name in reset:
        invoke("testbed.reset", name)
    if prepare is not None:
        prepare()
    t0 = time.monotonic()
    first = Run(inv, **run_kw)
    t1 = time.monotonic()
    second = Run(inv, **run_kw)
    return SimpleNamespace(inv=inv, first=first, second=second, fresh_s=t1 - t0,
                           converged_s=time.monotonic() - t1)


def wait_for(what: str, probe, timeout: float, every: float = 0.3) -> float:
    """Poll `probe()` until it is true, at most `timeout` seconds; the moment it was
    (time.monotonic()). Raises naming `what` when it never was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return time.monotonic()
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sh(name: str, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """A root command inside a test server without SSH (also works after hardening)."""
    from provisioner import testbed
    proc = subprocess.run(testbed.shell_argv(name, ["/bin/sh", "-c", command]), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name}: {command!r} exited {proc.returncode}: {proc.stderr}")
    return proc


def psql(server: str, sql: str, db: str = "postgres", check: bool = True,
         timeout: float = 120) -> str:
    """SQL on a test server's PostgreSQL as postgres (peer login), the answer unaligned."""
    quoted = sql.replace("'", "'\\''")
    return sh(server, f"runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d {db} -Atc '{quoted}'",
              check=check, timeout=timeout).stdout.strip()


def db_now(server: str) -> str:
    """The server's database clock (the one recovery compares with), as an ISO time with its zone."""
    return psql(server, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")


SNAPSHOT = r"""
find / -xdev \( -path /proc -o -path /sys -o -path /run -o -path /dev -o -path /tmp \
  -o -path /var/log/journal -o -path /var/tmp -o -path /var/cache/apt -o -path /var/lib/systemd \
  -o -path /root/.cache \) -prune -o -printf '%p %y %m %u %g %s %T@\n' | sort | sha256sum;
systemctl is-system-running --wait >/dev/null;
systemctl list-units --all --no-legend --plain | awk '{print $1, $3, $4}' \
  | grep -v -e '^session-' -e '^user' | sort | sha256sum;
sysctl -a 2>/dev/null | grep -v -e '^net.netfilter' -e 'random' -e 'fs\.' -e 'kernel\.ns_last_pid' | sort | sha256sum
"""


def snapshot(name: str) -> str:
    """A digest of what a run could change: every file's metadata (mtime included), units, sysctls.
    SSH logins' own session and user units are left out: any connection makes them."""
    return sh(name, SNAPSHOT).stdout


def ssh_audit_fails(address: str) -> list[str]:
    """The `[fail]` lines of ssh-audit (the PyPI release: Debian's is too old for OpenSSH 9.2)."""
    exe = shutil.which("ssh-audit")
    if exe is None:
        pytest.skip("ssh-audit (the PyPI release) is not installed: python3 -m pip install -q "
                    "ssh-audit (.ci/setup installs it with the test extras)")
    r = subprocess.run([exe, "--no-colors", address], capture_output=True, text=True, timeout=180)
    return [line for line in r.stdout.splitlines() if "[fail]" in line]


def copy_sample_app(server: str, dest: str = "/srv/sample") -> None:
    """examples/sample-app's files into dest on server, for role tests that start the app with
    their own inventory (the whole env deploys it with `invoke deploy`). Without PGHOST in its
    environment the app needs no npm dependency: db.js loads the PostgreSQL client only then."""
    import base64
    for f in ("package.json", "server.js", "db.js"):
        data = base64.b64encode((REPO / "examples" / "sample-app" / f).read_bytes()).decode()
        sh(server, f"mkdir -p {dest} && echo {data} | base64 -d > {dest}/{f}")

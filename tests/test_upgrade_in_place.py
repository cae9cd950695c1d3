"""A server provisioned on Debian 12, upgraded in place to Debian 13 the way Debian's release
notes say (sources to trixie, `apt full-upgrade`, reboot), then provisioned again: the roles
follow the new release from facts, PostgreSQL 15's data is never left behind silently (refused
with how to upgrade, then upgraded by pg_upgradecluster when postgresql_upgrade asks), and a
further run changes nothing.

It runs on its own server, bench01 (Debian 12), so that no other test sees a changed release;
the server is removed at the end unless it was up before the test.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import invoke
from engine_helpers import ADDRESSES, REPO, Run, inventory, sh, ssh_audit_fails
from provisioner import testbed as tb
from provisioner.inventory import load_inventory_file
from provisioner.secret import Secret
from provisioner.testbed import config as tb_config

SERVER = "bench01"
ROLES = ["base", "harden", "postgresql"]
PASSWORD = "upgrade-Pw-0001-correct"
MARKER = "written on Debian 12 by PostgreSQL 15"


def _inventory(tmp_path, **pg_vars):
    gateway = tb_config.layout(1).gateway
    inv = inventory(tmp_path, [SERVER], ROLES, name="upgradetest",
                    vars={"harden_trusted_sources": [gateway],
                          "postgresql_client_group": "",
                          "postgresql_users": [{"name": "app", "password": "@vault:pg_app",
                                                "databases": ["appdb"]}],
                          "postgresql_databases": [{"name": "appdb", "owner": "app"}],
                          **pg_vars},
                    ssh={"user": "deploy", "bootstrap_user": "root"})
    inv.path.write_text(re.sub(r'"@vault:([a-z_0-9]+)"', r"!vault \1", inv.path.read_text()))
    inv = load_inventory_file(inv.path, roles_root=[REPO / "roles"])
    return inv.resolve({k: Secret(PASSWORD) for k in inv.vault_refs()})


def root(command: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """A long root command inside the server (engine_helpers.sh stops at 120 s)."""
    proc = subprocess.run(tb.shell_argv(SERVER, ["/bin/sh", "-c", command]), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def psql(sql: str) -> str:
    return sh(SERVER, f"runuser -u postgres -- psql -X -At -d appdb -c \"{sql}\"").stdout.strip()


def app_login() -> subprocess.CompletedProcess:
    """The app role's password login over TCP on the server itself (what an app does)."""
    script = ('IFS= read -r PGPASSWORD; export PGPASSWORD; exec psql -X -At -w '
              '"host=127.0.0.1 dbname=appdb user=app sslmode=require" -c "SELECT current_user"')
    return subprocess.run(tb.shell_argv(SERVER, ["/bin/sh", "-c", script]), input=PASSWORD + "\n",
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def upgraded(testbed, tmp_path_factory):
    had_bench = any(s.name.startswith("bench") for s in tb.current_layout().servers)
    if had_bench:
        invoke("testbed.reset", SERVER)
    else:
        invoke("testbed.up", "--count", "1")
    tmp = tmp_path_factory.mktemp("upgrade")
    on_12 = Run(_inventory(tmp))
    assert on_12.exit_code == 0, on_12.report("failed")
    assert sh(SERVER, ". /etc/os-release; echo $VERSION_ID").stdout.strip() == "12"
    psql(f"CREATE TABLE marker (t text); INSERT INTO marker VALUES ('{MARKER}')")

    # Debian's documented path: point APT at trixie, full-upgrade with the config files we
    # wrote kept (the next provision owns them), then reboot.
    root("find /etc/apt -name '*.list' -o -name '*.sources' | xargs sed -i 's/bookworm/trixie/g' "
         "&& apt-get -q update >/dev/null "
         "&& DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "
         "-o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef full-upgrade "
         ">/var/log/upgrade-to-trixie.log 2>&1 || { tail -50 /var/log/upgrade-to-trixie.log; exit 1; }")
    invoke("testbed.stop", SERVER)
    invoke("testbed.start", SERVER)
    assert sh(SERVER, ". /etc/os-release; echo $VERSION_ID").stdout.strip() == "13"

    refused = Run(_inventory(tmp))
    asked = Run(_inventory(tmp, postgresql_upgrade=True))
    again = Run(_inventory(tmp, postgresql_upgrade=True))
    yield {"refused": refused, "asked": asked, "again": again}
    if had_bench:
        invoke("testbed.reset", SERVER)
    else:
        invoke("testbed.up", "--count", "0")


def test_postgresql_15s_data_stops_the_run_with_how_to_upgrade(upgraded):
    run = upgraded["refused"]
    assert run.exit_code != 0
    failed = run.steps(status="failed")
    assert [e["role"] for e in failed] == ["postgresql"], run.report("failed")
    reason = failed[0]["reason"]
    assert "PostgreSQL 15 already holds this server's data" in reason
    assert "postgresql_upgrade: true" in reason and "pg_upgradecluster 15 main" in reason
    # harden and base ran on Debian 13 before it, and nothing of 17 was installed
    assert run.host(SERVER)["failed"] == 1


def test_with_postgresql_upgrade_the_data_moves_to_17_and_the_app_still_logs_in(upgraded):
    run = upgraded["asked"]
    assert run.exit_code == 0, run.report("failed")
    step = [e for e in run.steps(host=SERVER) if e["resource"] == "postgresql upgrade to 17/main"]
    assert step and step[0]["status"] == "changed", step
    clusters = sh(SERVER, "pg_lsclusters -h").stdout.split("\n")
    state = {tuple(line.split()[:2]): line.split()[2:4] for line in clusters if line.strip()}
    assert state[("17", "main")] == ["5432", "online"], clusters
    assert state[("15", "main")][1] == "down", clusters               # kept for a rollback
    assert "manual" in sh(SERVER, "grep -v '^#' /etc/postgresql/15/main/start.conf").stdout
    assert psql("SHOW server_version").startswith("17.")
    assert psql("SELECT t FROM marker") == MARKER
    login = app_login()
    assert login.returncode == 0 and login.stdout.strip() == "app", login.stderr


def test_the_upgraded_server_converges_and_keeps_ssh_audit_clean(upgraded):
    again = upgraded["again"]
    assert again.exit_code == 0, again.report("failed")
    assert again.host(SERVER)["changed"] == 0, again.report("changed")
    # harden rewrote sshd's algorithms for OpenSSH 10: post-quantum key exchange first
    kex = sh(SERVER, "sshd -T | grep '^kexalgorithms'").stdout.split()[1]
    assert kex.startswith("mlkem768x25519-sha256"), kex
    assert ssh_audit_fails(ADDRESSES[SERVER]) == []

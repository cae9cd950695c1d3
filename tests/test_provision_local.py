"""Acceptance: `invoke provision --env local` takes six fresh servers to hardened app, database,
backup, load balancer and monitoring servers; the second run changes nothing; then what a user would check, over real SSH
as the deploy user (root login is closed by then)."""
from __future__ import annotations

import socket
import time

import paramiko
import pytest
import testinfra

from conftest import invoke, provision_env
from engine_helpers import ADDRESSES, REPO, report, sh, ssh_audit_fails
from provisioner.testbed import config

HOSTS = ["web1", "web2", "db1", "vault", "lb1", "mon1"]
SSH_CONFIG = str(REPO / ".testbed" / "ssh_config")
KEY = str(REPO / ".testbed" / "id_ed25519")


def deploy(name: str):
    """testinfra over SSH as the deploy user, with sudo: the way an operator looks after hardening."""
    return testinfra.get_host(f"ssh://deploy@{name}", ssh_config=SSH_CONFIG, sudo=True)


@pytest.fixture(scope="module")
def provisioned(local_env):
    """Six fresh servers provisioned, the sample app deployed, the env provisioned again
    (conftest's session fixture, shared with the other modules that check the env)."""
    return local_env


def test_check_mode_on_the_fresh_env_plans_every_host_without_failures(provisioned):
    """Before the first run: every role plans, the ones after the package batch against the
    packages it would install (pgBackRest's version guard among them)."""
    r, events = provisioned["checked"]
    recap = events[-1]
    assert r.returncode == 0, report(events, "failed", "unreachable")
    assert recap["failed"] == 0 and recap["unreachable"] == 0 and recap["changed"] > 0
    assert all(recap["hosts"][h]["changed"] > 0 for h in HOSTS)


def test_first_run_provisions_every_host_without_failures(provisioned):
    r, events = provisioned["first"]
    recap = events[-1]
    assert r.returncode == 0, report(events, "failed", "unreachable")
    assert recap["event"] == "recap" and recap["failed"] == 0 and recap["unreachable"] == 0
    assert all(recap["hosts"][h]["changed"] > 0 for h in HOSTS)


def test_the_sample_app_deploys_on_the_fresh_env(provisioned):
    d = provisioned["deploy"]
    assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-3000:]


def test_no_package_of_a_later_role_was_installed_before_the_firewall(provisioned):
    """The first run, on fresh servers: each host's package batch comes after harden brought
    ufw up and before any step of a later role (every host has one: monitoring_agent)."""
    _r, events = provisioned["first"]
    for h in HOSTS:
        steps = [(e["role"], e["resource"]) for e in events if e.get("event") == "step" and e["host"] == h]
        batch = [i for i, (role, resource) in enumerate(steps)
                 if role is None and resource.startswith("apt batch: ")]
        assert len(batch) == 1, steps
        before, after = steps[:batch[0]], steps[batch[0] + 1:]
        assert ("harden", "ufw") in before
        assert {role for role, _ in before} <= {"base", "harden"}
        assert after and not {role for role, _ in after} & {None, "base", "harden"}


def test_second_run_changes_nothing_in_two_execs_per_host(provisioned):
    r, events = provisioned["second"]
    recap = events[-1]
    assert r.returncode == 0
    assert recap["changed"] == 0 and recap["failed"] == 0, report(events, "changed", "failed")
    # lock, os and every role's facts in one exec (the first run kept the os facts), unlock
    assert {recap["hosts"][h]["remote_commands"] for h in HOSTS} == {2}


def test_check_mode_on_the_converged_env_reports_nothing_pending(provisioned):
    r, events = provision_env("--check", "--detailed-exitcode")
    assert r.returncode == 0, report(events, "changed", "failed")


def test_root_and_password_logins_are_refused(provisioned):
    for name in HOSTS:
        client = paramiko.SSHClient()
        client.load_host_keys(str(REPO / ".testbed" / "known_hosts"))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(ADDRESSES[name], username="root", key_filename=KEY, look_for_keys=False,
                           allow_agent=False, timeout=10)
        client.close()
        t = paramiko.Transport((ADDRESSES[name], 22))
        t.start_client(timeout=10)
        try:
            allowed = t.auth_none("deploy")
        except paramiko.BadAuthenticationType as e:
            allowed = e.allowed_types
        finally:
            t.close()
        assert allowed == ["publickey"], f"{name} offers {allowed}"


def test_sshd_runs_the_hardened_settings(provisioned):
    for name in HOSTS:
        t = dict(line.split(" ", 1) for line in
                 deploy(name).check_output("sshd -T").splitlines() if " " in line)
        assert t["permitrootlogin"] == "no"
        assert t["passwordauthentication"] == "no"
        assert t["kbdinteractiveauthentication"] == "no"
        assert "sshusers" in t["allowgroups"].split()
        assert not any("sha1" in m for m in t["macs"].split(","))
        assert not any("nistp" in k for k in t["kexalgorithms"].split(","))


def test_firewall_fail2ban_and_updates_are_on(provisioned):
    for name in HOSTS:
        h = deploy(name)
        ufw = h.check_output("ufw status verbose")
        assert "Status: active" in ufw and "Default: deny (incoming)" in ufw
        assert "10.77.0.1" in ufw and "LIMIT" in ufw
        assert "Status for the jail: sshd" in h.check_output("fail2ban-client status sshd")
        assert h.service("fail2ban").is_running and h.service("fail2ban").is_enabled
        assert h.service("unattended-upgrades").is_enabled
        assert 'APT::Periodic::Unattended-Upgrade "1"' in h.check_output("apt-config dump APT::Periodic")


def _listening(h) -> set[str]:
    return {line.split()[3] for line in h.check_output("ss -Htln").splitlines()}


def test_ports_listen_only_where_intended(provisioned):
    db = _listening(deploy("db1"))
    assert {"127.0.0.1:5432", f"{ADDRESSES['db1']}:5432", "127.0.0.1:6379", f"{ADDRESSES['db1']}:6379"} <= db
    assert not any(a.startswith(("0.0.0.0:", "*:", "[::]:")) and not a.endswith(":22") for a in db), db
    # every host: the node exporter on its private address (role monitoring_agent)
    assert {f"{ADDRESSES['db1']}:9100", f"{ADDRESSES['db1']}:9187", f"{ADDRESSES['db1']}:9121"} <= db
    for name in ("web1", "web2", "vault"):
        ports = {a.rsplit(":", 1)[1] for a in _listening(deploy(name)) if not a.startswith(("127.", "[::1]"))}
        assert ports <= {"22", "3000", "9100"}, f"{name} listens on {ports}"
        assert f"{ADDRESSES[name]}:9100" in _listening(deploy(name))
    mon = _listening(deploy("mon1"))
    assert {f"{ADDRESSES['mon1']}:{p}" for p in (9090, 9093, 9100)} | {"127.0.0.1:9115"} <= mon
    assert not any(a.startswith(("0.0.0.0:", "*:", "[::]:")) and not a.endswith(":22") for a in mon), mon


def test_app_servers_have_node_and_pm2_as_the_app_user(provisioned):
    for name in ("web1", "web2"):
        h = deploy(name)
        major = int(h.check_output("node --version").lstrip("v").split(".")[0])
        assert major >= 18
        assert h.service("pm2-app").is_running and h.service("pm2-app").is_enabled
        owners = {line.split()[0] for line in h.check_output("ps -eo user:20=,args=").splitlines()
                  if "God Daemon" in line}
        assert owners == {"app"}


def test_app_servers_run_the_pinned_npm_from_the_registry_and_not_debians(provisioned):
    """node_npm: registry (inventories/local.yml), on Debian 13 (web1) and 12 (web2)."""
    for name in ("web1", "web2"):
        h = deploy(name)
        # what the app user, deploys (`npm ci`) and pm2 find first on PATH
        assert h.check_output("runuser -u app -- env -i PATH=/usr/local/bin:/usr/bin:/bin "
                              "sh -c 'command -v npm; npm --version'").split() == ["/usr/local/bin/npm", "10.9.9"]
        assert h.file("/usr/local/bin/npm").linked_to == "/usr/local/lib/node_modules/npm/bin/npm-cli.js"
        assert h.check_output("npx --version") == "10.9.9"
        assert not h.package("npm").is_installed            # Debian's: one npm on PATH
        # the same config files as Debian's npm: the global npmrc (the testbed's registry and
        # proxy) and global packages under /usr/local
        assert h.check_output("npm config get globalconfig") == "/etc/npmrc"
        assert h.check_output("npm config get prefix") == "/usr/local"
        assert h.file("/usr/local/lib/node_modules/pm2/package.json").exists
        npm_dir = h.file("/usr/local/lib/node_modules/npm")
        assert npm_dir.user == "root" and npm_dir.mode == 0o755
        assert h.run("find /usr/local/lib/node_modules/npm \\( ! -user root -o -perm /022 \\)"
                     " | head -3").stdout == ""                # nothing writable but by root


def test_the_firewall_lets_app_servers_reach_the_database(provisioned):
    # PostgreSQL's and Redis' own rules (pg_hba, passwords) are the postgresql/redis role tests
    probe = ("import socket,sys; s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3); "
             "s.close(); print('open')")
    for port in (5432, 6379):
        assert sh("web1", f"python3 -c \"{probe}\" {ADDRESSES['db1']} {port}").stdout.strip() == "open"


def test_pm2_comes_back_after_a_reboot(provisioned):
    invoke("testbed.stop", "web2")
    invoke("testbed.start", "web2")
    h = deploy("web2")
    deadline = time.monotonic() + 60
    while not h.service("pm2-app").is_running and time.monotonic() < deadline:
        time.sleep(1)
    assert h.service("pm2-app").is_running
    assert h.check_output("ufw status | head -1") == "Status: active"


def test_the_controller_is_never_banned(provisioned):
    """Many fresh connections from the controller (a trusted source) within the rate limit's window."""
    for _ in range(10):
        with socket.create_connection((ADDRESSES["vault"], 22), timeout=5,
                                      source_address=("10.77.0.1", 0)) as s:
            assert s.recv(4) == b"SSH-"
    assert "10.77.0.1" not in deploy("vault").check_output("fail2ban-client status sshd")


@pytest.mark.parametrize("name", HOSTS)
def test_ssh_audit_finds_no_failure_on_either_release(provisioned, name):
    """ssh-audit (nobody here wrote it) on every provisioned server: Debian 13's OpenSSH 10 and
    12's 9.2 both end up with nothing it fails; 13 also offers the post-quantum ML-KEM first."""
    assert ssh_audit_fails(ADDRESSES[name]) == []
    kex = deploy(name).check_output("sshd -T | grep ^kexalgorithms").split()[1].split(",")
    release = next(s.release for s in config.inventory_servers() if s.name == name)
    assert (kex[0] == "mlkem768x25519-sha256") == (release == "trixie"), kex


@pytest.mark.parametrize("name", HOSTS)
def test_the_agent_runs_with_the_releases_own_python(provisioned, name):
    """The agent is stdlib-only Python: Debian 13 runs it on 3.13 (no crypt module), 12 on 3.11."""
    release = next(s.release for s in config.inventory_servers() if s.name == name)
    r, events = provision_env("--limit", name, "--check")
    assert r.returncode == 0, report(events, "failed")
    python = deploy(name).check_output("python3 -c 'import sys; print(sys.version_info[:2])'")
    assert python == {"trixie": "(3, 13)", "bookworm": "(3, 11)"}[release]


@pytest.mark.parametrize("system", ["github-actions", "gitlab-ci"])
def test_the_example_pipelines_commands_pass_against_the_testbed(provisioned, tmp_path, system):
    """Every shell command of examples/ci/<system>, in pipeline order, against the converged
    testbed (env local for staging and prod): check, check-mode provision, provision, a saved
    plan of prod and its apply, drift of every shard; deploy lines once `invoke deploy` exists.
    Last in this module: it runs on the servers the tests above checked."""
    import sys
    from ci_examples import GITHUB, github_commands, gitlab_commands, run_pipeline
    work, home, bin_ = tmp_path / "work", tmp_path / "home", tmp_path / "bin"
    for d in (work, home, bin_):
        d.mkdir()
    (work / "tasks.py").symlink_to(REPO / "tasks.py")     # outputs land here, not in the repo
    (bin_ / "invoke").write_text(f"#!/bin/sh\nexec {sys.executable} -m invoke \"$@\"\n")
    (bin_ / "invoke").chmod(0o755)
    summary = tmp_path / "summary.md"
    env = {"HOME": str(home), "PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": str(REPO),           # this checkout's code, whatever pip installed
           "GITHUB_STEP_SUMMARY": str(summary), "SHARD": "1/1",
           "PROVISIONER_SSH_KEY": open(KEY).read() if system == "github-actions" else KEY}
    if system == "github-actions":
        commands = [c for path in GITHUB for c in github_commands(path)]
    else:
        commands = gitlab_commands()
    # converged first, whatever the tests above left: a pipeline's drift job may run first
    invoke("provision", "--env", "local", "--yes", timeout=1800)
    skipped = run_pipeline(commands, work, env)
    print("\n".join(["not run:", *skipped]))
    if system == "github-actions":
        text = summary.read_text()
        assert "## provision on local (check mode)" in text and "## apply on local" in text
        assert "## drift on local" in text and "**FAILED**" not in text
    else:
        # each GitLab job has its own report.md; here one folder holds them all, and the drift
        # job (first stage) has its report overwritten by the later jobs': read its own events
        drift = invoke("report", str(work / "drift.ndjson")).stdout
        assert "## drift on local" in drift and "**FAILED**" not in drift
    assert (work / "plan.json").exists()

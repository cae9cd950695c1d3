"""The engine against real test servers over SSH: every op applied twice, check mode, failures,
unreachable hosts, host keys, locks, audit, secrets, sudo, jump hosts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import testinfra

from conftest import invoke
from engine_helpers import (
    ADDRESSES, REPO, TEST_ROLES, Run, inventory, json_events, provision_twice, sh, snapshot,
)
from provisioner.connection import Connection, HostKeyError
from provisioner.inventory import load_inventory_file
from provisioner.secret import Secret

pytestmark = pytest.mark.usefixtures("testbed", "fresh_servers")


def th(name):
    return testinfra.get_host(f"ssh://{name}", ssh_config=str(REPO / ".testbed" / "ssh_config"))


@pytest.fixture
def fresh_web2(testbed):
    """web2 as a never-provisioned server."""
    invoke("testbed.reset", "web2")
    return "web2"


def test_every_op_applies_then_a_second_run_changes_nothing(tmp_path, testbed):
    runs = provision_twice(inventory(tmp_path, ["web2"], ["opsdemo"]), reset=["web2"])
    first, second = runs.first, runs.second
    assert first.exit_code == 0, first.err.getvalue()
    assert first.host("web2")["changed"] >= 14 and first.host("web2")["failed"] == 0
    assert second.host("web2")["changed"] == 0, second.steps(status="changed")
    assert second.exit_code == 0
    # what a user would check on the server
    h = th("web2")
    assert h.package("hello").is_installed
    assert h.user("opsdemo").exists and "opsdemo" in h.user("opsdemo").groups
    assert h.file("/srv/opsdemo").mode == 0o750 and h.file("/srv/opsdemo").user == "opsdemo"
    assert h.file("/srv/opsdemo/current").linked_to == "/srv/opsdemo/releases/1"
    assert h.file("/srv/opsdemo/message").content_string == "hello from provisioner\n"
    assert h.file("/srv/opsdemo/message").mode == 0o640
    assert h.file("/etc/opsdemo.conf").mode == 0o600
    assert "max_clients = 10" in h.file("/etc/default/opsdemo").content_string
    assert h.service("opsdemo").is_running and h.service("opsdemo").is_enabled
    assert h.sysctl("net.ipv4.conf.all.log_martians") == 1
    assert h.file("/srv/opsdemo/created").exists
    assert len(h.file("/srv/opsdemo/once.log").content_string.splitlines()) == 1
    # a converged run costs a small constant number of execs per host, not one per op: with
    # the os facts kept from the first run, lock + os + all roles' facts in one, then unlock
    assert second.host("web2")["remote_commands"] == 2


def test_drift_is_repaired_and_reported(tmp_path, testbed):
    inv = inventory(tmp_path, ["web1"], ["opsdemo"])
    Run(inv)
    sh("web1", "chmod 0644 /srv/opsdemo/message; echo tampered > /etc/opsdemo.conf; systemctl stop opsdemo")
    run = Run(inv, diff=True)
    changed = {e["resource"]: e for e in run.steps(status="changed")}
    assert "mode 0644 != 0640" in changed["file /srv/opsdemo/message"]["reason"]
    # the file carries a secret: what goes away is masked (it may have been a secret no one
    # knows any more), what comes is shown
    diff = changed["template /etc/opsdemo.conf"]["diff"]
    assert "-***" in diff and "tampered" not in diff and "+message = hello from provisioner" in diff
    assert "service opsdemo.service" in changed
    assert Run(inv).host("web1")["changed"] == 0


def test_check_mode_changes_nothing_on_the_server(tmp_path, fresh_web2):
    inv = inventory(tmp_path, [fresh_web2], ["opsdemo", "base"])
    before = snapshot(fresh_web2)
    run = Run(inv, check=True, diff=True)
    assert run.host("web2")["changed"] >= 14           # it reports what it would do ...
    assert all(e["check"] for e in run.steps(status="changed"))
    assert run.exit_code == 5                           # ... as pending, under --detailed-exitcode
    assert snapshot(fresh_web2) == before               # ... and did nothing
    assert sh(fresh_web2, "test -e /var/lib/provisioner || test -e /var/log/provisioner/audit.log",
              check=False).returncode == 1
    Run(inv)                                            # the snapshot does see a real run
    assert snapshot(fresh_web2) != before


def test_a_failing_step_stops_its_host_and_reports_output_while_others_finish(tmp_path, testbed):
    inv = inventory(tmp_path, ["web1", "db1"], ["opsdemo"], host_vars={"web1": {"opsdemo_fail": True}},
                    groups={"app": {"hosts": ["web1"], "roles": ["opsdemo", "base"]},
                            "db": {"hosts": ["db1"], "roles": ["opsdemo"]}})
    run = Run(inv)
    assert run.exit_code == 1
    failed = run.steps(host="web1", status="failed")
    assert [e["resource"] for e in failed] == ["command failing step"]
    assert "exit 3" in failed[0]["reason"]
    # the role after the failed one is reported as not run, not silently left out
    assert [(e["role"], e["reason"]) for e in run.steps(host="web1", status="skipped")
            if e["resource"] == "role"] == [("base", "not run: role opsdemo failed before it")]
    assert run.host("db1")["failed"] == 0 and run.host("db1")["unreachable"] == 0


def test_serial_batches_stop_after_a_failed_batch(tmp_path, testbed):
    inv = inventory(tmp_path, ["web1", "db1", "vault"], ["opsdemo"], host_vars={"web1": {"opsdemo_fail": True}})
    run = Run(inv, serial=1)
    assert run.host("web1")["failed"] == 1
    for name in ("db1", "vault"):
        assert run.host(name)["skipped"] == 1 and run.host(name)["remote_commands"] == 0


def test_a_stopped_server_is_unreachable_while_the_others_complete(testbed):
    invoke("testbed.stop", "vault")
    try:
        # base only: these servers stay unhardened (root login open) for the tests after this one
        r = invoke("provision", "--env", "local", "--roles", "base", "--json", "--yes", check=False)
    finally:
        invoke("testbed.start", "vault")
    assert r.returncode == 3, r.stderr
    events = json_events(r.stdout, strict=True)
    recap = events[-1]
    assert recap["event"] == "recap"
    assert recap["hosts"]["vault"]["unreachable"] == 1
    assert all(recap["hosts"][h]["failed"] == 0 and recap["hosts"][h]["unreachable"] == 0
               for h in ("web1", "web2", "db1"))
    unreachable = [e for e in events if e.get("status") == "unreachable"]
    assert "vault" in unreachable[0]["reason"] and "cannot connect" in unreachable[0]["reason"]


def test_unknown_and_changed_host_keys_are_refused(tmp_path, testbed):
    inv = inventory(tmp_path, ["web1"], ["base"])
    host = inv.hosts["web1"]
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match=r"unknown host key \(ssh-ed25519 SHA256:.*hosts.trust"):
        Connection(host, empty).open()
    known = (REPO / ".testbed" / "known_hosts").read_text().splitlines()
    web2_keys = [line.split(" ", 1)[1] for line in known if line.startswith(ADDRESSES["web2"] + " ")]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text("".join(f"{ADDRESSES['web1']} {k}\n" for k in web2_keys))
    with pytest.raises(HostKeyError, match=r"HOST KEY CHANGED.*has \S+ SHA256:\S+, the server now presents \S+ SHA256:\S+"):
        Connection(host, wrong).open()


def test_hosts_trust_records_fingerprints(tmp_path, testbed, monkeypatch):
    from provisioner.cli import provision
    inv_path = tmp_path / "trusttest.yml"
    inv_path.write_text(json.dumps({
        "env": "trusttest", "known_hosts": "kh", "ssh": {"user": "root"},
        "hosts": {"web1": {"address": ADDRESSES["web1"]}}, "groups": {"g": {"hosts": ["web1"], "roles": ["base"]}}}))
    inv = load_inventory_file(inv_path)
    monkeypatch.setattr(provision, "inventory", lambda env: inv)
    provision.trust.body(None, env="trusttest", yes=True)
    recorded = (tmp_path / "kh").read_text()
    expected = [line.split(" ", 1)[1] for line in (REPO / ".testbed" / "known_hosts").read_text().splitlines()
                if line.startswith(ADDRESSES["web1"] + " ")]
    assert recorded.startswith(ADDRESSES["web1"] + " ")
    assert recorded.split(" ", 1)[1].strip() in expected
    provision.trust.body(None, env="trusttest", yes=True)      # a second run records nothing new
    assert (tmp_path / "kh").read_text() == recorded


def test_hosts_trust_scans_hosts_behind_a_jump_host_through_it(tmp_path, testbed, monkeypatch):
    from provisioner.cli import provision
    inv_path = tmp_path / "trustjump.yml"
    inv_path.write_text(json.dumps({
        "env": "trustjump", "known_hosts": "kh",
        "ssh": {"user": "root", "key": str(REPO / ".testbed" / "id_ed25519"),
                "jump": {"address": ADDRESSES["web1"], "user": "root"}},
        "hosts": {"web2": {"address": ADDRESSES["web2"]}},
        "groups": {"g": {"hosts": ["web2"], "roles": ["base"]}}}))
    inv = load_inventory_file(inv_path)
    monkeypatch.setattr(provision, "inventory", lambda env: inv)
    provision.trust.body(None, env="trustjump", yes=True)
    recorded = [line.split(" ", 1) for line in (tmp_path / "kh").read_text().splitlines()]
    # the jump host is no host of this env: only the way through it records its key, first
    assert [name for name, _ in recorded] == [ADDRESSES["web1"], ADDRESSES["web2"]]
    testbed_keys = (REPO / ".testbed" / "known_hosts").read_text().splitlines()
    for name, key in recorded:                 # the keys the testbed gave them, nothing else
        assert f"{name} {key}" in testbed_keys


def _provision_db1_while_locked_by(owner: dict):
    """`invoke provision` of db1 while its run lock holds owner.json = owner."""
    sh("db1", "mkdir -p /var/lib/provisioner/run.lock && cat > /var/lib/provisioner/run.lock/owner.json <<'EOF'\n"
       + json.dumps(owner) + "\nEOF")
    try:
        return invoke("provision", "--env", "local", "--limit", "db1", "--roles", "base", "--yes", check=False)
    finally:
        sh("db1", "rm -rf /var/lib/provisioner/run.lock")


def test_a_held_run_lock_is_exit_4_naming_the_holder(testbed):
    r = _provision_db1_while_locked_by(
        {"run_id": "other", "who": "alice", "from": "laptop", "pid": 4242, "ci_job": None,
         "task": "deploy", "env": "local", "started": "2026-01-01T00:00:00+00:00",
         "started_epoch": 4102444800, "ttl": 3600})
    assert r.returncode == 4, r.stdout + r.stderr
    assert "alice@laptop" in r.stdout + r.stderr and "deploy" in r.stdout + r.stderr


def test_the_lock_of_a_killed_run_from_this_machine_is_taken_over(tmp_path, testbed):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; sys.path.insert(0, sys.argv[1]);"
         "from engine_helpers import inventory, Run;"
         "Run(inventory(pathlib.Path(sys.argv[2]), ['db1'], ['opsdemo'], vars={'opsdemo_pause': 120}))",
         str(REPO / "tests"), str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # mid-run, lock held (opsdemo.service runs a `sleep infinity` of its own)
        while sh("db1", "pgrep -fx 'sleep 120'", check=False).returncode != 0:
            assert time.monotonic() < deadline and child.poll() is None, "the run never paused"
            time.sleep(0.5)
    finally:
        child.kill()                                   # as kill -9 or a closed laptop lid would
        child.wait()
        sh("db1", "pkill -fx 'sleep 120'", check=False)
    held = json.loads(sh("db1", "cat /var/lib/provisioner/run.lock/owner.json").stdout)
    assert held["pid"] == child.pid
    run = Run(inventory(tmp_path, ["db1"], ["opsdemo"]))
    assert run.exit_code == 0, run.err.getvalue()
    assert "took over the run lock of" in run.err.getvalue()
    assert f"(pid {child.pid})" in run.err.getvalue() and "its run's process is gone" in run.err.getvalue()
    assert run.host("db1")["remote_commands"] <= 5     # one exec more than usual, no more
    assert sh("db1", "test -e /var/lib/provisioner/run.lock", check=False).returncode == 1


def test_a_live_holder_on_this_machine_keeps_its_lock(testbed):
    from provisioner import lock
    # this test process holds it: alive
    r = _provision_db1_while_locked_by(lock.owner("live-run", "provision", "local"))
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"(pid {os.getpid()})" in r.stdout + r.stderr


def test_changes_are_audited_and_check_runs_are_not(tmp_path, fresh_web2):
    inv = inventory(tmp_path, [fresh_web2], ["base"])
    Run(inv, check=True)
    assert sh(fresh_web2, "test -e /var/log/provisioner/audit.log", check=False).returncode == 1
    Run(inv)
    Run(inv)            # converged: nothing to audit
    lines = sh(fresh_web2, "cat /var/log/provisioner/audit.log").stdout.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["task"] == "provision" and entry["env"] == "enginetest" and entry["result"] == "changed"
    assert entry["who"] and entry["from"] and entry["config"] != "unknown"
    assert sh(fresh_web2, "test -e /var/lib/provisioner/run.lock", check=False).returncode == 1


def test_secrets_never_appear_in_output_events_diffs_or_the_journal(tmp_path, testbed, forget_secrets):
    value = "pw-7Hq2-never-print-me"
    path = tmp_path / "secrettest.yml"
    path.write_text(f"""env: secrettest
known_hosts: {REPO}/.testbed/known_hosts
ssh: {{user: root, key: {REPO}/.testbed/id_ed25519}}
hosts:
  web1:
    address: {ADDRESSES['web1']}
    vars: {{opsdemo_fail: true, opsdemo_secret: !vault demo_token}}
groups:
  all: {{hosts: [web1], roles: [opsdemo]}}
""")
    inv = load_inventory_file(path, roles_root=[TEST_ROLES, REPO / "roles"]).resolve(
        {"demo_token": Secret(value)})
    sh("web1", "rm -f /etc/opsdemo.conf")                   # so the diff shows the secret's line
    run = Run(inv, diff=True, verbose=3)
    assert run.exit_code == 1                               # a verbose, failing run
    assert value in sh("web1", "cat /etc/opsdemo.conf").stdout   # the file does get the real value
    everything = run.out.getvalue() + run.err.getvalue()
    assert "token = ***" in everything                      # the diff was shown, masked
    assert value not in everything
    journal = sh("web1", "journalctl --no-pager -o cat --since -5min").stdout
    assert value not in journal


def test_sudo_with_a_nopasswd_user(tmp_path, fresh_web2):
    key = (REPO / ".testbed" / "id_ed25519.pub").read_text().strip()
    sh(fresh_web2, "useradd -m -s /bin/bash ops && mkdir -p ~ops/.ssh && "
       f"echo '{key}' > ~ops/.ssh/authorized_keys && chown -R ops: ~ops/.ssh && "
       "echo 'ops ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/ops && chmod 0440 /etc/sudoers.d/ops")
    inv = inventory(tmp_path, [fresh_web2], ["base"], ssh={"user": "ops"})
    run = Run(inv)
    assert run.exit_code == 0, run.lines
    assert th(fresh_web2).file("/var/log/provisioner").user == "root"
    assert Run(inv).host("web2")["changed"] == 0


def test_a_jump_host_carries_the_connection(tmp_path, testbed):
    inv = inventory(tmp_path, ["web2"], ["base"],
                    ssh={"jump": {"address": ADDRESSES["web1"], "user": "root"}})
    run = Run(inv)
    assert run.exit_code == 0, run.lines
    log = sh("web2", "journalctl -u ssh --no-pager -o cat --since -2min").stdout
    assert f"from {ADDRESSES['web1']}" in log


def test_bad_input_is_exit_2_before_any_server_is_touched(testbed):
    r = invoke("provision", "--env", "nosuchenv", "--yes", check=False)
    assert r.returncode == 2
    assert "nosuchenv" in r.stderr and "local" in r.stderr
    r = invoke("provision", "--env", "local", "--limit", "nosuchhost", "--yes", check=False)
    assert r.returncode == 2 and "nosuchhost" in r.stderr
    r = invoke("provision", "--env", "local", "--roles", "nosuchrole", "--yes", check=False)
    assert r.returncode == 2 and "nosuchrole" in r.stderr


def test_signed_apt_repository_then_latest_upgrade(tmp_path, fresh_web2):
    """The apt-repository op against a real signed repository served on the host side."""
    from aptrepo import build_repo, serve
    from provisioner.testbed import config
    repo = build_repo(tmp_path / "repo", version="1.0")
    with serve(repo, config.layout().gateway) as url:
        spec = {"uri": url, "suite": repo.suite, "key_b64": repo.key_b64, "package": repo.package}
        inv = inventory(tmp_path, [fresh_web2], ["opsdemo"], vars={"opsdemo_repo": spec})
        first = Run(inv)
        assert first.exit_code == 0, first.report("failed")
        h = th(fresh_web2)
        assert h.package(repo.package).version == "1.0"
        assert h.run("provisioner-hello").stdout.strip() == "provisioner-hello 1.0"
        sources = [f for f in h.check_output("ls /etc/apt/sources.list.d").split() if "opsdemo" in f]
        assert sources and "Signed-By:" in h.file(f"/etc/apt/sources.list.d/{sources[0]}").content_string
        assert Run(inv).host("web2")["changed"] == 0
        # a key that does not sign the repository is refused by apt, and the run says so
        other = build_repo(tmp_path / "other")
        bad = inventory(tmp_path, [fresh_web2], ["opsdemo"],
                        vars={"opsdemo_repo": dict(spec, key_b64=other.key_b64)}, name="badkey")
        run = Run(bad)
        assert run.exit_code == 1
        assert any("NO_PUBKEY" in (e.get("output") or "") + e["reason"] or "not signed" in
                   (e.get("output") or "") + e["reason"] for e in run.steps(status="failed"))


def _sudo_user(tmp_path, server, password: str, rule: str):
    """A user `ops` with that password and sudoers rule on server, and an inventory of server
    that logs in as ops with the sudo password from the vault (ops_sudo)."""
    key = (REPO / ".testbed" / "id_ed25519.pub").read_text().strip()
    sh(server, "useradd -m -s /bin/bash ops && mkdir -p ~ops/.ssh && "
       f"echo '{key}' > ~ops/.ssh/authorized_keys && chown -R ops: ~ops/.ssh && "
       f"echo 'ops:{password}' | chpasswd && "
       f"echo 'ops {rule}' > /etc/sudoers.d/ops && chmod 0440 /etc/sudoers.d/ops")
    path = tmp_path / "sudotest.yml"
    path.write_text(f"""env: sudotest
known_hosts: {REPO}/.testbed/known_hosts
ssh: {{user: ops, key: {REPO}/.testbed/id_ed25519, sudo_password: !vault ops_sudo}}
hosts:
  web2: {{address: {ADDRESSES['web2']}}}
groups:
  all: {{hosts: [web2], roles: [base]}}
""")
    return load_inventory_file(path, roles_root=[TEST_ROLES, REPO / "roles"])


def test_sudo_password_from_the_vault(tmp_path, fresh_web2, forget_secrets):
    password = "sudo-Pw-83kd-secret"
    inv = _sudo_user(tmp_path, fresh_web2, password, "ALL=(ALL) ALL")
    run = Run(inv.resolve({"ops_sudo": Secret(password)}), verbose=3)
    assert run.exit_code == 0, run.lines
    assert th(fresh_web2).file("/var/log/provisioner").user == "root"
    assert password not in run.out.getvalue() + run.err.getvalue()
    assert password not in sh(fresh_web2, "journalctl --no-pager -o cat").stdout
    wrong = Run(inv.resolve({"ops_sudo": Secret("not-the-password")}))
    assert wrong.exit_code == 1


def test_a_sudo_password_with_nopasswd_sudoers_still_runs(tmp_path, fresh_web2, forget_secrets):
    """Once sudo asks for no password (harden's sudoers), the password must not be sent: it
    used to reach the agent as the first line of its request, and every exec failed."""
    password = "sudo-Pw-19fj-secret"
    inv = _sudo_user(tmp_path, fresh_web2, password, "ALL=(ALL) NOPASSWD: ALL")
    run = Run(inv.resolve({"ops_sudo": Secret(password)}))
    assert run.exit_code == 0, run.lines
    assert sh(fresh_web2, "test -e /var/lib/provisioner/run.lock", check=False).returncode == 1
    assert Run(inv.resolve({"ops_sudo": Secret(password)})).host("web2")["changed"] == 0


def test_a_failed_guard_restores_the_files_it_watches(tmp_path, testbed):
    inv = inventory(tmp_path, ["web1"], ["opsdemo"])
    assert Run(inv).host("web1")["failed"] == 0
    before = sh("web1", "stat -c '%a %U %G' /srv/opsdemo/message; cat /srv/opsdemo/message").stdout
    bad = inventory(tmp_path, ["web1"], ["opsdemo"], vars={"opsdemo_message": "goodbye"}, name="guardtest")
    run = Run(bad)
    assert run.exit_code == 1
    failed = run.steps(status="failed")
    assert [e["resource"] for e in failed] == ["guard greeting kept"]
    assert "lost its greeting" in failed[0]["reason"] and "restored the previous" in failed[0]["reason"]
    assert sh("web1", "stat -c '%a %U %G' /srv/opsdemo/message; cat /srv/opsdemo/message").stdout == before
    ok = Run(inv)               # the restored file needs nothing; the template also used the message
    assert ok.exit_code == 0
    assert "file /srv/opsdemo/message" not in {e["resource"] for e in ok.steps(status="changed")}


def test_a_dropped_connection_is_reopened_for_the_next_command(tmp_path, testbed):
    inv = inventory(tmp_path, ["web1"], ["base"])
    with Connection(inv.hosts["web1"], inv.known_hosts) as c:
        first = c.run(["sh", "-c", "echo $PPID"])      # sshd's process for this connection (root@notty)
        assert first.ok
        transport = c._conn.transport
        # kill this connection's sshd on the server side: the transport drops under us
        pid = first.stdout.decode().strip()
        assert "@notty" in sh("web1", f"ps -o cmd= -p {pid}").stdout
        sh("web1", f"kill {pid}")
        again = c.run(["hostname"])
        assert again.ok and again.stdout.decode().strip() == "web1"
        assert c._conn.transport is not transport and not transport.is_active()   # a new connection
        assert c.commands == 2


INTERRUPTED_RUN = """
import sys, pathlib
sys.path.insert(0, sys.argv[1])
from invoke import Exit
from engine_helpers import inventory
from provisioner.cli import common
inv = inventory(pathlib.Path(sys.argv[2]), ['db1'], ['opsdemo', 'base'], vars={'opsdemo_pause': 20})
common.load = lambda env, interactive, limit=None, meanwhile=None: (inv, inv.select(limit))  # as run
try:
    common.run_task('provision', env=inv.env, limit=None, check=False, diff=False, json=True,
                    yes=True, serial=0, forks=1, verbose=0)
except Exit as e:
    sys.exit(e.code)
"""


def test_sigterm_mid_apply_lets_the_apply_finish_and_ends_on_a_recap(tmp_path, testbed):
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_RUN, str(REPO / "tests"),
                              str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 180
        while sh("db1", "pgrep -fx 'sleep 20'", check=False).returncode != 0:   # mid-apply
            assert time.monotonic() < deadline and child.poll() is None, "the run never paused"
            time.sleep(0.5)
        child.terminate()                                # SIGTERM, as systemd or CI would
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
        sh("db1", "pkill -fx 'sleep 20'", check=False)
    assert child.returncode == 143, out + err
    lines = json_events(out, strict=True)
    steps = {(e["role"], e["resource"]): e for e in lines if e["event"] == "step"}
    assert steps[("opsdemo", "command pause")]["status"] == "changed"     # finished, reported
    assert steps[("base", "role")]["status"] == "skipped"
    assert "interrupted (SIGTERM)" in steps[("base", "role")]["reason"]
    assert [e["event"] for e in lines[-2:]] == ["error", "recap"] and lines[-2]["code"] == 143
    # the lock was released by the run's last exec, as after any run
    assert sh("db1", "test -e /var/lib/provisioner/run.lock", check=False).returncode == 1


def test_a_bad_vhost_in_a_file_group_is_put_back_and_nginx_keeps_serving(tmp_path, testbed):
    def page():
        return sh("db1", "python3 -c \"import urllib.request; print(urllib.request.urlopen("
                         "'http://127.0.0.1:8081/').read().decode())\"").stdout

    first = Run(inventory(tmp_path, ["db1"], ["webgroup"]))
    assert first.exit_code == 0, first.report("failed")
    assert "served by the first configuration" in page()
    site = sh("db1", "cat /etc/nginx/sites-available/webgroup").stdout

    bad = Run(inventory(tmp_path, ["db1"], ["webgroup"], vars={"webgroup_listen": "8081 bogus"}))
    assert bad.exit_code == 1
    (step,) = [s for s in bad.steps("db1") if s["resource"] == "file group nginx site"]
    assert step["status"] == "failed" and "nginx -t -q" in step["reason"]
    assert "bogus" in step["reason"] + (step.get("output") or "")          # nginx's own words
    assert not [s for s in bad.steps("db1") if s["resource"].startswith("handler")]
    assert sh("db1", "cat /etc/nginx/sites-available/webgroup").stdout == site   # put back
    assert "served by the first configuration" in page()                        # still serving
    again = Run(inventory(tmp_path, ["db1"], ["webgroup"]))
    assert again.exit_code == 0 and not again.steps("db1", "changed"), again.report("changed")


def test_an_unsupported_system_is_refused_before_anything_changes(tmp_path, fresh_web2):
    sh(fresh_web2, "rm /etc/os-release && sed 's/^VERSION_ID=.*/VERSION_ID=\"11\"/' "
                   "/usr/lib/os-release > /etc/os-release")
    try:
        run = Run(inventory(tmp_path, [fresh_web2], ["base"]))
        assert run.exit_code == 1, run.lines
        failed = run.steps(status="failed")
        assert [e["resource"] for e in failed] == ["os"], failed
        assert failed[0]["reason"].startswith("Debian 11 is not supported; provisioner supports "
                                              "Debian 12 (bookworm), Debian 13 (trixie)")
        assert all(e["role"] is None for e in run.steps()), run.steps()    # no role was planned
        audit = sh(fresh_web2, "cat /var/log/provisioner/audit.log").stdout.splitlines()
        assert len(audit) == 1 and "failed" in audit[0]                    # the refusal is recorded
        assert sh(fresh_web2, "test -e /var/lib/provisioner/run.lock", check=False).returncode == 1
    finally:                           # web2 is Debian 12 again for the tests after this one
        sh(fresh_web2, "ln -sfn ../usr/lib/os-release /etc/os-release")

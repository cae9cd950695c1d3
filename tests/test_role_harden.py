"""Role `harden`: pure checks of its vars and templates, then end to end on real test servers.

Live tests work on one server (CI: web1; while developing PROVISIONER_TEST_SERVER=benchNN) and
attack it from a second one (CI: db1; while developing PROVISIONER_TEST_SERVER2=benchMM). The
inventory logs in as `deploy` with `bootstrap_user: root`, like a real first run on a fresh VM:
run 1 comes in as root and closes root logins, run 2 comes in as deploy with no inventory change.
"""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest
import testinfra

import roles.harden
from conftest import invoke
import engine_helpers
from engine_helpers import ADDRESSES, REPO, Run, inventory, provision_twice, sh, ssh_audit_fails, wait_for
from provisioner import lock
from provisioner.facts import Facts
from provisioner.inventory import Host
from provisioner.roles import discover_roles, load_role

INFO = discover_roles(REPO / "roles", [])["harden"]  # (problems of other roles are theirs)
ROLE = load_role(INFO)
HARDEN = roles.harden
DEFAULTS = INFO.defaults
PUBKEY = (REPO / ".testbed" / "id_ed25519.pub").read_text().strip() if (REPO / ".testbed" / "id_ed25519.pub").exists() \
    else "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxTVjmFyJ8ajpm7R1CX0VrFOo1sOqcXNnfUKudZ+Ndz test"
CONTROLLER = "10.77.0.1"                          # the testbed's gateway: where tests and the engine come from
LYNIS_TARGET = 80


# --- pure: vars, templates, plans ---------------------------------------------------------------

def _host(**kw):
    base = dict(name="h1", address="192.0.2.10", port=22, user="deploy", bootstrap_user="root",
                key=None, jump=None, connect_timeout=5.0, command_timeout=60.0)
    return Host(**{**base, **kw})


def _ctx(virt="systemd-nspawn", **host):
    return SimpleNamespace(host=_host(**host), inventory=SimpleNamespace(known_hosts=Path("/nonexistent"), env="puretest",
                                                                         roles_for=lambda name: ["harden"]),
                           os={"virt": virt}, check=False)


def _vars(**over):
    return {**DEFAULTS, "harden_deploy_keys": [PUBKEY], **over}


def _resources(virt="systemd-nspawn", host=None, **over):
    return list(ROLE.resources(_vars(**over), _ctx(virt, **(host or {}))))


def test_defaults_render_a_sshd_config_with_the_hardened_settings():
    text = next(r for r in _resources() if r.id == "template /etc/ssh/sshd_config").content.text
    for line in ("PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "AuthenticationMethods publickey", "AllowGroups sshusers", "MaxAuthTries 3",
                 "LoginGraceTime 30", "ClientAliveInterval 300", "ClientAliveCountMax 2",
                 "X11Forwarding no", "AllowTcpForwarding no", "Port 22", "LogLevel VERBOSE"):
        assert f"\n{line}\n" in text, line
    algos = [l for l in text.splitlines() if l.split(" ", 1)[0] in ("KexAlgorithms", "MACs", "HostKeyAlgorithms", "Ciphers")]
    assert len(algos) == 4
    assert not any(re.search(r"nistp|sha1|ecdsa|cbc", l) for l in algos), algos
    assert "HostKey /etc/ssh/ssh_host_ecdsa_key" not in text and "Include" not in text


def test_bastions_get_tcp_forwarding_and_a_custom_port():
    text = next(r for r in _resources(harden_ssh_allow_tcp_forwarding=True, harden_ssh_port=2222)
                if r.id == "template /etc/ssh/sshd_config").content.text
    assert "\nAllowTcpForwarding yes\n" in text and "\nPort 2222\n" in text


@pytest.mark.parametrize("over, host, match", [
    ({"harden_deploy_keys": []}, None, r"harden_deploy_keys: no SSH public key"),
    ({}, {"user": "root"}, r"ssh.user: .*as root.*bootstrap_user: root"),
    ({"harden_deploy_user": "root"}, None, r"harden_deploy_user: root cannot be used"),
    ({"harden_ssh_ciphers": ["aes256-gcm@openssh.com", "AES 256"]}, None, r"harden_ssh_ciphers: .*not a list of algorithm names"),
    ({"harden_ssh_port": 70000}, None, r"harden_ssh_port: 70000 is out of range"),
    ({"harden_trusted_sources": ["10.77.0.1/24"]}, None, r"harden_trusted_sources: .*network address"),
    ({"harden_allowed_ports": [{"port": 443}, {"port": "443", "proto": "tcp"}]}, None, r"harden_allowed_ports: two ufw rules"),
    ({"harden_allowed_ports": [{"port": "80:70", "proto": "tcp"}]}, None, r"harden_allowed_ports\[0\]: bad port"),
    ({"harden_unattended_reboot_time": "4am"}, None, r"harden_unattended_reboot_time: .*HH:MM"),
    ({"harden_fail2ban_bantime": "one hour"}, None, r"harden_fail2ban_bantime: .*fail2ban time"),
    ({"harden_admin_users": [{"name": "alice"}]}, None, r"harden_admin_users\[0\].keys: no SSH public key"),
    ({"harden_admin_users": [{"name": "deploy", "keys": [PUBKEY]}]}, None, r"is the deploy user"),
    ({"harden_ssh_host_keys": ["/etc/ssh/ssh_host_ed25519_key\nPermitRootLogin yes"]}, None,
     r"harden_ssh_host_keys: .*not a key file under /etc/ssh/"),
    ({"harden_ssh_host_keys": ["/etc/ssh/../shadow"]}, None, r"harden_ssh_host_keys: "),
    ({"harden_deploy_user": "deploy\n"}, None, r"harden_deploy_user: .*not a user/group name"),
    ({"harden_ssh_allow_groups": ["sshusers\n"]}, None, r"harden_ssh_allow_groups: "),
    ({"harden_ssh_kex": ["curve25519-sha256\n"]}, None, r"harden_ssh_kex: "),
    ({"harden_journal_max_use": "500M\n"}, None, r"harden_journal_max_use: "),
])
def test_bad_vars_are_refused_naming_the_var_and_the_fix(over, host, match):
    with pytest.raises(ValueError, match=match):
        _resources(host=host, **over)


def test_no_var_can_add_an_sshd_directive():
    """A host key path with a newline used to put `PermitRootLogin yes` above the template's
    `no` (sshd takes the first value)."""
    injected = "/etc/ssh/ssh_host_ed25519_key\nPermitRootLogin yes"
    with pytest.raises(ValueError):
        _resources(harden_ssh_host_keys=[injected])


CI_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFz0r4lK1dZ3mWbC2pQ9w8dE0nYkq7V3x1T6uHc5sJ2a ci"


def test_the_release_identity_gets_its_exact_commands_and_nothing_else():
    res = _resources(harden_release_user="release", harden_release_keys=[CI_KEY],
                     harden_release_sudo=[{"as": "app", "command": "/usr/bin/pm2 reload shop"}])
    user = next(r for r in res if r.id == "user release")
    assert user.authorized_keys == (CI_KEY,) or list(user.authorized_keys) == [CI_KEY]
    sudoers = next(r for r in res if r.id == "template /etc/sudoers.d/50-harden").content.text
    release = [l for l in sudoers.splitlines() if l.startswith("release ")]
    assert release == ["release ALL=(app) NOPASSWD: /usr/bin/pm2 reload shop"]
    plain = next(r for r in _resources() if r.id == "template /etc/sudoers.d/50-harden").content.text
    assert "release" not in plain                                    # unchanged without one


@pytest.mark.parametrize("over, match", [
    ({"harden_release_keys": [CI_KEY]}, r"harden_release_user: not set"),
    ({"harden_release_user": "deploy", "harden_release_keys": [CI_KEY]}, r"harden_release_user: deploy is also"),
    ({"harden_release_user": "release", "harden_release_keys": [PUBKEY]}, r"harden_release_keys: .*root through sudo"),
    ({"harden_release_user": "release", "harden_release_keys": [CI_KEY],
      "harden_release_sudo": [{"as": "root", "command": "/usr/bin/pm2 *"}]}, r"harden_release_sudo\[0\].command: .*no wildcards"),
    ({"harden_release_user": "release", "harden_release_keys": [CI_KEY],
      "harden_release_sudo": [{"as": "root", "command": "/bin/true, /bin/bash"}]}, r"harden_release_sudo\[0\].command"),
    ({"harden_release_user": "release", "harden_release_keys": [CI_KEY],
      "harden_release_sudo": [{"as": "root", "command": "/bin/true\nrelease ALL=(ALL) ALL"}]}, r"harden_release_sudo\[0\].command"),
])
def test_a_release_identity_that_could_become_root_is_refused(over, match):
    with pytest.raises(ValueError, match=match):
        _resources(**over)


def test_small_rsa_keys_are_refused_before_sshd_would_refuse_them():
    key = paramiko.RSAKey.generate(2048)
    line = f"ssh-rsa {key.get_base64()} small"
    with pytest.raises(ValueError, match=r"harden_admin_users\[0\].keys: an RSA key of 2048 bits"):
        _resources(harden_admin_users=[{"name": "alice", "keys": [line]}])
    assert _resources(harden_admin_users=[{"name": "alice", "keys": [line]}], harden_ssh_required_rsa_size=2048)


def test_the_deploy_user_gets_the_inventory_key_by_default(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", str(key)], check=True)
    blob = " ".join(Path(str(key) + ".pub").read_text().split()[:2])
    deploy = next(r for r in _resources(host={"key": key}, harden_deploy_keys=[]) if r.id == "user deploy")
    assert deploy.authorized_keys == (f"{blob} provisioner",)
    # listed keys come first; the inventory key is not added twice
    deploy = next(r for r in _resources(host={"key": key}, harden_deploy_keys=[PUBKEY, blob + " again"])
                  if r.id == "user deploy")
    assert deploy.authorized_keys == (PUBKEY, blob + " again")
    # without it, a list that misses the inventory key would lock the next run out
    with pytest.raises(ValueError, match=r"harden_deploy_keys: does not hold the public key of the inventory's ssh.key"):
        _resources(host={"key": key}, harden_deploy_inventory_key=False)


def test_ufw_rules_trusted_sources_come_before_the_ssh_rate_limit():
    fw = next(r for r in _resources(harden_trusted_sources=["10.77.0.1", "198.51.100.0/24"],
                                    harden_allowed_ports=[{"port": 443}, {"port": 5432, "from": "10.77.0.0/24"}])
              if r.id == "ufw")
    assert [(r.action, r.port, r.src) for r in fw.rules] == [
        ("allow", "22", "10.77.0.1"), ("allow", "22", "198.51.100.0/24"), ("limit", "22", "any"),
        ("allow", "443", "any"), ("allow", "5432", "10.77.0.0/24")]
    assert fw.incoming == "deny" and fw.outgoing == "allow"


def test_moving_the_ssh_port_keeps_the_old_one_open_until_the_inventory_follows():
    rs = _resources(harden_trusted_sources=["10.77.0.1"], harden_ssh_port=2222)
    fw = next(r for r in rs if r.id == "ufw")
    assert [(r.action, r.port) for r in fw.rules] == [("allow", "2222"), ("limit", "2222"), ("allow", "22"), ("limit", "22")]
    jail = next(r for r in rs if r.id == "template /etc/fail2ban/jail.local").content.text
    assert "port = 2222,22" in jail
    fw = next(r for r in _resources(harden_ssh_port=2222, host={"port": 2222}) if r.id == "ufw")
    assert [(r.action, r.port) for r in fw.rules] == [("limit", "2222")]


def test_fail2ban_ignores_trusted_sources_and_reads_the_journal():
    rs = _resources(harden_trusted_sources=["10.77.0.1"])
    jail = next(r for r in rs if r.id == "template /etc/fail2ban/jail.local").content.text
    assert "ignoreip = 127.0.0.1/8 ::1 10.77.0.1\n" in jail
    assert "backend = systemd" in jail and "_SYSTEMD_UNIT=ssh.service" in jail
    assert "nginx" not in jail
    jail = next(r for r in _resources(harden_fail2ban_nginx=True)
                if r.id == "template /etc/fail2ban/jail.local").content.text
    assert "[nginx-http-auth]" in jail and "[nginx-botsearch]" in jail


def test_containers_skip_what_they_cannot_have_with_the_reason():
    rs = _resources("systemd-nspawn")
    skips = {r.id: r.plan(Facts({}))[0].why for r in rs if r.id.startswith("skip ")}
    assert set(skips) == {"skip kernel sysctls", "skip systemd-timesyncd running", "skip auditd"}
    assert all(w.startswith("skipped in a container (systemd-detect-virt: systemd-nspawn): ") for w in skips.values())
    ids = {r.id for r in rs}
    assert "sysctl kernel.kptr_restrict" not in ids and "service auditd.service" not in ids
    assert "sysctl net.ipv4.conf.all.log_martians" in ids and "service systemd-timesyncd.service" in ids
    # a VM or bare metal gets all of it
    ids = {r.id for r in _resources("kvm")}
    assert {"sysctl kernel.kptr_restrict", "sysctl kernel.yama.ptrace_scope", "service auditd.service",
            "template /etc/audit/rules.d/50-harden.rules"} <= ids
    assert not any(i.startswith("skip ") for i in ids)
    apt_ = next(r for r in _resources("kvm") if r.id.startswith("apt "))
    assert "auditd" in apt_.names


def test_sudoers_gives_deploy_nopasswd_and_logs_to_a_file():
    rs = _resources(harden_admin_users=[{"name": "alice", "keys": [PUBKEY]}], harden_admin_sudo_nopasswd=False)
    sudo = next(r for r in rs if r.id == "template /etc/sudoers.d/50-harden")
    assert sudo.validate == "visudo -cf {path}" and sudo.mode == "0440"
    text = sudo.content.text
    assert "deploy ALL=(ALL:ALL) NOPASSWD: ALL\n" in text and "alice ALL=(ALL:ALL) ALL\n" in text
    assert 'Defaults logfile="/var/log/sudo.log"' in text
    users_ = {r.name: r for r in rs if r.id.startswith("user ")}
    assert users_["deploy"].groups == ("sshusers",) and users_["alice"].groups == ("sshusers",)


def test_the_guard_watches_the_lockout_files_and_checks_on_the_new_port():
    (g,) = ROLE.guards(_vars(harden_ssh_port=2222), _ctx())
    assert g.files == ("/etc/ssh/sshd_config", "/etc/sudoers.d/50-harden")
    assert "deploy" in g.name and "2222" in g.name
    assert g.after_rollback[-1]["run"] == ["systemctl", "reload", "--", "ssh.service"]


def test_known_hosts_on_a_new_port_reuse_the_verified_keys(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("192.0.2.10 ssh-ed25519 AAAAkey1\n192.0.2.11 ssh-ed25519 AAAAother\n")
    assert HARDEN._known_hosts_for(kh, "192.0.2.10", 22) == kh
    moved = HARDEN._known_hosts_for(kh, "192.0.2.10", 2222)
    try:
        assert "[192.0.2.10]:2222 ssh-ed25519 AAAAkey1\n" in moved.read_text()
        assert "[192.0.2.11]:2222" not in moved.read_text()
    finally:
        moved.unlink()


def test_known_hosts_moving_from_one_custom_port_to_another(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("[192.0.2.10]:2222 ssh-ed25519 AAAAkey1\n192.0.2.100 ssh-ed25519 AAAAother\n"
                  "[192.0.2.10]:2222 ecdsa-sha2-nistp256 AAAAkey2\n")
    for port, name in ((2200, "[192.0.2.10]:2200"), (22, "192.0.2.10")):
        moved = HARDEN._known_hosts_for(kh, "192.0.2.10", port)
        try:
            added = [l for l in moved.read_text().splitlines() if l.startswith(name + " ")]
            assert added == [f"{name} ssh-ed25519 AAAAkey1", f"{name} ecdsa-sha2-nistp256 AAAAkey2"]
        finally:
            moved.unlink()


# --- live: one server provisioned, attacked from another ----------------------------------------

SERVER = engine_helpers.test_server("web1")


def _second() -> str | None:
    if os.environ.get("PROVISIONER_TEST_SERVER2"):
        return os.environ["PROVISIONER_TEST_SERVER2"]
    return None if os.environ.get("PROVISIONER_TEST_SERVER") else "db1"


def _inv(tmp_path, name="hardentest", port=22, known_hosts=None, **vars):
    inv = inventory(tmp_path, [SERVER], ["harden"], name=name,
                    vars={"harden_trusted_sources": [CONTROLLER], **vars},
                    ssh={"user": "deploy", "bootstrap_user": "root", "port": port})
    return dataclasses.replace(inv, known_hosts=known_hosts) if known_hosts else inv


def _deploy_host(port=22):
    return testinfra.get_host(f"ssh://deploy@{SERVER}:{port}", ssh_config=str(REPO / ".testbed" / "ssh_config"),
                              sudo=True)


def _login_as(user, port=22, key=None):
    """A fresh paramiko login with strict host keys; returns the client (caller closes)."""
    c = paramiko.SSHClient()
    c.load_host_keys(str(REPO / ".testbed" / "known_hosts"))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    if key is None:
        key = paramiko.Ed25519Key.from_private_key_file(str(REPO / ".testbed" / "id_ed25519"))
    c.connect(ADDRESSES[SERVER], port=port, username=user, pkey=key, look_for_keys=False,
              allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10)
    return c


def _failed(run):
    return [(e["resource"], e["reason"]) for e in run.steps(status="failed")]


@pytest.fixture(scope="module")
def hardened(testbed, tmp_path_factory):
    """A fresh server, provisioned twice with the same inventory (user deploy, bootstrap root)."""
    tmp = tmp_path_factory.mktemp("harden")
    runs = provision_twice(_inv(tmp), reset=[SERVER])
    first, second = runs.first, runs.second
    print(f"\nharden on {SERVER}: fresh provision {runs.fresh_s:.1f} s ({first.host(SERVER)['changed']} changed, "
          f"{first.host(SERVER)['remote_commands']} execs); converged run {runs.converged_s:.1f} s "
          f"({second.host(SERVER)['changed']} changed, {second.host(SERVER)['remote_commands']} execs)")
    yield SimpleNamespace(inv=runs.inv, first=first, second=second, tmp=tmp)
    # Other tests log in to these servers as root on port 22: leave them fresh.
    invoke("testbed.reset", SERVER)
    if _second():
        invoke("testbed.reset", _second())


def test_first_run_as_root_then_as_deploy_with_no_inventory_change(hardened):
    first, second = hardened.first, hardened.second
    assert first.exit_code == 0 and not _failed(first), _failed(first)
    assert first.host(SERVER)["changed"] >= 30
    guard = [e for e in first.steps() if e["resource"].startswith("guard ")]
    assert [(e["status"], e["reason"]) for e in guard] == [("ok", "passed after the change")]
    assert second.exit_code == 0 and second.host(SERVER)["changed"] == 0, second.steps(status="changed")
    assert second.host(SERVER)["remote_commands"] <= 4
    log = sh(SERVER, "journalctl -u ssh --no-pager -o cat").stdout
    accepted = re.findall(r"Accepted publickey for (\S+) from " + re.escape(CONTROLLER), log)
    assert accepted[0] == "root"                   # run 1: deploy did not exist yet, root did
    assert accepted[-1] == "deploy"                # run 2: deploy, and root is closed by then
    assert "authentication failed" not in json.dumps(second.lines)


def test_what_cannot_run_in_a_container_is_reported_skipped_with_the_reason(hardened):
    skips = {e["resource"]: e["reason"] for e in hardened.second.steps() if e["resource"].startswith("skip ")}
    virt = sh(SERVER, "systemd-detect-virt", check=False).stdout.strip()
    assert set(skips) == {"skip kernel sysctls", "skip systemd-timesyncd running", "skip auditd"}
    for reason in skips.values():
        assert reason.startswith(f"skipped in a container (systemd-detect-virt: {virt}): ")
    h = _deploy_host()
    assert h.service("systemd-timesyncd").is_enabled           # configured for when it can run
    assert h.file("/etc/systemd/timesyncd.conf.d/50-harden.conf").exists
    assert not h.service("systemd-timesyncd").is_running        # and, in a container, it does not


def test_sshd_T_shows_the_hardened_settings(hardened):
    effective = dict(line.split(" ", 1) for line in sh(SERVER, "sshd -T").stdout.splitlines() if " " in line)
    assert effective["permitrootlogin"] == "no"
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["pubkeyauthentication"] == "yes"
    assert effective["allowgroups"] == "sshusers"
    assert effective["maxauthtries"] == "3" and effective["logingracetime"] == "30"
    assert effective["clientaliveinterval"] == "300" and effective["clientalivecountmax"] == "2"
    assert effective["x11forwarding"] == "no" and effective["allowtcpforwarding"] == "no"
    assert "nistp" not in effective["kexalgorithms"] and "sha1" not in effective["macs"]
    assert effective["ciphers"] == ",".join(DEFAULTS["harden_ssh_ciphers"])
    assert "ecdsa" not in effective["hostkeyalgorithms"]
    sizes = [int(l.split()[4]) for l in sh(SERVER, "grep -v '^#' /etc/ssh/moduli").stdout.splitlines()]
    assert sizes and min(sizes) >= 3071                          # moduli lists bits - 1


def test_root_and_password_logins_are_refused_over_real_ssh(hardened):
    with pytest.raises(paramiko.AuthenticationException):
        _login_as("root").close()
    # password authentication is not even offered
    sock = socket.create_connection((ADDRESSES[SERVER], 22), timeout=10)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as info:
            t.auth_password("deploy", "any password")
        assert info.value.allowed_types == ["publickey"]
    finally:
        t.close()
    ok = _login_as("deploy")                       # while the deploy user's key works
    ok.close()


def test_ufw_is_active_with_the_trusted_source_before_the_rate_limit(hardened):
    h = _deploy_host()
    status = h.check_output("ufw status verbose")
    assert "Status: active" in status
    assert "Default: deny (incoming), allow (outgoing)" in status
    rules = [l for l in status.splitlines() if " IN " in l]
    assert re.match(rf"22/tcp\s+ALLOW IN\s+{re.escape(CONTROLLER)}\s+# trusted source", rules[0]), rules
    assert re.match(r"22/tcp\s+LIMIT IN\s+Anywhere\s+# ssh", rules[1]), rules
    assert len(rules) == 3 and "(v6)" in rules[2]
    assert h.service("ufw").is_enabled
    # ufw re-applies OUR sysctl file when it starts, not its own (log_martians=0)
    assert "IPT_SYSCTL=/etc/sysctl.d/60-harden.conf" in h.file("/etc/default/ufw").content_string
    assert h.sysctl("net.ipv4.conf.all.log_martians") == 1


def test_network_sysctls_are_live_and_persisted(hardened):
    h = _deploy_host()
    for key, value in {**HARDEN.NET_SYSCTLS, "net.ipv4.conf.all.rp_filter": 1}.items():
        assert h.sysctl(key) == value, key
    assert "net.ipv4.conf.all.send_redirects = 0" in h.file("/etc/sysctl.d/60-harden.conf").content_string


def test_unattended_security_upgrades_are_enabled(hardened):
    h = _deploy_host()
    dump = h.check_output("apt-config dump")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in dump
    assert 'APT::Periodic::Update-Package-Lists "1";' in dump
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in dump
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        assert h.service(timer).is_enabled and h.service(timer).is_running
    out = h.run("unattended-upgrade --dry-run --debug 2>&1 | head -20").stdout
    codename = h.system_info.codename                         # the server's own release
    assert f"Allowed origins are: origin=Debian,codename={codename}-security,label=Debian-Security" in out


def test_the_journal_is_persistent_and_logins_and_sudo_are_recorded(hardened):
    c = _login_as("deploy")
    try:
        _, out, _ = c.exec_command("sudo -n true && echo sudo-ok")
        assert out.read().decode().strip() == "sudo-ok"
    finally:
        c.close()
    h = _deploy_host()
    assert h.file("/var/log/journal").is_directory
    assert "Storage=persistent" in h.file("/etc/systemd/journald.conf.d/50-harden.conf").content_string
    assert h.run("find /var/log/journal -name 'system*.journal' | grep -q .").rc == 0
    # the unit, not the command: OpenSSH 10 (Debian 13) logs logins from sshd-session
    logins = h.check_output("journalctl _SYSTEMD_UNIT=ssh.service --no-pager -o cat --since -5min")
    assert f"Accepted publickey for deploy from {CONTROLLER}" in logins
    sudo_log = h.file("/var/log/sudo.log")
    assert sudo_log.mode == 0o600 and sudo_log.user == "root"
    assert re.search(r"deploy : .*USER=root ; COMMAND=/usr/bin/true", sudo_log.content_string)
    assert "COMMAND=/usr/bin/true" in h.check_output("journalctl _COMM=sudo --no-pager -o cat --since -5min")


def test_fail2ban_bans_an_attacker_and_never_the_trusted_source(hardened):
    attacker = _second()
    if attacker is None:
        pytest.skip("needs a second server to attack from: set PROVISIONER_TEST_SERVER2 (it is reset)")
    invoke("testbed.reset", attacker)
    target, source = ADDRESSES[SERVER], ADDRESSES[attacker]
    h = _deploy_host()
    assert h.service("fail2ban").is_enabled and h.service("fail2ban").is_running
    jail = h.check_output("fail2ban-client status sshd")
    assert "_SYSTEMD_UNIT=ssh.service" in jail
    assert CONTROLLER in h.check_output("fail2ban-client get sshd ignoreip")
    # the trusted source fails more often than maxretry: never banned, not even counted
    wrong = paramiko.Ed25519Key.from_private_key_file(str(_throwaway_key(hardened.tmp)))
    for _ in range(DEFAULTS["harden_fail2ban_maxretry"] + 2):
        with pytest.raises(paramiko.AuthenticationException):
            _login_as("deploy", key=wrong).close()
    try:
        # the attacker: wrong keys for deploy, one connection after the other, bounded: 45 (on
        # Debian 13, sshd's own per-source penalties refuse most of them for 15 s after each
        # failure, and only connections that get as far as a key count for fail2ban)
        sh(attacker, "for i in 1 2 3; do ssh-keygen -q -t ed25519 -N '' -f /tmp/k$i; done")
        attempt = (f"ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                   f"-o ConnectTimeout=3 -o IdentitiesOnly=yes -i /tmp/k1 -i /tmp/k2 -i /tmp/k3 deploy@{target} true")
        tries = 0
        status = ""
        deadline = None
        while source not in _banned(status):
            if tries < 45:
                sh(attacker, attempt, check=False)
                tries += 1
            else:                                     # fail2ban may still be reading the journal
                deadline = deadline or time.monotonic() + 15
                assert time.monotonic() < deadline, status
            time.sleep(1)
            status = h.check_output("fail2ban-client status sshd")
        print(f"\n{attacker} ({source}) banned after {tries} failed connections")
        assert CONTROLLER not in _banned(status)
        # the ban is in the firewall (fail2ban's own nftables table, ahead of ufw) and holds
        assert source in sh(SERVER, "nft list set inet f2b-table addr-set-sshd").stdout
        r = sh(attacker, attempt, check=False)
        assert r.returncode == 255 and "Connection refused" in r.stderr, r.stderr
        _login_as("deploy").close()                  # and the controller still gets in
    finally:
        sh(SERVER, f"fail2ban-client set sshd unbanip {source}", check=False)


def _banned(status: str) -> set[str]:
    """The addresses after "Banned IP list:" in `fail2ban-client status <jail>`."""
    return set(status.split("Banned IP list:", 1)[1].split()) if "Banned IP list:" in status else set()


def _throwaway_key(tmp):
    path = Path(tmp) / "wrong_ed25519"
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_ssh_audit_finds_nothing_to_fail_after_hardening(hardened):
    fails = ssh_audit_fails(ADDRESSES[SERVER])
    second = _second()
    if second:
        invoke("testbed.reset", second)
        fresh = ssh_audit_fails(ADDRESSES[second])
        print(f"\nssh-audit [fail] lines: fresh {second}: {len(fresh)}, hardened {SERVER}: {len(fails)}")
        assert len(fresh) >= 1
    assert fails == []


def _lynis(name):
    sh(name, "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lynis >/dev/null 2>&1 "
             "|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
             "--no-install-recommends lynis >/dev/null)")
    out = sh(name, "lynis audit system --quick --no-colors 2>&1", check=False).stdout
    m = re.search(r"Hardening index : (\d+)", out)
    assert m, out[-2000:]
    return int(m.group(1))


def test_lynis_hardening_index(hardened, request):
    second = _second()
    fresh = None
    if second:
        invoke("testbed.reset", second)
        fresh = _lynis(second)
    provisioned = _lynis(SERVER)
    print(f"\nlynis hardening index: fresh {second}: {fresh}, provisioned {SERVER}: {provisioned} "
          f"(target >= {LYNIS_TARGET})")
    if fresh is not None:
        assert provisioned > fresh
    assert provisioned >= LYNIS_TARGET


def test_the_hardening_holds_after_a_reboot(hardened):
    invoke("testbed.stop", SERVER)
    invoke("testbed.start", SERVER)
    run = Run(hardened.inv)
    assert run.exit_code == 0 and run.host(SERVER)["changed"] == 0, run.steps(status="changed")
    h = _deploy_host()
    assert "Status: active" in h.check_output("ufw status")
    assert h.service("fail2ban").is_running and h.service("ssh").is_running
    assert h.sysctl("net.ipv4.conf.all.log_martians") == 1       # re-applied at boot (by ufw-init)
    assert h.sysctl("net.ipv4.conf.all.accept_redirects") == 0
    with pytest.raises(paramiko.AuthenticationException):
        _login_as("root").close()


def test_an_unknown_cipher_fails_the_run_and_the_old_config_stays(hardened):
    before = sh(SERVER, "sha256sum /etc/ssh/sshd_config").stdout
    bad = _inv(hardened.tmp, name="badcipher",
               harden_ssh_ciphers=DEFAULTS["harden_ssh_ciphers"] + ["aes512-gcm@openssh.com"])
    run = Run(bad)
    assert run.exit_code == 1
    failed = _failed(run)
    assert failed[0][0] == "template /etc/ssh/sshd_config"
    assert "validation failed" in failed[0][1] and "sshd -t -f" in failed[0][1]
    assert "aes512-gcm@openssh.com" in (run.steps(status="failed")[0].get("output") or "")
    assert sh(SERVER, "sha256sum /etc/ssh/sshd_config").stdout == before
    _login_as("deploy").close()                      # still reachable, as deploy
    assert Run(hardened.inv).host(SERVER)["changed"] == 0


def test_a_config_that_locks_the_deploy_user_out_is_rolled_back(hardened):
    before = sh(SERVER, "sha256sum /etc/ssh/sshd_config").stdout
    locked = _inv(hardened.tmp, name="lockout", harden_ssh_allow_groups=["wheel"])
    run = Run(locked)
    assert run.exit_code == 1
    failed = run.steps(status="failed")
    assert [e["resource"] for e in failed] == ["guard fresh SSH login as deploy with sudo on port 22"]
    assert "authentication failed" in failed[0]["reason"]
    assert "restored the previous /etc/ssh/sshd_config, /etc/sudoers.d/50-harden" in failed[0]["reason"]
    assert sh(SERVER, "sha256sum /etc/ssh/sshd_config").stdout == before
    assert "allowgroups sshusers" in sh(SERVER, "sshd -T").stdout            # the running sshd too
    _login_as("deploy").close()
    assert Run(hardened.inv).host(SERVER)["changed"] == 0


def _exit_status(client, command: str) -> int:
    _, out, _ = client.exec_command(command, timeout=30)
    return out.channel.recv_exit_status()


def test_the_release_identity_cannot_read_secrets_or_change_the_system(hardened, tmp_path):
    """What CI deploys with: it logs in, runs its one allowed command, and nothing else."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f", str(tmp_path / "ci")],
                   check=True)
    ci_key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "ci"))
    run = Run(_inv(hardened.tmp, name="release", harden_release_user="release",
                   harden_release_keys=[(tmp_path / "ci.pub").read_text().strip()],
                   harden_release_sudo=[{"as": "root", "command": "/usr/bin/systemctl status ssh.service"}]))
    assert run.exit_code == 0, _failed(run)
    c = _login_as("release", key=ci_key)
    try:
        assert _exit_status(c, "true") == 0
        assert _exit_status(c, "cat /etc/shadow") != 0
        assert _exit_status(c, "touch /etc/release-was-here") != 0
        assert _exit_status(c, "sudo -n cat /etc/shadow") != 0
        assert _exit_status(c, "sudo -n -i true") != 0
        assert _exit_status(c, "sudo -n /usr/bin/systemctl status ssh.service") == 0
        assert _exit_status(c, "sudo -n /usr/bin/systemctl restart ssh.service") != 0
    finally:
        c.close()
    assert sh(SERVER, "test -e /etc/release-was-here", check=False).returncode == 1
    with pytest.raises(paramiko.AuthenticationException):          # the CI key is not root's way in
        _login_as("deploy", key=ci_key).close()
    gone = Run(_inv(hardened.tmp, name="norelease", harden_absent_users=["release"]))
    assert gone.exit_code == 0, _failed(gone)
    assert Run(hardened.inv).host(SERVER)["changed"] == 0


# --- the dead man's switch: the server undoes a lockout on its own ---------------------------

REVERT = 30          # harden_lockout_revert_seconds for these tests: the bound they check
CONTROLLER_SCRIPT = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from engine_helpers import REPO, TEST_ROLES, Run
from provisioner.inventory import load_inventory_file
Run(load_inventory_file(sys.argv[3], roles_root=[TEST_ROLES, REPO / "roles"]))
"""


def _lockout_controller(tmp, **lockout):
    """A controller process provisioning a config that locks the deploy user out."""
    inventory(tmp, [SERVER], ["harden"], name="deadman",
              vars={"harden_trusted_sources": [CONTROLLER], "harden_lockout_revert_seconds": REVERT,
                    **lockout},
              ssh={"user": "deploy", "bootstrap_user": "root", "command_timeout": 60})
    return subprocess.Popen([sys.executable, "-c", CONTROLLER_SCRIPT, str(REPO), str(REPO / "tests"),
                             str(tmp / "deadman.yml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _armed():
    return "provisioner-revert-" in sh(SERVER, "systemctl list-timers --all --no-legend").stdout


def _locked_out_on_disk():
    return sh(SERVER, "grep -qx 'AllowGroups wheel' /etc/ssh/sshd_config", check=False).returncode == 0


def _deploy_logs_in():
    try:
        _login_as("deploy").close()
        return True
    except Exception:
        return False


def _revert_ran_since(since: str) -> bool:
    return "Finished" in sh(SERVER, f"journalctl --no-pager --since @{since} -u 'provisioner-revert-*'").stdout


def test_a_controller_killed_before_its_guard_the_server_reverts_the_lockout(hardened):
    since = sh(SERVER, "date +%s").stdout.strip()
    proc = _lockout_controller(hardened.tmp, harden_ssh_allow_groups=["wheel"])
    try:
        armed = wait_for("the revert timer armed", _armed, 120, every=0.05)
        proc.kill()                                  # kill -9: no guard, no rollback, no finish
        proc.wait()
        # the agent on the server goes on without its controller: the lockout lands ...
        wait_for("the lockout applied", _locked_out_on_disk, 30, every=0.05)
        wait_for("deploy locked out", lambda: not _deploy_logs_in(), 30, every=1)
        # ... and the server undoes it by itself within the bound
        wait_for("a fresh login as deploy", _deploy_logs_in, armed + REVERT + 20 - time.monotonic(), every=2)
        assert time.monotonic() - armed <= REVERT + 20
        assert "allowgroups sshusers" in sh(SERVER, "sshd -T").stdout
        # the login can come back while the revert unit still runs its last step: its
        # "Finished" line follows within seconds
        wait_for("the revert unit finished", lambda: _revert_ran_since(since), 30, every=1)
    finally:
        proc.kill()
        proc.wait()
    sh(SERVER, f"rm -rf {lock.LOCK_DIR}")           # the killed run's lock
    assert Run(hardened.inv).host(SERVER)["changed"] == 0


def _listening_on_loopback_only():
    return sh(SERVER, "ss -Hltn 'sport = :22'").stdout.split()[3:4] == ["127.0.0.1:22"]


def test_a_server_cut_off_mid_guard_reverts_the_lockout(hardened):
    """sshd reloaded to listen on 127.0.0.1 only: the guard's fresh login is refused and retried
    (about 3 s: the window the cut lands in); its rollback cannot reach the server either."""
    from provisioner import testbed as tb
    since = sh(SERVER, "date +%s").stdout.strip()
    proc = _lockout_controller(hardened.tmp, harden_ssh_extra_lines=["ListenAddress 127.0.0.1"])
    cut = False
    try:
        wait_for("the revert timer armed", _armed, 120, every=0.05)
        reloaded = wait_for("sshd reloaded on loopback only", _listening_on_loopback_only, 60, every=0.02)
        tb.cut(SERVER)                               # the guard is retrying its login now
        cut = True
        time.sleep(REVERT + 10)                      # the whole bound passes while cut off
        tb.heal(SERVER)
        cut = False
        wait_for("a fresh login as deploy", _deploy_logs_in, 20, every=2)
        assert time.monotonic() - reloaded <= REVERT + 40
        # the server's timer did it, not the guard
        wait_for("the revert unit finished", lambda: _revert_ran_since(since), 30, every=1)
        assert not _listening_on_loopback_only()
    finally:
        if cut:
            tb.heal(SERVER)
        proc.kill()
        proc.wait()
    sh(SERVER, f"rm -rf {lock.LOCK_DIR}")
    assert Run(hardened.inv).host(SERVER)["changed"] == 0


def test_a_custom_ssh_port(hardened, tmp_path):
    """Last: it re-provisions the server on port 2222. Run 1 connects on 22 and moves sshd; the
    guard logs in on 2222; run 2 uses port 2222 in the inventory and closes 22 in ufw too."""
    invoke("testbed.reset", SERVER)
    kh = tmp_path / "known_hosts"
    base = (REPO / ".testbed" / "known_hosts").read_text()
    addr = ADDRESSES[SERVER]
    kh.write_text(base + "".join(f"[{addr}]:2222 {l.split(' ', 1)[1]}\n" for l in base.splitlines()
                                 if l.split(" ", 1)[0] == addr))
    first = Run(_inv(tmp_path, name="port22", known_hosts=kh, harden_ssh_port=2222))
    assert first.exit_code == 0, _failed(first)
    assert [e["resource"] for e in first.steps(status="ok") if e["resource"].startswith("guard ")] == [
        "guard fresh SSH login as deploy with sudo on port 2222"]
    moved = _inv(tmp_path, name="port2222", port=2222, known_hosts=kh, harden_ssh_port=2222)
    second = Run(moved)
    changed = {e["resource"] for e in second.steps(status="changed")}
    assert second.exit_code == 0 and "ufw" in changed, _failed(second)
    assert changed <= {"ufw", "template /etc/fail2ban/jail.local", "handler restart fail2ban"}, changed
    assert Run(moved).host(SERVER)["changed"] == 0
    assert "port 2222" in sh(SERVER, "sshd -T").stdout
    status = sh(SERVER, "ufw status").stdout
    assert "2222/tcp" in status and not re.search(r"^22/tcp", status, re.M)
    with pytest.raises(OSError):                     # refused or dropped (NoValidConnectionsError, timeout)
        _login_as("deploy", port=22).close()


def test_moving_ssh_from_one_custom_port_to_another(hardened, tmp_path):
    """After test_a_custom_ssh_port (the server is on 2222): the known_hosts of a server that has
    always been on 2222 names it only as [addr]:2222; the guard must still log in on 2200."""
    if "port 2222" not in sh(SERVER, "sshd -T").stdout:
        pytest.skip("needs the server left on port 2222 by test_a_custom_ssh_port")
    addr = ADDRESSES[SERVER]
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(f"[{addr}]:2222 {l.split(' ', 1)[1]}\n"
                          for l in (REPO / ".testbed" / "known_hosts").read_text().splitlines()
                          if l.split(" ", 1)[0] == addr))
    run = Run(_inv(tmp_path, name="port2200", port=2222, known_hosts=kh, harden_ssh_port=2200))
    assert run.exit_code == 0, _failed(run)
    assert "guard fresh SSH login as deploy with sudo on port 2200" in {
        e["resource"] for e in run.steps(status="ok")}
    assert "port 2200" in sh(SERVER, "sshd -T").stdout


def test_the_post_quantum_key_exchange_comes_first_where_openssh_has_it():
    kex = DEFAULTS["harden_ssh_kex"]
    assert HARDEN.offered(kex, {"version_id": "13"})[:2] == ["mlkem768x25519-sha256",
                                                            "sntrup761x25519-sha512@openssh.com"]
    on_12 = HARDEN.offered(kex, {"version_id": "12"})          # OpenSSH 9.2: sshd -t would refuse it
    assert "mlkem768x25519-sha256" not in on_12 and on_12[0] == "sntrup761x25519-sha512@openssh.com"
    with pytest.raises(ValueError, match="harden_ssh_kex"):
        HARDEN.sshd_vars({"harden_ssh_kex": ["mlkem768x25519-sha256"]}, None, {"version_id": "12"})


def test_the_trusted_sources_are_exempt_from_sshds_penalties_where_openssh_has_them():
    """OpenSSH 9.8+ (Debian 13) refuses for a while a source whose connections fail or never
    authenticate: the controller's probes and scans must never get it locked out."""
    from types import SimpleNamespace
    s = SimpleNamespace(port=22, trusted=["10.77.0.1", "10.9.0.0/24"], allow_groups=["sshusers"])
    on_13 = HARDEN.sshd_vars(DEFAULTS, s, {"version_id": "13"})
    assert on_13["penalty_exempt"] == ["10.77.0.1", "10.9.0.0/24"]
    assert HARDEN.sshd_vars(DEFAULTS, s, {"version_id": "12"})["penalty_exempt"] is None   # 9.2


def test_fail2ban_counts_the_connections_sshd_refuses_for_its_own_penalties():
    """OpenSSH 10's log line for a connection its per-source penalty refused (seen on a Debian 13
    test server): the filter override must match it, with the attacker's address as the host."""
    line = ("drop connection #0 from [10.77.0.12]:40690 on [10.77.0.11]:22 penalty: failed "
            "authentication")
    regex = HARDEN.SSHD_PENALTY_FILTER.splitlines()[-1].strip()
    m = re.match(regex.replace("<HOST>", r"(?P<host>[0-9.:a-f]+)"), line)
    assert m and m.group("host") == "10.77.0.12"
    assert "%(known/failregex)s" in HARDEN.SSHD_PENALTY_FILTER      # sshd's own rules stay

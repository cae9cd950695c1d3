"""Role restic, pure: the two sides, the sshd rule it demands on the repository host, matching
keys, the jobs' commands (mongodump first on MongoDB hosts), bad vars. Live: tests/test_backup_live.py."""
from __future__ import annotations

import json
import subprocess

import pytest

import roles.restic as role
from provisioner.api import RoleContext, VarError
from provisioner.inventory import load_inventory_file
from provisioner.secret import Secret

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

PASSWORD, SEED = "restic-pass-0123456789-abcdef", "restic-seed-0123456789-abcdef"
WEB1, VAULT = "10.77.0.11", "10.77.0.14"
HOSTKEY = "AAAAC3NzaC1lZDI1NTE5AAAAIHZhdWx0a2V5dmF1bHRrZXl2YXVsdGtleXZhdWx0"
TRIXIE = {"id": "debian", "version_id": "13", "codename": "trixie", "virt": "none"}
BLOCK = ["Match Group resticsftp", "    ChrootDirectory /srv/sftp/%u",
         "    ForceCommand internal-sftp", "    AuthorizedKeysFile /etc/ssh/authorized_keys/%u",
         "    PermitTTY no", "    AllowTcpForwarding no", "    AllowAgentForwarding no",
         "    X11Forwarding no"]


def make_inventory(tmp_path, *, extra_lines=BLOCK, web_roles=("restic",), **env_vars):
    (tmp_path / "known_hosts").write_text(f"{VAULT} ssh-ed25519 {HOSTKEY}\n")
    doc = {"env": "rs", "known_hosts": "known_hosts", "ssh": {"user": "root"},
           "vars": {"restic_repo_host": "vault", "restic_password": "@pw",
                    "restic_ssh_seed": "@seed", **env_vars},
           "hosts": {"web1": {"address": WEB1}, "vault": {"address": VAULT}},
           "groups": {"app": {"hosts": ["web1"], "roles": ["harden", *web_roles]},
                      "backup": {"hosts": ["vault"], "roles": ["harden", "restic"],
                                 "vars": {"harden_ssh_extra_lines": list(extra_lines)}}}}
    text = json.dumps(doc).replace('"@pw"', "!vault pw").replace('"@seed"', "!vault seed")
    (tmp_path / "rs.yml").write_text(text)
    return load_inventory_file(tmp_path / "rs.yml").resolve(
        {"pw": Secret(PASSWORD), "seed": Secret(SEED), "mongodb_admin_password": Secret("m" * 24),
         "mongodb_app_password": Secret("a" * 24)})


def built(inv, name):
    ctx = RoleContext(inv.hosts[name], inv, TRIXIE, False)
    return {r.id: r for r in role.resources(inv.hostvars(name), ctx)}


def test_the_repository_host_gets_a_chrooted_account_per_source(tmp_path):
    r = built(make_inventory(tmp_path), "vault")
    user = r["user restic-web1"]
    assert (user.shell, user.system, user.groups) == ("/usr/sbin/nologin", True,
                                                       ("resticsftp", "sshusers"))
    chroot, repo = r["directory /srv/sftp/restic-web1"], r["directory /srv/sftp/restic-web1/repo"]
    assert (chroot.owner, chroot.mode) == ("root", "0755")
    assert (repo.owner, repo.mode) == ("restic-web1", "0700")
    key = r["file /etc/ssh/authorized_keys/restic-web1"].content.text
    assert key.startswith("restrict ssh-ed25519 ") and key.count("\n") == 1


def test_the_repository_host_needs_the_sshd_rule_and_is_told_the_lines(tmp_path):
    inv = make_inventory(tmp_path, extra_lines=BLOCK[:3])
    with pytest.raises(VarError) as e:
        role.check(inv.hostvars("vault"), RoleContext(inv.hosts["vault"], inv, TRIXIE, False))
    assert e.value.var == "harden_ssh_extra_lines"
    assert json.dumps(BLOCK) in e.value.fix


def test_a_source_host_gets_secret_files_an_alias_and_three_jobs(tmp_path):
    r = built(make_inventory(tmp_path), "web1")
    pw = r["file /etc/restic/password"]
    assert (pw.mode, pw.content.text, pw.content.display) == ("0600", PASSWORD, None)
    assert r["file /etc/restic/known_hosts"].content.text == f"{VAULT} ssh-ed25519 {HOSTKEY}\n"
    alias = r["template /etc/ssh/ssh_config.d/restic.conf"].content.text
    assert "Host restic-repo\n    HostName 10.77.0.14\n    Port 22\n    User restic-web1\n" in alias
    assert "StrictHostKeyChecking yes" in alias and "BatchMode yes" in alias
    env = r["template /etc/restic/env"].content.text
    assert "RESTIC_REPOSITORY=sftp:restic-repo:/repo\nRESTIC_PASSWORD_FILE=/etc/restic/password" in env
    assert PASSWORD not in env
    backup = r["file /etc/systemd/system/restic-backup.service"].content.text
    assert "EnvironmentFile=/etc/restic/env" in backup
    assert "-- restic backup --tag provisioner --exclude /etc/restic /etc\n" in backup
    assert "--max-age-seconds 129600 " in backup                          # 36 h
    forget = r["file /etc/systemd/system/restic-forget.service"].content.text
    assert ("restic forget --prune --tag provisioner --keep-last 3 --keep-daily 7 --keep-weekly 5 "
            "--keep-monthly 12") in forget
    check = r["file /etc/systemd/system/restic-check.service"].content.text
    assert 'restic check "--read-data-subset=5%%"' in check        # systemd's % doubled
    assert "Description=restic check of 5%% of the data" in check
    assert {f"service restic-{j}.timer" for j in (*role.JOBS, "verify")} <= set(r)
    drill = r["file /etc/systemd/system/restic-verify.service"].content.text
    assert ("--lock restic --drill -- /usr/bin/python3 /usr/local/lib/provisioner/drill.py files "
            "--scratch /var/tmp/provisioner-restic-drill /etc\n") in drill
    assert "mongodump" not in backup


def test_both_sides_derive_the_same_key(tmp_path):
    inv = make_inventory(tmp_path)
    private = built(inv, "web1")["file /etc/restic/id_ed25519"].content.text
    authorized = built(inv, "vault")["file /etc/ssh/authorized_keys/restic-web1"].content.text
    path = tmp_path / "k"
    path.write_text(private)
    path.chmod(0o600)
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True,
                         check=True).stdout.split()[1]
    assert f" {pub} " in authorized


def test_a_mongodb_host_dumps_first_with_its_password_in_a_root_only_file(tmp_path):
    r = built(make_inventory(tmp_path, web_roles=("mongodb", "restic")), "web1")
    conf = r["template /etc/restic/mongodump.yml"]
    assert conf.mode == "0600" and '"' + "m" * 24 + '"' in conf.content.text
    assert "m" * 24 not in (conf.content.display or "")
    backup = r["file /etc/systemd/system/restic-backup.service"].content.text
    assert "mongodump --quiet --config=/etc/restic/mongodump.yml --gzip --archive=" in backup
    assert backup.rstrip().splitlines()[-4].endswith(f"/etc {role.DUMP}")


@pytest.mark.parametrize("var, value, message", [
    ("restic_repo_host", "nas", "not a host"),
    ("restic_paths", ["etc"], "not a list of absolute paths"),
    ("restic_keep", {"daily": 0}, "counts >= 1"),
    ("restic_keep", {"fortnightly": 2}, "not a mapping"),
    ("restic_check_subset", "lots", "not a subset"),
    ("restic_schedule", {"backup": "daily"}, "one calendar expression per job"),
    ("restic_max_age_hours", {"backup": 0, "check": 1, "verify": 1}, "hours above 0"),
    ("restic_drill_schedule", "daily\nUser=x", "calendar expression"),
])
def test_bad_vars_are_refused(tmp_path, var, value, message):
    inv = make_inventory(tmp_path, **{var: value})
    with pytest.raises(VarError, match=message) as e:
        role.check(inv.hostvars("web1"), RoleContext(inv.hosts["web1"], inv, TRIXIE, False))
    assert e.value.var == var


def test_every_job_unit_is_written_before_the_first_timer_starts(tmp_path):
    """systemd then reloads once for all of them (remote/agent.py Reloads), not once per job."""
    ids = list(built(make_inventory(tmp_path), "web1"))
    units = [i for i, rid in enumerate(ids) if rid.startswith("file /etc/systemd/system/")]
    timers = [i for i, rid in enumerate(ids) if rid.startswith("service ")]
    assert len(timers) == len(units) // 2 >= 3 and max(units) < min(timers)

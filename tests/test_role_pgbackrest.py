"""Role pgbackrest, pure: which side a host is on, the keys both sides derive, rendered configs,
the version guard, the job wrapper's status and metrics. The live tests are in
tests/test_backup_live.py."""
from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest

import roles.pgbackrest as role
from provisioner.api import RoleContext, VarError, apt
from provisioner.facts import Facts, check_key
from provisioner.inventory import load_inventory_file
from provisioner.ops import PlanError
from provisioner.secret import Secret
from provisioner.sshkeys import known_host_lines, ssh_keypair

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

CIPHER, SEED = "cipher-pass-0123456789-abcdef", "ssh-seed-0123456789-abcdefgh"
DB1, VAULT = "10.77.0.13", "10.77.0.14"
KEYS = {DB1: "AAAAC3NzaC1lZDI1NTE5AAAAIDB1hostkeyDB1hostkeyDB1hostkeyDB1hostk",
        VAULT: "AAAAC3NzaC1lZDI1NTE5AAAAIHZhdWx0a2V5dmF1bHRrZXl2YXVsdGtleXZhdWx0"}
TRIXIE = {"id": "debian", "version_id": "13", "codename": "trixie", "virt": "none"}


def make_inventory(tmp_path, *, known=True, app_roles=(), vault_roles=(), **env_vars):
    (tmp_path / "known_hosts").write_text(
        "".join(f"{a} ssh-ed25519 {k}\n" for a, k in KEYS.items()) if known else "")
    doc = {"env": "bk", "known_hosts": "known_hosts", "ssh": {"user": "root"},
           "vars": {"pgbackrest_repo_host": "vault", "pgbackrest_cipher_pass": "@cipher",
                    "pgbackrest_ssh_seed": "@seed", **({"restic_repo_host": "vault",
                    "restic_password": "@cipher", "restic_ssh_seed": "@seed"}
                    if "restic" in app_roles else {}), **env_vars},
           "hosts": {"db1": {"address": DB1}, "vault": {"address": VAULT},
                     "web1": {"address": "10.77.0.11"}},
           "groups": {"db": {"hosts": ["db1"], "roles": ["harden", "postgresql", "pgbackrest"]},
                      "backup": {"hosts": ["vault"], "roles": ["harden", "pgbackrest", *vault_roles]},
                      "app": {"hosts": ["web1"], "roles": list(app_roles)}}}
    doc["hosts"]["db1"]["vars"] = {"postgresql_databases": [{"name": "app", "owner": "postgres"}]}
    text = json.dumps(doc).replace('"@cipher"', "!vault cipher").replace('"@seed"', "!vault seed")
    (tmp_path / "bk.yml").write_text(text)
    inv = load_inventory_file(tmp_path / "bk.yml")
    return inv.resolve({"cipher": Secret(CIPHER), "seed": Secret(SEED),
                        "pg_app_password": Secret("x" * 20)})


def ctx(inv, name, os=TRIXIE):
    return inv.hostvars(name), RoleContext(inv.hosts[name], inv, os, False)


def built(inv, name):
    v, c = ctx(inv, name)
    return {r.id: r for r in role.resources(v, c)}


# --- keys ---------------------------------------------------------------------------------------

def test_a_derived_key_is_a_valid_openssh_key_and_the_same_every_time(tmp_path):
    priv, pub = ssh_keypair(Secret(SEED), "pgbackrest repo", "c@x")
    assert ssh_keypair(Secret(SEED), "pgbackrest repo", "c@x") == (priv, pub)
    assert ssh_keypair(Secret(SEED), "pgbackrest db", "c@x")[1] != pub
    path = tmp_path / "k"
    path.write_text(priv.reveal())
    path.chmod(0o600)
    out = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == pub.split()[:2]
    assert SEED not in repr(priv) and str(priv) == "***"


def test_a_seed_must_be_a_secret():
    with pytest.raises(TypeError, match="secret"):
        ssh_keypair(SEED, "x", "c")


def test_known_host_lines_pick_the_peer_only(tmp_path):
    (tmp_path / "kh").write_text(f"{DB1} ssh-ed25519 {KEYS[DB1]}\n[{DB1}]:2222 ssh-rsa AAAA\n"
                                 f"{VAULT} ssh-ed25519 {KEYS[VAULT]}\n# comment\n")
    assert known_host_lines(tmp_path / "kh", DB1) == [f"{DB1} ssh-ed25519 {KEYS[DB1]}"]
    assert known_host_lines(tmp_path / "missing", DB1) == []


# --- checks -------------------------------------------------------------------------------------

def test_sides_come_from_the_inventory(tmp_path):
    inv = make_inventory(tmp_path)
    repo = role.check(*ctx(inv, "vault"))
    assert repo["side"] == "repo" and repo["ssh_group"] == "sshusers"
    assert [(s.name, s.data, s.port) for s in repo["stanzas"]] == [
        ("db1", "/var/lib/postgresql/17/main", 5432)]
    db = role.check(*ctx(inv, "db1"))
    assert db["side"] == "db" and db["repo"].name == "vault"


@pytest.mark.parametrize("var, value, message", [
    ("pgbackrest_repo_host", "nas", "'nas' is not a host"),
    ("pgbackrest_db_group", "dbs", "no group 'dbs'"),
    ("pgbackrest_version", "2", "not a version"),
    ("pgbackrest_retention_days", 0, "not a number of days"),
    ("pgbackrest_compress_type", "xz", "unknown"),
    ("pgbackrest_schedule", {"full": "weekly"}, "one calendar expression per backup kind"),
    ("pgbackrest_schedule", {"full": "weekly\nExecStart=/bin/sh", "diff": "daily",
                             "incr": "hourly"}, "one line"),
    ("pgbackrest_max_age_hours", {"full": 1, "diff": 1, "incr": "1"}, "one number of hours per"),
    ("pgbackrest_max_age_hours", {"full": 1, "diff": 1, "incr": 0}, "0 or less"),
    ("pgbackrest_first_backup_timeout", 30, "30 is not in 60..604800"),
    ("pgbackrest_first_backup_timeout", 604801, "604801 is not in 60..604800"),
])
def test_bad_vars_are_refused_with_the_var_named(tmp_path, var, value, message):
    inv = make_inventory(tmp_path, **{var: value})
    with pytest.raises(VarError, match=message) as e:
        role.check(*ctx(inv, "vault"))
    assert e.value.var.startswith(var)


def test_a_plain_text_passphrase_is_refused(tmp_path):
    inv = make_inventory(tmp_path)
    v, c = ctx(inv, "vault")
    v["pgbackrest_cipher_pass"] = "a-plain-text-passphrase-in-the-file"
    with pytest.raises(VarError, match="secret") as e:
        role.check(v, c)
    assert "!vault" in e.value.fix


def test_a_host_that_is_neither_side_is_refused(tmp_path):
    inv = make_inventory(tmp_path, app_roles=["pgbackrest"])
    v, c = ctx(inv, "web1")
    with pytest.raises(VarError, match="neither the repository host"):
        role.check(v, c)


def test_a_peer_missing_from_known_hosts_is_refused_once_connected(tmp_path):
    inv = make_inventory(tmp_path, known=False)
    role.check(*ctx(inv, "db1", os=None))              # `invoke check`: no server yet, fine
    with pytest.raises(VarError, match="known_hosts has no key of the repository host vault"):
        role.check(*ctx(inv, "db1"))


# --- what each side gets ------------------------------------------------------------------------

def test_the_repository_host_gets_the_cipher_the_timers_and_the_database_key(tmp_path):
    inv = make_inventory(tmp_path)
    r = built(inv, "vault")
    conf = r["template /etc/pgbackrest.conf"]
    assert (conf.mode, conf.owner, conf.group) == ("0640", "root", "pgbackrest")
    text = conf.content.text
    assert f"repo1-cipher-pass={CIPHER}" in text and CIPHER not in conf.content.display
    assert "repo1-cipher-type=aes-256-cbc" in text and "repo1-retention-full-type=time" in text
    assert "[db1]\npg1-host=10.77.0.13\npg1-host-user=postgres\n" \
           "pg1-path=/var/lib/postgresql/17/main\npg1-port=5432" in text
    user = r["user pgbackrest"]
    db_pub = ssh_keypair(Secret(SEED), "pgbackrest db", "x")[1].rsplit(" ", 1)[0]
    (key,) = user.authorized_keys
    assert key.startswith("no-agent-forwarding,no-X11-forwarding,no-port-forwarding,no-pty,"
                          'command="/usr/bin/pgbackrest ${SSH_ORIGINAL_COMMAND#* }" ')
    assert db_pub in key and user.groups == ("sshusers",)
    assert r["file /var/lib/pgbackrest/.ssh/known_hosts"].content.text == \
        f"{DB1} ssh-ed25519 {KEYS[DB1]}\n"
    assert r["file /var/lib/pgbackrest/.ssh/id_ed25519"].content.display is None
    for kind, max_age in (("full", 691200), ("diff", 172800), ("incr", 10800)):
        assert r[f"service pgbackrest-db1-{kind}.timer"].enabled
        service = r[f"file /etc/systemd/system/pgbackrest-db1-{kind}.service"].content.text
        assert (f"ExecStart=/usr/bin/python3 /usr/local/lib/provisioner/backupjob.py run --job "
                f"pgbackrest-db1-{kind} --lock pgbackrest-db1 --user pgbackrest --stanza db1 "
                f"--max-age-seconds {max_age} "
                f'--prepare "[\\"pgbackrest\\", \\"--stanza=db1\\", \\"stanza-create\\"]" '
                f"-- pgbackrest --stanza=db1 --type={kind} backup") in service
    timer = r["file /etc/systemd/system/pgbackrest-db1-full.timer"].content.text
    assert "OnCalendar=Sun *-*-* 01:00:00" in timer and "Persistent=true" in timer
    assert not any("60-pgbackrest" in rid for rid in r)


@pytest.mark.parametrize("env_vars, block", [
    ({}, True),                                                   # the default, on 2.55
    ({"pgbackrest_block_incremental": False}, False),
    ({"pgbackrest_version": "2.45"}, False),                      # Debian 12's: a beta there
    ({"pgbackrest_version": "2.52"}, False),                      # might be 2.52.0
    ({"pgbackrest_version": "2.54"}, False),                      # might be before 2.54.2
    ({"pgbackrest_version": "2.59"}, True),
])
def test_block_incremental_is_on_where_the_version_has_it(tmp_path, env_vars, block):
    text = built(make_inventory(tmp_path, **env_vars), "vault")[
        "template /etc/pgbackrest.conf"].content.text
    glob = text.split("\n[db1]\n")[0]
    options = [line for line in glob.splitlines()
               if line.startswith(("repo1-bundle", "repo1-block"))]
    # repo-block needs repo-bundle: both or neither, in [global] (the backup command's options)
    assert options == (["repo1-bundle=y", "repo1-block=y"] if block else [])
    assert "repo1-block" not in text[len(glob):]


def test_the_database_server_gets_no_backup_options(tmp_path):
    conf = built(make_inventory(tmp_path), "db1")["template /etc/pgbackrest.conf"].content.text
    assert "bundle" not in conf and "block" not in conf


def test_the_database_server_archives_to_the_repository_and_holds_no_cipher(tmp_path):
    inv = make_inventory(tmp_path)
    r = built(inv, "db1")
    conf = r["template /etc/pgbackrest.conf"].content.text
    assert "repo1-host=10.77.0.14\nrepo1-host-user=pgbackrest" in conf
    assert "[db1]\npg1-path=/var/lib/postgresql/17/main\npg1-port=5432" in conf
    assert "cipher" not in conf.replace("no cipher key", "") and CIPHER not in conf
    archive = r["template /etc/postgresql/17/main/conf.d/60-pgbackrest.conf"]
    assert "archive_command = 'pgbackrest --stanza=db1 archive-push %p'" in archive.content.text
    assert "archive_mode = on" in archive.content.text and archive.notify == (role.RESTART,)
    repo_pub = ssh_keypair(Secret(SEED), "pgbackrest repo", "x")[1].rsplit(" ", 1)[0]
    (key,) = r["user postgres"].authorized_keys
    assert repo_pub in key and "command=" in key
    assert r["file /var/lib/postgresql/.ssh/known_hosts"].content.text == \
        f"{VAULT} ssh-ed25519 {KEYS[VAULT]}\n"
    assert not any(rid.startswith("file /etc/systemd") for rid in r)
    steps = role.handlers(*ctx(inv, "db1"))[role.RESTART]
    assert steps[-1]["run"][-2:] == ["17/main", "postgresql@17-main"]


def test_both_sides_derive_matching_keys(tmp_path):
    inv = make_inventory(tmp_path)
    repo, db = built(inv, "vault"), built(inv, "db1")
    repo_private = repo["file /var/lib/pgbackrest/.ssh/id_ed25519"].content.text
    db_private = db["file /var/lib/postgresql/.ssh/id_ed25519"].content.text
    path = tmp_path / "k"
    for private, authorized in ((repo_private, db["user postgres"].authorized_keys[0]),
                                (db_private, repo["user pgbackrest"].authorized_keys[0])):
        path.write_text(private)
        path.chmod(0o600)
        pub = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True,
                             text=True, check=True).stdout.split()[1]
        assert f" {pub} " in authorized


# --- the version guard --------------------------------------------------------------------------

def plan_version(want, installed=None, candidate=None):
    facts = Facts({"packages": {"installed": {"pgbackrest": installed}},
                   "package_candidates": {"pgbackrest": candidate}})
    return role.SameVersion(want, "12").plan(facts)


def test_the_same_version_passes():
    assert "2.55-1" in plan_version("2.55", candidate="2.55-1")[0].why
    assert plan_version("2.55", installed="2.55-1+b1")


def test_check_mode_on_a_fresh_server_judges_the_version_apt_would_install():
    # the package batch, foreseen in check mode, counts pgbackrest as installed, at no version
    assert "2.55-1" in plan_version("2.55", installed=apt.FORESEEN, candidate="2.55-1")[0].why
    with pytest.raises(PlanError, match="2.45-1"):
        plan_version("2.55", installed=apt.FORESEEN, candidate="2.45-1")


def test_another_version_stops_the_run_before_anything_is_installed():
    with pytest.raises(PlanError) as e:
        plan_version("2.55", candidate="2.45-1")
    text = str(e.value)
    assert "Debian 12" in text and "2.45-1" in text and "pgbackrest_version" in text
    assert "Nothing was installed" in text


# --- the stanza, from the first run ---------------------------------------------------------------

def test_the_repository_host_creates_the_stanza_once_waiting_for_the_database_server(tmp_path):
    r = built(make_inventory(tmp_path), "vault")
    stanza = r["stanza db1"]
    info = "/var/lib/pgbackrest/backup/db1/backup.info"
    assert stanza.facts() == {"files": [info]}
    [change] = stanza.plan(Facts({"files": {info: {"exists": False}}}))
    [step] = change.steps
    assert step["run"] == ["runuser", "-u", "pgbackrest", "--", "pgbackrest", "--stanza=db1",
                           "--log-level-console=warn", "stanza-create"]
    assert step["attempts"] * step["delay"] >= 300          # a whole env's first run meanwhile
    [noop] = stanza.plan(Facts({"files": {info: {"exists": True, "type": "file"}}}))
    assert noop.why.startswith("the repository has it")


# --- the stanza after a major upgrade -----------------------------------------------------------

CHECK = ["python3", "-", "--stanza", "db1", "--cluster", "main", "--data",
         "/var/lib/postgresql/17/main"]
codes = role.stanzacheck


def test_the_database_server_checks_the_stanza_between_its_config_and_archive_settings(tmp_path):
    r = built(make_inventory(tmp_path), "db1")
    ids = list(r)
    conf, stanza = ids.index("template /etc/pgbackrest.conf"), ids.index("stanza db1 upgrade")
    # stanza-upgrade reads pg1-path from the new config, and runs before the new cluster gets
    # the archive settings (the postgresql role's upgrade ran before this role)
    assert conf < stanza < ids.index("template /etc/postgresql/17/main/conf.d/60-pgbackrest.conf")
    assert r["stanza db1 upgrade"].facts() == {
        "checks": [{"argv": CHECK, "stdin": role.STANZA_CHECK_SOURCE}],
        "dirs": ["/etc/postgresql"]}
    assert "stanza db1 upgrade" not in built(make_inventory(tmp_path), "vault")


def plan_stanza(rc, majors=("15", "17")):
    facts = Facts({"checks": {check_key(CHECK): rc}, "dirs": {"/etc/postgresql": {"entries": {
        m: {"type": "dir", "target": None, "mtime": 0} for m in majors}}}})
    return role.StanzaUpgraded("db1", "17", "main", "/var/lib/postgresql/17/main").plan(facts)


@pytest.mark.parametrize("rc, reason", [
    (codes["OLDER"], "the stanza records an older PostgreSQL major than this server's cluster "
                     "17/main (PostgreSQL 15's cluster is still here: pg_upgradecluster moved "
                     "the data)"),
    (codes["OTHER_SYSTEM"], "the stanza records PostgreSQL 17 of another system id"),
])
def test_a_stanza_behind_the_cluster_is_upgraded_on_the_database_server(rc, reason):
    [change] = plan_stanza(rc)
    assert change.action == "upgrade" and change.why.startswith(reason)
    assert change.why.endswith("archive-push and backups refuse the cluster until stanza-upgrade")
    [step] = change.steps
    assert step["run"] == ["runuser", "-u", "postgres", "--", "pgbackrest", "--stanza=db1",
                           "--log-level-console=warn", "stanza-upgrade"]
    assert step["attempts"] > 1 and step["delay"] > 0


@pytest.mark.parametrize("rc, reason", [
    (codes["MATCH"], "the stanza records this server's cluster 17/main"),     # the second run
    (codes["NOT_UPGRADED"], "no other PostgreSQL major's cluster"),
    (codes["NO_STANZA"], "the repository has no stanza db1 yet"),
    (codes["NO_CLUSTER"], "no cluster in /var/lib/postgresql/17/main yet"),
    (codes["UNKNOWN"], "could not compare this server's cluster 17/main with the stanza (check "
                       "exit 6"),
    (124, "could not compare this server's cluster 17/main with the stanza (check exit 124"),
])
def test_otherwise_the_stanza_is_left_alone_and_says_why(rc, reason):
    [noop] = plan_stanza(rc)
    assert noop.why.startswith(reason), noop.why


def test_a_stanza_ahead_of_the_cluster_stops_the_role_with_how_to_go_on():
    with pytest.raises(PlanError) as e:
        plan_stanza(codes["NEWER"])
    assert "never moves a stanza back" in str(e.value)
    assert "pgbackrest --stanza=db1 stanza-upgrade" in str(e.value)


# stanzacheck.py, what the check runs on the database server

OLD_ID, NEW_ID = 7443182330010213476, 7512345678901234567


def cluster(tmp_path, version="17", sysid=NEW_ID, others=("15",)):
    """A data folder with PG_VERSION and pg_control, and /etc/postgresql's cluster folders."""
    data = tmp_path / "data"
    (data / "global").mkdir(parents=True)
    (data / "PG_VERSION").write_text(version + "\n")
    (data / "global" / "pg_control").write_bytes(struct.pack("=Q", sysid) + bytes(8184))
    for m in (version, *others):
        (tmp_path / "etc" / m / "main").mkdir(parents=True)
    return str(data), str(tmp_path / "etc")


def stanza_info(*dbs, code=0):
    return [{"name": "db1", "status": {"code": code, "message": "?"},
             "db": [{"id": i, "repo-key": 1, "system-id": sysid, "version": v}
                    for i, (v, sysid) in enumerate(dbs, 1)]}]


@pytest.mark.parametrize("dbs, code, expected", [
    ([("15", OLD_ID)], 0, "OLDER"),                              # just after pg_upgradecluster
    ([("15", OLD_ID), ("17", NEW_ID)], 0, "MATCH"),              # after stanza-upgrade
    ([("17", NEW_ID), ("15", OLD_ID)], 0, "OLDER"),              # the newest id counts
    ([("15", OLD_ID), ("17", OLD_ID + 1)], 0, "OTHER_SYSTEM"),   # 17 made again
    ([("18", NEW_ID)], 0, "NEWER"),
    ([], 1, "NO_STANZA"),                                        # missing stanza path
    ([], 99, "UNKNOWN"),                                         # the repository unreachable
])
def test_the_check_compares_the_stanzas_current_database_with_the_cluster(tmp_path, dbs, code,
                                                                          expected):
    data, etc = cluster(tmp_path)
    rc = codes["decide"]("db1", "main", data, etc, info=lambda s: stanza_info(*dbs, code=code))
    assert rc == codes[expected]


def test_majors_compare_as_numbers():
    assert codes["verdict"](stanza_info(("9.6", 1)), "db1", "10", 2) == codes["OLDER"]
    assert codes["verdict"](stanza_info(("17", 1)), "db1", "9.6", 2) == codes["NEWER"]
    assert codes["verdict"]([{"name": "db2", "db": []}], "db1", "17", 2) == codes["UNKNOWN"]


def test_the_repository_is_asked_only_while_another_majors_cluster_is_here(tmp_path):
    def never(stanza):
        raise AssertionError("asked the repository")
    data, etc = cluster(tmp_path, others=())
    assert codes["decide"]("db1", "main", data, etc, info=never) == codes["NOT_UPGRADED"]
    assert codes["decide"]("db1", "main", str(tmp_path / "none"), etc, info=never) == \
        codes["NO_CLUSTER"]

    def unreachable(stanza):
        raise RuntimeError("ssh: connect to host 10.77.0.14 port 22: Connection timed out")
    data, etc = cluster(tmp_path / "b")
    assert codes["decide"]("db1", "main", data, etc, info=unreachable) == codes["UNKNOWN"]


def test_the_check_runs_from_stdin_and_reads_pgbackrests_json(tmp_path):
    """As the agent runs it: `python3 -` with the source on stdin, standard library only. A fake
    runuser on PATH stands in for `runuser -u postgres -- pgbackrest ... info`."""
    data, etc = cluster(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "info.json").write_text(json.dumps(stanza_info(("15", OLD_ID))))
    fake = bin_dir / "runuser"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat {tmp_path}/info.json\n')
    fake.chmod(0o755)
    source = role.STANZA_CHECK_SOURCE.replace('ETC = "/etc/postgresql"', f'ETC = "{etc}"')
    argv = ["python3", "-I", "-", *CHECK[2:6], "--data", data]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = subprocess.run(argv, input=source, text=True, capture_output=True, env=env)
    assert out.returncode == codes["OLDER"], out.stderr
    assert (tmp_path / "args").read_text().split() == [
        "-u", "postgres", "--", "pgbackrest", "--stanza=db1", "--output=json",
        "--log-level-console=off", "--log-level-file=off", "info"]
    fake.write_text("#!/bin/sh\necho 'ERROR: [056]: unable to find primary' >&2\nexit 56\n")
    out = subprocess.run(argv, input=source, text=True, capture_output=True, env=env)
    assert out.returncode == codes["UNKNOWN"], out.stderr


def test_a_repository_host_that_does_not_answer_costs_its_timeout_and_leaves_no_process(tmp_path):
    data, etc = cluster(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "runuser"           # pgbackrest's ssh, waiting on a host that is down
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {tmp_path}/child\nwait\n")
    fake.chmod(0o755)
    source = (role.STANZA_CHECK_SOURCE.replace('ETC = "/etc/postgresql"', f'ETC = "{etc}"')
              .replace("INFO_TIMEOUT = 40", "INFO_TIMEOUT = 1"))
    t0 = time.monotonic()
    out = subprocess.run(["python3", "-I", "-", *CHECK[2:6], "--data", data], input=source,
                         text=True, capture_output=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                         timeout=60)
    assert out.returncode == codes["UNKNOWN"], out.stderr
    assert time.monotonic() - t0 < 30
    state = Path(f"/proc/{(tmp_path / 'child').read_text().strip()}/stat")
    assert not state.exists() or state.read_text().split(") ")[1][0] == "Z"     # killed


def test_every_job_unit_is_written_before_the_first_timer_starts(tmp_path):
    """systemd then reloads once for all of them (remote/agent.py Reloads), not once per job."""
    ids = list(built(make_inventory(tmp_path), "vault"))
    units = [i for i, rid in enumerate(ids) if rid.startswith("file /etc/systemd/system/")]
    timers = [i for i, rid in enumerate(ids) if rid.startswith("service ")]
    assert len(units) == 8 and len(timers) == 4 and max(units) < min(timers)
    assert ids[timers[0]:] == [f"service pgbackrest-db1-{k}.timer"
                               for k in ("full", "diff", "incr", "verify")]

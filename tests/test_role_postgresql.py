"""Role postgresql: pure checks of its vars, rendering and SCRAM code, then live on three test
servers: the database server, an app server that must be let in, and a server that must not.

CI uses db1, web1 and vault; while developing point the tests at your own servers:
    PROVISIONER_KEEP_TESTBED=1 PROVISIONER_TEST_SERVER=bench06,bench07,bench08 \\
        python3 -m pytest -x -q tests/test_role_postgresql.py
"""
from __future__ import annotations

import base64
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import testinfra

import roles.postgresql
from conftest import invoke
from engine_helpers import ADDRESSES, REPO, Run, inventory, sh
from engine_helpers import test_server as server_for
from provisioner import ops, testbed as tb
from provisioner.testbed import base as base_image, config as tb_config
from provisioner.facts import Facts
from provisioner.inventory import load_inventory_file
from provisioner.roles import available_roles, load_role
from provisioner.api import RoleContext
from provisioner.secret import Secret

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

ROLE = load_role(available_roles()["postgresql"])
PGTOOL = roles.postgresql.pgtool

DB, APP, OTHER = (server_for("db1,web1,vault").split(",") + ["web1", "vault"])[:3]
# the Debian version of DB (bench servers are Debian 12), and so its PostgreSQL and paths
DEBIAN_VERSION = next((base_image.RELEASES[spec.release] for spec in tb_config.inventory_servers()
                       if spec.name == DB), "12")
MAJOR = roles.postgresql.DEBIAN_POSTGRESQL[DEBIAN_VERSION]
ETC = f"/etc/postgresql/{MAJOR}/main"
PASSWORDS = {"pg_app": "app-Pw-0001-correct", "pg_report": "report-Pw-0002-correct"}
TIMES: dict[str, float] = {}

USERS = [{"name": "app", "password": "@vault:pg_app", "databases": ["appdb"]},
         {"name": "report", "password": "@vault:pg_report", "databases": ["appdb", "reports"]}]
DATABASES = [{"name": "appdb", "owner": "app"}, {"name": "reports", "owner": "postgres"}]


# --- helpers -----------------------------------------------------------------------------------

def pg_inventory(tmp_path: Path, secrets: dict | None = None, **db_vars):
    """db: [DB] with the role, app: [APP] (no roles: only its address matters), other: [OTHER].
    "@vault:NAME" strings become `!vault NAME` in the YAML, resolved from `secrets`."""
    db_vars = {"postgresql_users": USERS, "postgresql_databases": DATABASES, **db_vars}
    inv = inventory(tmp_path, [DB, APP, OTHER], [], host_vars={DB: db_vars}, name="pgtest",
                    groups={"db": {"hosts": [DB], "roles": ["postgresql"]},
                            "app": {"hosts": [APP], "roles": []},
                            "other": {"hosts": [OTHER], "roles": []}})
    text = re.sub(r'"@vault:([a-z_0-9]+)"', r"!vault \1", inv.path.read_text())
    inv.path.write_text(text)
    inv = load_inventory_file(inv.path, roles_root=[REPO / "roles"])
    values = {**PASSWORDS, **(secrets or {})}
    return inv.resolve({k: Secret(values[k]) for k in inv.vault_refs()})


def provision(inv) -> Run:
    return Run(inv, limit=DB)


def client(name: str, password: str, *, user="app", db="appdb", host=None, sslmode="require",
           sql="SELECT current_user, (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"):
    """psql over TCP from test server `name`; the password goes in on stdin (PGPASSWORD is set
    inside the server from it), never on a command line."""
    host = host or ADDRESSES[DB]
    script = ('IFS= read -r PGPASSWORD; export PGPASSWORD; exec psql -X -A -t -w '
              f'"host={host} port=5432 dbname={db} user={user} sslmode={sslmode} connect_timeout=5" '
              f'-c "{sql}"')
    return subprocess.run(tb.shell_argv(name, ["/bin/sh", "-c", script]), input=password + "\n",
                          capture_output=True, text=True, timeout=60)


def th(name):
    return testinfra.get_host(f"ssh://{name}", ssh_config=str(REPO / ".testbed" / "ssh_config"))


# --- pure: vars, rendering, SCRAM --------------------------------------------------------------

def ctx_for(tmp_path, **db_vars):
    inv = pg_inventory(tmp_path, **db_vars)
    return inv.hostvars(DB), RoleContext(inv.hosts[DB], inv, {"virt": "systemd-nspawn",
                                                              "version_id": DEBIAN_VERSION}, False)


def test_scram_matches_what_postgresql_stores():
    # stored by PostgreSQL 15.20 for ALTER ROLE app PASSWORD 'pencil'
    stored = ("SCRAM-SHA-256$4096:+Y5Mlj7zhN95XZ9tIKNREA==$h/EU/kpXC1HKZeQyYOUJ7eAcUIK30YT1tmmfS"
              "6+2nnY=:2gccKl7LPHGXChXK49XB+4ZZai5Dvzoos7rXnV7QgDo=")
    assert PGTOOL["scram_matches"]("pencil", stored)
    assert not PGTOOL["scram_matches"]("pencil2", stored)
    assert not PGTOOL["scram_matches"]("pencil", "md5" + "0" * 32)
    assert not PGTOOL["scram_matches"]("pencil", "SCRAM-SHA-256$garbage")
    salt = base64.b64decode("+Y5Mlj7zhN95XZ9tIKNREA==")
    assert PGTOOL["scram_verifier"]("pencil", salt) == stored
    fresh = PGTOOL["scram_verifier"]("pencil")
    assert fresh != stored and PGTOOL["scram_matches"]("pencil", fresh)


def test_hba_allows_the_app_group_and_sources_only(tmp_path):
    v, ctx = ctx_for(tmp_path, postgresql_allowed_sources=["10.9.0.0/24", ADDRESSES[APP],
                                                           "10.9.0.0/24"])
    c = roles.postgresql.config(v, ctx)
    assert c["listen"] == ADDRESSES[DB]
    assert f"listen_addresses = 'localhost,{ADDRESSES[DB]}'" in c["settings"]
    hba = [r for r in ROLE.resources(v, ctx) if r.id.endswith("pg_hba.conf")][0]
    text = hba.content.text if hasattr(hba.content, "text") else hba.content
    rules = [line.split() for line in text.splitlines() if line.startswith("hostssl")]
    assert rules == [["hostssl", "appdb", "app", f"{ADDRESSES[APP]}/32", "scram-sha-256"],
                     ["hostssl", "appdb,reports", "report", f"{ADDRESSES[APP]}/32", "scram-sha-256"],
                     ["hostssl", "appdb", "app", "10.9.0.0/24", "scram-sha-256"],
                     ["hostssl", "appdb,reports", "report", "10.9.0.0/24", "scram-sha-256"]]
    assert ADDRESSES[OTHER] not in text and ADDRESSES[DB] not in text


def test_a_cluster_debian_creates_from_now_on_gets_the_settings_but_not_the_port(tmp_path):
    """Written before the package (the package batch carries it): the cluster the package
    creates starts on them, so the role's own drop-in needs no restart after it. Only the
    role's own settings, which it checks itself: postgresql_settings are checked by PostgreSQL
    in the drop-in, and one it refuses must not reach a new cluster."""
    v, ctx = ctx_for(tmp_path, postgresql_port=5433, postgresql_work_mem="8MB",
                     postgresql_settings={"log_line_prefix": "%m [%p] ", "no_such_setting": 1})
    ids = [r.id for r in ROLE.resources(v, ctx)]
    conf = {r.id: r for r in ROLE.resources(v, ctx)}[
        "file /etc/postgresql-common/createcluster.d/50-provisioner.conf"]
    assert ids.index("directory /etc/postgresql-common") < ids.index(conf.id) < \
        ids.index(f"apt postgresql-{roles.postgresql.DEBIAN_POSTGRESQL[DEBIAN_VERSION]}")
    text = conf.content.text
    assert f"listen_addresses = 'localhost,{ADDRESSES[DB]}'" in text.splitlines()
    assert "work_mem = '8MB'" in text.splitlines()
    assert "log_line_prefix" not in text and "no_such_setting" not in text
    # pg_createcluster picks the port itself (pg_upgradecluster's new cluster takes a free one);
    # ssl it sets up itself
    assert not re.search(r"^(port|ssl) ", text, re.M)
    assert (conf.owner, conf.group, conf.validate, conf.after, conf.notify) == ("root", "root", None, (), ())


def test_no_secret_on_any_command_line_and_passwords_are_checked_on_stdin(tmp_path):
    v, ctx = ctx_for(tmp_path)
    res = list(ROLE.resources(v, ctx))
    req = ops.request(res)
    with_stdin = [c for c in req["checks"] if isinstance(c, dict)]
    assert [c["stdin"] for c in with_stdin] == list(PASSWORDS.values())
    facts = Facts({"os": {}, "files": {p: {"exists": False} for p in req["files"]},
                   "dirs": {"/etc/postgresql": None},
                   "packages": {"installed": {f"postgresql-{MAJOR}": None}, "lists_age": 10},
                   "services": {u: None for u in req["services"]},
                   "checks": {" ".join(__import__("shlex").quote(a) for a in
                                       (c["argv"] if isinstance(c, dict) else c)): 1
                              for c in req["checks"]}})
    shown = []
    for _, result in ops.plan_all(res, facts):
        for ch in result:
            shown += [ch.resource, ch.why]
            for step in getattr(ch, "steps", ()):
                shown += list(step.get("run") or []) + [str(step.get("validate"))]
                if "stdin" in step and step["stdin"] and "ALTER ROLE" in step["stdin"]:
                    assert "SCRAM-SHA-256$4096:" in step["stdin"]
                    assert not any(p in step["stdin"] for p in PASSWORDS.values())
    for p in PASSWORDS.values():
        assert not any(p in s for s in shown)


def test_a_public_address_is_refused(tmp_path):
    """PostgreSQL listens on the inventory address by default: a public one must not be it."""
    import dataclasses
    v, ctx = ctx_for(tmp_path, postgresql_listen_address="1.2.3.4")
    with pytest.raises(ValueError, match="postgresql_listen_address: '1.2.3.4' is not a private address"):
        list(ROLE.resources(v, ctx))
    v, ctx = ctx_for(tmp_path)
    ctx = dataclasses.replace(ctx, host=dataclasses.replace(ctx.host, address="1.2.3.4"))
    with pytest.raises(ValueError, match="the host's inventory address '1.2.3.4' is not a private address.*private IP"):
        list(ROLE.resources(v, ctx))


@pytest.mark.parametrize("var,value,match", [
    ("postgresql_shared_buffers", "128 MB", "postgresql_shared_buffers"),
    ("postgresql_port", 70000, "postgresql_port"),
    ("postgresql_max_connections", 0, "postgresql_max_connections"),
    ("postgresql_allowed_sources", ["db.example.com"], "not an IP address or CIDR"),
    ("postgresql_allowed_sources", ["10.9.0.1/24"], "not an IP address or CIDR"),
    ("postgresql_client_group", "nosuch", "no group 'nosuch'"),
    ("postgresql_listen_address", "db.internal", "postgresql_listen_address"),
    ("postgresql_users", [{"name": "app", "password": "plain-text"}], "must come from the vault"),
    ("postgresql_users", [{"name": "Bad-Name", "password": "@vault:pg_app"}], "not a usable name"),
    ("postgresql_users", [{"name": "postgres", "password": "@vault:pg_app"}], "superuser"),
    ("postgresql_users", [{"name": "app", "password": "@vault:pg_app", "databases": ["nodb"]}],
     "not in postgresql_databases"),
    ("postgresql_databases", [{"name": "x", "owner": "nobody"}], "neither postgres nor"),
    ("postgresql_databases", [{"name": "template1", "owner": "postgres"}], "own database"),
    ("postgresql_settings", {"listen_addresses": "*"}, "managed by the role"),
])
def test_bad_vars_are_refused_with_the_var_name(tmp_path, var, value, match):
    v, ctx = ctx_for(tmp_path, **{var: value})
    with pytest.raises(ValueError, match=match):
        list(ROLE.resources(v, ctx))


@pytest.mark.parametrize("debian, given, major", [("12", "", "15"), ("13", "", "17"),
                                                ("12", "16", "16")])
def test_the_version_is_the_releases_own_unless_set(tmp_path, debian, given, major):
    import dataclasses
    v, ctx = ctx_for(tmp_path, postgresql_version=given)
    ctx = dataclasses.replace(ctx, os={**ctx.os, "version_id": debian})
    resources = list(ROLE.resources(v, ctx))
    assert f"apt postgresql-{major}" in [r.id for r in resources]
    req = ops.request(resources)
    assert f"/etc/postgresql/{major}/main/pg_hba.conf" in req["files"]
    assert any(f"postgresql@{major}-main" in str(steps) for steps in ROLE.handlers(v, ctx).values())


@pytest.mark.parametrize("on_server, refused", [([], False), (["15"], True), (["15", "17"], False),
                                               (["17"], False)])
def test_another_major_already_on_the_server_stops_the_role_with_how_to_upgrade(
        tmp_path, on_server, refused):
    """A server upgraded from Debian 12 to 13 keeps its PostgreSQL 15 cluster: 17 must not be
    put beside it silently (its data would seem gone)."""
    import dataclasses
    v, ctx = ctx_for(tmp_path)
    ctx = dataclasses.replace(ctx, os={**ctx.os, "version_id": "13"})
    resources = list(ROLE.resources(v, ctx))
    assert "postgresql upgrade to 17/main" not in [r.id for r in resources]   # only when asked
    facts = Facts({"dirs": {"/etc/postgresql": {"entries": {m: {"type": "dir"} for m in on_server}}}})
    if not refused:
        assert [type(x).__name__ for x in resources[0].plan(facts)] == ["Noop"]
        return
    with pytest.raises(ops.PlanError) as info:
        resources[0].plan(facts)
    assert "PostgreSQL 15 already holds this server's data" in str(info.value)
    assert "`pg_upgradecluster 15 main`" in str(info.value)
    assert "postgresql_upgrade: true" in str(info.value)
    assert 'postgresql_version: "15"' in str(info.value)


def _dirs(**entries) -> Facts:
    return Facts({"dirs": {path: {"entries": {n: {"type": "dir"} for n in names}} if names is not None
                           else None for path, names in entries.items()}})


@pytest.mark.parametrize("etc, etc17, upgrade_from", [
    (None, None, None),                     # fresh server: the install makes 17/main itself
    (["15"], None, "15"),                   # upgraded from Debian 12: 15/main holds the data
    (["13", "15"], None, "15"),             # the newest older one
    (["15", "17"], ["main"], None),         # done before: 15 kept, stopped, for a rollback
])
def test_postgresql_upgrade_runs_pg_upgradecluster_only_where_an_older_cluster_holds_the_data(
        tmp_path, etc, etc17, upgrade_from):
    import dataclasses
    v, ctx = ctx_for(tmp_path, postgresql_upgrade=True)
    ctx = dataclasses.replace(ctx, os={**ctx.os, "version_id": "13"})
    resources = list(ROLE.resources(v, ctx))
    ids = [r.id for r in resources]
    assert ids.index("apt postgresql-17") < ids.index("postgresql upgrade to 17/main") \
        < ids.index("template /etc/postgresql/17/main/pg_hba.conf")
    facts = _dirs(**{"/etc/postgresql": etc, "/etc/postgresql/17": etc17})
    assert [type(x).__name__ for x in resources[0].plan(facts)] == ["Noop"]    # not refused
    upgrade = resources[ids.index("postgresql upgrade to 17/main")]
    planned = upgrade.plan(facts)
    if upgrade_from is None:
        assert [type(x).__name__ for x in planned] == ["Noop"]
        return
    assert [step["run"] for step in planned[0].steps] == [
        ["pg_upgradecluster", "-v", "17", upgrade_from, "main"]]


def test_a_newer_cluster_is_never_downgraded(tmp_path):
    v, ctx = ctx_for(tmp_path, postgresql_version="15", postgresql_upgrade=True)
    first = next(iter(ROLE.resources(v, ctx)))
    with pytest.raises(ops.PlanError, match=r"PostgreSQL 17 holds this server's data .* never "
                                            r"downgraded\. Set postgresql_version: \"17\""):
        first.plan(_dirs(**{"/etc/postgresql": ["17"]}))


def test_a_release_without_a_known_default_asks_for_the_version(tmp_path):
    import dataclasses
    v, ctx = ctx_for(tmp_path)
    ctx = dataclasses.replace(ctx, os={**ctx.os, "version_id": "14"})
    with pytest.raises(ValueError, match="Debian 14 has no default PostgreSQL known to this role; "
                                         "set postgresql_version"):
        list(ROLE.resources(v, ctx))
    assert ROLE.check(v, dataclasses.replace(ctx, os=None)) is not None    # before connecting: fine


def test_non_ascii_password_is_refused_without_showing_it(tmp_path):
    v, ctx = ctx_for(tmp_path, secrets={"pg_app": "pässwörd-secret"})
    with pytest.raises(ValueError, match="ASCII") as info:
        list(ROLE.resources(v, ctx))
    assert "pässwörd" not in str(info.value)


# --- live ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(testbed):
    """Three never-provisioned servers; the two clients get psql (the test's own tool)."""
    for name in (DB, APP, OTHER):
        invoke("testbed.reset", name)
    errors = []

    def install(name):
        try:
            sh(name, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                     "apt-get install -y -qq postgresql-client >/dev/null")
        except AssertionError as e:
            errors.append(e)
    threads = [threading.Thread(target=install, args=(n,)) for n in (APP, OTHER)]
    for t in threads:
        t.start()
    yield threads, errors


@pytest.fixture(scope="module")
def provisioned(servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pg")
    inv = pg_inventory(tmp)
    check = Run(inv, limit=DB, check=True)                  # a fresh server can be planned
    assert check.exit_code == 5 and check.host(DB)["failed"] == 0, check.err.getvalue()
    assert sh(DB, "test -e /etc/postgresql", check=False).returncode == 1
    t0 = time.monotonic()
    first = provision(inv)
    TIMES["fresh"] = time.monotonic() - t0
    assert first.exit_code == 0, first.err.getvalue()
    assert first.host(DB)["failed"] == 0 and first.host(DB)["changed"] >= 8
    handler = [e for e in first.steps(host=DB) if e["resource"] == "handler reload postgresql"]
    assert handler and handler[0]["status"] == "changed"
    t0 = time.monotonic()
    second = provision(inv)
    TIMES["converged"] = time.monotonic() - t0
    TIMES["converged_execs"] = second.host(DB)["remote_commands"]
    threads, errors = servers
    for t in threads:
        t.join()
    assert not errors, errors
    return {"inv": inv, "tmp": tmp, "first": first, "second": second}


def test_second_run_changes_nothing_passwords_included(provisioned):
    second = provisioned["second"]
    assert second.exit_code == 0
    assert second.host(DB)["changed"] == 0, second.steps(status="changed")
    assert second.host(DB)["failed"] == 0
    oks = {e["resource"]: e["reason"] for e in second.steps(host=DB, status="ok")}
    assert "succeeded" in oks["command postgresql role app"]
    assert "succeeded" in oks["command postgresql database reports"]
    print(f"\npostgresql on {DB}: fresh {TIMES['fresh']:.1f} s, converged {TIMES['converged']:.2f} s "
          f"({TIMES['converged_execs']} remote commands)")


def test_service_enabled_running_and_listening_only_where_intended(provisioned):
    h = th(DB)
    assert h.service("postgresql").is_enabled and h.service("postgresql").is_running
    assert h.service(f"postgresql@{MAJOR}-main").is_running
    out = sh(DB, "ss -Hltn 'sport = :5432'").stdout
    addrs = {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()}
    assert addrs and addrs <= {"127.0.0.1", "::1", ADDRESSES[DB]}, addrs
    assert ADDRESSES[DB] in addrs and "127.0.0.1" in addrs
    assert not addrs & {"0.0.0.0", "*", "::"}
    f = h.file(f"{ETC}/pg_hba.conf")
    assert f.user == "postgres" and f.mode == 0o640


def test_app_server_connects_over_tls_with_the_password(provisioned):
    r = client(APP, PASSWORDS["pg_app"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "app|t"                     # the user, over TLS
    r = client(APP, PASSWORDS["pg_report"], user="report", db="reports")
    assert r.returncode == 0 and r.stdout.strip() == "report|t", r.stderr


def test_refusals_other_server_wrong_password_other_database_no_tls(provisioned):
    r = client(OTHER, PASSWORDS["pg_app"])
    assert r.returncode != 0 and "no pg_hba.conf entry" in r.stderr, r.stderr
    assert ADDRESSES[OTHER] in r.stderr
    r = client(APP, "not-the-password")
    assert r.returncode != 0 and 'password authentication failed for user "app"' in r.stderr
    r = client(APP, PASSWORDS["pg_app"], db="reports")       # app is not a user of reports
    assert r.returncode != 0 and "no pg_hba.conf entry" in r.stderr, r.stderr
    r = client(APP, PASSWORDS["pg_app"], sslmode="disable")  # hostssl: plain TCP is refused
    assert r.returncode != 0 and "no pg_hba.conf entry" in r.stderr and "no encryption" in r.stderr


def test_database_connect_is_granted_to_its_users_only(provisioned):
    # from the server itself (localhost rules admit every user): privileges still say no
    r = client(DB, PASSWORDS["pg_app"], db="reports", host="127.0.0.1")
    assert r.returncode != 0 and "permission denied for database" in r.stderr, r.stderr
    r = client(DB, PASSWORDS["pg_report"], user="report", db="appdb", host="127.0.0.1")
    assert r.returncode == 0, r.stderr
    owner = sh(DB, "cd / && runuser -u postgres -- psql -XAtc \"SELECT pg_get_userbyid(datdba) "
                   "|| ' ' || pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'appdb'\"")
    assert owner.stdout.strip() == "app UTF8"


def test_changed_password_is_set_on_the_next_run_and_only_then(provisioned):
    inv = pg_inventory(provisioned["tmp"], secrets={"pg_app": "app-Pw-0003-rotated"})
    run = provision(inv)
    assert run.exit_code == 0, run.err.getvalue()
    changed = [e["resource"] for e in run.steps(host=DB, status="changed")]
    assert changed == ["command postgresql role app"], changed
    out = run.out.getvalue() + run.err.getvalue()
    assert "app-Pw-0003-rotated" not in out and "SCRAM-SHA-256$" not in out
    assert provision(inv).host(DB)["changed"] == 0
    assert client(APP, "app-Pw-0003-rotated").returncode == 0
    assert "password authentication failed" in client(APP, PASSWORDS["pg_app"]).stderr
    # back to the first password for the tests that follow
    assert provision(provisioned["inv"]).host(DB)["changed"] == 1


def test_password_changed_behind_our_back_is_repaired(provisioned):
    sh(DB, "cd / && echo \"ALTER ROLE report PASSWORD 'changed-by-hand';\" | "
           "runuser -u postgres -- psql -Xq")
    run = provision(provisioned["inv"])
    assert [e["resource"] for e in run.steps(host=DB, status="changed")] == \
        ["command postgresql role report"]
    assert client(APP, PASSWORDS["pg_report"], user="report").returncode == 0


def test_work_mem_reloads_while_shared_buffers_restarts(provisioned):
    started = "cd / && runuser -u postgres -- psql -XAtc 'SELECT pg_postmaster_start_time()'"
    before = sh(DB, started).stdout
    inv = pg_inventory(provisioned["tmp"], postgresql_work_mem="16MB")
    run = provision(inv)
    assert run.exit_code == 0, run.err.getvalue()
    assert sh(DB, started).stdout == before                  # no restart for work_mem
    show = "cd / && runuser -u postgres -- psql -XAtc 'SHOW work_mem' -c 'SHOW shared_buffers'"
    assert sh(DB, show).stdout.split() == ["16MB", "128MB"]
    inv = pg_inventory(provisioned["tmp"], postgresql_work_mem="16MB",
                       postgresql_shared_buffers="64MB")
    assert provision(inv).exit_code == 0
    assert sh(DB, started).stdout != before                  # restarted for shared_buffers
    assert sh(DB, show).stdout.split() == ["16MB", "64MB"]
    assert provision(inv).host(DB)["changed"] == 0
    assert provision(provisioned["inv"]).exit_code == 0      # back to the defaults


def test_invalid_setting_is_refused_before_it_replaces_the_drop_in(provisioned):
    inv = pg_inventory(provisioned["tmp"], postgresql_settings={"no_such_setting": 1})
    run = provision(inv)
    assert run.exit_code == 1
    failed = run.steps(host=DB, status="failed")
    assert failed and "validation failed" in failed[0]["reason"], failed
    assert 'unrecognized configuration parameter "no_such_setting"' in failed[0]["output"]
    assert "no_such_setting" not in sh(DB, f"cat {ETC}/conf.d/50-provisioner.conf").stdout
    assert provision(provisioned["inv"]).host(DB)["changed"] == 0


def test_hba_line_postgresql_rejects_is_rolled_back(provisioned):
    good = sh(DB, f"cat {ETC}/pg_hba.conf").stdout
    inv = pg_inventory(provisioned["tmp"], postgresql_shared_buffers="96MB",
                       postgresql_hba_extra=["host all all 10.0.0.300/32 scram-sha-256"])
    run = provision(inv)
    assert run.exit_code == 1
    failed = {e["resource"]: e for e in run.steps(host=DB, status="failed")}
    guard = failed["guard pg_hba.conf accepted by PostgreSQL"]
    assert "10.0.0.300" in guard["reason"] and "restored the previous" in guard["reason"]
    assert "handler reload postgresql" in failed                # it never reloaded the bad file
    assert sh(DB, f"cat {ETC}/pg_hba.conf").stdout == good
    assert client(APP, PASSWORDS["pg_app"]).returncode == 0   # still serving, same rules
    # the other change of that run still took effect (restart after the rollback)
    show = "cd / && runuser -u postgres -- psql -XAtc 'SHOW shared_buffers'"
    assert sh(DB, show).stdout.strip() == "96MB"
    back = provision(provisioned["inv"])                      # the drop-in back to 128MB
    assert back.exit_code == 0 and back.host(DB)["failed"] == 0
    assert provision(provisioned["inv"]).host(DB)["changed"] == 0

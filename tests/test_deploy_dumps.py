"""The pre-migration backups without a server: a `pg_dump -Fc`, or a pgBackRest restore point
when the env's pgbackrest role backs the database server up; taken only once the deploy lock
is held on every host; pruned with the releases they were taken before, never while a host
keeps that release; `db.restore --before` choosing how to restore, and saying when a backup
went. The flows (provisioner/deploy.py) run against a simulation of the server side. Live:
tests/test_deploy_live.py (migrations, db.restore on both paths)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from invoke import Exit

from derived_env import NO_BACKUP_EDITS, derived_text
from provisioner import backups
from provisioner import deploy as flows
from provisioner.cli.deploy import missing_backup
from provisioner.errors import InputError
from provisioner.inventory import load_inventory, load_inventory_file
from provisioner.releases import Artifact
from provisioner.remote import deploy as remote
import test_blue_green as blue_green
from test_canary import deploy_root, lb_root  # noqa: F401  (fixtures)
from test_inventory import load, root  # noqa: F401  (fixture)
from test_backups import FakeSystemd
from test_releases import APPS

MIGRATES = APPS + "    migrate: [node, migrate.js, up]\n    database: {host: db1, name: shop}\n"
OTHER_RUN = {"run_id": "f" * 32, "who": "alice", "from": "laptop", "pid": 4242,
             "started": "2026-06-01T10:00:00+00:00"}


class Servers:
    """The server side as the deploy flow sees it: web1 and web2 (their releases; a lock
    another run holds), db1 (its dumps). Records every request in order."""

    def __init__(self, held=(), releases=("r1",), dumps=(), backup_sets=1):
        self.held, self.log, self.requests = set(held), [], []
        self.releases = {h: list(releases) for h in ("web1", "web2")}
        self.dumps = set(dumps)
        self.backup_sets = backup_sets        # in the pgBackRest repository
        self.finishes = {}                    # host -> its last finish request

    def call(self, host, req, data=b"", timeout=None):
        op = req["op"]
        self.log.append((host, op))
        if op == "lock":
            if host in self.held:
                return {"ok": False, "acquired": False, "holder": OTHER_RUN}
            return {"ok": True, "current": self.releases[host][-1], "install": "npm ci",
                    "manifest": [{"id": r, "state": "live"} for r in self.releases[host]]}
        if op == "backup":
            self.dumps.add(req["release"])
            return {"ok": True, "path": f"/var/backups/before-{req['release']}.dump", "size": 9,
                    "at": "2026-06-01T10:00:00Z"}
        if op == "restore_point":
            self.requests.append(req)
            if not self.backup_sets:
                return {"ok": False, "no_backup": True, "error": "stanza db1 has no backup"}
            self.dumps.add(req["release"])
            return {"ok": True, "kind": "pgbackrest", "name": f"sample-{req['release']}",
                    "lsn": "0/7000090", "wal": "000000010000000000000007",
                    "at": "2026-06-01T10:00:00Z", "stanza": req["stanza"],
                    "base": "20260601-090000F",
                    "path": f"/var/backups/provisioner/sample/before-{req['release']}.json"}
        if op == "migrate":
            return {"ok": True, "output": "up 001.js"}
        if op == "switch":
            self.releases[host].append(req["release"])
            return {"ok": True, "previous": "r1", "seen": "200", "how": "reloaded"}
        if op == "finish":
            self.finishes[host] = req
            keep = self.releases[host][-2:]                  # keep: 2
            self.releases[host] = keep
            return {"ok": True, "current": keep[-1], "pruned": [],
                    "manifest": [{"id": r, "state": "live"} for r in keep]}
        if op == "prune_backups":
            gone = remote.dumps_to_prune(self.dumps, req["kept"])
            self.dumps -= set(gone)
            return {"ok": True, "pruned": gone}
        if op == "unlock":
            return {"ok": True}
        raise AssertionError(op)


def fleet_of(inv, servers: Servers, monkeypatch, limit=None) -> flows.Fleet:
    monkeypatch.setattr(flows, "release_id", lambda commit: "r2")
    hosts = [h for h in inv.hosts_in("app") if limit is None or h.name in limit]
    return blue_green.fleet_of(inv, servers, monkeypatch, hosts)


def events_of(fleet) -> list[dict]:
    return [json.loads(line) for line in fleet.json_out().splitlines()]


ARTIFACT = Artifact(b"tar", "0" * 64, "c" * 40, "main")


def test_a_deploy_refused_by_a_lock_takes_no_dump(deploy_root: Path, monkeypatch):
    servers = Servers(held={"web2"})
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 4
    assert not [x for x in servers.log if x[1] in ("backup", "migrate", "switch")]
    assert ("web1", "unlock") in servers.log, "the lock taken on web1 is given back"
    assert "deploy lock of shop held by alice@laptop" in fleet.output()


def test_the_dump_is_taken_only_once_every_host_is_locked(deploy_root: Path, monkeypatch):
    servers = Servers()
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    ops = [op for _, op in servers.log]
    assert ops.index("backup") > max(i for i, op in enumerate(ops[:3]) if op == "lock")
    assert ops[:2] == ["lock", "lock"], "the lock alone on both hosts, before anything else"
    assert ops.index("backup") < ops.index("migrate") < ops.index("switch")


def test_a_lock_taken_over_first_is_said_at_the_default_verbosity(deploy_root: Path,
                                                                  monkeypatch):
    """The takeover moved to the lock-only exec (it was the prepare step's news): it is a
    change, so it shows without -v, as before."""
    servers = Servers()
    answer = servers.call

    def call(host, req, data=b"", timeout=None):
        a = answer(host, req, data, timeout)
        if req["op"] == "lock" and not req.get("artifact"):
            a.update(took_over=OTHER_RUN, cleaned=["r9.building"])
        return a
    servers.call = call
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    lines = fleet.lines()
    assert lines.count("took over the lock of a dead run: alice@laptop") == 2
    assert "removed what a dead deploy left: r9.building" in lines


def test_an_app_without_migrations_locks_and_prepares_in_one_exec(deploy_root: Path, monkeypatch):
    servers = Servers()
    fleet = fleet_of(load(deploy_root, APPS), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert [op for _, op in servers.log].count("lock") == 2          # one per host
    assert "backup" not in [op for _, op in servers.log]


@pytest.mark.parametrize("dumps, kept, gone", [
    # the oldest release any host keeps is r3: the dumps before r1 and r2 go with them
    ({"r1", "r2", "r3", "r4"}, ["r3", "r4"], ["r1", "r2"]),
    # a host still keeps r2 (another keeps only r4): its dump stays
    ({"r1", "r2", "r4"}, ["r2", "r4"], ["r1"]),
    # r3's migration failed (the release was discarded, its dump is what db.restore is
    # for): it stays while releases of its time are kept
    ({"r3"}, ["r2", "r4"], []),
    ({"r1"}, [], []),                                   # nothing known: nothing goes
])
def test_dumps_go_with_the_releases_they_were_taken_before(dumps, kept, gone):
    assert remote.dumps_to_prune(dumps, kept) == gone


def test_never_the_dump_of_current_or_of_the_newest_good_release():
    # web1 keeps r5 (current) and r4 (failed); r3 is the newest good one on web2
    kept = ["r3", "r4", "r5"]
    assert remote.dumps_to_prune({"r1", "r3", "r4", "r5"}, kept) == ["r1"]


def test_a_finished_deploy_prunes_the_dumps_of_the_pruned_releases(deploy_root: Path,
                                                                   monkeypatch):
    servers = Servers(releases=("r0", "r1"), dumps={"r0", "r1"})
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert servers.releases["web1"] == ["r1", "r2"]                    # r0 pruned (keep 2)
    assert servers.dumps == {"r1", "r2"}
    assert servers.log[-1] == ("db1", "prune_backups")


def test_after_limit_the_dumps_stay(deploy_root: Path, monkeypatch):
    servers = Servers(releases=("r0", "r1"), dumps={"r0", "r1"})
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch, limit={"web1"})
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert "prune_backups" not in [op for _, op in servers.log]
    assert servers.dumps == {"r0", "r1", "r2"}
    skipped = [e for e in events_of(fleet) if e.get("resource") == "prune backups"]
    assert skipped and "releases on web2 are not known to this run" in skipped[0]["reason"]


def test_op_prune_backups_removes_the_dumps_and_records_them(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(remote, "BACKUPS", str(tmp_path))
    (tmp_path / "shop").mkdir()
    for r in ("r1", "r2", "r3"):
        (tmp_path / "shop" / f"before-{r}.dump").write_bytes(b"PGDMP")
    app = remote.App({"app": "shop"})
    a = remote.op_prune_backups(app, {"kept": ["r3", "r4"]}, None)
    assert a == {"ok": True, "pruned": ["r1", "r2"]}
    listed = remote.op_backups(app, {}, None)
    assert list(listed["backups"]) == ["r3"]
    assert sorted(listed["pruned"]) == ["r1", "r2"] and listed["pruned"]["r1"]["size"] == 5
    assert remote.op_prune_backups(app, {"kept": ["r3"]}, None) == {"ok": True, "pruned": []}


# --- pgBackRest instead of pg_dump, when the env's backups cover the database server --------

def local_fleet(servers: Servers, monkeypatch, inv=None) -> flows.Fleet:
    """The local env's sample app (db1 a stanza of vault's pgBackRest), or `inv`."""
    return fleet_of(inv or load_inventory("local"), servers, monkeypatch)


def ops_of(servers: Servers) -> list[str]:
    return [op for _, op in servers.log]


def test_with_the_envs_pgbackrest_a_restore_point_replaces_the_dump(monkeypatch):
    servers = Servers()
    fleet = local_fleet(servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    ops = ops_of(servers)
    assert "backup" not in ops and ("db1", "restore_point") in servers.log
    assert max(i for i, op in enumerate(ops[:2]) if op == "lock") < ops.index("restore_point") \
        < ops.index("migrate") < ops.index("switch")
    [req] = servers.requests
    assert (req["stanza"], req["database"], req["port"], req["release"]) == \
        ("db1", "app", 5432, "r2")
    assert req["archive_timeout"] == flows.ARCHIVE_WAIT
    assert ("restore point sample-r2 at 0/7000090 (WAL 000000010000000000000007 archived to "
            "vault, stanza db1): `invoke db.restore --before r2` rewinds the whole PostgreSQL "
            "cluster on db1 to it") in fleet.lines()


def test_an_env_without_the_pgbackrest_role_dumps_as_before(tmp_path: Path, monkeypatch):
    """localnb (the live tests' env without backups): the same servers, a pg_dump."""
    (tmp_path / "localnb.yml").write_text(derived_text(NO_BACKUP_EDITS))
    inv = load_inventory_file(tmp_path / "localnb.yml")
    assert backups.stanzas(inv) == [] and backups.stanzas(load_inventory("local"))
    servers = Servers()
    assert flows.deploy(local_fleet(servers, monkeypatch, inv), ARTIFACT, 1) == 0
    assert ("db1", "backup") in servers.log and "restore_point" not in ops_of(servers)


def on_vault(fleet, monkeypatch, host: FakeSystemd):
    """The fleet's connection to vault is `host` (its clock drives run_unit's)."""
    conn_of = flows.Fleet.conn
    monkeypatch.setattr(flows.Fleet, "conn", lambda self, h: host if h.name == "vault"
                        else conn_of(self, h))
    run_unit = backups.run_unit
    monkeypatch.setattr(flows.backups, "run_unit", lambda *a, **kw: run_unit(
        *a, **{**kw, "clock": host.clock}))


def test_without_a_backup_set_a_full_backup_is_taken_first(monkeypatch):
    """Longer than env local's 900 s command timeout: started, then polled (30 s an exec),
    saying how long it has been running; the restore point follows."""
    servers = Servers(backup_sets=0)
    vault = FakeSystemd(takes=1000)
    fleet = local_fleet(servers, monkeypatch)
    on_vault(fleet, monkeypatch, vault)
    answer = servers.call

    def call(host, req, data=b"", timeout=None):
        if req["op"] == "restore_point" and vault.started_at is not None:
            servers.backup_sets = 1                  # the unit ran: the repository has the set
        return answer(host, req, data, timeout)
    servers.call = call
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert "systemctl start --no-block -- pgbackrest-db1-full.service" in vault.ran[0][-1]
    assert len(vault.ran) == 34 and max(vault.timeouts) < 900
    assert ops_of(servers).count("restore_point") == 2
    assert "stanza db1 had no backup yet: took a full one on vault first; restore point " \
           "sample-r2" in fleet.lines()
    progress = [e for e in events_of(fleet) if e["event"] == "progress"]
    assert len(progress) == 33 and progress[0]["host"] == "vault"
    assert progress[-1]["message"] == ("pgbackrest-db1-full on vault still running after 16 min "
                                       "(waiting up to 60 min)")
    assert "vault | sample | first full backup | pgbackrest-db1-full on vault still running " \
           "after 30 s (waiting up to 60 min)" in fleet.lines()


def test_a_failed_first_backup_stops_the_deploy_before_it_migrates_with_its_journal(monkeypatch):
    servers = Servers(backup_sets=0)
    fleet = local_fleet(servers, monkeypatch)
    on_vault(fleet, monkeypatch, FakeSystemd(takes=61, result="exit-code"))
    assert flows.deploy(fleet, ARTIFACT, 1) == 1
    assert not {"migrate", "switch"} & set(ops_of(servers))
    assert ("stanza db1 has no backup yet in the repository, and its full backup "
            "(pgbackrest-db1-full on vault) failed after 62 s, so this deploy stops before "
            "migrating: pgbackrest-db1-full.service failed (failed), result exit-code, exit "
            "status 1") in fleet.output()
    assert "backup job pgbackrest-db1-full FAILED: exit 1 after 61.0s" in fleet.output()
    assert "run `invoke backup --env local --limit db1 --kind full` and deploy again" \
        in fleet.output()


def first_backup_limit_env(tmp_path: Path, value) -> object:
    """env local with pgbackrest_first_backup_timeout set env-wide (as its defaults say)."""
    text = derived_text((("  pgbackrest_repo_host: vault\n", "  pgbackrest_repo_host: vault\n"
                          f"  pgbackrest_first_backup_timeout: {value}\n"),))
    (tmp_path / "local.yml").write_text(text)
    return load_inventory_file(tmp_path / "local.yml")


def test_a_first_backup_past_its_limit_goes_on_and_the_deploy_stops_before_migrating(
        monkeypatch, tmp_path):
    servers = Servers(backup_sets=0)
    fleet = local_fleet(servers, monkeypatch, first_backup_limit_env(tmp_path, 120))
    vault = FakeSystemd(takes=5000)
    on_vault(fleet, monkeypatch, vault)
    assert fleet.first_backup_limit == 120
    assert flows.deploy(fleet, ARTIFACT, 1) == 1
    assert not {"migrate", "switch"} & set(ops_of(servers))
    assert ("its full backup (pgbackrest-db1-full on vault) still runs after 2 min "
            "(pgbackrest_first_backup_timeout: 120 s): it goes on there, and this deploy stops "
            "before migrating") in fleet.output()
    assert "raise pgbackrest_first_backup_timeout" in fleet.output()
    assert len(vault.ran) == 4 and not [a for a in vault.ran if "stop" in a[-1]]


def test_a_first_backup_that_skipped_stops_the_deploy_saying_another_backup_runs(monkeypatch):
    """The unit ran, but skipped: a timer's backup of the stanza still runs."""
    servers = Servers(backup_sets=0)
    fleet = local_fleet(servers, monkeypatch)
    on_vault(fleet, monkeypatch, FakeSystemd(takes=1))
    assert flows.deploy(fleet, ARTIFACT, 1) == 1
    assert not {"migrate", "switch"} & set(ops_of(servers))
    assert "even after the full backup unit ran on vault (it skips while another backup of " \
           "the stanza runs): wait for `invoke backup.status --env local --limit db1`" \
           in fleet.output()


@pytest.mark.parametrize("value, problem, fix", [
    ("30", "30 is not in 60..604800", "write a whole number from 60 to 604800"),
    ("604801", "604801 is not in 60..604800", "write a whole number from 60 to 604800"),
    # the type, as for every var, when the inventory loads
    ("1h", "must be an integer", "write a number without quotes"),
])
def test_a_bad_first_backup_limit_is_bad_input_naming_file_and_key(value, problem, fix,
                                                                   monkeypatch, tmp_path):
    """Checked when the deploy starts, before any server (exit 2), where the var was set."""
    servers = Servers()
    with pytest.raises(InputError) as e:
        local_fleet(servers, monkeypatch, first_backup_limit_env(tmp_path, value))
    text = str(e.value)
    line = next(i for i, t in enumerate((tmp_path / "local.yml").read_text().splitlines(), 1)
                if "pgbackrest_first_backup_timeout" in t)
    assert text.startswith(f"{tmp_path / 'local.yml'}:{line}: vars.pgbackrest_first_backup_timeout:")
    assert problem in text and f"fix: {fix}" in text
    assert not servers.log


def test_a_restore_points_name_fits_postgresqls_63_characters():
    release = "20260601T100427Z-3f2a9c1b7d4e"
    assert remote.point_name(remote.App({"app": "shop"}), release) == f"shop-{release}"
    long = remote.point_name(remote.App({"app": "a" * 64}), release)
    assert len(long) == remote.POINT_NAME_MAX and long.endswith("a-" + release)


INFO_ONE_SET = json.dumps([{"name": "db1", "backup": [{"label": "20260601-090000F"}]}])


@pytest.fixture
def db_host(tmp_path: Path, monkeypatch):
    """The database host's side in tmp_path: what runs as postgres is answered by `answers`
    (argv[0] -> output, or a Fail) and recorded in `ran`."""
    import pwd
    from types import SimpleNamespace
    monkeypatch.setattr(remote, "BACKUPS", str(tmp_path))
    monkeypatch.setattr(remote.pwd, "getpwnam", lambda name: SimpleNamespace(
        pw_uid=os.getuid(), pw_gid=os.getgid(), pw_dir=str(tmp_path)) if name == "postgres"
        else pwd.getpwnam(name))
    host = SimpleNamespace(ran=[], answers={
        "pgbackrest": INFO_ONE_SET, "psql": "0/7000090|000000010000000000000007|1780308000.5\n"})

    def as_user(self, argv, cwd=None, env=None, timeout=900, user=None, home=None):
        host.ran.append((user, argv, timeout))
        out = host.answers["check" if argv[-1] == "check" else argv[0]]
        if isinstance(out, Exception):
            raise out
        return out
    monkeypatch.setattr(remote.App, "as_user", as_user)
    return host


REQ = {"op": "restore_point", "app": "shop", "release": "r2", "database": "app",
       "stanza": "db1", "port": 5432, "archive_timeout": 60}


def test_op_restore_point_makes_the_point_waits_for_its_wal_and_records_it(db_host, tmp_path):
    db_host.answers["check"] = ""
    app = remote.App(REQ)
    a = remote.op_restore_point(app, REQ, None)
    assert a["ok"] and (a["name"], a["lsn"], a["wal"], a["at"], a["base"]) == (
        "shop-r2", "0/7000090", "000000010000000000000007", "2026-06-01T10:00:00Z",
        "20260601-090000F")
    users = {u for u, _, _ in db_host.ran}
    assert users == {"postgres"}
    (_, info, _), (_, psql, _), (_, check, bound) = db_host.ran
    assert info[:2] == ["pgbackrest", "--stanza=db1"] and info[-1] == "info"
    assert psql[-1].startswith("WITH p AS (SELECT pg_create_restore_point('shop-r2') AS lsn)")
    assert psql[psql.index("-p") + 1] == "5432" and psql[psql.index("-d") + 1] == "app"
    assert "--archive-timeout=60" in check and check[-1] == "check" and bound > 60
    # one list with the dumps: db.restore and the pruning see both kinds
    (tmp_path / "shop" / "before-r1.dump").write_bytes(b"PGDMP")
    listed = remote.op_backups(app, {}, None)["backups"]
    assert listed["r1"]["kind"] == "dump"
    assert {k: listed["r2"][k] for k in ("kind", "stanza", "name", "lsn", "at")} == {
        "kind": "pgbackrest", "stanza": "db1", "name": "shop-r2", "lsn": "0/7000090",
        "at": "2026-06-01T10:00:00Z"}
    assert remote.op_prune_backups(app, {"kept": ["r3"]}, None) == {"ok": True,
                                                                  "pruned": ["r1", "r2"]}
    assert list(tmp_path.joinpath("shop").iterdir()) == [tmp_path / "shop" / "pruned.json"]
    pruned = remote.op_backups(app, {}, None)["pruned"]
    assert (pruned["r2"]["kind"], pruned["r2"]["taken"]) == ("pgbackrest", "2026-06-01T10:00:00Z")
    assert pruned["r1"]["kind"] == "dump"


def test_op_restore_point_without_a_backup_set_makes_nothing(db_host, tmp_path):
    db_host.answers["pgbackrest"] = json.dumps([{"name": "db1", "backup": []}])
    a = remote.op_restore_point(remote.App(REQ), REQ, None)
    assert a["no_backup"] and not a["ok"] and "stanza db1 has no backup" in a["error"]
    assert [argv[0] for _, argv, _ in db_host.ran] == ["pgbackrest"]
    assert not list(tmp_path.joinpath("shop").glob("before-*"))


# db1 after 15 -> 17 and stanza-upgrade: the repository keeps 15's full (db id 1)
INFO_UPGRADED = [{"name": "db1",
                  "db": [{"id": 1, "repo-key": 1, "system-id": 7443182330010213476, "version": "15"},
                         {"id": 2, "repo-key": 1, "system-id": 7512345678901234567, "version": "17"}],
                  "backup": [{"label": "20260601-090000F", "database": {"id": 1, "repo-key": 1}}]}]


def test_op_restore_point_with_only_the_old_majors_sets_makes_nothing(db_host, tmp_path):
    """Nothing of 17 can be replayed from 15's full: as with no set at all, the deploy first
    takes a full backup (of 17)."""
    db_host.answers["pgbackrest"] = json.dumps(INFO_UPGRADED)
    a = remote.op_restore_point(remote.App(REQ), REQ, None)
    assert a["no_backup"] and not a["ok"]
    assert a["error"] == ("stanza db1 has no backup of its current cluster (PostgreSQL 17) yet, "
                          "only of the one before it (a major upgrade) in the repository: a "
                          "restore point would have nothing to be replayed from")
    assert [argv[0] for _, argv, _ in db_host.ran] == ["pgbackrest"]
    # once 17 has a full, the point is made on it
    db_host.answers["pgbackrest"] = json.dumps([dict(INFO_UPGRADED[0], backup=[
        *INFO_UPGRADED[0]["backup"], {"label": "20260601-100000F", "database": {"id": 2}}])])
    db_host.answers["check"] = ""
    assert remote.op_restore_point(remote.App(REQ), REQ, None)["base"] == "20260601-100000F"


def test_a_deploy_after_a_major_upgrade_takes_the_new_majors_full_backup_first(monkeypatch):
    servers = Servers(backup_sets=0)
    answer = servers.call

    def call(host, req, data=b"", timeout=None):
        a = answer(host, req, data, timeout)
        if a.get("no_backup"):
            a["missing"] = ("no backup of its current cluster (PostgreSQL 17) yet, only of the "
                            "one before it (a major upgrade)")
        return a
    servers.call = call
    monkeypatch.setattr(flows.backups, "run_unit", lambda conn, unit, limit, progress: setattr(
        servers, "backup_sets", 1) or backups.UnitRun("ok", 3.0))
    fleet = local_fleet(servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert "stanza db1 had no backup of its current cluster (PostgreSQL 17) yet, only of the one " \
           "before it (a major upgrade): took a full one on vault first; restore point" \
           in fleet.lines()


def test_op_restore_point_whose_wal_is_not_archived_fails_and_records_nothing(db_host, tmp_path):
    db_host.answers["check"] = remote.Fail("pgbackrest --stanza=db1 --log-level-console=off "
                                           "exited 82:\nERROR: [082]: WAL segment "
                                           "000000010000000000000007 was not archived")
    with pytest.raises(remote.Fail) as e:
        remote.op_restore_point(remote.App(REQ), REQ, None)
    assert "restore point shop-r2 made, but the WAL holding it did not reach the repository" \
           in str(e.value) and "was not archived" in str(e.value)
    assert not list(tmp_path.joinpath("shop").glob("before-*"))


def test_db_restore_says_when_the_dump_went_with_its_release(deploy_root: Path):
    app = load(deploy_root, MIGRATES).app(None)
    text = missing_backup("db1", app, "r1", {"r3": {}}, {"r1": {"at": "2026-06-01T10:00:00Z"}})
    assert "backup taken before release r1 was pruned at 2026-06-01T10:00:00Z" in text
    assert "together with the release" in text and "keeps 5 releases" in text
    assert "backups kept: r3" in text and "raise `keep`" in text
    text = missing_backup("db1", app, "r9", {}, {})
    assert "no backup taken before release r9" in text and "backups kept: none" in text


def test_db_restore_says_when_a_restore_points_record_went_and_how_to_reach_it():
    app = load_inventory("local").app(None)
    text = missing_backup("db1", app, "r1", {"r3": {}}, {"r1": {
        "at": "2026-06-02T10:00:00Z", "kind": "pgbackrest", "taken": "2026-06-01T09:59:58Z"}})
    assert "record of the restore point made before release r1 (at 2026-06-01T09:59:58Z) was " \
           "pruned at 2026-06-02T10:00:00Z, together with the release" in text
    assert "`invoke restore --at '2026-06-01T09:59:58Z'` rewinds the whole cluster" in text


@pytest.fixture
def restore_cli(monkeypatch):
    """`invoke db.restore` of the local env against a database host answering `listed`; the
    point-in-time restore (cli/backup.py restore_to) recorded instead of run."""
    from types import SimpleNamespace

    from provisioner import connection, releases
    from provisioner.cli import backup as backup_cli
    from provisioner.cli import deploy as cli
    got = SimpleNamespace(calls=[], rewound=[], inv=load_inventory("local"), listed={})
    monkeypatch.setattr(cli, "load", lambda env, interactive: (got.inv, []))

    class Conn:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    monkeypatch.setattr(connection, "Connection", Conn)

    def call(conn, req, data=b"", timeout=None):
        got.calls.append(req["op"])
        return {"ok": True, "backups": got.listed, "pruned": {}} if req["op"] == "backups" \
            else {"ok": True}
    monkeypatch.setattr(releases, "call", call)
    monkeypatch.setattr(backup_cli, "restore_to", lambda inv, stanza, pick, confirm:
                        got.rewound.append((stanza, pick, confirm)))
    got.run = lambda **kw: cli.restore.body(None, before="r2", env="local", **kw)
    return got


POINT = {"kind": "pgbackrest", "stanza": "db1", "name": "sample-r2", "lsn": "0/7000090",
         "at": "2026-06-01T10:00:00Z", "path": "/var/backups/provisioner/sample/before-r2.json"}


def test_db_restore_of_a_restore_point_rewinds_the_cluster_through_invoke_restore(restore_cli,
                                                                                   capsys):
    restore_cli.listed = {"r2": POINT}
    restore_cli.run(yes=True)
    assert restore_cli.calls == ["backups"], "no pg_restore"
    [(stanza, pick, confirm)] = restore_cli.rewound
    assert stanza == backups.Stanza("db1", "vault") and confirm("any question") is True
    info = [{"name": "db1", "backup": [{"label": "F1", "lsn": {"stop": "0/6000100"}},
                                       {"label": "F2", "lsn": {"stop": "0/8000000"}}]}]
    to = pick(info)
    assert (to.type, to.value, to.set) == ("name", "sample-r2", "F1")
    assert "rewound the PostgreSQL cluster on db1 to restore point sample-r2, made before " \
           "release r2 migrated" in capsys.readouterr().out


def test_db_restore_of_a_dump_restores_the_dump_even_where_pgbackrest_runs(restore_cli, capsys):
    restore_cli.listed = {"r2": {"kind": "dump", "path": "/var/backups/provisioner/sample/"
                                 "before-r2.dump", "at": "2026-06-01T10:00:00Z", "size": 9}}
    restore_cli.run(yes=True)
    assert restore_cli.calls == ["backups", "restore"] and not restore_cli.rewound
    assert "restored database app on db1 from /var/backups/provisioner/sample/before-r2.dump " \
           "(taken 2026-06-01T10:00:00Z, before release r2 migrated)" in capsys.readouterr().out


def test_db_restore_of_a_restore_point_in_an_env_without_pgbackrest_says_which_env(
        restore_cli, tmp_path, capsys):
    (tmp_path / "localnb.yml").write_text(derived_text(NO_BACKUP_EDITS))
    restore_cli.inv = load_inventory_file(tmp_path / "localnb.yml")
    restore_cli.listed = {"r2": POINT}
    with pytest.raises(Exit) as e:
        restore_cli.run(yes=True)
    assert e.value.code == 2 and not restore_cli.rewound
    err = capsys.readouterr().err
    assert "restore point sample-r2 of pgBackRest stanza db1, and env localnb gives db1 no " \
           "pgbackrest role" in err and "with the env whose pgbackrest role backs db1 up" in err


def test_db_restore_releases_and_unlock_print_what_servers_said_with_secrets_masked(
        monkeypatch, capsys):
    """pg_restore's, npm's or pm2's error text goes to the terminal through say()."""
    import sys

    from provisioner import secret
    from provisioner.cli.deploy import say
    monkeypatch.setattr(secret, "REDACTOR", secret.Redactor())
    secret.REDACTOR.register("pg-app-password-7f3a")
    say("db1: restore failed: FATAL: password pg-app-password-7f3a rejected", file=sys.stderr)
    said = capsys.readouterr().err
    assert said == f"db1: restore failed: FATAL: password {secret.MASK} rejected\n"


# --- `invoke releases`: each release's pre-migration backup, from its manifest ----------------

DUMP = {"kind": "dump", "host": "db1", "path": "/var/backups/before-r2.dump", "size": 9,
        "at": "2026-06-01T10:00:00Z"}


def failing(servers: Servers, op: str, answer: dict) -> Servers:
    """`servers`, whose `op` answers `answer` instead."""
    real = servers.call
    servers.call = lambda host, req, data=b"", timeout=None: (
        dict(answer) if req["op"] == op else real(host, req, data, timeout))
    return servers


def test_a_deploy_records_its_dump_in_every_hosts_manifest(deploy_root: Path, monkeypatch):
    servers = Servers()
    assert flows.deploy(fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch),
                        ARTIFACT, 1) == 0
    assert {h: req["backups"] for h, req in servers.finishes.items()} == {
        "web1": {"r2": DUMP}, "web2": {"r2": DUMP}}


def test_a_deploy_records_its_restore_point_not_the_helpers_bookkeeping(monkeypatch):
    servers = Servers()
    assert flows.deploy(local_fleet(servers, monkeypatch), ARTIFACT, 1) == 0
    assert servers.finishes["web1"]["backups"] == {"r2": {
        "kind": "pgbackrest", "host": "db1", "stanza": "db1", "name": "sample-r2",
        "lsn": "0/7000090", "at": "2026-06-01T10:00:00Z",
        "path": "/var/backups/provisioner/sample/before-r2.json"}}


def test_a_release_that_failed_its_gate_keeps_its_backup_on_record(deploy_root: Path,
                                                                     monkeypatch):
    """Its migration ran: undoing it is what db.restore --before is for."""
    servers = failing(Servers(), "switch", {"ok": False, "previous": "r1", "seen": "500",
                                            "reverted": "r1", "revert_seen": "200"})
    assert flows.deploy(fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch),
                        ARTIFACT, 1) == 1
    assert servers.finishes["web1"]["states"] == {"r2": "failed"}
    assert servers.finishes["web1"]["backups"] == {"r2": DUMP}


@pytest.mark.parametrize("app, migrate", [
    (APPS, None), (MIGRATES, {"ok": False, "error": "exit 1"})],
    ids=["no migration", "failed migration: the release is discarded"])
def test_no_backup_is_recorded_without_a_release_that_migrated(deploy_root: Path, monkeypatch,
                                                               app, migrate):
    servers = failing(Servers(), "migrate", migrate) if migrate else Servers()
    flows.deploy(fleet_of(load(deploy_root, app), servers, monkeypatch), ARTIFACT, 1)
    assert servers.finishes and all(req["backups"] == {} for req in servers.finishes.values())


def test_finish_writes_the_backup_into_the_releases_entry_and_old_entries_stay(tmp_path: Path):
    from test_deploy_switch import RUN, app_in
    app = app_in(tmp_path, current="r2")
    old = {"id": "r1", "commit": "c" * 40, "state": "live", "at": "2026-05-01T10:00:00Z",
           "by": "alice@laptop"}                              # written before backups were
    app.save([old, dict(old, id="r2", state="prepared")])
    a = remote.op_finish(app, {"run_id": RUN, "states": {"r2": "live"}, "keep": 5, "audit": {},
                               "audit_log": str(tmp_path / "audit.log"),
                               "backups": {"r2": DUMP}}, None)
    assert a["ok"]
    r1, r2 = app.manifest()
    assert r2["backup"] == DUMP and r2["state"] == "live"
    assert r1 == dict(old, state="retired"), "r1 as it was, no backup key added"


def test_the_record_names_the_dump_db_restore_restores(db_host, tmp_path: Path):
    """op backup's answer, kept by the manifest, names the file (and size) that op backups
    lists for db.restore."""
    app = remote.App({"app": "shop"})
    db_host.answers["pg_dump"] = ""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "before-r2.dump.tmp").write_bytes(b"PGDMP-of-r2")   # as pg_dump -f
    record = flows.backup_record(remote.op_backup(app, {"release": "r2", "database": "app"},
                                                  None), "db1")
    listed = remote.op_backups(app, {}, None)["backups"]["r2"]
    assert (record["kind"], record["host"], record["path"], record["size"]) == (
        "dump", "db1", listed["path"], 11)
    assert record["at"].startswith("20") and record["at"].endswith("Z")


@pytest.fixture
def releases_cli(monkeypatch):
    """`invoke releases` of the local env, each host answering with a manifest: r1 from before
    backups were recorded, r2 migrated with a dump, r3 with a restore point."""
    from provisioner.cli import deploy as cli
    point = {"kind": "pgbackrest", "host": "db1", "stanza": "db1", "name": "sample-r3",
             "lsn": "0/7000090", "at": "2026-06-03T10:00:00Z",
             "path": "/var/backups/provisioner/sample/before-r3.json"}
    entry = {"commit": "c" * 40, "state": "retired", "at": "2026-06-01T10:00:00Z",
             "by": "alice@laptop"}
    manifest = [dict(entry, id="r1"), dict(entry, id="r2", backup=dict(DUMP, size=3 << 20)),
                dict(entry, id="r3", state="live", backup=point)]
    answer = {"ok": True, "current": "r3", "lock": None, "manifest": manifest}
    monkeypatch.setattr(cli, "_ask_hosts", lambda env, app, limit, op: (
        load_inventory("local").app(None), {"web1": answer}))
    return lambda **kw: cli.releases.body(None, env="local", **kw)


def test_releases_shows_each_releases_backup_and_where_it_is(releases_cli, capsys):
    releases_cli()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "web1: sample"
    head, r3, r2, r1 = out[1:]
    assert head.split()[-4:] == ["BACKUP", "BEFORE", "ITS", "MIGRATION"]
    assert r3.split()[:3] == ["*", "r3", "live"] and r3.endswith(
        "alice@laptop  restore point sample-r3 on db1 (pgBackRest stanza db1)")
    assert r2.endswith("alice@laptop  pg_dump db1:/var/backups/before-r2.dump (3.0 MiB)")
    assert r1.split()[:2] == ["r1", "retired"] and r1.endswith("alice@laptop  -")
    assert len({line.index("alice") for line in (r1, r2, r3)}) == 1, "one column"


def test_releases_json_gives_every_release_a_backup_field(releases_cli, capsys):
    releases_cli(json=True)
    doc = json.loads(capsys.readouterr().out)
    backups_of = {e["id"]: e["backup"] for e in doc["hosts"]["web1"]["releases"]}
    assert backups_of["r1"] is None, "an entry from before the record: null, not missing"
    assert backups_of["r2"]["path"] == "/var/backups/before-r2.dump"
    assert backups_of["r3"]["name"] == "sample-r3" and backups_of["r3"]["host"] == "db1"

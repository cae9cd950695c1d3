"""bench/backup.py without servers: its arguments, what it reads from `pgbackrest info
--output=json` (a sample of the shape pgBackRest 2.55 prints: db1 after the bench's full and
incremental, besides an earlier full and incremental, and another stanza), the disk check,
the archiver's progress, the report, and one whole run against stand-in servers (the order of
its steps, benchdb dropped on a failure too, the app database compared)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import backup  # noqa: E402

INFO = json.loads((Path(__file__).parent / "fixtures" / "backup" / "pgbackrest-info-bench.json").read_text())
FULL, INCR = "20261201-101532F", "20261201-101532F_20261201-101702I"


def without(info: list, *labels: str) -> list:
    """The same answer as before those backups were made."""
    out = copy.deepcopy(info)
    for s in out:
        s["backup"] = [b for b in s["backup"] if b["label"] not in labels]
    return out


def test_arguments(capsys):
    a = backup.parse_args([])
    assert (a.scale, a.updates) == (68, 5000)
    assert vars(backup.parse_args(["--scale", "1", "--updates", "100000"])) == {"scale": 1, "updates": 100000}
    for bad in (["--scale", "0"], ["--scale", "641"], ["--updates", "0"], ["--updates", "100001"],
                ["--scale", "x"], ["--db", "app"]):
        with pytest.raises(SystemExit) as e:
            backup.parse_args(bad)
        assert e.value.code == 2
    assert "--scale 1..640" in capsys.readouterr().err


def test_the_backups_of_a_stanza_from_pgbackrest_info():
    got = backup.backups(INFO, "db1")
    assert list(got) == ["20261201-080012F", "20261201-080012F_20261201-093001I", FULL, INCR]
    assert got[FULL] == {"label": FULL, "type": "full", "seconds": 38, "db_bytes": 1101512704,
                         "read_bytes": 1101512704, "added_bytes": 41943040, "set_bytes": 41943040}
    assert got[INCR] == {"label": INCR, "type": "incr", "seconds": 31, "db_bytes": 1102020608,
                         "read_bytes": 913399808, "added_bytes": 35651584, "set_bytes": 77594624}
    assert list(backup.backups(INFO, "db2")) == ["20261201-090000F"]
    assert backup.backups(INFO, "db3") == {} and backup.backups([], "db1") == {}


def test_block_incremental_leaves_out_the_set_size():
    info = copy.deepcopy(INFO)
    repo = info[0]["backup"][3]["info"]["repository"]
    del repo["size"]
    repo.update({"delta-map": 2352, "size-map": 36952})
    assert backup.backups(info, "db1")[INCR]["set_bytes"] is None
    assert backup.backups(info, "db1")[INCR]["added_bytes"] == 35651584


def test_the_new_backup_is_the_one_label_that_was_not_there_before():
    before, after = backup.backups(without(INFO, FULL, INCR), "db1"), backup.backups(without(INFO, INCR), "db1")
    assert backup.new_backup(before, after, "full")["label"] == FULL
    assert backup.new_backup(after, backup.backups(INFO, "db1"), "incr")["label"] == INCR


def test_no_new_backup_or_two_stop_the_bench_saying_why():
    now = backup.backups(INFO, "db1")
    with pytest.raises(SystemExit, match="expected one new full backup of db1 in the repository, "
                                         "found 0 \\(new labels: none\\)"):
        backup.new_backup(now, now, "full")          # the job was skipped: its lock was held
    before = backup.backups(without(INFO, FULL, INCR), "db1")
    with pytest.raises(SystemExit, match=f"found 0 \\(new labels: {FULL}, {INCR}\\)"):
        backup.new_backup(before, now, "diff")
    twice = copy.deepcopy(INFO)
    extra = copy.deepcopy(twice[0]["backup"][3])
    extra["label"] = "20261201-101532F_20261201-103000I"      # a scheduled incremental as well
    twice[0]["backup"].append(extra)
    with pytest.raises(SystemExit, match="found 2"):
        backup.new_backup(backup.backups(without(INFO, INCR), "db1"), backup.backups(twice, "db1"), "incr")


def test_the_repository_total_comes_from_the_role_s_own_summary():
    # reused, not rewritten: provisioner.backups' reading of `pgbackrest info`
    assert backup.pgbackrest_summary(INFO, "db1")["repo_size_bytes"] == (
        4063232 + 98304 + 41943040 + 35651584)


DF_ONE_FS = """Mounted on        Avail
/          5368709120
/          5368709120
"""


def test_paths_on_one_file_system_add_up():
    needs = backup.db_needs(68)
    assert [p for p, _, _ in needs] == ["/var/lib/postgresql", "/var/tmp"]
    total = sum(n for _, n, _ in needs)                  # 2 x 1088 MiB + 512 MiB + 272 MiB
    assert total == (2 * 68 * 16 + 512 + 68 * 4) * backup.MIB
    assert backup.disk_problem("db1", DF_ONE_FS, needs) is None
    short = DF_ONE_FS.replace("5368709120", str(total - 1))
    problem = backup.disk_problem("db1", short, needs)
    assert problem == ("db1 has 2.9 GiB free on /, and the bench needs about 2.9 GiB there "
                       "(benchdb and its WAL until archived, with 512 MiB to spare: 2.6 GiB; "
                       "the pg_dump | gzip file, at most: 272.0 MiB): free some space or pass a "
                       "smaller --scale")


def test_each_file_system_needs_its_own_share():
    needs = backup.db_needs(68)
    df = "Mounted on Avail\n/var/lib/postgresql 3000000000\n/var/tmp with space 100000000\n"
    problem = backup.disk_problem("db1", df, needs)
    assert problem.startswith("db1 has 95.4 MiB free on /var/tmp with space, and the bench needs "
                              "about 272.0 MiB there")
    assert backup.disk_problem("db1", df.replace("100000000", "300000000"), needs) is None
    assert backup.disk_problem("vault", "Mounted on Avail\n/ 100\n", backup.repo_needs(68)).startswith(
        "vault has 100 B free on /, and the bench needs about 800.0 MiB there")
    assert "df gave 1 lines for 2 paths" in backup.disk_problem("db1", "Mounted on Avail\n/ 1\n", needs)


@pytest.mark.parametrize("last, archived", [
    ("000000010000000000000062", True), ("000000010000000000000063", True),
    ("000000010000000000000061", False), ("", False), ("00000002.history", False),
    ("000000010000000000000062.partial", False), ("000000020000000000000001", True)])
def test_the_archiver_has_reached_a_segment(last, archived):
    assert backup.archived(last, "000000010000000000000062") is archived


def test_the_restore_exec_s_own_time():
    assert backup.restore_seconds("db1: restoring to 2026-12-01 10:18:00.123456+00 ...\n"
                                  "db1: restored and promoted in 41.7s\n") == 41.7
    assert backup.restore_seconds("") is None


def test_the_report_has_a_row_per_step_with_ratios_to_pg_dump():
    b = backup.backups(INFO, "db1")
    r = {"scale": 68, "updates": 5000, "init_seconds": 95.04, "benchdb_bytes": 1073741824,
         "cluster_bytes": 1101512704, "dump": {"seconds": 20.0, "bytes": 20971520},
         "full": dict(b[FULL], task_seconds=40.0), "incr": dict(b[INCR], task_seconds=30.0),
         "restore": {"task_seconds": 50.0, "exec_seconds": 45.5, "at": "2026-12-01T10:18:00Z"},
         "repo_before": 4161536, "repo_after": 81756160, "wal_added": 157286400,
         "app": "2 tables, 7 rows: the same content before and after"}
    lines = backup.table(r)
    assert lines[0] == "benchdb: pgbench -i -s 68 in 95.0 s, 1.0 GiB (the whole cluster 1.0 GiB)"
    rows = {line[:38].strip(): line[38:].split() for line in lines[2:6]}
    assert rows["pg_dump | gzip (benchdb)"] == ["20.0", "s", "20.0", "MiB", "1.00x", "1.00x"]
    assert rows["full backup (invoke backup)"][:6] == ["40.0", "s", "40.0", "MiB", "2.00x", "2.00x"]
    assert "pgBackRest 38.0 s, read 1.0 GiB" in lines[3]
    assert rows["incr after 5000 row updates"][:6] == ["30.0", "s", "34.0", "MiB", "1.50x", "1.70x"]
    assert "read 871.1 MiB; to the full: 0.75x time, 0.85x size" in lines[4]
    assert rows["point-in-time restore (invoke restore)"][:5] == ["50.0", "s", "-", "2.50x", "-"]
    assert "the restore exec 45.5 s; to the full backup: 1.25x time" in lines[5]
    assert lines[6] == "repository: backups 78.0 MiB (were 4.0 MiB), WAL archive +150.0 MiB during the run (pgbench -i's WAL, mostly)"
    assert lines[7] == "app database: 2 tables, 7 rows: the same content before and after"


class FakeServers:
    """db1 and vault as the bench sees them through `sh`, `psql` and `invoke`: the repository
    gains the full, then the incremental; every command and statement is recorded."""

    def __init__(self, restored_balance="5000", app_after="2|7|0123abcd"):
        self.infos = [without(INFO, FULL, INCR), without(INFO, INCR), INFO]
        self.commands, self.statements, self.tasks = [], [], []
        self.restored, self.balance = False, "5000"
        self.restored_balance, self.app_after = restored_balance, app_after
        self.du = iter(["1000", "158287400"])

    def sh(self, host, command, check=True, timeout=120):
        assert timeout > 0
        self.commands.append((host, command))
        out = ""
        if "df -B1" in command:
            out = "Mounted on Avail\n/ 50000000000\n" + ("/ 50000000000\n" if host == "db1" else "")
        elif "--output=json info" in command:
            out = json.dumps(self.infos.pop(0))
        elif "stat -c %s" in command:
            out = "20971520\n"
        elif "du -sb" in command:
            out = f"{next(self.du)}\t/var/lib/pgbackrest/archive/db1\n"
        return type("R", (), {"stdout": out, "returncode": 0})()

    def psql(self, server, sql, db="postgres", check=True, timeout=120):
        assert server == "db1"
        self.statements.append((db, sql))
        if sql == backup.FINGERPRINT:
            return self.app_after if any("DROP DATABASE" in s for _, s in self.statements) else "2|7|0123abcd"
        if "sum(abalance)" in sql:
            return self.restored_balance if self.restored else self.balance
        answers = {"SHOW server_version_num": "170006", "WHERE datname = 'benchdb'": "", "pg_database_size('benchdb')": "1073741824",
                   "FROM pg_database": "1101512704", "pg_walfile_name": "00000001000000000000005B",
                   "last_archived_wal": "00000001000000000000005B"}
        return next((v for k, v in answers.items() if k in sql), "")

    def invoke(self, *args, check=True, timeout=600):
        assert check is False and timeout >= 600
        self.tasks.append(args)
        self.statements.append(("task", " ".join(args[:-2])))          # without --env local
        if args[0] == "restore":
            self.restored = True
        err = "db1: restored and promoted in 41.7s\n" if args[0] == "restore" else ""
        return type("P", (), {"returncode": 0, "stderr": err, "stdout": ""})()


@pytest.fixture
def servers(monkeypatch):
    def make(**kw):
        fake = FakeServers(**kw)
        for name in ("sh", "psql", "invoke"):
            monkeypatch.setattr(backup, name, getattr(fake, name))
        monkeypatch.setattr(backup, "db_now", lambda server: "2026-12-01T10:18:00.000000Z")
        monkeypatch.setattr(backup.time, "sleep", lambda s: None)
        return fake
    return make


def test_one_run_in_order_with_the_real_tasks_and_a_report(servers, capsys):
    fake = servers()
    backup.main([])
    assert fake.tasks == [
        ("backup", "--limit", "db1", "--kind", "full", "--env", "local"),
        ("backup", "--limit", "db1", "--kind", "incr", "--env", "local"),
        ("restore", "--limit", "db1", "--at", "2026-12-01T10:18:00.000000Z", "--yes", "--env", "local")]
    steps = [s for _, s in fake.statements]
    order = [steps.index(s) for s in (
        "CREATE DATABASE benchdb", "backup --limit db1 --kind full",
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 5000",
        "backup --limit db1 --kind incr",
        "UPDATE pgbench_accounts SET abalance = abalance + 1000000 WHERE aid = 1",   # after the target
        "restore --limit db1 --at 2026-12-01T10:18:00.000000Z --yes",
        "DROP DATABASE IF EXISTS benchdb WITH (FORCE)")]
    assert order == sorted(order)
    assert all(c.startswith("cd / && timeout -k 10 ") for _, c in fake.commands)
    dump = [c for _, c in fake.commands if "pg_dump" in c]
    assert dump == ["cd / && timeout -k 10 680 bash -o pipefail -c 'runuser -u postgres -- "
                    "/usr/lib/postgresql/17/bin/pg_dump -d benchdb | gzip > /var/tmp/benchdb.sql.gz'"]
    out = capsys.readouterr().out
    assert "full backup (invoke backup)" in out and "app database: 2 tables, 7 rows" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["full"]["label"] == FULL and report["incr"]["label"] == INCR
    assert report["restore"]["exec_seconds"] == 41.7 and report["wal_added"] == 158286400
    assert report["repo_before"] == 4161536 and report["repo_after"] == 81756160


def test_too_little_disk_stops_before_anything_is_made(servers, monkeypatch):
    fake = servers()
    monkeypatch.setattr(backup, "db_needs", lambda scale: [("/", 10 ** 12, "benchdb"), ("/", 1, "dump")])
    with pytest.raises(SystemExit, match="db1 has 46.6 GiB free on /, and the bench needs about 931.3 GiB"):
        backup.main([])
    assert fake.statements == [] and fake.tasks == []


def test_benchdb_is_dropped_when_the_restore_is_wrong(servers, capsys):
    fake = servers(restored_balance="1005000")
    with pytest.raises(SystemExit, match="did not bring benchdb back to that time: the balances add "
                                         "up to 1005000, 5000 then"):
        backup.main([])
    assert ("postgres", "DROP DATABASE IF EXISTS benchdb WITH (FORCE)") in fake.statements
    assert "rm -f /var/tmp/benchdb.sql.gz" in fake.commands[-1][1]


def test_a_changed_app_database_fails_the_run_and_says_so(servers, capsys):
    servers(app_after="2|8|99999999")
    with pytest.raises(SystemExit, match="the app database is not what it was before the bench"):
        backup.main([])
    assert "2|7|0123abcd then, 2|8|99999999 now" in capsys.readouterr().err

"""Backups without a server: the job wrapper (lock, status file, metrics), parsing `pgbackrest info
--output=json`, the status table and its staleness, `--at` and the restore script, and the CLI's
bad input (exit 2 before any server)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import invoke
from provisioner import backups
from provisioner.errors import InputError
from test_role_pgbackrest import make_inventory

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

JOB = Path(__file__).resolve().parents[1] / "roles" / "pgbackrest" / "backupjob.py"
INFO = json.loads((Path(__file__).parent / "fixtures" / "backup" / "pgbackrest-info.json").read_text())
tool = backups.job_tool()


# --- parsing pgbackrest info --------------------------------------------------------------------

def test_the_summary_of_a_stanza():
    s = backups.pgbackrest_summary(INFO, "db1")
    assert s == {"status": "ok", "backups": 2, "repo_size_bytes": 4194304 + 262144,
                 "last_label": "20261201-180000F_20261201-190000I", "last_type": "incr",
                 "last_stop": {"full": 1764612012, "incr": 1764615605},
                 "last_added_bytes": 262144, "first_stop": 1764612012,
                 "wal_min": "000000010000000000000003", "wal_max": "00000001000000000000000A"}


def test_a_stanza_without_backups_and_an_unknown_one():
    assert backups.pgbackrest_summary(INFO, "db2") == {
        "status": "missing stanza path", "backups": 0, "repo_size_bytes": 0}
    assert backups.pgbackrest_summary(INFO, "db9") == {}
    assert backups.pgbackrest_summary([], "db1") == {}


# --- the job wrapper ----------------------------------------------------------------------------

@pytest.fixture
def job_dirs(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("status", "textfile", "lock")}
    monkeypatch.setitem(tool, "STATUS_DIR", str(dirs["status"]))
    # run() reads the module globals through its own namespace: patch them there
    g = tool["run"].__globals__
    for name, key in (("STATUS_DIR", "status"), ("TEXTFILE_DIR", "textfile"), ("LOCK_DIR", "lock")):
        monkeypatch.setitem(g, name, str(dirs[key]))
    return dirs


def test_a_success_records_status_and_metrics(job_dirs):
    assert tool["main"](["run", "--job", "j1", "--lock", "l1", "true"]) == 0
    st = json.loads((job_dirs["status"] / "j1.json").read_text())
    assert st["ok"] and st["exit"] == 0 and st["last_success"] == st["finished"]
    prom = (job_dirs["textfile"] / "backup_j1.prom").read_text()
    assert 'provisioner_backup_last_run_success{backup="j1"} 1' in prom
    assert f'provisioner_backup_last_success_timestamp_seconds{{backup="j1"}} {st["finished"]}' in prom
    assert "max_age_seconds" not in prom                       # none given
    assert "# TYPE provisioner_backup_last_duration_seconds gauge" in prom
    assert not list(job_dirs["textfile"].glob("*.tmp.*"))


def test_a_failure_keeps_the_last_success_and_says_so(job_dirs, capsys):
    tool["main"](["run", "--job", "j2", "--lock", "l2", "true"])
    first = json.loads((job_dirs["status"] / "j2.json").read_text())["last_success"]
    assert tool["main"](["run", "--job", "j2", "--lock", "l2", "--", "sh", "-c", "exit 3"]) == 3
    st = json.loads((job_dirs["status"] / "j2.json").read_text())
    assert (st["ok"], st["exit"], st["last_success"]) == (False, 3, first)
    assert "backup job j2 FAILED: exit 3" in capsys.readouterr().err
    assert 'provisioner_backup_last_run_success{backup="j2"} 0' in \
        (job_dirs["textfile"] / "backup_j2.prom").read_text()


def test_the_metrics_keep_to_the_monitoring_roles_names(job_dirs):
    """roles/monitoring/rules.py's alerts and `invoke status` read these names and labels."""
    from provisioner.api import TEXTFILE_DIR
    from provisioner.remote import status_probe
    assert tool["TEXTFILE_DIR"] == TEXTFILE_DIR
    tool["main"](["run", "--job", "pg-incr", "--lock", "l", "--max-age-seconds", "10800", "true"])
    tool["main"](["run", "--job", "pg-verify", "--lock", "l", "--drill", "--", "false"])
    samples = status_probe.textfile_metrics(str(job_dirs["textfile"]))
    (backup,) = status_probe.backups(samples)
    assert backup["name"] == "pg-incr" and backup["max_age_seconds"] == 10800
    assert backup["age_seconds"] < 60
    drill = {s[0]: s for s in samples if s[0].startswith("provisioner_restore_drill_")}
    assert drill["provisioner_restore_drill_ok"][1:] == ({"drill": "pg-verify"}, 0.0)
    assert "provisioner_restore_drill_last_success_timestamp_seconds" not in drill   # never passed


def test_a_failing_prepare_step_stops_the_job(job_dirs):
    assert tool["main"](["run", "--job", "j3", "--lock", "l3", "--prepare", '["false"]',
                         "touch", str(job_dirs["status"] / "ran")]) == 1
    assert not (job_dirs["status"] / "ran").exists()


def test_a_run_never_overlaps_the_previous_one(job_dirs, tmp_path):
    """A second run while the first holds the lock is skipped (exit 0, a journal line), and
    records nothing."""
    env = {**os.environ, "PYTHONPATH": ""}
    script = (f"import runpy,sys; g=runpy.run_path({str(JOB)!r}); "
              f"g['run'].__globals__.update(STATUS_DIR={str(job_dirs['status'])!r}, "
              f"TEXTFILE_DIR={str(job_dirs['textfile'])!r}, LOCK_DIR={str(job_dirs['lock'])!r}); "
              "sys.exit(g['main'](sys.argv[1:]))")
    first = subprocess.Popen([sys.executable, "-c", script, "run", "--job", "slow", "--lock", "same",
                              "--", "sleep", "2"], env=env)
    deadline = time.monotonic() + 5
    while not (job_dirs["lock"] / "provisioner-backup-same.lock").exists() \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    second = subprocess.run([sys.executable, "-c", script, "run", "--job", "other", "--lock",
                             "same", "true"], env=env, capture_output=True, text=True)
    assert first.wait(10) == 0
    assert second.returncode == 0 and "skipped" in second.stderr
    assert not (job_dirs["status"] / "other.json").exists()


def test_bad_job_names_are_refused(job_dirs):
    with pytest.raises(SystemExit):
        tool["main"](["run", "--job", "../x", "--lock", "l", "true"])


# --- status -------------------------------------------------------------------------------------

def answer(now, jobs=None, info=INFO):
    return {"now": now, "jobs": jobs or {}, "pgbackrest": info}


def test_status_is_green_while_every_kind_is_fresh(tmp_path):
    inv = make_inventory(tmp_path)
    wanted = backups.stanzas(inv)
    assert wanted == [backups.Stanza("db1", "vault")]
    now = 1764615605 + 600
    drill = {"pgbackrest-db1-verify": {"ok": True, "last_success": now - 3600}}
    rows = backups.status_rows(inv, "vault", answer(now, drill), wanted)
    assert [(r.kind, r.ok) for r in rows] == [("full", True), ("diff", True), ("incr", True),
                                              ("verify", True)]
    incr = rows[2]
    assert incr.last_success == 1764615605 and incr.age_s == 600
    assert incr.detail == "WAL 00000001000000000000000A" and incr.repo_size_bytes == 4194304 + 262144
    text = backups.table(rows)
    incr_line = next(line for line in text.splitlines() if line.split()[1] == "incr")
    assert incr_line.split()[:8] == ["db1", "incr", "2025-12-01", "19:00:05", "10", "min", "3", "h"]
    assert "STALE" not in text and "restore drill" in text


def test_status_turns_red_when_a_kind_is_too_old_or_its_last_run_failed(tmp_path):
    inv = make_inventory(tmp_path, pgbackrest_max_age_hours={"full": 192, "diff": 48, "incr": 1})
    wanted = backups.stanzas(inv)
    now = 1764615605 + 2 * 3600
    rows = {r.kind: r for r in backups.status_rows(inv, "vault", answer(now), wanted)}
    assert rows["incr"].problem == "older than 1 h" and rows["full"].ok
    failed = {"pgbackrest-db1-full": {"ok": False, "exit": 28, "last_success": 1764612012}}
    rows = {r.kind: r for r in backups.status_rows(inv, "vault", answer(now, failed), wanted)}
    assert rows["full"].problem == "last run failed (exit 28)"
    assert "STALE: last run failed (exit 28)" in backups.table(list(rows.values()))


def test_status_without_any_backup_is_red(tmp_path):
    inv = make_inventory(tmp_path)
    rows = backups.status_rows(inv, "vault", answer(time.time(), info=[]), backups.stanzas(inv))
    assert {r.problem for r in rows} == {"never succeeded"}
    broken = {"now": time.time(), "jobs": {}, "pgbackrest_error": "ERROR: [055]: unable to load"}
    rows = backups.status_rows(inv, "vault", broken, backups.stanzas(inv))
    assert all("unable to load" in r.problem for r in rows if r.kind != "verify")


def test_limit_picks_stanzas_by_database_server_or_repository_host(tmp_path):
    inv = make_inventory(tmp_path)
    assert backups.selected(inv, [inv.hosts["vault"]]) == [backups.Stanza("db1", "vault")]
    assert backups.selected(inv, [inv.hosts["db1"]]) == [backups.Stanza("db1", "vault")]
    assert backups.selected(inv, [inv.hosts["web1"]]) == []


# --- restore ------------------------------------------------------------------------------------

NOW = datetime(2026, 12, 1, 20, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, utc", [
    ("2026-12-01T18:40:00Z", "2026-12-01 18:40:00.000000+00"),
    ("2026-12-01 19:40:00.250+01:00", "2026-12-01 18:40:00.250000+00"),
])
def test_at_takes_a_zoned_time_and_targets_utc(text, utc):
    assert backups.target(backups.parse_at(text, NOW)) == utc


@pytest.mark.parametrize("text, problem", [
    ("2026-12-01 18:40", "has no time zone"),
    ("yesterday", "is not an ISO 8601 time"),
    ("2026-12-02T00:00:00Z", "is in the future"),
])
def test_bad_at_is_refused(text, problem):
    with pytest.raises(InputError, match=problem):
        backups.parse_at(text, NOW)


def test_a_time_before_the_oldest_backup_or_without_backups_is_refused():
    s = backups.pgbackrest_summary(INFO, "db1")
    backups.check_window(datetime.fromtimestamp(1764612013, timezone.utc), s, "db1")
    with pytest.raises(InputError, match="before the oldest backup of db1"):
        backups.check_window(datetime.fromtimestamp(1764612000, timezone.utc), s, "db1")
    with pytest.raises(InputError, match="no backup yet"):
        backups.check_window(NOW, backups.pgbackrest_summary(INFO, "db2"), "db2")


def test_the_restore_script_archives_stops_restores_in_place_and_waits_for_promotion():
    at = backups.parse_at("2026-12-01T18:40:00Z", NOW)
    argv = backups.restore_script("db1", "postgresql@17-main", 5432,
                                  backups.time_target(at, INFO, "db1"))
    assert argv[:2] == ["sh", "-c"]
    lines = argv[2].splitlines()
    assert lines[0] == "set -e"
    order = [next(i for i, line in enumerate(lines) if needle in line) for needle in (
        "pg_switch_wal", "systemctl stop postgresql@17-main", "pgbackrest --stanza=db1 --delta",
        "systemctl start postgresql@17-main", "pg_is_in_recovery")]
    assert order == sorted(order)
    assert ("--type=time '--target=2026-12-01 18:40:00.000000+00' "
            "--set=20261201-180000F_20261201-190000I --target-action=promote restore" in argv[2])


def test_for_a_time_the_set_is_the_newest_that_stopped_before_it_as_pgbackrest_picks():
    """Named with --set: the set restore_to checks is the one restored from. pgBackRest's own
    rule for a time target: the newest set whose stop time (whole seconds) is below the time."""
    full_stop, incr_stop = 1764612012, 1764615605
    def at(ts):
        return datetime.fromtimestamp(ts, timezone.utc)
    assert backups.time_target(at(incr_stop + 1), INFO, "db1").set == \
        "20261201-180000F_20261201-190000I"
    assert backups.time_target(at(incr_stop), INFO, "db1").set == "20261201-180000F"
    assert backups.time_target(at(incr_stop + 0.9), INFO, "db1").set == "20261201-180000F"
    assert backups.time_target(at(full_stop + 1), INFO, "db1").set == "20261201-180000F"
    # the second the full stopped is not after it: no set, as pgBackRest would say
    with pytest.raises(InputError, match="before the oldest backup of db1"):
        backups.time_target(at(full_stop + 0.5), INFO, "db1")


# --- restore points made before a deploy migrates (db.restore --before) ------------------------

# made after the fixture's incremental ended (lsn 0/6000100, 2025-12-01 19:00:05 UTC)
POINT = {"kind": "pgbackrest", "stanza": "db1", "name": "sample-20251201T193000Z-3f2a9c1b7d4e",
         "lsn": "0/7000090", "wal": "000000010000000000000007", "at": "2025-12-01T19:30:00Z"}
RELEASE = "20251201T193000Z-3f2a9c1b7d4e"


def test_lsns_compare_as_numbers():
    assert backups.lsn("0/7000090") == 0x7000090
    assert backups.lsn("1/0") > backups.lsn("0/FFFFFFFF")


def test_a_restore_point_replays_from_the_newest_backup_that_ended_before_it():
    """pgBackRest would take the newest backup of all for a name target: the set is named."""
    to = backups.point_target(POINT, RELEASE, INFO, "db1")
    assert (to.type, to.value, to.set) == ("name", POINT["name"],
                                           "20261201-180000F_20261201-190000I")
    assert to.said == (f"restore point {POINT['name']} (2025-12-01 19:30:00 UTC, made before "
                       f"release {RELEASE} migrated)")
    # a point between the full and the incremental: the incremental ended after it
    earlier = dict(POINT, lsn="0/5000000")
    assert backups.point_target(earlier, RELEASE, INFO, "db1").set == "20261201-180000F"
    argv = backups.restore_script("db1", "postgresql@17-main", 5432, to)[2]
    assert (f"--type=name --target={POINT['name']} --set=20261201-180000F_20261201-190000I "
            "--target-action=promote restore") in argv


def test_without_lsns_the_backups_end_time_decides():
    info = json.loads(json.dumps(INFO))
    for b in info[0]["backup"]:
        del b["lsn"]
    point = dict(POINT, at="2025-12-01T18:30:00Z")        # after the full only
    assert backups.point_target(point, RELEASE, info, "db1").set == "20261201-180000F"


def test_a_restore_point_older_than_every_backup_kept_says_retention_expired_them():
    """Nothing of pgBackRest runs: the user reads why, and what to do instead."""
    old = dict(POINT, lsn="0/2000000", at="2025-11-01T10:00:00Z")
    with pytest.raises(InputError) as e:
        backups.point_target(old, RELEASE, INFO, "db1")
    text = str(e.value)
    assert "--before: the repository of stanza db1 no longer holds a backup that ended before " \
           f"restore point {POINT['name']} (2025-11-01 10:00:00 UTC" in text
    assert "the oldest it keeps ended 2025-12-01 18:00:12 UTC (retention expired the older " \
           "ones)" in text and "Nothing was changed" in text
    assert "`invoke restore --at TIME`" in text and "pgbackrest_retention_days" in text
    with pytest.raises(InputError, match="it keeps none"):
        backups.point_target(POINT, RELEASE, INFO, "db2")


def test_the_confirmation_says_the_whole_cluster_is_rewound():
    to = backups.point_target(POINT, RELEASE, INFO, "db1")
    q = backups.restore_question("db1", "17/main", ["app"], to)
    assert q.startswith("Rewind the WHOLE PostgreSQL cluster on db1 (cluster 17/main: every "
                        "database in it, not only the app's; the inventory declares: app) to "
                        f"restore point {POINT['name']} (2025-12-01 19:30:00 UTC, made before "
                        f"release {RELEASE} migrated)?")
    assert "everything written to any of its databases after that moment is lost" in q
    at = backups.time_target(backups.parse_at("2026-12-01T18:40:00Z", NOW), INFO, "db1")
    assert "to 2026-12-01 18:40:00 UTC?" in backups.restore_question("db1", "17/main", [], at)


def test_the_restore_confirmation_without_a_terminal_names_what_yes_would_do(monkeypatch):
    from provisioner.cli import backup as cli
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(InputError) as e:
        cli.ask("Rewind the WHOLE PostgreSQL cluster on db1 ...?", "db1")
    assert "--yes: a restore needs a confirmation and there is no terminal to ask on: Rewind " \
           "the WHOLE PostgreSQL cluster on db1" in str(e.value)


# --- a set of another cluster (a major upgrade in between) is never restored in place ----------

SYS15, SYS17 = 7443182330010213476, 7512345678901234567
UPGRADED_AT = 1764662400                        # 2025-12-02 08:00:00 UTC: 15 -> 17, stanza-upgrade


def upgraded(with_17_backup=True, stanza_upgraded=True) -> list:
    """The fixture's stanza after a major upgrade: its two sets are of 15 (db id 1), then,
    once stanza-upgrade ran, 17 is the current database (db id 2), with a first full of 17
    ending 2025-12-02 09:00:00 UTC."""
    info = json.loads(json.dumps(INFO))
    s = info[0]
    s["db"] = [{"id": 1, "repo-key": 1, "system-id": SYS15, "version": "15"}]
    if stanza_upgraded:
        s["db"].append({"id": 2, "repo-key": 1, "system-id": SYS17, "version": "17"})
    if with_17_backup:
        s["backup"].append({"label": "20251202-083000F", "type": "full",
                            "database": {"id": 2, "repo-key": 1},
                            "lsn": {"start": "0/9000028", "stop": "0/9000100"},
                            "timestamp": {"start": UPGRADED_AT + 1800, "stop": UPGRADED_AT + 3600}})
    return info


RUNS_17 = backups.Cluster("17", SYS17)


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def refusal(info, to, cluster=RUNS_17) -> str:
    with pytest.raises(InputError) as e:
        backups.check_restorable(info, "db1", to, cluster)
    return str(e.value)


def test_a_time_covered_only_by_the_old_majors_sets_is_refused_naming_set_majors_and_fix():
    info = upgraded()
    to = backups.time_target(at(UPGRADED_AT + 60), info, "db1")      # after the upgrade, before
    assert to.set == "20261201-180000F_20261201-190000I"            # 17's first full ended
    text = refusal(info, to)
    assert text.startswith("command line: --at: backup set 20261201-180000F_20261201-190000I of "
                           "stanza db1, which 2025-12-02 08:01:00 UTC would be replayed from, is "
                           f"of PostgreSQL 15, system id {SYS15}, and the cluster on db1 runs "
                           f"PostgreSQL 17 (system id {SYS17}): restoring it would put 15's files "
                           "in 17's place. Nothing was changed")
    assert "fix: pick a time after 2025-12-02 09:00:00 UTC, when the first backup of PostgreSQL " \
           "17 on db1 ended (`invoke restore --at TIME`), or restore set " \
           "20261201-180000F_20261201-190000I by hand into a scratch cluster of PostgreSQL 15" in text
    assert ("`pgbackrest --stanza=db1 --set=20261201-180000F_20261201-190000I --type=time "
            "'--target=2025-12-02 08:01:00.000000+00' --target-action=promote --archive-mode=off "
            "--pg1-path=/var/tmp/restore-15 restore`, then start it with "
            "/usr/lib/postgresql/15/bin/pg_ctl") in text
    # a time before the upgrade is 15's too: its state only fits a cluster of 15
    assert "is of PostgreSQL 15" in refusal(info, backups.time_target(at(1764615606), info, "db1"))


def test_a_time_after_the_first_backup_of_the_new_major_restores():
    info = upgraded()
    to = backups.time_target(at(UPGRADED_AT + 3601), info, "db1")
    assert to.set == "20251202-083000F"
    backups.check_restorable(info, "db1", to, RUNS_17)
    # pg_control unreadable (the data folder gone): the stanza's current database decides
    backups.check_restorable(info, "db1", to, backups.Cluster("17", None))


def test_without_a_backup_of_the_new_major_the_fix_is_a_full_backup_now():
    info = upgraded(with_17_backup=False)
    text = refusal(info, backups.time_target(at(UPGRADED_AT + 60), info, "db1"))
    assert "is of PostgreSQL 15" in text and "runs PostgreSQL 17" in text
    assert "fix: the repository holds no backup of PostgreSQL 17 on db1 yet: take one now with " \
           "`invoke backup --limit db1 --kind full` (due right after every major upgrade)" in text


def test_a_stanza_not_upgraded_yet_is_refused_whatever_the_set():
    info = upgraded(with_17_backup=False, stanza_upgraded=False)
    text = refusal(info, backups.time_target(at(UPGRADED_AT + 60), info, "db1"))
    assert "the stanza's current database is still PostgreSQL 15: stanza-upgrade has not run" \
           in text
    assert "fix: run `invoke provision --limit db1` (role pgbackrest runs stanza-upgrade), then " \
           "`invoke backup --limit db1 --kind full`" in text


def test_a_set_of_another_cluster_of_the_same_major_is_refused_by_its_system_id():
    """The cluster made anew (initdb, or an upgrade done again) and the stanza upgraded to it:
    the earlier cluster's sets are 17's too, but not this cluster's."""
    info = upgraded()
    info[0]["db"][0].update(version="17")
    text = refusal(info, backups.time_target(at(UPGRADED_AT + 60), info, "db1"))
    assert f"is of PostgreSQL 17, system id {SYS15}, and the cluster on db1 runs PostgreSQL 17 " \
           f"(system id {SYS17})" in text
    # and the current database must be this cluster: another system id than the stanza's
    to = backups.time_target(at(UPGRADED_AT + 3601), info, "db1")
    assert "stanza-upgrade has not run" in refusal(info, to, backups.Cluster("17", 42))


def test_a_restore_point_whose_only_earlier_sets_are_the_old_majors_is_refused():
    info = upgraded(with_17_backup=False)
    point = dict(POINT, lsn="0/9000200", at="2025-12-02T08:05:00Z")
    to = backups.point_target(point, RELEASE, info, "db1")
    text = refusal(info, to)
    assert text.startswith("command line: --before: backup set 20261201-180000F_20261201-190000I "
                           f"of stanza db1, which restore point {POINT['name']}")
    assert "--type=name --target=" + POINT["name"] in text


def test_the_fixtures_own_sets_are_its_clusters():
    """Nothing refused where no upgrade happened: the usual case costs nothing."""
    to = backups.time_target(NOW, INFO, "db1")
    backups.check_restorable(INFO, "db1", to, backups.Cluster("17", 7443182330010213476))


def test_the_info_exec_reads_the_system_id_then_the_json():
    argv = backups.info_script("db1", "/var/lib/postgresql/17/main")
    assert argv[:2] == ["sh", "-c"]
    assert "od -An -tu8 -N8 -- /var/lib/postgresql/17/main/global/pg_control" in argv[2]
    assert "exec runuser -u postgres -- pgbackrest --stanza=db1 --output=json info" in argv[2]
    assert backups.parse_info(f"{SYS17}\n[]") == (SYS17, [])
    assert backups.parse_info("\n" + json.dumps(INFO)) == (None, INFO)
    with pytest.raises(ValueError):
        backups.parse_info("\nERROR: [056]: unable to find primary cluster")


class FakeDbConn:
    """db1 as restore_to sees it: Debian 13, the stanza after an upgrade; records each exec."""

    def __init__(self, info, system_id=SYS17):
        self.info, self.system_id, self.ran = info, system_id, []

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def run(self, argv, sudo=True, **kw):
        from provisioner.connection import Result
        self.ran.append(argv)
        if "os-release" in argv[-1]:
            return Result(0, b"13\n", b"", 0.1)
        if "pgbackrest" in argv[-1] and argv[-1].rstrip().endswith("info"):
            return Result(0, f"{self.system_id}\n{json.dumps(self.info)}".encode(), b"", 0.5)
        return Result(0, b"", b"", 1.0)              # the restore itself


def test_restore_refuses_an_old_majors_set_before_anything_is_stopped_or_asked(monkeypatch):
    from provisioner.cli import backup as cli
    from provisioner.inventory import load_inventory
    conn, asked = FakeDbConn(upgraded(with_17_backup=False)), []
    monkeypatch.setattr(cli, "_conn", lambda inv, name: conn)
    with pytest.raises(InputError, match="is of PostgreSQL 15.*runs PostgreSQL 17"):
        cli.restore_to(load_inventory("local"), backups.Stanza("db1", "vault"),
                       lambda info: backups.time_target(at(UPGRADED_AT + 60), info, "db1"),
                       lambda question: asked.append(question) or True, say=lambda text: None)
    assert not asked, "refused before the confirmation"
    assert len(conn.ran) == 2 and "od -An -tu8 -N8 -- /var/lib/postgresql/17/main/global/" \
        "pg_control" in conn.ran[1][-1]
    assert not [a for a in conn.ran if "systemctl" in " ".join(a)], "nothing stopped"


def test_restore_of_a_set_of_the_running_cluster_goes_on(monkeypatch):
    from provisioner.cli import backup as cli
    from provisioner.inventory import load_inventory
    conn = FakeDbConn(upgraded())
    monkeypatch.setattr(cli, "_conn", lambda inv, name: conn)
    cli.restore_to(load_inventory("local"), backups.Stanza("db1", "vault"),
                   lambda info: backups.time_target(at(UPGRADED_AT + 3601), info, "db1"),
                   lambda question: True, say=lambda text: None)
    restore = conn.ran[-1][-1]
    assert "systemctl stop postgresql@17-main" in restore and "--set=20251202-083000F" in restore


def test_the_stanza_of_a_database_server(tmp_path):
    inv = make_inventory(tmp_path)
    assert backups.stanza_of(inv, "db1") == backups.Stanza("db1", "vault")
    assert backups.stanza_of(inv, "vault") is None and backups.stanza_of(inv, "web1") is None


# --- a unit waited for in bounded polls (a deploy's first full backup) -------------------------

class FakeSystemd:
    """The repository host as run_unit sees it: a oneshot unit that runs `takes` seconds of a
    fake clock and then ends with `result`. Each exec of unit_wait_script returns at once but
    moves the clock by what the server would have waited; records every exec."""

    RUNNING = "Job=4711\nActiveState=activating\nSubState=start\nResult=success\nExecMainStatus=0\n"
    ENDED = {"success": "ActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\n",
             "exit-code": "ActiveState=failed\nSubState=failed\nResult=exit-code\n"
                          "ExecMainStatus=1\n"}

    def __init__(self, takes: float, result: str = "success", start_rc: int = 0,
                 host: str = "vault"):
        self.takes, self.result, self.start_rc, self.host = takes, result, start_rc, host
        self.now, self.started_at, self.ran, self.timeouts = 1000.0, None, [], []
        self.commands = 0

    def clock(self) -> float:
        return self.now

    def run(self, argv, timeout=None, sudo=True, **kw):
        from provisioner.connection import Result
        self.ran.append(argv)
        self.timeouts.append(timeout)
        script = argv[-1]
        if argv[0] == "journalctl":
            return Result(0, b"backup job pgbackrest-db1-full FAILED: exit 1 after 61.0s\n", b"",
                          0.1)
        if "start --no-block" in script:
            if self.start_rc:
                return Result(self.start_rc, b"", b"Failed to start pgbackrest-db1-full.service: "
                              b"Unit pgbackrest-db1-full.service not found.\n", 0.1)
            self.started_at = self.now
        wait = int(script.split("$(date +%s) + ")[1].split(" ")[0])
        assert timeout is not None and wait <= backups.UNIT_POLL < timeout, "every exec bounded"
        ends = self.started_at + self.takes
        if self.now + wait < ends:
            self.now += wait
            return Result(0, self.RUNNING.encode(), b"", wait)
        self.now = max(self.now, ends) + 1
        return Result(0, self.ENDED[self.result].encode(), b"", 1.0)


def test_a_unit_longer_than_the_command_timeout_is_waited_for_in_bounded_polls():
    host, seen = FakeSystemd(takes=1000), []
    run = backups.run_unit(host, "pgbackrest-db1-full", 3600, seen.append, clock=host.clock)
    assert (run.state, run.problem) == ("ok", None) and 1000 <= run.seconds <= 1002
    assert "systemctl start --no-block -- pgbackrest-db1-full.service" in host.ran[0][-1]
    assert all("--no-block" not in a[-1] for a in host.ran[1:]), "started once"
    # 30 s per exec: 34 round trips for 1000 s, progress after each that found it running
    assert len(host.ran) == 34 and seen == [30.0 * i for i in range(1, 34)]


def test_a_unit_that_ends_within_the_first_poll_costs_one_exec():
    host = FakeSystemd(takes=12)
    run = backups.run_unit(host, "pgbackrest-db1-full", 3600, clock=host.clock)
    assert run.state == "ok" and len(host.ran) == 1


def test_a_failed_unit_says_so_with_its_journal():
    host = FakeSystemd(takes=61, result="exit-code")
    run = backups.run_unit(host, "pgbackrest-db1-full", 3600, clock=host.clock)
    assert run.state == "failed"
    assert run.problem == ("pgbackrest-db1-full.service failed (failed), result exit-code, exit "
                           "status 1\nbackup job pgbackrest-db1-full FAILED: exit 1 after 61.0s")
    refused = FakeSystemd(takes=1, start_rc=5)
    run = backups.run_unit(refused, "pgbackrest-db1-full", 3600, clock=refused.clock)
    assert run.state == "failed" and "Unit pgbackrest-db1-full.service not found" in run.problem


def test_at_the_limit_the_wait_ends_and_the_unit_goes_on():
    host, seen = FakeSystemd(takes=10_000), []
    run = backups.run_unit(host, "pgbackrest-db1-full", 100, seen.append, clock=host.clock)
    assert run.state == "running" and run.seconds == 100 and run.problem is None
    assert seen == [30, 60, 90], "the last poll waits only what is left of the limit"
    assert not [a for a in host.ran if "stop" in a[-1] or "kill" in a[-1]]


@pytest.mark.parametrize("show, state", [
    (FakeSystemd.RUNNING, "running"),
    ("ActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\n", "ok"),
    # queued, not started yet: the last run's success must not count
    ("Job=12\nActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\n",
     "running"),
    ("Job=\nActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\n", "ok"),
    ("ActiveState=failed\nSubState=failed\nResult=exit-code\nExecMainStatus=2\n", "failed"),
    ("ActiveState=inactive\nSubState=dead\nResult=timeout\nExecMainStatus=0\n", "failed"),
    ("", "failed"),
])
def test_the_units_state_from_systemctl_show(show, state):
    assert backups.unit_state(show)[0] == state


def test_the_wait_script_waits_while_the_start_job_is_there(tmp_path):
    """The shell script itself, against a fake systemctl: it queues the start once, looks
    again while the unit has a job or is activating, and prints the state it ended in."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    states = tmp_path / "states"
    states.write_text(FakeSystemd.RUNNING.replace("\n", ";") + "\n"
                      + "Job=9;ActiveState=inactive;SubState=dead;Result=success;\n"
                      + "ActiveState=inactive;SubState=dead;Result=success;ExecMainStatus=0;\n")
    log = tmp_path / "log"
    (bin_ / "systemctl").write_text(f"""#!/bin/sh
echo "$@" >> {log}
[ "$1" = show ] || exit 0
line=$(head -n 1 {states}); [ $(wc -l < {states}) -gt 1 ] && sed -i 1d {states}
printf '%s' "$line" | tr ';' '\\n'
""")
    (bin_ / "sleep").write_text("#!/bin/sh\nexec /bin/sleep 0.1\n")     # not 3 s a look
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    argv = backups.unit_wait_script("pgbackrest-db1-full", 30, start=True)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert backups.unit_state(r.stdout) == ("ok", "inactive (dead), result success, exit status 0")
    calls = log.read_text().splitlines()
    assert calls[0] == "start --no-block -- pgbackrest-db1-full.service"
    assert [c.split()[0] for c in calls[1:]] == ["show"] * 3
    # a poll that is not the first starts nothing, and gives up at its own bound
    states.write_text(FakeSystemd.RUNNING.replace("\n", ";") + "\n")
    log.write_text("")
    r = subprocess.run(backups.unit_wait_script("pgbackrest-db1-full", 1), env=env,
                       capture_output=True, text=True, timeout=30)
    assert backups.unit_state(r.stdout)[0] == "running"
    assert "start" not in log.read_text()


# --- the CLI: bad input, exit 2, before any server ----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["backup", "--kind", "weekly"], "--kind: 'weekly' is not a backup kind"),
    (["restore", "--at", "2026-12-01 18:40"], "--at: '2026-12-01 18:40' has no time zone"),
    (["restore", "--at", "2999-01-01T00:00:00Z"], "is in the future"),
    (["backup.status", "--env", "nope"], "no inventory for env 'nope'"),
    (["restore", "--at", "2026-01-01T00:00:00Z"], "--yes: a restore needs a confirmation"),
])
def test_bad_input_exits_2_naming_the_flag(args, message):
    r = invoke(*args, check=False, timeout=60, stdin=subprocess.DEVNULL)   # no terminal, as in CI
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


# --- restic -------------------------------------------------------------------------------------

SNAPSHOTS = json.loads((Path(__file__).parent / "fixtures" / "backup" / "restic-snapshots.json")
                       .read_text())


def test_restic_times_keep_their_zone_and_nanoseconds():
    assert backups.restic_time("2026-12-01T03:15:02.5+01:00") == \
        datetime(2026, 12, 1, 2, 15, 2, 500000, tzinfo=timezone.utc).timestamp()
    assert backups.restic_time("2026-11-30T02:15:04.118204393+00:00") == \
        datetime(2026, 11, 30, 2, 15, 4, 118204, tzinfo=timezone.utc).timestamp()
    assert backups.restic_time("yesterday") is None and backups.restic_time(None) is None


def test_the_restic_summary_names_the_newest_snapshot_by_time_not_by_order():
    s = backups.restic_summary(SNAPSHOTS)
    assert (s["snapshots"], s["latest_id"]) == (3, "11111111")
    assert s["latest_time"] == datetime(2026, 12, 1, 2, 15, 3, tzinfo=timezone.utc).timestamp()
    assert backups.restic_summary([]) == {"snapshots": 0}


def test_a_snapshot_is_picked_at_or_before_the_time():
    at = datetime(2026, 12, 1, 2, 15, 2, 600000, tzinfo=timezone.utc)
    assert backups.snapshot_at(SNAPSHOTS, at, "web1")["short_id"] == "fedcba98"
    assert backups.snapshot_at(SNAPSHOTS, None, "web1")["short_id"] == "11111111"
    with pytest.raises(InputError, match="web1 has no restic snapshot at or before 2026-11-01"):
        backups.snapshot_at(SNAPSHOTS, datetime(2026, 11, 1, tzinfo=timezone.utc), "web1")


def test_restic_status_rows(tmp_path):
    inv = make_inventory(tmp_path, app_roles=["restic"], vault_roles=["restic"])
    assert backups.restic_sources(inv) == ["web1"]
    newest = backups.restic_time("2026-12-01T02:15:03Z")
    jobs = {"restic-backup": {"ok": True, "last_success": newest, "size_bytes": 40960,
                              "repo_size_bytes": 9000000},
            "restic-check": {"ok": False, "exit": 1, "last_success": newest - 3600}}
    rows = backups.restic_rows(inv, "web1", {"now": newest + 60, "jobs": jobs,
                                             "restic": SNAPSHOTS})
    backup, check, drill = rows
    assert drill.kind == "files verify" and drill.problem == "never succeeded"
    assert (backup.kind, backup.ok, backup.detail) == ("files backup", True,
                                                       "3 snapshots, latest 11111111")
    assert check.problem == "last run failed (exit 1)"
    rows = backups.restic_rows(inv, "web1", {"now": newest, "jobs": {}, "restic": None,
                                             "restic_error": "Fatal: wrong password"})
    assert "wrong password" in rows[0].problem and rows[1].problem == "never succeeded"
    inv = make_inventory(tmp_path, app_roles=["restic"], vault_roles=["restic"], restic_drill=False)
    assert [r.kind for r in backups.restic_rows(inv, "web1", {"now": 0, "jobs": {}})] == [
        "files backup", "files check"]


def test_the_files_restore_never_writes_over_a_folder_with_something_in_it(tmp_path):
    argv = backups.restic_restore_script("fedcba98", "/srv/sample/x y", "/var/tmp/r; rm -rf /")
    script = argv[2]
    assert "restic restore fedcba98 --target '/var/tmp/r; rm -rf /' --include '/srv/sample/x y'" \
        in script
    target = tmp_path / "t"
    target.mkdir()
    (target / "live").write_text("data")
    fake = tmp_path / "env"
    fake.write_text("")
    probe = script.replace(backups.RESTIC_ENV, str(fake)).replace("/var/tmp/r; rm -rf /", str(target))
    r = subprocess.run(["sh", "-c", probe], capture_output=True, text=True)
    assert r.returncode == 3 and "exists and is not empty" in r.stderr
    assert (target / "live").read_text() == "data"


@pytest.mark.parametrize("path", ["srv/x", "/srv/../etc", "/a\nb"])
def test_restore_paths_must_be_absolute_and_plain(path):
    with pytest.raises(InputError, match="is not an absolute path"):
        backups.check_restore_path(path, "--path")


def test_restore_files_refuses_a_host_without_restic():
    r = invoke("restore.files", "--env", "local", "--host", "db1", "--path", "/etc", check=False,
               timeout=60)
    assert r.returncode == 2


# --- check jobs not due yet (found live: a fresh setup's status was red until the weekly drill) --

SHOW = """Id=pgbackrest-db1-full.timer
LastTriggerUSec=@1796152838

Id=pgbackrest-db1-verify.timer
LastTriggerUSec=

Id=restic-verify.timer
LastTriggerUSec=n/a

Id=restic-check.timer
LastTriggerUSec=Sat 2026-12-05 05:00:00 UTC
"""


def test_the_timers_last_triggers_are_read_from_systemctl_show():
    assert tool["timer_triggers"](SHOW) == {
        "pgbackrest-db1-full": {"last_trigger": 1796152838.0},
        "pgbackrest-db1-verify": {"last_trigger": None},
        "restic-verify": {"last_trigger": None}}      # an unreadable value: no fact at all
    assert tool["timer_triggers"]("") == {}


def _drill_row(tmp_path, jobs=None, timers=None):
    inv = make_inventory(tmp_path)
    now = 1764615605 + 600
    doc = {**answer(now, jobs), **({"timers": timers} if timers is not None else {})}
    return {r.kind: r for r in backups.status_rows(inv, "vault", doc, backups.stanzas(inv))}


def test_a_drill_whose_timer_never_fired_is_not_yet_due_and_green(tmp_path):
    rows = _drill_row(tmp_path, timers={"pgbackrest-db1-verify": {"last_trigger": None}})
    drill = rows["verify"]
    assert drill.ok and not drill.due and drill.last_success is None
    line = next(x for x in backups.table(list(rows.values())).splitlines() if " verify " in x)
    assert line.endswith("not yet due") and "STALE" not in line


def test_a_drill_that_never_succeeded_after_its_timer_fired_is_red(tmp_path):
    fired = {"pgbackrest-db1-verify": {"last_trigger": 1764615605.0}}
    assert _drill_row(tmp_path, timers=fired)["verify"].problem == "never succeeded"
    # no fact about the timer (an older server tool, a timer gone): strict
    assert _drill_row(tmp_path)["verify"].problem == "never succeeded"
    assert _drill_row(tmp_path, timers={})["verify"].problem == "never succeeded"


def test_a_drill_run_by_hand_that_failed_is_red_before_its_timer_fired(tmp_path):
    jobs = {"pgbackrest-db1-verify": {"ok": False, "exit": 1, "last_success": None}}
    rows = _drill_row(tmp_path, jobs, timers={"pgbackrest-db1-verify": {"last_trigger": None}})
    assert not rows["verify"].ok and rows["verify"].due


def test_backups_that_never_ran_stay_red_whatever_their_timers_say(tmp_path):
    """No backup at all is a risk now, not a check that is not due: only drills and restic's
    check get the grace."""
    inv = make_inventory(tmp_path)
    timers = {f"pgbackrest-db1-{k}": {"last_trigger": None} for k in ("full", "diff", "incr", "verify")}
    rows = backups.status_rows(inv, "vault", {**answer(time.time(), info=[]), "timers": timers},
                               backups.stanzas(inv))
    assert {r.kind: r.ok for r in rows} == {"full": False, "diff": False, "incr": False, "verify": True}


def test_restic_check_and_drill_not_yet_due(tmp_path):
    inv = make_inventory(tmp_path, app_roles=["restic"], vault_roles=["restic"])
    newest = backups.restic_time("2026-12-01T02:15:03Z")
    jobs = {"restic-backup": {"ok": True, "last_success": newest}}
    never = {"last_trigger": None}
    rows = backups.restic_rows(inv, "web1", {"now": newest + 60, "jobs": jobs, "restic": SNAPSHOTS,
                                             "timers": {"restic-check": never, "restic-verify": never}})
    assert [(r.kind, r.ok, r.due) for r in rows] == [
        ("files backup", True, True), ("files check", True, False), ("files verify", True, False)]
    fired = {"last_trigger": newest}
    rows = backups.restic_rows(inv, "web1", {"now": newest + 60, "jobs": jobs, "restic": SNAPSHOTS,
                                             "timers": {"restic-check": fired, "restic-verify": fired}})
    assert [r.problem for r in rows] == [None, "never succeeded", "never succeeded"]

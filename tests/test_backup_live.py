"""Backups live, on the testbed's own env: db1 (PostgreSQL) backed up by vault (the pgBackRest
repository host), web1's files by restic to its SFTP account on vault, through the real tasks
(`invoke provision/backup/backup.status/restore/restore.files --env local`). The env comes
from conftest's `local_env` (provisioned from fresh servers, then again: the second run changes
nothing on these hosts either); the module's fixture adds a full backup of db1.

Small data on purpose: a marker table, a few hundred rows under write load.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import invoke
import engine_helpers
from engine_helpers import REPO, sh

DB, REPO_HOST, SOURCE = "db1", "vault", "web1"
MARKER = "marker-4f1c9e-restore-me"


def psql(sql: str, db: str = "app", check: bool = True) -> str:
    """SQL on db1 as postgres (peer login), the answer unaligned."""
    return engine_helpers.psql(DB, sql, db, check)


def db_now() -> str:
    """db1's clock (the one recovery compares with), as an ISO time with its zone."""
    return engine_helpers.db_now(DB)


def task(*args: str, check: bool = True):
    return invoke(*args, "--env", "local", check=check, timeout=900)


@pytest.fixture(scope="module")
def backed_up(local_env):
    """The env provisioned (conftest's shared session fixture), then a full backup of db1."""
    for r, _ in (local_env["first"], local_env["second"]):
        assert r.returncode == 0, r.stderr[-4000:]
    t0 = time.monotonic()
    task("backup", "--limit", DB, "--kind", "full")
    return {"second": local_env["second"][1], "full_s": time.monotonic() - t0}


def test_the_second_provision_changes_nothing(backed_up):
    changed = [e for e in backed_up["second"] if e.get("event") == "step"
               and e.get("status") == "changed" and e.get("host") in (DB, REPO_HOST, SOURCE)]
    assert changed == [], changed


def test_versions_match_and_archiving_reaches_the_repository(backed_up):
    versions = {sh(h, "pgbackrest version").stdout.strip() for h in (DB, REPO_HOST)}
    assert len(versions) == 1, versions
    psql("SELECT pg_switch_wal()", db="postgres")
    sh(DB, "runuser -u postgres -- pgbackrest --stanza=db1 check")
    # archiving works now: `check` pushed a segment through, no failure since (the first
    # segments fail while the repository has no stanza yet: the first backup creates it)
    healthy = "SELECT last_failed_time IS NULL OR last_failed_time < last_archived_time FROM pg_stat_archiver"
    assert psql(healthy, db="postgres") == "t", psql("SELECT * FROM pg_stat_archiver", db="postgres")
    assert psql("SHOW archive_mode", db="postgres") == "on"


def test_each_side_can_only_run_pgbackrest_on_the_other(backed_up):
    """The keys in authorized_keys run pgBackRest and nothing else (no shell, no forwarding)."""
    from_repo = sh(REPO_HOST, "runuser -u pgbackrest -- ssh -n -o BatchMode=yes postgres@10.77.0.13 id",
                   check=False)
    from_db = sh(DB, "runuser -u postgres -- ssh -n -o BatchMode=yes pgbackrest@10.77.0.14 id",
                 check=False)
    for r in (from_repo, from_db):
        assert r.returncode != 0 and "uid=" not in r.stdout, (r.stdout, r.stderr)
    # the host keys came from the inventory: no "Permanently added" (trust on first use)
    assert "Permanently added" not in from_repo.stderr + from_db.stderr


def test_timers_status_file_and_metrics_after_a_backup(backed_up):
    for kind in ("full", "diff", "incr"):
        timer = f"pgbackrest-db1-{kind}.timer"
        assert sh(REPO_HOST, f"systemctl is-enabled {timer}").stdout.strip() == "enabled"
        assert sh(REPO_HOST, f"systemctl is-active {timer}").stdout.strip() == "active"
    st = json.loads(sh(REPO_HOST, "cat /var/lib/provisioner/backup/pgbackrest-db1-full.json").stdout)
    assert st["ok"] and st["size_bytes"] > 0 and st["repo_size_bytes"] >= st["size_bytes"]
    prom = sh(REPO_HOST, "cat /var/lib/prometheus/node-exporter/backup_pgbackrest-db1-full.prom").stdout
    assert 'provisioner_backup_last_run_success{backup="pgbackrest-db1-full"} 1' in prom
    status = task("backup.status", "--limit", DB, "--json")
    rows = json.loads(status.stdout)
    assert {(r["host"], r["kind"], r["ok"]) for r in rows} == {
        ("db1", "full", True), ("db1", "diff", True), ("db1", "incr", True), ("db1", "verify", True)}
    assert all(r["detail"].startswith("WAL 0000") for r in rows if r["kind"] != "verify")
    # the weekly drill has not run and its timer has not fired yet: not due, not red
    [drill] = [r for r in rows if r["kind"] == "verify"]
    assert drill["due"] is False and drill["last_success"] is None, drill
    assert sh(REPO_HOST, "systemctl show -p LastTriggerUSec --timestamp=unix "
                         "pgbackrest-db1-verify.timer").stdout.strip() in ("LastTriggerUSec=",
                                                                          "LastTriggerUSec=n/a")


def test_point_in_time_restore_brings_back_a_dropped_table(backed_up):
    psql(f"DROP TABLE IF EXISTS marker; CREATE TABLE marker (t text); "
         f"INSERT INTO marker VALUES ('{MARKER}')")
    task("backup", "--limit", DB, "--kind", "incr")
    psql("INSERT INTO marker VALUES ('after the backup')")
    psql("SELECT pg_switch_wal()", db="postgres")
    time.sleep(1.1)                      # the target lies strictly between the insert and the drop
    at = db_now()
    time.sleep(1.1)
    psql("DROP TABLE marker")
    t0 = time.monotonic()
    r = task("restore", "--limit", DB, "--at", at, "--yes")
    restore_s = time.monotonic() - t0
    assert "restored and promoted" in r.stderr
    assert psql("SELECT t FROM marker ORDER BY t").splitlines() == ["after the backup", MARKER]
    assert psql("SELECT pg_is_in_recovery()", db="postgres") == "f"
    # archiving goes on on the new timeline, and the next backup works
    task("backup", "--limit", DB, "--kind", "incr")
    print(f"full backup {backed_up['full_s']:.1f}s, restore {restore_s:.1f}s")


def test_the_marker_is_nowhere_in_plaintext_on_the_repository_host(backed_up):
    psql(f"CREATE TABLE IF NOT EXISTS marker (t text); INSERT INTO marker VALUES ('{MARKER}')")
    psql("SELECT pg_switch_wal()", db="postgres")
    sh(SOURCE, f"echo {MARKER} > /srv/sample/marker.txt")
    task("backup", "--kind", "incr", "--limit", f"{DB},{SOURCE}")
    # positive controls: on db1 the text is on disk (WAL, heap), on web1 in the file
    assert sh(DB, f"grep -rlaF {MARKER} /var/lib/postgresql", check=False).stdout.strip()
    assert sh(SOURCE, f"grep -rlaF {MARKER} /srv/sample", check=False).stdout.strip()
    found = sh(REPO_HOST, f"grep -rlaF {MARKER} /var /etc /srv /home /root /tmp", check=False)
    assert sh(REPO_HOST, "ls /srv/sftp/restic-web1/repo").stdout.split(), "restic wrote nothing"
    assert found.stdout.strip() == "", found.stdout


def test_a_wrong_passphrase_fails_clearly_and_changes_nothing(backed_up):
    conf = "/etc/pgbackrest.conf"
    # the backup sets (archive-push from db1 fails as well while the passphrase is wrong)
    listing = "find /var/lib/pgbackrest/backup -type f -printf '%p %s %T@\\n' | sort | sha256sum"
    before = sh(REPO_HOST, listing).stdout
    sh(REPO_HOST, f"cp -p {conf} {conf}.keep && sed -i 's/^repo1-cipher-pass=.*/"
                  f"repo1-cipher-pass=not-the-passphrase-0000000/' {conf}")
    try:
        r = task("backup", "--limit", DB, "--kind", "incr", check=False)
    finally:
        sh(REPO_HOST, f"mv {conf}.keep {conf}")
    assert r.returncode == 1
    assert "pgbackrest-db1-incr on vault" in r.stderr
    assert "backup job pgbackrest-db1-incr FAILED" in r.stderr           # from the journal
    assert "not-the-passphrase" not in r.stderr + r.stdout
    assert sh(REPO_HOST, listing).stdout == before
    prom = sh(REPO_HOST, "cat /var/lib/prometheus/node-exporter/backup_pgbackrest-db1-incr.prom").stdout
    assert 'provisioner_backup_last_run_success{backup="pgbackrest-db1-incr"} 0' in prom
    assert sh(REPO_HOST, "systemctl is-failed pgbackrest-db1-incr.service", check=False
              ).stdout.strip() == "failed"
    task("backup", "--limit", DB, "--kind", "incr")                         # the right one works again


def test_backup_status_turns_red_when_the_incremental_timer_stops(backed_up, tmp_path,
                                                                  forget_secrets):
    """An inventory like local's with a 2-second threshold for incremental backups (never
    sleep for hours): with the timer stopped, the status goes red and exits 1."""
    from provisioner.cli.backup import gather_status
    from provisioner.cli.common import with_secrets
    from provisioner.inventory import load_inventory_file
    text = (REPO / "inventories" / "local.yml").read_text()
    text = text.replace("known_hosts: ../.testbed/known_hosts",
                        f"known_hosts: {REPO / '.testbed' / 'known_hosts'}")
    text = text.replace("key: ../.testbed/id_ed25519", f"key: {REPO / '.testbed' / 'id_ed25519'}")
    text = text.replace("  pgbackrest_repo_host: vault\n", "  pgbackrest_repo_host: vault\n"
                        "  pgbackrest_max_age_hours: {full: 192, diff: 48, incr: 0.0006}\n")
    (tmp_path / "local.yml").write_text(text)
    inv = with_secrets(load_inventory_file(tmp_path / "local.yml"), False)
    sh(REPO_HOST, "systemctl stop pgbackrest-db1-incr.timer")
    try:
        task("backup", "--limit", DB, "--kind", "incr")
        time.sleep(2.5)
        rows = {r.kind: r for r in gather_status(inv, [inv.hosts[DB]])}
        assert rows["incr"].problem == "older than 0.0006 h" and rows["full"].ok
    finally:
        sh(REPO_HOST, "systemctl start pgbackrest-db1-incr.timer")
    assert task("backup.status", "--limit", DB).returncode == 0   # local's own thresholds: green


def test_a_backup_under_write_load_restores_to_a_consistent_database(backed_up):
    """Rows numbered 1..N, one transaction each, written while an incremental backup runs; a
    restore to a time after the backup gives an unbroken 1..M (no row lost or torn)."""
    psql("DROP TABLE IF EXISTS load; CREATE TABLE load (n int PRIMARY KEY, pad text)")
    stop = threading.Event()

    def write():
        n = 0
        while not stop.is_set() and n < 5000:
            batch = "".join(f"INSERT INTO load VALUES ({n + i}, repeat('x', 500));"
                            for i in range(1, 21))
            psql(batch)
            n += 20
    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(1)
        task("backup", "--limit", DB, "--kind", "incr")
        time.sleep(1)
        at = db_now()
        time.sleep(1)
    finally:
        stop.set()
        writer.join(60)
    psql("SELECT pg_switch_wal()", db="postgres")
    task("restore", "--limit", DB, "--at", at, "--yes")
    count, low, high = psql("SELECT count(*), min(n), max(n) FROM load").split("|")
    assert int(count) > 0 and int(low) == 1 and int(high) == int(count)
    # Debian keeps pg_amcheck with the server's binaries, off PATH (the exec's PATH is the host's)
    major = int(psql("SHOW server_version_num", db="postgres")) // 10000
    amcheck = sh(DB, f"runuser -u postgres -- /usr/lib/postgresql/{major}/bin/pg_amcheck "
                     "--install-missing --all", check=False)
    assert amcheck.returncode == 0, amcheck.stderr


# --- restic: web1's files on vault ----------------------------------------------------------------

def test_a_restic_restored_file_is_byte_identical_and_never_lands_on_live_data(backed_up):
    sh(SOURCE, "head -c 1048576 /dev/urandom > /srv/sample/probe.bin && chmod 0640 /srv/sample/probe.bin")
    want = sh(SOURCE, "sha256sum /srv/sample/probe.bin && stat -c '%a %U %G' /srv/sample/probe.bin").stdout
    task("backup", "--limit", SOURCE)
    sh(SOURCE, "rm -rf /var/tmp/probe-restore")
    r = task("restore.files", "--host", SOURCE, "--path", "/srv/sample/probe.bin",
             "--target", "/var/tmp/probe-restore")
    assert "restored under /var/tmp/probe-restore" in r.stderr
    got = sh(SOURCE, "cd /var/tmp/probe-restore && sha256sum srv/sample/probe.bin | sed 's| srv| /srv|' "
                     "&& stat -c '%a %U %G' srv/sample/probe.bin").stdout
    assert got == want
    again = task("restore.files", "--host", SOURCE, "--path", "/srv/sample/probe.bin",
                 "--target", "/var/tmp/probe-restore", check=False)
    assert again.returncode == 1 and "exists and is not empty" in again.stderr


def test_the_sftp_account_is_chrooted_and_sftp_only(backed_up):
    # the forced internal-sftp answers instead of a shell (it ends at stdin's EOF)
    shell = sh(SOURCE, "ssh -n restic-repo id </dev/null", check=False)
    assert "uid=" not in shell.stdout, shell.stdout
    listing = sh(SOURCE, "printf 'cd ..\\nls -1 /\\n' | sftp -q -b - restic-repo").stdout
    # inside the chroot `cd ..` stays at its root, where there is nothing but the repository
    assert [line for line in listing.splitlines() if not line.startswith("sftp>")] == ["/repo"], listing


def test_forget_and_check_run_and_the_status_reads_them(backed_up):
    task("backup", "--limit", SOURCE)
    for job in ("forget", "check"):
        sh(SOURCE, f"systemctl start restic-{job}.service")
        st = json.loads(sh(SOURCE, f"cat /var/lib/provisioner/backup/restic-{job}.json").stdout)
        assert st["ok"], st
    rows = json.loads(task("backup.status", "--limit", SOURCE, "--json").stdout)
    # the drill's row: green while its timer has not fired (test_the_restore_drills... runs it)
    assert {(r["kind"], r["ok"], r["due"]) for r in rows} == {
        ("files backup", True, True), ("files check", True, True), ("files verify", True, False)}
    count, word = rows[0]["detail"].split(",")[0].split()      # "N snapshots, latest ID"
    assert word == "snapshots" and int(count) >= 1, rows[0]["detail"]
    prom = sh(SOURCE, "cat /var/lib/prometheus/node-exporter/backup_restic-backup.prom").stdout
    assert 'provisioner_backup_repository_size_bytes{backup="restic-backup"}' in prom


# --- restore drills -------------------------------------------------------------------------------

def test_the_restore_drills_pass_and_their_results_are_readable(backed_up):
    """A table of known size, a full backup, then the drills: the scratch cluster on vault holds
    the same rows, nothing of it is left afterwards, and the status shows the drills green."""
    psql("DROP TABLE IF EXISTS drill; CREATE TABLE drill AS SELECT g AS n FROM generate_series(1, 1234) g")
    task("backup", "--limit", f"{DB},{SOURCE}", "--kind", "full")
    t0 = time.monotonic()
    task("backup.verify", "--limit", f"{DB},{SOURCE}")
    print(f"drills: {time.monotonic() - t0:.1f}s")
    line = sh(REPO_HOST, "journalctl -u pgbackrest-db1-verify.service -o cat --no-pager "
                         "| grep '^drill result: ' | tail -1").stdout
    result = json.loads(line.split("drill result: ", 1)[1])
    app = result["databases"]["app"]
    # what app held at backup time (nothing wrote since), counted the way the drill counts
    tables, total = psql(
        "SELECT count(*), sum((xpath('/row/c/text()', query_to_xml(format("
        "'SELECT count(*) AS c FROM %I.%I', schemaname, tablename), false, true, '')))[1]"
        "::text::bigint) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
        "'information_schema')").split("|")
    assert (app["tables"], app["rows"]) == (int(tables), int(total))
    assert int(total) >= 1234
    assert sh(REPO_HOST, "ls -A /var/lib/pgbackrest-drill").stdout.strip() == ""
    assert sh(REPO_HOST, "ls /etc/postgresql 2>/dev/null | wc -l").stdout.strip() == "0"
    files = sh(SOURCE, "journalctl -u restic-verify.service -o cat --no-pager "
                       "| grep '^drill result: ' | tail -1").stdout
    assert json.loads(files.split("drill result: ", 1)[1])["compared"] > 10
    rows = json.loads(task("backup.status", "--limit", f"{DB},{SOURCE}", "--json").stdout)
    # green because they passed just now, not because they are not due yet
    assert {(r["host"], r["kind"]) for r in rows if r["ok"] and r["due"]
            and r["last_success"] is not None} >= {("db1", "verify"), ("web1", "files verify")}

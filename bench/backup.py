"""PostgreSQL backups on the local env against pg_dump | gzip: full, incremental, point-in-time restore.

Issue 15's benchmark, in one run on db1 (the database server) and vault (its pgBackRest
repository host):

1. a scratch database `benchdb` of about 1 GB on db1 (`pgbench -i -s N`; db1's and vault's
   free disk checked first);
2. plain `pg_dump | gzip` of it on db1: time and size, the yardstick;
3. a full backup through the real task (`invoke backup --env local --limit db1 --kind full`):
   wall time, pgBackRest's own time and the bytes it added to the repository (`pgbackrest info
   --output=json` on vault; a full backs up the whole cluster, benchdb being nearly all of it);
4. a small change (`--updates` rows of pgbench_accounts) and an incremental (`--kind incr`):
   time and bytes added (with pgbackrest_block_incremental, on by default, the changed blocks
   of each changed file; without it, every changed file whole);
5. a point-in-time restore (`invoke restore --env local --limit db1 --at T --yes`) to a time T
   after all of that: the app database loses nothing (the bench compares its content before and
   after), and a write the bench makes in benchdb after T is gone (the restore reached T, no
   further);

then a table with the ratios to pg_dump, and the same figures as one JSON line. benchdb is
dropped at the end, on failure too; the backups stay in the repository until retention expires
them, and the WAL archive keeps what the run wrote (its growth is printed).

    python3 bench/backup.py [--scale 68] [--updates 5000]

Needs the testbed with the local env provisioned (`invoke testbed.up`, then `invoke provision
--env local`), and nobody else using db1 meanwhile: the restore stops its cluster. Every command
has a timeout (on the server too: `timeout`), the tasks theirs.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from conftest import invoke  # noqa: E402
from engine_helpers import db_now, psql, sh, wait_for  # noqa: E402
from provisioner.backups import pgbackrest_summary  # noqa: E402
from provisioner.humanize import size  # noqa: E402

DB, REPO_HOST, BENCHDB = "db1", "vault", "benchdb"
REPO_PATH = "/var/lib/pgbackrest"          # pgbackrest_repo_path (the role's default; local's)
DUMP = "/var/tmp/benchdb.sql.gz"
MIB = 1024 * 1024
PER_SCALE = 16 * MIB                       # pgbench: 100,000 accounts rows and their index
# every change the bench makes after the restore target: the restore must undo it
AFTER_TARGET = 1_000_000

# app's content in one line: tables, rows, and a digest of every row of every table (in an order
# that does not depend on where rows lie on disk), to compare before and after the restore
FINGERPRINT = """WITH t AS (
  SELECT format('%I.%I', schemaname, tablename) AS name, query_to_xml(format(
    'SELECT count(*) AS n, coalesce(md5(string_agg(r::text, '','' ORDER BY r::text)), ''-'') AS h '
    'FROM %I.%I r', schemaname, tablename), false, true, '') AS x
  FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema'))
SELECT count(*), coalesce(sum((xpath('/row/n/text()', x))[1]::text::bigint), 0),
       md5(coalesce(string_agg(name || ' ' || (xpath('/row/h/text()', x))[1]::text, ';'
                               ORDER BY name), ''))
FROM t"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=68,
                   help="pgbench's scale factor: about 15 MB each, 68 = about 1 GB (1..640)")
    p.add_argument("--updates", type=int, default=5000,
                   help="rows of pgbench_accounts updated before the incremental (1..100000, "
                        "at most the table's 100000 x scale)")
    a = p.parse_args(argv)
    if not 1 <= a.scale <= 640:
        p.error("--scale 1..640 (640 is about 10 GiB)")
    if not 1 <= a.updates <= min(100_000, 100_000 * a.scale):
        p.error("--updates 1..100000, and at most 100000 x --scale (the rows there are)")
    return a


def disk_problem(host: str, df_text: str, needs: list[tuple[str, int, str]]) -> str | None:
    """What `df -B1 --output=target,avail PATH...` says (a header, then one line per path in the
    order of `needs`) against what each path needs: (path, bytes, what for). Paths on one file
    system add up. None when there is room, else a sentence saying what is short."""
    rows = df_text.strip().splitlines()[1:]
    if len(rows) != len(needs):
        return f"{host}: df gave {len(rows)} lines for {len(needs)} paths: {df_text!r}"
    per_fs: dict[str, dict] = {}
    for (_, need, what), row in zip(needs, rows):
        target, avail = row.rsplit(None, 1)
        fs = per_fs.setdefault(target, {"avail": int(avail), "need": 0, "what": []})
        fs["need"] += need
        fs["what"].append(f"{what}: {size(need)}")
    for target, fs in per_fs.items():
        if fs["avail"] < fs["need"]:
            return (f"{host} has {size(fs['avail'])} free on {target}, and the bench needs about "
                    f"{size(fs['need'])} there ({'; '.join(fs['what'])}): free some space or "
                    "pass a smaller --scale")
    return None


def db_needs(scale: int) -> list[tuple[str, int, str]]:
    """db1: benchdb, its WAL until archived (pg_wal grows while archive-push catches up), the dump."""
    est = scale * PER_SCALE
    return [("/var/lib/postgresql", 2 * est + 512 * MIB, "benchdb and its WAL until archived, "
             "with 512 MiB to spare"), ("/var/tmp", est // 4, "the pg_dump | gzip file, at most")]


def repo_needs(scale: int) -> list[tuple[str, int, str]]:
    """vault: the compressed full and incremental, and the WAL archive of loading benchdb."""
    est = scale * PER_SCALE
    return [(REPO_PATH, est // 2 + 256 * MIB, "the backups and WAL of benchdb, compressed")]


def backups(info: list, stanza: str) -> dict[str, dict]:
    """`pgbackrest info --output=json`'s backups of `stanza` by label: type, pgBackRest's own
    seconds, the database's size (`db_bytes`), what this backup read of it (`read_bytes`), the
    bytes this backup added to the repository (`added_bytes`) and the repository size of the set
    it needs to restore, with the backups it references (`set_bytes`; absent with block
    incremental, None then)."""
    out = {}
    for s in info or []:
        if s.get("name") != stanza:
            continue
        for b in s.get("backup") or []:
            inf, ts = b.get("info") or {}, b.get("timestamp") or {}
            repo = inf.get("repository") or {}
            out[b["label"]] = {
                "label": b["label"], "type": b.get("type"),
                "seconds": (ts["stop"] - ts["start"]) if ts.get("start") and ts.get("stop") else None,
                "db_bytes": inf.get("size"), "read_bytes": inf.get("delta"),
                "added_bytes": repo.get("delta"), "set_bytes": repo.get("size")}
    return out


def new_backup(before: dict[str, dict], after: dict[str, dict], kind: str) -> dict:
    """The one backup of `kind` in `after` that `before` lacks; exits saying what is amiss when
    there is none (e.g. the job was skipped: a scheduled one held its lock) or several."""
    new = [b for label, b in after.items() if label not in before and b["type"] == kind]
    if len(new) != 1:
        others = sorted(label for label in after if label not in before)
        sys.exit(f"expected one new {kind} backup of {DB} in the repository, found "
                 f"{len(new)} (new labels: {', '.join(others) or 'none'}); a scheduled job "
                 "may have run at the same time: run the bench again")
    return new[0]


def archived(last: str, segment: str) -> bool:
    """Whether pg_stat_archiver's last_archived_wal is `segment` or a later WAL segment (names
    of 24 hex digits sort in WAL order; a .history or .partial file says nothing here)."""
    return bool(re.fullmatch(r"[0-9A-F]{24}", last)) and last >= segment


def restore_seconds(stderr: str) -> float | None:
    """The restore exec's own time, from `invoke restore`'s "restored and promoted in 12.3s"."""
    m = re.search(r"restored and promoted in ([0-9.]+)s", stderr)
    return float(m.group(1)) if m else None


def table(r: dict) -> list[str]:
    """The report: one row per measured step, with ratios to pg_dump | gzip."""
    dump_s, dump_b = r["dump"]["seconds"], r["dump"]["bytes"]

    def ratio(x, y):
        return f"{x / y:.2f}x" if x is not None and y else "-"

    def secs(x):
        return "-" if x is None else f"{x:.1f} s"

    def row(name, seconds, nbytes, note=""):
        shown = "-" if nbytes is None else size(nbytes)
        return (f"{name:<38} {secs(seconds):>9} {shown:>11} {ratio(seconds, dump_s):>7} "
                f"{ratio(nbytes, dump_b):>7}   {note}").rstrip()
    full, incr, rest = r["full"], r["incr"], r["restore"]
    return [
        f"benchdb: pgbench -i -s {r['scale']} in {r['init_seconds']:.1f} s, "
        f"{size(r['benchdb_bytes'])} (the whole cluster {size(r['cluster_bytes'])})",
        f"{'':<38} {'time':>9} {'size':>11} {'time':>7} {'size':>7}   (ratios to pg_dump | gzip)",
        row("pg_dump | gzip (benchdb)", dump_s, dump_b),
        row("full backup (invoke backup)", full["task_seconds"], full["added_bytes"],
            f"pgBackRest {secs(full['seconds'])}, read {size(full['read_bytes'] or 0)}"),
        row(f"incr after {r['updates']} row updates", incr["task_seconds"], incr["added_bytes"],
            f"pgBackRest {secs(incr['seconds'])}, read {size(incr['read_bytes'] or 0)}; to the "
            f"full: {ratio(incr['task_seconds'], full['task_seconds'])} time, "
            f"{ratio(incr['added_bytes'], full['added_bytes'])} size"),
        row("point-in-time restore (invoke restore)", rest["task_seconds"], None,
            f"the restore exec {secs(rest['exec_seconds'])}; to the full backup: "
            f"{ratio(rest['task_seconds'], full['task_seconds'])} time"),
        f"repository: backups {size(r['repo_after'])} (were {size(r['repo_before'])}), WAL archive "
        f"+{size(r['wal_added'])} during the run (pgbench -i's WAL, mostly)",
        f"app database: {r['app']}",
    ]


# --- on the servers --------------------------------------------------------------------------

def on(host: str, command: str, seconds: float) -> str:
    """A root command on `host`, stopped there after `seconds` as well (killing the host side's
    nsenter on a timeout would leave it running)."""
    return sh(host, f"cd / && timeout -k 10 {seconds:.0f} {command}", timeout=seconds + 30).stdout


def info() -> list:
    text = on(REPO_HOST, f"runuser -u pgbackrest -- pgbackrest --stanza={DB} --output=json info", 120)
    return json.loads(text)


def archive_bytes() -> int:
    return int(on(REPO_HOST, f"du -sb {REPO_PATH}/archive/{DB}", 120).split()[0])


def wait_archived(seconds: float) -> None:
    """Close the current WAL segment and wait until PostgreSQL archived it (a backup waits for
    its own segments only `archive-timeout`, 60 s: the queue pgbench -i left must be gone)."""
    segment = psql(DB, "SELECT pg_walfile_name(pg_switch_wal())")
    last = "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"
    try:
        wait_for(f"WAL segment {segment} archived", lambda: archived(psql(DB, last), segment),
                 seconds, every=1)
    except AssertionError as e:
        sys.exit(f"{e}: {psql(DB, 'SELECT * FROM pg_stat_archiver')}")


def task(*args: str, seconds: float) -> tuple[float, str]:
    """`invoke ARGS --env local` as a user runs it: wall time and its stderr; exits on a failure."""
    t0 = time.monotonic()
    r = invoke(*args, "--env", "local", check=False, timeout=seconds)
    if r.returncode != 0:
        sys.exit(f"invoke {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return round(time.monotonic() - t0, 2), r.stderr


def drop_benchdb() -> None:
    psql(DB, f"DROP DATABASE IF EXISTS {BENCHDB} WITH (FORCE)")
    on(DB, f"rm -f {DUMP}", 60)


def cleanup(app: str) -> str | None:
    """Drop benchdb and the dump, then compare the app database with its fingerprint from the
    start. Says on stderr what went wrong; returns that sentence, or None when all is well."""
    try:
        drop_benchdb()
        now = psql(DB, FINGERPRINT, db="app")
    except Exception as e:          # a cleanup reports it; the caller's own error goes on
        problem = f"cleaning up on {DB} failed (drop {BENCHDB} by hand if it is still there): {e}"
    else:
        if now == app:
            return None
        problem = (f"the app database is not what it was before the bench (tables|rows|digest "
                   f"{app} then, {now} now): something wrote to it meanwhile, and the restore "
                   "took back what it wrote after the target time")
    print(problem, file=sys.stderr, flush=True)
    return problem


def measure(a: argparse.Namespace, major: int, r: dict) -> None:
    bin_ = f"/usr/lib/postgresql/{major}/bin"
    heavy = max(600, 10 * a.scale)                     # seconds for a step over all of benchdb
    t0 = time.monotonic()
    psql(DB, f"CREATE DATABASE {BENCHDB}")
    on(DB, f"runuser -u postgres -- {bin_}/pgbench -i -q -s {a.scale} {BENCHDB}", heavy)
    r["init_seconds"] = round(time.monotonic() - t0, 2)
    r["benchdb_bytes"] = int(psql(DB, f"SELECT pg_database_size('{BENCHDB}')"))
    r["cluster_bytes"] = int(psql(DB, "SELECT sum(pg_database_size(oid)) FROM pg_database"))
    print(f"benchdb made in {r['init_seconds']:.1f} s: {size(r['benchdb_bytes'])}", flush=True)

    dump = f"runuser -u postgres -- {bin_}/pg_dump -d {BENCHDB} | gzip > {DUMP}"
    t0 = time.monotonic()
    on(DB, f"bash -o pipefail -c {shlex.quote(dump)}", heavy)
    r["dump"] = {"seconds": round(time.monotonic() - t0, 2),
                 "bytes": int(on(DB, f"stat -c %s {DUMP}", 60))}
    on(DB, f"rm -f {DUMP}", 60)
    print(f"pg_dump | gzip: {r['dump']['seconds']:.1f} s, {size(r['dump']['bytes'])}", flush=True)

    wait_archived(heavy)
    before = info()
    seconds, _ = task("backup", "--limit", DB, "--kind", "full", seconds=heavy)
    after = info()
    r["full"] = dict(new_backup(backups(before, DB), backups(after, DB), "full"), task_seconds=seconds)
    r["repo_before"] = pgbackrest_summary(before, DB).get("repo_size_bytes", 0)
    print(f"full backup: {seconds:.1f} s, +{size(r['full']['added_bytes'] or 0)}", flush=True)

    psql(DB, f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= {a.updates}",
         db=BENCHDB)
    balance = psql(DB, "SELECT sum(abalance) FROM pgbench_accounts", db=BENCHDB)
    wait_archived(heavy)
    seconds, _ = task("backup", "--limit", DB, "--kind", "incr", seconds=heavy)
    last = info()
    r["incr"] = dict(new_backup(backups(after, DB), backups(last, DB), "incr"), task_seconds=seconds)
    r["repo_after"] = pgbackrest_summary(last, DB).get("repo_size_bytes", 0)
    print(f"incremental: {seconds:.1f} s, +{size(r['incr']['added_bytes'] or 0)}", flush=True)

    # the target: after everything above; then a write the restore must undo (recovery stops at
    # the first commit after the target, so there must be one)
    time.sleep(1.1)
    at = db_now(DB)
    time.sleep(1.1)
    psql(DB, f"UPDATE pgbench_accounts SET abalance = abalance + {AFTER_TARGET} WHERE aid = 1",
         db=BENCHDB)
    seconds, stderr = task("restore", "--limit", DB, "--at", at, "--yes", seconds=heavy)
    r["restore"] = {"task_seconds": seconds, "exec_seconds": restore_seconds(stderr), "at": at}
    got = psql(DB, "SELECT sum(abalance) FROM pgbench_accounts", db=BENCHDB)
    if got != balance:
        sys.exit(f"the restore to {at} did not bring benchdb back to that time: the balances add "
                 f"up to {got}, {balance} then")
    print(f"point-in-time restore to {at}: {seconds:.1f} s", flush=True)
    r["wal_added"] = archive_bytes() - r["wal_before"]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    df = "df -B1 --output=target,avail "
    for host, needs in ((DB, db_needs(a.scale)), (REPO_HOST, repo_needs(a.scale))):
        problem = disk_problem(host, on(host, df + " ".join(p for p, _, _ in needs), 60), needs)
        if problem:
            sys.exit(problem)
    major = int(psql(DB, "SHOW server_version_num")) // 10000
    if psql(DB, f"SELECT 1 FROM pg_database WHERE datname = '{BENCHDB}'") == "1":
        print(f"dropping the {BENCHDB} an earlier run left", flush=True)
        drop_benchdb()
    app = psql(DB, FINGERPRINT, db="app")
    r: dict = {"scale": a.scale, "updates": a.updates, "wal_before": archive_bytes()}
    try:
        measure(a, major, r)
    finally:                 # never hides why measure() stopped: says what it finds, then goes on
        harmed = cleanup(app)
    if harmed:
        sys.exit(harmed)
    tables, rows, _ = app.split("|")
    r["app"] = f"{tables} tables, {rows} rows: the same content before and after"
    print("\n".join(table(r)))
    print(json.dumps({k: v for k, v in r.items() if k != "app"}))


if __name__ == "__main__":
    main()

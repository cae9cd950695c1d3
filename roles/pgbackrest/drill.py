"""Restore drills: prove that a backup restores, without touching the live data (standard library
only: it runs under the server's python3, through backupjob.py, which records the result).

    drill.py pg --stanza S --bin /usr/lib/postgresql/17/bin --port P --scratch DIR [--expect-db NAME]...
    drill.py files --scratch DIR PATH...

`pg` (as the repository host's pgbackrest user): restores the stanza's latest backup into a
scratch folder with its own port and socket (pgBackRest --reset-pg1-host: a local restore on the
repository host, to the backup's consistent point), starts it, checks every database with
pg_amcheck, counts the tables and rows of each database (in the result, for a comparison with
what the database held at backup time), and fails when a database the inventory declares is
missing; the scratch cluster is stopped and removed whatever happened.

`files` (root, with restic's environment): restores the latest snapshot of the paths into a
scratch folder and compares every restored file with the live one that has not changed since
(same size and modification time): a differing checksum is a failure. Files changed since the
snapshot are counted, not compared. The scratch folder is removed afterwards.

The last line printed is `drill result: {json}` (the journal keeps it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def _must(argv, what: str, **kw) -> str:
    r = _run(argv, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def scratch_conf(scratch: str, port: int) -> str:
    """A configuration for the scratch cluster: Debian keeps a cluster's configuration in /etc,
    so the restored folder has none. No TCP, a socket in the scratch folder, trust for local
    connections only (the socket is in a folder only its owner can enter). hot_standby off:
    nothing connects before recovery ended (pg_ctl -w returns at the consistent point, so pg()
    waits for the promotion: wait_for_promotion)."""
    return (f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{scratch}'\n"
            f"hba_file = '{scratch}/drill_hba.conf'\nident_file = '{scratch}/drill_ident.conf'\n"
            "hot_standby = off\nshared_buffers = 32MB\nmax_connections = 100\n"
            "archive_mode = off\nlogging_collector = off\n")


PROMOTE_TIMEOUT = 900          # seconds the restored cluster may take to replay WAL and promote


def cluster_state(controldata: str) -> str | None:
    """`Database cluster state` from pg_controldata's output (LANG=C), e.g. "in production"."""
    for line in controldata.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Database cluster state":
            return value.strip()
    return None


def _probe(bindir: str, data: str, sock: str, port: int) -> tuple[bool, str]:
    """(ready, what it is doing): ready once recovery ended (the control file says "in
    production") and the server accepts connections (pg_isready exit 0). Raises when the
    server is gone (a failed recovery shuts it down)."""
    if _run([f"{bindir}/pg_ctl", "-D", data, "status"]).returncode != 0:
        log = os.path.join(sock, "drill.log")
        tail = open(log, encoding="utf-8", errors="replace").read()[-2000:] if os.path.exists(log) else ""
        raise RuntimeError(f"the restored cluster stopped during its recovery: {tail.strip()}")
    state = cluster_state(_run([f"{bindir}/pg_controldata", "-D", data],
                               env={**os.environ, "LANG": "C", "LC_ALL": "C"}).stdout)
    if state != "in production":
        return False, f"cluster state {state or 'unknown'}"
    ready = _run([f"{bindir}/pg_isready", "-q", "-h", sock, "-p", str(port)]).returncode == 0
    return ready, "in production" if ready else "in production, not accepting connections yet"


def wait_for_promotion(probe, timeout: float, sleep=time.sleep, clock=time.monotonic) -> None:
    """Wait until probe() says ready. `pg_ctl -w start` returns once the restored cluster is
    consistent, while it still replays WAL up to the backup's end and before it promotes; with
    hot_standby off nothing can connect until then ("Hot standby mode is disabled")."""
    deadline, doing = clock() + timeout, "not probed"
    while True:
        ready, doing = probe()
        if ready:
            return
        if clock() >= deadline:
            raise RuntimeError(f"the restored cluster did not finish its recovery within "
                               f"{timeout:g} s ({doing})")
        sleep(0.5)


def pg(a) -> dict:
    data, sock = os.path.join(a.scratch, "data"), a.scratch
    shutil.rmtree(a.scratch, ignore_errors=True)
    os.mkdir(a.scratch, 0o700)            # the socket's folder: only this user gets in
    os.mkdir(data, 0o700)
    started = False
    try:
        _must(["pgbackrest", f"--stanza={a.stanza}", "--reset-pg1-host", f"--pg1-path={data}",
               "--type=immediate", "--target-action=promote", "--archive-mode=off",
               "--log-level-console=warn", "restore"], "pgbackrest restore")
        # the restore_command pgBackRest wrote would read the repository's pg1-host (the
        # database server); here the WAL comes from the repository on this host. The last
        # setting in postgresql.auto.conf wins.
        with open(os.path.join(data, "postgresql.auto.conf"), "a") as f:
            f.write(f"restore_command = 'pgbackrest --stanza={a.stanza} --reset-pg1-host "
                    f"--pg1-path={data} archive-get %f \"%p\"'\n")
        with open(os.path.join(sock, "drill.conf"), "w") as f:
            f.write(scratch_conf(sock, a.port))
        with open(os.path.join(sock, "drill_hba.conf"), "w") as f:
            f.write("local all all trust\n")
        open(os.path.join(sock, "drill_ident.conf"), "w").close()
        _must([f"{a.bin}/pg_ctl", "-D", data, "-w", "-t", "900", "-l",
               os.path.join(sock, "drill.log"), "-o", f"-c config_file={sock}/drill.conf",
               "start"], "starting the restored cluster")
        started = True
        wait_for_promotion(lambda: _probe(a.bin, data, sock, a.port), PROMOTE_TIMEOUT)
        psql = ["psql", "-X", "-h", sock, "-p", str(a.port), "-U", "postgres", "-At"]
        dbs = _must(psql + ["-d", "postgres", "-c", "SELECT datname FROM pg_database WHERE "
                            "datallowconn AND NOT datistemplate ORDER BY 1"], "listing databases").split()
        missing = [d for d in a.expect_db if d not in dbs]
        if missing:
            raise RuntimeError(f"the restored cluster has no database {', '.join(missing)}")
        _must([f"{a.bin}/pg_amcheck", "-h", sock, "-p", str(a.port), "-U", "postgres",
               "--install-missing", "--all"], "pg_amcheck")
        counts = {}
        for d in dbs:
            # exact counts: the scratch copy is small enough and nobody else uses it
            sql = ("SELECT format('SELECT %L, count(*) FROM %I.%I', n.nspname || '.' || c.relname, "
                   "n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = "
                   "c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN "
                   "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'")
            queries = _must(psql + ["-d", d, "-c", sql], f"listing the tables of {d}").splitlines()
            rows = {}
            for q in queries:
                name, n = _must(psql + ["-d", d, "-c", q], f"counting {d}").strip().rsplit("|", 1)
                rows[name] = int(n)
            counts[d] = {"tables": len(rows), "rows": sum(rows.values())}
        return {"databases": counts}
    finally:
        if started:
            _run([f"{a.bin}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"])
        shutil.rmtree(a.scratch, ignore_errors=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compare_tree(restored_root: str, live_root: str = "/") -> dict:
    """Every regular file under restored_root against the same path under live_root."""
    compared, changed, gone, bad = 0, 0, 0, []
    for folder, _, names in os.walk(restored_root):
        for name in names:
            got = os.path.join(folder, name)
            if os.path.islink(got) or not os.path.isfile(got):
                continue
            live = os.path.join(live_root, os.path.relpath(got, restored_root))
            try:
                st_live, st_got = os.lstat(live), os.lstat(got)
            except FileNotFoundError:
                gone += 1
                continue
            if st_live.st_size != st_got.st_size or int(st_live.st_mtime) != int(st_got.st_mtime):
                changed += 1
                continue
            compared += 1
            if _sha256(live) != _sha256(got):
                bad.append(live)
    return {"compared": compared, "changed_since": changed, "gone_since": gone, "differ": bad}


def files(a) -> dict:
    shutil.rmtree(a.scratch, ignore_errors=True)
    os.makedirs(a.scratch, mode=0o700)
    try:
        include = [x for p in a.paths for x in ("--include", p)]
        _must(["restic", "restore", "latest", "--tag", "provisioner", "--target", a.scratch,
               *include], "restic restore")
        result = compare_tree(a.scratch)
        if result["differ"]:
            raise RuntimeError(f"{len(result['differ'])} restored file(s) differ from unchanged "
                               f"live ones: {', '.join(result['differ'][:10])}")
        if not result["compared"]:
            raise RuntimeError("no restored file could be compared (nothing unchanged since the "
                               "snapshot, or nothing restored)")
        return result
    finally:
        shutil.rmtree(a.scratch, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="drill.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("pg")
    g.add_argument("--stanza", required=True)
    g.add_argument("--bin", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--scratch", required=True)
    g.add_argument("--expect-db", action="append", default=[])
    f = sub.add_parser("files")
    f.add_argument("--scratch", required=True)
    f.add_argument("paths", nargs="+")
    a = p.parse_args(argv)
    started = time.time()
    try:
        result = pg(a) if a.cmd == "pg" else files(a)
    except RuntimeError as e:
        print(f"drill FAILED: {e}", file=sys.stderr)
        return 1
    result["seconds"] = round(time.time() - started, 1)
    print("drill result: " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

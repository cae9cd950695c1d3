"""One scheduled backup job, as its systemd service runs it (standard library only: it runs under
the server's python3, as root).

    backupjob.py run --job NAME --lock NAME [--user U] [--prepare ARGV_JSON] [--stanza S]
                     [--size-cmd ARGV_JSON] [--max-age-seconds N] [--drill] -- ARGV...

(the `--` matters: the job's own command has options of its own)
    backupjob.py status [--pgbackrest-user U] [--restic-env FILE]

`run` takes a lock (a run never overlaps the previous one of the same lock: it is skipped and
says so in the journal), runs the optional prepare command then the job's command as `--user`
with their output going to the journal, and records the result: a JSON status file in
/var/lib/provisioner/backup/ and node exporter textfile metrics (written to a temp file and
renamed, so a scrape never reads half a file). A failure keeps the last success time, prints
one line naming the job, the exit code and the duration, and exits non-zero: systemd marks the
unit failed. With `--stanza`, the size recorded is what `pgbackrest info` says of the latest
backup (bytes added to the repository) and of the repository; with `--size-cmd` (a command
printing JSON with `total_size`, like `restic stats --json --mode raw-data`) it is the
repository's size and how much it grew during the run.

`status` prints every job's status, when each job's timer last fired (`timers`: a job whose
timer never fired is not due yet; see provisioner/backups.py) and, with --pgbackrest-user,
`pgbackrest info`'s JSON, with --restic-env (restic's environment file) `restic snapshots
--json`: what `invoke backup.status` reads in one exec per host.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import re
import subprocess
import sys
import time

STATUS_DIR = "/var/lib/provisioner/backup"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
LOCK_DIR = "/run/lock"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}\Z")
UNIT_DIR = "/etc/systemd/system"       # where the roles write the jobs' timers


def pgbackrest_summary(info: list, stanza: str) -> dict:
    """From `pgbackrest --output=json info`: the stanza's latest backup (label, type, stop time,
    bytes it added to the repository), when its oldest backup ended (the earliest time a restore
    can reach), the newest stop time per backup type, the repository size, and the WAL
    archive range. {} if the stanza is unknown."""
    for s in info or []:
        if s.get("name") != stanza:
            continue
        backups = s.get("backup") or []
        out = {"status": (s.get("status") or {}).get("message"),
               "backups": len(backups),
               "repo_size_bytes": sum((b.get("info") or {}).get("repository", {}).get("delta", 0)
                                      for b in backups)}
        if backups:
            last = backups[-1]
            out.update(last_label=last.get("label"), last_type=last.get("type"),
                       last_added_bytes=(last.get("info") or {}).get("repository", {}).get("delta"),
                       first_stop=(backups[0].get("timestamp") or {}).get("stop"))
        for b in backups:       # the newest backup of each type that ended
            stop = (b.get("timestamp") or {}).get("stop")
            if stop and stop > out.setdefault("last_stop", {}).get(b.get("type"), 0):
                out["last_stop"][b.get("type")] = stop
        archives = [a for a in s.get("archive") or [] if a.get("max")]
        if archives:
            out.update(wal_min=archives[0].get("min"), wal_max=archives[-1].get("max"))
        return out
    return {}


def restic_summary(snapshots: list) -> dict:
    """From `restic snapshots --json`: how many snapshots, and the newest one's id, time (epoch
    seconds) and paths."""
    if not snapshots:
        return {"snapshots": 0}
    newest = max(snapshots, key=lambda s: restic_time(s.get("time")) or 0)   # zones differ
    return {"snapshots": len(snapshots), "latest_id": newest.get("short_id") or newest.get("id", "")[:8],
            "latest_time": restic_time(newest.get("time")), "latest_paths": newest.get("paths") or []}


def restic_time(text: str | None) -> float | None:
    """restic's RFC 3339 times carry nanoseconds, which Python's parser does not take."""
    if not text:
        return None
    from datetime import datetime
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + frac + zone).timestamp()


def env_file(path: str) -> dict:
    """KEY=VALUE lines (systemd's EnvironmentFile as the role writes it: no quoting)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
    return out


def _total_size(argv: list[str], user: str | None) -> int | None:
    r = subprocess.run(_as(user, argv), capture_output=True, text=True)
    try:
        return int(json.loads(r.stdout)["total_size"]) if r.returncode == 0 else None
    except (ValueError, KeyError, TypeError):
        return None


def metrics(job: str, st: dict) -> str:
    """The job's status in node exporter's textfile format, with the names the monitoring role's
    alerts and `invoke status` read (roles/monitoring/rules.py): a backup job's
    provisioner_backup_*{backup="<job>"} with its max_age_seconds, a drill's
    provisioner_restore_drill_*{drill="<job>"}."""
    if st.get("drill"):
        prefix, label = "provisioner_restore_drill_", '{drill="%s"}' % job
        rows = [("ok", "1 if the last drill passed", 1 if st.get("ok") else 0),
                ("last_success_timestamp_seconds", "when a drill last passed", st.get("last_success")),
                ("last_run_timestamp_seconds", "when the last drill ended", st.get("finished")),
                ("last_duration_seconds", "how long the last drill took", st.get("duration"))]
    else:
        prefix, label = "provisioner_backup_", '{backup="%s"}' % job
        rows = [("last_success_timestamp_seconds", "when the job last succeeded", st.get("last_success")),
                ("max_age_seconds", "how old its last success may get", st.get("max_age_seconds")),
                ("last_run_timestamp_seconds", "when the job last ended", st.get("finished")),
                ("last_run_success", "1 if the last run succeeded", 1 if st.get("ok") else 0),
                ("last_duration_seconds", "how long the last run took", st.get("duration")),
                ("last_size_bytes", "bytes the last successful run added", st.get("size_bytes")),
                ("repository_size_bytes", "bytes the repository holds", st.get("repo_size_bytes"))]
    out = []
    for name, text, value in rows:
        if value is None:
            continue
        out += [f"# HELP {prefix}{name} {text}", f"# TYPE {prefix}{name} gauge",
                f"{prefix}{name}{label} {value}"]
    return "\n".join(out) + "\n"


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _as(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _status_path(job: str) -> str:
    return f"{STATUS_DIR}/{job}.json"


def _previous(job: str) -> dict:
    try:
        with open(_status_path(job), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def record(job: str, st: dict) -> None:
    _write_atomic(_status_path(job), json.dumps(st, sort_keys=True) + "\n")
    _write_atomic(f"{TEXTFILE_DIR}/backup_{job}.prom", metrics(job, st))


def run(a) -> int:
    os.makedirs(LOCK_DIR, exist_ok=True)
    lock = open(f"{LOCK_DIR}/provisioner-backup-{a.lock}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"backup job {a.job}: skipped, a run holding lock {a.lock} is still going",
              file=sys.stderr)
        return 0
    started = time.time()
    prev = _previous(a.job)
    size_cmd = json.loads(a.size_cmd) if a.size_cmd else None
    before = _total_size(size_cmd, a.user) if size_cmd else None
    rc = 0
    for argv in ([json.loads(a.prepare)] if a.prepare else []) + [a.argv]:
        sys.stdout.flush()
        rc = subprocess.call(_as(a.user, argv))
        if rc != 0:
            break
    finished = time.time()
    st = {"job": a.job, "ok": rc == 0, "exit": rc, "started": round(started, 3),
          "finished": round(finished, 3), "duration": round(finished - started, 3),
          "last_success": round(finished, 3) if rc == 0 else prev.get("last_success"),
          "size_bytes": prev.get("size_bytes"), "repo_size_bytes": prev.get("repo_size_bytes"),
          "max_age_seconds": a.max_age_seconds, "drill": a.drill}
    if rc == 0 and a.stanza:
        info = subprocess.run(_as(a.user, ["pgbackrest", f"--stanza={a.stanza}", "--output=json",
                                           "info"]), capture_output=True, text=True)
        try:
            summary = pgbackrest_summary(json.loads(info.stdout), a.stanza)
            st.update(size_bytes=summary.get("last_added_bytes"),
                      repo_size_bytes=summary.get("repo_size_bytes"))
        except ValueError:
            print(f"backup job {a.job}: pgbackrest info gave no JSON: {info.stderr.strip()}",
                  file=sys.stderr)
    if rc == 0 and size_cmd:
        after = _total_size(size_cmd, a.user)
        st.update(repo_size_bytes=after,
                  size_bytes=None if after is None or before is None else after - before)
    record(a.job, st)
    if rc != 0:
        print(f"backup job {a.job} FAILED: exit {rc} after {st['duration']:.1f}s "
              f"(last success: {_when(st['last_success'])})", file=sys.stderr)
        return rc
    print(f"backup job {a.job}: ok in {st['duration']:.1f}s")
    return 0


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "never"


def timer_triggers(show: str) -> dict:
    """{job: {"last_trigger": unix time or None}} from `systemctl show --timestamp=unix -p Id
    -p LastTriggerUSec` of the jobs' timers (blocks split by blank lines). A timer that never
    fired has an empty (or n/a, or 0) LastTriggerUSec; a value this cannot read leaves the job
    out (no fact: the status stays strict)."""
    out = {}
    for block in show.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        unit, value = props.get("Id", ""), props.get("LastTriggerUSec")
        if not unit.endswith(".timer") or value is None:
            continue
        value = value.strip()
        if value in ("", "n/a", "0"):
            out[unit[:-6]] = {"last_trigger": None}
        elif re.fullmatch(r"@[0-9]+(\.[0-9]+)?", value):
            out[unit[:-6]] = {"last_trigger": float(value[1:])}
    return out


def _timers() -> dict:
    units = sorted(os.path.basename(p) for pattern in ("pgbackrest-*.timer", "restic-*.timer")
                   for p in glob.glob(os.path.join(UNIT_DIR, pattern)))
    if not units:
        return {}
    r = subprocess.run(["systemctl", "show", "--timestamp=unix", "-p", "Id", "-p",
                        "LastTriggerUSec", "--", *units], capture_output=True, text=True)
    return timer_triggers(r.stdout) if r.returncode == 0 else {}


def status(a) -> int:
    jobs = {}
    if os.path.isdir(STATUS_DIR):
        for name in sorted(os.listdir(STATUS_DIR)):
            if name.endswith(".json"):
                jobs[name[:-5]] = _previous(name[:-5])
    out = {"now": time.time(), "jobs": jobs, "timers": _timers()}
    if a.pgbackrest_user:
        info = subprocess.run(_as(a.pgbackrest_user, ["pgbackrest", "--output=json", "info"]),
                              capture_output=True, text=True)
        try:
            out["pgbackrest"] = json.loads(info.stdout)
        except ValueError:
            out["pgbackrest_error"] = (info.stderr or info.stdout).strip()[-2000:]
    if a.restic_env:
        env = {**os.environ, **env_file(a.restic_env)}
        snaps = subprocess.run(["restic", "snapshots", "--json", "--no-lock"], capture_output=True,
                               text=True, env=env)
        try:
            out["restic"] = json.loads(snaps.stdout) if snaps.returncode == 0 else None
        except ValueError:
            out["restic"] = None
        if out["restic"] is None:
            out["restic_error"] = (snaps.stderr or snaps.stdout).strip()[-2000:]
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="backupjob.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--job", required=True)
    r.add_argument("--lock", required=True)
    r.add_argument("--user")
    r.add_argument("--prepare", help="a command (JSON argv) run first, as --user")
    r.add_argument("--stanza")
    r.add_argument("--size-cmd", help="a command (JSON argv) printing JSON with total_size")
    r.add_argument("--max-age-seconds", type=float, help="how old its last success may get "
                   "(for the alerts and `invoke status`)")
    r.add_argument("--drill", action="store_true", help="a restore drill: its own metric names")
    r.add_argument("argv", nargs="+")
    s = sub.add_parser("status")
    s.add_argument("--pgbackrest-user")
    s.add_argument("--restic-env")
    a = p.parse_args(argv)
    if a.cmd == "run":
        for name in (a.job, a.lock):
            if not NAME_RE.match(name):
                p.error(f"bad job or lock name {name!r}")
        return run(a)
    return status(a)


if __name__ == "__main__":
    sys.exit(main())

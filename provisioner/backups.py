"""What `invoke backup`, `invoke backup.status` and `invoke restore` decide, without a server:
which units run where, how old each job's last success is, whether a restore time is usable, and
the restore's script. provisioner/cli/backup.py does the talking to servers.

The inventory says where everything is: hosts with the pgbackrest role are either the repository
host (`pgbackrest_repo_host`, which runs every backup: one systemd unit per stanza and kind) or
a database server (one stanza, named after the host); hosts with the restic role are either its
SFTP repository host or a source host, which runs its own restic jobs."""
from __future__ import annotations

import json as jsonlib
import shlex
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from typing import TYPE_CHECKING

from provisioner import humanize
from provisioner.errors import InputError, Problem
from provisioner.roles import REPO_ROOT

if TYPE_CHECKING:            # annotations only: `invoke --list` loads this module
    from provisioner.inventory import Host, Inventory

KINDS = ("full", "diff", "incr")
# a backup of a bigger kind also makes a smaller one fresh: a full is a diff and an incr too
COVERED_BY = {"full": ("full",), "diff": ("full", "diff"), "incr": ("full", "diff", "incr")}
JOB_TOOL = "/usr/local/lib/provisioner/backupjob.py"
RESTIC_JOBS = ("backup", "check")         # what backup.status watches (forget is housekeeping)
RESTIC_ENV = "/etc/restic/env"


@cache
def job_tool() -> dict:
    """The namespace of roles/pgbackrest/backupjob.py, the job tool the servers run: its own
    parsers of `pgbackrest info` and `restic snapshots` (the ones its metrics use) are read
    here. Run when first needed: runpy compiles it anew each time, and every `invoke`
    command (--list too) loads this module."""
    import runpy
    return runpy.run_path(str(REPO_ROOT / "roles" / "pgbackrest" / "backupjob.py"),
                          run_name="backupjob")


def pgbackrest_summary(info: list, stanza: str) -> dict:
    return job_tool()["pgbackrest_summary"](info, stanza)


def restic_summary(snapshots: list) -> dict:
    return job_tool()["restic_summary"](snapshots)


def restic_time(text: str | None) -> float | None:
    return job_tool()["restic_time"](text)


@dataclass(frozen=True)
class Stanza:
    name: str            # the database server's inventory name
    repo: str            # its repository host's inventory name


def stanzas(inv: Inventory) -> list[Stanza]:
    """Every database server the pgbackrest role backs up, with its repository host."""
    out = []
    for name in inv.hosts:
        if "pgbackrest" not in inv.roles_for(name):
            continue
        v = inv.hostvars(name)
        if v["pgbackrest_repo_host"] != name:
            out.append(Stanza(name, v["pgbackrest_repo_host"]))
    return out


def stanza_of(inv: Inventory, host: str) -> Stanza | None:
    """The stanza of database server `host` when the env's pgbackrest role backs it up."""
    return next((s for s in stanzas(inv) if s.name == host), None)


def first_backup_limit(inv: Inventory, stanza: Stanza) -> int:
    """The seconds a deploy waits for the stanza's first full backup: the repository host's
    pgbackrest_first_backup_timeout, checked as role pgbackrest checks it (InputError naming
    where it was set, before any server is touched)."""
    from provisioner.api import VarError
    from roles.pgbackrest import first_backup_timeout
    try:
        return first_backup_timeout(inv.hostvars(stanza.repo))
    except VarError as e:
        file, line, key = inv.where(stanza.repo, e.var)
        raise InputError([Problem(file, line, key, e.problem, e.fix)]) from None


def no_backups(inv: Inventory, what: str) -> InputError:
    return InputError([Problem(inv.path, None, "roles", f"no host of env {inv.env!r} has the "
                               f"pgbackrest role, so there is nothing to {what}",
                               "give the repository host and the database servers the "
                               "pgbackrest role (see roles/pgbackrest/defaults.yml)")])


def selected(inv: Inventory, hosts: list[Host]) -> list[Stanza]:
    """The stanzas `--limit` reaches: a database server's own, or every stanza of a selected
    repository host."""
    names = {h.name for h in hosts}
    return [s for s in stanzas(inv) if s.name in names or s.repo in names]


def restic_sources(inv: Inventory, hosts: list[Host] | None = None) -> list[str]:
    """Source hosts of the restic role (in `hosts`, or all): those run restic jobs."""
    names = None if hosts is None else {h.name for h in hosts}
    return [n for n in inv.hosts if "restic" in inv.roles_for(n)
            and inv.hostvars(n)["restic_repo_host"] != n and (names is None or n in names)]


def units(stanza: Stanza, kind: str) -> str:
    return f"pgbackrest-{stanza.name}-{kind}"


def verify_units(inv: Inventory, hosts: list[Host]) -> dict[str, list[str]]:
    """{host: drill units} for `invoke backup.verify`."""
    units_: dict[str, list[str]] = {}
    for s in selected(inv, hosts):
        if inv.hostvars(s.repo)["pgbackrest_drill"]:
            units_.setdefault(s.repo, []).append(units(s, "verify"))
    for name in restic_sources(inv, hosts):
        if inv.hostvars(name)["restic_drill"]:
            units_.setdefault(name, []).append("restic-verify")
    return units_


def output(result) -> str:
    """A command's stdout and stderr as text, for an error."""
    return (result.stdout + result.stderr).decode("utf-8", "replace").strip()


def start_unit(conn, unit: str) -> tuple[float, str | None]:
    """Start job `unit` through a connection the caller holds and wait for it (a oneshot:
    `systemctl start` returns when the job ended). Returns (seconds, None) or (seconds, what
    failed with the end of the unit's journal)."""
    r = conn.run(["systemctl", "start", f"{unit}.service"])
    if r.ok:
        return r.seconds, None
    return r.seconds, f"{output(r) or 'failed'}\n{_journal(conn, unit)}"


def _journal(conn, unit: str) -> str:
    """The end of the unit's journal, for an error."""
    log = conn.run(["journalctl", "-u", f"{unit}.service", "-n", "15", "--no-pager", "-o", "cat"])
    return output(log)


# A unit waited for in bounded polls (run_unit): one exec waits on the server at most
# UNIT_POLL seconds, looking at the unit every UNIT_LOOK seconds there (a local systemctl, no
# round trip), and returns as soon as it ended.
UNIT_POLL = 30
UNIT_LOOK = 3
UNIT_PROPS = ("Job", "ActiveState", "SubState", "Result", "ExecMainStatus")


def unit_wait_script(unit: str, wait: int, start: bool = False) -> list[str]:
    """argv of one exec: (with `start`) queue the unit's start without waiting for it, then
    wait up to `wait` seconds for it to end; prints the unit's state (`systemctl show`). A
    oneshot keeps its start job until it ended, so a queued start is never taken for the end
    of an earlier run."""
    service = f"{unit}.service"
    show = shlex.join(["systemctl", "show", *[f"--property={p}" for p in UNIT_PROPS], "--",
                       service])
    begin = shlex.join(["systemctl", "start", "--no-block", "--", service]) + " || exit\n" \
        if start else ""
    script = f"""{begin}end=$(( $(date +%s) + {int(wait)} ))
while :; do
  s=$({show}) || exit
  case "$s" in
    *Job=[0-9]*|*ActiveState=activating*|*ActiveState=deactivating*|*ActiveState=reloading*) ;;
    *) break ;;
  esac
  [ "$(date +%s)" -lt "$end" ] || break
  sleep {UNIT_LOOK}
done
printf '%s\\n' "$s"
"""
    return ["sh", "-c", script]


def unit_state(show: str) -> tuple[str, str]:
    """("running" | "ok" | "failed", what systemd says) from unit_wait_script's output."""
    props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    active, result = props.get("ActiveState", ""), props.get("Result", "")
    said = (f"{active or '?'} ({props.get('SubState') or '?'}), result {result or '?'}, exit "
            f"status {props.get('ExecMainStatus') or '?'}")
    if props.get("Job", "").strip() not in ("", "0") \
            or active in ("activating", "deactivating", "reloading"):
        return "running", said
    if active == "failed" or result not in ("success", "") or not active:
        return "failed", said
    return "ok", said


@dataclass(frozen=True)
class UnitRun:
    state: str            # ok; failed (problem: what, and the journal's end); running (at the
    seconds: float        # limit: it goes on); unknown (a poll failed: it may still run)
    problem: str | None = None


def run_unit(conn, unit: str, limit: float, progress=None, clock=None) -> UnitRun:
    """Start job `unit` (a oneshot) and wait for it in bounded polls: no exec lasts longer than
    UNIT_POLL seconds, so the host's command timeout never bounds the job, and `limit` (seconds)
    bounds the wait. progress(seconds) after each poll that found it running. At the limit the
    unit goes on running (state "running"); a failed unit's problem ends with its journal."""
    clock = clock or time.monotonic
    t0 = clock()
    r = conn.run(unit_wait_script(unit, max(1, min(UNIT_POLL, int(limit))), start=True),
                 timeout=UNIT_POLL + 60)
    started = False
    while True:
        seconds = clock() - t0
        if not r.ok and not started:
            return UnitRun("failed", seconds, f"{output(r) or 'failed'}\n{_journal(conn, unit)}")
        if not r.ok:
            return UnitRun("unknown", seconds, f"reading the state of {unit}.service failed "
                                               f"(exit {r.rc}): {output(r)}")
        started = True
        state, said = unit_state(r.stdout.decode("utf-8", "replace"))
        if state == "failed":
            return UnitRun(state, seconds, f"{unit}.service {said}\n{_journal(conn, unit)}")
        if state == "ok" or seconds >= limit:
            return UnitRun(state, seconds)
        if progress is not None:
            progress(seconds)
        wait = max(1, min(UNIT_POLL, int(limit - seconds)))
        r = conn.run(unit_wait_script(unit, wait), timeout=UNIT_POLL + 60)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError([Problem("command line", None, "--kind", f"{kind!r} is not a backup kind",
                                  "pass --kind full, diff or incr (incr makes a full backup "
                                  "when the stanza has none yet)")])
    return kind


# --- status -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    host: str             # the database server
    kind: str
    last_success: float | None
    age_s: float | None
    max_age_h: float
    size_bytes: int | None
    repo_size_bytes: int | None
    last_ok: bool | None
    detail: str           # PostgreSQL: the newest archived WAL segment; restic: snapshots
    problem: str | None   # why the row is red; None when green
    due: bool = True      # False: a check job whose timer has not fired yet (not_yet_due)

    @property
    def ok(self) -> bool:
        return self.problem is None


def _problem(last: float | None, age: float | None, max_h: float, st: dict) -> str | None:
    if last is None:
        return "never succeeded"
    if age > max_h * 3600:
        return f"older than {max_h:g} h"
    if st.get("ok") is False:
        return f"last run failed (exit {st.get('exit')})"
    return None


def not_yet_due(st: dict, timer: dict | None) -> bool:
    """A check job (restore drill, restic check) that never ran, neither by hand nor by its
    timer, which has not fired yet: right after the backups are set up a weekly drill is not
    late, and a status that stayed red for a week would teach users to ignore it. Once its
    timer fired, a drill with no success is red; so is one whose timer the server does not
    report (no fact, no benefit of the doubt)."""
    return not st and timer is not None and timer.get("last_trigger") is None


def _job_row(host: str, kind: str, st: dict, now: float, max_h: float, detail: str,
             timer: dict | None = None) -> Row:
    """A row from a job's status file and its timer (drills, restic check)."""
    last = st.get("last_success")
    age = None if last is None else max(0.0, now - last)
    if not_yet_due(st, timer):
        return Row(host, kind, None, None, max_h, None, None, None, detail, None, due=False)
    return Row(host, kind, last, age, max_h, st.get("size_bytes"), st.get("repo_size_bytes"),
               st.get("ok"), detail, _problem(last, age, max_h, st))


def status_rows(inv: Inventory, repo: str, answer: dict, wanted: list[Stanza]) -> list[Row]:
    """One row per stanza and kind of `repo`, from its `backupjob.py status` answer (the
    server's clock, the jobs' status files, `pgbackrest info`)."""
    now = answer["now"]
    v = inv.hostvars(repo)
    limits = v["pgbackrest_max_age_hours"]
    info = answer.get("pgbackrest") or []
    rows = []
    for s in [s for s in wanted if s.repo == repo]:
        summary = pgbackrest_summary(info, s.name)
        for kind in KINDS:
            st = answer["jobs"].get(units(s, kind)) or {}
            stops = [summary.get("last_stop", {}).get(k) for k in COVERED_BY[kind]]
            last = max([t for t in stops + [st.get("last_success")] if t], default=None)
            age = None if last is None else max(0.0, now - last)
            problem = _problem(last, age, limits[kind], st)
            if answer.get("pgbackrest_error"):
                problem = f"pgbackrest info failed: {answer['pgbackrest_error']}"
            rows.append(Row(s.name, kind, last, age, limits[kind], st.get("size_bytes"),
                            summary.get("repo_size_bytes"), st.get("ok"),
                            "WAL " + (summary.get("wal_max") or "-"), problem))
        if v["pgbackrest_drill"]:
            job = units(s, "verify")
            rows.append(_job_row(s.name, "verify", answer["jobs"].get(job) or {}, now,
                                 v["pgbackrest_drill_max_age_hours"], "restore drill",
                                 (answer.get("timers") or {}).get(job)))
    return rows


def restic_rows(inv: Inventory, host: str, answer: dict) -> list[Row]:
    """A restic source host's rows (backup, check) from its `backupjob.py status` answer."""
    now = answer["now"]
    v = inv.hostvars(host)
    limits = v["restic_max_age_hours"]
    summary = restic_summary(answer.get("restic") or [])
    detail = f"{summary['snapshots']} snapshots" + (
        f", latest {summary['latest_id']}" if summary.get("latest_id") else "")
    rows = []
    timers = answer.get("timers") or {}
    for job in RESTIC_JOBS:
        st = answer["jobs"].get(f"restic-{job}") or {}
        if job == "check" and not_yet_due(st, timers.get("restic-check")):
            rows.append(_job_row(host, "files check", st, now, limits[job], detail,
                                 timers.get("restic-check")))
            continue
        last = st.get("last_success")
        if job == "backup" and summary.get("latest_time"):
            last = max(last or 0, summary["latest_time"])
        age = None if last is None else max(0.0, now - last)
        problem = _problem(last, age, limits[job], st)
        if job == "backup" and answer.get("restic_error"):
            problem = f"restic snapshots failed: {answer['restic_error']}"
        rows.append(Row(host, f"files {job}", last, age, limits[job], st.get("size_bytes"),
                        st.get("repo_size_bytes"), st.get("ok"), detail, problem))
    if v["restic_drill"]:
        rows.append(_job_row(host, "files verify", answer["jobs"].get("restic-verify") or {},
                             now, limits["verify"], "restore drill", timers.get("restic-verify")))
    return rows


def snapshot_at(snapshots: list, at: datetime | None, host: str) -> dict:
    """The newest snapshot taken at or before `at` (or the newest of all)."""
    usable = [s for s in snapshots if restic_time(s.get("time")) is not None
              and (at is None or restic_time(s["time"]) <= at.timestamp())]
    if not usable:
        when = "" if at is None else f" at or before {at:%Y-%m-%d %H:%M:%S} UTC"
        raise InputError([Problem("command line", None, "--at", f"{host} has no restic "
                                  f"snapshot{when}", "pick a later time, or run `invoke backup "
                                  f"--limit {host}` first")])
    return max(usable, key=lambda s: restic_time(s["time"]))


def check_restore_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or "\n" in path \
            or any(part == ".." for part in path.split("/")):
        raise InputError([Problem("command line", None, what, f"{path!r} is not an absolute path",
                                  f"pass e.g. {what} /srv/shop/shared/uploads")])
    return path.rstrip("/") or "/"


def _or_dash(fn, value) -> str:
    return "-" if value is None else fn(value)


def table(rows: list[Row]) -> str:
    head = ("HOST", "KIND", "LAST SUCCESS (UTC)", "AGE", "MAX", "ADDED", "REPOSITORY", "ARCHIVE",
            "STATE")
    body = [(r.host, r.kind,
             "-" if r.last_success is None else
             datetime.fromtimestamp(r.last_success, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             _or_dash(humanize.age, r.age_s), f"{r.max_age_h:g} h",
             _or_dash(humanize.size, r.size_bytes), _or_dash(humanize.size, r.repo_size_bytes),
             r.detail, "not yet due" if not r.due else "ok" if r.ok else f"STALE: {r.problem}")
            for r in rows]
    return "\n".join(humanize.columns([head, *body]))


# --- restore ------------------------------------------------------------------------------------

def parse_at(text: str, now: datetime) -> datetime:
    """--at: an ISO 8601 time with its zone ('2026-12-01T18:40:00Z', '2026-12-01 19:40:00+01:00'),
    in the past. A time without a zone is refused: a restore must not guess one."""
    def bad(problem: str) -> InputError:
        return InputError([Problem("command line", None, "--at", problem,
                                   "pass a time with its zone, e.g. --at "
                                   "'2026-12-01T18:40:00Z' (UTC) or '2026-12-01 19:40:00+01:00'")])
    try:
        at = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise bad(f"{text!r} is not an ISO 8601 time") from None
    if at.tzinfo is None:
        raise bad(f"{text!r} has no time zone")
    at = at.astimezone(timezone.utc)
    if at > now:
        raise bad(f"{at:%Y-%m-%d %H:%M:%S} UTC is in the future (now: {now:%Y-%m-%d %H:%M:%S} UTC)")
    return at


def _second(at: datetime) -> int:
    """`at` as pgBackRest compares it with a backup's stop time: whole seconds."""
    return int(at.timestamp())


def check_window(at: datetime, summary: dict, stanza: str) -> None:
    """The time must come after the end of the oldest backup still kept (what PITR starts from;
    pgBackRest wants a backup that stopped before the time, in whole seconds)."""
    first = summary.get("first_stop")
    if not summary.get("backups") or first is None:
        raise InputError([Problem("command line", None, "--at", f"stanza {stanza} has no backup "
                                  "yet, so nothing can be restored",
                                  f"run `invoke backup --limit {stanza}` first")])
    if _second(at) <= first:
        start = datetime.fromtimestamp(first, timezone.utc)
        raise InputError([Problem("command line", None, "--at",
                                  f"{at:%Y-%m-%d %H:%M:%S} UTC is before the oldest backup of "
                                  f"{stanza} still kept (it ended {start:%Y-%m-%d %H:%M:%S} UTC)",
                                  "pick a later time, inside the retention window")])


def target(at: datetime) -> str:
    """pgBackRest's --target for a UTC time (PostgreSQL's recovery_target_time syntax)."""
    return at.strftime("%Y-%m-%d %H:%M:%S.%f+00")


@dataclass(frozen=True)
class Target:
    """Where a point-in-time restore stops, in pgBackRest's terms."""
    type: str                 # time or name
    value: str                # --target
    said: str                 # the target for people: the confirmation and the output
    set: str                  # the backup set to replay from (--set: the one checked)
    flag: str = "--at"        # the command line's word for the target, for errors


def _sets(info: list, stanza: str) -> list[dict]:
    """The stanza's backup sets in `pgbackrest info --output=json`, oldest first."""
    return next((s.get("backup") or [] for s in info or [] if s.get("name") == stanza), [])


def time_target(at: datetime, info: list, stanza: str) -> Target:
    """`invoke restore --at`: the newest backup that stopped before the time, as pgBackRest
    picks one for a time target (restore.c restoreBackupSet), named with --set so that the set
    restore_to checks is the one restored from."""
    check_window(at, pgbackrest_summary(info, stanza), stanza)
    before = [b for b in _sets(info, stanza)
              if (b.get("timestamp") or {}).get("stop") is not None
              and b["timestamp"]["stop"] < _second(at)]
    return Target("time", target(at), f"{at:%Y-%m-%d %H:%M:%S} UTC", before[-1]["label"])


def lsn(text: str) -> int:
    """A PostgreSQL LSN ('16/B374D848') as a number."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def _ended_before(backup: dict, point: dict) -> bool:
    stop = (backup.get("lsn") or {}).get("stop")
    if stop:
        return lsn(stop) <= lsn(point["lsn"])
    # a backup of a pgBackRest without LSNs in its info: its end time, on the same clock
    ended = (backup.get("timestamp") or {}).get("stop")
    made = datetime.fromisoformat(point["at"].replace("Z", "+00:00")).timestamp()
    return ended is not None and ended < made


def point_target(point: dict, release: str, info: list, stanza: str) -> Target:
    """A restore point made before `release` migrated (a record of remote/deploy.py
    op_restore_point). Recovery must start from a backup that ended before the point, and for a
    name target pgBackRest takes the newest backup of all (which may end after it, and recovery
    would never reach the point): the set is chosen here, as pgBackRest chooses one for an LSN
    target. Retention may have expired every such backup: InputError saying so."""
    backups_ = _sets(info, stanza)
    usable = [b for b in backups_ if _ended_before(b, point)]
    said = (f"restore point {point['name']} ({point['at'].replace('T', ' ').rstrip('Z')} UTC, "
            f"made before release {release} migrated)")
    if usable:
        return Target("name", point["name"], said, usable[-1]["label"], "--before")
    first = (backups_[0].get("timestamp") or {}).get("stop") if backups_ else None
    oldest = datetime.fromtimestamp(first, timezone.utc) if first else None
    kept = (f"the oldest it keeps ended {oldest:%Y-%m-%d %H:%M:%S} UTC" if oldest
            else "it keeps none")
    raise InputError([Problem("command line", None, "--before", (
        f"the repository of stanza {stanza} no longer holds a backup that ended before {said}: "
        f"{kept} (retention expired the older ones), so there is nothing to replay up to that "
        "point. Nothing was changed"), "rewind to a later moment inside the retention window "
        "with `invoke restore --at TIME` (`invoke backup.status` shows the backups); to keep "
        "this far back next time, raise pgbackrest_retention_days")])


@dataclass(frozen=True)
class Cluster:
    """The cluster an in-place restore goes into: the major its unit starts and the system id
    in its pg_control (None when that cannot be read, e.g. the data folder is gone)."""
    major: str
    system_id: int | None


def info_script(stanza: str, data: str) -> list[str]:
    """argv of one exec on the database server: the cluster's system id (the first 8 bytes of
    pg_control, in the machine's byte order, as pgBackRest and stanzacheck.py read it; an empty
    line when unreadable), then `pgbackrest info --output=json` of the stanza."""
    control = f"{data}/global/pg_control"
    q = shlex.join
    script = f"""{q(['od', '-An', '-tu8', '-N8', '--', control])} 2>/dev/null | tr -d ' \\n'; echo
exec {q(['runuser', '-u', 'postgres', '--', 'pgbackrest', f'--stanza={stanza}', '--output=json',
         'info'])}
"""
    return ["sh", "-c", script]


def parse_info(stdout: str) -> tuple[int | None, list]:
    """(system id or None, pgbackrest info) from info_script's output. ValueError when the
    info is no JSON."""
    first, _, rest = stdout.partition("\n")
    first = first.strip()
    return (int(first) if first.isdigit() else None), jsonlib.loads(rest)


def _stanza(info: list, stanza: str) -> dict:
    return next((s for s in info or [] if isinstance(s, dict) and s.get("name") == stanza), {})


def _db_of(stanza: dict, backup: dict) -> dict:
    """The entry of the stanza's database history (`db`: one per cluster it followed, a new one
    at each stanza-upgrade) that a backup set was taken of."""
    ref = backup.get("database") or {}
    return next((d for d in stanza.get("db") or [] if d.get("id") == ref.get("id")
                 and d.get("repo-key", 1) == ref.get("repo-key", 1)), {})


def _is_cluster(db: dict, cluster: Cluster) -> bool:
    return str(db.get("version")) == cluster.major and (
        cluster.system_id is None or db.get("system-id") == cluster.system_id)


def _by_hand(stanza: str, to: Target, major: str) -> str:
    argv = ["pgbackrest", f"--stanza={stanza}", f"--set={to.set}", f"--type={to.type}",
            f"--target={to.value}", "--target-action=promote", "--archive-mode=off",
            f"--pg1-path=/var/tmp/restore-{major}", "restore"]
    return (f"restore set {to.set} by hand into a scratch cluster of PostgreSQL {major} (as "
            f"postgres on {stanza}: `{shlex.join(argv)}`, then start it with "
            f"/usr/lib/postgresql/{major}/bin/pg_ctl on a free port)")


def check_restorable(info: list, stanza: str, to: Target, cluster: Cluster) -> None:
    """Before anything is stopped: the set `to` replays from must be of the stanza's current
    database (the newest entry of its history) and that entry the cluster the restore goes
    into (same major, same system id). After a major upgrade (15 -> 17, then stanza-upgrade)
    the repository keeps 15's sets until retention expires them, and pgBackRest restores
    whatever set it is given: until the first backup of 17, a time only 15's sets cover would
    put 15's files in 17's place. InputError naming the set, its major, the cluster's and what
    to do instead."""
    s = _stanza(info, stanza)
    backup = next((b for b in s.get("backup") or [] if b.get("label") == to.set), {})
    db = _db_of(s, backup)
    current = max(s.get("db") or [{}], key=lambda d: d.get("id", 0))
    if db and db is current and _is_cluster(db, cluster):
        return
    old = str(db.get("version", "?"))
    sysid = f", system id {db['system-id']}" if db.get("system-id") is not None else ""
    running = f"PostgreSQL {cluster.major}" + (
        f" (system id {cluster.system_id})" if cluster.system_id is not None else "")
    problem = (f"backup set {to.set} of stanza {stanza}, which {to.said} would be replayed "
               f"from, is of PostgreSQL {old}{sysid}, and the cluster on {stanza} runs {running}"
               f": restoring it would put {old}'s files in {cluster.major}'s place. Nothing "
               "was changed")
    hand = _by_hand(stanza, to, old)
    if current.get("version") is not None and not _is_cluster(current, cluster):
        problem += (f" (the stanza's current database is still PostgreSQL "
                    f"{current['version']}: stanza-upgrade has not run since the cluster "
                    "changed)")
        fix = (f"run `invoke provision --limit {stanza}` (role pgbackrest runs stanza-upgrade), "
               f"then `invoke backup --limit {stanza} --kind full`; the state in that set: {hand}")
    else:
        ours = [b for b in s.get("backup") or [] if _db_of(s, b) is current
                and (b.get("timestamp") or {}).get("stop") is not None]
        if ours:
            first = datetime.fromtimestamp(ours[0]["timestamp"]["stop"], timezone.utc)
            fix = (f"pick a time after {first:%Y-%m-%d %H:%M:%S} UTC, when the first backup of "
                   f"PostgreSQL {cluster.major} on {stanza} ended (`invoke restore --at TIME`), "
                   f"or {hand}")
        else:
            fix = (f"the repository holds no backup of PostgreSQL {cluster.major} on {stanza} "
                   f"yet: take one now with `invoke backup --limit {stanza} --kind full` (due "
                   "right after every major upgrade), and pick a time after it ends; for the "
                   f"state in that set, {hand}")
    raise InputError([Problem("command line", None, to.flag, problem, fix)])


def restore_question(stanza: str, cluster: str, databases: list[str], to: Target) -> str:
    """The confirmation of an in-place restore: it rewinds the cluster, not one database."""
    declared = ", ".join(databases) or "none"
    return (f"Rewind the WHOLE PostgreSQL cluster on {stanza} (cluster {cluster}: every database "
            f"in it, not only the app's; the inventory declares: {declared}) to {to.said}? The "
            "cluster stops (every write with it) and everything written to any of its databases "
            "after that moment is lost.")


def restore_script(stanza: str, unit: str, port: int, to: Target) -> list[str]:
    """argv of one exec on the database server: archive the WAL still in pg_wal (so the target
    is reachable), stop the cluster (every write stops with it), restore in place with --delta
    (only files that differ are fetched), start, and wait until recovery reached the target and
    promoted. pgBackRest writes restore_command and the recovery target itself."""
    psql = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-p", str(port), "-Atc"]
    restore = ["runuser", "-u", "postgres", "--", "pgbackrest", f"--stanza={stanza}", "--delta",
               f"--type={to.type}", f"--target={to.value}",
               f"--set={to.set}", "--target-action=promote", "restore"]
    q = shlex.join
    script = f"""set -e
{q(psql + ['SELECT pg_switch_wal()'])} >/dev/null 2>&1 || true
{q(['systemctl', 'stop', unit])}
{q(restore)}
{q(['systemctl', 'start', unit])}
# recovery replays the archive up to the target, then promotes; nothing to wait on but polling
i=0
until [ "$({q(psql + ['SELECT pg_is_in_recovery()'])} 2>/dev/null)" = f ]; do
  i=$((i+1)); [ $i -le 600 ] || {{ echo "PostgreSQL still in recovery after 5 minutes" >&2; exit 1; }}
  sleep 0.5
done
"""
    return ["sh", "-c", script]


def restic_restore_script(snapshot: str, path: str, target: str) -> list[str]:
    """argv of one exec on the source host: restic's environment, a target that is absent or
    empty (never over live data), then the restore of `path` only (restic puts it under
    target with its whole path)."""
    q = shlex.quote
    script = f"""set -e
set -a; . {q(RESTIC_ENV)}; set +a
if [ -e {q(target)} ] && [ -n "$(ls -A {q(target)} 2>/dev/null)" ]; then
  echo {q(target)}" exists and is not empty: pass a new --target (a restore never overwrites)" >&2
  exit 3
fi
restic restore {q(snapshot)} --target {q(target)} --include {q(path)}
"""
    return ["sh", "-c", script]

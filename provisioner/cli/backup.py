"""`invoke backup`, `invoke backup.status`, `invoke restore` and `invoke restore.files`: the
pgbackrest role's units on the repository host, the restic role's on each source host
(provisioner/backups.py decides, this module talks to the servers: one exec per unit started,
one per host for the status, one per restore step)."""
from __future__ import annotations

import json as jsonlib
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from invoke import Collection, Exit, task

from provisioner import backups, secret   # secret.REDACTOR looked up at use: tests replace it
from provisioner.cli.common import FLAG_HELP, fail_input, load
from provisioner.connection import Connection, Unreachable
from provisioner.errors import EXIT_FAILED, EXIT_UNREACHABLE, InputError, Problem

if TYPE_CHECKING:            # annotations only: the validation library loads when a task runs
    from provisioner.inventory import Inventory


class Failed(Exception):
    """A server answered, and what it answered is a failure (exit 1)."""


def _say(text: str) -> None:
    print(secret.REDACTOR.redact(text), file=sys.stderr, flush=True)


def _conn(inv: Inventory, name: str) -> Connection:
    host = inv.hosts[name]
    return Connection(host, inv.known_hosts, host.sudo_password)


def run_units(inv: Inventory, units: dict[str, list[str]], say=_say) -> list[str]:
    """Start each host's units one after the other and wait for each (they are oneshots:
    `systemctl start` returns when the job ended). Returns what failed, each with the end of
    its journal."""
    failed = []
    for name, host_units in units.items():
        with _conn(inv, name) as conn:
            for unit in host_units:
                say(f"{name}: {unit} ...")
                seconds, problem = backups.start_unit(conn, unit)
                if problem is None:
                    say(f"{name}: {unit} ok in {seconds:.1f}s")
                    continue
                failed.append(f"{unit} on {name}: {problem}")
    return failed


def backup_units(inv: Inventory, hosts, kind: str) -> dict[str, list[str]]:
    """{host: units} for `invoke backup`: each selected stanza's unit of `kind` on its
    repository host, and each selected restic source host's backup."""
    units: dict[str, list[str]] = {}
    for s in backups.selected(inv, hosts):
        units.setdefault(s.repo, []).append(backups.units(s, kind))
    for name in backups.restic_sources(inv, hosts):
        units.setdefault(name, []).append("restic-backup")
    if not units:
        raise _nothing(inv, "back up")
    return units


def _status(conn: Connection, name: str, *args: str) -> dict:
    r = conn.run(["python3", backups.JOB_TOOL, "status", *args])
    if not r.ok:
        raise Failed(f"{name}: reading the backup status failed: {backups.output(r)}")
    return jsonlib.loads(r.stdout)


def gather_status(inv: Inventory, hosts) -> list[backups.Row]:
    """Every row `hosts` reach: one exec per repository host (pgBackRest) and per restic
    source host."""
    wanted = backups.selected(inv, hosts)
    sources = backups.restic_sources(inv, hosts)
    if not wanted and not sources:
        raise _nothing(inv, "report")
    rows = []
    for repo in dict.fromkeys(s.repo for s in wanted):
        with _conn(inv, repo) as conn:
            answer = _status(conn, repo, "--pgbackrest-user", "pgbackrest")
        rows += backups.status_rows(inv, repo, answer, wanted)
    for name in sources:
        with _conn(inv, name) as conn:
            answer = _status(conn, name, "--restic-env", backups.RESTIC_ENV)
        rows += backups.restic_rows(inv, name, answer)
    return rows


def restore_files(inv: Inventory, host: str, path: str, at: datetime | None, target: str,
                  say=_say) -> str:
    """Restore `path` from `host`'s restic snapshot at `at` (the newest at or before it) into
    `target` on that host, which must be absent or empty: never over live data. Returns the
    snapshot's id."""
    with _conn(inv, host) as conn:
        answer = _status(conn, host, "--restic-env", backups.RESTIC_ENV)
        if answer.get("restic_error"):
            raise Failed(f"{host}: restic snapshots failed: {answer['restic_error']}")
        snap = backups.snapshot_at(answer.get("restic") or [], at, host)
        r = conn.run(backups.restic_restore_script(snap["id"], path, target))
        if not r.ok:
            raise Failed(f"{host}: the restore failed (exit {r.rc}): {backups.output(r)}")
    say(f"{host}: {path} from snapshot {snap['id'][:8]} ({snap['time']}) restored under {target}")
    return snap["id"]


def restore_to(inv: Inventory, stanza: backups.Stanza, pick, confirm, say=_say) -> float:
    """Point-in-time restore of one database server, in place. `pick(pgbackrest info)` gives
    the backups.Target (InputError when the repository cannot reach it), which must be a set
    of the running cluster (backups.check_restorable), then `confirm(question)` whether to go
    on. Returns the seconds the restore took."""
    from roles.postgresql import DEBIAN_POSTGRESQL, _paths
    v = inv.hostvars(stanza.name)
    version = str(v["postgresql_version"])
    with _conn(inv, stanza.name) as conn:
        if not version:       # the server's Debian default, as the postgresql role picks it
            r = conn.run(["sh", "-c", ". /etc/os-release && echo $VERSION_ID"], sudo=False)
            version = DEBIAN_POSTGRESQL.get(r.stdout.decode().strip(), "")
        paths = _paths(version, v["postgresql_cluster"])
        info = conn.run(backups.info_script(stanza.name, paths["data"]))
        if not info.ok:
            raise Failed(f"{stanza.name}: pgbackrest info failed: {backups.output(info)}")
        try:
            system_id, answer = backups.parse_info(info.stdout.decode())
        except ValueError:
            raise Failed(f"{stanza.name}: pgbackrest info gave no JSON: "
                         f"{backups.output(info)}") from None
        to = pick(answer)
        backups.check_restorable(answer, stanza.name, to, backups.Cluster(version, system_id))
        question = backups.restore_question(
            stanza.name, f"{version}/{v['postgresql_cluster']}",
            [d["name"] for d in v["postgresql_databases"] or []], to)
        if not confirm(question):
            raise Exit("restore not confirmed: nothing was changed", code=EXIT_FAILED)
        say(f"{stanza.name}: restoring to {to.said} from backup {to.set} ...")
        r = conn.run(backups.restore_script(stanza.name, paths["unit"], v["postgresql_port"], to))
        if not r.ok:
            raise Failed(f"{stanza.name}: the restore failed (exit {r.rc}): {backups.output(r)}")
        say(f"{stanza.name}: restored and promoted in {r.seconds:.1f}s")
        return r.seconds


def _nothing(inv: Inventory, what: str) -> InputError:
    if not backups.stanzas(inv) and not backups.restic_sources(inv):
        return backups.no_backups(inv, what)
    names = sorted({s.name for s in backups.stanzas(inv)} | set(backups.restic_sources(inv)))
    return InputError([Problem("command line", None, "--limit", "no database server, restic "
                               "source or repository host in the selection",
                               "name one of: " + ", ".join(names))])


def guarded(fn):
    """Exit codes as documented: 2 bad input, 3 unreachable, 1 failed."""
    try:
        return fn()
    except InputError as e:
        raise fail_input(str(e)) from None
    except Unreachable as e:
        _say(str(e))
        raise Exit(code=EXIT_UNREACHABLE) from None
    except Failed as e:
        _say(str(e))
        raise Exit(code=EXIT_FAILED) from None


@task(name="run", default=True,
      help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"],
            "kind": "full, diff or incr (default incr; pgBackRest makes a full when there is none)"})
def backup_now(c, env="local", limit=None, kind="incr"):
    """Run the backups now (the timers' own units: pgBackRest of each database server, restic of
    each source host): exit 1 naming what failed."""
    def go():
        k = backups.check_kind(kind)
        inv, hosts = load(env, sys.stdin.isatty(), limit)
        failed = run_units(inv, backup_units(inv, hosts, k))
        if failed:
            raise Failed("backup FAILED:\n" + "\n".join(failed))
    guarded(go)


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"]})
def verify(c, env="local", limit=None):
    """Restore drills now (the weekly timers' own units): the latest PostgreSQL backup into a
    scratch cluster on the repository host (pg_amcheck, tables and rows), the latest restic
    snapshot into a scratch folder (checksums against unchanged live files). Exit 1 naming
    what failed; the results are in the journal and the status files."""
    def go():
        inv, hosts = load(env, sys.stdin.isatty(), limit)
        units = backups.verify_units(inv, hosts)
        if not units:
            raise _nothing(inv, "verify")
        failed = run_units(inv, units)
        if failed:
            raise Failed("restore drill FAILED:\n" + "\n".join(failed))
    guarded(go)


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"], "json": "rows as JSON on stdout"})
def status(c, env="local", limit=None, json=False):
    """Each database server's backups per kind and each restic source's backup and check: last
    success, age, size, repository, archive. Exit 1 when any is older than its
    *_max_age_hours or its last run failed."""
    def go():
        inv, hosts = load(env, sys.stdin.isatty(), limit)
        return gather_status(inv, hosts)
    rows = guarded(go)
    if json:
        print(jsonlib.dumps([{**r.__dict__, "ok": r.ok} for r in rows]))
    else:
        print(backups.table(rows))
    if not all(r.ok for r in rows):
        raise Exit(code=EXIT_FAILED)


@task(name="db", default=True,
      help={"env": FLAG_HELP["env"], "limit": "the database server (needed when there are several)",
            "at": "the time to restore to, with its zone: '2026-12-01T18:40:00Z'",
            "yes": "do not ask for confirmation (CI, drills)"})
def restore_db(c, at, env="local", limit=None, yes=False):
    """PostgreSQL point-in-time restore, in place, from the pgBackRest repository (asks first)."""
    def go():
        when = backups.parse_at(at, datetime.now(timezone.utc))
        if not yes and not sys.stdin.isatty():
            raise _no_terminal()
        inv, hosts = load(env, sys.stdin.isatty() and not yes, limit)
        wanted = backups.selected(inv, hosts)
        if not wanted:
            raise _nothing(inv, "restore")
        if len(wanted) != 1:
            raise InputError([Problem("command line", None, "--limit",
                                      f"{len(wanted)} database servers are selected "
                                      f"({', '.join(s.name for s in wanted)})",
                                      "name the one to restore: --limit NAME")])
        stanza = wanted[0]
        return restore_to(inv, stanza, lambda info: backups.time_target(when, info, stanza.name),
                          lambda q: yes or ask(q, stanza.name))
    guarded(go)


@task(name="files", positional=[], auto_shortflags=False,
      help={"env": FLAG_HELP["env"], "host": "the restic source host", "path": "what to restore "
            "(absolute; a file or folder as it was backed up)", "at": "the newest snapshot at or "
            "before this time, with its zone (default: the newest)", "target": "an absent or "
            "empty folder on the host to restore into (default /var/tmp/provisioner-restore/<time>)"})
def restore_files_task(c, host, path, env="local", at=None, target=None):
    """Files from a restic snapshot into a fresh folder on their host (never over live data)."""
    def go():
        now = datetime.now(timezone.utc)
        when = backups.parse_at(at, now) if at else None
        where = backups.check_restore_path(path, "--path")
        into = backups.check_restore_path(target or f"/var/tmp/provisioner-restore/"
                                          f"{now:%Y%m%dT%H%M%SZ}", "--target")
        inv, hosts = load(env, sys.stdin.isatty(), host)
        if host not in backups.restic_sources(inv):
            raise InputError([Problem("command line", None, "--host", f"{host} is not a source "
                                      "host of the restic role", "name one of: " + ", ".join(
                                          backups.restic_sources(inv)) or "none")])
        restore_files(inv, host, where, when, into)
    guarded(go)


def _no_terminal(question: str | None = None) -> InputError:
    asked = f": {question}" if question else ""
    return InputError([Problem("command line", None, "--yes", "a restore needs a confirmation "
                               f"and there is no terminal to ask on{asked}",
                               "pass --yes once you are sure of the server and the time")])


def ask(question: str, name: str) -> bool:
    """The confirmation of a restore: the server's name typed back (no terminal: InputError
    with the question, so a script's log says what --yes would do)."""
    if not sys.stdin.isatty():
        raise _no_terminal(question)
    _say(question)
    return input(f"Type the server's name ({name}) to go on: ").strip() == name


backup_ns = Collection("backup", backup_now, status, verify)
restore_ns = Collection("restore", restore_db, restore_files_task)

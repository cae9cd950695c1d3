"""`invoke backup`, `invoke backup.status` and `invoke restore`: PostgreSQL backups with the
pgbackrest role's units on the repository host (provisioner/backups.py decides, this module
talks to the servers: one exec per unit started, one per repository host for the status, one
per restore step)."""
from __future__ import annotations

import json as jsonlib
import sys
from datetime import datetime, timezone

from invoke import Collection, Exit, task

from provisioner import backups
from provisioner.cli.common import FLAG_HELP, fail_input, load
from provisioner.connection import Connection, Unreachable
from provisioner.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNREACHABLE, InputError, Problem
from provisioner.inventory import Inventory
from provisioner.secret import REDACTOR


class Failed(Exception):
    """A server answered, and what it answered is a failure (exit 1)."""


def _say(text: str) -> None:
    print(REDACTOR.redact(text), file=sys.stderr, flush=True)


def _out(result) -> str:
    return (result.stdout + result.stderr).decode("utf-8", "replace").strip()


def _conn(inv: Inventory, name: str) -> Connection:
    host = inv.hosts[name]
    return Connection(host, inv.known_hosts, host.sudo_password)


def run_backups(inv: Inventory, wanted: list[backups.Stanza], kind: str, say=_say) -> list[str]:
    """Start each stanza's unit of `kind` on its repository host and wait for it (the unit is a
    oneshot: `systemctl start` returns when the backup ended). Returns what failed, each with
    the end of its journal."""
    failed = []
    by_repo: dict[str, list[backups.Stanza]] = {}
    for s in wanted:
        by_repo.setdefault(s.repo, []).append(s)
    for repo, group in by_repo.items():
        with _conn(inv, repo) as conn:
            for s in group:
                unit = backups.units(s, kind)
                say(f"{repo}: {unit} ...")
                r = conn.run(["systemctl", "start", f"{unit}.service"])
                if r.ok:
                    say(f"{repo}: {unit} ok in {r.seconds:.1f}s")
                    continue
                log = conn.run(["journalctl", "-u", f"{unit}.service", "-n", "15", "--no-pager",
                                "-o", "cat"])
                failed.append(f"{unit} on {repo}: {_out(r) or 'failed'}\n{_out(log)}")
    return failed


def gather_status(inv: Inventory, wanted: list[backups.Stanza]) -> list[backups.Row]:
    rows = []
    for repo in dict.fromkeys(s.repo for s in wanted):
        with _conn(inv, repo) as conn:
            r = conn.run(["python3", backups.JOB_TOOL, "status", "--pgbackrest-user", "pgbackrest"])
        if not r.ok:
            raise Failed(f"{repo}: reading the backup status failed: {_out(r)}")
        rows += backups.status_rows(inv, repo, jsonlib.loads(r.stdout), wanted)
    return rows


def restore_to(inv: Inventory, stanza: backups.Stanza, at: datetime, confirm, say=_say) -> float:
    """Point-in-time restore of one database server, in place. `confirm(question)` returns
    whether to go on. Returns the seconds the restore took."""
    v = inv.hostvars(stanza.name)
    version = str(v["postgresql_version"])
    with _conn(inv, stanza.name) as conn:
        if not version:       # the server's Debian default, as the postgresql role picks it
            from roles.postgresql import DEBIAN_POSTGRESQL
            r = conn.run(["sh", "-c", ". /etc/os-release && echo $VERSION_ID"], sudo=False)
            version = DEBIAN_POSTGRESQL.get(r.stdout.decode().strip(), "")
        unit = f"postgresql@{version}-{v['postgresql_cluster']}"
        info = conn.run(["runuser", "-u", "postgres", "--", "pgbackrest", f"--stanza={stanza.name}",
                         "--output=json", "info"])
        if not info.ok:
            raise Failed(f"{stanza.name}: pgbackrest info failed: {_out(info)}")
        backups.check_window(at, backups.pgbackrest_summary(jsonlib.loads(info.stdout),
                                                            stanza.name), stanza.name)
        databases = ", ".join(d["name"] for d in v["postgresql_databases"] or []) or "no app database"
        question = (f"Restore PostgreSQL on {stanza.name} (cluster {version}/"
                    f"{v['postgresql_cluster']}, databases: {databases}) to "
                    f"{at:%Y-%m-%d %H:%M:%S} UTC? The cluster stops (every write with it) and "
                    "everything written after that time is lost.")
        if not confirm(question):
            raise Exit("restore not confirmed: nothing was changed", code=EXIT_FAILED)
        say(f"{stanza.name}: restoring to {backups.target(at)} ...")
        r = conn.run(backups.restore_script(stanza.name, unit, v["postgresql_port"], at))
        if not r.ok:
            raise Failed(f"{stanza.name}: the restore failed (exit {r.rc}): {_out(r)}")
        say(f"{stanza.name}: restored and promoted in {r.seconds:.1f}s")
        return r.seconds


def _stanzas_for(inv: Inventory, hosts, what: str) -> list[backups.Stanza]:
    if not backups.stanzas(inv):
        raise backups.no_backups(inv, what)
    wanted = backups.selected(inv, hosts)
    if not wanted:
        raise InputError([Problem("command line", None, "--limit", "no database server or "
                                  "repository host of the pgbackrest role in the selection",
                                  "name a database server or the repository host: "
                                  + ", ".join(sorted({s.name for s in backups.stanzas(inv)})))])
    return wanted


def _guarded(fn):
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
    """Run the PostgreSQL backups now (the timers' own units): exit 1 naming what failed."""
    def go():
        k = backups.check_kind(kind)
        inv, hosts = load(env, sys.stdin.isatty(), limit)
        failed = run_backups(inv, _stanzas_for(inv, hosts, "back up"), k)
        if failed:
            raise Failed("backup FAILED:\n" + "\n".join(failed))
    _guarded(go)


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"], "json": "rows as JSON on stdout"})
def status(c, env="local", limit=None, json=False):
    """Each database server's backups per kind: last success, age, size, repository, WAL
    archive. Exit 1 when any is older than pgbackrest_max_age_hours or its last run failed."""
    def go():
        inv, hosts = load(env, sys.stdin.isatty(), limit)
        return gather_status(inv, _stanzas_for(inv, hosts, "report"))
    rows = _guarded(go)
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
        inv, hosts = load(env, sys.stdin.isatty() and not yes, limit)
        wanted = _stanzas_for(inv, hosts, "restore")
        if len(wanted) != 1:
            raise InputError([Problem("command line", None, "--limit",
                                      f"{len(wanted)} database servers are selected "
                                      f"({', '.join(s.name for s in wanted)})",
                                      "name the one to restore: --limit NAME")])
        return restore_to(inv, wanted[0], when, lambda q: yes or _ask(q, wanted[0].name))
    _guarded(go)


def _ask(question: str, name: str) -> bool:
    if not sys.stdin.isatty():
        raise InputError([Problem("command line", None, "--yes", "a restore needs a confirmation "
                                  "and there is no terminal to ask on",
                                  "pass --yes once you are sure of the server and the time")])
    _say(question)
    return input(f"Type the server's name ({name}) to go on: ").strip() == name


backup_ns = Collection("backup", backup_now, status)
restore_ns = Collection("restore", restore_db)

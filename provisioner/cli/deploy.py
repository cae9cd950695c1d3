"""`invoke deploy`, `invoke deploy.unlock`, `invoke rollback`, `invoke releases` and
`invoke db.restore`.

The engine (inventory validation, SSH) is imported inside the tasks: `invoke --list` and
`--help` stay light."""
from __future__ import annotations

import json as jsonlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from invoke import Collection, Exit, task

from provisioner import lock as run_lock
from provisioner.cli.common import FLAG_HELP, fail_input, int_flag, load
from provisioner.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNREACHABLE, InputError, Problem
from provisioner.humanize import columns, size

HELP = {**{k: FLAG_HELP[k] for k in ("env", "json", "yes", "verbose")},
        "app": "the app of the inventory's `apps:` (default: the only one)",
        "serial": "switch N hosts at a time (default 1)",
        "limit": "only these hosts of the app's group, comma-separated"}


def say(*parts, file=None) -> None:
    """print(), with every secret the run knows masked: these tasks print what servers
    answered (errors of pg_restore, npm, pm2), which may quote one."""
    from provisioner.secret import REDACTOR
    print(*(REDACTOR.redact(str(p)) for p in parts), file=file)


def _flow(task_name, *, env, app, limit, json, yes, verbose, body) -> None:
    """Inventory and flags checked before any server is touched (exit 2), then body(fleet)
    -> exit code, with the event stream's recap at the end."""
    from provisioner import deploy as flows
    from provisioner.events import Events
    events = Events(task=task_name, env=env, json_out=bool(json), verbose=int(verbose or 0),
                    diff=False, check=False)
    with events:
        try:
            inv, _ = load(env, interactive=not yes and sys.stdin.isatty())
            the_app = inv.app(app)
            hosts = flows.app_hosts(inv, the_app, limit)
            fleet = flows.Fleet(inv, hosts, the_app, events, task_name)
            prepared = body(fleet, prepare=True)      # e.g. the artifact: bad refs are input too
        except InputError as e:
            raise Exit(code=events.fail_run(EXIT_BAD_INPUT, e)) from None
        events.start([h.name for h in hosts])
        try:
            code = body(fleet, prepared=prepared)
        finally:
            fleet.close()
        events.recap()
    if code:
        raise Exit(code=code)


@task(help={**HELP, "ref": "git ref to deploy (default: the app's `ref`)",
            "source": "build from this git folder or URL instead of the app's `source` (a "
                      "fork, a clone with a hotfix)",
            "canary": "switch N hosts first and hold them, watching their health and 5xx rate, "
                      "before the others",
            "canary_hold": "seconds the canaries are held (default: the app's `canary_hold`, 60)"},
      incrementable=["verbose"], default=True)
def deploy(c, env="local", app=None, ref=None, source=None, limit=None, serial=1, canary=0,
           canary_hold=None, yes=False, json=False, verbose=0):
    """Ship a new release: build once, prepare every host in parallel, switch in batches
    behind a health gate (--canary N: N hosts first, held and watched); a failed gate or
    canary switches the whole fleet back (exit 1)."""
    from provisioner import deploy as flows
    from provisioner.releases import build

    def body(fleet, prepare=False, prepared=None):
        if prepare:
            batch = int_flag(serial, "serial", 1)
            hold = None if canary_hold is None else int_flag(canary_hold, "canary-hold", 1)
            plan = flows.canary_plan(fleet.inv, fleet.app, fleet.hosts,
                                     int_flag(canary, "canary", 0), hold)
            where = str(Path(source).absolute()) if source and "://" not in source else source
            return batch, plan, build(where or fleet.app.source, ref or fleet.app.ref)
        batch, plan, artifact = prepared
        return flows.deploy(fleet, artifact, batch, plan)
    _flow("deploy", env=env, app=app, limit=limit, json=json, yes=yes, verbose=verbose, body=body)


@task(help={**HELP, "to": "the release id to go back to (default: the previous good one)",
            "serial": "switch N hosts at a time (default 0: all at once, as the release went "
                      "live on each of them before)",
            "with_migrations": "first run the app's `migrate_down` in the release rolled back"},
      incrementable=["verbose"])
def rollback(c, env="local", app=None, to=None, limit=None, serial=0, with_migrations=False,
             yes=False, json=False, verbose=0):
    """Make the previous good release live again on every host (no build, no upload), with the
    same switch, reload and health gate as a deploy."""
    from provisioner import deploy as flows

    def body(fleet, prepare=False, prepared=None):
        if prepare:
            if with_migrations and not fleet.app.migrate_down:
                raise InputError(Problem(fleet.inv.path, fleet.app.line, f"apps.{fleet.app.name}",
                                         "--with-migrations, but the app has no `migrate_down`",
                                         "add `migrate_down: [node, migrate.js, down]` (your "
                                         "command), or leave out --with-migrations"))
            return int_flag(serial, "serial", 0)
        return flows.rollback(fleet, to, prepared, with_migrations)
    _flow("rollback", env=env, app=app, limit=limit, json=json, yes=yes, verbose=verbose,
          body=body)


def _ask_hosts(env, app, limit, op_request):
    """One exec on every host of the app (in parallel): {host: answer or the error text}."""
    from provisioner import deploy as flows
    from provisioner.connection import Connection, Unreachable
    from provisioner.events import Events
    from provisioner.releases import RemoteError, call
    try:
        inv, _ = load(env, interactive=sys.stdin.isatty())
        the_app = inv.app(app)
        # deploy.unlock narrows to the hosts holding a lock: any of a blue-green app's too
        hosts = flows.app_hosts(inv, the_app, limit, switching=False)
    except InputError as e:
        raise fail_input(str(e)) from None
    fleet = flows.Fleet(inv, hosts, the_app, Events(task="releases", env=env, json_out=False,
                                                    verbose=0, diff=False, check=False), "releases")

    def one(h):
        with Connection(h, inv.known_hosts, h.sudo_password) as conn:
            try:
                return h.name, call(conn, fleet.base(h, **op_request))
            except (Unreachable, RemoteError) as e:
                return h.name, {"ok": False, "error": str(e)}
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return the_app, dict(pool.map(one, hosts))


@task(help={"env": FLAG_HELP["env"], "app": HELP["app"], "limit": HELP["limit"],
            "json": "one JSON document on stdout"})
def releases(c, env="local", app=None, limit=None, json=False):
    """Per host: every release (id, commit, state, when, by whom, the backup taken before it
    migrated) and which one is current."""
    the_app, answers = _ask_hosts(env, app, limit, {"op": "list"})
    if json:
        say(jsonlib.dumps({"app": the_app.name, "hosts": {
            n: ({"current": a["current"], "lock": a["lock"],
                 # a manifest written before backups were recorded has no such key
                 "releases": [{**e, "backup": e.get("backup")} for e in a["manifest"]]}
                if a.get("ok") else {"error": a.get("error")}) for n, a in answers.items()}},
            indent=1))
    else:
        for name, a in answers.items():
            if not a.get("ok"):
                say(f"{name}: {a.get('error')}")
                continue
            lock = f" (locked by {run_lock.holder_text(a['lock'])})" if a.get("lock") else ""
            say(f"{name}: {the_app.name}{lock}")
            for line in release_table(a["manifest"], a["current"]):
                say(line)
    if any(not a.get("ok") for a in answers.values()):
        raise Exit(code=EXIT_UNREACHABLE if all("unreachable" in str(a.get("error", "")) or
                                                "cannot connect" in str(a.get("error", ""))
                                                for a in answers.values() if not a.get("ok"))
                   else EXIT_FAILED)


def release_table(manifest: list[dict], current: str | None) -> list[str]:
    """One host's releases, newest first, `*` marking current: id, state, commit, when, by
    whom, and the backup taken before the release migrated (what `db.restore --before` can
    restore), as the deploy recorded it in the manifest."""
    if not manifest:
        return ["    (no release)"]
    rows = [("", "RELEASE", "STATE", "COMMIT", "AT", "BY", "BACKUP BEFORE ITS MIGRATION")] + [
        ("*" if e["id"] == current else "", e["id"], e["state"], e["commit"][:12], e["at"],
         e["by"], backup_text(e.get("backup"))) for e in reversed(manifest)]
    return ["  " + line for line in columns(rows)]


def backup_text(backup: dict | None) -> str:
    """A release's pre-migration backup in a word or two and where it is; "-": none (the
    deploy ran no migration, or the manifest predates the record)."""
    if not backup:
        return "-"
    if backup["kind"] == "pgbackrest":
        return (f"restore point {backup['name']} on {backup['host']} (pgBackRest stanza "
                f"{backup['stanza']})")
    return f"pg_dump {backup['host']}:{backup['path']} ({size(backup['size'])})"


@task(help={"env": FLAG_HELP["env"], "app": HELP["app"], "limit": HELP["limit"],
            "yes": "remove without asking"})
def unlock(c, env="local", app=None, limit=None, yes=False):
    """Show who holds the deploy lock on each host and remove it (asks unless --yes): for a
    lock left by a deploy that died on another machine."""
    _, answers = _ask_hosts(env, app, limit, {"op": "list"})
    held = {n: a["lock"] for n, a in answers.items() if a.get("ok") and a.get("lock")}
    for n, a in answers.items():
        say(f"{n}: " + (a.get("error") or (f"held by {run_lock.holder_text(a['lock'])}"
                                              if a.get("lock") else "not locked")))
    if not held:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise fail_input("not removed: pass --yes to remove the lock without a terminal")
        if input(f"Remove the deploy lock on {', '.join(held)}? [y/N] ").strip().lower() not in ("y", "yes"):
            say("nothing removed")
            return
    _, done = _ask_hosts(env, app, ",".join(held), {"op": "unlock", "force": True})
    for n, a in done.items():
        say(f"{n}: " + ("lock removed" if a.get("ok") else
                          "not removed: a command of that run still runs there" if a.get("busy")
                          else f"not removed: {a.get('error')}"))
    if any(not a.get("ok") for a in done.values()):
        raise Exit(code=EXIT_FAILED)


@task(help={"env": FLAG_HELP["env"], "app": HELP["app"],
            "before": "the release whose pre-migration backup is restored",
            "yes": "restore without asking"})
def restore(c, before, env="local", app=None, yes=False):
    """Undo what RELEASE's migration did to the app's database, from the backup taken before
    it (asks first, naming what changes): a pgBackRest restore point rewinds the whole
    PostgreSQL cluster to that moment; a dump is restored into the app's database
    (pg_restore --clean)."""
    from provisioner.connection import Connection, Unreachable
    from provisioner.releases import RemoteError, call
    try:
        inv, _ = load(env, interactive=sys.stdin.isatty())
        the_app = inv.app(app)
        if not the_app.database:
            raise InputError(Problem(inv.path, the_app.line, f"apps.{the_app.name}",
                                     "the app names no database", "add `database: {host, name}`"))
    except InputError as e:
        raise fail_input(str(e)) from None
    host = inv.hosts[the_app.database[0]]
    base = {"app": the_app.name, "database": the_app.database[1], "release": before}
    with Connection(host, inv.known_hosts, host.sudo_password) as conn:
        try:
            listed = call(conn, {**base, "op": "backups"})
            found = listed["backups"]
            if before not in found:
                raise fail_input(missing_backup(host.name, the_app, before, found,
                                                listed.get("pruned") or {}))
            b = found[before]
            if b.get("kind") != "pgbackrest":
                _restore_dump(conn, host, the_app, base, b, yes)
                return
        except (Unreachable, RemoteError) as e:
            say(str(e), file=sys.stderr)
            raise Exit(code=EXIT_UNREACHABLE if isinstance(e, Unreachable) else EXIT_FAILED)
    _rewind(inv, host, before, b, yes)


def _restore_dump(conn, host, the_app, base: dict, dump: dict, yes: bool) -> None:
    from provisioner.releases import call
    what = (f"database {the_app.database[1]} on {host.name} from {dump['path']} "
            f"(taken {dump['at']}, before release {base['release']} migrated)")
    if not yes:
        if not sys.stdin.isatty():
            raise fail_input(f"not restored: pass --yes to restore {what}")
        if input(f"Restore {what}? Its current content is replaced. [y/N] ") \
                .strip().lower() not in ("y", "yes"):
            say("nothing restored")
            return
    a = call(conn, {**base, "op": "restore"})
    if not a.get("ok"):
        say(f"{host.name}: restore failed: {a.get('error')}", file=sys.stderr)
        raise Exit(code=EXIT_FAILED)
    say(f"restored {what}")


def _rewind(inv, host, release: str, point: dict, yes: bool) -> None:
    """A restore point's record: `invoke restore`'s point-in-time restore, stopping at it."""
    from provisioner import backups
    from provisioner.cli import backup as backup_cli
    stanza = backups.stanza_of(inv, host.name)
    if stanza is None:
        raise fail_input(f"{host.name}: the backup taken before release {release} is restore "
                         f"point {point['name']} of pgBackRest stanza {point['stanza']}, and "
                         f"env {inv.env} gives {host.name} no pgbackrest role, so it cannot "
                         "restore it\n    fix: run db.restore with the env whose pgbackrest "
                         f"role backs {host.name} up")
    backup_cli.guarded(lambda: backup_cli.restore_to(
        inv, stanza, lambda info: backups.point_target(point, release, info, stanza.name),
        lambda question: yes or backup_cli.ask(question, stanza.name)))
    say(f"rewound the PostgreSQL cluster on {host.name} to restore point {point['name']}, "
        f"made before release {release} migrated")


def missing_backup(host: str, app, release: str, found: dict, pruned: dict) -> str:
    """Why `db.restore --before RELEASE` has nothing to restore: the backup went with its
    release (pruned beyond the app's `keep`), or none was ever taken before that release."""
    kept = f"backups kept: {', '.join(found) or 'none'}"
    if release in pruned:
        gone = pruned[release]
        went = (f"together with the release (app {app.name} keeps {app.keep} releases; a "
                "backup goes once its release is gone from every host); " + kept)
        keep = "to keep them longer, raise `keep` in the app's entry of `apps:`"
        if gone.get("kind") == "pgbackrest":
            return (f"{host}: the record of the restore point made before release {release} "
                    f"(at {gone['taken']}) was pruned at {gone['at']}, {went}. While pgBackRest's "
                    f"retention still reaches that time, `invoke restore --at '{gone['taken']}'` "
                    f"rewinds the whole cluster to it (the second before the point); {keep}")
        return (f"{host}: the backup taken before release {release} was pruned at "
                f"{gone['at']}, {went}. Restore that state from your own database backups; "
                f"{keep}")
    return (f"{host}: no backup taken before release {release} (only a deploy that runs "
            f"migrations takes one); {kept}. See `invoke releases` for the release ids")


ns = Collection("deploy", deploy, unlock)
db_ns = Collection("db", restore)

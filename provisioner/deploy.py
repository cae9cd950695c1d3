"""The deploy and rollback flows over a fleet: one SSH connection per host for the whole run,
hosts in parallel, every phase one exec per host (provisioner/remote/deploy.py), reported
through the event stream (role: the app's name; resources: lock, prepare, switch, finish).

deploy:   build the artifact once -> lock + prepare on every host in parallel (nothing live
          changes) -> switch in batches (--serial, default 1 host): symlink, pm2 reload, health
          gate -> finish on every host (manifest, prune, audit line, lock released).
          --canary N: the first batch is N hosts, held and watched (their health on loopback,
          their 5xx rate in the load balancers' access logs) before the other batches.
          blue-green: the idle colour of every host switches at once, passes its gate on its
          own port, then the load balancers flip to it (go_live).
          A failed gate switches that host back; hosts switched before it go back too, so the
          fleet never runs two releases after a failed deploy.
rollback: lock on every host -> the same switch to the previous good release -> finish.
          blue-green: when the idle colour still runs that release and answers, only the flip.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from provisioner import backups
from provisioner import balancers as lbs
from provisioner import colours
from provisioner import humanize
from provisioner import lock as run_lock
from provisioner.connection import Connection, Unreachable
from provisioner.errors import (EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_UNREACHABLE, InputError,
                                Problem)
from provisioner.interrupt import Stop, on_signals
from provisioner.inventory import App, Host, Inventory
from provisioner.releases import Artifact, RemoteError, batches, call, release_id, rollback_target

AUDIT_LOG = run_lock.AUDIT_LOG
# seconds `pgbackrest check` waits for the WAL holding a pre-migration restore point to reach
# the repository (pgBackRest's own default)
ARCHIVE_WAIT = 60


@dataclass(frozen=True)
class Canary:
    """`deploy --canary N`: the first N hosts switch first and are held `hold` seconds while
    watched; more than `max_5xx` percent of their answers being 5xx, or their health check
    failing, switches every switched host back."""
    hosts: int
    hold: float
    max_5xx: float
    balancers: tuple[Host, ...]        # where the canaries' answers are logged


def canary_plan(inv: Inventory, app: App, hosts: list[Host], n: int,
                hold: float | None) -> Canary | None:
    """--canary N (0: none) checked against the fleet and the inventory: InputError before any
    server is touched."""
    if not n:
        return None
    if app.colours:
        raise InputError(Problem("command line", None, "--canary", f"app {app.name} deploys "
                                 "blue-green: its load balancers flip every host at once",
                                 "deploy without --canary (the new colour passes its health "
                                 "gate before any request reaches it)"))
    if n >= len(hosts):
        fix = (f"pass --canary {len(hosts) - 1} or fewer" if len(hosts) > 1 else
               "a canary needs two hosts or more: deploy without --canary")
        raise InputError(Problem("command line", None, "--canary",
                                 f"--canary {n} leaves no host to deploy after the canaries: app "
                                 f"{app.name} runs on {len(hosts)} host(s) here "
                                 f"({', '.join(h.name for h in hosts)})", fix))
    balancers = [h for h, _ in lbs.balancers(inv, app)]
    if not balancers:
        raise InputError(Problem(inv.path, app.line, f"apps.{app.name}",
                                 f"no host runs role nginx with a site whose upstream_group is "
                                 f"{app.group} and upstream_port {app.port}: the canaries' 5xx "
                                 "rate cannot be watched",
                                 "add that site to the load balancer's `nginx_sites`, or deploy "
                                 "without --canary"))
    return Canary(n, app.canary_hold if hold is None else hold, app.canary_max_5xx,
                  tuple(balancers))


def app_hosts(inv: Inventory, app: App, limit: str | None, switching: bool = True) -> list[Host]:
    """The app's hosts (its group, narrowed by --limit), each checked to run the app's pm2 app
    as the node role's user (for a deploy or rollback of a blue-green app, `switching`: behind
    a load balancer too, and all of them: the flip moves every host; `releases` and
    `deploy.unlock` only read or unlock, on any of them): InputError before any server is
    touched."""
    group = inv.hosts_in(app.group)
    chosen = {h.name for h in inv.select(limit)} if limit else {h.name for h in group}
    hosts = [h for h in group if h.name in chosen]
    if not hosts:
        raise InputError(Problem("command line", None, "--limit", f"no host of group "
                                 f"{app.group} (app {app.name}) is in {limit!r}",
                                 f"name hosts of group {app.group}: {', '.join(h.name for h in group)}"))
    problems = []
    for h in hosts:
        v = inv.hostvars(h.name)
        if "node_app_user" not in v or not any(isinstance(a, dict) and a.get("name") == app.name
                                               for a in v.get("pm2_apps") or []):
            problems.append(Problem(inv.path, app.line, f"apps.{app.name}",
                                    f"host {h.name} (group {app.group}) has no pm2 app named "
                                    f"{app.name}", f"give group {app.group} the roles node and pm2 "
                                    f"and a `pm2_apps` entry `{{name: {app.name}, script: ...}}`"))
    if switching and app.colours and not lbs.balancers(inv, app):
        problems.append(Problem(inv.path, app.line, f"apps.{app.name}.strategy",
                                f"app {app.name} deploys blue-green, but no host runs role nginx "
                                f"with a site whose upstream_group is {app.group} and "
                                f"upstream_port {app.port}: nothing would flip to the new colour",
                                "add that site to the load balancer's `nginx_sites`, or use "
                                "`strategy: reload`"))
    if switching and app.colours and len(hosts) != len(group):
        problems.append(Problem("command line", None, "--limit", f"app {app.name} deploys "
                                "blue-green: the load balancers flip every host of group "
                                f"{app.group} at once", "leave out --limit"))
    if problems:
        raise InputError(problems)
    return hosts


@dataclass
class Fleet:
    inv: Inventory
    hosts: list[Host]
    app: App
    events: object
    task: str
    conns: dict[str, Connection] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)     # unreachable host -> why: left alone
    stop: Stop = field(default_factory=Stop)     # Ctrl-C / SIGTERM during the rollout

    def __post_init__(self):
        self.balancers = lbs.balancers(self.inv, self.app)        # [(host, its sites)]
        self.sites = {h.name: sites for h, sites in self.balancers}
        self.owner = run_lock.owner(self.events.run_id, self.task, self.inv.env)
        job = f" ({self.owner['ci_job']})" if self.owner.get("ci_job") else ""
        self.owner["by"] = f"{self.owner['who']}@{self.owner['from']}{job}"
        # a deploy that migrates may wait for a first full backup: its limit is checked now,
        # before any server (bad input, exit 2)
        self.stanza = backups.stanza_of(self.inv, self.app.database[0]) \
            if self.app.migrate and self.app.database else None
        self.first_backup_limit = backups.first_backup_limit(self.inv, self.stanza) \
            if self.stanza and self.task == "deploy" else None

    def base(self, host: Host, op: str, **more) -> dict:
        v = self.inv.hostvars(host.name)
        req = {"op": op, "app": self.app.name, "user": v["node_app_user"],
               "home": v["node_app_home"], "run_id": self.events.run_id}
        if self.app.colours:      # blue-green: each colour's link and port; any one's env
            req.update(colours={c: {"link": colours.link(self.app.name, c), "port": p}
                                for c, p in self.app.colours.items()},
                       health_path=self.app.health_path,
                       ecosystem=colours.ecosystem(self.app.name, colours.COLOURS[0]))
        return {**req, **more}

    def call(self, host: Host, request: dict, timeout: float | None = None) -> dict:
        return call(self.conn(host), request, timeout=timeout)

    def conn(self, host: Host) -> Connection:
        if host.name not in self.conns:
            self.started[host.name] = time.monotonic()
            self.conns[host.name] = Connection(host, self.inv.known_hosts, host.sudo_password)
        return self.conns[host.name]

    def each(self, hosts: list[Host], resource: str, fn) -> dict[str, dict]:
        """fn(host) -> (status, reason, answer) on every host in parallel, each result
        reported as a step; an unreachable host or a broken helper is a step too."""
        def one(h: Host):
            t0 = time.monotonic()
            if h.name in self.lost:         # not asked again: each try would wait for it
                self.events.step(host=h.name, role=self.app.name, resource=resource,
                                 status="skipped", reason="unreachable earlier in this run",
                                 seconds=0.0)
                return h.name, {"ok": False, "unreachable": True, "skipped": True}
            try:
                status, reason, answer = fn(h)
            except Unreachable as e:
                self.lost[h.name] = str(e)
                status, reason, answer = "unreachable", str(e), {"ok": False, "unreachable": True}
            except RemoteError as e:
                status, reason, answer = "failed", str(e), {"ok": False, "error": str(e)}
            output = answer.get("error") if status == "failed" else None
            self.events.step(host=h.name, role=self.app.name, resource=resource, status=status,
                             reason=reason, seconds=time.monotonic() - t0, output=output)
            return h.name, answer
        with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            return dict(pool.map(one, hosts))

    def lock(self, hosts: list[Host], artifact: Artifact | None = None,
             release: str | None = None) -> dict[str, dict]:
        """Take the deploy lock on each host (taking over the lock of a run that died on this
        machine) and, with an artifact, prepare the release there."""
        def fn(h: Host):
            req = self.base(h, "lock", owner=self.owner, shared=list(self.app.shared))
            data = b""
            if artifact is not None:
                req.update(release=release, commit=artifact.commit, ref=artifact.ref,
                           artifact={"size": len(artifact.data), "sha256": artifact.sha256})
                data = artifact.data
            answer = call(self.conn(h), req, data)
            holder = answer.get("holder") or {}
            if not answer.get("ok") and not answer.get("busy") and holder.get("run_id") \
                    and run_lock.dead_here(holder):
                answer = call(self.conn(h), {**req, "take_from": holder["run_id"]}, data)
            notes = []
            if answer.get("took_over"):
                notes.append(f"took over the lock of a dead run: "
                             f"{run_lock.holder_text(answer['took_over'])}")
            if answer.get("cleaned"):
                notes.append(f"removed what a dead deploy left: {', '.join(answer['cleaned'])}")
            if not answer.get("ok"):
                if holder:
                    answer["locked"] = (f"{h.name}: deploy lock of {self.app.name} held by "
                                        f"{run_lock.holder_text(holder)}"
                                        + ("; a command of that run still runs there"
                                           if answer.get("busy") else ""))
                    return "skipped", answer["locked"], answer
                return "failed", answer.get("error", "failed"), answer
            if artifact is None:      # a lock taken over, a dead deploy's leftovers gone: changes
                return ("changed" if notes else "ok"), "; ".join(["locked"] + notes), answer
            return "changed", "; ".join([f"release {release} prepared: node_modules "
                                         f"{answer['install']}"] + notes), answer
        return self.each(hosts, "prepare" if artifact else "lock", fn)

    def switch(self, hosts: list[Host], release: str, revert: bool = True,
               colour: str | None = None) -> dict[str, dict]:
        """current (blue-green: `colour`'s link and pm2 app) -> release, reload, health gate
        on the port it listens on."""
        port = self.app.colours[colour] if colour else self.app.port
        where = {"link": colours.link(self.app.name, colour),
                 "process": colours.process(self.app.name, colour),
                 "ecosystem": colours.ecosystem(self.app.name, colour)} if colour else {}

        def fn(h: Host):
            req = self.base(h, "switch", release=release, revert=revert, port=port,
                            health_path=self.app.health_path,
                            health_timeout=self.app.health_timeout, **where)
            # bounded: reload, the gate and maybe a switch back; a host cut off mid-switch
            # must not hold the rollout for the whole command timeout
            a = call(self.conn(h), req, timeout=3 * self.app.health_timeout + 120)
            if a.get("ok"):
                return "changed", (f"{colour or 'current'} -> {release} (was "
                                   f"{a['previous'] or 'none'}), pm2 {a['how']}, health: "
                                   f"{a['seen']}"), a
            if "error" in a:
                return "failed", a["error"], a
            back = (f"; switched back to {a['reverted']}, health: {a['revert_seen']}"
                    if a.get("reverted") else "; nothing to switch back to")
            return "failed", (f"health gate failed for {release} on 127.0.0.1:{port}"
                              f"{self.app.health_path}: saw {a['seen']}{back}"), a
        return self.each(hosts, f"switch {colour + ' ' if colour else ''}{release}", fn)

    def watch(self, canaries: list[Host], release: str, canary: Canary) -> dict[str, dict]:
        """Hold the canaries `canary.hold` seconds: their health URL on loopback (one exec
        each) and their answers in every load balancer's access log (one exec each), all at
        once; the first to see trouble stops the others (one more exec each), so the switch-
        back follows at once. Returns the answers of the watchers that saw trouble, each with
        "why"."""
        upstreams = [f"{h.address}:{self.app.port}" for h in canaries]
        bound = canary.hold + 120        # a host cut off mid-hold must not hold the run
        stop_once = threading.Lock()

        def trouble() -> None:
            if not stop_once.acquire(blocking=False):
                return
            def stop(h: Host):
                try:
                    self.call(h, {"op": "stop_watch", "app": self.app.name,
                                  "run_id": self.events.run_id}, timeout=30)
                except (Unreachable, RemoteError):
                    pass                 # that watcher ends with its hold
            with ThreadPoolExecutor(max_workers=len(canaries) + len(canary.balancers)) as pool:
                list(pool.map(stop, [*canaries, *canary.balancers]))

        def stopped(a: dict) -> str:
            return "; stopped early: another watcher saw trouble" if a.get("stopped") else ""

        def health(h: Host):
            a = self.call(h, self.base(h, "watch", release=release, hold=canary.hold,
                                       port=self.app.port, health_path=self.app.health_path),
                          timeout=bound)
            if not a.get("ok"):
                trouble()
            if "error" in a:
                return "failed", a["error"], a
            a["why"] = (f"healthy through the {canary.hold:g} s hold ({a['asked']} checks)"
                        f"{stopped(a)}" if a["ok"] else f"canary {h.name} turned unhealthy "
                        f"during the hold: 127.0.0.1:{self.app.port}{self.app.health_path} "
                        f"answered {a['seen']}")
            return ("ok" if a["ok"] else "failed"), a["why"], a

        def errors(h: Host):
            a = self.call(h, {"op": "watch_5xx", "app": self.app.name, "hold": canary.hold,
                              "upstreams": upstreams, "max_5xx": canary.max_5xx,
                              "run_id": self.events.run_id}, timeout=bound)
            if not a.get("ok"):
                trouble()
            if "error" in a:
                return "failed", a["error"], a
            counts = ", ".join(f"{n} x {st}" for st, n in sorted(a["statuses"].items()))
            a["why"] = (f"{h.name} logged {a['errors']} 5xx of {a['answers']} answers from "
                        f"{', '.join(upstreams)} (limit {canary.max_5xx:g} %)"
                        + (f": {counts}" if counts else ": no request reached them")
                        + (stopped(a) if a["ok"] else ""))
            return ("ok" if a["ok"] else "failed"), a["why"], a

        with on_signals(self.stop), ThreadPoolExecutor(max_workers=2) as pool:
            watched = pool.submit(self.each, canaries, f"canary {release}", health)
            logged = pool.submit(self.each, list(canary.balancers), "canary 5xx rate", errors)
            interrupted = _wait_or_stop([watched, logged], trouble, self.stop)
            answers = [(n, a) for n, a in watched.result().items()] + \
                [(n, a) for n, a in logged.result().items()]
        failed = {n: dict(a, canary=True, why=a.get("why") or a.get("error") or "unreachable")
                  for n, a in answers if not a.get("ok")}
        if interrupted:
            failed["controller"] = {"ok": False, "canary": True,
                                    "why": f"the hold was interrupted ({self.stop.name})"}
        return failed

    def finish(self, hosts: list[Host], states: dict[str, str], result: str,
               discard: str | None = None, point: str | None = None,
               backups: dict[str, dict] | None = None) -> None:
        """point (blue-green, after the flip): current -> that release. backups: {release: the
        backup taken before it migrated} for each host's manifest (`invoke releases`)."""
        def fn(h: Host):
            audit = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "task": self.task, "app": self.app.name, "env": self.inv.env,
                     "by": self.owner["by"], "run_id": self.events.run_id, "result": result,
                     "states": states}
            a = call(self.conn(h), self.base(h, "finish", states=states, keep=self.app.keep,
                                             audit=audit, audit_log=AUDIT_LOG, discard=discard,
                                             point=point, backups=backups or {}))
            if not a.get("ok"):
                return "failed", a.get("error", "failed"), a
            pruned = f"; pruned {', '.join(a['pruned'])}" if a.get("pruned") else ""
            return "ok", f"current {a['current']}{pruned}; lock released", a
        finished = self.each(hosts, "finish", fn)
        if self.app.database and hosts == self.hosts:
            self.prune_dumps(finished)

    def prune_dumps(self, finished: dict[str, dict]) -> None:
        """The pre-migration backups (dumps, restore points' records) go with their releases:
        once every host of the app has finished (its releases pruned), the database host
        removes those of releases older than every release a host keeps (remote
        dumps_to_prune). Only a run that saw every host's releases decides: after --limit, or
        a host that did not finish, they stay until a run that does."""
        group = [h.name for h in self.inv.hosts_in(self.app.group)]
        unknown = [n for n in group if not finished.get(n, {}).get("ok")]
        kept = sorted({e["id"] for a in finished.values() for e in a.get("manifest") or []}
                      | {a["current"] for a in finished.values() if a.get("current")})

        def fn(h: Host):
            if unknown:
                return ("skipped", f"pre-migration backups kept: the releases on "
                        f"{', '.join(unknown)} are not known to this run (--limit, or no finish "
                        "there)", {"ok": True})
            a = call(self.conn(h), {"op": "prune_backups", "app": self.app.name, "kept": kept})
            if not a.get("ok"):
                return "failed", a.get("error", "failed"), a
            if not a["pruned"]:
                return "ok", ("no pre-migration backup to prune: every release they were taken "
                              "before is kept"), a
            return "changed", (f"pruned the pre-migration backups taken before "
                               f"{', '.join(a['pruned'])} (their releases are pruned on every "
                               "host)"), a
        self.each([self.db_host()], "prune backups", fn)

    def db_host(self) -> Host:
        return self.inv.hosts[self.app.database[0]]

    def backup(self, release: str) -> dict:
        """Before `release` migrates, on the database host: when the env's pgbackrest role
        backs that host up, a restore point archived to the repository (db.restore rewinds
        the whole cluster to it); otherwise pg_dump -Fc of the app's database."""
        stanza = self.stanza

        def dump(h: Host):
            a = call(self.conn(h), {"op": "backup", "app": self.app.name, "release": release,
                                    "database": self.app.database[1]})
            if not a.get("ok"):
                return "failed", a.get("error", "failed"), a
            return "changed", (f"database {self.app.database[1]} saved to {a['path']} "
                               f"({a['size']} bytes): `invoke db.restore --before {release}`"), a

        def point(h: Host):
            req = {"op": "restore_point", "app": self.app.name, "release": release,
                   "database": self.app.database[1], "stanza": stanza.name,
                   "port": self.inv.hostvars(h.name)["postgresql_port"],
                   "archive_timeout": ARCHIVE_WAIT}
            a = call(self.conn(h), req)
            first = ""
            if a.get("no_backup"):
                problem = self.first_backup(stanza, a.get("missing") or "no backup yet")
                if problem:
                    return "failed", problem, {"ok": False, "error": problem}
                first = (f"stanza {stanza.name} had {a.get('missing') or 'no backup yet'}: "
                         f"took a full one on {stanza.repo} first; ")
                a = call(self.conn(h), req)
                if a.get("no_backup"):
                    a["error"] = (f"{a['error']}, even after the full backup unit ran on "
                                  f"{stanza.repo} (it skips while another backup of the stanza "
                                  "runs): wait for `invoke backup.status --env "
                                  f"{self.inv.env} --limit {stanza.name}` to show one, then "
                                  "deploy again")
            if not a.get("ok"):
                return "failed", a.get("error", "failed"), a
            return "changed", (f"{first}restore point {a['name']} at {a['lsn']} (WAL {a['wal']} "
                               f"archived to {stanza.repo}, stanza {stanza.name}): `invoke "
                               f"db.restore --before {release}` rewinds the whole PostgreSQL "
                               f"cluster on {h.name} to it"), a
        return self.each([self.db_host()], "backup before migrating",
                         dump if stanza is None else point)[self.db_host().name]

    def first_backup(self, stanza: backups.Stanza, missing: str = "no backup yet") -> str | None:
        """A full backup of `stanza` now, by its timer's own unit on the repository host (the
        database server cannot back itself up there), waited for in bounded polls up to
        pgbackrest_first_backup_timeout (a first full backup may take longer than the host's
        SSH command timeout), with a progress event after each: None, or what failed."""
        unit = backups.units(stanza, "full")
        limit = self.first_backup_limit or backups.first_backup_limit(self.inv, stanza)
        said = f"{unit} on {stanza.repo}"

        def progress(seconds: float) -> None:
            self.events.progress(host=stanza.repo, role=self.app.name,
                                 resource="first full backup",
                                 message=f"{said} still running after {humanize.age(seconds)} "
                                         f"(waiting up to {humanize.age(limit)})")
        run = backups.run_unit(self.conn(self.inv.hosts[stanza.repo]), unit, limit, progress)
        if run.state == "ok":
            return None
        again = (f"run `invoke backup --env {self.inv.env} --limit {stanza.name} --kind full` and "
                 "deploy again")
        if run.state == "running":
            return (f"stanza {stanza.name} has {missing} in the repository, and its full "
                    f"backup ({said}) still runs after {humanize.age(run.seconds)} "
                    f"(pgbackrest_first_backup_timeout: {limit} s): it goes on there, and this "
                    "deploy stops before migrating. Deploy again once `invoke backup.status "
                    f"--env {self.inv.env} --limit {stanza.name}` shows the full backup, or "
                    "raise pgbackrest_first_backup_timeout (roles/pgbackrest/defaults.yml) for "
                    "the repository host")
        if run.state == "unknown":
            return (f"stanza {stanza.name} has {missing} in the repository, and the wait for its "
                    f"full backup ({said}) stopped after {humanize.age(run.seconds)}: "
                    f"{run.problem}; the backup may still run there, and this deploy stops "
                    f"before migrating. Deploy again once `invoke backup.status --env "
                    f"{self.inv.env} --limit {stanza.name}` shows the full backup")
        return (f"stanza {stanza.name} has {missing} in the repository, and its full backup "
                f"({said}) failed after {humanize.age(run.seconds)}, so this deploy stops before "
                f"migrating: {run.problem}\nfix that, then {again}")

    def migrate(self, host: Host, release: str, argv: tuple, env: dict | None = None) -> bool:
        """argv in `release` on `host`, as the app user with the app's env; its output goes
        with the step (secrets redacted by the event stream)."""
        def fn(h: Host):
            a = call(self.conn(h), self.base(h, "migrate", release=release, argv=list(argv),
                                             env=env or {}))
            if not a.get("ok"):
                return "failed", a.get("error", "failed"), a
            last = (a.get("output") or "").strip().splitlines()
            return "changed", f"{' '.join(argv)} in {release}: {last[-1] if last else 'done'}", a
        return bool(self.each([host], "migrate", fn)[host.name].get("ok"))

    def unlock(self, hosts: list[Host]) -> None:
        """Release this run's lock where it was taken (a run that stops early)."""
        def fn(h: Host):
            a = call(self.conn(h), self.base(h, "unlock"))
            return ("ok" if a.get("ok") else "failed"), "lock released", a
        self.each(hosts, "unlock", fn)

    def close(self) -> None:
        for name, c in self.conns.items():
            self.events.host_done(name, remote_commands=c.commands,
                                  seconds=time.monotonic() - self.started[name])
            c.close()


def _wait_or_stop(futures: list, trouble, stop: Stop) -> bool:
    """Wait for every future. A stop asked for meanwhile (Ctrl-C or SIGTERM ending a canary's
    hold) calls trouble(), so the watchers end at once and the canaries are switched back as
    after trouble, rather than the run dying after the hold with the fleet on two releases and
    its lock left: True then. A second signal ends the process as usual."""
    while wait(futures, timeout=0.2).not_done:
        if stop:
            trouble()              # once: it stops the watchers only the first time
    return bool(stop)


def _refused(fleet: Fleet, answers: dict[str, dict]) -> int | None:
    """After the lock phase: None when every host is ours, else the exit code (4 naming the
    holders when a lock is held; the error event then is already written)."""
    bad = [a for a in answers.values() if not a.get("ok")]
    if not bad:
        return None
    held = [a["locked"] for a in bad if a.get("locked")]
    if held:
        return fleet.events.fail_run(EXIT_LOCKED, "; ".join(held))
    return EXIT_UNREACHABLE if all(a.get("unreachable") for a in bad) else EXIT_FAILED


def rollout(fleet: Fleet, release: str, serial: int, canary: Canary | None = None,
            colour: str | None = None) -> tuple[bool, list[Host], dict]:
    """Switch batch by batch (a canary batch first, held and watched); on the first failure,
    switch back every host this rollout switched. Returns (passed, the hosts switched back,
    the failed answers: with "left" those of hosts still on `release`, see _switch_back)."""
    plan = batches(fleet.hosts, serial)
    if canary:
        plan = [fleet.hosts[:canary.hosts]] + batches(fleet.hosts[canary.hosts:], serial)
    done: list[tuple[Host, str | None]] = []
    # A first Ctrl-C or SIGTERM lets the batch being switched finish, then switches back every
    # host this rollout switched, as a failed gate does: the fleet never stays on two releases
    # because someone stopped the run between batches. A second signal ends it at once.
    with on_signals(fleet.stop):
        for i, batch in enumerate(plan):
            if fleet.stop:
                failed = {"controller": {"ok": False, "why": (
                    f"{fleet.stop.reason} before {', '.join(h.name for h in batch)} switched")}}
            else:
                answers = fleet.switch(batch, release, colour=colour)
                failed = {n: a for n, a in answers.items() if not a.get("ok")}
                done += [(h, answers[h.name].get("previous")) for h in batch
                         if h.name not in failed]
                if canary and i == 0 and not failed:
                    failed = fleet.watch(batch, release, canary)
            if failed:
                back, left = _switch_back(fleet, done, release, colour)
                return False, back, {**failed, **left}
    return True, [], {}


def _switch_back(fleet: Fleet, done: list[tuple[Host, str | None]], release: str,
                 colour: str | None) -> tuple[list[Host], dict[str, dict]]:
    """Every host of `done` (switched to `release`, with what it ran before) back to that.
    Returns (the hosts back, {host: why} of those still on `release`: it ran nothing before
    (a first deploy), or its switch back failed), so the output never claims a host went
    back that did not."""
    back, left = [], {}

    def still(h: Host) -> str:
        # blue-green: the idle colour, which no load balancer sends requests to
        where = f"{h.name}'s {colour} (not served)" if colour else h.name
        return f"{where} still runs {release}"
    for previous in sorted({p for _, p in done if p}):
        hosts = [h for h, p in done if p == previous]
        answers = fleet.switch(hosts, previous, revert=False, colour=colour)
        for h in hosts:
            a = answers[h.name]
            if a.get("ok"):
                back.append(h)
            else:
                left[h.name] = {"ok": False, "left": True, "why": (
                    f"{still(h)}: its switch back to {previous} failed "
                    f"({a.get('error') or a.get('seen') or 'unreachable'})")}
    for h, previous in done:
        if previous is None:
            left[h.name] = {"ok": False, "left": True, "why": (
                f"{still(h)}: it ran no release before, nothing to switch back to")}
    return back, left


def go_live(fleet: Fleet, release: str, answers: dict[str, dict]) -> tuple[bool, list[Host], dict]:
    """blue-green: the idle colour runs `release` on every host (switched at once and gated
    on its own port, unless it already runs it and answers: a rollback), then every load
    balancer flips to it. Nothing serves the new release before the flip; a failed gate
    switches the idle colour back (it stays the way back); a refused flip flips back the
    load balancers that had flipped. Returns what rollout() returns."""
    live, seen = lbs.live_colour(fleet)
    if live is None:
        return False, [], {"lb": {"ok": False, "why": f"the load balancers do not agree on a "
                                  f"live colour ({seen}): provision them, or flip them by hand"}}
    idle = colours.other(live)
    if not all(_runs(answers[h.name], idle, release) for h in fleet.hosts):
        passed, back, failed = rollout(fleet, release, 0, colour=idle)
        if not passed:
            return passed, back, failed
    flipped = lbs.flip(fleet, idle)
    refused = {n: a for n, a in flipped.items() if not a.get("ok")}
    if refused:
        if len(refused) < len(flipped):
            lbs.flip(fleet, live)
        return False, [], {n: dict(a, why=f"{n}: flip to {idle} refused: "
                                          f"{a.get('error', 'unreachable')}")
                           for n, a in refused.items()}
    return True, [], {}


def _runs(lock_answer: dict, colour: str, release: str) -> bool:
    """Whether the lock phase saw `colour` run `release` and answer healthy on this host."""
    seen = (lock_answer.get("colours") or {}).get(colour) or {}
    return seen.get("release") == release and bool(seen.get("healthy"))


def _lock_first(fleet: Fleet) -> int | None:
    """The deploy lock on every host, alone (one exec each): None when every host is ours;
    else the locks taken are given back and the exit code returned (4 naming the holders)."""
    answers = fleet.lock(fleet.hosts)
    code = _refused(fleet, answers)
    if code is not None:
        fleet.unlock([h for h in fleet.hosts if answers[h.name].get("ok")])
    return code


def deploy(fleet: Fleet, artifact: Artifact, serial: int, canary: Canary | None = None) -> int:
    release = release_id(artifact.commit)
    if fleet.app.migrate:
        # the database is dumped only once every host is ours: a deploy that a lock refuses
        # (another deploy runs) must not dump, let alone while that one migrates. The lock
        # alone first costs one exec per host, paid only by apps that migrate.
        code = _lock_first(fleet)
        if code is not None:
            return code
    with ThreadPoolExecutor(max_workers=1) as side:
        # the pre-migration backup is taken on the database host while the app hosts prepare
        # (the lock phase again: this run's lock is taken again at once, then the release
        # prepared)
        backup = side.submit(fleet.backup, release) if fleet.app.migrate else None
        answers = fleet.lock(fleet.hosts, artifact, release)
        taken = backup.result() if backup else None
        backed_up = taken is None or taken.get("ok")
    prepared = [h for h in fleet.hosts if answers[h.name].get("ok")]
    code = _refused(fleet, answers)
    if code is not None:
        if prepared:          # the release goes again: nothing of this deploy stays anywhere
            fleet.finish(prepared, {}, "prepare failed", discard=release)
        return code
    if fleet.app.migrate:     # once, before any switch; a failed migration switches nothing
        if not backed_up or not fleet.migrate(fleet.hosts[0], release, fleet.app.migrate):
            fleet.finish(fleet.hosts, {}, "migration failed", discard=release)
            return EXIT_FAILED
    if fleet.app.colours:
        passed, back, failed = go_live(fleet, release, answers)
    else:
        passed, back, failed = rollout(fleet, release, serial, canary)
    seen = [a["why"] for a in failed.values() if a.get("why") and not a.get("left")]
    recorded = {release: backup_record(taken, fleet.db_host().name)} if taken else None
    fleet.finish(fleet.hosts, {release: "live" if passed else "failed"},
                 _result(passed, seen, canary), point=release if passed and fleet.app.colours
                 else None, backups=recorded)
    if passed:
        return EXIT_OK
    return _failed(fleet, release, canary, back, failed, seen)


def backup_record(answer: dict, host: str) -> dict:
    """What a release's manifest keeps of the backup taken before it migrated (the answer of
    op backup or op restore_point, on the database host `host`): where it is and what it is,
    so that `invoke releases` shows what `db.restore --before` can restore."""
    kind = answer.get("kind", "dump")              # op backup's answer names no kind
    keys = ("stanza", "name", "lsn", "at", "path") if kind == "pgbackrest" else \
        ("path", "size", "at")
    return {"kind": kind, "host": host, **{k: answer[k] for k in keys if k in answer}}


def _failed(fleet: Fleet, release: str, canary: Canary | None, back: list[Host],
            failed: dict[str, dict], seen: list[str]) -> int:
    """The exit code of a deploy that did not go live, its error saying what was seen and
    where each host is: 3 with a host lost, 128 + the signal's number when stopped, else 1."""
    left = "".join(f"; {a['why']}" for a in failed.values() if a.get("left"))
    if fleet.lost:
        where = "; ".join(f"{h.name} on {_on(fleet, h, release, back, failed)}"
                          for h in fleet.hosts)
        fleet.events.fail_run(EXIT_UNREACHABLE, f"{', '.join(fleet.lost)} unreachable during "
                              f"the rollout of {release}: {where}")
        return EXIT_UNREACHABLE
    code = fleet.stop.code if fleet.stop else EXIT_FAILED
    if seen and canary:
        went = (f"; switched back: {', '.join(h.name for h in back)}, to the release each "
                "ran before" if back else "")
        return fleet.events.fail_run(code, f"canary of {release} failed: "
                                     f"{'; '.join(seen)}{went}{left}")
    if seen or left:
        gate = "; ".join(seen) or "a health gate failed (see above)"
        went = (f"; switched back: {', '.join(h.name for h in back)}" if fleet.stop and back
                else "")
        return fleet.events.fail_run(code, f"{release} did not go live: {gate}{went}{left}")
    return code


def _result(passed: bool, seen: list[str], canary: Canary | None) -> str:
    """The audit line's result: a failed gate's switch answers carry no "why"; a canary's
    watchers and a blue-green's load balancers do."""
    if passed:
        return "ok"
    if seen:
        return "canary failed" if canary else "did not go live: " + "; ".join(seen)
    return "health gate failed"


def _on(fleet: Fleet, host: Host, release: str, switched_back: list[Host],
        failed: dict[str, dict]) -> str:
    """Which release a host is left on after a failed rollout, as far as this run knows."""
    if host.name in fleet.lost:
        return "an unknown release (unreachable; its deploy lock stays until a deploy takes it over)"
    if failed.get(host.name, {}).get("left"):
        return f"{release} (not switched back)"
    return "the release it ran before" + (" (switched back)" if host in switched_back else "")


def rollback(fleet: Fleet, to: str | None, serial: int, with_migrations: bool = False) -> int:
    answers = fleet.lock(fleet.hosts)
    code = _refused(fleet, answers)
    if code is not None:
        fleet.unlock([h for h in fleet.hosts if answers[h.name].get("ok")])
        return code
    try:
        target = rollback_target(answers, to)
    except ValueError as e:
        fleet.unlock(fleet.hosts)
        return fleet.events.fail_run(EXIT_FAILED, str(e))
    currents = {a.get("current") for a in answers.values()} - {target, None}
    if with_migrations:
        # the down migrations of what is rolled back, run by the newest release (it knows
        # them), newest first; TARGET_RELEASE_DIR tells it which ones the target lacks
        first = fleet.hosts[0]
        newest = answers[first.name].get("current")
        if newest and newest != target and not fleet.migrate(
                first, newest, fleet.app.migrate_down,
                {"TARGET_RELEASE_DIR": f"/srv/{fleet.app.name}/releases/{target}"}):
            fleet.unlock(fleet.hosts)
            return EXIT_FAILED
    if fleet.app.colours:
        passed, _, failed = go_live(fleet, target, answers)
    else:
        passed, _, failed = rollout(fleet, target, serial)
    states = {target: "live", **{c: "rolled-back" for c in currents}} if passed else {}
    seen = [a["why"] for a in failed.values() if a.get("why")]
    fleet.finish(fleet.hosts, states, _result(passed, seen, None),
                 point=target if passed and fleet.app.colours else None)
    if passed:
        return EXIT_OK
    if seen:
        return fleet.events.fail_run(fleet.stop.code if fleet.stop else EXIT_FAILED,
                                     f"{target} did not go live: {'; '.join(seen)}")
    return EXIT_UNREACHABLE if all(a.get("unreachable") for a in failed.values()) else EXIT_FAILED

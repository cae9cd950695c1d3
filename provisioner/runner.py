"""Roles x hosts: hosts in parallel (in `--serial` batches), per role one facts exec, a pure
plan, and one apply exec that also runs the role's notified handlers.

A host's failure is reported while the others finish. In check mode nothing is written on any
server: no lock, no apply, no audit line; only the read-only facts execs run.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from provisioner import agent, apt_batch, lock, ops, oscache, platforms
from provisioner import plan as saved_plan
from provisioner.api import Guard, NotAResource, RoleContext, not_a_resource
from provisioner.change import Change, Noop
from provisioner.connection import Connection, Unreachable
from provisioner.facts import FactError, Facts
from provisioner.interrupt import Stop
from provisioner.inventory import Host, Inventory
from provisioner.ops._base import run as run_step, write as write_step
from provisioner.roles import REPO_ROOT, RoleCode, load_role


@dataclass
class Options:
    """How hosts and roles are scheduled. The task, check mode and diff are the event
    stream's (Events.task/.check/.diff), held there once: what is reported is what is done."""
    serial: int = 0                   # hosts per batch; 0 = all at once
    forks: int = 50
    max_fail_percentage: float = 0.0  # a batch failing more than this stops later batches
    roles: list[str] | None = None    # only these roles (in inventory order)
    saved: dict | None = None         # host -> plan.HostPlan: apply exactly these (`invoke apply`)
    last_run: bool = False            # also read each host's last audit line (`invoke drift`)


@dataclass
class PreparedRole:
    name: str
    resources: list
    handlers: dict
    guards: list
    request: dict


@dataclass
class RoleError(Exception):
    name: str
    error: str


@dataclass
class HostResult:
    host: str
    status: str = "ok"                 # ok / changed / failed / unreachable / skipped
    changed: int = 0
    failed: int = 0
    remote_commands: int = 0
    error: str | None = None
    roles_done: list[str] = field(default_factory=list)
    # check mode: role -> its planned change entries, and the facts they were planned from
    planned: dict[str, list[dict]] = field(default_factory=dict)
    facts: dict[str, str] | None = None
    last_run: str | None = None        # the audit log's last line, with Options.last_run


class Runner:
    def __init__(self, inventory: Inventory, events, options: Options,
                 connect: Callable[[Host], Connection] | None = None, stop: Stop | None = None):
        self.inv = inventory
        self.events = events
        self.opts = options
        self.stop = stop if stop is not None else Stop()   # read before each host and role
        self.connect = connect or (lambda h: Connection(h, inventory.known_hosts, h.sudo_password))
        self._roles: dict[str, RoleCode] = {}

    def role(self, name: str) -> RoleCode:
        if name not in self._roles:
            self._roles[name] = load_role(self.inv.roles[name])
        return self._roles[name]

    def roles_for(self, host: Host) -> list[str]:
        names = self.inv.roles_for(host.name)
        if self.opts.roles is not None:
            names = [r for r in names if r in self.opts.roles]
        return names

    def run(self, hosts: list[Host]) -> list[HostResult]:
        for h in hosts:                            # load every role before touching any server
            for r in self.roles_for(h):
                self.role(r)
        size = self.opts.serial or len(hosts) or 1
        batches = [hosts[i:i + size] for i in range(0, len(hosts), size)]
        results: list[HostResult] = []
        for n, batch in enumerate(batches):
            with ThreadPoolExecutor(max_workers=max(1, min(self.opts.forks, len(batch)))) as pool:
                done = list(pool.map(self.run_host, batch))
            results += done
            bad = sum(1 for r in done if r.status in ("failed", "unreachable"))
            later = [h for rest in batches[n + 1:] for h in rest]
            if self.stop and later:
                results += [self._not_started(h, self.stop.reason) for h in later]
                break
            if bad and 100.0 * bad / len(batch) > self.opts.max_fail_percentage and later:
                why = (f"{bad} of {len(batch)} hosts of the previous batch failed "
                       f"(max {self.opts.max_fail_percentage:g}%)")
                results += [self._not_started(h, why) for h in later]
                break
        return results

    def _not_started(self, host: Host, why: str) -> HostResult:
        self.events.step(host=host.name, role=None, resource="host", status="skipped",
                         reason=f"not started: {why}", seconds=0.0)
        self.events.host_done(host.name, remote_commands=0, seconds=0.0)
        return HostResult(host.name, status="skipped")

    # --- one host -------------------------------------------------------------------------

    def run_host(self, host: Host) -> HostResult:
        """Execs on a converged host: one for os facts (+ the run lock), one for every role's
        facts, one to release the lock; a role's facts are gathered again only when an earlier
        role changed this host, so later roles always plan against what earlier ones did.
        With the os facts this host gave last time (oscache), the roles are planned from those
        first and their facts asked in the first exec, after the lock: when the host gives the
        same os facts, the second exec is not made.
        The package batch (apt_batch) takes place right after the role that brings the
        firewall up (before the first role when none does): the missing packages of the roles
        after it in one exec, after which their facts are gathered again."""
        if self.stop:                      # a host of this batch still waiting for a fork
            return self._not_started(host, self.stop.reason)
        started = time.monotonic()
        res = HostResult(host.name)
        conn = None
        try:
            conn = self._open(host)
            if self.events.check:               # nothing is written on a server, not even
                conn.agent_cache = False        # the agent's cache
            owner = None
            hello: dict = {}
            if not self.events.check:
                owner = lock.owner(self.events.run_id, self.events.task, self.inv.env)
                hello["run_lock"] = lock.request(owner)
            if self.opts.last_run:            # in the exec that is made anyway
                hello["last_lines"] = [lock.AUDIT_LOG]
            cached = oscache.load(self.inv.env, host.name)
            guess = self._plan_roles(host, cached) if cached else None
            if guess:          # after run_lock: the agent gathers in the request's order
                hello.update(guess[1])
            first = self._facts(conn, hello)
            if self.opts.last_run:
                res.last_run = Facts(first).last_line(lock.AUDIT_LOG)
            if owner is not None:
                dead = lock.dead_holder(first["run_lock"])
                if dead:         # one more exec, only to recover from a killed run of ours
                    first = self._facts(conn, {"run_lock": lock.request(owner, dead["run_id"])})
                    guess = None                  # gathered under the dead run's lock
                took = lock.check(host.name, first["run_lock"])
                if took.get("stale"):
                    why = "its run's process is gone" if took.get("dead") else "older than its TTL"
                    self.events.warn(f"took over the run lock of {lock.holder_text(took['stale'])}: "
                                     f"{why}", host=host.name)
            try:
                if first["os"] != cached:
                    oscache.store(self.inv.env, host.name, first["os"])
                refused = platforms.unsupported(first["os"])
                if refused:                # nothing is planned, so nothing can half-apply
                    res.failed += 1
                    self.events.step(host=host.name, role=None, resource="os", status="failed",
                                     reason=refused, seconds=time.monotonic() - started)
                    plans, shared = [], None
                elif guess and first["os"] == cached:
                    plans = guess[0]
                    shared = Facts(_roles_facts(first)) if plans else None
                else:
                    plans, merged = self._plan_roles(host, first["os"])
                    shared = Facts(self._facts(conn, merged)) if plans else None
                if self.events.check:
                    res.facts = saved_plan.fact_items(shared.raw if shared else {})
                # the packages of the roles after the firewall's, in one apt transaction there
                at = apt_batch.start(batch_input(plans))
                why = self._plan_refusal(host, plans, shared, at) if self.opts.saved is not None else None
                if why:                     # before any change: the host is left as it is
                    res.status, res.error = "refused", why
                    self.events.step(host=host.name, role=None, resource="saved plan",
                                     status="skipped", reason=f"refused: {why}",
                                     seconds=time.monotonic() - started)
                    plans = []
                notified: dict = {}          # role -> its handlers the batch's writes notified
                for i, p in enumerate(plans):
                    if self.stop:
                        self._skip_roles(host, plans[i:], f"not run: {self.stop.reason}")
                        break
                    if i == at:              # never before the firewall role (if any) is done
                        shared, notified = self._run_batch(conn, host, plans, at, shared, res)
                        if res.failed:
                            self._skip_roles(host, plans[i:], "not run: the package batch failed before it")
                            break
                    changed_before = res.changed
                    self._run_role(conn, host, p, shared, res, notified.get(p.name))
                    if res.failed:                       # said, so that no one takes them as done
                        self._skip_roles(host, plans[i + 1:], f"not run: role {p.name} failed before it")
                        break
                    res.roles_done.append(p.name)
                    if res.changed != changed_before and not self.events.check:
                        shared = None          # stale now: the next role gathers its own
            finally:
                if owner is not None:
                    audit = None
                    if res.changed or res.failed:
                        audit = lock.audit_line(owner, REPO_ROOT, "failed" if res.failed else "changed",
                                                res.changed, res.failed)
                    answer = agent.call(conn, "finish", lock.finish_request(owner["run_id"], audit))
                    if answer.get("busy"):
                        self.events.warn(f"kept the run lock {lock.LOCK_DIR}: a command of this "
                                         "run is still running there and could not be stopped",
                                         host=host.name)
        except Unreachable as e:
            res.status, res.error = "unreachable", str(e)
            self.events.step(host=host.name, role=None, resource="connection", status="unreachable",
                             reason=str(e), seconds=time.monotonic() - started)
        except lock.LockHeld as e:
            res.status, res.error = "locked", str(e)
            self.events.step(host=host.name, role=None, resource="run lock", status="skipped",
                             reason=str(e), seconds=time.monotonic() - started)
        except Exception as e:  # one host's bug or broken server must not stop the others
            res.failed += 1
            res.error = f"{type(e).__name__}: {e}"
            self.events.step(host=host.name, role=None, resource="host", status="failed",
                             reason=res.error, seconds=time.monotonic() - started)
        finally:
            if conn is not None:
                res.remote_commands = conn.commands
                conn.close()
        if res.status == "ok":
            res.status = "failed" if res.failed else ("changed" if res.changed else "ok")
        # a held lock or a refused plan is a skip with its reason already reported, not a
        # host error
        self.events.host_done(host.name, remote_commands=res.remote_commands,
                              seconds=time.monotonic() - started,
                              error=None if res.status in ("locked", "refused") else res.error)
        return res

    def _plan_refusal(self, host: Host, plans: list, shared: Facts | None, at: int) -> str | None:
        """Why the saved plan must not be applied to this host now (its facts drifted, or
        they plan other changes), or None. Planning is local: no exec. The roles plan as
        check mode planned them: those after the package batch's place, after it."""
        mine = self.opts.saved.get(host.name)
        if mine is None:
            return "the plan holds nothing for this host"
        if any(isinstance(p, RoleError) for p in plans):
            return None                  # the run reports it as the failure it is
        now = {}
        batch, after = apt_batch.foresee(batch_input(plans), at, shared, **batch_context(plans))
        if batch.change is not None:
            now[apt_batch.PLAN_KEY] = [batch.change]
        for i, p in enumerate(plans):
            try:
                now[p.name] = [c for _r, result in ops.plan_all(p.resources, shared if i < at else after)
                               for c in result if isinstance(c, Change)]
            except Exception:            # the role's run reports it, as a provision would
                return None
        return mine.refusal(shared.raw if shared else {}, now)

    def _run_batch(self, conn: Connection, host: Host, plans: list, at: int,
                   shared: Facts | None, res: HostResult) -> tuple[Facts | None, dict]:
        """The package batch of the roles plans[at:], planned now: from `shared`, or when an
        earlier role made those stale, from their facts gathered in one exec (which they then
        plan from, instead of each gathering its own). Then the install in one apply exec and
        their facts gathered again in one exec (the packages brought their files, users and
        services). Check mode: planned as check mode plans (apt_batch.foresee), reported, and
        the roles plan as if it had run (their package steps say "installed by this run").
        `invoke apply`: a batch the saved plan does not hold (planned after the earlier roles'
        changes) is not sent. Returns the facts the roles after it start from, and by role the
        handlers its carried writes notified, with when they were done (on the server's clock)."""
        t0 = time.monotonic()
        later = batch_input(plans[at:])
        if not apt_batch.wanted(later):          # nothing it could take: not even a facts exec
            return shared, {}
        request = ops.merge_requests([*(p.request for p in plans[at:] if not isinstance(p, RoleError)),
                                      apt_batch.request(later)])

        def gather() -> Facts | None:
            try:
                return Facts(self._facts(conn, request))
            except (FactError, agent.AgentError) as e:
                res.failed += 1
                self.events.step(host=host.name, role=None, resource="apt batch", status="failed",
                                 reason=f"facts: {type(e).__name__}: {e}",
                                 seconds=time.monotonic() - t0)
                return None

        if self.events.check:
            batch, after = apt_batch.foresee(batch_input(plans), at, shared, **batch_context(plans))
        else:
            after = shared if shared is not None else gather()
            if after is None:
                return None, {}
            batch = apt_batch.plan(later, after, **batch_context(plans[at:]))
        c = batch.change
        if c is None:
            return after, {}

        def step(status: str, reason: str, output=None, diff=None):
            self.events.step(host=host.name, role=None, resource=c.resource, status=status,
                             reason=reason, seconds=time.monotonic() - t0, output=output, diff=diff)

        if self.events.check:
            res.planned[apt_batch.PLAN_KEY] = [saved_plan.change_entry(c)]
            res.changed += 1
            step("changed", f"would {c.action}: {c.why}", diff=c.diff)
            return after, {}
        if (self.opts.saved is not None and saved_plan.change_digest(c)
                not in self.opts.saved[host.name].allowed(apt_batch.PLAN_KEY)):
            res.failed += 1
            step("failed", "not in the plan (planned after the earlier roles' changes); nothing "
                 "was installed: make a new plan now that those are done")
            return after, {}
        # the carried writes' handlers run in their roles: not sent here
        sent = [dataclasses.replace(x, notify=()) for x in batch.changes]
        apply = agent.apply_request(sent)
        apply["run_lock"] = lock.hold_request(self.events.run_id)     # held while it runs
        try:
            results = agent.call(conn, "apply", apply)["results"]
            out = next((r for r in results if r.get("status") != "ok"), results[-1])
        except (agent.AgentError, KeyError, IndexError) as e:
            results, out = [], {"status": "failed", "error": str(e)}
        if out.get("status") != "ok" or len(results) != len(sent):
            res.failed += 1
            i = results.index(out) if out in results else len(sent) - 1
            if i < len(batch.carried):          # a write before the install: nothing installed
                x = batch.carried[i]
                why = (f"{x.change.resource} (role {x.role}) failed, so nothing was installed: "
                       f"{out.get('error') or 'exit ' + str(out.get('rc'))}")
            else:
                why = apt_batch.failure(batch.names, out.get("output"), out.get("error"), out.get("rc"))
            step("failed", why, output=out.get("output"), diff=c.diff)
            return after, {}
        res.changed += 1
        step("changed", f"{c.action}: {c.why}", diff=c.diff)
        notified: dict = {}
        for x, r in zip(batch.carried, results):
            for name in x.change.notify:
                notified.setdefault(x.role, {})[name] = r["done_at"]
        return gather(), notified

    def _skip_roles(self, host: Host, plans: list, why: str) -> None:
        for p in plans:
            self.events.step(host=host.name, role=p.name, resource="role", status="skipped",
                             reason=why, seconds=0.0)

    def _open(self, host: Host) -> Connection:
        """Connect as the inventory's user; while that user cannot log in yet (a fresh VM before
        hardening created it), fall back to `bootstrap_user`."""
        conn = self.connect(host)
        try:
            conn.open()
            return conn
        except Unreachable as e:
            if not host.bootstrap_user or "authentication failed" not in str(e):
                raise
        boot = Connection(host, self.inv.known_hosts, host.sudo_password, user=host.bootstrap_user)
        boot.open()
        boot.commands += conn.commands
        return boot

    def _plan_roles(self, host: Host, os_facts: dict) -> tuple[list, dict]:
        """The host's roles prepared for these os facts, and their merged facts request (the
        package batch's included)."""
        ctx = RoleContext(host, self.inv, os_facts, self.events.check)
        plans = [self._prepare(host, name, ctx) for name in self.roles_for(host)]
        return plans, ops.merge_requests([*(p.request for p in plans if not isinstance(p, Exception)),
                                          apt_batch.request(batch_input(plans))])

    @staticmethod
    def _facts(conn: Connection, request: dict) -> dict:
        return agent.call(conn, "facts", request)["facts"]

    def _prepare(self, host: Host, name: str, ctx: RoleContext):
        """A role's resources, handlers, guards and facts request; or the error that stops it."""
        code = self.role(name)
        v = self.inv.hostvars(host.name)
        try:
            resources = resource_list(code, v, ctx)
            guards = list(code.guards(v, ctx) or [])
            request = ops.request(resources)
            guarded = sorted({f for g in guards for f in g.files})
            if guarded:                       # their state before the run, to restore it
                request["files"] = sorted(set(request.get("files", [])) | set(guarded))
            return PreparedRole(name, resources, dict(code.handlers(v, ctx) or {}), guards, request)
        except (ops.PlanError, ValueError, TypeError, KeyError) as e:
            return RoleError(name, f"{type(e).__name__}: {e}")

    def _run_role(self, conn: Connection, host: Host, p, shared: Facts | None, res: HostResult,
                  notified: dict | None = None) -> None:
        """plan (pure, from facts) -> report what is done and what differs -> apply the changes
        in one exec (handlers included) -> report each result -> guards over what changed.
        `notified`: its handlers that the package batch's writes of this role notified (name ->
        when, on the server's clock): they run here, even with nothing else to change."""
        t0 = time.monotonic()

        def step(resource: str, status: str, reason: str, diff=None, output=None):
            self.events.step(host=host.name, role=p.name, resource=resource, status=status,
                             reason=reason, seconds=time.monotonic() - t0, diff=diff, output=output)

        if isinstance(p, RoleError):
            res.failed += 1
            step("plan", "failed", p.error)
            return
        try:
            facts = shared if shared is not None else Facts(self._facts(conn, p.request))
            changes = self._report_plan(ops.plan_all(p.resources, facts), step)
        except (ops.PlanError, FactError, agent.AgentError, ValueError, TypeError, KeyError) as e:
            res.failed += 1
            step("plan", "failed", f"{type(e).__name__}: {e}")
            return
        if self.events.check:
            res.planned[p.name] = [saved_plan.change_entry(c) for c in changes]
        elif self.opts.saved is not None:
            # an earlier role's changes can make a later role plan something that check mode
            # could not see: never sent unreviewed
            allowed = self.opts.saved[host.name].allowed(p.name)
            extra = [c.resource for c in changes if saved_plan.change_digest(c) not in allowed]
            if extra:
                res.failed += 1
                step("saved plan", "failed", f"not in the plan: {', '.join(extra)} (planned after "
                     "the earlier roles' changes); nothing of this role was applied: make a new "
                     "plan now that those are done")
                return
        if not changes and not notified:
            return
        if self.events.check:
            for c in changes:
                res.changed += 1
                step(c.resource, "changed", f"would {c.action}: {c.why}", diff=c.diff)
            return
        request = agent.apply_request(changes, p.handlers)
        if notified:
            request["notified"] = notified
        request["run_lock"] = lock.hold_request(self.events.run_id)     # held while it runs
        switch_id = self._arm_request(p.name, p.guards, changes, request)
        try:
            answer = agent.call(conn, "apply", request)
        except agent.AgentError as e:       # e.g. the connection's user lost sudo mid-run
            res.failed += 1
            step("apply", "failed", str(e))
            return
        touched = self._report_apply(changes, answer, res, step)
        armed = answer.get("switch") or {}
        if switch_id and not armed.get("armed"):
            self.events.warn(f"no dead man's switch for role {p.name}: "
                             f"{armed.get('why', 'not armed')}", host=host.name)
        armed = switch_id if armed.get("armed") else None
        for g in p.guards:
            if any(g.watches(c) for c in touched):
                if not self._guard(conn, host, g, facts, res, step, armed):
                    return                   # reverted: the switch is spent
        if armed:                            # every check passed (or nothing watched changed)
            fired = self._switch(conn, host, armed, "disarm").get("fired")
            if fired:                        # the bound passed before the checks did
                res.failed += 1
                step("dead man's switch", "failed", "the server restored "
                     f"{', '.join(fired.get('restored') or []) or 'nothing'} before the guard "
                     "confirmed the change (raise harden_lockout_revert_seconds if the guard is slow)")

    @staticmethod
    def _report_plan(planned, step) -> list[Change]:
        """Report what is already as wanted; return the changes."""
        changes: list[Change] = []
        for _resource, result in planned:
            for item in result:
                if isinstance(item, Noop):
                    step(item.resource, "ok", item.why)
                else:
                    changes.append(item)
        return changes

    @staticmethod
    def _report_apply(changes: list[Change], answer: dict, res: HostResult, step) -> list[Change]:
        """Report each change's and handler's result; return the changes that ran, failed ones
        included (a failed change may have done part of its work: ufw runs several commands)."""
        by_id = {x["id"]: x for x in answer["results"]}
        touched: list[Change] = []
        for i, c in enumerate(changes):
            out = by_id.get(str(i), {"status": "not_run"})
            if out["status"] in ("ok", "failed"):
                touched.append(c)
            if out["status"] == "ok":
                res.changed += 1
                step(c.resource, "changed", f"{c.action}: {c.why}", diff=c.diff)
            elif out["status"] == "failed":
                res.failed += 1
                step(c.resource, "failed", f"{c.action} failed: {out.get('error') or 'exit ' + str(out.get('rc'))}",
                     diff=c.diff, output=out.get("output"))
            else:
                step(c.resource, "skipped", "not run: an earlier change of this role failed")
        for h in answer.get("handlers", []):
            if h["status"] == "ok":
                step(f"handler {h['name']}", "changed", "notified")
            elif h["status"] == "superseded":
                step(f"handler {h['name']}", "ok", h.get("output") or "not run")
            elif h["status"] == "failed":
                res.failed += 1
                step(f"handler {h['name']}", "failed", h.get("error") or "failed", output=h.get("output"))
        return touched

    def _arm_request(self, role: str, guards: list[Guard], changes: list[Change], request: dict) -> str | None:
        """Mark the changes the switch must cover; its id, or None when no guard asks for one."""
        armed = [g for g in guards if g.revert_seconds]
        risky = {str(i) for i, c in enumerate(changes) if any(g.watches(c) for g in armed)}
        if not risky:
            return None
        for item in request["changes"]:
            item["arm"] = item["id"] in risky
        switch_id = f"{self.events.run_id}-{role}"
        request["switch"] = {"id": switch_id, "seconds": min(g.revert_seconds for g in armed),
                             "paths": list(dict.fromkeys(p for g in armed for p in g.revert_paths or g.files)),
                             "after": [list(a) for a in dict.fromkeys(a for g in armed for a in g.revert_after)]}
        return switch_id

    def _switch(self, conn: Connection, host: Host, switch_id: str, action: str) -> dict:
        try:
            r = conn.run(agent.command(), stdin=agent.payload("switch", {"id": switch_id, "action": action}))
            return agent.parse(r.stdout, r.stderr, r.rc)
        except (agent.AgentError, Unreachable) as e:
            if action == "disarm":
                self.events.warn(f"could not disarm the dead man's switch {switch_id}: {e}; the "
                                 "server will revert this role's lockout-prone changes on its own",
                                 host=host.name)
            return {"restored": [], "failed": [f"{e}; the server's dead man's switch restores "
                                               "them on its own"], "after": []}

    def _guard(self, conn: Connection, host: Host, g: Guard, before: Facts, res: HostResult, step,
               switch_id: str | None = None) -> bool:
        """The check; on failure, the rollback (the armed switch fired now, or the files put
        back from the facts). True when the check passed."""
        try:
            g.check(host)
            step(f"guard {g.name}", "ok", "passed after the change")
            return True
        except Exception as e:  # any failure of the check means: undo
            error = f"{type(e).__name__}: {e}"
        if switch_id:
            out = self._switch(conn, host, switch_id, "revert")
            res.failed += 1
            bad = list(out.get("failed") or []) + [
                f"`{' '.join(a['argv'])}` exit {a['rc']}" for a in out.get("after") or [] if a.get("rc") != 0]
            said = f"restored the previous {', '.join(out.get('restored') or []) or 'nothing'}"
            if bad:
                said += f"; COULD NOT: {'; '.join(bad)}: fix it through the console"
            step(f"guard {g.name}", "failed", f"{error}; {said}")
            return False
        steps, done, kept = [], [], []
        for path in g.files:
            old = before.file(path)
            if old.exists and old.type == "file" and old.content is not None:
                steps.append(write_step(path, old.content, old.mode, old.owner, old.group))
            elif not old.exists:
                steps.append(run_step(["rm", "-f", "--", path]))
            else:                 # its old bytes were never read: say so, never "restored"
                kept.append(f"{path} ({'binary or over 256 KiB' if old.type == 'file' else old.type})")
                continue
            done.append(path)
        steps += list(g.after_rollback)
        try:
            restored = agent.call(conn, "apply", {
                "changes": [{"id": "0", "resource": f"rollback {g.name}", "steps": steps, "notify": []}],
                "handlers": {}, "handlers_on_failure": False})["results"][0]["status"] == "ok"
        except (agent.AgentError, KeyError, IndexError):
            restored = False
        res.failed += 1
        said = (f"restored the previous {', '.join(done) or 'nothing'}" if restored else
                f"COULD NOT restore {', '.join(g.files)}")
        if restored and kept:
            said += f"; COULD NOT restore {', '.join(kept)}"
        if not restored or kept:
            said += ": fix it through the open session or the console"
        step(f"guard {g.name}", "failed", f"{error}; {said}")
        return False


def batch_input(plans: list) -> list[tuple[str, list | None]]:
    """The roles as the package batch plans them: (name, resources), None for one that
    failed to prepare (the run stops there)."""
    return [(p.name, None if isinstance(p, RoleError) else p.resources) for p in plans]


def batch_context(plans: list) -> dict:
    """Each prepared role's guards and handlers, by its name: the package batch carries none of
    its writes that a guard watches or that notify a handler it does not define."""
    ready = [p for p in plans if not isinstance(p, RoleError)]
    return {"guards": {p.name: p.guards for p in ready}, "handlers": {p.name: p.handlers for p in ready}}


def _roles_facts(answer: dict) -> dict:
    """A first exec's facts without what only the run asked for in it (the lock, the audit
    log's last line): the facts a separate exec for the roles would have given."""
    out = {k: v for k, v in answer.items() if k not in ("run_lock", "last_lines")}
    errors = {k: v for k, v in (answer.get("errors") or {}).items() if k != "last_lines"}
    out.pop("errors", None)
    return {**out, "errors": errors} if errors else out


def resource_list(code: RoleCode, v: dict, ctx: RoleContext) -> list:
    """The role's resources; anything else it yields is a TypeError naming the line."""
    out = []
    gen = code.resources(v, ctx)
    for item in gen:
        why = not_a_resource(item)
        if why:
            frame = getattr(gen, "gi_frame", None)       # paused at the yield
            raise NotAResource(frame.f_code.co_filename if frame else code.name,
                               frame.f_lineno if frame else None, code.name, why)
        out.append(item)
    return out

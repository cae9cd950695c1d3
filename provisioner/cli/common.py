"""What every server-changing task shares: its flags, input checks before any server is touched,
the run, the recap and the exit code."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import invoke
from invoke import Exit

from provisioner import lock, plan as saved_plan, shards
from provisioner.errors import EXIT_BAD_INPUT, EXIT_LOCKED, InputError, Problem, display_path
from provisioner.roles import REPO_ROOT

if TYPE_CHECKING:
    from provisioner.events import Events
    from provisioner.interrupt import Stop
    from provisioner.inventory import Host, Inventory

# The engine (inventory validation, runner, connections, templates) is imported inside the
# functions that use it: `invoke --list` and `--help` load this module and need none of it.

FLAG_HELP = {
    "env": "environment: inventories/<env>.yml (default local)",
    "limit": "only these hosts or groups, comma-separated",
    "check": "plan and report, change nothing on any server",
    "diff": "show file diffs (secrets as ***)",
    "json": "NDJSON events on stdout (human output goes to stderr)",
    "yes": "never prompt (CI, timers): a needed answer that is missing is an error",
    "serial": "rolling batches of N hosts (default: all at once)",
    "forks": "hosts worked on in parallel (default: all, up to 50)",
    "verbose": "more output, repeatable (-vv) or counted (-v 2): -v ok steps, -vv full failure "
               "output, -vvv every step's output",
    "detailed_exitcode": "with --check: exit 5 when changes are pending",
    "max_fail_percentage": "0-100, with --serial: stop later batches when more than this % of "
                           "a batch failed",
    "shard": "k/n: only the k-th of n stable parts of the hosts (a CI matrix of n jobs)",
    "out": "with --check: save the plan to this file, for `invoke apply FILE`",
}


class Task(invoke.Task):
    """A task whose flags never take `-h`: `invoke provision -h` stays help, whatever letters
    its flags have free (`--shard` would take it: s and h are its first free letters)."""

    def arg_opts(self, name, default, taken_names):
        return super().arg_opts(name, default, set(taken_names) | {"h"})


@dataclass
class Extras:
    """What a task adds to a plain provision run: save the plan (`--out`), apply a saved one
    (`invoke apply`), or summarize drift (`invoke drift`)."""
    out: str | None = None
    saved: str | None = None          # the plan file to apply
    drift: bool = False


def fail_input(message: str) -> Exit:
    """For tasks without an event stream: the message on stderr, exit 2."""
    from provisioner.secret import REDACTOR
    print(REDACTOR.redact(message), file=sys.stderr)
    return Exit(code=EXIT_BAD_INPUT)


def inventory(env: str) -> Inventory:
    """The validated inventory of `env`, `!vault` references unresolved (InputError: exit 2)."""
    from provisioner.inventory import load_inventory
    return load_inventory(env, root=REPO_ROOT)


def load(env: str, interactive: bool, limit: str | None = None,
         meanwhile: Callable[[], object] | None = None) -> tuple[Inventory, list[Host]]:
    """The validated inventory with its vault secrets resolved, and the hosts `limit` names,
    once everything a run needs that can be checked without a server holds (secrets, known
    host keys); else InputError (exit 2) with every problem at once. `meanwhile`: the caller's
    own preparation (importing its engine), run while the vault's key is derived."""
    inv = inventory(env)
    hosts = inv.select(limit)
    problems: list[Problem] = []
    try:
        secrets = secrets_later(inv, interactive)     # the vault's key is derived in a thread
    except InputError as e:
        problems, secrets = e.problems, (lambda: inv)
    problems += inv.known_hosts_problems(hosts)       # while these run
    if meanwhile is not None:
        meanwhile()
    try:
        inv = secrets()
    except InputError as e:
        problems = e.problems + problems
    if problems:
        from provisioner.testbed.config import LOCAL_INVENTORY
        from provisioner.vault import vault_path
        written = inv.known_hosts.exists() and vault_path(env, REPO_ROOT).exists()
        if inv.path == LOCAL_INVENTORY and not written:     # the testbed was never brought up
            problems.append(Problem(None, None, None, f"env '{env}' is the testbed's",
                                    "`invoke testbed.up` boots its servers and writes its "
                                    "known_hosts and vault"))
        raise InputError(problems)
    return inv, hosts


def with_secrets(inv: Inventory, interactive: bool) -> Inventory:
    """`inv` with every `!vault NAME` replaced by its secret (asks for the password if needed)."""
    return secrets_later(inv, interactive)()


def secrets_later(inv: Inventory, interactive: bool) -> Callable[[], Inventory]:
    """with_secrets in two halves (vault.open_env_vault_later): the password is found or asked
    for now, the vault's key derived in a thread; the function returned waits for it and
    returns `inv` with its secrets. Both raise InputError (no password, a wrong one, a secret
    the vault does not hold)."""
    if not inv.vault_refs():
        return lambda: inv
    from provisioner.vault import open_env_vault_later, vault_path
    path = vault_path(inv.env, REPO_ROOT)
    if not path.exists():
        return lambda: inv.resolve({}, missing_vault=display_path(path))
    opened = open_env_vault_later(inv.env, REPO_ROOT, interactive)
    return lambda: inv.resolve(opened())


def int_flag(value, name: str, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < minimum:
        raise InputError([Problem("command line", None, f"--{name}", f"expected an integer >= {minimum}, got {value!r}",
                                  f"pass e.g. --{name} {max(minimum, 1)}")])
    return n


def _percentage(value, serial: int) -> float:
    """--max-fail-percentage: 0-100, and only with --serial (it compares batches)."""
    try:
        pct = float(value or 0)
    except (TypeError, ValueError):
        pct = -1.0
    if not 0 <= pct <= 100:
        raise InputError([Problem("command line", None, "--max-fail-percentage",
                                  f"expected a percentage from 0 to 100, got {value!r}",
                                  "pass e.g. --max-fail-percentage 25")])
    if pct and not serial:
        raise InputError([Problem("command line", None, "--max-fail-percentage",
                                  "only means something with --serial (it stops later batches)",
                                  "add --serial N, or leave out --max-fail-percentage")])
    return pct


def run_task(task: str, *, env, limit, check, diff, json, yes, serial, forks, verbose,
             detailed_exitcode=False, roles=None, max_fail_percentage=0, shard=None,
             extras: Extras | None = None) -> None:
    from provisioner.events import Events
    from provisioner.interrupt import Stop
    interactive = not yes and sys.stdin.isatty()
    events = Events(task=task, env=env, json_out=bool(json), verbose=int(verbose or 0),
                    diff=bool(diff), check=bool(check))
    stop = Stop()
    try:
        with events:         # whatever escapes still ends the output with an error and a recap
            code = _run(events, stop, env=env, limit=limit,
                        interactive=interactive, serial=serial, forks=forks,
                        detailed_exitcode=detailed_exitcode, roles=roles,
                        max_fail_percentage=max_fail_percentage, shard=shard,
                        extras=extras or Extras())
    except KeyboardInterrupt:     # before the run started (a prompt): invoke would say 1
        raise Exit(code=130) from None
    if code:
        raise Exit(code=code)


def _run(events: Events, stop: Stop, *, env, limit, interactive, serial, forks,
         detailed_exitcode, roles, max_fail_percentage, shard, extras: Extras) -> int:
    from provisioner.interrupt import on_signals
    try:
        serial_n = int_flag(serial, "serial", 0)
        forks_n = int_flag(forks, "forks", 1)
        fail_pct = _percentage(max_fail_percentage, serial_n)
        if detailed_exitcode and not events.check:
            raise InputError([Problem("command line", None, "--detailed-exitcode",
                                      "only means something with --check", "add --check")])
        part = shards.parse(shard) if shard else None
        out = _out_path(extras.out, events.check)
        plan = None
        if extras.saved is not None:                   # the plan names env, hosts and roles
            plan = _saved(Path(extras.saved))
            env = events.env = plan.env
            limit = ",".join(plan.hosts)
            roles = ",".join(plan.roles) if plan.roles is not None else None
        # flags first: no password asked in vain; the engine is imported while the vault opens
        inv, hosts = load(env, interactive, limit, meanwhile=_engine)
        from provisioner.runner import Options, Runner
        from provisioner.varchecks import check_vars
        if part:
            hosts = shards.pick(hosts, *part)
        role_list = None
        if roles is not None:
            role_list = [r.strip() for r in roles.split(",") if r.strip()]
            if not role_list:       # an empty variable in a script must not mean every role
                raise InputError([Problem("command line", None, "--roles", "the role list is empty",
                                          "name roles (comma-separated), or leave out --roles "
                                          "to run every role")])
            unknown = [r for r in role_list if r not in inv.roles]
            if unknown:
                raise InputError([Problem("command line", None, "--roles",
                                          f"unknown role(s) {', '.join(unknown)} for env {env}",
                                          f"choose from: {', '.join(sorted(inv.roles))}")])
        opts = Options(serial=serial_n, forks=min(forks_n, 50), roles=role_list,
                       max_fail_percentage=fail_pct, last_run=extras.drift,
                       saved=plan.hosts if plan else None)
        runner = Runner(inv, events, opts, stop=stop)
        for h in hosts:                                 # role code errors before any server
            for r in runner.roles_for(h):
                runner.role(r)
        check_vars(inv, hosts, runner.role, runner.roles_for)      # and bad role vars
    except InputError as e:
        # JSON consumers still get an error event and a recap; nothing was touched
        return events.fail_run(EXIT_BAD_INPUT, e)
    events.start([h.name for h in hosts])
    with on_signals(stop):
        results = runner.run(hosts)
    locked = [r.error for r in results if r.status == "locked"]
    refused = [f"{r.host}: {r.error}" for r in results if r.status == "refused"]
    if extras.drift:
        _drift_summary(events, results)
    if out is not None and not stop:           # an interrupted plan is no plan to review
        _save_plan(events, out, inv, role_list, results)
    if stop:
        return events.fail_run(stop.code, f"{stop.reason}: no host or role was started after "
                                          "it; what was already sent to a server finished")
    if locked:
        # the most specific answer: someone else is working on these hosts
        return events.fail_run(EXIT_LOCKED, "; ".join(locked))
    if refused:           # the other hosts went on; these need a new plan
        return events.fail_run(EXIT_BAD_INPUT, "the plan was refused for " + "; ".join(refused)
                               + "\n    fix: review a new plan (`invoke provision --check --out "
                               "FILE`), then apply that one")
    events.recap()
    return events.exit_code(detailed=bool(detailed_exitcode))


def _engine() -> None:
    """What a run needs after load(), imported while the vault's key is derived (Fabric: its
    connections' own, else first imported by the first connection, in its thread)."""
    import fabric  # noqa: F401
    import provisioner.runner  # noqa: F401
    import provisioner.varchecks  # noqa: F401


def _out_path(out: str | None, check: bool) -> Path | None:
    """--out's file, checked before any server is touched."""
    if out is None:
        return None
    if not check:
        raise InputError(Problem("command line", None, "--out",
                                 "only means something with --check (it saves the plan)",
                                 "add --check, then `invoke apply FILE` the file"))
    path = Path(out)
    if not path.parent.is_dir():
        raise InputError(Problem("command line", None, "--out",
                                 f"the folder {display_path(path.parent)} does not exist",
                                 "create it, or pass a path in an existing folder"))
    return path


def _saved(path: Path) -> saved_plan.Plan:
    """The plan to apply, if it was made from the commit the config is at now."""
    plan = saved_plan.read(path)
    commit, dirty = lock.git_state(REPO_ROOT)
    if plan.commit != commit:
        def short(c):
            return c[:12] if c else "no git commit"
        raise InputError(Problem(path, None, "commit",
                                 f"the plan was made from config commit {short(plan.commit)}, "
                                 f"the config is at {short(commit)}",
                                 f"apply it from a checkout of {short(plan.commit)}, or make a "
                                 "new plan from this one and review it"))
    if not plan.hosts:
        raise InputError(Problem(path, None, "hosts", "the plan holds no host",
                                 "make a plan with at least one reachable host"))
    return plan


def _save_plan(events: Events, path: Path, inv: Inventory, roles: list[str] | None,
               results: list) -> None:
    commit, dirty = lock.git_state(REPO_ROOT)
    plan = saved_plan.from_results(inv.env, results, commit=commit, dirty=dirty, roles=roles,
                                   # names only: values never leave the vault
                                   secrets=inventory(inv.env).vault_refs())
    if not plan.hosts:
        events.warn(f"no plan written to {display_path(path)}: no host was planned")
        return
    if dirty:
        events.warn("the config has uncommitted changes: the plan names commit "
                    f"{(commit or '?')[:12]}, and apply re-plans from whatever is checked out")
    saved_plan.write(path, plan)
    print(f"wrote {display_path(path)}: {len(plan.hosts)} host(s), {saved_plan.count(plan)} "
          "change(s)" + (f"; not planned: {', '.join(plan.not_planned)}" if plan.not_planned else ""),
          file=sys.stderr)


def _drift_summary(events: Events, results: list) -> None:
    """Per host: what drifted (what check mode would change) and since when (its audit log's
    last line: the last run that changed it)."""
    for r in results:
        if r.facts is None:           # not reached, or refused: its failure says why
            continue
        drifted = [e["resource"] for entries in r.planned.values() for e in entries]
        events.drift(r.host, drifted, lock.audit_entry(r.last_run))

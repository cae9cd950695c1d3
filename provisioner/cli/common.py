"""What every server-changing task shares: its flags, input checks before any server is touched,
the run, the recap and the exit code."""
from __future__ import annotations

import sys

from invoke import Exit

from provisioner.errors import EXIT_BAD_INPUT, EXIT_LOCKED, InputError, Problem
from provisioner.events import Events
from provisioner.interrupt import Stop, on_signals
from provisioner.inventory import Inventory, load_inventory
from provisioner.roles import REPO_ROOT
from provisioner.runner import Options, Runner
from provisioner.secret import REDACTOR
from provisioner.varchecks import check_vars

FLAG_HELP = {
    "env": "environment: inventories/<env>.yml (default local)",
    "limit": "only these hosts or groups, comma-separated",
    "check": "plan and report, change nothing on any server",
    "diff": "show file diffs (secrets as ***)",
    "json": "NDJSON events on stdout (human output goes to stderr)",
    "yes": "never prompt (CI, timers): a needed answer that is missing is an error",
    "serial": "rolling batches of N hosts (default: all at once)",
    "forks": "hosts worked on in parallel (default: all, up to 50)",
    "verbose": "more output: -v shows ok steps, -vv full failure output",
    "detailed_exitcode": "with --check: exit 5 when changes are pending",
    "max_fail_percentage": "with --serial: stop later batches when more than this % of a batch failed",
}


def fail_input(message: str) -> Exit:
    """For tasks without an event stream: the message on stderr, exit 2."""
    print(REDACTOR.redact(message), file=sys.stderr)
    return Exit(code=EXIT_BAD_INPUT)


def load(env: str, interactive: bool) -> Inventory:
    """The validated inventory with its vault secrets resolved, or InputError (exit 2)."""
    inv = load_inventory(env, root=REPO_ROOT)
    refs = inv.vault_refs()
    if refs:
        from provisioner.vault import open_env_vault
        secrets = open_env_vault(env, REPO_ROOT, interactive)
        inv = inv.resolve(secrets)
    return inv


def int_flag(value, name: str, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < minimum:
        raise InputError([Problem("command line", None, f"--{name}", f"expected an integer >= {minimum}, got {value!r}",
                                  f"pass e.g. --{name} {max(minimum, 1)}")])
    return n


def run_task(task: str, *, env, limit, check, diff, json, yes, serial, forks, verbose,
             detailed_exitcode=False, roles=None, max_fail_percentage=0) -> None:
    interactive = not yes and sys.stdin.isatty()
    events = Events(task=task, env=env, json_out=bool(json), verbose=int(verbose or 0),
                    diff=bool(diff), check=bool(check))
    stop = Stop()
    try:
        with events:         # whatever escapes still ends the output with an error and a recap
            code = _run(events, stop, env=env, limit=limit,
                        interactive=interactive, serial=serial, forks=forks,
                        detailed_exitcode=detailed_exitcode, roles=roles,
                        max_fail_percentage=max_fail_percentage)
    except KeyboardInterrupt:     # before the run started (a prompt): invoke would say 1
        raise Exit(code=130) from None
    if code:
        raise Exit(code=code)


def _run(events: Events, stop: Stop, *, env, limit, interactive, serial, forks,
         detailed_exitcode, roles, max_fail_percentage) -> int:
    try:
        serial_n = int_flag(serial, "serial", 0)
        forks_n = int_flag(forks, "forks", 1)
        inv = load(env, interactive)
        hosts = inv.select(limit or None)
        role_list = None
        if roles:
            role_list = [r.strip() for r in roles.split(",") if r.strip()]
            unknown = [r for r in role_list if r not in inv.roles]
            if unknown:
                raise InputError([Problem("command line", None, "--roles",
                                          f"unknown role(s) {', '.join(unknown)} for env {env}",
                                          f"choose from: {', '.join(sorted(inv.roles))}")])
        if detailed_exitcode and not events.check:
            raise InputError([Problem("command line", None, "--detailed-exitcode",
                                      "only means something with --check", "add --check")])
        opts = Options(serial=serial_n, forks=min(forks_n, 50), roles=role_list,
                       max_fail_percentage=float(max_fail_percentage or 0))
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
    if stop:
        return events.fail_run(stop.code, f"{stop.reason}: no host or role was started after "
                                          "it; what was already sent to a server finished")
    if locked:
        # the most specific answer: someone else is working on these hosts
        return events.fail_run(EXIT_LOCKED, "; ".join(locked))
    events.recap()
    return events.exit_code(detailed=bool(detailed_exitcode))

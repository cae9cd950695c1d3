"""`invoke status --env E`: one table (or --json) of every host's health, one exec per host;
exit 1 when something needs attention on a host that answered, else 3 when a host did not
answer (so CI can gate a deploy)."""
from __future__ import annotations

import json as jsonlib
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from invoke import Exit, task

from provisioner.cli.common import FLAG_HELP, fail_input, int_flag, load
from provisioner.connection import Connection, Unreachable
from provisioner.errors import EXIT_UNREACHABLE, InputError

if TYPE_CHECKING:      # provisioner.status is imported by the task: it reads the probe's source
    from provisioner.status import HostStatus


def probe(inv, host, t: dict) -> HostStatus:
    from provisioner.status import PROBE, HostStatus, judge, probe_argv, probe_config
    conn = Connection(host, inv.known_hosts, host.sudo_password)
    try:
        r = conn.run(probe_argv(probe_config(inv, host)), stdin=PROBE.encode(), timeout=60)
        if not r.ok:
            err = r.stderr.decode(errors="replace").strip().splitlines()
            return HostStatus(host.name, error=f"the status probe failed: {err[-1] if err else r.rc}",
                              attention=["the status probe failed"])
        doc = jsonlib.loads(r.stdout)
        return HostStatus(host.name, doc=doc, attention=judge(doc, t))
    except Unreachable as e:
        return HostStatus(host.name, error=str(e), attention=["unreachable"])
    except ValueError as e:
        return HostStatus(host.name, error=f"the status probe's answer is not JSON: {e}",
                          attention=["the status probe failed"])
    finally:
        conn.close()


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"], "json": "one JSON document on stdout",
            "forks": FLAG_HELP["forks"], "yes": FLAG_HELP["yes"]})
def status(c, env="local", limit=None, json=False, forks=50, yes=False):
    """Every host's health in one table; exit 1 when something needs attention, 3 if unreachable."""
    from provisioner.status import table, thresholds
    try:
        inv, hosts = load(env, interactive=not yes and sys.stdin.isatty(), limit=limit)
        forks_n = int_flag(forks, "forks", 1)
    except InputError as e:
        raise fail_input(str(e)) from None
    t = thresholds(inv)
    with ThreadPoolExecutor(max_workers=max(1, min(forks_n, len(hosts), 50))) as pool:
        statuses = list(pool.map(lambda h: probe(inv, h, t), hosts))
    if json:
        print(jsonlib.dumps({"env": inv.env, "ok": not any(s.attention for s in statuses),
                             "hosts": {s.name: s.as_json() for s in statuses}}, indent=1))
    else:
        print(table(statuses))
        for s in statuses:
            if s.error:
                print(f"  {s.name}: {s.error}", file=sys.stderr)
    # as every task's codes: 1 (something needs attention) wins over 3 (a host did not answer)
    if any(s.attention for s in statuses if s.doc is not None):
        raise Exit(code=1)
    if any(s.doc is None for s in statuses):
        raise Exit(code=EXIT_UNREACHABLE)

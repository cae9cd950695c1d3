"""`invoke apply PLAN` (exactly a reviewed plan) and `invoke drift` (what no longer matches)."""
from __future__ import annotations

from invoke import task

from provisioner.cli.common import FLAG_HELP, Extras, Task, run_task


@task(klass=Task, positional=["plan"], incrementable=["verbose"],
      help={"plan": "the file `invoke provision --check --out FILE` wrote",
            **{k: FLAG_HELP[k] for k in ("diff", "json", "yes", "serial", "forks", "verbose",
                                         "max_fail_percentage", "shard")}})
def apply(c, plan, diff=False, json=False, yes=False, serial=0, forks=50, verbose=0,
          max_fail_percentage=0, shard=None):
    """Apply a saved plan: its env, hosts and roles, and only the changes it holds. A host whose
    facts drifted since the plan is refused (exit 2) while the others go on."""
    run_task("apply", env="", limit=None, check=False, diff=diff, json=json, yes=yes,
             serial=serial, forks=forks, verbose=verbose, max_fail_percentage=max_fail_percentage,
             shard=shard, extras=Extras(saved=plan))


@task(klass=Task, incrementable=["verbose"],
      help={k: FLAG_HELP[k] for k in ("env", "limit", "diff", "json", "yes", "forks", "verbose",
                                      "shard")})
def drift(c, env="local", limit=None, diff=False, json=False, yes=False, forks=50, verbose=0,
          shard=None):
    """Check mode with a verdict per host: what no longer matches its roles, and since when
    (the last run in its audit log). Exit 5 when anything drifted, 0 when nothing did."""
    run_task("drift", env=env, limit=limit, check=True, diff=diff, json=json, yes=yes, serial=0,
             forks=forks, verbose=verbose, detailed_exitcode=True, shard=shard,
             extras=Extras(drift=True))

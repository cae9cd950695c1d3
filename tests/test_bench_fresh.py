"""bench/fresh_provision.py without servers: its arguments, the commands it runs (with and
without the package batch), where it says the time of a fresh run went, and the machine's CPU."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fresh_provision  # noqa: E402


def test_fresh_provision_arguments_and_commands(capsys):
    a = fresh_provision.parse_args([])
    assert (a.rounds, a.only, a.unbatched) == (3, ["web1", "web1-all", "env"], False)
    assert fresh_provision.parse_args(["--only", "env", "--unbatched"]).only == ["env"]
    for bad in (["--only", "db1"], ["--rounds", "0"], ["--only", ""]):
        with pytest.raises(SystemExit):
            fresh_provision.parse_args(bad)
    capsys.readouterr()
    batched = fresh_provision.argv("web1")
    # web1 as the issue names it, and with every role the local inventory gives it
    assert batched[1:3] == ["-m", "invoke"] and batched[3:] == [
        "provision", "--env", "local", "--limit", "web1", "--roles", "base,harden,node,pm2",
        "--yes", "--json"]
    assert fresh_provision.argv("web1-all")[3:] == [
        "provision", "--env", "local", "--limit", "web1", "--yes", "--json"]
    off = fresh_provision.argv("env", batched=False)
    assert off[1] == "-c" and "apt_batch.NOTHING" in off[2] and "--limit" not in off


def test_the_unbatched_harness_plans_no_batch():
    from provisioner import apt_batch
    saved = apt_batch.plan
    try:
        exec(fresh_provision.UNBATCHED.split("from invoke")[0], {})
        assert apt_batch.plan([("r", [])], None) is apt_batch.NOTHING
    finally:
        apt_batch.plan = saved


def test_where_the_time_of_a_fresh_run_went():
    evs = [{"event": "step", "host": "web1", "role": None, "resource": "connection", "seconds": 9.0},
           {"event": "step", "host": "web1", "role": None, "resource": "apt batch: nodejs npm", "seconds": 30.5},
           {"event": "step", "host": "web1", "role": "harden", "resource": "apt ufw", "seconds": 0.1},
           {"event": "step", "host": "web1", "role": "harden", "resource": "ufw", "seconds": 6.2},
           {"event": "step", "host": "web1", "role": "pm2", "resource": "npm -g pm2", "seconds": 40.0},
           {"event": "recap", "changed": 70, "failed": 0, "unreachable": 0, "hosts": {}}]
    assert fresh_provision.where_time_went(evs) == {"web1": {"apt batch": 30.5, "harden": 6.2, "pm2": 40.0}}
    assert fresh_provision.time_lines(evs) == ["    web1: apt batch 30.5, harden 6.2, pm2 40.0"]
    assert fresh_provision.recap(evs)["changed"] == 70
    with pytest.raises(SystemExit, match="no recap"):
        fresh_provision.recap(evs[:-1])


def test_the_machines_busy_cpu_seconds_count_every_core_but_idle_and_iowait():
    tick = os.sysconf("SC_CLK_TCK")
    stat = (f"cpu  {10 * tick} {1 * tick} {5 * tick} {999 * tick} {50 * tick} {2 * tick} {1 * tick} {1 * tick} 0 0\n"
            "cpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")
    assert fresh_provision.machine_busy_seconds(stat) == 20.0
    with pytest.raises(ValueError, match="cpu line"):
        fresh_provision.machine_busy_seconds("intr 1\n")

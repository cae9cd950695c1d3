"""When is a held run lock dead? Pure checks of lock.dead_here against real processes here."""
from __future__ import annotations

import os
import subprocess

from provisioner import lock


def test_a_live_holder_here_is_not_dead():
    assert not lock.dead_here(lock.owner("r1", "provision", "local"))


def test_a_holder_whose_process_is_gone_is_dead():
    proc = subprocess.Popen(["sleep", "30"])
    holder = lock.owner("r2", "provision", "local")
    holder.update(pid=proc.pid, pid_start=lock._start_ticks(proc.pid))
    assert not lock.dead_here(holder)
    proc.kill()
    proc.wait()
    assert lock.dead_here(holder)


def test_a_reused_pid_does_not_keep_a_dead_holder_alive():
    holder = lock.owner("r3", "provision", "local")
    holder["pid_start"] -= 1            # our PID, but not the process that took the lock
    assert lock.dead_here(holder)


def test_holders_from_elsewhere_or_older_versions_are_never_judged_here():
    other = lock.owner("r4", "provision", "local")
    other["pid_space"] = "another-boot/pid:[4026531836]"
    other["pid"] = 2 ** 22 + 1             # no such PID here, which proves nothing about there
    assert not lock.dead_here(other)
    legacy = {k: v for k, v in lock.owner("r5", "provision", "local").items()
              if k not in ("pid_space", "pid_start")}
    legacy["pid"] = 2 ** 22 + 1
    assert not lock.dead_here(legacy)
    unknown_start = {**lock.owner("r7", "provision", "local"), "pid_start": None}
    assert not lock.dead_here(unknown_start)


def test_dead_holder_needs_a_run_id_and_a_lock_we_did_not_get():
    holder = lock.owner("r6", "provision", "local")
    holder["pid_start"] -= 1
    assert lock.dead_holder({"acquired": False, "holder": holder, "age": 5})["run_id"] == "r6"
    assert lock.dead_holder({"acquired": True}) is None
    assert lock.dead_holder({"acquired": False, "holder": {**holder, "run_id": None}, "age": 5}) is None
    assert os.getpid() == holder["pid"]


def test_the_agent_takes_over_only_the_named_dead_holder(tmp_path):
    from provisioner.remote import agent as remote
    d = str(tmp_path / "run.lock")
    first = lock.owner("first", "provision", "local")
    assert remote.run_lock({"dir": d, "owner": first}) == {"acquired": True}
    second = lock.owner("second", "provision", "local")
    held = remote.run_lock({"dir": d, "owner": second, "take_from": "someone-else"})
    assert held["acquired"] is False and held["holder"]["run_id"] == "first"
    took = remote.run_lock({"dir": d, "owner": second, "take_from": "first"})
    assert took["acquired"] and took["dead"] and took["stale"]["run_id"] == "first"
    assert remote.run_lock({"dir": d, "owner": first})["holder"]["run_id"] == "second"

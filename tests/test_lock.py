"""When is a held run lock dead? Pure checks of lock.dead_here against real processes here."""
from __future__ import annotations

import os
import subprocess

import pytest

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


# --- the agent's side: takeover, holding, release (real processes, a lock in tmp_path) -------

import json
import multiprocessing
import sys
import time
from pathlib import Path

from provisioner.remote import agent as remote

REPO = Path(__file__).resolve().parent.parent


def _stale_lock(d: str, run_id: str = "old") -> None:
    os.mkdir(d)
    holder = lock.owner(run_id, "provision", "local", ttl=60)
    holder["started_epoch"] -= 3600
    Path(d, "owner.json").write_text(json.dumps(holder))


def _take_over(d, run_id, barrier, results):
    barrier.wait()
    try:
        results.put((run_id, remote.run_lock({"dir": d, "owner": lock.owner(run_id, "provision", "local")})
                     .get("acquired")))
    except Exception as e:          # a crash is a result too: the run would exit 1, not 4
        results.put((run_id, f"{type(e).__name__}: {e}"))


def test_runs_taking_over_one_stale_lock_at_once_get_it_exactly_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(15):
        d = str(tmp_path / f"run.lock{trial}")
        _stale_lock(d)
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_take_over, args=(d, f"r{i}", barrier, results)) for i in range(4)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(10)
        assert sorted(map(str, got.values())) == ["False", "False", "False", "True"], got
        winner = next(r for r, ok in got.items() if ok is True)
        assert json.loads(Path(d, "owner.json").read_text())["run_id"] == winner


EXEC = r'''
import json, sys, threading, time, signal
sys.path.insert(0, sys.argv[1])
from provisioner.remote import agent
signal.signal(signal.SIGTERM, agent._on_term)
err = agent.hold_run(json.loads(sys.argv[2]))
if err:
    print("refused: " + err, flush=True)
    sys.exit(0)
threading.Thread(target=agent._run, args=(["sleep", "120"],), daemon=True).start()
while not agent.CHILDREN:
    time.sleep(0.05)
print("held %d" % next(iter(agent.CHILDREN)), flush=True)
time.sleep(120)
'''


def _exec_under(d: str, run_id: str) -> tuple[subprocess.Popen, str]:
    """An agent exec of run `run_id` (what an apply does), busy with a long command."""
    proc = subprocess.Popen([sys.executable, "-c", EXEC, str(REPO), json.dumps({"dir": d, "run_id": run_id})],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def test_a_lock_whose_exec_still_runs_is_neither_taken_over_nor_released_until_stopped(tmp_path):
    d = str(tmp_path / "run.lock")
    mine = lock.owner("mine", "provision", "local", ttl=1)
    assert remote.run_lock({"dir": d, "owner": mine})["acquired"]
    proc, said = _exec_under(d, "mine")
    try:
        assert said.startswith("held ")
        command = int(said.split()[1])
        time.sleep(1.2)                                  # past the TTL, and its process is "dead"
        other = remote.run_lock({"dir": d, "owner": lock.owner("other", "provision", "local"),
                                 "take_from": "mine"})
        assert other["acquired"] is False and other["busy"] is True
        with pytest.raises(lock.LockHeld, match="still running on the host"):
            lock.check("db1", other)
        # finish (after the controller's command timeout) stops the exec and its command first
        assert remote.finish({"dir": d, "run_id": "mine", "audit": None}) == {"released": True}
        assert proc.wait(15) != 0
        assert not _alive(command)
        assert not os.path.exists(d)
    finally:
        proc.kill()
        proc.wait()


def test_an_exec_of_a_run_that_lost_its_lock_applies_nothing(tmp_path):
    d = str(tmp_path / "run.lock")
    assert remote.run_lock({"dir": d, "owner": lock.owner("new", "provision", "local")})["acquired"]
    proc, said = _exec_under(d, "old")
    proc.wait(10)
    assert said.startswith("refused: the run lock") and "held by another run now" in said


def test_every_exec_refreshes_the_ttl(tmp_path):
    d = str(tmp_path / "run.lock")
    mine = lock.owner("mine", "provision", "local", ttl=60)
    mine["started_epoch"] -= 50                          # 10 s of TTL left
    assert remote.run_lock({"dir": d, "owner": mine})["acquired"]
    proc, said = _exec_under(d, "mine")
    proc.kill()
    proc.wait()
    held = remote.run_lock({"dir": d, "owner": lock.owner("other", "provision", "local")})
    assert held["acquired"] is False and held["age"] < 5

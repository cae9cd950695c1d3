"""The run lock on a real server: concurrent takeovers of one stale lock, and an exec that
outlives the controller's command timeout (live: needs the testbed)."""
from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from conftest import invoke
from engine_helpers import inventory, sh
from provisioner import agent, lock
from provisioner.connection import Connection

pytestmark = pytest.mark.usefixtures("testbed")
SERVER = "db1"


@pytest.fixture
def server(tmp_path):
    invoke("testbed.reset", SERVER)
    inv = inventory(tmp_path, [SERVER], ["base"])
    yield inv.hosts[SERVER], inv.known_hosts
    invoke("testbed.reset", SERVER)


def _facts(conn, request):
    r = conn.run(agent.command(), stdin=agent.payload("facts", request))
    return agent.parse(r.stdout, r.stderr, r.rc)["facts"]


def test_four_runs_taking_over_one_stale_lock_get_it_once(server):
    host, known_hosts = server
    conns = [Connection(host, known_hosts) for _ in range(4)]
    try:
        for c in conns:
            c.open()
        for trial in range(5):
            old = lock.owner(f"old{trial}", "provision", "local", ttl=60)
            old["started_epoch"] -= 3600
            sh(SERVER, f"rm -rf {lock.LOCK_DIR} && mkdir -p {lock.LOCK_DIR} && "
                       f"echo '{json.dumps(old)}' > {lock.LOCK_DIR}/owner.json")
            results, barrier = {}, threading.Barrier(len(conns))

            def take(i, c):
                barrier.wait()
                try:
                    answer = _facts(c, {"run_lock": lock.request(lock.owner(f"r{trial}-{i}", "provision", "local"))})
                    results[i] = answer["run_lock"]["acquired"]
                except Exception as e:              # a crash would make the run exit 1, not 4
                    results[i] = f"{type(e).__name__}: {e}"
            threads = [threading.Thread(target=take, args=(i, c)) for i, c in enumerate(conns)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(map(str, results.values())) == ["False", "False", "False", "True"], results
            holder = json.loads(sh(SERVER, f"cat {lock.LOCK_DIR}/owner.json").stdout)
            assert holder["run_id"] == f"r{trial}-{next(i for i, ok in results.items() if ok is True)}"
    finally:
        for c in conns:
            c.close()


def test_a_timed_out_apply_keeps_the_lock_until_finish_stops_it(server):
    host, known_hosts = server
    mine = lock.owner("timeout-run", "provision", "local", ttl=1)
    quick = dataclasses.replace(host, command_timeout=3)
    with Connection(quick, known_hosts) as conn:
        assert _facts(conn, {"run_lock": lock.request(mine)})["run_lock"]["acquired"]
        request = {"changes": [{"id": "0", "resource": "long", "notify": [],
                                "steps": [{"run": ["sleep", "4242"], "ok": [0], "env": {}}]}],
                   "handlers": {}, "run_lock": lock.hold_request("timeout-run")}
        r = conn.run(agent.command(), stdin=agent.payload("apply", request))
        assert r.rc == 124                                 # the controller gave up on it
        assert sh(SERVER, "pgrep -x -f 'sleep 4242'", check=False).returncode == 0   # still running there
        time.sleep(1.5)                                    # past the TTL, and "dead" by its run id
        other = _facts(conn, {"run_lock": lock.request(lock.owner("other", "provision", "local"),
                                                       take_from="timeout-run")})["run_lock"]
        assert other["acquired"] is False and other.get("busy") is True
        done = conn.run(agent.command(), stdin=agent.payload("finish", lock.finish_request("timeout-run", None)))
        assert agent.parse(done.stdout, done.stderr, done.rc)["released"] is True
    assert sh(SERVER, "pgrep -x -f 'sleep 4242'", check=False).returncode == 1   # stopped with it
    assert sh(SERVER, f"test -e {lock.LOCK_DIR}", check=False).returncode == 1

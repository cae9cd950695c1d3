"""The agent's cache on a real server (live: needs the testbed): the source is sent once, kept
in a folder only root can enter with the code it compiled to, then only requests go and run
that code; a cache file that was changed is never executed and is replaced. (tests/test_agent_cache.py checks the protocol on this
machine, including symlinks, FIFOs, folders others can write and check mode.)"""
from __future__ import annotations

import pytest

from conftest import invoke
from engine_helpers import inventory, test_server as server_for
from provisioner import agent
from provisioner.connection import Connection

pytestmark = pytest.mark.usefixtures("testbed")
SERVER = server_for("db1")
PLANTED = "/tmp/provisioner-planted-agent-ran"


@pytest.fixture
def conn(tmp_path):
    invoke("testbed.reset", SERVER)             # root may log in (fresh), no cache yet
    inv = inventory(tmp_path, [SERVER], ["base"])
    with Connection(inv.hosts[SERVER], inv.known_hosts) as c:
        yield c
    invoke("testbed.reset", SERVER)


def _out(conn, *argv: str) -> str:
    r = conn.run(list(argv))
    assert r.ok, r.stderr
    return r.stdout.decode()


def test_the_agent_is_sent_once_then_run_from_the_server_s_cache(conn):
    cached = f"{agent.CACHE_DIR}/{agent.source_sha()}.py"
    answer = agent.call(conn, "ping", {})
    assert answer["pong"] and answer["cache"] == {"cached": True}
    assert conn.commands == 2                    # the miss, then the source (kept)
    assert _out(conn, "stat", "-c", "%U %a %F", agent.CACHE_DIR, cached).splitlines() == \
        ["root 700 directory", "root 600 regular file"]
    assert _out(conn, "sha256sum", cached).split()[0] == agent.source_sha()
    compiled = _out(conn, "sh", "-c", f"ls {agent.CACHE_DIR}/{agent.source_sha()}.*.code").strip()
    assert _out(conn, "stat", "-c", "%U %a %F", compiled).strip() == "root 600 regular file"
    # the compiled code is what runs: without the source the agent still answers, unsent
    assert conn.run(["rm", cached]).ok
    before = conn.commands
    facts = agent.call(conn, "facts", {"files": ["/etc/hostname"]})
    assert facts["facts"]["files"]["/etc/hostname"]["exists"]
    assert conn.commands == before + 1 and "cache" not in facts        # from the cache


def test_a_changed_cache_file_is_not_executed_and_is_replaced(conn):
    cached = f"{agent.CACHE_DIR}/{agent.source_sha()}.py"
    agent.call(conn, "ping", {})
    planted = f"open({PLANTED!r}, 'w').close()\n" + agent.source()
    assert conn.run(["tee", cached], stdin=planted.encode()).ok
    assert conn.run(["sh", "-c", f"rm {agent.CACHE_DIR}/*.code"]).ok   # so the source is read
    conn.run(["rm", "-f", PLANTED])
    answer = agent.call(conn, "ping", {})
    assert answer["pong"] and answer["cache"] == {"cached": True}     # sent again and kept
    assert conn.run(["test", "-e", PLANTED]).rc == 1, "the changed cache file was executed"
    assert _out(conn, "sha256sum", cached).split()[0] == agent.source_sha()

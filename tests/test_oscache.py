"""The os facts a host gave last time (provisioner/oscache.py), through the real runner without
servers: with them, a run asks for its roles' facts in its first exec, after the run lock, and
a converged run costs 2 execs; a host that now gives other os facts is planned again from what
it says; a cache that is broken costs an exec, never the run."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from fake_agent import AgentConn, roles_inventory
from provisioner import oscache
from provisioner.events import Events
from provisioner.runner import Options, Runner

# a role whose facts request depends on the os: it names the release's file
ROLE = '''from provisioner.ops import files
def resources(v, ctx):
    yield files.file(f"/etc/{ctx.os['codename']}.conf", "x\\n", mode="0644")
'''
TRIXIE = {"id": "debian", "version_id": "13", "codename": "trixie"}
BOOKWORM = {"id": "debian", "version_id": "12", "codename": "bookworm"}


class Server:
    """Its os facts and files (path -> text, mode 0644 root:root); `requests`: each facts
    request, in order; `ops`: every exec's op; `holder`: another run's lock."""

    def __init__(self, os_facts, files=(), holder=None):
        self.os, self.files, self.holder = os_facts, set(files), holder
        self.requests: list[dict] = []
        self.ops: list[str] = []

    def answer(self, op, req):
        self.ops.append(op)
        if op == "facts":
            self.requests.append(req)
            body = {"os": dict(self.os), "files": {p: self._file(p) for p in req.get("files", [])}}
            if "last_lines" in req:
                body["last_lines"] = {p: '{"result": "changed"}' for p in req["last_lines"]}
            if "run_lock" in req:
                body["run_lock"] = ({"acquired": True} if self.holder is None else
                                    {"acquired": False, "holder": self.holder, "age": 5})
            return {"facts": body}
        if op == "apply":
            for c in req["changes"]:
                self.files.add(c["resource"].split(" ", 1)[1])
            return {"ok": True, "handlers": [],
                    "results": [{"id": c["id"], "status": "ok"} for c in req["changes"]]}
        return {"released": True}

    def _file(self, path):
        if path == "/etc":
            return {"exists": True, "type": "dir", "mode": "0755", "owner": "root", "group": "root"}
        if path not in self.files:
            return {"exists": False}
        import hashlib
        return {"exists": True, "type": "file", "mode": "0644", "owner": "root", "group": "root",
                "size": 2, "sha256": hashlib.sha256(b"x\n").hexdigest(), "content": "x\n"}


@pytest.fixture
def inv(tmp_path):
    return roles_inventory(tmp_path, "cachetest", {"conf": (ROLE, "# no vars")})


def run(inv, server, *, check=False):
    out = io.StringIO()
    events = Events(task="provision", env=inv.env, json_out=True, verbose=0, diff=False,
                    check=check, stream_out=out, stream_err=io.StringIO())
    events.start(["web1"])
    conn = AgentConn(server.answer)
    result = Runner(inv, events, Options(), connect=lambda h: conn).run(inv.select("web1"))[0]
    steps = [json.loads(x) for x in out.getvalue().splitlines()]
    return SimpleNamespace(result=result, execs=conn.commands,
                           steps=[(e["resource"], e["status"], e.get("reason"))
                                  for e in steps if e["event"] == "step"])


def test_a_converged_run_with_the_os_facts_kept_costs_two_execs(inv, os_cache):
    server = Server(TRIXIE, files=["/etc/trixie.conf"])
    cold = run(inv, server)
    assert cold.execs == 3 and server.ops == ["facts", "facts", "finish"]
    assert json.loads((os_cache / "cachetest" / "web1.json").read_text()) == TRIXIE
    server.ops.clear()
    warm = run(inv, server)
    assert warm.execs == 2 and server.ops == ["facts", "finish"]
    # one request: the lock first (the agent gathers in order, so the facts are read under it)
    first = server.requests[-1]
    assert list(first)[0] == "run_lock" and first["files"] == ["/etc/trixie.conf", "/etc"]
    assert warm.steps == cold.steps and warm.result.changed == 0 and warm.result.status == "ok"


def test_a_host_that_now_gives_other_os_facts_is_planned_from_what_it_says(inv, os_cache):
    oscache.store("cachetest", "web1", BOOKWORM)        # kept before the host was rebuilt
    server = Server(TRIXIE)
    r = run(inv, server)
    assert server.ops == ["facts", "facts", "apply", "finish"]
    assert server.requests[0]["files"] == ["/etc/bookworm.conf", "/etc"]   # the guess, not used
    assert server.requests[1]["files"] == ["/etc/trixie.conf", "/etc"]
    assert [(res, st) for res, st, _ in r.steps] == [("file /etc/trixie.conf", "changed")]
    assert oscache.load("cachetest", "web1") == TRIXIE


def test_a_cache_that_cannot_be_read_or_written_costs_an_exec_not_the_run(inv, os_cache):
    (os_cache / "cachetest").mkdir(parents=True)
    (os_cache / "cachetest" / "web1.json").write_text("{not json")
    server = Server(TRIXIE, files=["/etc/trixie.conf"])
    assert run(inv, server).execs == 3
    assert oscache.load("cachetest", "web1") == TRIXIE              # replaced by what it said
    # a file where the cache's folder would be: nothing can be kept, every run still works
    (os_cache / "cachetest" / "web1.json").unlink()
    (os_cache / "cachetest").rmdir()
    (os_cache / "cachetest").write_text("")
    for _ in range(2):
        r = run(inv, server)
        assert r.execs == 3 and r.result.status == "ok"


def test_check_mode_with_the_os_facts_kept_is_one_exec_and_plans_the_same(inv, os_cache):
    server = Server(TRIXIE)
    cold = run(inv, server, check=True)
    assert server.ops == ["facts", "facts"] and "run_lock" not in server.requests[0]
    server.ops.clear()
    warm = run(inv, server, check=True)
    assert server.ops == ["facts"]
    assert warm.steps == cold.steps == [("file /etc/trixie.conf", "changed",
                                         "would create: absent")]
    assert warm.result.facts == cold.result.facts and warm.result.facts
    assert server.files == set()                                     # nothing applied


def test_drift_reads_the_audit_line_in_the_same_exec_and_keeps_it_out_of_the_facts(inv, os_cache):
    def drift():
        out = io.StringIO()
        events = Events(task="drift", env=inv.env, json_out=True, verbose=0, diff=False,
                        check=True, stream_out=out, stream_err=io.StringIO())
        events.start(["web1"])
        conn = AgentConn(server.answer)
        return Runner(inv, events, Options(last_run=True), connect=lambda h: conn).run(
            inv.select("web1"))[0], conn.commands
    server = Server(TRIXIE, files=["/etc/trixie.conf"])
    (cold, cold_execs), (warm, warm_execs) = drift(), drift()
    assert (cold_execs, warm_execs) == (2, 1)
    assert warm.last_run == cold.last_run == '{"result": "changed"}'
    assert warm.facts == cold.facts and not [k for k in warm.facts if k.startswith("last_line")]


def test_a_lock_held_by_another_run_stops_it_with_the_guess_unused(inv, os_cache):
    oscache.store("cachetest", "web1", TRIXIE)
    holder = {"run_id": "other", "who": "ci", "from": "runner", "task": "provision"}
    server = Server(TRIXIE, holder=holder)
    r = run(inv, server)
    assert r.result.status == "locked" and server.ops == ["facts"]
    assert server.files == set() and ("run lock", "skipped") in [(a, b) for a, b, _ in r.steps]


@pytest.mark.parametrize("env,host", [("../x", "web1"), ("local", "a/b"), ("local", "..")])
def test_names_that_are_not_plain_file_names_are_never_cached(os_cache, env, host):
    oscache.store(env, host, TRIXIE)
    assert oscache.load(env, host) is None and not os_cache.exists()

"""The package batch through the real runner and event stream, without servers: a fake server
keeps packages and files and answers the agent's requests. Fresh host: one install for every
role, the roles' own package steps ok; converged host: no exec more; check mode shows it; a
saved plan carries it; a failure names the packages and apt's error."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from types import SimpleNamespace

import pytest

from fake_agent import AgentConn, two_role_inventory
from provisioner import apt_batch, plan
from provisioner.events import Events
from provisioner.runner import Options, Runner

ROLE = '''from provisioner.ops import apt, files


def resources(v, ctx):
    yield apt.packages(["pkg-{name}"])
    yield files.file("/etc/{name}.conf", "{name}\\n", mode="0644")
'''


class FakeServer:
    """Packages (name -> version) and files (path -> text); `missing` packages apt cannot find."""

    def __init__(self, packages=(), files=None, missing=()):
        self.packages = {p: "1.0" for p in packages}
        self.files = dict(files or {})
        self.missing = set(missing)
        self.ops: list[str] = []
        self.installs: list[list[str]] = []

    def answer(self, op, req):
        self.ops.append(op)
        if op == "facts":
            body = {"os": {"id": "debian", "version_id": "12"},
                    "packages": {"installed": {n: self.packages.get(n) for n in req.get("packages", [])},
                                 "lists_age": 60},
                    "files": {p: self._file(p) for p in req.get("files", [])}}
            if "run_lock" in req:
                body["run_lock"] = {"acquired": True}
            return {"facts": body}
        if op == "apply":
            return {"ok": True, "handlers": [], "results": [self._change(c) for c in req["changes"]]}
        return {"released": True}

    def _file(self, path):
        if path not in self.files:
            return {"exists": False}
        data = self.files[path].encode()
        return {"exists": True, "type": "file", "mode": "0644", "owner": "root", "group": "root",
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "content": self.files[path]}

    def _change(self, change):
        for step in change["steps"]:
            if "write" in step:
                self.files[step["write"]] = base64.b64decode(step["b64"]).decode()
            elif "install" in step.get("run", []):
                names = [a for a in step["run"][step["run"].index("install") + 1:]
                         if not a.startswith("-")]
                self.installs.append(names)
                gone = [n for n in names if n in self.missing]
                if gone:           # as apt says it, after its progress lines
                    return {"id": change["id"], "status": "failed", "rc": 100,
                            "error": "step 1 (run): exit 100", "output": "$ apt-get install\n"
                            "Reading package lists...\n" + "".join(
                                f"E: Unable to locate package {n}\n" for n in gone)}
                self.packages.update({n: "1.0" for n in names})
        return {"id": change["id"], "status": "ok", "rc": 0}


@pytest.fixture
def inv(tmp_path):
    return two_role_inventory(tmp_path, "batchtest", ROLE, "{name}_x: 1")


def run(inv, server, *, check=False, saved=None, task="provision"):
    out = io.StringIO()
    events = Events(task=task, env=inv.env, json_out=True, verbose=0, diff=False, check=check,
                    stream_out=out, stream_err=io.StringIO())
    hosts = inv.select("web1")
    events.start(["web1"])
    conn = AgentConn(server.answer)
    results = Runner(inv, events, Options(saved=saved), connect=lambda h: conn).run(hosts)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    return SimpleNamespace(result=results[0], events=events, execs=conn.commands,
                           steps={(e["role"], e["resource"]): e for e in lines if e["event"] == "step"})


def converged():
    return FakeServer(["pkg-one", "pkg-two"], {"/etc/one.conf": "one\n", "/etc/two.conf": "two\n"})


def test_a_fresh_host_gets_one_install_and_its_roles_package_steps_are_ok(inv):
    server = FakeServer()
    r = run(inv, server)
    assert server.installs == [["pkg-one", "pkg-two"]]                     # one transaction
    batch = r.steps[(None, "apt batch: pkg-one pkg-two")]
    assert batch["status"] == "changed" and "for roles one, two" in batch["reason"]
    for role in ("one", "two"):
        own = r.steps[(role, f"apt pkg-{role}")]
        assert own["status"] == "ok" and own["reason"] == f"already present: pkg-{role} 1.0"
        assert r.steps[(role, f"file /etc/{role}.conf")]["status"] == "changed"
    assert r.result.changed == 3 and r.events.exit_code(detailed=False) == 0
    # lock+os, every role's facts, the batch, those facts again, role one, role two's own
    # facts (one changed the host), role two, unlock
    assert server.ops == ["facts", "facts", "apply", "facts", "apply", "facts", "apply", "finish"]


def test_a_converged_host_costs_no_exec_more(inv):
    server = converged()
    r = run(inv, server)
    assert r.execs == 3 and server.ops == ["facts", "facts", "finish"]
    assert not [k for k in r.steps if k[0] is None] and r.result.changed == 0


def test_only_what_is_missing_is_installed_and_named(inv):
    server = converged()
    del server.packages["pkg-two"]
    r = run(inv, server)
    assert server.installs == [["pkg-two"]]
    assert r.steps[(None, "apt batch: pkg-two")]["reason"].startswith("install: pkg-two absent")


def test_check_mode_shows_the_batch_and_the_roles_plan_after_it(inv):
    server = FakeServer()
    r = run(inv, server, check=True)
    assert "apply" not in server.ops and server.packages == {}
    batch = r.steps[(None, "apt batch: pkg-one pkg-two")]
    assert batch["status"] == "changed" and batch["check"] is True
    assert batch["reason"].startswith("would install: pkg-one absent, pkg-two absent")
    own = r.steps[("one", "apt pkg-one")]
    assert own["status"] == "ok" and "installed by this run" in own["reason"]
    assert r.result.changed == 3                       # as many as the real run reports
    assert r.execs == 2                                # os facts, every role's facts
    assert list(r.result.planned) == [apt_batch.PLAN_KEY, "one", "two"]


def test_a_saved_plan_holds_the_batch_and_apply_sends_exactly_it(inv, tmp_path):
    server = FakeServer()
    checked = run(inv, server, check=True)
    path = tmp_path / "plan.json"
    plan.write(path, plan.from_results(inv.env, [checked.result], commit="c0ffee"))
    saved = plan.read(path)
    assert [e["resource"] for e in saved.hosts["web1"].roles[apt_batch.PLAN_KEY]] == \
        ["apt batch: pkg-one pkg-two"]
    applied = run(inv, server, saved=saved.hosts, task="apply")
    assert applied.result.status == "changed" and server.installs == [["pkg-one", "pkg-two"]]
    assert applied.execs == run(inv, FakeServer()).execs          # what a provision costs
    # a package installed by hand since the plan: the host is refused, nothing sent
    again = FakeServer(["pkg-one"])
    refused = run(inv, again, saved=saved.hosts, task="apply")
    assert refused.result.status == "refused" and "package pkg-one" in refused.result.error
    assert "apply" not in again.ops


def test_a_failed_batch_names_the_packages_and_apts_error_and_runs_no_role(inv):
    server = FakeServer(missing=["pkg-two"])
    r = run(inv, server)
    batch = r.steps[(None, "apt batch: pkg-one pkg-two")]
    assert batch["status"] == "failed"
    assert batch["reason"] == "install of pkg-one pkg-two failed: E: Unable to locate package pkg-two"
    assert "E: Unable to locate package pkg-two" in batch["output"]
    for role in ("one", "two"):
        skipped = r.steps[(role, "role")]
        assert skipped["status"] == "skipped" and "package batch failed" in skipped["reason"]
    assert server.files == {} and r.events.exit_code(detailed=False) == 1
    assert server.ops == ["facts", "facts", "apply", "finish"]

"""The package batch through the real runner and event stream, without servers: a fake server
keeps packages, files and ufw's state and answers the agent's requests. Fresh host: one install
for every role, the roles' own package steps ok; converged host: no exec more; check mode shows
it; a saved plan carries it; a failure names the packages and apt's error. With a role that
brings the firewall up (harden's ufw): the batch comes right after it, never before, and covers
only the roles after it."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from types import SimpleNamespace

import pytest

from fake_agent import AgentConn, roles_inventory, two_role_inventory
from provisioner import apt_batch, plan
from provisioner.events import Events
from provisioner.facts import check_key
from provisioner.ops import ufw
from provisioner.runner import Options, Runner

ROLE = '''from provisioner.ops import apt, files


def resources(v, ctx):
    yield apt.packages(["pkg-{name}"])
    yield files.file("/etc/{name}.conf", "{name}\\n", mode="0644")
'''


# a role that brings the firewall up, as harden does (its rules do not matter here)
HARDEN = '''from provisioner.ops import apt, ufw


def resources(v, ctx):
    yield apt.packages(["ufw"])
    yield ufw.firewall([])
'''


class FakeServer:
    """Packages (name -> version), files (path -> text) and `folders`; `missing` packages apt
    cannot find, `pulls` the packages an install brings too (its dependencies), `failing` the
    resources whose change fails. `applied`: the resources of the changes applied, in order;
    `handled`: per apply, the handlers it was told an earlier exec's writes notified."""

    def __init__(self, packages=(), files=None, missing=(), pulls=None, failing=(), folders=()):
        self.packages = {p: "1.0" for p in packages}
        self.files = dict(files or {})
        self.folders = set(folders)
        self.handled: list[dict] = []
        self.missing = set(missing)
        self.pulls = dict(pulls or {})
        self.failing = set(failing)
        self.checks: dict[str, int] = {}
        self.ops: list[str] = []
        self.installs: list[list[str]] = []
        self.applied: list[str] = []

    def answer(self, op, req):
        self.ops.append(op)
        if op == "facts":
            body = {"os": {"id": "debian", "version_id": "12"},
                    "packages": {"installed": {n: self.packages.get(n) for n in req.get("packages", [])},
                                 "lists_age": 60},
                    "files": {p: self._file(p) for p in req.get("files", [])},
                    "checks": {check_key(k): self.checks.get(check_key(k), 1)
                               for k in req.get("checks", [])}}
            if "run_lock" in req:
                body["run_lock"] = {"acquired": True}
            return {"facts": body}
        if op == "apply":
            results = []
            for c in req["changes"]:        # as the agent: none after a failed one
                failed = results and results[-1]["status"] != "ok"
                results.append({"id": c["id"], "status": "not_run"} if failed else self._change(c))
            self.handled.append(dict(req.get("notified") or {}))
            names = set(req.get("notified") or ()) | {n for c, r in zip(req["changes"], results)
                                                      if r["status"] == "ok" for n in c["notify"]}
            return {"ok": True, "results": results,
                    "handlers": [{"name": n, "status": "ok"} for n in req["handlers"] if n in names]}
        return {"released": True}

    def _file(self, path):
        if path in self.folders:
            return {"exists": True, "type": "dir", "mode": "0755", "owner": "root", "group": "root"}
        if path not in self.files:
            return {"exists": False}
        data = self.files[path].encode()
        return {"exists": True, "type": "file", "mode": "0644", "owner": "root", "group": "root",
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "content": self.files[path]}

    def _change(self, change):
        self.applied.append(change["resource"])
        if change["resource"] in self.failing:
            return {"id": change["id"], "status": "failed", "rc": 1, "error": "step 1 (run): exit 1"}
        for step in change["steps"]:
            if "write" in step:
                self.files[step["write"]] = base64.b64decode(step["b64"]).decode()
            elif step.get("run", [None])[0] == "ufw":
                self._ufw(step["run"][1:])
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
                self.packages.update({n: "1.0" for n in names + [d for n in names
                                                                 for d in self.pulls.get(n, [])]})
        return {"id": change["id"], "status": "ok", "rc": 0, "done_at": 100.0 + len(self.applied)}

    def _ufw(self, args):
        if args == ["--force", "enable"]:
            self.files[ufw.CONF] = "ENABLED=yes\n"
            self.checks[check_key(ufw.LOADED_CHECK)] = 0
        elif args[0] == "default":          # ufw default deny incoming
            key = ufw.POLICY_KEYS[args[2]]
            kept = [x for x in self.files.get(ufw.DEFAULTS, "IPV6=yes\n").splitlines()
                    if not x.startswith(key + "=")]
            self.files[ufw.DEFAULTS] = "\n".join(kept + [f'{key}="{ufw.POLICY_WORDS[args[1]]}"']) + "\n"


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
    steps = [e for e in lines if e["event"] == "step"]
    return SimpleNamespace(result=results[0], events=events, execs=conn.commands,
                           steps={(e["role"], e["resource"]): e for e in steps},
                           order=[(e["role"], e["resource"]) for e in steps])


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


# --- with a role that brings the firewall up ---------------------------------------------------

@pytest.fixture
def walled(tmp_path):
    """Roles base, harden (ufw: the firewall), one, two, in the order the inventories list them."""
    return roles_inventory(tmp_path, "walltest", {
        "base": (ROLE.replace("{name}", "base"), "base_x: 1"), "harden": (HARDEN, "harden_x: 1"),
        **{n: (ROLE.replace("{name}", n), f"{n}_x: 1") for n in ("one", "two")}})


def test_no_package_of_a_later_role_is_installed_before_the_firewall_is_up(walled):
    server = FakeServer()
    r = run(walled, server)
    assert server.installs == [["pkg-base"], ["ufw"], ["pkg-one", "pkg-two"]]
    up = len(server.applied) - server.applied[::-1].index("ufw")     # after harden's last ufw change
    assert server.applied[up:up + 1] == ["apt batch: pkg-one pkg-two"]
    # the roles up to the firewall's install their own, as without a batch
    assert r.steps[("base", "apt pkg-base")]["status"] == "changed"
    assert r.steps[("harden", "apt ufw")]["status"] == "changed"
    batch = r.steps[(None, "apt batch: pkg-one pkg-two")]
    assert batch["status"] == "changed" and "for roles one, two" in batch["reason"]
    assert r.order.index((None, "apt batch: pkg-one pkg-two")) > r.order.index(("harden", "ufw"))
    for role in ("one", "two"):
        assert r.steps[(role, f"apt pkg-{role}")]["status"] == "ok"
    assert r.result.status == "changed" and r.events.exit_code(detailed=False) == 0
    # lock+os, every role's facts, base, harden's own facts, harden, the facts of one and two,
    # the batch, those facts again, one, two's own facts, two, unlock
    assert server.ops == ["facts", "facts", "apply", "facts", "apply", "facts", "apply", "facts",
                          "apply", "facts", "apply", "finish"]
    # converged, with the os facts kept from the run before (oscache): 2 execs, the batch
    # plans nothing
    again = run(walled, server)
    assert again.execs == 2 and again.result.changed == 0 and len(server.installs) == 3


def test_a_failed_firewall_role_leaves_every_later_package_uninstalled(walled):
    server = FakeServer(failing={"ufw"})
    r = run(walled, server)
    assert server.installs == [["pkg-base"], ["ufw"]]
    assert not [k for k in r.steps if k[0] is None]
    for role in ("one", "two"):
        assert r.steps[(role, "role")]["status"] == "skipped"
    assert r.events.exit_code(detailed=False) == 1


def test_check_mode_shows_the_batch_after_the_firewall_role(walled):
    server = FakeServer()
    r = run(walled, server, check=True)
    assert "apply" not in server.ops and r.execs == 2
    assert list(r.result.planned) == ["base", "harden", apt_batch.PLAN_KEY, "one", "two"]
    assert r.steps[("harden", "apt ufw")]["reason"].startswith("would install: ufw absent")
    batch = r.steps[(None, "apt batch: pkg-one pkg-two")]
    assert batch["status"] == "changed" and "for roles one, two" in batch["reason"]
    assert r.order.index((None, "apt batch: pkg-one pkg-two")) > r.order.index(("harden", "ufw"))
    assert "installed by this run" in r.steps[("one", "apt pkg-one")]["reason"]


def test_a_saved_plan_applies_the_batch_after_the_firewall_role(walled, tmp_path):
    path = tmp_path / "plan.json"
    plan.write(path, plan.from_results(walled.env, [run(walled, FakeServer(), check=True).result],
                                       commit="c0ffee"))
    server = FakeServer()
    applied = run(walled, server, saved=plan.read(path).hosts, task="apply")
    assert applied.result.status == "changed"
    assert server.installs == [["pkg-base"], ["ufw"], ["pkg-one", "pkg-two"]]
    assert applied.execs == run(walled, FakeServer()).execs          # what a provision costs


def test_a_batch_the_saved_plan_does_not_hold_is_not_sent(walled, tmp_path):
    """ufw's install brought pkg-one too: after harden the batch is not the one reviewed."""
    path = tmp_path / "plan.json"
    pulls = {"ufw": ["pkg-one"]}
    plan.write(path, plan.from_results(walled.env, [run(walled, FakeServer(pulls=pulls), check=True).result],
                                       commit="c0ffee"))
    server = FakeServer(pulls=pulls)
    applied = run(walled, server, saved=plan.read(path).hosts, task="apply")
    batch = applied.steps[(None, "apt batch: pkg-two")]
    assert batch["status"] == "failed" and batch["reason"].startswith("not in the plan")
    assert server.installs == [["pkg-base"], ["ufw"]] and "pkg-two" not in server.packages
    for role in ("one", "two"):
        assert applied.steps[(role, "role")]["status"] == "skipped"
    assert applied.events.exit_code(detailed=False) == 1


# --- a role's write before its package comes along ---------------------------------------------

SERVICE = '''from provisioner.ops import apt, files, systemd


def resources(v, ctx):
    yield files.file("/etc/default/pkg-svc", "ARGS=--fast\\n", notify="restart svc")
    yield apt.packages(["pkg-svc"])
    yield files.file("/etc/svc.conf", "svc\\n")


def handlers(v, ctx):
    return {"restart svc": systemd.handler("restart", "pkg-svc")}
'''


@pytest.fixture
def service(tmp_path):
    return roles_inventory(tmp_path, "svctest", {"one": (ROLE.replace("{name}", "one"), "one_x: 1"),
                                                 "svc": (SERVICE, "svc_x: 1")})


def test_a_write_before_its_package_is_made_by_the_batch_and_its_handler_runs_in_its_role(service):
    server = FakeServer(folders={"/etc", "/etc/default"})
    r = run(service, server)
    # the service's settings are in place before its package is installed (and starts it)
    assert server.applied[:2] == ["file /etc/default/pkg-svc", "apt batch: pkg-one pkg-svc"]
    assert server.installs == [["pkg-one", "pkg-svc"]]
    batch = r.steps[(None, "apt batch: pkg-one pkg-svc")]
    assert batch["status"] == "changed"
    assert "written first: file /etc/default/pkg-svc (svc)" in batch["reason"]
    # in its role: nothing left to write; the restart runs there, told when the write was done
    assert r.steps[("svc", "file /etc/default/pkg-svc")]["status"] == "ok"
    assert r.steps[("svc", "file /etc/svc.conf")]["status"] == "changed"
    assert r.steps[("svc", "handler restart svc")]["status"] == "changed"
    assert server.handled == [{}, {}, {"restart svc": 101.0}]     # the batch, one, svc
    assert r.result.changed == 3 and r.events.exit_code(detailed=False) == 0
    # converged (the os facts kept from the run before): nothing comes along, no handler,
    # 2 execs
    again = run(service, server)
    assert again.execs == 2 and again.result.changed == 0


def test_the_handler_runs_even_when_its_role_has_nothing_else_to_change(service):
    server = FakeServer(folders={"/etc", "/etc/default"}, files={"/etc/svc.conf": "svc\n"})
    r = run(service, server)
    assert r.steps[("svc", "handler restart svc")]["status"] == "changed"
    assert server.handled[-1] == {"restart svc": 101.0}


def test_a_write_into_a_folder_that_is_not_there_yet_stays_with_its_package_in_its_role(service):
    server = FakeServer(folders={"/etc"})           # a package would bring /etc/default
    r = run(service, server)
    assert server.installs == [["pkg-one"], ["pkg-svc"]]
    batch = r.steps[(None, "apt batch: pkg-one")]
    assert "written first" not in batch["reason"]
    assert ("apt pkg-svc (svc: after file /etc/default/pkg-svc of its role, which changes "
            "something first)") in batch["reason"]
    assert r.steps[("svc", "file /etc/default/pkg-svc")]["status"] == "changed"
    assert server.applied.index("file /etc/default/pkg-svc") < server.applied.index("apt pkg-svc")


def test_a_failed_write_before_the_install_is_named_and_nothing_is_installed(service):
    server = FakeServer(folders={"/etc", "/etc/default"}, failing={"file /etc/default/pkg-svc"})
    r = run(service, server)
    batch = r.steps[(None, "apt batch: pkg-one pkg-svc")]
    assert batch["status"] == "failed" and batch["reason"] == (
        "file /etc/default/pkg-svc (role svc) failed, so nothing was installed: step 1 (run): exit 1")
    assert server.installs == [] and r.steps[("svc", "role")]["status"] == "skipped"


def test_check_mode_and_a_saved_plan_carry_the_write_as_the_run_does(service, tmp_path):
    checked = run(service, FakeServer(folders={"/etc", "/etc/default"}), check=True)
    batch = checked.steps[(None, "apt batch: pkg-one pkg-svc")]
    assert "written first: file /etc/default/pkg-svc (svc)" in batch["reason"]
    # the role plans after the batch: the file is not counted twice
    assert checked.steps[("svc", "file /etc/default/pkg-svc")]["status"] == "ok"
    path = tmp_path / "plan.json"
    plan.write(path, plan.from_results(service.env, [checked.result], commit="c0ffee"))
    server = FakeServer(folders={"/etc", "/etc/default"})
    applied = run(service, server, saved=plan.read(path).hosts, task="apply")
    assert applied.result.status == "changed" and server.files["/etc/default/pkg-svc"] == "ARGS=--fast\n"

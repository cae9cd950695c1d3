"""Saved plans, drift and shards without servers: a fake server keeps files in a dict and
answers the agent's requests, so check mode, the plan file and apply run through the real
runner, event stream and plan module."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from types import SimpleNamespace

import pytest

from fake_agent import AgentConn, all_applied, two_role_inventory
from provisioner import lock, plan, shards
from provisioner.errors import InputError
from provisioner.events import Events
from provisioner.runner import Options, Runner

ROLE = '''from provisioner.ops import files


def resources(v, ctx):
    yield files.file("/etc/{name}.conf", v["{name}_text"] + "\\n", mode="0600")
'''


class FakeServer:
    """Files by path; the agent's facts, apply and finish answered from and onto them."""

    def __init__(self, files=None, audit=None, side_effects=None):
        self.files = dict(files or {})
        self.audit = audit                 # the audit log's last line
        self.side_effects = side_effects or {}     # path written -> {other path: content}
        self.ops: list[str] = []

    def fact(self, path):
        if path not in self.files:
            return {"exists": False}
        data = self.files[path]
        return {"exists": True, "type": "file", "mode": "0600", "owner": "root", "group": "root",
                "size": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest(),
                "content": data}

    def answer(self, op, req):
        self.ops.append(op)
        if op == "facts":
            body = {"os": {"id": "debian", "version_id": "12"},
                    "files": {p: self.fact(p) for p in req.get("files", [])}}
            if "run_lock" in req:
                body["run_lock"] = {"acquired": True}
            if "last_lines" in req:
                body["last_lines"] = {p: self.audit for p in req["last_lines"]}
            return {"facts": body}
        if op == "apply":
            for c in req["changes"]:
                for step in c["steps"]:
                    if "write" in step:
                        self.files[step["write"]] = base64.b64decode(step["b64"]).decode()
                        self.files.update(self.side_effects.get(step["write"], {}))
            return all_applied(req)
        return {"released": True}


@pytest.fixture
def inv(tmp_path):
    return two_role_inventory(tmp_path, "plantest", ROLE, "{name}_text: {name}")


def run(inv, servers, *, check=False, saved=None, last_run=False, task="provision"):
    out = io.StringIO()
    events = Events(task=task, env=inv.env, json_out=True, verbose=0, diff=True, check=check,
                    stream_out=out, stream_err=io.StringIO())
    hosts = inv.select(None)
    events.start([h.name for h in hosts])
    runner = Runner(inv, events, Options(saved=saved, last_run=last_run),
                    connect=lambda h: AgentConn(servers[h.name].answer))
    results = runner.run(hosts)
    return SimpleNamespace(results={r.host: r for r in results}, events=events, out=out,
                           lines=lambda: [json.loads(x) for x in out.getvalue().splitlines()])


def saved_plan(inv, servers, tmp_path):
    """check mode -> plan file -> read back, as `provision --check --out` then `apply` do."""
    checked = run(inv, servers, check=True)
    path = tmp_path / "plan.json"
    plan.write(path, plan.from_results(inv.env, checked.results.values(), commit="c0ffee",
                                       secrets=["db_password"]))
    return plan.read(path), path


def test_a_saved_plan_applies_exactly_its_changes_in_no_more_execs_than_a_provision(inv, tmp_path):
    servers = {"web1": FakeServer({"/etc/one.conf": "old\n"}), "web2": FakeServer()}
    saved, path = saved_plan(inv, servers, tmp_path)
    assert servers["web1"].files == {"/etc/one.conf": "old\n"}       # check mode wrote nothing
    text = path.read_text()
    assert json.loads(text)["secrets"] == ["db_password"]           # the name, never a value
    web1 = saved.hosts["web1"]
    assert [c["resource"] for c in web1.roles["one"]] == ["file /etc/one.conf"]
    assert "+one" in web1.roles["one"][0]["diff"] and "b64" not in text    # no step is kept
    applied = run(inv, servers, saved=saved.hosts, task="apply")
    assert {h: s.files for h, s in servers.items()} == {
        h: {"/etc/one.conf": "one\n", "/etc/two.conf": "two\n"} for h in servers}
    assert applied.events.exit_code(detailed=False) == 0
    # the same execs as a provision of the same hosts: lock+os, facts, apply per role, finish
    fresh = {"web1": FakeServer({"/etc/one.conf": "old\n"}), "web2": FakeServer()}
    provisioned = run(inv, fresh)
    for h in servers:
        assert applied.results[h].remote_commands == provisioned.results[h].remote_commands


def test_a_host_changed_by_hand_is_refused_with_what_drifted_and_the_others_go_on(inv, tmp_path):
    servers = {"web1": FakeServer(), "web2": FakeServer()}
    saved, _ = saved_plan(inv, servers, tmp_path)
    servers["web1"].files["/etc/two.conf"] = "by hand\n"
    applied = run(inv, servers, saved=saved.hosts, task="apply")
    r1 = applied.results["web1"]
    assert r1.status == "refused" and "file /etc/two.conf" in r1.error
    assert servers["web1"].files == {"/etc/two.conf": "by hand\n"}       # nothing applied
    assert "apply" not in servers["web1"].ops
    assert servers["web2"].files == {"/etc/one.conf": "one\n", "/etc/two.conf": "two\n"}
    step = [e for e in applied.lines() if e["event"] == "step" and e["host"] == "web1"]
    assert [(e["resource"], e["status"]) for e in step] == [("saved plan", "skipped")]
    assert "drifted since the plan: file /etc/two.conf" in step[0]["reason"]


def test_a_role_that_plans_more_than_the_plan_holds_is_not_applied(inv, tmp_path):
    # as a package install of role one rewrites a file of role two: check mode cannot see it
    servers = {"web1": FakeServer({"/etc/two.conf": "two\n"},
                                  side_effects={"/etc/one.conf": {"/etc/two.conf": "default\n"}}),
               "web2": FakeServer()}
    saved, _ = saved_plan(inv, servers, tmp_path)
    assert saved.hosts["web1"].roles["two"] == []
    applied = run(inv, servers, saved=saved.hosts, task="apply")
    assert servers["web1"].files == {"/etc/one.conf": "one\n", "/etc/two.conf": "default\n"}
    failed = [e for e in applied.lines() if e["event"] == "step" and e["status"] == "failed"]
    assert [(e["host"], e["role"], e["resource"]) for e in failed] == [("web1", "two", "saved plan")]
    assert "not in the plan: file /etc/two.conf" in failed[0]["reason"]


def test_plan_facts_ignore_what_moves_on_its_own():
    a = {"os": {"id": "debian"}, "packages": {"installed": {"nginx": "1.22"}, "lists_age": 5},
         "timers": {"x": {"active": "active", "last": "1", "next": "2"}},
         "services": {"x.timer": {"active": "active", "sub": "waiting", "enabled": "enabled"}}}
    b = {"os": {"id": "debian"}, "packages": {"installed": {"nginx": "1.22"}, "lists_age": 900},
         "timers": {"x": {"active": "active", "last": "7", "next": "8"}},
         "services": {"x.timer": {"active": "active", "sub": "running", "enabled": "enabled"}}}
    assert plan.fact_items(a) == plan.fact_items(b)
    b["services"]["x.timer"]["enabled"] = "disabled"
    assert plan.drifted(plan.fact_items(a), plan.fact_items(b)) == ["service x.timer"]
    b["services"]["x.timer"]["enabled"] = "enabled"
    b["packages"]["installed"]["nginx"] = "1.24"
    assert plan.drifted(plan.fact_items(a), plan.fact_items(b)) == ["package nginx"]


@pytest.mark.parametrize("content, problem", [
    ("{", "not JSON"),
    ('{"x": 1}', "not a saved plan"),
    ('{"plan": 9}', "format 9"),
    ('{"plan": 1, "env": "prod", "commit": null, "roles": null, "hosts": {"web1": {"roles": {}}}}',
     "hosts.web1.facts: missing"),
])
def test_a_bad_plan_file_names_the_file_the_key_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(InputError) as e:
        plan.read(path)
    assert problem in str(e.value) and "p.json" in str(e.value) and "fix:" in str(e.value)


def test_a_plan_from_another_commit_is_refused(tmp_path, monkeypatch):
    from provisioner.cli import common
    path = tmp_path / "p.json"
    plan.write(path, plan.Plan(env="prod", commit="a" * 40, dirty=False,
                               hosts={"web1": plan.HostPlan({}, {})}))
    monkeypatch.setattr(lock, "git_state", lambda repo: ("b" * 40, False))
    with pytest.raises(InputError) as e:
        common._saved(path)
    assert "made from config commit aaaaaaaaaaaa, the config is at bbbbbbbbbbbb" in str(e.value)
    monkeypatch.setattr(lock, "git_state", lambda repo: ("a" * 40, False))
    assert common._saved(path).env == "prod"


def test_drift_says_what_drifted_and_since_when(inv):
    audit = json.dumps({"ts": "2026-11-30T10:00:00+00:00", "who": "ci", "from": "runner1",
                        "config": "abc123", "result": "changed"})
    servers = {"web1": FakeServer({"/etc/one.conf": "one\n", "/etc/two.conf": "by hand\n"}, audit),
               "web2": FakeServer({"/etc/one.conf": "one\n", "/etc/two.conf": "two\n"}, audit)}
    from provisioner.cli.common import _drift_summary
    checked = run(inv, servers, check=True, last_run=True, task="drift")
    assert servers["web1"].ops == ["facts", "facts"]            # the audit line costs no exec
    _drift_summary(checked.events, list(checked.results.values()))
    verdicts = {e["host"]: e for e in checked.lines() if e["event"] == "drift"}
    assert verdicts["web1"]["drifted"] == ["file /etc/two.conf"]
    assert verdicts["web1"]["last_run"]["ts"] == "2026-11-30T10:00:00+00:00"
    assert verdicts["web2"]["drifted"] == []
    assert checked.events.exit_code(detailed=True) == 5


def test_shards_partition_the_hosts_and_never_move_one():
    names = [f"web{i:03d}" for i in range(500)]
    parts = [shards.pick(names, k, 10, name=str) for k in range(1, 11)]
    assert sorted(h for p in parts for h in p) == sorted(names)          # each exactly once
    assert all(30 <= len(p) <= 70 for p in parts)                        # about 50 each
    more = names + ["db1", "db2"]                                        # adding hosts moves none
    assert all(set(p) <= set(shards.pick(more, k, 10, name=str)) for k, p in enumerate(parts, 1))
    assert shards.pick(names, 1, 1, name=str) == names


@pytest.mark.parametrize("bad", ["0/3", "4/3", "1/0", "x", "1-3", ""])
def test_a_bad_shard_names_the_flag_and_the_fix(bad):
    with pytest.raises(InputError, match=r"--shard: expected k/n.*\n    fix: pass e.g. --shard 1/10"):
        shards.parse(bad)


# --- the command line: bad input before any server -----------------------------------------

def test_bad_plan_flags_and_files_are_exit_2_before_any_host(tmp_path):
    from test_cli import cli, events, make_root
    root = make_root(tmp_path, {"web1": 1})
    r = cli(root, "provision", "--env", "test", "--out", "plan.json", "--json")
    assert r.returncode == 2 and "--out: only means something with --check" in events(r)[0]["message"]
    r = cli(root, "provision", "--env", "test", "--check", "--out", "no/such/dir/plan.json")
    assert r.returncode == 2 and "the folder no/such/dir does not exist" in r.stderr
    (root / "plan.json").write_text("{")
    r = cli(root, "apply", "plan.json", "--json")
    assert r.returncode == 2
    assert [e["event"] for e in events(r)] == ["error", "recap"]          # no host was started
    assert "plan.json: not JSON" in events(r)[0]["message"]
    r = cli(root, "drift", "--env", "test", "--shard", "2/1")
    assert r.returncode == 2 and "--shard: expected k/n" in r.stderr


def test_a_plan_holds_no_secret_value(tmp_path, forget_secrets):
    from fake_agent import two_role_inventory
    from provisioner.secret import Secret
    Secret("plan-s3cret-value")                       # as a vault value registers itself
    inv = two_role_inventory(tmp_path, "secrettest", ROLE, "{name}_text: 'pw=plan-s3cret-value'")
    servers = {"web1": FakeServer({"/etc/one.conf": "pw=old\n"}), "web2": FakeServer()}
    saved, path = saved_plan(inv, servers, tmp_path)
    text = path.read_text()
    assert "plan-s3cret-value" not in text and "***" in text
    assert run(inv, servers, saved=saved.hosts, task="apply").events.exit_code(detailed=False) == 0
    assert servers["web2"].files["/etc/one.conf"] == "pw=plan-s3cret-value\n"


# --- the whole command path in-process: the fake server behind the runner's Connection --------

@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout root with env plantest (the two-role inventory) whose hosts are fake servers;
    returns (servers, task runner returning (exit code, events))."""
    from invoke import Exit

    from fake_agent import two_role_inventory
    from provisioner import runner
    from provisioner.cli import common
    from sshpeers import ed25519_key, known_line
    root = tmp_path / "root"
    (root / "inventories").mkdir(parents=True)
    two_role_inventory(root / "inventories", "plantest", ROLE, "{name}_text: {name}")
    (root / "roles").symlink_to(root / "inventories" / "roles")
    key = ed25519_key()
    (root / "inventories" / "known_hosts").write_text(
        known_line("192.0.2.1", key) + known_line("192.0.2.2", key))
    monkeypatch.setattr(common, "REPO_ROOT", root)
    monkeypatch.setattr(lock, "git_state", lambda repo: ("c0ffee" * 6 + "c0ff", False))
    servers = {"web1": FakeServer(), "web2": FakeServer()}
    monkeypatch.setattr(runner, "Connection",
                        lambda host, *a, **kw: AgentConn(servers[host.name].answer))

    def task(capsys, name, **kw):
        from provisioner.cli import plans, provision
        fn = {"provision": provision.provision, "apply": plans.apply, "drift": plans.drift}[name]
        capsys.readouterr()
        try:
            fn.body(None, json=True, yes=True, **kw)
            code = 0
        except Exit as e:
            code = e.code
        out = capsys.readouterr()
        return code, [json.loads(x) for x in out.out.splitlines()], out.err
    return servers, task


def test_the_commands_plan_apply_refuse_and_drift(checkout, capsys, tmp_path):
    servers, task = checkout
    path = str(tmp_path / "plan.json")
    code, evs, err = task(capsys, "provision", env="plantest", check=True, out=path)
    assert code == 0 and "wrote" in err and "2 host(s), 4 change(s)" in err
    assert servers["web1"].files == {}
    servers["web2"].files["/etc/two.conf"] = "by hand\n"
    code, evs, _ = task(capsys, "apply", plan=path)
    assert code == 2
    assert servers["web1"].files == {"/etc/one.conf": "one\n", "/etc/two.conf": "two\n"}
    assert servers["web2"].files == {"/etc/two.conf": "by hand\n"}
    assert evs[0]["event"] == "start" and evs[0]["env"] == "plantest" and evs[0]["task"] == "apply"
    assert [e["event"] for e in evs[-2:]] == ["error", "recap"]
    assert "web2: 1 fact(s) drifted since the plan: file /etc/two.conf" in evs[-2]["message"]
    code, evs, _ = task(capsys, "drift", env="plantest")
    assert code == 5
    assert {e["host"]: e["drifted"] for e in evs if e["event"] == "drift"} == {
        "web1": [], "web2": ["file /etc/one.conf", "file /etc/two.conf"]}
    assert task(capsys, "provision", env="plantest")[0] == 0
    assert task(capsys, "drift", env="plantest")[0] == 0
    code, evs, _ = task(capsys, "drift", env="plantest", shard="1/2")
    code2, evs2, _ = task(capsys, "drift", env="plantest", shard="2/2")
    assert sorted(evs[0]["hosts"] + evs2[0]["hosts"]) == ["web1", "web2"]


def test_drift_verdicts_for_people():
    out = io.StringIO()
    ev = Events(task="drift", env="prod", json_out=False, verbose=0, diff=False, check=True,
                stream_out=out, stream_err=io.StringIO(), tty=False)
    ev.start(["web1", "web2"])
    ev.drift("web1", [], {"ts": "2026-11-30T10:00:00+00:00", "who": "ci", "from": "runner",
                          "config": "abc123456789"})
    ev.drift("web2", ["file /etc/motd", "apt nginx"], None)
    lines = out.getvalue().splitlines()[1:]
    assert lines == [
        "drift: web1: matches its roles (last run that changed it: 2026-11-30T10:00:00+00:00 by "
        "ci@runner, config abc123456789)",
        "drift: web2: 2 resources drifted (no run of ours on record): file /etc/motd, apt nginx"]

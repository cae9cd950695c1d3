"""The dead man's switch, pure: what the agent copies aside and arms, what the revert puts
back, and how the runner asks for it. systemd-run and systemctl are stand-ins on PATH here;
tests/test_role_harden.py proves it on real servers (controller killed, network cut)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from provisioner import agent
from provisioner.change import Change
from provisioner.connection import Result
from provisioner.facts import Facts
from provisioner.ops._base import run as run_step, write as write_step
from provisioner.remote import agent as remote
from provisioner.runner import Guard, HostResult, Options, Runner


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A root for the switch's copies, and systemd-run / systemctl that record their argv."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("systemd-run", "systemctl"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(remote, "SWITCH_ROOT", str(tmp_path / "revert"))
    etc = tmp_path / "etc"
    etc.mkdir()
    return etc, calls


def _calls(calls):
    return calls.read_text().splitlines() if calls.exists() else []


def test_the_switch_is_armed_just_before_the_first_risky_change_and_reverts_it(server):
    etc, calls = server
    sshd, sudoers, gone, link = etc / "sshd_config", etc / "sudoers", etc / "new.conf", etc / "link"
    sshd.write_text("Port 22\n")
    sshd.chmod(0o600)
    sudoers.write_text("old sudoers\n")
    link.symlink_to("sshd_config")
    marker = etc / "ran-after"
    request = {
        "changes": [
            {"id": "0", "steps": [write_step(str(sudoers), "written before arming\n", "0440", None, None)]},
            {"id": "1", "arm": True, "steps": [write_step(str(sshd), "Port 2222\n", "0644", None, None),
                                               write_step(str(gone), "x\n", None, None, None),
                                               run_step(["rm", str(link)])]},
        ],
        "handlers": {},
        "switch": {"id": "run1-harden", "seconds": 120,
                   "paths": [str(sshd), str(sudoers), str(gone), str(link)],
                   "after": [["sh", "-c", f"echo reloaded > {marker}"]]},
    }
    answer = remote.apply(request)
    assert answer["ok"] and answer["switch"]["armed"] and answer["switch"]["unit"] == "provisioner-revert-run1-harden"
    (armed,) = _calls(calls)
    assert armed.startswith("systemd-run --unit provisioner-revert-run1-harden ") and "--on-active=120s" in armed
    assert sshd.read_text() == "Port 2222\n" and not link.exists()
    # what the timer's service runs: exactly the command systemd-run was given
    command = armed.split(" --property=Type=oneshot ", 1)[1].split()
    out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert sorted(out["restored"]) == sorted(map(str, (sshd, sudoers, gone, link)))
    assert out["failed"] == [] and out["after"][0]["rc"] == 0 and marker.read_text() == "reloaded\n"
    assert sshd.read_text() == "Port 22\n" and stat.S_IMODE(sshd.stat().st_mode) == 0o600
    assert sudoers.read_text() == "written before arming\n"      # copied when armed, not earlier
    assert not gone.exists() and os.readlink(link) == "sshd_config"


def test_revert_now_then_the_timer_does_nothing_more(server):
    etc, calls = server
    f = etc / "sshd_config"
    f.write_text("old\n")
    sw = {"id": "run2-harden", "seconds": 60, "paths": [str(f)], "after": []}
    assert remote.arm_switch(sw)["armed"]
    f.write_text("new\n")
    out = remote.switch({"id": "run2-harden", "action": "revert"})
    assert out["restored"] == [str(f)] and f.read_text() == "old\n"
    assert "systemctl stop provisioner-revert-run2-harden.timer" in _calls(calls)
    assert not os.path.exists(os.path.join(remote.SWITCH_ROOT, "run2-harden"))


def test_disarm_keeps_the_change(server):
    etc, calls = server
    f = etc / "sshd_config"
    f.write_text("old\n")
    assert remote.arm_switch({"id": "run3-harden", "seconds": 60, "paths": [str(f)], "after": []})["armed"]
    f.write_text("new\n")
    assert remote.switch({"id": "run3-harden", "action": "disarm"}) == {"disarmed": True, "fired": None}
    assert f.read_text() == "new\n"
    assert "systemctl stop provisioner-revert-run3-harden.timer" in _calls(calls)
    assert not os.path.exists(os.path.join(remote.SWITCH_ROOT, "run3-harden"))


def test_without_systemd_run_nothing_is_armed_and_it_says_why(server, monkeypatch, tmp_path):
    etc, _ = server
    (tmp_path / "bin" / "systemd-run").write_text("#!/bin/sh\necho 'System has not been booted with systemd' >&2\nexit 1\n")
    out = remote.arm_switch({"id": "run4-harden", "seconds": 60, "paths": [str(etc / "x")], "after": []})
    assert out["armed"] is False and "System has not been booted with systemd" in out["why"]
    assert not os.path.exists(os.path.join(remote.SWITCH_ROOT, "run4-harden"))


# --- the runner's side ----------------------------------------------------------------------

class FakeConn:
    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def run(self, argv, stdin=None, **kw):
        doc = json.loads(stdin)
        self.sent.append((doc["op"], doc["request"]))
        answer = {"agent": {"version": agent.PROTOCOL}, **self.answers(doc["op"], doc["request"])}
        return Result(0, agent.MARKER + json.dumps(answer).encode(), b"", 0.1)


def _guard(check_ok: bool):
    def check(host):
        if not check_ok:
            raise RuntimeError("login refused")
    return Guard("fresh login", ("/etc/ssh/sshd_config",), check, resources=("ufw",),
                 revert_paths=("/etc/ssh/sshd_config", "/etc/ufw/user.rules"),
                 revert_after=(("ufw", "reload"),), revert_seconds=90)


def test_the_runner_arms_only_for_watched_changes():
    runner = object.__new__(Runner)
    runner.events = type("E", (), {"run_id": "abc123"})()
    changes = [Change("file /etc/motd", "create", "absent", ()),
               Change("ufw", "rules", "differ", ()),
               Change("template /etc/ssh/sshd_config", "update", "differs",
                      ({"write": "/etc/ssh/sshd_config"},))]      # guards watch the paths written
    request = agent.apply_request(changes, {})
    assert runner._arm_request("harden", [_guard(True)], changes, request) == "abc123-harden"
    assert [c["arm"] for c in request["changes"]] == [False, True, True]
    assert request["switch"] == {"id": "abc123-harden", "seconds": 90,
                                 "paths": ["/etc/ssh/sshd_config", "/etc/ufw/user.rules"],
                                 "after": [["ufw", "reload"]]}
    plain = agent.apply_request(changes[:1], {})
    assert runner._arm_request("harden", [_guard(True)], changes[:1], plain) is None
    assert "switch" not in plain


@pytest.mark.parametrize("check_ok", [True, False])
def test_a_passed_guard_disarms_a_failed_one_fires_the_switch_now(check_ok):
    runner = object.__new__(Runner)
    conn = FakeConn(lambda op, req: {"restored": ["/etc/ssh/sshd_config"], "failed": [],
                                     "after": [{"argv": ["ufw", "reload"], "rc": 0}]}
                    if req.get("action") == "revert" else {"disarmed": True})
    steps, res = [], HostResult("h1")
    passed = Runner._guard(runner, conn, None, _guard(check_ok), Facts({"files": {}}), res,
                           lambda *a, **kw: steps.append(a), switch_id="abc123-harden")
    assert passed is check_ok
    if check_ok:
        assert conn.sent == []                          # the runner disarms after every guard passed
    else:
        assert conn.sent == [("switch", {"id": "abc123-harden", "action": "revert"})]
        assert steps[0][2] == "RuntimeError: login refused; restored the previous /etc/ssh/sshd_config"
        assert res.failed == 1


def test_disarming_after_the_timer_fired_says_so(server):
    etc, calls = server
    f = etc / "sshd_config"
    f.write_text("old\n")
    armed = remote.arm_switch({"id": "run5-harden", "seconds": 60, "paths": [str(f)], "after": []})
    assert armed["armed"]
    f.write_text("new\n")
    command = _calls(calls)[0].split(" --property=Type=oneshot ", 1)[1].split()
    subprocess.run(command, check=True, capture_output=True)          # the timer fires first
    out = remote.switch({"id": "run5-harden", "action": "disarm"})
    assert out["disarmed"] is False and out["fired"]["restored"] == [str(f)]
    assert f.read_text() == "old\n"


def test_a_switch_that_fired_before_the_guard_confirmed_fails_the_role():
    from provisioner.ops import files
    from provisioner.runner import PreparedRole

    class Events:
        run_id = "abc123"
        check = False

        def __init__(self):
            self.steps, self.warnings = [], []

        def step(self, **kw):
            self.steps.append(kw)

        def warn(self, message, host=None):
            self.warnings.append(message)

    runner = object.__new__(Runner)
    runner.events, runner.opts = Events(), Options()

    def answers(op, req):
        if op == "apply":
            return {"ok": True, "handlers": [], "switch": {"armed": True},
                    "results": [{"id": c["id"], "status": "ok"} for c in req["changes"]]}
        return {"disarmed": False, "fired": {"restored": ["/etc/ssh/sshd_config"], "failed": [], "after": []}}
    conn = FakeConn(answers)
    resource = files.file("/etc/ssh/sshd_config", "Port 22\n", mode="0600")
    role = PreparedRole("harden", [resource], {}, [_guard(True)], {})
    res = HostResult("h1")
    runner._run_role(conn, type("H", (), {"name": "h1"})(), role,
                     Facts({"files": {"/etc/ssh/sshd_config": {"exists": False}}}), res)
    assert [op for op, _ in conn.sent] == ["apply", "switch"]
    last = runner.events.steps[-1]
    assert last["resource"] == "dead man's switch" and last["status"] == "failed"
    assert "restored /etc/ssh/sshd_config before the guard confirmed" in last["reason"]
    assert res.failed == 1

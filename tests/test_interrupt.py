"""Ctrl-C / SIGTERM during a run, without servers: a fake connection answers the agent's
requests, and the signal comes while an apply is in flight."""
from __future__ import annotations

import io
import json
import os
import signal
import time

import pytest

from fake_agent import AgentConn, all_applied, two_role_inventory
from provisioner import runner as runner_module
from provisioner.events import Events
from provisioner.interrupt import Stop, on_signals
from provisioner.runner import Options, Runner

ROLE = '''from provisioner.ops import files


def resources(v, ctx):
    yield files.file("/etc/{name}.conf", "{name}\\n")
'''


class FakeConn(AgentConn):
    """Answers like the agent on a server where nothing exists yet; `during_apply` runs while
    an apply is 'on the server'."""

    def __init__(self, host, log, during_apply=lambda: None):
        super().__init__(self.reply)
        self.host, self.log, self.during_apply = host, log, during_apply

    def reply(self, op, req):
        self.log.append((self.host.name, op))
        if op == "facts":
            return {"facts": {"os": {"id": "debian", "version_id": "12"},
                              "files": {p: {"exists": False} for p in req.get("files", [])},
                              **({"run_lock": {"acquired": True}} if "run_lock" in req else {})}}
        if op == "apply":
            self.during_apply()
            return all_applied(req)
        return {"released": True}


@pytest.fixture
def inv(tmp_path):
    return two_role_inventory(tmp_path, "stoptest", ROLE, "{name}_x: 1")


def test_a_stop_during_an_apply_lets_it_finish_and_starts_nothing_more(inv):
    out = io.StringIO()
    events = Events(task="provision", env=inv.env, json_out=True, verbose=0, diff=False,
                    check=False, stream_out=out, stream_err=io.StringIO())
    stop, log = Stop(), []
    runner = Runner(inv, events, Options(serial=1), stop=stop,
                    connect=lambda h: FakeConn(h, log, lambda: stop.request(signal.SIGTERM)))
    events.start(["web1", "web2"])
    runner.run(inv.select(None))
    assert events.fail_run(stop.code, stop.reason) == 143
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    steps = {(e["host"], e["role"], e["resource"]): (e["status"], e["reason"])
             for e in lines if e["event"] == "step"}
    # the apply in flight finished and is reported; the lock was released (finish)
    assert steps[("web1", "one", "file /etc/one.conf")][0] == "changed"
    assert log == [("web1", "facts"), ("web1", "facts"), ("web1", "apply"), ("web1", "finish")]
    assert steps[("web1", "two", "role")] == ("skipped", "not run: the run was interrupted (SIGTERM)")
    assert steps[("web2", None, "host")] == ("skipped",
                                             "not started: the run was interrupted (SIGTERM)")
    assert [e["event"] for e in lines[-2:]] == ["error", "recap"]
    assert lines[-2]["code"] == 143 and lines[-1]["skipped"] == 2


def test_signals_set_the_stop_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    stop = Stop()
    with on_signals(stop):
        os.kill(os.getpid(), signal.SIGINT)        # delivered before kill() returns
        assert stop and stop.code == 130
    assert signal.getsignal(signal.SIGINT) is before
    stop = Stop()
    with on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.code == 143 and "SIGTERM" in stop.reason


def test_ctrl_c_during_invoke_provision_ends_json_with_error_and_recap(inv, monkeypatch, capsys):
    from invoke import Exit

    from provisioner.cli import common

    class SignalledRunner(Runner):          # Ctrl-C arrives while web1's apply is on the server
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, connect=lambda h: FakeConn(h, [], self.ctrl_c))

        def ctrl_c(self):                   # the apply lasts until the main thread took it
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while not self.stop and time.monotonic() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(common, "load",
                        lambda env, interactive, limit=None, meanwhile=None: (inv, inv.select(limit)))
    monkeypatch.setattr(runner_module, "Runner", SignalledRunner)   # common imports it per run
    with pytest.raises(Exit) as e:
        common.run_task("provision", env=inv.env, limit=None, check=False, diff=False, json=True,
                        yes=True, serial=1, forks=1, verbose=0)
    assert e.value.code == 130
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["start", "step", "step", "host", "step", "host",
                                           "error", "recap"]
    assert "SIGINT" in lines[-2]["message"] and lines[-1]["changed"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_at_a_prompt_before_the_run_is_130_with_error_and_recap(monkeypatch, capsys):
    from invoke import Exit

    from provisioner.cli import common

    def prompt(env, interactive, limit=None, meanwhile=None):   # e.g. the vault password prompt
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "load", prompt)
    with pytest.raises(Exit) as e:
        common.run_task("provision", env="local", limit=None, check=False, diff=False, json=True,
                        yes=True, serial=0, forks=1, verbose=0)
    assert e.value.code == 130
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["error", "recap"] and lines[0]["code"] == 130

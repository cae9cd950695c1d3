"""The lockout guard's rollback says exactly what it restored (pure: a fake connection)."""
from __future__ import annotations

import json

from provisioner import agent
from provisioner.connection import Result
from provisioner.facts import Facts
from provisioner.runner import Guard, HostResult, Runner


class FakeConn:
    def __init__(self, ok: bool = True):
        self.ok, self.sent = ok, []

    def run(self, argv, stdin=None, **kw):
        self.sent.append(json.loads(stdin)["request"])
        answer = {"ok": self.ok, "handlers": [], "agent": {"version": agent.PROTOCOL},
                  "results": [{"id": "0", "status": "ok" if self.ok else "failed"}]}
        return Result(0, agent.MARKER + json.dumps(answer).encode(), b"", 0.1)


def _fail(host):
    raise RuntimeError("login refused")


def _rollback(files: dict, ok: bool = True):
    guard = Guard("fresh login", tuple(files), _fail)
    conn, steps, res = FakeConn(ok), [], HostResult("h1")
    Runner._guard(object.__new__(Runner), conn, None, guard, Facts({"files": files}), res,
                  lambda resource, status, reason, **kw: steps.append((resource, status, reason)))
    (step,) = steps
    return step, conn.sent, res


TEXT = {"exists": True, "type": "file", "mode": "0600", "owner": "root", "group": "root",
        "content": "Port 22\n", "sha256": "x", "size": 8}


def test_files_it_could_not_read_are_reported_not_restored():
    (resource, status, reason), sent, res = _rollback({
        "/etc/ssh/sshd_config": TEXT,
        "/etc/sudoers.d/50-harden": {"exists": True, "type": "link", "target": "/elsewhere"},
        "/etc/ssh/big": {"exists": True, "type": "file", "content": None, "size": 300000},
        "/etc/ssh/new": {"exists": False}})
    assert status == "failed" and res.failed == 1
    assert "restored the previous /etc/ssh/sshd_config, /etc/ssh/new;" in reason
    assert ("COULD NOT restore /etc/sudoers.d/50-harden (link), /etc/ssh/big (binary or over "
            "256 KiB): fix it through the open session or the console") in reason
    steps = sent[0]["changes"][0]["steps"]
    assert [s.get("write") or s["run"][-1] for s in steps] == ["/etc/ssh/sshd_config", "/etc/ssh/new"]


def test_everything_readable_is_restored_and_said_so():
    (_, _, reason), _, _ = _rollback({"/etc/ssh/sshd_config": TEXT})
    assert reason == "RuntimeError: login refused; restored the previous /etc/ssh/sshd_config"


def test_a_failed_rollback_says_so():
    (_, _, reason), _, _ = _rollback({"/etc/ssh/sshd_config": TEXT}, ok=False)
    assert "COULD NOT restore /etc/ssh/sshd_config: fix it" in reason

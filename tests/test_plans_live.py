"""Saved plans and drift on real servers, through the real command line: a plan applies exactly
what it holds; a host changed by hand after the plan is refused (exit 2) with what drifted while
the other goes on; `invoke drift` exits 5 after a change by hand and 0 after a provision."""
from __future__ import annotations

import json

import pytest

from engine_helpers import TEST_ROLES, inventory, sh
from test_cli import cli, events

pytestmark = pytest.mark.usefixtures("testbed", "fresh_servers")
HOSTS = ["web1", "web2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, fresh_servers):
    """A checkout root with env `plantest`: web1 and web2 with the opsdemo test role, logged in
    as root (fresh_servers made them never-provisioned), provisioned once."""
    root = tmp_path_factory.mktemp("plans")
    (root / "roles").mkdir()
    (root / "roles" / "opsdemo").symlink_to(TEST_ROLES / "opsdemo")
    (root / "inventories").mkdir()
    inventory(root / "inventories", HOSTS, ["opsdemo"], name="plantest")    # inventories/plantest.yml
    r = cli(root, "provision", "--env", "plantest", "--yes", "--json", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def steps(proc, host, status=None):
    return [e for e in events(proc) if e["event"] == "step" and e["host"] == host
            and (status is None or e["status"] == status)]


def test_a_saved_plan_applies_exactly_and_a_host_changed_since_is_refused(root):
    for h in HOSTS:
        sh(h, "echo by-hand > /srv/opsdemo/message")
    planned = cli(root, "provision", "--env", "plantest", "--check", "--yes", "--json",
                  "--out", str(root / "plan.json"))
    assert planned.returncode == 0, planned.stderr
    plan = json.loads((root / "plan.json").read_text())
    for h in HOSTS:
        assert [c["resource"] for c in plan["hosts"][h]["roles"]["opsdemo"]] == \
            ["file /srv/opsdemo/message"]
    assert "b64" not in (root / "plan.json").read_text()
    sh("web2", "echo '# by hand' >> /etc/default/opsdemo")     # after the review: web2 drifted
    applied = cli(root, "apply", str(root / "plan.json"), "--yes", "--json")
    assert applied.returncode == 2, applied.stdout[-3000:]
    # web1: exactly the plan, in the execs of a provision that changes one role
    assert [e["resource"] for e in steps(applied, "web1", "changed")] == ["file /srv/opsdemo/message"]
    assert sh("web1", "cat /srv/opsdemo/message").stdout == "hello from provisioner\n"
    assert events(applied)[-1]["hosts"]["web1"]["remote_commands"] <= 4
    # web2: refused, with what drifted, and untouched
    refused = steps(applied, "web2")
    assert [(e["resource"], e["status"]) for e in refused] == [("saved plan", "skipped")]
    assert "file /etc/default/opsdemo" in refused[0]["reason"]
    assert sh("web2", "cat /srv/opsdemo/message").stdout == "by-hand\n"
    error = next(e for e in events(applied) if e["event"] == "error")
    assert error["code"] == 2 and "web2" in error["message"] and "web1" not in error["message"]


def test_drift_exits_5_after_a_change_by_hand_and_0_after_provision(root):
    converged = cli(root, "provision", "--env", "plantest", "--yes", "--json")
    assert converged.returncode == 0, converged.stderr
    sh("web2", "echo by-hand > /srv/opsdemo/message")
    drifted = cli(root, "drift", "--env", "plantest", "--yes", "--json")
    assert drifted.returncode == 5, drifted.stdout[-3000:] + drifted.stderr[-3000:]
    verdict = {e["host"]: e for e in events(drifted) if e["event"] == "drift"}
    assert verdict["web2"]["drifted"] == ["file /srv/opsdemo/message"]
    assert verdict["web1"]["drifted"] == []
    # since when: the last run that changed web2 (the provision above), from its audit log
    assert verdict["web2"]["last_run"]["task"] == "provision" and verdict["web2"]["last_run"]["ts"]
    assert "by-hand" not in drifted.stdout                      # what drifted, not its content
    assert cli(root, "provision", "--env", "plantest", "--yes").returncode == 0
    clean = cli(root, "drift", "--env", "plantest", "--yes", "--json")
    assert clean.returncode == 0, clean.stdout[-3000:]
    assert all(e["drifted"] == [] for e in events(clean) if e["event"] == "drift")


def test_shards_of_the_command_line_partition_the_hosts(root):
    seen = []
    for k in (1, 2, 3):
        r = cli(root, "drift", "--env", "plantest", "--shard", f"{k}/3", "--yes", "--json")
        assert r.returncode in (0, 5), r.stderr
        seen += events(r)[0]["hosts"]
    assert sorted(seen) == HOSTS

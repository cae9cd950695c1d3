"""File groups: planned as one change, applied by the agent (here, on this machine, in a temp
folder): members written, one check of the whole, everything put back when the check fails."""
from __future__ import annotations

import os
import stat

import pytest

from provisioner import agent
from provisioner.api import file_group, files, links, templates
from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import PlanError, plan_all
from test_agent import call          # the agent run on this machine


def facts_for(*resources) -> Facts:
    from provisioner.ops import request
    return Facts(call("facts", request(resources))["facts"])


def apply(changes, handlers=None) -> dict:
    return call("apply", agent.apply_request(changes, handlers or {}))


def site(tmp_path, text, check):
    conf, enabled = tmp_path / "site.conf", tmp_path / "enabled.conf"
    return file_group("web", [files.file(str(conf), text, owner=None, group=None),
                              links.link(str(enabled), str(conf))],
                      check=check, notify="reload web")


def test_a_group_is_one_change_with_every_diff_and_converges(tmp_path):
    g = site(tmp_path, "listen 80;\n", ["true"])
    (change,) = g.plan(facts_for(g))
    assert isinstance(change, Change) and change.resource == "file group web"
    assert change.notify == ("reload web",) and "+listen 80;" in change.diff
    assert change.paths == (str(tmp_path / "site.conf"), str(tmp_path / "enabled.conf"))
    assert apply([change], {"reload web": [{"run": ["true"]}]})["ok"]
    assert g.plan(facts_for(g)) == [Noop("file group web", "2 files as wanted")]
    # and the prediction says so without asking the server again
    before = Facts({"files": {str(tmp_path / p): {"exists": False}
                              for p in ("site.conf", "enabled.conf")}})
    assert all(isinstance(c, Noop) for c in g.plan(before.overlay(g.expect(before))))


def test_a_failed_check_puts_every_file_back_and_no_handler_runs(tmp_path):
    conf = tmp_path / "site.conf"
    conf.write_text("listen 80;\n")
    os.chmod(conf, 0o640)
    marker = tmp_path / "reloaded"
    g = site(tmp_path, "listen eighty;\n",
             ["sh", "-c", f"grep -q 'listen 80;' {conf} || {{ echo 'bad listen' >&2; exit 1; }}"])
    (change,) = g.plan(facts_for(g))
    res = apply([change], {"reload web": [{"run": ["touch", str(marker)]}]})
    r = res["results"][0]
    assert not res["ok"] and r["status"] == "failed"
    assert "check failed (exit 1)" in r["error"] and "bad listen" in r["error"]
    assert "put back" in r["error"]
    assert conf.read_text() == "listen 80;\n" and stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert not (tmp_path / "enabled.conf").exists() and not os.path.lexists(tmp_path / "enabled.conf")
    assert not marker.exists() and res["handlers"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.conf"]      # no temp left


def test_a_failed_member_write_also_puts_back_the_ones_before(tmp_path):
    conf = tmp_path / "a.conf"
    conf.write_text("old\n")
    g = file_group("two", [files.file(str(conf), "new\n", owner=None, group=None),
                           files.file(str(tmp_path / "b.conf"), "x\n", owner=None, group=None,
                                      validate=["false", "{path}"])], check=["true"])
    res = apply(g.plan(facts_for(g)))
    assert "validation failed" in res["results"][0]["error"]
    assert conf.read_text() == "old\n" and not (tmp_path / "b.conf").exists()


def test_groups_refuse_what_they_cannot_put_back_and_conflicts(tmp_path):
    with pytest.raises(TypeError, match="cannot be a member"):
        file_group("g", [files.directory(str(tmp_path / "d"))], check=["true"])
    with pytest.raises(TypeError, match="argv"):
        file_group("g", [files.file("/etc/x", "y")], check="nginx -t")
    inside = file_group("g", [files.file("/etc/x", "y")], check=["true"])
    with pytest.raises(PlanError, match="conflicts"):
        plan_all([inside, files.file("/etc/x", "z")], Facts({"files": {"/etc/x": {"exists": False}}}))


def test_a_template_member_keeps_secrets_out_of_the_group_diff(tmp_path):
    from provisioner.secret import Secret
    (tmp_path / "t.j2").write_text("password={{ pw }}\n")
    t = templates.template(str(tmp_path / "app.env"), "t.j2", {"pw": Secret("hunter2-x", register=False)},
                           owner=None, group=None, root=tmp_path)
    g = file_group("env", [t], check=["true"])
    (change,) = g.plan(Facts({"files": {str(tmp_path / "app.env"): {"exists": False}}}))
    assert "password=***" in change.diff and "hunter2-x" not in change.diff + change.why

"""Pure tests around the ops: fact requests and accessors, threading predicted facts through a
role (plan_all), templating with secrets, handlers. No processes, no files written."""
from __future__ import annotations

import base64
import json

import pytest

from provisioner.change import Change, Noop
from provisioner.facts import Facts, FactError, merge_requests
from provisioner.ops import PlanError, apt, commands, files, lines, plan_all, request, sysctl, systemd, users
from provisioner.secret import Secret
from provisioner import templating


def S(v):
    return Secret(v, register=False)


def test_merge_requests_unions_and_dedupes_in_order():
    req = merge_requests([{"files": ["/a", "/b"]}, {"files": ["/b", "/c"], "packages": ["x"]},
                          {"checks": [["true"], ["false"]]}, {"checks": [["true"]]}, {}])
    assert req == {"os": True, "files": ["/a", "/b", "/c"], "packages": ["x"],
                   "checks": [["true"], ["false"]]}
    with pytest.raises(ValueError, match="unknown fact kind"):
        merge_requests([{"nonsense": []}])


def test_checks_with_stdin_keep_the_input_off_argv_and_refuse_ambiguity():
    cmd = commands.command(["psql", "-f", "-"], stdin=S("ALTER ..."), name="set password",
                           unless=["pw-matches", "app"], unless_stdin=S("hunter2-pw"))
    req = request([cmd, commands.command(["true"], unless=["pw-matches", "app"],
                                         unless_stdin=S("hunter2-pw"))])
    assert req["checks"] == [{"argv": ["pw-matches", "app"], "stdin": "hunter2-pw"}]
    assert "hunter2" not in repr(cmd) and "hunter2" not in cmd.id
    f = Facts({"checks": {"pw-matches app": 0}})
    assert cmd.plan(f) == [Noop("command set password", "`pw-matches app` succeeded")]
    changed = cmd.plan(Facts({"checks": {"pw-matches app": 1}}))
    assert changed[0].steps[0]["stdin"] == "ALTER ..." and changed[0].steps[0]["run"][0] == "psql"
    # same argv, other input: the answer (keyed by argv) could not tell them apart
    with pytest.raises(ValueError, match="different stdin"):
        merge_requests([{"checks": [{"argv": ["x"], "stdin": "a"}]},
                        {"checks": [{"argv": ["x"], "stdin": "b"}]}])
    with pytest.raises(ValueError, match="different stdin"):
        merge_requests([{"checks": [["x"]]}, {"checks": [{"argv": ["x"], "stdin": "b"}]}])
    assert merge_requests([{"checks": [{"argv": ["x"], "stdin": None}, ["x"]]}])["checks"] == [["x"]]
    with pytest.raises(ValueError, match="needs an unless"):
        commands.command(["true"], unless_stdin="x")
    with pytest.raises(TypeError, match="unless_stdin"):
        commands.command(["true"], unless=["true"], unless_stdin=b"x")


def test_request_of_resources():
    req = request([apt.packages(["nginx"], state="latest"), files.file("/etc/x", "y"),
                   systemd.service("nginx", running=True), sysctl.sysctl("vm.swappiness", 10)])
    assert req == {"os": True, "packages": ["nginx"], "package_candidates": ["nginx"],
                   "files": ["/etc/x", "/etc/sysctl.d/60-provisioner.conf"],
                   "services": ["nginx.service"], "sysctl": ["vm.swappiness"]}


def test_facts_accessors_refuse_facts_not_gathered():
    f = Facts({"files": {"/a": {"exists": False}}, "packages": {"installed": {}, "lists_age": 5}})
    assert f.file("/a").exists is False
    with pytest.raises(KeyError, match="not gathered"):
        f.file("/b")
    with pytest.raises(KeyError, match="not gathered"):
        f.package("nginx")
    with pytest.raises(KeyError, match="were not gathered"):
        f.user("root")
    assert f.apt_lists_age == 5


def test_facts_errors_are_explicit():
    f = Facts({"files": {"/root/x": {"exists": None, "error": "Permission denied"}},
               "users": None, "errors": {"users": "KeyError: boom"}})
    with pytest.raises(FactError, match="Permission denied"):
        f.file("/root/x")
    with pytest.raises(FactError, match="could not gather users"):
        f.user("x")


def test_overlay_does_not_touch_the_original():
    base = {"files": {"/a": {"exists": True, "type": "link", "target": "/t"}, "/b": {"exists": False}}}
    f = Facts(base)
    g = f.overlay({"files": {"/a": {"__replace__": True, "exists": True, "type": "file"}}})
    assert g.file("/a").target is None and g.file("/a").type == "file"
    assert f.file("/a").target == "/t" and base["files"]["/a"]["type"] == "link"
    assert g.file("/b").exists is False


def test_plan_all_threads_predictions_group_then_user():
    facts = Facts({"groups": {"deployers": None, "deploy": None}, "users": {"deploy": None}})
    res = [users.group("deploy"), users.group("deploy"), users.user("deploy", ["deployers"]),
           users.user("deploy", ["deployers"])]
    planned = [r for _, result in plan_all(res, facts) for r in result]
    # the second group sees the first one's group created; the user sees its group of the
    # same name (useradd --user-group would refuse it), then the second user the first
    assert [type(c).__name__ for c in planned] == ["Change", "Noop", "Change", "Noop"]
    useradd = planned[2].steps[0]["run"]
    assert useradd[-4:] == ["--gid", "deploy", "--", "deploy"] and "--user-group" not in useradd


def test_plan_all_two_sysctl_keys_in_one_file():
    path = "/etc/sysctl.d/60-provisioner.conf"
    facts = Facts({"files": {path: {"exists": False}},
                   "sysctl": {"a.b": {"value": "0", "persisted": []},
                              "c.d": {"value": "0", "persisted": []}}})
    planned = plan_all([sysctl.sysctl("a.b", 1), sysctl.sysctl("c.d", 1)], facts)
    second = planned[1][1][0]
    # the second key's diff is against the file the first one will have written
    assert second.diff == (f"--- a{path}\n+++ b{path}\n@@ -1 +1,2 @@\n a.b = 1\n+c.d = 1\n")


def test_plan_all_two_lines_in_one_file():
    text = "a\n"
    facts = Facts({"files": {"/etc/f": {"exists": True, "type": "file", "mode": "0644",
                                        "owner": "root", "group": "root", "content": text,
                                        "sha256": "x"}}})
    res = [lines.line("/etc/f", "b"), lines.line("/etc/f", "b"), lines.line("/etc/f", "c")]
    planned = plan_all(res, facts)
    kinds = [type(r[0]).__name__ for _, r in planned]
    assert kinds == ["Change", "Noop", "Change"]
    assert planned[2][1][0].diff.endswith(" a\n b\n+c\n")


def test_plan_all_refuses_conflicting_files():
    facts = Facts({"files": {"/etc/f": {"exists": False}}})
    with pytest.raises(PlanError, match="conflicts"):
        plan_all([files.file("/etc/f", "a"), files.file("/etc/f", "b")], facts)


# --- templating -------------------------------------------------------------------------------

class Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_render_secret_through_attribute_access(tmp_path):
    (tmp_path / "t.j2").write_text("pw={{ cfg.password }}\nplain={{ cfg.user }}\n")
    r = templating.render("t.j2", {"cfg": Obj(password=S("attr-secret"), user="u")},
                          root=tmp_path)
    assert r.text == "pw=attr-secret\nplain=u\n"
    assert r.display == "pw=***\nplain=u\n"
    assert "attr-secret" not in repr(r)


def test_render_filters_on_secrets_write_the_real_value_and_hide_the_diff(tmp_path):
    (tmp_path / "t.j2").write_text("url=postgres://u:{{ cfg.password | urlencode }}@h/db\n")
    r = templating.render("t.j2", {"cfg": Obj(password=S("p@ss word"))}, root=tmp_path)
    assert r.text == "url=postgres://u:p%40ss%20word@h/db\n"
    assert r.display is None and "transforms a secret" in r.hidden


def test_render_multiline_secret_hides_the_diff_and_there_is_no_reveal_filter(tmp_path):
    (tmp_path / "r.j2").write_text("{{ pw | reveal }}\n")     # one policy: nothing to opt into
    with pytest.raises(Exception, match="reveal"):
        templating.render("r.j2", {"pw": S("x1")}, root=tmp_path)
    (tmp_path / "k.j2").write_text("{{ key }}")
    r = templating.render("k.j2", {"key": S("-----BEGIN KEY-----\nabc\n-----END KEY-----\n")},
                          root=tmp_path)
    assert r.display is None and "multi-line" in r.hidden


def test_render_strict_undefined_and_trailing_newline(tmp_path):
    (tmp_path / "t.j2").write_text("{% if on %}\nx={{ x }}\n{% endif %}\n")
    # trim_blocks: block tags leave no lines behind
    assert templating.render("t.j2", {"on": True, "x": 1}, root=tmp_path).text == "x=1\n"
    (tmp_path / "n.j2").write_text("a={{ x }}\n")
    assert templating.render("n.j2", {"x": 1}, root=tmp_path).text == "a=1\n"   # kept
    with pytest.raises(Exception, match="'x' is undefined"):
        templating.render("t.j2", {"on": True}, root=tmp_path)


def test_both_environments_compile_every_template_to_the_same_code():
    """What lets the masked rendering reuse the real one's code (templating._compiled_once)."""
    real, masked = templating.environment(None, False), templating.environment(None, True)
    paths = sorted(templating.TEMPLATES.rglob("*.j2"))
    assert paths
    for path in paths:
        name = path.relative_to(templating.TEMPLATES).as_posix()
        source = path.read_text()
        assert real.compile(source, name, raw=True) == masked.compile(source, name, raw=True), name


def test_rendered_outside_render_never_leaks():
    assert templating._sentinel_for(S("v")) == "***"


def test_template_repr_and_steps_never_show_secrets_but_b64_carries_them():
    from provisioner.ops import templates
    t = templates.template("/srv/app/.env", "test/app.env.j2",
                           {"app": "a", "node_env": "p", "port": 1,
                            "db": {"user": "u", "password": S("repr-secret")},
                            "session_secret": S("other-secret")})
    assert "repr-secret" not in repr(t)
    ch = t.plan(Facts({"files": {"/srv/app/.env": {"exists": False}}}))[0]
    assert "repr-secret" not in json.dumps([ch.why, ch.diff, ch.resource])
    assert b"repr-secret" in base64.b64decode(ch.steps[0]["b64"])


# --- handlers, unit files ---------------------------------------------------------------------

def test_systemd_handler_steps():
    assert systemd.handler("reload", "nginx", validate=["nginx", "-t"]) == [
        {"run": ["nginx", "-t"], "stdin": None, "env": {}, "ok": [0]},
        {"run": ["systemctl", "reload", "--", "nginx.service"], "stdin": None, "env": {},
         "ok": [0]}]
    with pytest.raises(ValueError):
        systemd.handler("explode", "nginx")


def test_unit_file_reloads_systemd_after_writing():
    u = systemd.unit_file("shop", "[Service]\nExecStart=/bin/true\n", notify="restart shop")
    ch = u.plan(Facts({"files": {"/etc/systemd/system/shop.service": {"exists": False}}}))[0]
    assert ch.steps[0]["after"] == [["systemctl", "daemon-reload"]]
    assert ch.notify == ("restart shop",)


def test_change_and_noop_types():
    out = files.directory("/srv/x").plan(Facts({"files": {"/srv/x": {"exists": False}}}))
    assert isinstance(out[0], Change)
    out = files.absent("/srv/x").plan(Facts({"files": {"/srv/x": {"exists": False}}}))
    assert isinstance(out[0], Noop) and out[0].why == "already absent"


def test_conflicts_in_any_order_and_identical_duplicates_allowed():
    from provisioner.ops import check_conflicts, links
    check_conflicts([files.file("/etc/a", "x"), files.file("/etc/a", "x"),
                     lines.line("/etc/b", "1"), lines.line("/etc/b", "2")])
    for pair in ([lines.line("/etc/a", "1"), files.file("/etc/a", "x")],
                 [files.absent("/etc/a"), files.file("/etc/a", "x")],
                 [files.directory("/srv/a"), files.directory("/srv/a", mode="0700")],
                 [links.link("/srv/cur", "r1"), links.link("/srv/cur", "r2")],
                 [sysctl.sysctl("vm.swappiness", 1), files.file(sysctl.DEFAULT_FILE, "")]):
        with pytest.raises(PlanError, match="conflicts with"):
            check_conflicts(pair)

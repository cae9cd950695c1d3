"""The remote agent, run for real on this machine: `python3 -c <bootstrap>` with the payload on
stdin, exactly as the runner runs it over SSH, confined to a tmp_path. Then the ops end to end:
plan from real facts -> apply -> gather again -> plan again gives only Noops."""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import pwd
import grp
import stat
import subprocess
import time
import sys
from pathlib import Path

import pytest

from provisioner import agent
from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import files, lines, links, plan_all, request, commands, templates, users
from provisioner.ops import PlanError
from provisioner.remote import agent as remote
from provisioner.secret import Secret

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
NOBODY = "nobody"
NOGROUP = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name


def call(op: str, req: dict, python: str = "python3") -> dict:
    p = subprocess.run(agent.command(python), input=agent.payload(op, req), capture_output=True,
                       timeout=120)
    return agent.parse(p.stdout, p.stderr, p.returncode)


def facts_of(req: dict) -> dict:
    return call("facts", req)["facts"]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def change(id_, *steps, notify=()):
    return {"id": id_, "steps": list(steps), "notify": list(notify)}


def run(*argv, **kw):
    return {"run": list(argv), **kw}


# --- the bootstrap and the protocol ------------------------------------------------------------

def test_command_is_fixed_and_short_and_carries_nothing_secret():
    argv = agent.command()
    assert argv == ["python3", "-I", "-S", "-c", agent.BOOTSTRAP, agent.CACHE_DIR]
    assert len(agent.BOOTSTRAP) < 1500
    for code in (True, False):
        payload = agent.payload("facts", {"checks": [["echo", "hunter2-secret"]]}, code=code)
        assert b"hunter2-secret" in payload and "hunter2-secret" not in " ".join(argv)


def test_agent_source_is_stdlib_only_and_python39_syntax():
    src = agent.source()
    tree = ast.parse(src, feature_version=(3, 9))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert "provisioner" not in mods
    # _sha2: Python 3.12's name for the built-in sha256 (agent.sha256 falls back from it)
    stdlib = set(sys.stdlib_module_names) | {"__future__", "_sha2"}
    assert mods <= stdlib, mods - stdlib


def test_ping_and_stats():
    doc = call("ping", {})
    assert doc["pong"] is True and doc["agent"]["version"] == agent.PROTOCOL


def test_parse_explains_missing_python():
    with pytest.raises(agent.AgentError, match="install python3 on the server"):
        agent.parse(b"", b"bash: line 1: python3: command not found\n", 127)
    with pytest.raises(agent.AgentError, match="not the provisioner agent's JSON"):
        agent.parse(b"Welcome to the server!\n", b"", 0)
    with pytest.raises(agent.AgentError, match="truncated or not JSON"):
        agent.parse(agent.MARKER + b'{"agent": {"ver', b"", 0)


def test_output_before_the_marker_is_ignored():
    doc = call("ping", {})
    raw = b"motd line\n" + agent.MARKER + json.dumps(doc).encode()
    assert agent.parse(raw)["pong"] is True


def test_agent_crash_is_reported_with_traceback():
    # a request the agent cannot handle: changes is not a list of dicts
    with pytest.raises(agent.AgentError, match="agent crashed"):
        call("apply", {"changes": [42]})


# --- facts -------------------------------------------------------------------------------------

@root_only
def test_facts_files_links_dirs(tmp_path):
    (tmp_path / "text").write_text("hello\n")
    os.chown(tmp_path / "text", pwd.getpwnam(NOBODY).pw_uid, grp.getgrnam(NOGROUP).gr_gid)
    os.chmod(tmp_path / "text", 0o640)
    (tmp_path / "bin").write_bytes(b"\x00\x01\xff")
    (tmp_path / "big").write_text("x" * (256 * 1024 + 1))
    (tmp_path / "link").symlink_to("text")
    (tmp_path / "dir").mkdir(mode=0o750)
    os.chmod(tmp_path / "dir", 0o750)
    paths = [str(tmp_path / n) for n in ("text", "bin", "big", "link", "dir", "missing")]
    paths.append(str(tmp_path / "text" / "below-a-file"))
    f = facts_of({"files": paths})["files"]
    text = f[paths[0]]
    assert text == {"exists": True, "type": "file", "mode": "0640", "owner": NOBODY,
                    "group": NOGROUP, "size": 6,
                    "sha256": hashlib.sha256(b"hello\n").hexdigest(), "content": "hello\n"}
    assert f[paths[1]]["content"] is None and f[paths[1]]["sha256"] == \
        hashlib.sha256(b"\x00\x01\xff").hexdigest()
    assert f[paths[2]]["content"] is None and f[paths[2]]["size"] == 256 * 1024 + 1
    assert f[paths[3]]["type"] == "link" and f[paths[3]]["target"] == "text"
    assert f[paths[4]]["type"] == "dir" and f[paths[4]]["mode"] == "0750"
    assert f[paths[5]] == {"exists": False}
    assert f[paths[6]] == {"exists": False}


def test_facts_os_users_groups_packages_checks_sysctl():
    doc = call("facts", {"users": ["root", "no-such-user-x"], "groups": ["root", "no-such-group-x"],
                         "packages": ["dpkg", "no-such-package-x"],
                         "checks": [["true"], ["false"], ["no-such-command-x"]],
                         "sysctl": ["kernel.ostype", "no.such.key"]})
    f = doc["facts"]
    assert f["os"]["id"] == "debian" and f["os"]["hostname"]
    assert isinstance(f["os"]["systemd"], bool) and f["os"]["virt"]
    root = f["users"]["root"]
    assert root["uid"] == 0 and root["home"] == "/root" and root["group"] == "root"
    assert set(root) >= {"shell", "groups", "ssh_dir", "authorized_keys"}
    assert f["users"]["no-such-user-x"] is None
    assert f["groups"]["root"]["gid"] == 0 and f["groups"]["no-such-group-x"] is None
    assert f["packages"]["installed"]["dpkg"]                      # a version string
    assert f["packages"]["installed"]["no-such-package-x"] is None
    assert f["packages"]["lists_age"] is None or f["packages"]["lists_age"] >= 0
    assert f["checks"] == {"true": 0, "false": 1, "no-such-command-x": 127}
    assert f["sysctl"]["kernel.ostype"]["value"] == "Linux"
    assert f["sysctl"]["no.such.key"] == {"value": None, "persisted": []}
    assert doc["agent"]["commands"] >= 4
    facts = Facts(f)
    assert facts.package("no-such-package-x") is None
    assert facts.check(["false"]) == 1


def test_checks_may_read_stdin():
    f = facts_of({"checks": [{"argv": ["grep", "-qx", "hunter2"], "stdin": "hunter2\n"},
                             {"argv": ["grep", "-qx", "other"], "stdin": "hunter2\n"},
                             ["grep", "-q", "x"]]})
    # a check without stdin reads /dev/null, never the agent's own input
    assert f["checks"] == {"grep -qx hunter2": 0, "grep -qx other": 1, "grep -q x": 1}


def test_facts_services_are_explicit_when_systemd_is_absent():
    f = facts_of({"services": ["ssh", "nginx.service"]})
    assert set(f["services"]) == {"ssh", "nginx.service"}
    for v in f["services"].values():
        assert v is None or "error" in v or set(v) == {"unit", "load", "active", "sub", "enabled"}


def test_unknown_fact_kind_is_reported_not_fatal():
    f = facts_of({"nonsense": ["x"], "groups": ["root"]})
    assert f["errors"] == {"nonsense": "unknown fact kind"}
    assert f["groups"]["root"]["gid"] == 0


# --- apply: write ------------------------------------------------------------------------------

CHECK_ATTRS = ("import os,sys; st=os.stat(sys.argv[1]); "
               "sys.exit(0 if (st.st_mode & 0o7777, st.st_uid) == (0o640, int(sys.argv[2])) else 3)")


@root_only
def test_write_sets_mode_and_owner_before_rename(tmp_path):
    target = tmp_path / "app.conf"
    target.write_text("old\n")
    uid = pwd.getpwnam(NOBODY).pw_uid
    validate = ["python3", "-c", CHECK_ATTRS, "{path}", str(uid)]   # runs on the temp file
    res = call("apply", {"changes": [change("c1", {
        "write": str(target), "b64": b64("new\n"), "mode": "0640", "owner": NOBODY,
        "group": NOGROUP, "validate": validate, "after": [["touch", str(tmp_path / "after-ran")]]})]})
    assert res["ok"], res
    assert target.read_text() == "new\n"
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == uid
    assert (tmp_path / "after-ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after-ran", "app.conf"]  # no temp left


def test_failed_validation_keeps_the_old_file(tmp_path):
    target = tmp_path / "sshd_config"
    target.write_text("Port 22\n")
    before = target.stat()
    res = call("apply", {"changes": [change("c1", {
        "write": str(target), "b64": b64("garbage\n"), "mode": "0600", "owner": None,
        "group": None, "validate": "sh -c 'echo bad config in $0 >&2; exit 1' {path}",
        "after": [["touch", str(tmp_path / "after-ran")]]})]})
    r = res["results"][0]
    assert not res["ok"] and r["status"] == "failed" and r["rc"] == 1
    assert "validation failed" in r["error"] and "bad config in" in r["error"]
    assert target.read_text() == "Port 22\n"
    assert target.stat().st_ino == before.st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["sshd_config"]     # temp removed, no after


def test_write_false_validator_and_missing_directory(tmp_path):
    target = tmp_path / "x"
    target.write_text("keep")
    res = call("apply", {"changes": [
        change("v", {"write": str(target), "b64": b64("new"), "validate": "false {path}"})]})
    assert res["results"][0]["status"] == "failed" and target.read_text() == "keep"
    res = call("apply", {"changes": [
        change("d", {"write": str(tmp_path / "nodir" / "x"), "b64": b64("new")})]})
    assert "does not exist" in res["results"][0]["error"]


def test_validate_must_name_the_file_and_sees_its_extension(tmp_path):
    target = tmp_path / "app.timer"
    target.write_text("keep")
    # a command that does not read the new file would pass anything: refused, not guessed
    res = call("apply", {"changes": [change("v", {"write": str(target), "b64": b64("new"),
                                                  "validate": ["true", "-c", "/etc/x.conf"]})]})
    assert "does not name the file" in res["results"][0]["error"] and target.read_text() == "keep"
    ext = "import sys; sys.exit(0 if sys.argv[1].endswith('.timer') else 3)"
    res = call("apply", {"changes": [change("v", {"write": str(target), "b64": b64("new"),
                                                  "validate": ["python3", "-c", ext, "{path}"]})]})
    assert res["ok"], res
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["app.timer"]


def test_write_keeps_unmanaged_attributes_and_replaces_a_symlink(tmp_path):
    target = tmp_path / "keep"
    target.write_text("a")
    os.chmod(target, 0o600)
    (tmp_path / "real").write_text("real")
    (tmp_path / "link").symlink_to("real")
    res = call("apply", {"changes": [
        change("k", {"write": str(target), "b64": b64("b"), "mode": None}),
        change("l", {"write": str(tmp_path / "link"), "b64": b64("file now"), "mode": "0644"})]})
    assert res["ok"], res
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == "b"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "real").read_text() == "real"


# --- apply: other steps ------------------------------------------------------------------------

def test_run_step_stdin_env_ok_codes(tmp_path):
    out = tmp_path / "out"
    res = call("apply", {"changes": [
        change("a", run("sh", "-c", 'cat > "$0"; echo "$FOO $DEBIAN_FRONTEND $LC_ALL" >> "$0"',
                        str(out), stdin="from stdin\n", env={"FOO": "bar"})),
        change("b", run("sh", "-c", "exit 3", ok=[0, 3])),
    ]})
    assert res["ok"], res
    assert out.read_text() == "from stdin\nbar noninteractive C.UTF-8\n"
    assert res["results"][1]["rc"] == 3


def test_run_step_timeout_kills_what_the_command_started(tmp_path):
    pidfile = tmp_path / "child"
    res = call("apply", {"changes": [change("a", run(
        "sh", "-c", 'sleep 60 & echo $! > "$0"; wait', str(pidfile), timeout=1))]})
    result = res["results"][0]
    assert result["status"] == "failed" and result["rc"] == 124
    assert "timed out after 1s" in result["output"]
    child = int(pidfile.read_text())
    state = Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] \
        if Path(f"/proc/{child}").exists() else "gone"
    assert state in ("gone", "Z"), f"the command's child {child} outlived the timeout"


def test_run_step_attempts_until_one_succeeds(tmp_path):
    marker = tmp_path / "tried"
    script = 'if [ -e "$0" ]; then echo second; else touch "$0"; echo first; exit 1; fi'
    res = call("apply", {"changes": [change("a", run("sh", "-c", script, str(marker), attempts=2, delay=0))]})
    assert res["ok"], res
    out = res["results"][0]["output"]
    assert out.index("\nfirst\n") < out.index("exit 1: trying again (1 more)") < out.index("\nsecond\n")
    res = call("apply", {"changes": [change("b", run("sh", "-c", "echo no; exit 5", attempts=2, delay=0))]})
    assert res["results"][0]["rc"] == 5 and res["results"][0]["output"].count("no\n") == 2


def test_run_step_gets_no_stdin_by_default():
    res = call("apply", {"changes": [change("a", run("sh", "-c", "cat; echo done"))]})
    assert res["ok"] and res["results"][0]["output"].endswith("done\n")


def test_stop_at_first_failed_change(tmp_path):
    res = call("apply", {"changes": [
        change("one", run("touch", str(tmp_path / "one"))),
        change("two", run("touch", str(tmp_path / "two-a")), run("sh", "-c", "echo boom; exit 7"),
               run("touch", str(tmp_path / "two-c"))),
        change("three", run("touch", str(tmp_path / "three"))),
    ]})
    assert not res["ok"]
    assert [(r["id"], r["status"]) for r in res["results"]] == \
        [("one", "ok"), ("two", "failed"), ("three", "not_run")]
    two = res["results"][1]
    assert two["rc"] == 7 and two["step"] == 1 and "boom" in two["output"]
    assert "step 2 (run): exit 7" in two["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two-a"]


def test_missing_command_is_a_failed_step():
    res = call("apply", {"changes": [change("x", run("no-such-command-x"))]})
    assert res["results"][0]["rc"] == 127 and "command not found" in res["results"][0]["output"]


@root_only
def test_dir_attrs_line_fetch_steps(tmp_path):
    d = tmp_path / "a" / "b"
    f = tmp_path / "file"
    f.write_text("x")
    src = tmp_path / "key.asc"
    src.write_text("KEY")
    good = hashlib.sha256(b"KEY").hexdigest()
    res = call("apply", {"changes": [
        change("dir", {"dir": str(d), "mode": "0750", "owner": NOBODY, "group": None}),
        change("attrs", {"attrs": str(f), "mode": "0600", "owner": NOBODY, "group": NOGROUP}),
        change("line", {"line": str(tmp_path / "conf"), "text": "a = 1", "regexp": "^a\\s*=",
                        "state": "present", "mode": "0644"}),
        change("line2", {"line": str(tmp_path / "conf"), "text": "a = 2", "regexp": "^a\\s*=",
                         "state": "present"}),
        change("fetch", {"fetch": src.as_uri(), "path": str(tmp_path / "k.asc"), "sha256": good,
                         "mode": "0644"}),
        change("fetch-bad", {"fetch": src.as_uri(), "path": str(tmp_path / "k2.asc"),
                             "sha256": "0" * 64}),
    ]})
    st = d.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_uid == pwd.getpwnam(NOBODY).pw_uid
    assert st.st_gid == pwd.getpwnam(NOBODY).pw_gid          # group None: owner's primary group
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert (tmp_path / "conf").read_text() == "a = 2\n"
    assert (tmp_path / "k.asc").read_text() == "KEY"
    assert res["results"][-1]["status"] == "failed" and "sha256" in res["results"][-1]["error"]
    assert not (tmp_path / "k2.asc").exists()
    assert [r["status"] for r in res["results"][:-1]] == ["ok"] * 5


def test_attrs_refuses_symlinks(tmp_path):
    (tmp_path / "t").write_text("x")
    (tmp_path / "l").symlink_to("t")
    res = call("apply", {"changes": [change("a", {"attrs": str(tmp_path / "l"), "mode": "0600"})]})
    assert "symlink" in res["results"][0]["error"]


# --- apply: handlers ---------------------------------------------------------------------------

def test_handler_runs_once_when_notified_twice_in_definition_order(tmp_path):
    log = tmp_path / "log"
    res = call("apply", {
        "changes": [change("a", run("true"), notify=["restart b", "reload a"]),
                    change("b", run("true"), notify=["reload a"])],
        "handlers": {"reload a": [run("sh", "-c", f"echo a >> {log}")],
                     "restart b": [run("sh", "-c", f"echo b >> {log}")],
                     "never": [run("sh", "-c", f"echo never >> {log}")]}})
    assert res["ok"]
    assert log.read_text() == "a\nb\n"
    assert [(h["name"], h["status"]) for h in res["handlers"]] == [("reload a", "ok"),
                                                                    ("restart b", "ok")]


def test_no_handler_when_nothing_notified(tmp_path):
    log = tmp_path / "log"
    res = call("apply", {"changes": [change("a", run("true"))],
                         "handlers": {"h": [run("touch", str(log))]}})
    assert res["ok"] and res["handlers"] == [] and not log.exists()


def _unit_write(tmp_path, name, counter, **extra):
    return change(name, {"write": str(tmp_path / name), "b64": b64(name), "mode": "0644",
                         "owner": None, "group": None,
                         "after": [["sh", "-c", f"echo after {name} >> {counter}"]], **extra})


def test_consecutive_writes_with_the_same_after_run_it_once_after_the_last(tmp_path):
    counter = tmp_path / "reloads"
    same = [["sh", "-c", f"echo reload >> {counter}"]]
    writes = [change(n, {"write": str(tmp_path / n), "b64": b64(n), "after": same})
              for n in ("a.service", "a.timer", "b.service", "b.timer")]
    # a.service, a.timer: one reload; the command between them ends the run of writes
    res = call("apply", {"changes": [writes[0], writes[1], change("start a", run("true")),
                                     writes[2], writes[3]]})
    assert res["ok"], res
    assert counter.read_text() == "reload\nreload\n"
    assert all((tmp_path / n).read_text() == n for n in ("a.service", "a.timer", "b.timer"))
    # different after-commands are never merged
    counter.unlink()
    res = call("apply", {"changes": [_unit_write(tmp_path, "x", counter), _unit_write(tmp_path, "y", counter)]})
    assert res["ok"] and counter.read_text() == "after x\nafter y\n"


def test_a_failed_write_still_runs_the_after_the_writes_before_it_left(tmp_path):
    counter = tmp_path / "reloads"
    same = [["sh", "-c", f"echo reload >> {counter}"]]
    res = call("apply", {"changes": [
        change("ok", {"write": str(tmp_path / "ok.service"), "b64": b64("ok"), "after": same}),
        change("bad", {"write": str(tmp_path / "bad.service"), "b64": b64("bad"), "after": same,
                       "validate": "false {path}"}),
        change("later", {"write": str(tmp_path / "later.service"), "b64": b64("l"), "after": same})]})
    assert [r["status"] for r in res["results"]] == ["ok", "failed", "not_run"]
    assert (tmp_path / "ok.service").read_text() == "ok" and not (tmp_path / "bad.service").exists()
    assert counter.read_text() == "reload\n"          # systemd knows ok.service's new content
    assert "echo reload" in res["results"][1]["output"]


def test_handlers_after_a_failure(tmp_path):
    """The handler of the change that succeeded runs (its file is in place; the next run will
    not notify again); the handler of the failed change does not; the rest are not run."""
    req = {"changes": [change("ok", run("true"), notify=["h-ok"]),
                       change("bad", run("false"), notify=["h-bad"]),
                       change("later", run("true"), notify=["h-later"])],
           "handlers": {name: [run("touch", str(tmp_path / name))]
                        for name in ("h-ok", "h-bad", "h-later")}}
    res = call("apply", req)
    assert not res["ok"]
    assert [h["name"] for h in res["handlers"]] == ["h-ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h-ok"]
    (tmp_path / "h-ok").unlink()
    res = call("apply", {**req, "handlers_on_failure": False})
    assert [(h["name"], h["status"]) for h in res["handlers"]] == [("h-ok", "not_run")]
    assert list(tmp_path.iterdir()) == []


def test_stay_up_checks_run_together_after_every_handler_acted(tmp_path):
    """Each handler's stay-up check (systemd.stays_up) waits for its unit; the agent runs them
    after the last handler's action, together: both checks here see both actions done."""
    def handler(name, check_ok=True):
        check = (f"test -e {tmp_path}/a-acted && test -e {tmp_path}/b-acted && "
                 f"touch {tmp_path}/{name}-checked" + ("" if check_ok else "; echo died >&2; exit 1"))
        return [run("touch", str(tmp_path / f"{name}-acted")),
                {**run("sh", "-c", check), "settle": 1}]
    res = call("apply", {"changes": [change("c", run("true"), notify=["a", "b"])],
                         "handlers": {"a": handler("a"), "b": handler("b", check_ok=False)}})
    assert not res["ok"]
    a, b = res["handlers"]
    assert (a["name"], a["status"]) == ("a", "ok") and (b["name"], b["status"]) == ("b", "failed")
    assert b["error"].startswith("step 2 (run): exit 1: sh -c") and "died" in b["output"]
    assert (tmp_path / "a-checked").exists() and (tmp_path / "b-checked").exists()


def test_a_bare_reload_gives_way_to_a_later_restart_of_the_same_unit():
    reload = [{"run": ["systemctl", "reload", "--", "prometheus.service"]},
              {"run": ["sh", "-c", "...", "stay-up"], "settle": 3}]
    restart = [{"run": ["systemctl", "restart", "--", "prometheus.service"]},
               {"run": ["sh", "-c", "...", "stay-up"], "settle": 3}]
    assert remote._restarted_by(reload, [("restart prometheus", restart)]) == "restart prometheus"
    # another unit's restart, a restart that validates first, a reload that validates first
    other = [{"run": ["systemctl", "restart", "--", "alertmanager.service"]}]
    checked = [{"run": ["promtool", "check", "config"]}, *restart]
    assert remote._restarted_by(reload, [("x", other), ("y", checked)]) is None
    assert remote._restarted_by([{"run": ["nginx", "-t"]}, *reload], [("r", restart)]) is None
    assert remote._restarted_by(restart, [("r", restart)]) is None


def test_the_reload_is_not_run_when_the_restart_follows(tmp_path):
    (tmp_path / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\n")
    (tmp_path / "systemctl").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    res = call("apply", {"changes": [change("c", run("true"), notify=["reload x", "restart x"])],
                         "handlers": {
                             "reload x": [run("systemctl", "reload", "--", "x.service", env=env)],
                             "restart x": [run("systemctl", "restart", "--", "x.service", env=env)]}})
    assert res["ok"], res
    assert [(h["name"], h["status"]) for h in res["handlers"]] == [("reload x", "superseded"),
                                                                   ("restart x", "ok")]
    assert (tmp_path / "calls").read_text() == "restart -- x.service\n"


def _fake_systemctl(tmp_path, monkeypatch, active="active", enabled="disabled"):
    """A systemctl on PATH that logs its calls and, for `show`, reports the unit `active` with
    the start time the file `began` holds (time.monotonic() in microseconds); `is-enabled`
    prints `enabled`."""
    (tmp_path / "systemctl").write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = show ]; then echo ActiveState={active}; "
        f"echo InactiveExitTimestampMonotonic=$(cat {tmp_path}/began); exit 0; fi\n"
        f"echo \"$@\" >> {tmp_path}/calls\n"
        f"if [ \"$1\" = is-enabled ]; then echo {enabled}; fi\n")
    (tmp_path / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def _began_in(tmp_path, seconds):
    """A step writing, as the unit's start, time.monotonic() plus `seconds` (microseconds)."""
    return run(sys.executable, "-c", "import time; open(%r, 'w').write(str(int((time.monotonic() "
               "+ %r) * 1e6)))" % (str(tmp_path / "began"), seconds))


def test_a_restart_is_not_run_when_the_unit_started_after_the_change(tmp_path, monkeypatch):
    _fake_systemctl(tmp_path, monkeypatch)
    res = call("apply", {"changes": [change("config", _began_in(tmp_path, 0.2), notify=["restart x"])],
                         "handlers": {"restart x": [run("systemctl", "restart", "--", "x.service"),
                                                    run("sh", "-c", f"touch {tmp_path}/watched",
                                                        settle=3)]}})
    assert res["ok"], res
    (h,) = res["handlers"]
    assert h["status"] == "superseded" and h["output"].startswith("not run: x.service started")
    assert not (tmp_path / "calls").exists()
    assert (tmp_path / "watched").exists()          # the stay-up check still watches the unit


@pytest.mark.parametrize("active, began", [("active", -0.2), ("inactive", 0.2), ("activating", 0.2)])
def test_the_restart_runs_unless_the_unit_is_up_since_after_the_change(tmp_path, monkeypatch,
                                                                         active, began):
    _fake_systemctl(tmp_path, monkeypatch, active)
    res = call("apply", {"changes": [change("config", _began_in(tmp_path, began),
                                            notify=["restart x"])],
                         "handlers": {"restart x": [run("systemctl", "restart", "--", "x.service")]}})
    assert res["ok"] and res["handlers"][0]["status"] == "ok", res
    assert (tmp_path / "calls").read_text() == "restart -- x.service\n"


def _began(tmp_path, ago):
    (tmp_path / "began").write_text(str(int((time.monotonic() - ago) * 1e6)))


@pytest.mark.parametrize("up, watched", [(5, False), (1, True)])
def test_a_unit_up_since_the_change_for_as_long_as_its_check_is_not_watched_again(
        tmp_path, monkeypatch, up, watched):
    """The change was made by an earlier exec ("notified": the package batch carried the write
    ahead of its package, whose install started the unit): a unit up 5 s has stayed up for its
    3 s check; one up 1 s is still watched."""
    _fake_systemctl(tmp_path, monkeypatch)
    _began(tmp_path, up)
    res = call("apply", {"changes": [], "notified": {"restart x": time.monotonic() - 10},
                         "handlers": {"restart x": [run("systemctl", "restart", "--", "x.service"),
                                                    run("sh", "-c", f"touch {tmp_path}/watched",
                                                        settle=3)]}})
    assert res["ok"], res
    (h,) = res["handlers"]
    assert h["status"] == "superseded" and h["output"].startswith(f"not run: x.service started {10 - up}.")
    assert ("so it stayed up" in h["output"]) is not watched
    assert (tmp_path / "watched").exists() is watched
    assert not (tmp_path / "calls").exists()


def test_a_handler_notified_by_an_earlier_exec_runs_when_its_unit_started_before(tmp_path,
                                                                                 monkeypatch):
    _fake_systemctl(tmp_path, monkeypatch)
    _began(tmp_path, 20)
    res = call("apply", {"changes": [], "notified": {"restart x": time.monotonic() - 10},
                         "handlers": {"restart x": [run("systemctl", "restart", "--", "x.service")],
                                      "restart y": [run("systemctl", "restart", "--", "y.service")]}})
    assert res["ok"] and [(h["name"], h["status"]) for h in res["handlers"]] == [("restart x", "ok")]
    assert (tmp_path / "calls").read_text() == "restart -- x.service\n"


def test_a_change_says_when_it_was_done():
    before = time.monotonic()
    res = call("apply", {"changes": [change("a", run("true")), change("b", run("false"))]})
    a, b = res["results"]
    assert before < a["done_at"] < time.monotonic() and "done_at" not in b


def test_a_restart_that_a_reload_gave_way_to_counts_the_reloads_changes(tmp_path, monkeypatch):
    """The unit started after the restart's change but before the reload's: the restart runs."""
    _fake_systemctl(tmp_path, monkeypatch)
    res = call("apply", {"changes": [change("a", _began_in(tmp_path, 0.1), notify=["restart x"]),
                                     change("b", run("sleep", "0.5"), notify=["reload x"])],
                         "handlers": {"reload x": [run("systemctl", "reload", "--", "x.service")],
                                      "restart x": [run("systemctl", "restart", "--", "x.service")]}})
    assert res["ok"], res
    assert [(h["name"], h["status"]) for h in res["handlers"]] == [("reload x", "superseded"),
                                                                   ("restart x", "ok")]
    assert (tmp_path / "calls").read_text() == "restart -- x.service\n"


def test_failing_handler_does_not_stop_the_others(tmp_path):
    res = call("apply", {"changes": [change("a", run("true"), notify=["bad", "good"])],
                         "handlers": {"bad": [run("false")],
                                      "good": [run("touch", str(tmp_path / "good"))]}})
    assert not res["ok"]
    assert [(h["name"], h["status"]) for h in res["handlers"]] == [("bad", "failed"),
                                                                    ("good", "ok")]
    assert (tmp_path / "good").exists()


def test_apply_request_from_changes():
    ch = Change("file /x", "write", "absent", ({"run": ["true"]},), notify=("h",))
    req = agent.apply_request([Noop("a", "ok"), ch], {"h": [{"run": ["true"]}]})
    assert req["changes"] == [{"id": "1", "resource": "file /x", "steps": [{"run": ["true"]}],
                               "notify": ["h"]}]
    with pytest.raises(ValueError, match="unknown handler"):
        agent.apply_request([ch], {})


# --- end to end: plan -> apply -> facts -> plan is all Noop ------------------------------------

def converge(resources, handlers=None):
    """One role run as the runner does it: one facts exec, plan, one apply exec."""
    facts = Facts(facts_of(request(resources)))
    planned = plan_all(resources, facts)
    changes = [c for _, result in planned for c in result if isinstance(c, Change)]
    if changes:
        res = call("apply", agent.apply_request(changes, handlers or {}))
        assert res["ok"], json.dumps(res, indent=1)
    else:
        res = None
    return planned, changes, res


@root_only
def test_end_to_end_idempotence(tmp_path):
    base = str(tmp_path)
    resources = [
        files.directory(f"{base}/srv", mode="0750", owner=NOBODY, group=NOGROUP),
        files.directory(f"{base}/srv/releases/r1", mode="0755"),
        files.file(f"{base}/srv/releases/r1/app.js", "console.log('hi')\n", mode="0644"),
        links.link(f"{base}/srv/current", to=f"{base}/srv/releases/r1", notify="reload"),
        templates.template(f"{base}/srv/.env", "test/app.env.j2",
                           {"app": "shop", "node_env": "production", "port": 3000,
                            "db": {"user": "shop", "password": Secret("pw-e2e", register=False)},
                            "session_secret": Secret("sess-e2e", register=False)},
                           mode="0600", owner=NOBODY, group=NOGROUP, notify="reload"),
        # a file a package installs in the same role (the command below), then edited: the
        # lines are planned against the predicted file and applied to the real one
        commands.command(["sh", "-c", 'printf "Port 22\\nPasswordAuthentication yes\\n" > "$0"',
                          f"{base}/sshd_config"], creates=f"{base}/sshd_config"),
        lines.line(f"{base}/sshd_config", "PasswordAuthentication no",
                   regexp=r"^PasswordAuthentication\s", validate="grep -q Port {path}"),
        lines.line(f"{base}/sshd_config", "PermitRootLogin no", insert_after="^Port"),
        files.file(f"{base}/old-file", "x"),
        commands.command(["touch", f"{base}/marker"], creates=f"{base}/marker"),
    ]
    handlers = {"reload": [{"run": ["sh", "-c", f"echo reloaded >> {base}/handler.log"],
                            "stdin": None, "env": {}, "ok": [0]}]}
    planned, changes, res = converge(resources, handlers)
    assert len(changes) == len(resources)
    assert [h["name"] for h in res["handlers"]] == ["reload"]
    assert Path(f"{base}/sshd_config").read_text() == \
        "Port 22\nPermitRootLogin no\nPasswordAuthentication no\n"
    assert os.readlink(f"{base}/srv/current") == f"{base}/srv/releases/r1"
    env = Path(f"{base}/srv/.env").read_text()
    assert "pw-e2e" in env and "sess-e2e" in env
    for c in changes:
        assert "pw-e2e" not in (c.diff or "") and "sess-e2e" not in c.why
    # the facts said "absent" for sshd_config; the line was planned against the predicted
    # (unknown-content) file and edited the real one the command had just written
    line_change = [c for c in changes if c.resource.startswith("line") and "Password" in c.resource][0]
    assert line_change.why.startswith("file to be created by an earlier change")

    planned, changes, res = converge(resources, handlers)
    assert changes == [], [(c.resource, c.why) for c in changes]
    assert all(isinstance(n, Noop) for _, r in planned for n in r)
    assert Path(f"{base}/handler.log").read_text() == "reloaded\n"     # not notified again

    # drift is detected and repaired, then converged again
    os.chmod(f"{base}/srv/.env", 0o644)
    Path(f"{base}/srv/releases/r1/app.js").write_text("tampered\n")
    os.unlink(f"{base}/srv/current")
    os.symlink("/elsewhere", f"{base}/srv/current")
    # ... and the role now removes old-file instead of writing it
    resources = [r for r in resources if r.id != f"file {base}/old-file"]
    resources.append(files.absent(f"{base}/old-file"))
    planned, changes, res = converge(resources, handlers)
    assert sorted((c.resource.split()[0], c.why) for c in changes) == [
        ("absent", "exists: a file"),
        ("file", "content differs"),
        ("link", f"points to /elsewhere != {base}/srv/releases/r1"),
        ("template", "mode 0644 != 0600")]
    assert not Path(f"{base}/old-file").exists()
    _, changes, _ = converge(resources, handlers)
    assert changes == []


@root_only
def test_end_to_end_user_with_keys(tmp_path):
    """A real user is created, given keys, and converges (cleaned up afterwards)."""
    name = "provtest" + str(os.getpid() % 10000)
    home = str(tmp_path / "home")
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKey test@test"
    try:
        res = [users.group(name + "g"),
               users.user(name, [name + "g"], home=home, shell="/bin/sh",
                          authorized_keys=[key])]
        _, changes, _ = converge(res)
        assert [c.action for c in changes] == ["create", "create", "authorized_keys"]
        assert Path(home, ".ssh", "authorized_keys").read_text() == key + "\n"
        st = Path(home, ".ssh").stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == pwd.getpwnam(name).pw_uid
        _, changes, _ = converge(res)
        assert changes == []
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name + "g"], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def test_a_role_that_fights_itself_is_refused(tmp_path):
    res = [files.file(f"{tmp_path}/conf", "a\n"), lines.line(f"{tmp_path}/conf", "b")]
    with pytest.raises(PlanError, match="conflicts with file"):
        plan_all(res, Facts(facts_of(request(res))))
    same = [files.file(f"{tmp_path}/conf", "a\n"), files.file(f"{tmp_path}/conf", "a\n")]
    plan_all(same, Facts(facts_of(request(same))))


def test_plan_error_for_a_directory_where_a_file_is_wanted(tmp_path):
    (tmp_path / "d").mkdir()
    res = [files.file(str(tmp_path / "d"), "x")]
    with pytest.raises(PlanError):
        plan_all(res, Facts(facts_of(request(res))))


def test_edit_lines_semantics():
    e = remote.edit_lines
    assert e(None, "a") == "a\n"
    assert e("x\n", "a") == "x\na\n"
    assert e("x", "a") == "x\na\n"
    assert e("a\n", "a") == "a\n"
    assert e("k=1\nk=2\n", "k=3", regexp="^k=") == "k=1\nk=3\n"       # the last match
    assert e("k=1\n", "k=1", regexp="^k=") == "k=1\n"
    assert e("a\nb\n", "c", insert_after="^a") == "a\nc\nb\n"
    assert e("a\nb\na\n", "a", state="absent") == "b\n"
    assert e("#x\n#y\nz\n", "", regexp="^#", state="absent") == "z\n"
    assert e(None, "a", state="absent") is None
    assert e("a\n", "a", state="absent") == ""


def test_bootstrap_quotes_cleanly_for_a_remote_shell():
    import shlex
    argv = agent.command()
    assert "'" not in argv[2]                       # shlex.quote wraps it in single quotes
    assert shlex.split(shlex.join(argv)) == argv


# --- systemd's daemon-reloads: as few as keep it right (agent.Reloads) -------------------------

def _unit(tmp_path, name, notify=()):
    return change(f"unit {name}", {"write": str(tmp_path / name), "b64": b64(name), "mode": "0644",
                                   "owner": None, "group": None,
                                   "after": [["systemctl", "daemon-reload"]]}, notify=notify)


def _timer(name):
    return change(f"service {name}", run("systemctl", "enable", "--", name),
                  run("systemctl", "start", "--", name))


def test_a_role_writing_and_enabling_two_timers_costs_systemd_two_reloads_not_six(tmp_path,
                                                                                  monkeypatch):
    """Four unit files, a plain file, then two timers enabled and started: one reload before
    the first start (it must see the new files), one at the end for the second enablement."""
    _fake_systemctl(tmp_path, monkeypatch)
    plain = change("file env", {"write": str(tmp_path / "env"), "b64": b64("x"), "mode": "0600",
                                "owner": None, "group": None})
    res = call("apply", {"changes": [_unit(tmp_path, "a.service"), _unit(tmp_path, "a.timer"),
                                     plain, _unit(tmp_path, "b.service"),
                                     _unit(tmp_path, "b.timer"), _timer("a.timer"),
                                     _timer("b.timer")]})
    assert res["ok"], res
    assert (tmp_path / "calls").read_text().splitlines() == [
        "is-enabled -- a.timer", "enable --no-reload -- a.timer", "daemon-reload",
        "start -- a.timer",
        "is-enabled -- b.timer", "enable --no-reload -- b.timer", "start -- b.timer",
        "daemon-reload"]
    assert all((tmp_path / n).read_text() == n for n in ("a.service", "b.timer"))


def test_a_unit_its_package_enabled_already_is_not_enabled_again(tmp_path, monkeypatch):
    """Planned from the facts before the package was installed ("unit not found yet"): the
    install enabled it, so nothing is run and systemd is not reloaded."""
    _fake_systemctl(tmp_path, monkeypatch, enabled="enabled")
    res = call("apply", {"changes": [_timer("fail2ban.service")]})
    assert res["ok"], res
    assert (tmp_path / "calls").read_text().splitlines() == [
        "is-enabled -- fail2ban.service", "start -- fail2ban.service"]
    assert "fail2ban.service is enabled already" in res["results"][0]["output"]


def test_a_unit_file_is_reloaded_before_its_handler_and_after_a_failed_change(tmp_path,
                                                                              monkeypatch):
    _fake_systemctl(tmp_path, monkeypatch)
    res = call("apply", {"changes": [_unit(tmp_path, "x.service", notify=["restart x"]),
                                     change("bad", run("false")), _timer("x.service")],
                         "handlers": {"restart x": [run("systemctl", "restart", "--", "x.service")]}})
    assert [r["status"] for r in res["results"]] == ["ok", "failed", "not_run"]
    # before `false`: it may act on a unit; then the handler runs on what systemd re-read
    assert (tmp_path / "calls").read_text().splitlines() == ["daemon-reload",
                                                            "restart -- x.service"]


def test_a_failed_reload_at_the_end_is_reported(tmp_path, monkeypatch):
    (tmp_path / "systemctl").write_text("#!/bin/sh\n[ \"$1\" = daemon-reload ] && exit 1\nexit 0\n")
    (tmp_path / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    res = call("apply", {"changes": [_unit(tmp_path, "x.service")]})
    assert not res["ok"]
    assert res["results"][0]["status"] == "ok"
    (h,) = res["handlers"]
    assert h["name"] == "systemctl daemon-reload" and h["status"] == "failed"
    assert "exit 1" in h["error"]

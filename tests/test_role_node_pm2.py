"""Roles `node` and `pm2`: Node.js, the app user, pm2 under systemd and an app it runs.

Live (on `web2` in CI; PROVISIONER_TEST_SERVER=benchNN while developing): from a fresh
server, provision [node, pm2] with the sample app (examples/sample-app, copied to /srv/sample
the way a deploy would put a release there) and a vault secret in its env; a second run changes
nothing; then what a user checks: node >= 18 and npm, pm2's list as the app user, processes
owned by it, /health over the test network, a log past its max size rotated by logrotate while
pm2 writes on (and a pm2-logrotate module from an earlier run removed), the secret nowhere in
the output and the ecosystem file 0600; the app comes back after the server reboots; a stopped app and a
changed env are repaired; an app that crashes at start-up fails the run.

Pure: var validation, the ecosystem file's rendering (secret masked in the display), the plans
of the role's own resources from facts, and the NodeSource repository path, which is tested by
planning and rendering only: our test servers cannot reach NodeSource (TESTBED-NOTES).
"""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

import engine_helpers
from engine_helpers import ADDRESSES, REPO, TEST_ROLES, Run, copy_sample_app, provision_twice, sh
from fake_pm2 import DAEMON_STARTED, jlist_output, pm2_host, proc
from provisioner.facts import Facts, check_key
from provisioner.change import Change, Noop
from provisioner.inventory import load_inventory_file
from provisioner.remote.pm2 import pm2_jlist
from provisioner.roles import available_roles, load_role
from provisioner.secret import Secret

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

SERVER = engine_helpers.test_server("web2")
SECRET = "tok-Zx81-never-print-me"
PORT = 3000

ROLES = available_roles()
NODE = load_role(ROLES["node"])
PM2 = load_role(ROLES["pm2"])


def _module(name, file="__init__"):
    """The role's Python module (its resource classes), loaded the way the runner loads it; or
    another file of the role's folder."""
    import importlib.util
    info = ROLES[name]
    spec = importlib.util.spec_from_file_location(f"test_roles_{name}_{file}", info.path / f"{file}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod           # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


pm2mod = _module("pm2")
CTX = SimpleNamespace(os={"id": "debian", "version_id": "12"}, check=False)


def defaults(**over):
    v = {**ROLES["node"].defaults, **ROLES["pm2"].defaults}
    v.update(over)
    return v


SAMPLE_APP = {"name": "sample", "script": "server.js", "cwd": "/srv/sample", "instances": 2,
              "exec_mode": "cluster", "max_memory_restart": "200M"}


# --- pure: node ------------------------------------------------------------------------------

def test_node_defaults_install_debians_nodejs_and_npm_and_a_system_user():
    rs = list(NODE.resources(defaults(node_apps=["shop"]), CTX))
    ids = [r.id for r in rs]
    assert ids == ["apt nodejs npm", "user app", "directory /home/app", "directory /srv/shop"]
    user = rs[1]
    assert user.system and user.shell == "/usr/sbin/nologin" and user.home == "/home/app"
    assert rs[3].owner == "app" and rs[3].mode == "0750"


def test_nodesource_major_plans_the_signed_repository_and_the_pin():
    """NodeSource is unreachable from the testbed: this path is proven by planning only."""
    v = defaults(node_nodesource_major=22, node_nodesource_uri="https://ns.example.test/node_{major}.x",
                 node_nodesource_key_url="https://ns.example.test/gpgkey/nodesource-repo.gpg.key")
    rs = list(NODE.resources(v, CTX))
    repo, pref, pkgs, switch = rs[:4]
    assert repo.id == "apt repository nodesource"
    assert repo.sources() == ("# managed by provisioner\nTypes: deb\nURIs: https://ns.example.test/node_22.x\n"
                              "Suites: nodistro\nComponents: main\n"
                              "Signed-By: /etc/apt/keyrings/nodesource.asc\n")
    assert pref.path == "/etc/apt/preferences.d/nodesource.pref" and pref.mode == "0644"
    text = pref.content.text
    assert re.search(r'^Package: nodejs\nPin: origin "ns\.example\.test"\nPin-Priority: 1001$', text, re.M)
    assert re.search(r'^Package: \*\nPin: origin "ns\.example\.test"\nPin-Priority: 100$', text, re.M)
    assert pkgs.id == "apt nodejs"                      # NodeSource's nodejs bundles npm
    assert "apt nodejs npm" not in [r.id for r in rs]
    assert switch.argv[-1] == "nodejs" and "'^22\\.'" in switch.unless[-1]
    # planned on a fresh server: key fetched on the server, source written, lists refreshed
    facts = Facts({"files": {p: {"exists": False} for p in repo.facts()["files"]}})
    change, = repo.plan(facts)
    kinds = [next(k for k in ("fetch", "write", "dir", "run") if k in s) for s in change.steps]
    assert kinds[:3] == ["dir", "fetch", "write"] and change.steps[-2]["run"][-2:] == ["update", "--error-on=any"]
    assert change.steps[1]["fetch"] == "https://ns.example.test/gpgkey/nodesource-repo.gpg.key"


def test_nodesource_with_an_inline_key_and_the_switch_guard_on_the_server():
    key = base64.b64encode(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxx\n-----END PGP PUBLIC KEY BLOCK-----\n").decode()
    v = defaults(node_nodesource_major=20, node_nodesource_uri="https://mirror.example.test/node_20.x",
                 node_nodesource_key_b64=key)
    repo = next(NODE.resources(v, CTX))
    assert repo.keyring == "/etc/apt/keyrings/nodesource.asc" and repo.key_b64 == key


@pytest.mark.parametrize("over, message", [
    ({"node_nodesource_major": 16}, "node_nodesource_major: 16 is not a Node.js major >= 18"),
    ({"node_nodesource_major": 22}, "node_nodesource_uri: needed"),
    ({"node_nodesource_major": 22, "node_nodesource_uri": "ftp://x/node_22.x",
      "node_nodesource_key_url": "https://x/k"}, "is not an http(s) URL"),
    ({"node_nodesource_major": 22, "node_nodesource_uri": "https://x/node_22.x"},
     "give exactly one"),
    ({"node_apps": ["../etc"]}, "node_apps: '../etc' is not an app name"),
    ({"node_app_user": "App User"}, "node_app_user: 'App User' is not a user name"),
    ({"node_app_home": "home/app"}, "node_app_home: 'home/app' must be an absolute"),
])
def test_node_refuses_bad_vars_naming_the_var(over, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        list(NODE.resources(defaults(**over), CTX))


def test_node_refuses_debian_11_without_nodesource():
    ctx = SimpleNamespace(os={"id": "debian", "version_id": "11"}, check=False)
    with pytest.raises(ValueError, match="Debian 11 ships Node.js older than 18"):
        list(NODE.resources(defaults(), ctx))


# --- pure: pm2 -------------------------------------------------------------------------------

def test_pm2_plans_install_unit_logrotate_and_the_app():
    rs = list(PM2.resources(defaults(pm2_apps=[SAMPLE_APP]), CTX))
    assert [r.id for r in rs] == [
        "npm -g pm2", "directory /home/app/.pm2",
        "apt logrotate", "template /etc/logrotate.d/pm2-app",
        "directory /etc/systemd/system/logrotate.timer.d",
        "template /etc/systemd/system/logrotate.timer.d/50-provisioner-hourly.conf",
        "template /etc/systemd/system/pm2-app.service",
        "service pm2-app.service", "directory /usr/local/lib/provisioner",
        "file /usr/local/lib/provisioner/pm2-app-status", "pm2 module pm2-logrotate",
        "directory /srv/sample", "template /srv/sample/ecosystem.config.js", "pm2 app sample"]
    unit = rs[6].content.text
    for line in ("User=app", "Type=forking", "PIDFile=/home/app/.pm2/pm2.pid",
                 "ExecStart=/usr/local/bin/pm2 resurrect", "ExecStop=/usr/local/bin/pm2 kill",
                 "Environment=PM2_HOME=/home/app/.pm2", "WantedBy=multi-user.target",
                 # workers accept themselves: no connection is passed to an exiting one
                 "Environment=NODE_CLUSTER_SCHED_POLICY=none"):
        assert line in unit.splitlines()
    assert rs[0].notify == ("restart pm2-app.service",) and rs[6].notify == ("restart pm2-app.service",)
    assert PM2.handlers(defaults(), None)["restart pm2-app.service"] == [
        {"run": ["systemctl", "restart", "--", "pm2-app.service"], "stdin": None, "env": {}, "ok": [0]}]


def test_the_ecosystem_file_is_valid_js_holds_the_secret_and_shows_it_masked(tmp_path):
    app = dict(SAMPLE_APP, env={"PORT": PORT, "DEBUG": False, "TOKEN": Secret('q"uo\\te ' + SECRET)})
    eco = [r for r in PM2.resources(defaults(pm2_apps=[app]), CTX) if r.id.endswith("ecosystem.config.js")][0]
    assert eco.mode == "0600" and eco.owner == "app" and eco.group == "app"
    assert SECRET in eco.content.text
    assert SECRET not in eco.content.display and '"TOKEN": ***,' in eco.content.display
    # what pm2 reads: the object literal (JSON plus bare keys and trailing commas)
    js = eco.content.text
    body = js[js.index("module.exports = ") + len("module.exports = "):].rstrip().rstrip(";")
    obj = re.sub(r"^(\s*)([a-z_]+):", r'\1"\2":', body, flags=re.M)
    obj = re.sub(r",(\s*[}\]])", r"\1", obj)
    app_conf = json.loads(obj)["apps"][0]
    assert app_conf == {"name": "sample", "script": "server.js", "cwd": "/srv/sample", "instances": 2,
                        "exec_mode": "cluster", "max_memory_restart": "200M", "merge_logs": True,
                        "autorestart": True,
                        "env": {"PORT": "3000", "DEBUG": "false", "TOKEN": 'q"uo\\te ' + SECRET}}


@pytest.mark.parametrize("app, message", [
    ({"script": "a.js"}, "pm2_apps[0]: name None"),
    ({"name": "x"}, "pm2_apps x: script: the file to run is required"),
    ({"name": "x", "script": "a.js", "instances": "lots"}, "pm2_apps x: instances 'lots'"),
    ({"name": "x", "script": "a.js", "exec_mode": "fork", "instances": 2}, "with exec_mode fork"),
    ({"name": "x", "script": "a.js", "max_memory_restart": "lots"}, "max_memory_restart 'lots'"),
    ({"name": "x", "script": "a.js", "env": {"1BAD": "v"}}, "env '1BAD' is not a variable name"),
    ({"name": "x", "script": "a.js", "env": {"A": [1]}}, "env A: list is not an environment value"),
    ({"name": "x", "script": "a.js", "cwd": "srv/x"}, "cwd 'srv/x' must be an absolute"),
    ({"name": "x", "script": "../a.js", "cwd": "/srv/x"}, "write a plain path"),
    ({"name": "x", "script": "a.js", "watch": True}, "unknown key(s) watch"),
    ({"name": "x", "script": Secret("a.js")}, "script must not be a secret"),
])
def test_pm2_refuses_bad_apps_naming_the_var(app, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        list(PM2.resources(defaults(pm2_apps=[app]), CTX))


@pytest.mark.parametrize("over, message", [
    ({"pm2_version": "latest"}, "pm2_version: 'latest' is not an exact version"),
    ({"pm2_logrotate_max_size": "big"}, "pm2_logrotate_max_size"),
    ({"pm2_logrotate_period": "0 0 * * *"}, "pm2_logrotate_period: '0 0 * * *': write one of hourly, daily"),
    ({"pm2_logrotate_retain": 0}, "pm2_logrotate_retain: keep at least 1"),
    ({"pm2_apps": [SAMPLE_APP, SAMPLE_APP]}, "two apps have the same name"),
])
def test_pm2_refuses_bad_vars(over, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        list(PM2.resources(defaults(**over), CTX))


def test_pm2_needs_the_node_role():
    v = {k: val for k, val in defaults().items() if not k.startswith("node_")}
    with pytest.raises(ValueError, match="list `node` before `pm2`"):
        list(PM2.resources(v, CTX))


def _file(content=None, exists=True, **kw):
    if not exists:
        return {"exists": False}
    return {"exists": True, "type": "file", "mode": "0644", "owner": "root", "group": "root",
            "sha256": None, "content": content, **kw}


def test_pm2_is_checked_from_its_package_json():
    npm = pm2mod.NpmGlobal("pm2", "6.0.14")
    path = "/usr/local/lib/node_modules/pm2/package.json"
    assert npm.facts() == {"files": [path]}
    ok, = npm.plan(Facts({"files": {path: _file('{"name": "pm2", "version": "6.0.14"}')}}))
    assert isinstance(ok, Noop) and ok.why == "already installed: pm2 6.0.14"
    upgrade, = npm.plan(Facts({"files": {path: _file('{"name": "pm2", "version": "5.3.0"}')}}))
    assert isinstance(upgrade, Change) and upgrade.why == "pm2 5.3.0 != 6.0.14"
    assert upgrade.steps[0]["run"][-1] == "pm2@6.0.14" and "--prefix=/usr/local" in upgrade.steps[0]["run"]
    fresh, = npm.plan(Facts({"files": {path: _file(exists=False)}}))
    assert fresh.why == "pm2 absent"


def test_pm2_logs_are_rotated_by_logrotate_as_the_app_user_checked_hourly():
    rs = {r.id: r for r in PM2.resources(defaults(pm2_logrotate_max_size="5K", pm2_logrotate_retain=3,
                                                  pm2_logrotate_period="weekly"), CTX)}
    conf = rs["template /etc/logrotate.d/pm2-app"]
    lines = [ln.strip() for ln in conf.content.text.splitlines() if not ln.startswith("#")]
    assert lines == ["/home/app/.pm2/logs/*.log /home/app/.pm2/pm2.log {", "su app app", "weekly",
                     "maxsize 5K", "rotate 3", "compress", "copytruncate", "missingok",
                     "notifempty", "}"]
    assert conf.mode == "0644" and conf.owner == "root" and conf.validate == ("logrotate", "-d", "{path}")
    dropin = rs["template /etc/systemd/system/logrotate.timer.d/50-provisioner-hourly.conf"]
    assert {"OnCalendar=hourly", "RandomizedDelaySec=5min"} <= set(dropin.content.text.splitlines())
    # written before pm2's unit, both with a daemon-reload the agent makes once for the two
    assert dropin.notify == ("restart logrotate.timer",)
    unit = rs["template /etc/systemd/system/pm2-app.service"]
    assert dropin.after == unit.after == (("systemctl", "daemon-reload"),)
    assert [s["run"] for s in PM2.handlers(defaults(), None)["restart logrotate.timer"]] == [
        ["systemctl", "restart", "--", "logrotate.timer"]]
    plain = [r for r in PM2.resources(defaults(pm2_logrotate_compress=False), CTX)
             if r.id == "template /etc/logrotate.d/pm2-app"][0]
    assert "compress" not in plain.content.text.split()


def test_without_pm2_logrotate_the_config_and_the_hourly_run_go_and_a_module_stays():
    ids = [r.id for r in PM2.resources(defaults(pm2_logrotate=False), CTX)]
    assert "absent /etc/logrotate.d/pm2-app" in ids
    assert "absent /etc/systemd/system/logrotate.timer.d/50-provisioner-hourly.conf" in ids
    # a pm2-logrotate the user installed is theirs when the role rotates nothing
    assert "pm2 module pm2-logrotate" not in ids and "apt logrotate" not in ids
    # a removed drop-in is no write: the handler makes systemd read the timer again itself
    timer = PM2.handlers(defaults(pm2_logrotate=False), None)["restart logrotate.timer"]
    assert [s["run"] for s in timer] == [
        ["systemctl", "daemon-reload"], ["systemctl", "restart", "--", "logrotate.timer"]]


def test_a_pm2_logrotate_module_left_by_an_earlier_run_is_uninstalled():
    mod = pm2mod.Pm2ModuleAbsent("pm2-logrotate", "app", "/home/app", "logrotate rotates pm2's logs now")
    manifest, = mod.facts()["files"]
    assert manifest == "/home/app/.pm2/modules/pm2-logrotate/node_modules/pm2-logrotate/package.json"
    gone, = mod.plan(Facts({"files": {manifest: _file(exists=False)}}))
    assert isinstance(gone, Noop) and gone.why == "already absent"
    change, = mod.plan(Facts({"files": {manifest: _file('{"version": "3.0.0"}')}}))
    assert change.why == "installed; logrotate rotates pm2's logs now"
    assert change.steps[0]["run"][:6] == ["runuser", "-u", "app", "--", "env", "-i"]
    assert change.steps[0]["run"][-2:] == ["uninstall", "pm2-logrotate"]
    assert mod.expect(Facts({})) == {"files": {manifest: {"exists": False}}}


def test_an_app_is_started_when_its_ecosystem_changed_or_it_is_not_online():
    app = pm2mod.Pm2App("sample", "app", "/home/app", "/srv/sample/ecosystem.config.js", "a" * 64,
                        "/srv/sample/server.js", "2")
    stamp, script = app.facts()["files"]
    key = check_key(app.status_argv())

    def plan(stamp_text, rc, script_exists=True):
        return app.plan(Facts({"files": {stamp: _file(stamp_text, exists=stamp_text is not None),
                                         script: _file("", exists=script_exists)},
                               "checks": {key: rc}}))

    assert isinstance(plan("a" * 64 + "\n", 0)[0], Noop)
    assert plan("b" * 64 + "\n", 0)[0].why == "ecosystem changed since the last start"
    assert plan("a" * 64 + "\n", 5)[0].why == "not every instance is online"
    assert plan(None, 3)[0].why == "never started by the provisioner; the pm2 daemon (service) is not running"
    skipped, = plan(None, 4, script_exists=False)
    assert isinstance(skipped, Noop) and "does not exist yet" in skipped.why
    steps = [s.get("run") or s.get("write") for s in plan(None, 4)[0].steps]
    assert [s[-3:] if isinstance(s, list) else s for s in steps] == [
        ["/usr/local/bin/pm2", "delete", "sample"],
        ["/usr/local/bin/pm2", "start", "/srv/sample/ecosystem.config.js"],
        ["2", "30", "2"],                                       # status: 2 instances, wait, min uptime
        ["LANG=C.UTF-8", "/usr/local/bin/pm2", "save"],        # saved once it is up
        stamp]
    assert steps[0][steps[0].index("env"):][:2] == ["env", "-i"]   # pm2 passes its env on to apps


OUT_OF_DATE = ("\n>>>> In-memory PM2 is out-of-date, do:\n>>>> $ pm2 update\n"
               "In memory PM2 version: 6.0.13\nLocal PM2 version: 6.0.14\n\n")
BANNER = "\n                        -------------\n\n                          Runtime Edition\n\n"


@pytest.mark.parametrize("before, after", [
    (DAEMON_STARTED, ""), (BANNER + DAEMON_STARTED, ""),
    (DAEMON_STARTED, OUT_OF_DATE),             # its version check answers on its own time
], ids=["daemon-started", "first-call", "out-of-date-after"])
def test_pm2_jlist_is_the_last_line_that_is_a_json_list(before, after):
    """Not the output from its first "[": pm2's own lines around the list (lib/Client.js,
    lib/binaries/CLI.js) made that no JSON."""
    procs = [proc("sample", 0), proc("pm2-logrotate", 1, module=True)]
    assert pm2_jlist(jlist_output(procs, before) + after) == procs


def status_check(tmp_path, procs: list[dict], instances: int) -> tuple[int, str]:
    """Role pm2's status check of app `sample` with `instances` wanted, run here on a host
    whose `pm2 jlist` lists `procs` (after the lines of a daemon start): (exit, output)."""
    script = tmp_path / "pm2-app-status"
    script.write_text(pm2mod.STATUS_CODE)
    path = pm2_host(tmp_path, jlist_output(procs))
    r = subprocess.run([sys.executable, str(script), "pm2-app.service", "app", "/home/app",
                        "/usr/local/bin/pm2", "sample", str(instances)], capture_output=True,
                       text=True, timeout=60, env={"PATH": f"{path}:/usr/bin:/bin"})
    return r.returncode, r.stdout


def test_the_status_check_finds_the_apps_after_the_lines_pm2_prints_starting_its_daemon(tmp_path):
    """pm2 jlist prints "[PM2] Spawning PM2 daemon ..." ahead of the list when it started its
    daemon: read from the first "[", the list was not JSON, and every app looked down (6)."""
    procs = [proc("sample", 0), proc("sample", 1), proc("pm2-logrotate", 2, module=True)]
    assert status_check(tmp_path, procs, 2) == (0, "sample: 2 instance(s) online\n")


def test_the_status_check_counts_no_pm2_module_as_an_instance_of_an_app_of_its_name(tmp_path):
    """pm2_app_procs, as in the probe and the host metrics: counted as an instance, a module
    named like the app would make it look short of instances (exit 5), and the role would
    restart it at every run."""
    procs = [proc("sample", 0), proc("sample", 1, module=True)]
    assert status_check(tmp_path, procs, 1) == (0, "sample: 1 instance(s) online\n")


# --- live --------------------------------------------------------------------------------------

def th(name):
    import testinfra
    return testinfra.get_host(f"ssh://{name}", ssh_config=str(REPO / ".testbed" / "ssh_config"))


def write_inventory(tmp_path: Path, apps: list[str], name: str = "nodepm2", more_vars: str = "") -> Path:
    """An inventory (YAML: it holds a `!vault` tag) for SERVER with [node, pm2]; more_vars: YAML
    lines of vars, indented by two."""
    path = tmp_path / f"{name}.yml"
    path.write_text(f"""env: {name}
known_hosts: {REPO}/.testbed/known_hosts
ssh: {{user: root, key: {REPO}/.testbed/id_ed25519, connect_timeout: 5}}
hosts:
  {SERVER}: {{address: {ADDRESSES[SERVER]}}}
vars:
  node_apps: [sample, other]
{more_vars}  pm2_apps:
{''.join(f'    - {a}{chr(10)}' for a in apps)}groups:
  app: {{hosts: [{SERVER}], roles: [node, pm2]}}
""")
    return path


def app_yaml(env_extra: str = "", name="sample", script="server.js", instances=2, port=PORT) -> str:
    return (f"{{name: {name}, script: {script}, cwd: /srv/{name}, instances: {instances}, "
            f"exec_mode: cluster, max_memory_restart: 200M, "
            f"env: {{PORT: {port}, NODE_ENV: production, SAMPLE_TOKEN: !vault sample_token{env_extra}}}}}")


def load(path: Path):
    inv = load_inventory_file(path, roles_root=[TEST_ROLES, REPO / "roles"])
    return inv.resolve({"sample_token": Secret(SECRET)})


def health(timeout=5.0):
    with urllib.request.urlopen(f"http://{ADDRESSES[SERVER]}:{PORT}/health", timeout=timeout) as r:
        return r.status, json.loads(r.read())


def wait_health(seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return health(timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


PM2_AS_APP = ("runuser -u app -- env -i HOME=/home/app PM2_HOME=/home/app/.pm2 "
              "PATH=/usr/local/bin:/usr/bin:/bin /usr/local/bin/pm2")


def jlist() -> list[dict]:
    """pm2's process list as the app user sees it (env values are dropped right here: they
    hold the secret, and a failing assert would print them)."""
    procs = pm2_jlist(sh(SERVER, f"{PM2_AS_APP} jlist").stdout)
    return [{"name": p["name"], "pid": p["pid"], "status": p["pm2_env"]["status"],
             "exec_mode": p["pm2_env"].get("exec_mode"), "module": bool(p["pm2_env"].get("pmx_module")),
             "username": p["pm2_env"].get("username")} for p in procs]


def app_procs(name="sample"):
    return [p for p in jlist() if p["name"] == name]


def _holds_secret(command: str) -> bool:
    return SECRET in sh(SERVER, command).stdout


def copy_sample(dest="/srv/sample"):
    copy_sample_app(SERVER, dest)


@pytest.fixture(scope="module")
def provisioned(testbed, tmp_path_factory):
    """SERVER fresh, the sample app copied in (as a deploy would), [node, pm2] run twice."""
    tmp = tmp_path_factory.mktemp("nodepm2")
    runs = provision_twice(load(write_inventory(tmp, [app_yaml()])), reset=[SERVER],
                           prepare=copy_sample, diff=True, verbose=3)
    runs.tmp = tmp
    return runs


@pytest.mark.usefixtures("testbed")
class TestLive:
    def test_fresh_then_a_second_run_changes_nothing(self, provisioned, capsys):
        first, second = provisioned.first, provisioned.second
        assert first.exit_code == 0, first.report("failed")
        assert first.host(SERVER)["failed"] == 0 and first.host(SERVER)["changed"] >= 12
        assert second.exit_code == 0, second.report("failed")
        assert second.host(SERVER)["changed"] == 0, second.steps(status="changed")
        assert second.host(SERVER)["remote_commands"] <= 4
        with capsys.disabled():
            print(f"\n[node+pm2 on {SERVER}] fresh {provisioned.fresh_s:.1f} s "
                  f"({first.host(SERVER)['remote_commands']} remote commands), converged "
                  f"{provisioned.converged_s:.1f} s ({second.host(SERVER)['remote_commands']} "
                  "remote commands), second run 0 changed")

    def test_node_18_or_newer_npm_and_the_app_user(self, provisioned):
        h = th(SERVER)
        major = int(h.check_output("node --version").lstrip("v").split(".")[0])
        assert major >= 18
        assert re.match(r"^\d+\.\d+\.\d+$", h.check_output("npm --version"))
        app = h.user("app")
        assert app.exists and app.uid < 1000 and app.shell == "/usr/sbin/nologin"
        assert app.home == "/home/app" and h.file("/home/app").mode == 0o750
        assert h.check_output("passwd -S app").split()[1] == "L"        # no usable password
        for folder in ("/srv/sample", "/srv/other"):
            f = h.file(folder)
            assert f.is_directory and f.user == "app" and f.group == "app" and f.mode == 0o750

    def test_pm2_runs_the_app_online_as_the_app_user_under_systemd(self, provisioned):
        h = th(SERVER)
        # as the app user: as root, any pm2 command would start a second daemon, root's own
        assert sh(SERVER, f"{PM2_AS_APP} --version").stdout.strip() == "6.0.14"
        unit = h.service("pm2-app")
        assert unit.is_enabled and unit.is_running
        procs = app_procs()
        assert len(procs) == 2 and {p["status"] for p in procs} == {"online"}
        assert {p["exec_mode"] for p in procs} == {"cluster_mode"}
        for p in procs:
            assert h.check_output(f"ps -o user= -p {p['pid']}") == "app"
        daemon = h.check_output("systemctl show -P MainPID pm2-app")
        assert h.check_output(f"ps -o user=,args= -p {daemon}").startswith("app ")
        assert "PM2" in h.check_output(f"ps -o args= -p {daemon}")
        # the apps are in the service's cgroup, so systemd (not an SSH session) owns them
        assert h.check_output(f"cat /proc/{procs[0]['pid']}/cgroup").endswith("/pm2-app.service")

    def test_the_app_answers_health_over_the_network_and_inside(self, provisioned):
        status, body = health()
        # no release (copied, not deployed) and no database in this app's environment
        assert status == 200 and body == {"status": "ok", "version": "1.0.0", "release": None,
                                          "database": "none"}
        inside = th(SERVER).check_output(
            f"python3 -c \"import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:{PORT}/health').read().decode())\"")
        assert json.loads(inside)["status"] == "ok"

    def test_pm2_logs_past_their_max_size_are_rotated_and_pm2_writes_on(self, provisioned):
        assert [p["name"] for p in jlist() if p["module"]] == []       # no pm2-logrotate beside the app
        calendar = sh(SERVER, "systemctl show -P TimersCalendar logrotate.timer").stdout
        assert "OnCalendar=*-*-* *:00:00" in calendar, calendar        # hourly, beside the daily run
        h = th(SERVER)
        log = "/home/app/.pm2/logs/sample-out.log"
        sh(SERVER, f"head -c 11M /dev/zero | runuser -u app -- tee -a {log} >/dev/null")
        sh(SERVER, "systemctl start logrotate.service")                # what the timer runs
        rotated = h.file(f"{log}.1.gz")
        assert rotated.exists and rotated.user == "app" and rotated.group == "app"
        assert h.file(log).size < 64 * 1024                            # truncated, not a sparse 11M
        # pm2 still writes into the same file: a reload's new instances log their start there
        sh(SERVER, f"{PM2_AS_APP} reload sample")
        deadline = time.monotonic() + 30
        while "listening" not in h.file(log).content_string and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "listening" in h.file(log).content_string
        assert wait_health(30)[0] == 200
        # below its max size, and rotated today: the next run leaves it
        sh(SERVER, "systemctl start logrotate.service")
        assert not h.file(f"{log}.2.gz").exists and "listening" in h.file(log).content_string

    def test_a_pm2_logrotate_module_an_earlier_run_installed_is_removed(self, provisioned):
        sh(SERVER, f"{PM2_AS_APP} install pm2-logrotate@3.0.0 >/dev/null")
        assert [p["name"] for p in jlist() if p["module"]] == ["pm2-logrotate"]
        run = Run(provisioned.inv)
        changed = {e["resource"]: e["reason"] for e in run.steps(status="changed")}
        assert changed == {"pm2 module pm2-logrotate": "remove: installed; logrotate rotates pm2's logs now"}, \
            run.steps(status="failed")
        assert [p["name"] for p in jlist() if p["module"]] == []
        assert not th(SERVER).file("/home/app/.pm2/modules/pm2-logrotate").exists
        assert health()[0] == 200
        again = Run(provisioned.inv)
        assert again.exit_code == 0 and again.host(SERVER)["changed"] == 0, again.steps(status="changed")

    def test_the_secret_reaches_the_app_but_no_output_and_the_file_is_0600(self, provisioned):
        for run in (provisioned.first, provisioned.second):
            everything = run.out.getvalue() + run.err.getvalue()
            assert SECRET not in everything
        diff = [e.get("diff") or "" for e in provisioned.first.steps()
                if e["resource"] == "template /srv/sample/ecosystem.config.js"][0]
        assert '"SAMPLE_TOKEN": ***,' in diff                      # shown, masked
        h = th(SERVER)
        eco = h.file("/srv/sample/ecosystem.config.js")
        assert eco.mode == 0o600 and eco.user == "app" and eco.group == "app"
        # the file and the app's environment hold the real value (pm2 hands a cluster worker its
        # env inside one variable, pm2_env); checked here without printing it on a failure
        assert _holds_secret("cat /srv/sample/ecosystem.config.js"), "the ecosystem lacks the secret"
        pid = app_procs()[0]["pid"]
        assert _holds_secret(f"cat /proc/{pid}/environ"), "the app's environment lacks the secret"
        assert not _holds_secret("journalctl --no-pager -o cat"), "the secret is in the journal"
        assert h.file("/home/app/.pm2").mode == 0o700                # pm2's dump holds the env too

    def test_the_app_comes_back_after_a_reboot(self, provisioned):
        from conftest import invoke
        before = {p["pid"] for p in app_procs()}
        invoke("testbed.stop", SERVER)
        with pytest.raises(OSError):
            health(timeout=2)
        invoke("testbed.start", SERVER)
        status, body = wait_health(90)
        assert status == 200 and body["status"] == "ok"
        procs = app_procs()
        assert len(procs) == 2 and {p["status"] for p in procs} == {"online"}
        assert not before & {p["pid"] for p in procs}              # new processes: it rebooted
        h = th(SERVER)
        for p in procs:
            assert h.check_output(f"ps -o user= -p {p['pid']}") == "app"
        again = Run(provisioned.inv)
        assert again.exit_code == 0 and again.host(SERVER)["changed"] == 0, again.steps(status="changed")

    def test_a_stopped_app_and_a_changed_env_are_applied(self, provisioned):
        sh(SERVER, f"{PM2_AS_APP} stop sample")
        run = Run(provisioned.inv)
        changed = {e["resource"]: e["reason"] for e in run.steps(status="changed")}
        assert changed == {"pm2 app sample": "start: not every instance is online"}, run.steps(status="failed")
        assert health()[1]["status"] == "ok"
        # a new env value (the sample app reports APP_VERSION as its version): restarted with it
        inv = load(write_inventory(provisioned.tmp, [app_yaml(", APP_VERSION: 2.0.0-test")], name="nodepm2env"))
        run = Run(inv)
        changed = {e["resource"]: e["reason"] for e in run.steps(status="changed")}
        assert set(changed) == {"template /srv/sample/ecosystem.config.js", "pm2 app sample"}
        assert changed["pm2 app sample"] == "start: ecosystem changed since the last start"
        assert health()[1]["version"] == "2.0.0-test"
        assert Run(inv).host(SERVER)["changed"] == 0

    def test_an_app_that_crashes_at_start_fails_the_run(self, provisioned):
        sh(SERVER, "mkdir -p /srv/crashy && printf 'console.error(\"boom\"); process.exit(3);\\n' "
                   "> /srv/crashy/crash.js")
        apps = [app_yaml(), app_yaml(name="crashy", script="crash.js", instances=1, port=3001)]
        inv = load(write_inventory(provisioned.tmp, apps, name="nodepm2crash"))
        t0 = time.monotonic()
        run = Run(inv)
        assert run.exit_code == 1
        failed, = run.steps(status="failed")
        assert failed["resource"] == "pm2 app crashy"
        assert "crashy: 0 of 1 instance(s) online for 2s" in failed["output"]
        assert time.monotonic() - t0 < 90
        assert health()[1]["status"] == "ok"                     # the other app is untouched
        sh(SERVER, f"{PM2_AS_APP} delete crashy")

    def test_switching_to_npm_from_the_registry_replaces_debians_and_keeps_pm2_and_the_app(self, provisioned):
        """A server provisioned with Debian's npm (pm2 installed with it), then node_npm: registry
        (Debian 12 here; the local env has it on 12 and 13 from the start)."""
        h = th(SERVER)
        assert h.package("npm").is_installed and h.check_output("command -v npm") == "/usr/bin/npm"
        inv = load(write_inventory(provisioned.tmp, [app_yaml()], name="nodepm2npm",
                                   more_vars="  node_npm: registry\n"))
        run = Run(inv)
        assert run.exit_code == 0, run.steps(status="failed")
        changed = {e["resource"]: e["reason"] for e in run.steps(status="changed")}
        assert changed == {"npm from the registry": "install: /usr/local/lib/node_modules/npm/package.json absent",
                           "link /usr/local/bin/npm": "link: absent", "link /usr/local/bin/npx": "link: absent",
                           "apt npm": "remove: installed: npm " + changed["apt npm"].rsplit(" ", 1)[-1]}, changed
        assert not h.package("npm").is_installed
        assert h.check_output("command -v npm; npm --version").split() == ["/usr/local/bin/npm", "10.9.9"]
        # pm2 (installed by Debian's npm) still runs the app, and npm's global packages are the same
        assert sh(SERVER, f"{PM2_AS_APP} --version").stdout.strip() == "6.0.14"
        assert health()[1]["status"] == "ok"
        assert "pm2@6.0.14" in h.check_output("npm ls --global --depth=0")
        again = Run(inv)
        assert again.exit_code == 0 and again.host(SERVER)["changed"] == 0, again.steps(status="changed")


def _blue_green_ctx():
    app = SimpleNamespace(colours={"blue": 3000, "green": 3001})
    return SimpleNamespace(os=CTX.os, check=False, inventory=SimpleNamespace(apps={"sample": app}))


def test_a_blue_green_app_runs_as_two_pm2_apps_one_per_colour_and_port():
    app = {"name": "sample", "script": "server.js", "instances": 2, "env": {"PORT": "9"}}
    rs = list(PM2.resources(defaults(pm2_apps=[app]), _blue_green_ctx()))
    assert [r.id for r in rs][-5:] == [
        "directory /srv/sample", "template /srv/sample/ecosystem-blue.config.js",
        "pm2 app sample-blue", "template /srv/sample/ecosystem-green.config.js",
        "pm2 app sample-green"]
    for colour, port in (("blue", 3000), ("green", 3001)):
        eco = next(r for r in rs if r.id == f"template /srv/sample/ecosystem-{colour}.config.js")
        text = eco.content.text
        assert f'name: "sample-{colour}"' in text and f'cwd: "/srv/sample/{colour}"' in text
        assert f'"PORT": "{port}"' in text
        proc = next(r for r in rs if r.id == f"pm2 app sample-{colour}")
        assert proc.script == f"/srv/sample/{colour}/server.js"    # not there: not started yet


def test_a_blue_green_app_refuses_a_cwd_of_its_own():
    with pytest.raises(ValueError, match="blue-green app runs each colour from /srv/sample/"):
        list(PM2.resources(defaults(pm2_apps=[SAMPLE_APP]), _blue_green_ctx()))

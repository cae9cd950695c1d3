"""The server side of a switch (remote/deploy.py op_switch) on an app folder in tmp_path, pm2 and
the health URL stood in: whatever fails, the link (current, or a colour's) is left naming the
release pm2 runs. Live: tests/test_deploy_live.py."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from fake_pm2 import pm2_api, proc, reloaded
from provisioner.remote import deploy as remote
from provisioner.remote.pm2 import pm2_app_procs

RUN = "a" * 32


def app_in(root: Path, releases=("r1", "r2"), current="r1") -> remote.App:
    """An App whose /srv/<app> is `root`, with the releases, current, and this run's lock."""
    app = remote.App({"app": "shop", "user": "app", "home": str(root / "home")})
    app.root, app.releases, app.current = str(root), str(root / "releases"), str(root / "current")
    app.lock, app.manifest_path = str(root / ".deploy.lock"), str(root / "releases.json")
    app.busy = app.lock + "/busy"
    for r in releases:
        (root / "releases" / r).mkdir(parents=True)
    if current:
        os.symlink(f"releases/{current}", app.current)
    os.mkdir(app.lock)
    (Path(app.lock) / "owner.json").write_text(json.dumps({"run_id": RUN}))
    return app


def switch(app: remote.App, release="r2") -> dict:
    req = {"run_id": RUN, "release": release, "port": 3000, "health_path": "/health",
           "health_timeout": 1}
    return remote.op_switch(app, req, None)


def stand_in(monkeypatch, fail_reload_of=(), healthy=("r1", "r2")):
    """pm2: a reload fails while the link names a release in fail_reload_of; health: healthy
    when the release asked for is in `healthy`. Returns the releases pm2 was asked to run."""
    ran = []

    def reload(app, name, eco):
        release = os.path.basename(os.readlink(app.current))
        ran.append(release)
        if release in fail_reload_of:
            raise remote.Fail(f"pm2 reload exited 1: {release} crashed at start")
        return "reloaded"
    monkeypatch.setattr(remote, "reload", reload)
    monkeypatch.setattr(remote, "health", lambda app, req, release: (
        release in healthy, "200 ok" if release in healthy else "500 sick"))
    return ran


def test_a_switch_that_passes_its_gate_leaves_the_link_on_the_release(tmp_path, monkeypatch):
    app = app_in(tmp_path)
    stand_in(monkeypatch)
    a = switch(app)
    assert a["ok"] and a["previous"] == "r1" and app.live() == "r2"


def test_a_failed_gate_switches_back_and_reloads(tmp_path, monkeypatch):
    app = app_in(tmp_path)
    ran = stand_in(monkeypatch, healthy=("r1",))
    a = switch(app)
    assert not a["ok"] and a["reverted"] == "r1" and a["revert_ok"] and app.live() == "r1"
    assert ran == ["r2", "r1"]


def test_a_failed_pm2_reload_puts_the_link_back_and_reloads_the_old_release(tmp_path,
                                                                          monkeypatch):
    app = app_in(tmp_path)
    ran = stand_in(monkeypatch, fail_reload_of=("r2",))
    with pytest.raises(remote.Fail) as e:
        switch(app)
    assert app.live() == "r1", "current never names a release pm2 failed to run"
    assert ran == ["r2", "r1"]
    assert "pm2 could not run r2: pm2 reload exited 1: r2 crashed at start" in str(e.value)
    assert "is back on r1 (pm2 reloaded)" in str(e.value)


def test_a_failed_first_start_removes_the_link_it_made(tmp_path, monkeypatch):
    app = app_in(tmp_path, current=None)
    stand_in(monkeypatch, fail_reload_of=("r2",))
    with pytest.raises(remote.Fail, match="removed again .it named no release before"):
        switch(app)
    assert not os.path.lexists(app.current)


def test_a_failed_reload_back_after_a_failed_gate_is_said(tmp_path, monkeypatch):
    app = app_in(tmp_path)
    stand_in(monkeypatch, fail_reload_of=("r1",), healthy=())
    a = switch(app)
    assert not a["ok"] and a["reverted"] == "r1" and not a["revert_ok"]
    assert a["revert_seen"].startswith("pm2 reload failed: pm2 reload exited 1")


def test_node_modules_are_hard_linked_from_the_live_release_else_the_newest_twin(tmp_path,
                                                                                 monkeypatch):
    """After a rollback the live release is older than the one that installed the packages a
    new release asks for: that one lends its node_modules, not npm ci. No twin: npm ci."""
    app = app_in(tmp_path, releases=("r1", "r2", "r3"), current="r1")
    app.shared, app.user = str(tmp_path / "shared"), pwd.getpwuid(os.getuid()).pw_name
    ran = []
    monkeypatch.setattr(app, "as_user", lambda argv, **kw: ran.append(argv[:2]))
    for release, lock in (("r1", "old"), ("r2", "new"), ("r3", "old")):
        folder = tmp_path / "releases" / release
        (folder / "package-lock.json").write_text(lock)
        (folder / "node_modules").mkdir()
        (folder / "node_modules" / "from").write_text(release)
    (tmp_path / "releases" / "r4.building").mkdir()          # half made: never a donor
    (tmp_path / "releases" / "r4.building" / "package-lock.json").write_text("new")

    def prepare(lock: str) -> tuple[str, str | None]:
        new = tmp_path / "releases" / f"n-{lock}.building"
        new.mkdir()
        (new / "package-lock.json").write_text(lock)
        how = remote.dependencies(app, str(new))
        made = new / "node_modules" / "from"
        return how, made.read_text() if made.exists() else None
    assert prepare("old") == ("hard-linked from r1", "r1")       # live first, not newer r3
    assert prepare("new") == ("hard-linked from r2", "r2")       # the newest twin
    assert ran == []
    assert prepare("other")[0] == "npm ci" and ran == [["npm", "ci"]]


# --- which processes the reload takes (PM2_RELOAD, on pm2's API) --------------------------------

needs_node = pytest.mark.skipif(not shutil.which("node"), reason="node is not installed here")


def reload_app(tmp_path: Path, monkeypatch, procs: list[dict], name="shop",
               cwd="/srv/shop/current") -> tuple[remote.App, str, Path]:
    """An App whose pm2 lists `procs` (fake_pm2.pm2_api) and whose node is this machine's, with
    the ecosystem file of pm2 app `name` run from `cwd`, as role pm2 writes it. Returns (the
    app, the ecosystem file, pm2's folder)."""
    folder = pm2_api(tmp_path, procs)
    monkeypatch.setattr(remote, "PM2", str(folder / "bin" / "pm2"))
    eco = tmp_path / "ecosystem.config.js"
    eco.write_text("module.exports = {apps: [%s]};\n" % json.dumps(
        {"name": name, "script": "server.js", "cwd": cwd}))
    app = remote.App({"app": "shop", "user": "app", "home": str(tmp_path)})

    def as_user(argv, cwd=None, env=None, timeout=900, user=None, home=None, what=None):
        r = subprocess.run([shutil.which("node"), *argv[1:]], capture_output=True, text=True,
                           timeout=60)
        if r.returncode:
            raise remote.Fail(f"{what} exited {r.returncode}:\n{r.stderr}")
        return r.stdout
    monkeypatch.setattr(app, "as_user", as_user)
    return app, str(eco), folder


@needs_node
def test_the_reload_takes_the_apps_own_processes_and_no_module_or_namesake(tmp_path,
                                                                          monkeypatch):
    procs = [proc("shop", 0), proc("shop", 1), proc("shop", 2, "stopped"),
             # a pm2 module that carries the app's name (its cwd too, to test that rule alone)
             proc("shop", 3, module=True, cwd="/srv/shop/current"),
             # another process of that name, not started from the app's ecosystem file
             proc("shop", 4, cwd="/home/app/tools"),
             proc("pm2-logrotate", 5, module=True), proc("other", 6)]
    app, eco, folder = reload_app(tmp_path, monkeypatch, procs)
    assert app.reload_online("shop", eco) == 2
    assert reloaded(folder) == [0, 1]
    # the rule of the scripts that ask pm2 (pm2_app_procs), and the ecosystem file's cwd
    assert reloaded(folder) == [p["pm_id"] for p in pm2_app_procs(procs, "shop")
                                if p["pm2_env"]["status"] == "online"
                                and p["pm2_env"]["pm_cwd"] == "/srv/shop/current"]


@needs_node
def test_a_colours_reload_takes_that_colours_processes(tmp_path, monkeypatch):
    procs = [proc("shop-blue", 0, cwd="/srv/shop/blue"),
             proc("shop-green", 1, cwd="/srv/shop/green"),
             proc("shop-green", 2, module=True, cwd="/srv/shop/green")]
    app, eco, folder = reload_app(tmp_path, monkeypatch, procs, "shop-green", "/srv/shop/green")
    assert app.reload_online("shop-green", eco) == 1 and reloaded(folder) == [1]


@needs_node
def test_a_module_or_namesake_online_is_no_app_running_the_first_release_starts_it(
        tmp_path, monkeypatch):
    procs = [proc("shop", 0, module=True, cwd="/srv/shop/current"),
             proc("shop", 1, cwd="/home/app/tools")]
    app, eco, folder = reload_app(tmp_path, monkeypatch, procs)
    started = []
    monkeypatch.setattr(app, "start_pm2", lambda: started.append("pm2-app.service"))
    monkeypatch.setattr(app, "pm2", lambda *args: started.append(args))
    assert remote.reload(app, "shop", eco) == "started"
    # the systemd unit's daemon first: no pm2 call starts a daemon of its own
    assert started == ["pm2-app.service", ("start", eco), ("save",)] and reloaded(folder) == []


def test_a_pm2_daemon_that_does_not_start_fails_the_reload_naming_its_unit_and_the_fix(
        tmp_path, monkeypatch):
    app = remote.App({"app": "shop", "user": "app", "home": str(tmp_path)})
    ran = []

    def run(argv, **kw):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 5, b"Unit pm2-app.service not found.\n")
    monkeypatch.setattr(remote.subprocess, "run", run)
    with pytest.raises(remote.Fail) as e:
        app.start_pm2()
    assert ran == [["systemctl", "start", "pm2-app.service"]]
    assert str(e.value).startswith("systemctl start pm2-app.service exited 5: Unit pm2-app.service "
                                   "not found.; provision the host (role pm2 writes the unit)")

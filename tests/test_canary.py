"""`invoke deploy --canary N` without a server: the inventory keys, the flag checked before
any server is touched, the load balancers found from role nginx's sites, the access log read
for the canaries' answers, and the rollout order (canaries first, held, then --serial batches;
a canary in trouble switches every switched host back). Live: tests/test_deploy_live.py."""
from __future__ import annotations

import signal

from pathlib import Path

import pytest

from provisioner import balancers as lbs
from provisioner import deploy as flows
from provisioner.errors import InputError
from provisioner.inventory import Host
from provisioner.remote.deploy import canary_statuses, too_many_5xx
from test_inventory import fail, line_of, load, only, root  # noqa: F401  (fixture)
from test_releases import APPS

LB = APPS.replace("""  db:
    hosts: [db1]""", """  lb:
    hosts: [db1]
    roles: [nginx]
    vars:
      nginx_sites: [{name: shop, server_names: [shop.test], upstream_group: app, upstream_port: 3000}]
  db:
    hosts: [db1]""")


@pytest.fixture
def lb_root(root: Path) -> Path:
    (root / "roles" / "nginx").mkdir()
    (root / "roles" / "nginx" / "defaults.yml").write_text("nginx_sites: []\n")
    return root


@pytest.fixture
def deploy_root(lb_root: Path) -> Path:
    """The test roles, with the app user the node role makes (deploys run pm2 as it)."""
    with (lb_root / "roles" / "node" / "defaults.yml").open("a") as f:
        f.write("node_app_user: app\nnode_app_home: /home/app\n")
    return lb_root


def _line(upstream: str, status: str) -> str:
    """An access log line in role nginx's `timed` format (templates/nginx/nginx.conf.j2)."""
    return ('10.77.0.1 - - [01/Dec/2026:19:30:00 +0000] "GET /?token=s3cret HTTP/1.1" 200 20 "-" '
            f'"load" host=app.test request_time=0.004 upstream={upstream} '
            f'upstream_status={status} upstream_time=0.003')


@pytest.mark.parametrize("upstream, status, want", [
    ("10.77.0.11:3000", "200", ["200"]),
    ("10.77.0.12:3000", "500", []),                                  # not a canary
    ("10.77.0.11:3000, 10.77.0.12:3000", "502, 200", ["502"]),       # hidden by a retry: counted
    ("10.77.0.12:3000, 10.77.0.11:3000", "504, 503", ["503"]),
    ("10.77.0.12:3000 : 10.77.0.11:3000", "200 : 500", ["500"]),     # an internal redirect
    ("-", "-", []),                                                  # static file, no upstream
])
def test_a_log_line_gives_the_statuses_the_canaries_answered(upstream, status, want):
    assert canary_statuses(_line(upstream, status), {"10.77.0.11:3000"}) == want


def test_a_canary_addressed_by_name_is_counted_by_the_address_nginx_logs(monkeypatch):
    """nginx logs the address it resolved a server's name to: the watcher resolves the same
    name on the load balancer, so a canary whose inventory address is a name is counted."""
    import socket

    from provisioner.remote import deploy as remote

    def getaddrinfo(host, port, type=0):
        if host != "web1.example.com":
            raise socket.gaierror("unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.77.0.11", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::11", port, 0, 0))]
    monkeypatch.setattr(remote.socket, "getaddrinfo", getaddrinfo)
    names = remote.log_names(["web1.example.com:3000", "nowhere.invalid:3000"])
    assert names == {"web1.example.com:3000", "10.77.0.11:3000", "[fd00::11]:3000",
                     "nowhere.invalid:3000"}
    assert canary_statuses(_line("10.77.0.11:3000", "502"), names) == ["502"]


def test_a_line_of_another_format_counts_nothing():
    assert canary_statuses('10.0.0.1 - - [x] "GET / HTTP/1.1" 502 0', {"10.77.0.11:3000"}) == []


@pytest.mark.parametrize("errors, answers, final, over", [
    (0, 0, True, False),          # no traffic: nothing seen, nothing over
    (1, 100, True, False),        # 1 % of 100 is the limit, not over it
    (2, 100, True, True),
    (1, 10, True, True),          # at the end, a rate of what was seen
    (1, 10, False, False),        # before the end, a first 5xx is not yet a rate ...
    (2, 10, False, True),         # ... two are over 1 % of MIN_ANSWERS (100)
])
def test_the_threshold_of_5xx(errors, answers, final, over):
    assert too_many_5xx(errors, answers, 1.0, final) is over


def test_an_app_gets_canary_defaults_and_bad_ones_name_the_key(root: Path):
    app = load(root, APPS).app(None)
    assert (app.canary_hold, app.canary_max_5xx) == (60, 1.0)
    text = APPS.replace("group: app", "group: app\n    canary_max_5xx: 150")
    p = only(fail(root, text), "apps.shop.canary_max_5xx")
    assert p.line == line_of(text, "canary_max_5xx:") and "(0-100)" in p.message
    assert "got the integer 150" in p.message and p.fix == "write e.g. `canary_max_5xx: 1`"


def test_the_load_balancers_are_the_nginx_hosts_proxying_to_the_app(lb_root: Path):
    inv = load(lb_root, LB)
    app = inv.app(None)
    assert [(h.name, sites) for h, sites in lbs.balancers(inv, app)] == [("db1", ("shop",))]
    other = load(lb_root, LB.replace("upstream_port: 3000", "upstream_port: 4000"))
    assert lbs.balancers(other, other.app(None)) == []


def test_a_canary_plan_takes_the_hold_from_the_flag_or_the_app(lb_root: Path):
    inv = load(lb_root, LB)
    app, hosts = inv.app(None), inv.hosts_in("app")
    assert flows.canary_plan(inv, app, hosts, 0, None) is None
    plan = flows.canary_plan(inv, app, hosts, 1, None)
    assert (plan.hosts, plan.hold, plan.max_5xx, [h.name for h in plan.balancers]) == \
        (1, 60, 1.0, ["db1"])
    assert flows.canary_plan(inv, app, hosts, 1, 5).hold == 5


def test_a_canary_of_every_host_is_refused_with_a_fix(lb_root: Path):
    inv = load(lb_root, LB)
    with pytest.raises(InputError) as e:
        flows.canary_plan(inv, inv.app(None), inv.hosts_in("app"), 2, None)
    text = str(e.value)
    assert "--canary 2 leaves no host" in text and "web1, web2" in text
    assert "pass --canary 1 or fewer" in text
    with pytest.raises(InputError) as e:
        flows.canary_plan(inv, inv.app(None), inv.hosts_in("app")[:1], 1, None)
    assert "a canary needs two hosts or more" in str(e.value)


def test_a_canary_without_a_load_balancer_is_refused_naming_the_app(root: Path):
    inv = load(root, APPS)
    with pytest.raises(InputError) as e:
        flows.canary_plan(inv, inv.app(None), inv.hosts_in("app"), 1, None)
    (p,) = e.value.problems
    assert p.key == "apps.shop" and str(p.file).endswith("inventories/test.yml")
    assert "upstream_group is app and upstream_port 3000" in p.message
    assert "nginx_sites" in p.fix


class FakeFleet:
    """What rollout() asks of a Fleet: switch (every switch recorded) and watch. Each host
    ran `previous` before (None: nothing, a first deploy); a switch back (to "old") fails on
    the hosts in `stuck`."""
    def __init__(self, n: int, trouble: str | None = None, previous: str | None = "old",
                 stuck=()):
        self.hosts = [Host(f"web{i}", f"10.0.0.{i}", 22, "admin", None, None, None, 10, 900)
                      for i in range(1, n + 1)]
        self.trouble, self.log, self.previous, self.stuck = trouble, [], previous, set(stuck)
        self.stop = flows.Stop()
        self.stop_after: int | None = None      # a Ctrl-C while this many switches ran

    def ctrl_c_during_switch(self, n: int) -> None:
        self.stop_after = n

    def switch(self, hosts, release, revert=True, colour=None):
        self.log.append(("switch", [h.name for h in hosts], release))
        if self.stop_after == sum(1 for e in self.log if e[0] == "switch"):
            self.stop.request(signal.SIGINT)             # arrives while this batch switches
        if release == "old":
            return {h.name: {"ok": h.name not in self.stuck, "previous": "new",
                             "seen": "500 sick"} for h in hosts}
        return {h.name: {"ok": True, "previous": self.previous} for h in hosts}

    def watch(self, hosts, release, canary):
        self.log.append(("watch", [h.name for h in hosts], canary.hold))
        return {"lb1": {"ok": False, "canary": True, "why": self.trouble}} if self.trouble else {}


CANARY = flows.Canary(hosts=1, hold=30, max_5xx=1.0, balancers=())


def test_canaries_switch_first_and_are_held_then_the_rest_in_serial_batches():
    fleet = FakeFleet(5)
    passed, back, failed = flows.rollout(fleet, "new", 2, CANARY)
    assert (passed, back, failed) == (True, [], {})
    assert fleet.log == [("switch", ["web1"], "new"), ("watch", ["web1"], 30),
                         ("switch", ["web2", "web3"], "new"), ("switch", ["web4", "web5"], "new")]


def test_a_canary_in_trouble_switches_it_back_and_nothing_else_moves():
    fleet = FakeFleet(3, trouble="lb1 logged 5 5xx of 40 answers")
    passed, back, failed = flows.rollout(fleet, "new", 1,
                                         flows.Canary(2, 30, 1.0, ()))
    assert not passed and [h.name for h in back] == ["web1", "web2"]
    assert failed["lb1"]["why"] == "lb1 logged 5 5xx of 40 answers"
    assert fleet.log == [("switch", ["web1", "web2"], "new"), ("watch", ["web1", "web2"], 30),
                         ("switch", ["web1", "web2"], "old")]


def test_a_ctrl_c_between_batches_switches_back_every_host_already_switched():
    """The batch being switched finishes; no later batch starts; the fleet goes back to one
    release, as after a failed gate."""
    fleet = FakeFleet(3)
    fleet.ctrl_c_during_switch(2)
    passed, back, failed = flows.rollout(fleet, "new", 1)
    assert not passed and [h.name for h in back] == ["web1", "web2"]
    assert failed["controller"]["why"] == ("the run was interrupted (SIGINT) before web3 "
                                           "switched")
    assert fleet.log == [("switch", ["web1"], "new"), ("switch", ["web2"], "new"),
                         ("switch", ["web1", "web2"], "old")]


def test_a_ctrl_c_during_the_last_batch_lets_the_rollout_finish():
    fleet = FakeFleet(2)
    fleet.ctrl_c_during_switch(2)
    assert flows.rollout(fleet, "new", 1) == (True, [], {})
    assert [e[2] for e in fleet.log] == ["new", "new"]


def test_a_host_that_ran_nothing_before_or_could_not_go_back_is_not_said_switched_back():
    fleet = FakeFleet(3, trouble="canary web1 turned unhealthy", previous=None)
    passed, back, failed = flows.rollout(fleet, "new", 1, CANARY)
    assert not passed and back == [] and fleet.log[-1][0] == "watch", "nothing to go back to"
    assert failed["web1"] == {"ok": False, "left": True, "why": "web1 still runs new: it ran "
                              "no release before, nothing to switch back to"}
    fleet = FakeFleet(3, trouble="lb1 logged 5 5xx", stuck={"web2"})
    passed, back, failed = flows.rollout(fleet, "new", 1, flows.Canary(2, 30, 1.0, ()))
    assert [h.name for h in back] == ["web1"]
    assert failed["web2"]["why"] == "web2 still runs new: its switch back to old failed (500 sick)"


def test_the_load_balancer_watch_follows_the_log_and_stops_early_when_over(tmp_path: Path):
    """op_watch_5xx on a real file: only lines written after it starts count; a rotation (a
    new file at the path) is followed; enough 5xx end the hold early."""
    import threading
    import time

    from provisioner.remote import deploy as remote
    log = tmp_path / "access.log"
    log.write_text(_line("10.77.0.11:3000", "500") + "\n")            # before the hold: not counted

    def traffic():
        time.sleep(0.4)
        with log.open("a") as f:
            f.write("".join(_line("10.77.0.11:3000", "200") + "\n" for _ in range(50)))
        log.rename(tmp_path / "access.log.1")
        log.write_text("".join(_line("10.77.0.11:3000, 10.77.0.12:3000", "502, 200") + "\n"
                               for _ in range(3)))
    t = threading.Thread(target=traffic)
    t.start()
    t0 = time.monotonic()
    a = remote.op_watch_5xx(None, {"log": str(log), "upstreams": ["10.77.0.11:3000"],
                                   "hold": 20, "max_5xx": 1.0}, None)
    t.join()
    assert time.monotonic() - t0 < 10, "over the threshold: the hold ends early"
    assert (a["ok"], a["answers"], a["errors"], a["statuses"]) == \
        (False, 53, 3, {"200": 50, "502": 3})


def test_a_watcher_stops_early_when_another_saw_trouble(tmp_path: Path, monkeypatch):
    """op_stop_watch (sent by the controller once one watcher failed) ends the others' hold."""
    import threading
    import time
    import uuid

    from provisioner.remote import deploy as remote
    monkeypatch.setattr(remote, "stop_path", lambda req: str(tmp_path / f"{req['run_id']}.stop"))
    log = tmp_path / "access.log"
    log.write_text("")
    req = {"log": str(log), "upstreams": ["10.77.0.11:3000"], "hold": 30, "max_5xx": 1.0,
           "run_id": uuid.uuid4().hex}
    threading.Timer(0.5, remote.op_stop_watch, (None, req, None)).start()
    t0 = time.monotonic()
    a = remote.op_watch_5xx(None, req, None)
    assert time.monotonic() - t0 < 5 and a["ok"] and a["stopped"] and a["answers"] == 0


def test_a_stop_removes_the_stop_files_of_runs_a_day_old(tmp_path: Path, monkeypatch):
    import os
    import time

    from provisioner.remote import deploy as remote
    monkeypatch.setattr(remote, "stop_path", lambda req: str(tmp_path / f"{req['run_id']}.stop"))
    old, recent = tmp_path / "old.stop", tmp_path / "recent.stop"
    old.touch()
    recent.touch()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    remote.op_stop_watch(None, {"run_id": "now"}, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["now.stop", "recent.stop"]


def watched_fleet(inv, fake_call, monkeypatch) -> tuple[flows.Fleet, flows.Canary]:
    """A Fleet of group app whose every exec is fake_call(host, request, timeout), and a
    canary plan of web1 held 30 s."""
    import io

    from provisioner.events import Events
    events = Events(task="deploy", env="test", json_out=True, verbose=0, diff=False, check=False,
                    stream_out=io.StringIO(), stream_err=io.StringIO())
    fleet = flows.Fleet(inv, inv.hosts_in("app"), inv.app(None), events, "deploy")
    monkeypatch.setattr(fleet, "call", fake_call)
    return fleet, flows.canary_plan(inv, inv.app(None), inv.hosts_in("app"), 1, 30)


def test_the_controller_stops_every_watcher_once_one_fails(deploy_root: Path, monkeypatch):
    """Fleet.watch: the canary's health watcher fails at once; the load balancer's watcher is
    stopped (op stop_watch on every watched host, once) instead of holding the whole time."""
    import threading

    inv = load(deploy_root, LB)
    stopped, sent = threading.Event(), []

    def fake_call(host, req, timeout=None):
        sent.append((host.name, req["op"]))
        if req["op"] == "watch":
            return {"ok": False, "seen": "500 sick", "asked": 2}
        if req["op"] == "watch_5xx":
            assert stopped.wait(10), "never stopped"
            return {"ok": True, "answers": 7, "errors": 0, "statuses": {"200": 7}, "stopped": True}
        stopped.set()
        return {"ok": True}
    fleet, canary = watched_fleet(inv, fake_call, monkeypatch)
    failed = fleet.watch(inv.hosts_in("app")[:1], "r2", canary)
    assert list(failed) == ["web1"] and "turned unhealthy" in failed["web1"]["why"]
    assert sorted(op for _, op in sent if op == "stop_watch") == ["stop_watch"] * 2


def test_a_failed_canary_of_a_first_deploy_says_the_canary_still_runs_it(deploy_root: Path,
                                                                          monkeypatch):
    """The whole flow (deploy()) against stand-ins of the server side: nothing ran before on
    web1, so the failed canary cannot go back, and the error says so instead of claiming it
    was switched back."""
    import test_blue_green as blue_green
    from provisioner.releases import Artifact

    class Servers:
        def call(self, host, req, data=b"", timeout=None):
            return {"lock": {"ok": True, "current": None, "manifest": [], "install": "npm ci"},
                    "switch": {"ok": True, "previous": None, "seen": "200", "how": "started"},
                    "watch": {"ok": False, "seen": "500 sick", "asked": 2},
                    "watch_5xx": {"ok": True, "answers": 0, "errors": 0, "statuses": {}},
                    "stop_watch": {"ok": True},
                    "finish": {"ok": True, "current": None, "manifest": []}}[req["op"]]
    inv = load(deploy_root, LB)
    fleet = blue_green.fleet_of(inv, Servers(), monkeypatch)
    canary = flows.canary_plan(inv, inv.app(None), fleet.hosts, 1, 5)
    assert flows.deploy(fleet, Artifact(b"", "0" * 64, "c" * 40, "main"), 1, canary) == 1
    out = fleet.output()
    assert "canary web1 turned unhealthy during the hold" in out
    assert "web1 still runs" in out and "it ran no release before" in out
    assert "switched back: web1" not in out


def test_a_ctrl_c_during_the_hold_stops_the_watchers_and_fails_the_canary(deploy_root: Path,
                                                                          monkeypatch):
    """Someone ends the hold with Ctrl-C: the watchers are stopped at once and the canary
    fails (rollout() then switches it back) instead of the run dying after the hold."""
    import os
    import signal
    import threading
    import time

    inv = load(deploy_root, LB)
    stopped, sent = threading.Event(), []

    def fake_call(host, req, timeout=None):
        sent.append((host.name, req["op"]))
        if req["op"] in ("watch", "watch_5xx"):
            assert stopped.wait(10), "never stopped"
            return {"ok": True, "seen": "200 ok", "asked": 1, "answers": 3, "errors": 0,
                    "statuses": {"200": 3}, "stopped": True}
        stopped.set()
        return {"ok": True}
    fleet, canary = watched_fleet(inv, fake_call, monkeypatch)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()     # a real Ctrl-C
    t0 = time.monotonic()
    failed = fleet.watch(inv.hosts_in("app")[:1], "r2", canary)
    assert time.monotonic() - t0 < 10
    assert failed == {"controller": {"ok": False, "canary": True,
                                     "why": "the hold was interrupted (SIGINT)"}}
    assert sorted(op for _, op in sent if op == "stop_watch") == ["stop_watch"] * 2


def test_a_ctrl_c_mid_deploy_exits_130_with_the_fleet_back_on_one_release(deploy_root: Path,
                                                                           monkeypatch):
    """The whole flow (deploy()) with a real SIGINT while web1 switches (serial 1): web2 is
    never switched, web1 goes back, the release is marked failed, exit 130 naming why."""
    import os

    import test_blue_green as blue_green
    from provisioner.releases import Artifact
    switched = []

    class Servers:
        def call(self, host, req, data=b"", timeout=None):
            if req["op"] == "switch":
                switched.append((host, req["release"]))
                if len(switched) == 1:
                    os.kill(os.getpid(), signal.SIGINT)          # a real Ctrl-C
                return {"ok": True, "previous": "r1", "seen": "200", "how": "reloaded"}
            if req["op"] == "finish":
                finished.append((host, req.get("states")))
            return {"ok": True, "current": "r1", "manifest": [], "install": "linked"}
    finished = []
    inv = load(deploy_root, LB)
    fleet = blue_green.fleet_of(inv, Servers(), monkeypatch)
    assert [h.name for h in fleet.hosts] == ["web1", "web2"]
    code = flows.deploy(fleet, Artifact(b"", "0" * 64, "c" * 40, "main"), 1)
    assert code == 130
    new = switched[0][1]
    assert switched == [("web1", new), ("web1", "r1")]
    assert sorted(h for h, _ in finished) == ["web1", "web2"]
    assert all(states == {new: "failed"} for _, states in finished)
    assert ("the run was interrupted (SIGINT) before web2 switched; switched back: web1"
            in fleet.output())

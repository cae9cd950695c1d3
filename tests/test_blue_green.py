"""`strategy: blue-green` without a server: the inventory keys, what is refused before any
server is touched, and the flows (provisioner/deploy.py: go_live, deploy, rollback) against a
simulation of the server side: what each host's colours run, what the load balancer's live
file says. Live: tests/test_deploy_live.py (blue-green under load through lb1)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from provisioner import colours
from provisioner import deploy as flows
from provisioner.errors import InputError
from provisioner.events import Events
from test_canary import LB, deploy_root, lb_root  # noqa: F401  (fixtures)
from test_inventory import fail, load, only, root  # noqa: F401  (fixture)

BG = LB.replace("    group: app\n", "    group: app\n    strategy: blue-green\n")


def test_green_listens_on_port_plus_one_unless_told(lb_root: Path):
    root = lb_root
    assert load(root, BG).app(None).colours == {"blue": 3000, "green": 3001}
    assert load(root, BG.replace("strategy: blue-green", "strategy: blue-green\n    "
                                 "green_port: 4000")).app(None).colours == {"blue": 3000,
                                                                            "green": 4000}
    assert load(root, LB).app(None).colours == {}


@pytest.mark.parametrize("edit, key, says", [
    ("strategy: blue-green\n    green_port: 3000", "apps.shop.green_port", "both listen on 3000"),
    ("strategy: reload\n    green_port: 3001", "apps.shop.green_port", "strategy is reload"),
    ("strategy: purple", "apps.shop.strategy", "blue-green"),
])
def test_bad_blue_green_keys_name_the_key(lb_root: Path, edit, key, says):
    root = lb_root
    p = only(fail(root, BG.replace("strategy: blue-green", edit)), key)
    assert says in p.message + (p.fix or ""), str(p)


def test_blue_green_without_a_load_balancer_or_with_limit_is_refused(deploy_root: Path):
    inv = load(deploy_root, BG.replace("upstream_port: 3000", "upstream_port: 4000"))
    with pytest.raises(InputError) as e:
        flows.app_hosts(inv, inv.app(None), None)
    assert "nothing would flip to the new colour" in str(e.value)
    inv = load(deploy_root, BG)
    with pytest.raises(InputError) as e:
        flows.app_hosts(inv, inv.app(None), "web1")
    assert "leave out --limit" in str(e.value)
    with pytest.raises(InputError) as e:
        flows.canary_plan(inv, inv.app(None), inv.hosts_in("app"), 1, None)
    assert "flip every host at once" in str(e.value)


def test_releases_and_unlock_take_limit_on_a_blue_green_app(deploy_root: Path):
    """deploy.unlock asks again with --limit set to the hosts holding a lock: refusing
    --limit there left a blue-green app's stale lock on one host impossible to remove."""
    (deploy_root / "roles" / "pm2").mkdir()
    (deploy_root / "roles" / "pm2" / "defaults.yml").write_text("pm2_apps: []\n")
    inv = load(deploy_root, BG.replace("roles: [base, node]\n    vars: {node_port: 3002}",
                                       "roles: [base, node, pm2]\n"
                                       "    vars: {pm2_apps: [{name: shop, script: server.js}]}"))
    with pytest.raises(InputError, match="leave out --limit"):
        flows.app_hosts(inv, inv.app(None), "web1")
    hosts = flows.app_hosts(inv, inv.app(None), "web1", switching=False)
    assert [h.name for h in hosts] == ["web1"]


class Servers:
    """The server side as the flows see it: per host each colour's release and which releases
    answer healthy; the load balancer's live files. Records every request."""

    def __init__(self, blue=None, green=None, live="blue", sick=()):
        self.colour = {h: {"blue": blue, "green": green} for h in ("web1", "web2")}
        self.live, self.sick, self.current, self.log = live, set(sick), {}, []

    def call(self, host, req, data=b"", timeout=None):
        op, name = req["op"], host
        self.log.append((name, op, req.get("release") or req.get("point")))
        if op == "lock":
            return {"ok": True, "current": self.current.get(name),
                    "manifest": [{"id": r, "state": "retired"} for r in ("r1", "r2")],
                    "colours": {c: {"release": r, "healthy": r is not None and
                                    (name, r) not in self.sick}
                                for c, r in self.colour[name].items()}}
        if op == "switch":
            colour = req["link"].rsplit("/", 1)[1]
            before = self.colour[name][colour]
            self.colour[name][colour] = req["release"]
            ok = (name, req["release"]) not in self.sick
            if not ok and before and req["revert"]:
                self.colour[name][colour] = before
            return {"ok": ok, "previous": before, "seen": "200" if ok else "500", "how": "reloaded",
                    **({} if ok or not before else {"reverted": before, "revert_seen": "200"})}
        if op == "colours":
            return {"ok": True, "files": {p: colours.live_conf("shop", self.live)
                                          for p in req["files"]}}
        if op == "flip":
            self.live = colours.live_colour("shop", next(iter(req["files"].values())))
            return {"ok": True, "seconds": 0.05}
        if op == "finish":
            if req.get("point"):
                self.current[name] = req["point"]
            return {"ok": True, "current": self.current.get(name)}
        raise AssertionError(op)


def fleet_of(inv, servers, monkeypatch, hosts=None) -> flows.Fleet:
    """A Fleet of `hosts` (default: group app) whose every exec is servers.call(host name,
    request, data, timeout); fleet.output(): its NDJSON events (fleet.json_out()), then its
    lines on stderr (fleet.lines())."""
    class Conn:
        commands = 0

        def __init__(self, host):
            self.host = host

        def close(self):
            pass
    monkeypatch.setattr(flows.Fleet, "conn", lambda self, h: Conn(h.name))
    monkeypatch.setattr(flows, "call", lambda conn, req, data=b"", timeout=None:
                        servers.call(conn.host, req, data, timeout))
    out, err = io.StringIO(), io.StringIO()
    events = Events(task="deploy", env="test", json_out=True, verbose=0, diff=False, check=False,
                    stream_out=out, stream_err=err)
    fleet = flows.Fleet(inv, hosts or inv.hosts_in("app"), inv.app(None), events, "deploy")
    fleet.output = lambda: out.getvalue() + err.getvalue()
    fleet.json_out, fleet.lines = out.getvalue, err.getvalue
    return fleet


def test_a_release_starts_as_the_idle_colour_then_the_load_balancer_flips(deploy_root, monkeypatch):
    servers = Servers(blue="r1", live="blue")
    fleet = fleet_of(load(deploy_root, BG), servers, monkeypatch)
    answers = {h.name: servers.call(h.name, {"op": "lock"}) for h in fleet.hosts}
    passed, back, failed = flows.go_live(fleet, "r2", answers)
    assert (passed, back, failed) == (True, [], {})
    assert servers.colour["web1"] == servers.colour["web2"] == {"blue": "r1", "green": "r2"}
    assert servers.live == "green"
    ops = [(h, op) for h, op, _ in servers.log[2:]]
    # both hosts' green switched (gated) before the one flip on the load balancer (db1 here)
    assert ops[0] == ("db1", "colours") and ops[-1] == ("db1", "flip")
    assert sorted(ops[1:3]) == [("web1", "switch"), ("web2", "switch")]


def test_a_failed_gate_flips_nothing_and_the_idle_colour_goes_back(deploy_root, monkeypatch):
    servers = Servers(blue="r1", green="r0", live="blue", sick=[("web2", "r2")])
    fleet = fleet_of(load(deploy_root, BG), servers, monkeypatch)
    answers = {h.name: servers.call(h.name, {"op": "lock"}) for h in fleet.hosts}
    passed, _, failed = flows.go_live(fleet, "r2", answers)
    assert not passed and list(failed) == ["web2"]
    assert servers.live == "blue", "nothing flipped: the new release never served a request"
    # web1's green passed its gate and went back: green is still the way back to r0
    assert servers.colour["web1"] == servers.colour["web2"] == {"blue": "r1", "green": "r0"}


def test_a_failed_gate_of_a_colour_never_started_says_it_serves_nothing(deploy_root, monkeypatch):
    servers = Servers(blue="r1", green=None, live="blue", sick=[("web2", "r2")])
    fleet = fleet_of(load(deploy_root, BG), servers, monkeypatch)
    answers = {h.name: servers.call(h.name, {"op": "lock"}) for h in fleet.hosts}
    passed, back, failed = flows.go_live(fleet, "r2", answers)
    assert not passed and back == [] and servers.live == "blue"
    assert failed["web1"]["why"] == ("web1's green (not served) still runs r2: it ran no "
                                     "release before, nothing to switch back to")


def test_a_rollback_is_only_the_flip_when_the_old_colour_still_runs_it(deploy_root, monkeypatch):
    servers = Servers(blue="r1", green="r2", live="green")
    servers.current = {"web1": "r2", "web2": "r2"}
    fleet = fleet_of(load(deploy_root, BG), servers, monkeypatch)
    assert flows.rollback(fleet, None, 1) == 0
    assert servers.live == "blue" and servers.current == {"web1": "r1", "web2": "r1"}
    assert not [x for x in servers.log if x[1] == "switch"], "no switch, no reload: a flip"
    assert [op for _, op, _ in servers.log].count("flip") == 1


def test_load_balancers_that_disagree_stop_the_flow_before_any_switch(deploy_root, monkeypatch):
    servers = Servers(blue="r1", live="blue")
    fleet = fleet_of(load(deploy_root, BG), servers, monkeypatch)
    servers.live = "purple"                           # a hand-edited live file: no colour
    answers = {h.name: servers.call(h.name, {"op": "lock"}) for h in fleet.hosts}
    passed, _, failed = flows.go_live(fleet, "r2", answers)
    assert not passed and "do not agree on a live colour" in failed["lb"]["why"]
    assert not [x for x in servers.log if x[1] in ("switch", "flip")]


@pytest.mark.parametrize("nginx_t", [0, 1])
def test_the_flip_on_a_load_balancer_checks_nginx_and_keeps_the_old_file_when_refused(
        tmp_path, monkeypatch, nginx_t):
    """op_flip with stand-ins for nginx and systemctl on PATH: the file is replaced and nginx
    reloaded, or (nginx -t refuses) the old file is back and nothing reloaded."""
    from provisioner.remote import deploy as remote
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, rc in (("nginx", nginx_t), ("systemctl", 0)):
        (bin_dir / name).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {tmp_path}/ran\n"
                                    f"{'echo emerg: bad >&2' if rc else ''}\nexit {rc}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    live = tmp_path / "app.conf"
    live.write_text(colours.live_conf("app", "blue"))
    req = {"app": "app", "files": {str(live): colours.live_conf("app", "green")}}
    if nginx_t:
        with pytest.raises(remote.Fail, match="nginx -t refused the flip"):
            remote.op_flip(remote.App(req), req, None)
        assert colours.live_colour("app", live.read_text()) == "blue"
        assert "systemctl" not in (tmp_path / "ran").read_text()
    else:
        assert remote.op_flip(remote.App(req), req, None)["ok"]
        assert colours.live_colour("app", live.read_text()) == "green"
        assert (tmp_path / "ran").read_text().splitlines()[-1].endswith("systemctl reload nginx")

"""The pre-migration dumps (`pg_dump -Fc` before a deploy migrates) without a server: taken
only once the deploy lock is held on every host.
The flows (provisioner/deploy.py) run against a simulation of the server side. Live:
tests/test_deploy_live.py (migrations, db.restore)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from provisioner import deploy as flows
from provisioner.events import Events
from provisioner.releases import Artifact
from test_canary import deploy_root, lb_root  # noqa: F401  (fixtures)
from test_inventory import load, root  # noqa: F401  (fixture)
from test_releases import APPS

MIGRATES = APPS + "    migrate: [node, migrate.js, up]\n    database: {host: db1, name: shop}\n"
OTHER_RUN = {"run_id": "f" * 32, "who": "alice", "from": "laptop", "pid": 4242,
             "started": "2026-06-01T10:00:00+00:00"}


class Servers:
    """The server side as the deploy flow sees it: web1 and web2 (their releases; a lock
    another run holds), db1 (its dumps). Records every request in order."""

    def __init__(self, held=(), releases=("r1",), dumps=()):
        self.held, self.log = set(held), []
        self.releases = {h: list(releases) for h in ("web1", "web2")}
        self.dumps = set(dumps)

    def call(self, host, req, data=b"", timeout=None):
        op = req["op"]
        self.log.append((host, op))
        if op == "lock":
            if host in self.held:
                return {"ok": False, "acquired": False, "holder": OTHER_RUN}
            return {"ok": True, "current": self.releases[host][-1], "install": "npm ci",
                    "manifest": [{"id": r, "state": "live"} for r in self.releases[host]]}
        if op == "backup":
            self.dumps.add(req["release"])
            return {"ok": True, "path": f"/var/backups/before-{req['release']}.dump", "size": 9}
        if op == "migrate":
            return {"ok": True, "output": "up 001.js"}
        if op == "switch":
            self.releases[host].append(req["release"])
            return {"ok": True, "previous": "r1", "seen": "200", "how": "reloaded"}
        if op == "finish":
            keep = self.releases[host][-2:]                  # keep: 2
            self.releases[host] = keep
            return {"ok": True, "current": keep[-1], "pruned": [],
                    "manifest": [{"id": r, "state": "live"} for r in keep]}
        if op == "unlock":
            return {"ok": True}
        raise AssertionError(op)


def fleet_of(inv, servers: Servers, monkeypatch, limit=None) -> flows.Fleet:
    class Conn:
        commands = 0

        def __init__(self, host):
            self.host = host

        def close(self):
            pass
    monkeypatch.setattr(flows.Fleet, "conn", lambda self, h: Conn(h.name))
    monkeypatch.setattr(flows, "call", lambda conn, req, data=b"", timeout=None:
                        servers.call(conn.host, req, data, timeout))
    monkeypatch.setattr(flows, "release_id", lambda commit: "r2")
    out, err = io.StringIO(), io.StringIO()
    events = Events(task="deploy", env="test", json_out=True, verbose=0, diff=False, check=False,
                    stream_out=out, stream_err=err)
    hosts = [h for h in inv.hosts_in("app") if limit is None or h.name in limit]
    fleet = flows.Fleet(inv, hosts, inv.app(None), events, "deploy")
    fleet.output = lambda: out.getvalue() + err.getvalue()     # NDJSON events, then the lines
    fleet.json_out = out.getvalue
    return fleet


def events_of(fleet) -> list[dict]:
    return [json.loads(line) for line in fleet.json_out().splitlines()]


ARTIFACT = Artifact(b"tar", "0" * 64, "c" * 40, "main")


def test_a_deploy_refused_by_a_lock_takes_no_dump(deploy_root: Path, monkeypatch):
    servers = Servers(held={"web2"})
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 4
    assert not [x for x in servers.log if x[1] in ("backup", "migrate", "switch")]
    assert ("web1", "unlock") in servers.log, "the lock taken on web1 is given back"
    assert "deploy lock of shop held by alice@laptop" in fleet.output()


def test_the_dump_is_taken_only_once_every_host_is_locked(deploy_root: Path, monkeypatch):
    servers = Servers()
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    ops = [op for _, op in servers.log]
    assert ops.index("backup") > max(i for i, op in enumerate(ops[:3]) if op == "lock")
    assert ops[:2] == ["lock", "lock"], "the lock alone on both hosts, before anything else"
    assert ops.index("backup") < ops.index("migrate") < ops.index("switch")


def test_an_app_without_migrations_locks_and_prepares_in_one_exec(deploy_root: Path, monkeypatch):
    servers = Servers()
    fleet = fleet_of(load(deploy_root, APPS), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert [op for _, op in servers.log].count("lock") == 2          # one per host
    assert "backup" not in [op for _, op in servers.log]

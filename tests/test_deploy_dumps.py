"""The pre-migration dumps (`pg_dump -Fc` before a deploy migrates) without a server: taken
only once the deploy lock is held on every host; pruned with the releases they were taken
before, never while a host keeps that release; `db.restore --before` saying when a dump went.
The flows (provisioner/deploy.py) run against a simulation of the server side. Live:
tests/test_deploy_live.py (migrations, db.restore)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner import deploy as flows
from provisioner.cli.deploy import missing_backup
from provisioner.releases import Artifact
from provisioner.remote import deploy as remote
import test_blue_green as blue_green
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
        if op == "prune_backups":
            gone = remote.dumps_to_prune(self.dumps, req["kept"])
            self.dumps -= set(gone)
            return {"ok": True, "pruned": gone}
        if op == "unlock":
            return {"ok": True}
        raise AssertionError(op)


def fleet_of(inv, servers: Servers, monkeypatch, limit=None) -> flows.Fleet:
    monkeypatch.setattr(flows, "release_id", lambda commit: "r2")
    hosts = [h for h in inv.hosts_in("app") if limit is None or h.name in limit]
    return blue_green.fleet_of(inv, servers, monkeypatch, hosts)


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


def test_a_lock_taken_over_first_is_said_at_the_default_verbosity(deploy_root: Path,
                                                                  monkeypatch):
    """The takeover moved to the lock-only exec (it was the prepare step's news): it is a
    change, so it shows without -v, as before."""
    servers = Servers()
    answer = servers.call

    def call(host, req, data=b"", timeout=None):
        a = answer(host, req, data, timeout)
        if req["op"] == "lock" and not req.get("artifact"):
            a.update(took_over=OTHER_RUN, cleaned=["r9.building"])
        return a
    servers.call = call
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    lines = fleet.lines()
    assert lines.count("took over the lock of a dead run: alice@laptop") == 2
    assert "removed what a dead deploy left: r9.building" in lines


def test_an_app_without_migrations_locks_and_prepares_in_one_exec(deploy_root: Path, monkeypatch):
    servers = Servers()
    fleet = fleet_of(load(deploy_root, APPS), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert [op for _, op in servers.log].count("lock") == 2          # one per host
    assert "backup" not in [op for _, op in servers.log]


@pytest.mark.parametrize("dumps, kept, gone", [
    # the oldest release any host keeps is r3: the dumps before r1 and r2 go with them
    ({"r1", "r2", "r3", "r4"}, ["r3", "r4"], ["r1", "r2"]),
    # a host still keeps r2 (another keeps only r4): its dump stays
    ({"r1", "r2", "r4"}, ["r2", "r4"], ["r1"]),
    # r3's migration failed (the release was discarded, its dump is what db.restore is
    # for): it stays while releases of its time are kept
    ({"r3"}, ["r2", "r4"], []),
    ({"r1"}, [], []),                                   # nothing known: nothing goes
])
def test_dumps_go_with_the_releases_they_were_taken_before(dumps, kept, gone):
    assert remote.dumps_to_prune(dumps, kept) == gone


def test_never_the_dump_of_current_or_of_the_newest_good_release():
    # web1 keeps r5 (current) and r4 (failed); r3 is the newest good one on web2
    kept = ["r3", "r4", "r5"]
    assert remote.dumps_to_prune({"r1", "r3", "r4", "r5"}, kept) == ["r1"]


def test_a_finished_deploy_prunes_the_dumps_of_the_pruned_releases(deploy_root: Path,
                                                                   monkeypatch):
    servers = Servers(releases=("r0", "r1"), dumps={"r0", "r1"})
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch)
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert servers.releases["web1"] == ["r1", "r2"]                    # r0 pruned (keep 2)
    assert servers.dumps == {"r1", "r2"}
    assert servers.log[-1] == ("db1", "prune_backups")


def test_after_limit_the_dumps_stay(deploy_root: Path, monkeypatch):
    servers = Servers(releases=("r0", "r1"), dumps={"r0", "r1"})
    fleet = fleet_of(load(deploy_root, MIGRATES), servers, monkeypatch, limit={"web1"})
    assert flows.deploy(fleet, ARTIFACT, 1) == 0
    assert "prune_backups" not in [op for _, op in servers.log]
    assert servers.dumps == {"r0", "r1", "r2"}
    skipped = [e for e in events_of(fleet) if e.get("resource") == "prune dumps"]
    assert skipped and "releases on web2 are not known to this run" in skipped[0]["reason"]


def test_op_prune_backups_removes_the_dumps_and_records_them(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(remote, "BACKUPS", str(tmp_path))
    (tmp_path / "shop").mkdir()
    for r in ("r1", "r2", "r3"):
        (tmp_path / "shop" / f"before-{r}.dump").write_bytes(b"PGDMP")
    app = remote.App({"app": "shop"})
    a = remote.op_prune_backups(app, {"kept": ["r3", "r4"]}, None)
    assert a == {"ok": True, "pruned": ["r1", "r2"]}
    listed = remote.op_backups(app, {}, None)
    assert list(listed["backups"]) == ["r3"]
    assert sorted(listed["pruned"]) == ["r1", "r2"] and listed["pruned"]["r1"]["size"] == 5
    assert remote.op_prune_backups(app, {"kept": ["r3"]}, None) == {"ok": True, "pruned": []}


def test_db_restore_says_when_the_dump_went_with_its_release(deploy_root: Path):
    app = load(deploy_root, MIGRATES).app(None)
    text = missing_backup("db1", app, "r1", {"r3": {}}, {"r1": {"at": "2026-06-01T10:00:00Z"}})
    assert "backup taken before release r1 was pruned at 2026-06-01T10:00:00Z" in text
    assert "together with the release" in text and "keeps 5 releases" in text
    assert "backups kept: r3" in text and "raise `keep`" in text
    text = missing_backup("db1", app, "r9", {}, {})
    assert "no backup taken before release r9" in text and "backups kept: none" in text


def test_db_restore_releases_and_unlock_print_what_servers_said_with_secrets_masked(
        monkeypatch, capsys):
    """pg_restore's, npm's or pm2's error text goes to the terminal through say()."""
    import sys

    from provisioner import secret
    from provisioner.cli.deploy import say
    monkeypatch.setattr(secret, "REDACTOR", secret.Redactor())
    secret.REDACTOR.register("pg-app-password-7f3a")
    say("db1: restore failed: FATAL: password pg-app-password-7f3a rejected", file=sys.stderr)
    said = capsys.readouterr().err
    assert said == f"db1: restore failed: FATAL: password {secret.MASK} rejected\n"

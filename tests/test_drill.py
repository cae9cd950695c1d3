"""Restore drills, pure: the file comparison, the scratch cluster's configuration, the files drill
end to end with a stand-in restic, and the drill units the roles write. The drills themselves
run live in tests/test_backup_live.py."""
from __future__ import annotations

import os
import runpy
import stat
from pathlib import Path

import pytest

import roles.pgbackrest as pgrole
from provisioner.api import RoleContext
from test_role_pgbackrest import TRIXIE, make_inventory

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

drill = runpy.run_path(str(Path(pgrole.__file__).parent / "drill.py"), run_name="drill")


def tree(root: Path, files: dict) -> None:
    for rel, (text, mtime) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.utime(p, (mtime, mtime))


def test_unchanged_files_are_compared_and_a_differing_one_is_named(tmp_path):
    live, restored = tmp_path / "live", tmp_path / "restored"
    tree(live, {"etc/a": ("same", 1000), "etc/b": ("live!", 1000), "etc/c": ("newer", 2000)})
    tree(restored, {"etc/a": ("same", 1000), "etc/b": ("rot!!", 1000), "etc/c": ("older", 1000),
                    "etc/gone": ("x", 1000)})
    r = drill["compare_tree"](str(restored), str(live))
    assert r == {"compared": 2, "changed_since": 1, "gone_since": 1,
                 "differ": [str(live / "etc" / "b")]}


def test_the_scratch_cluster_listens_on_its_socket_only():
    conf = drill["scratch_conf"]("/var/lib/pgbackrest-drill/db1", 54329)
    assert "port = 54329\nlisten_addresses = ''\n" in conf
    assert "unix_socket_directories = '/var/lib/pgbackrest-drill/db1'" in conf
    assert "hot_standby = off" in conf and "archive_mode = off" in conf


@pytest.fixture
def fake_restic(tmp_path, monkeypatch):
    """A `restic` that 'restores' a prepared tree into --target (restic's own layout)."""
    snapshot = tmp_path / "snapshot"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "restic"
    script.write_text(f"#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --target ] && t=$2; shift; done\n"
                      f"cp -a {snapshot}/. \"$t\"/\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return snapshot


def test_the_files_drill_passes_on_a_faithful_snapshot_and_cleans_up(tmp_path, fake_restic, capsys):
    live = tmp_path / "live"
    tree(live, {"a.txt": ("alpha", 1000), "sub/b.txt": ("beta", 1000)})
    tree(fake_restic / str(live).lstrip("/"), {"a.txt": ("alpha", 1000), "sub/b.txt": ("beta", 1000)})
    scratch = tmp_path / "scratch"
    assert drill["main"](["files", "--scratch", str(scratch), str(live)]) == 0
    out = capsys.readouterr().out
    assert '"compared": 2' in out and '"differ": []' in out
    assert not scratch.exists()


def test_the_files_drill_fails_on_a_corrupt_snapshot(tmp_path, fake_restic, capsys):
    live = tmp_path / "live"
    tree(live, {"a.txt": ("alpha", 1000)})
    tree(fake_restic / str(live).lstrip("/"), {"a.txt": ("alpHa", 1000)})
    assert drill["main"](["files", "--scratch", str(tmp_path / "s"), str(live)]) == 1
    assert "1 restored file(s) differ" in capsys.readouterr().err


def test_the_repository_host_gets_a_drill_per_stanza_and_no_cluster_of_its_own(tmp_path):
    inv = make_inventory(tmp_path)
    v = inv.hostvars("vault")
    r = {x.id: x for x in pgrole.resources(v, RoleContext(inv.hosts["vault"], inv, TRIXIE, False))}
    ids = list(r)
    conf = r["file /etc/postgresql-common/createcluster.d/50-provisioner-drill.conf"]
    assert "\ncreate_main_cluster = false\n" in conf.content.text
    # before the server package, which installs with pgbackrest's
    assert ids.index(conf.id) < ids.index("apt pgbackrest postgresql-17")
    assert r["apt pgbackrest postgresql-17"].names == ("pgbackrest", "postgresql-17")
    service = r["file /etc/systemd/system/pgbackrest-db1-verify.service"].content.text
    assert ("--lock pgbackrest-db1 --user pgbackrest --drill -- /usr/bin/python3 "
            "/usr/local/lib/provisioner/drill.py pg --stanza db1 --bin /usr/lib/postgresql/17/bin "
            "--port 54329 --scratch /var/lib/pgbackrest-drill/db1") in service
    assert r["service pgbackrest-db1-verify.timer"].enabled
    off = make_inventory(tmp_path, pgbackrest_drill=False)
    r = {x.id for x in pgrole.resources(off.hostvars("vault"),
                                        RoleContext(off.hosts["vault"], off, TRIXIE, False))}
    assert not any("verify" in x or "postgresql-17" in x for x in r)


def test_the_database_hosts_cluster_is_created_archiving(tmp_path):
    """Before pgbackrest's package, so the cluster a fresh server's package creates starts with
    archive_mode on: no restart for it after."""
    inv = make_inventory(tmp_path)
    r = {x.id: x for x in pgrole.resources(inv.hostvars("db1"), RoleContext(inv.hosts["db1"], inv, TRIXIE, False))}
    ids = list(r)
    conf = r["file /etc/postgresql-common/createcluster.d/60-pgbackrest.conf"]
    assert ids.index(conf.id) < ids.index("apt pgbackrest")
    lines = conf.content.text.splitlines()
    assert "archive_mode = on" in lines and "wal_level = replica" in lines
    assert "archive_command = 'pgbackrest --stanza=db1 archive-push %%p'" in lines
    # the same settings as the cluster's own drop-in, which stays what the role manages
    own = r["template /etc/postgresql/17/main/conf.d/60-pgbackrest.conf"].content.text
    assert [x.replace("%", "%%") for x in own.splitlines() if not x.startswith("#")] == \
        [x for x in lines if not x.startswith("#")]


def test_the_drill_expects_the_databases_the_inventory_declares(tmp_path):
    inv = make_inventory(tmp_path)
    s = pgrole.check(inv.hostvars("vault"), RoleContext(inv.hosts["vault"], inv, TRIXIE,
                                                        False))["stanzas"][0]
    assert s.databases == ("app",)
    argv = pgrole.drill_command(inv.hostvars("vault"), s, 1)
    assert argv[-4:] == ["--scratch", "/var/lib/pgbackrest-drill/db1", "--expect-db", "app"]
    assert argv[argv.index("--port") + 1] == "54330"        # one port per further stanza


# --- the scratch cluster's promotion (found live: psql ran while it still replayed WAL) ----------

CONTROLDATA = """pg_control version number:            1700
Database cluster state:               {state}
pg_control last modified:             Tue 01 Dec 2026 19:21:11 UTC
"""


def test_the_cluster_state_is_read_from_pg_controldata():
    assert drill["cluster_state"](CONTROLDATA.format(state="in archive recovery")) == "in archive recovery"
    assert drill["cluster_state"](CONTROLDATA.format(state="in production")) == "in production"
    assert drill["cluster_state"]("garbage\n") is None


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_the_drill_waits_until_recovery_ended_before_it_connects():
    answers = iter([(False, "cluster state in archive recovery")] * 5 + [(True, "in production")])
    calls = []

    def probe():
        calls.append(1)
        return next(answers)
    clock = Clock()
    drill["wait_for_promotion"](probe, 60, sleep=clock.sleep, clock=clock)
    assert len(calls) == 6 and clock.t == 2.5


def test_a_recovery_that_never_ends_fails_the_drill_within_its_bound():
    clock = Clock()
    with pytest.raises(RuntimeError, match=r"did not finish its recovery within 10 s "
                                           r"\(cluster state in archive recovery\)"):
        drill["wait_for_promotion"](lambda: (False, "cluster state in archive recovery"), 10,
                                    sleep=clock.sleep, clock=clock)
    assert 10 <= clock.t <= 10.5


def test_a_cluster_that_stops_during_recovery_fails_the_drill_at_once():
    def probe():
        raise RuntimeError("the restored cluster stopped during its recovery: FATAL: ...")
    with pytest.raises(RuntimeError, match="stopped during its recovery"):
        drill["wait_for_promotion"](probe, 10, sleep=lambda s: None)

"""Deploys without a server: the `apps:` section of an inventory, the artifact built from git,
release ids, batches and the choice of a rollback target. The flows themselves are proven live
in tests/test_deploy_live.py."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from provisioner.errors import InputError
from provisioner.releases import batches, build, release_id, rollback_target
from test_inventory import GOOD, fail, line_of, load, only, root  # noqa: F401  (fixture)

APPS = GOOD + """\
apps:
  shop:
    source: ../shop
    group: app
    shared: [.env, uploads/]
"""


def test_an_app_gets_its_defaults_and_a_source_relative_to_the_inventory(root: Path) -> None:
    inv = load(root, APPS)
    app = inv.app(None)
    assert (app.name, app.group, app.ref, app.port, app.health_path, app.keep) == \
        ("shop", "app", "HEAD", 3000, "/health", 5)
    assert app.source == str(root / "shop") and app.shared == (".env", "uploads/")


@pytest.mark.parametrize("bad, key, message, fix", [
    ("group: app", "apps.shop.group", "app 'shop' runs on group 'web', which the inventory "
     "does not define", "name one of the groups: app, db"),
    ("shared: [.env, uploads/]", "apps.shop.shared[1]", "'../up' is not a plain relative path",
     "without `..`"),
    ("source: ../shop", "apps.shop.health_path", "'health' is not a URL path",
     "starting with /"),
    ("source: ../shop", "apps.shop.keep", "releases kept per host (2 or more)", "keep: 5"),
    ("source: ../shop", "apps.shop.ref", "'--upload-pack=x' is not a git ref", "a branch, tag"),
])
def test_bad_apps_are_refused_naming_file_line_key_and_fix(root: Path, bad, key, message, fix):
    replacement = {"apps.shop.group": "group: web",
                   "apps.shop.shared[1]": "shared: [.env, ../up]",
                   "apps.shop.health_path": "source: ../shop\n    health_path: health",
                   "apps.shop.keep": "source: ../shop\n    keep: 1",
                   "apps.shop.ref": "source: ../shop\n    ref: --upload-pack=x"}[key]
    text = APPS.replace(bad, replacement)
    p = only(fail(root, text), key)
    assert str(p.file).endswith("inventories/test.yml")
    assert p.line == line_of(text, replacement.split("\n")[-1].strip().split(":")[0] + ":")
    assert message in p.message and fix in (p.fix or ""), str(p)


def test_an_unknown_app_names_the_choices(root: Path) -> None:
    inv = load(root, APPS)
    with pytest.raises(InputError) as e:
        inv.app("shpo")
    assert "no app 'shpo'" in str(e.value) and "choose from: shop" in str(e.value)


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    (repo / "app" / "server.js").write_text("// v1\n")
    (repo / "README").write_text("outside the app\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    past = {**os.environ, "GIT_AUTHOR_DATE": "@1600000000 +0000", "GIT_COMMITTER_DATE": "@1600000000 +0000"}
    subprocess.run([*git, "commit", "-qm", "v1"], check=True, env=past)
    (repo / "app" / "server.js").write_text("// v2 (not committed)\n")
    return repo


def test_the_artifact_is_the_committed_app_folder_and_its_sha256(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    art = build(str(repo / "app"), "HEAD")
    assert art.sha256 == hashlib.sha256(art.data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(art.data), mode="r:gz") as tar:
        names = tar.getnames()
        assert "server.js" in names and "README" not in names
        assert tar.extractfile("server.js").read() == b"// v1\n"      # what is committed only
        assert {m.mtime for m in tar.getmembers()} == {1600000000}      # dated by the commit, not now
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert art.commit == head
    assert build(str(repo / "app"), "HEAD").sha256 == art.sha256        # built the same again
    assert build(f"file://{repo}", "HEAD").commit == head                 # a URL is cloned


def test_a_bad_ref_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        build(str(_repo(tmp_path) / "app"), "no-such-branch")
    assert "--ref" in str(e.value)


def test_release_ids_sort_by_time_and_name_the_commit() -> None:
    a = release_id("3f2a9c1b7d4e5f60", datetime(2026, 6, 1, 10, 4, 27, tzinfo=timezone.utc))
    b = release_id("0000aaaa1111bbbb", datetime(2026, 6, 1, 10, 4, 28, tzinfo=timezone.utc))
    assert a == "20260601T100427Z-3f2a9c1b7d4e" and a < b


def test_batches() -> None:
    assert batches([1, 2, 3], 1) == [[1], [2], [3]]
    assert batches([1, 2, 3], 2) == [[1, 2], [3]]
    assert batches([1, 2, 3], 0) == [[1, 2, 3]]


def _m(current, *states):
    return {"current": current, "manifest": [{"id": i, "state": s} for i, s in states]}


def test_rollback_goes_to_the_newest_earlier_good_release_never_a_failed_one() -> None:
    m = _m("r4", ("r1", "retired"), ("r2", "retired"), ("r3", "failed"), ("r4", "live"))
    assert rollback_target({"web1": m, "web2": m}, None) == "r2"
    # after a rollback to r2, the next goes further back (r4 is rolled-back, never again)
    m2 = _m("r2", ("r1", "retired"), ("r2", "live"), ("r4", "rolled-back"))
    assert rollback_target({"web1": m2}, None) == "r1"
    with pytest.raises(ValueError, match="r3 cannot go live .it is failed"):
        rollback_target({"web1": m}, "r3")
    with pytest.raises(ValueError, match="web2: release r1 cannot go live .it is not there"):
        rollback_target({"web1": m, "web2": _m("r4", ("r4", "live"))}, "r1")
    with pytest.raises(ValueError, match="no earlier release passed its health gate"):
        rollback_target({"web1": _m("r1", ("r1", "live"))}, None)


def test_migrations_need_a_database_on_a_known_host(root: Path) -> None:
    text = APPS + "    migrate: [node, migrate.js, up]\n"
    p = only(fail(root, text), "apps.shop.migrate")
    assert "names no database to back up first" in p.message and "database:" in p.fix
    text = APPS + "    migrate: [node, migrate.js, up]\n    database: {host: db9, name: shop}\n"
    p = only(fail(root, text), "apps.shop.database.host")
    assert "host 'db9', which the inventory does not define" in p.message
    assert "web1, web2, db1" in p.fix
    text = APPS + "    migrate: node migrate.js up\n    database: {host: db1, name: shop}\n"
    assert only(fail(root, text), "apps.shop.migrate").message.startswith("expected a command as a list")
    inv = load(root, APPS + "    migrate: [node, migrate.js, up]\n    database: {host: db1, name: shop}\n")
    assert inv.app("shop").migrate == ("node", "migrate.js", "up")
    assert inv.app("shop").database == ("db1", "shop")


def test_the_deploy_helper_runs_alone_with_the_flock_helper_it_shares_with_the_agent(tmp_path):
    """What a server runs (releases.source()): the agent's flock_held, then remote/deploy.py,
    in a Python without site-packages or the provisioner package (-I -S, as on a server)."""
    import fcntl
    import os
    import sys

    from provisioner import releases
    from provisioner.remote import agent
    held = tmp_path / "busy"
    held.touch()
    fd = os.open(held, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)                      # an exec of the run, still alive
    driver = ("import sys; ns = {'REQ': {'op': 'list', 'app': 'no-such-app'}, 'DATA': None,"
              " '__name__': '__provisioner_deploy__'}; "
              "exec(compile(sys.stdin.read(), 'provisioner-deploy', 'exec'), ns); "
              "print(ns['flock_held'](sys.argv[1]), ns['flock_held'](sys.argv[2]))")
    try:
        r = subprocess.run([sys.executable, "-I", "-S", "-c", driver, str(held),
                            str(tmp_path / "missing")], input=releases.source(), text=True,
                           capture_output=True, cwd=tmp_path, timeout=60)
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr
    assert '"ok": true' in r.stdout and r.stdout.strip().endswith("True False")
    assert releases.source().count("def flock_held(") == 1
    assert agent._exec_busy(str(tmp_path)) is False              # no exec.lock there

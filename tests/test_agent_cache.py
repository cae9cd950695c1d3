"""The agent's cache on the server, run for real on this machine with the cache folder in
tmp_path: the source is sent once per host and version, then only requests; a cache file is
run only when its sha256 is the one asked for; the compiled code kept beside it only when no
one else could have written it and its CRC matches; a folder others can write is never
written; check mode writes nothing. (tests/test_agent_cache_live.py checks the same on a
server.)"""
from __future__ import annotations

import binascii
import hashlib
import io
import json
import marshal
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from provisioner import agent
from provisioner.connection import Result
from provisioner.events import Events
from provisioner.inventory import load_inventory_file
from provisioner.remote import agent as remote
from provisioner.runner import Options, Runner


class LocalConn:
    """Runs the agent's command on this machine, as a server would; records what was sent."""

    def __init__(self):
        self.commands, self.sent, self.agent_cache = 0, [], True

    def run(self, argv, stdin=None, **kw):
        self.commands += 1
        self.sent.append(json.loads(stdin))
        p = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
        return Result(p.returncode, p.stdout, p.stderr, 0.0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "var-cache" / "agent"
    monkeypatch.setattr(agent, "CACHE_DIR", str(d))
    return d


def touching(marker: Path) -> dict:
    """A facts request whose check creates `marker`: it exists only if an agent ran."""
    return {"checks": [["touch", str(marker)]]}


def cached_file(cache: Path) -> Path:
    return cache / f"{agent.source_sha()}.py"


def compiled_file(cache: Path) -> Path:
    return cache / f"{agent.source_sha()}.{remote._magic()}.code"


def ran_from_cache(tmp_path: Path, answer: bool = True) -> dict | None:
    """A request alone (no source): what the bootstrap does with the cache as it is."""
    p = subprocess.run(agent.command(), input=agent.payload("facts", touching(tmp_path / "ran"),
                                                            code=False),
                       capture_output=True, timeout=60)
    return agent.parse(p.stdout, p.stderr, p.returncode) if answer else None


def plant_compiled(cache: Path, marker: Path, crc_ok: bool = True) -> None:
    """Compiled code that only creates `marker`, where the agent's compiled code goes."""
    body = marshal.dumps(compile(f"open({str(marker)!r}, 'w').close()", "planted", "exec"))
    crc = binascii.crc32(body) ^ (0 if crc_ok else 1)
    compiled_file(cache).write_bytes(crc.to_bytes(4, "big") + body)


def test_the_agent_is_sent_once_then_run_from_the_cache(cache, tmp_path):
    conn = LocalConn()
    first = agent.call(conn, "facts", touching(tmp_path / "m1"))
    assert first["facts"]["checks"] and (tmp_path / "m1").exists()
    # a miss (nothing run), then the request again with the source, which the agent kept
    assert conn.commands == 2 and "code" not in conn.sent[0] and conn.sent[1]["store"]
    assert first["cache"] == {"cached": True}
    assert cached_file(cache).read_text() == agent.source()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(cached_file(cache).stat().st_mode) == 0o600
    # and kept the code it compiled: later execs run that, without the source or a compile
    body = compiled_file(cache).read_bytes()
    assert binascii.crc32(body[4:]).to_bytes(4, "big") == body[:4]
    assert stat.S_IMODE(compiled_file(cache).stat().st_mode) == 0o600
    cached_file(cache).unlink()
    agent.call(conn, "facts", touching(tmp_path / "m2"))
    assert conn.commands == 3 and "code" not in conn.sent[2] and (tmp_path / "m2").exists()


def test_a_source_cached_without_its_compiled_code_is_compiled_once_more_then_kept(cache, tmp_path):
    conn = LocalConn()
    agent.call(conn, "ping", {})
    compiled_file(cache).unlink()         # e.g. the server's python3 got a new bytecode magic
    agent.call(conn, "ping", {})
    assert conn.commands == 3 and compiled_file(cache).exists()
    conn.agent_cache = False              # check mode runs it, never writes it
    compiled_file(cache).unlink()
    agent.call(conn, "ping", {})
    assert conn.commands == 4 and not compiled_file(cache).exists()


def test_compiled_code_is_run_only_if_no_one_else_could_have_written_it(cache, tmp_path):
    agent.call(LocalConn(), "ping", {})
    marker = tmp_path / "planted-ran"
    plant_compiled(cache, marker)          # as root's, in root's folder: trusted, as a .pyc is
    ran_from_cache(tmp_path, answer=False)
    assert marker.exists()
    marker.unlink()
    for name, spoil, mend in [
            ("a torn file (CRC)", lambda: plant_compiled(cache, marker, crc_ok=False), lambda: None),
            ("a file others can write", lambda: compiled_file(cache).chmod(0o622),
             lambda: compiled_file(cache).chmod(0o600)),
            ("another user's file", lambda: os.chown(compiled_file(cache), 65534, 65534),
             lambda: os.chown(compiled_file(cache), 0, 0)),
            ("a folder others can write", lambda: cache.chmod(0o703), lambda: cache.chmod(0o700)),
            ("a parent others can write", lambda: cache.parent.chmod(0o777),
             lambda: cache.parent.chmod(0o755))]:
        plant_compiled(cache, marker)
        spoil()
        answer = ran_from_cache(tmp_path)
        mend()
        assert not marker.exists(), name
        assert "facts" in answer, name      # the cached source ran instead (its hash matched)
    os.symlink(compiled_file(cache), cache / "elsewhere.code")
    compiled_file(cache).unlink()
    (cache / "elsewhere.code").rename(compiled_file(cache))   # a symlink to it: not followed
    assert "facts" in ran_from_cache(tmp_path)


def test_a_miss_runs_nothing(cache, tmp_path):
    p = subprocess.run(agent.command(), input=agent.payload("facts", touching(tmp_path / "m"),
                                                            code=False),
                       capture_output=True, timeout=60)
    assert agent.parse(p.stdout, p.stderr, p.returncode)["need_code"]
    assert not (tmp_path / "m").exists()


def test_a_changed_cache_file_is_not_run_and_is_replaced(cache, tmp_path):
    conn = LocalConn()
    agent.call(conn, "facts", {})
    planted = tmp_path / "planted-ran"
    compiled_file(cache).unlink()          # the source is what is read, and checked
    cached_file(cache).write_text(f"open({str(planted)!r}, 'w').close()\n" + agent.source())
    answer = agent.call(conn, "facts", {})
    assert "facts" in answer and not planted.exists()
    assert conn.commands == 4 and "code" not in conn.sent[2] and conn.sent[3]["store"]
    assert cached_file(cache).read_text() == agent.source()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_cache_entry_that_is_not_a_regular_file_is_neither_followed_nor_waited_for(cache, kind):
    cache.mkdir(parents=True, mode=0o700)
    target = cached_file(cache)
    if kind == "symlink":
        genuine = cache.parent / "genuine.py"
        genuine.write_text(agent.source())
        target.symlink_to(genuine)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    p = subprocess.run(agent.command(), input=agent.payload("ping", {}, code=False),
                       capture_output=True, timeout=60)
    assert agent.parse(p.stdout, p.stderr, p.returncode)["need_code"]


@pytest.mark.parametrize("sha", ["../../../tmp/x", "A" * 64, "", "0" * 63])
def test_a_malformed_hash_never_becomes_a_path(cache, sha):
    doc = json.loads(agent.payload("ping", {}, code=False))
    doc["sha"] = sha
    p = subprocess.run(agent.command(), input=json.dumps(doc).encode(), capture_output=True,
                       timeout=60)
    assert agent.parse(p.stdout, p.stderr, p.returncode)["need_code"]


def test_a_cache_folder_others_can_write_is_not_written_and_the_agent_goes_every_exec(cache):
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    conn = LocalConn()
    answer = agent.call(conn, "ping", {})
    assert answer["pong"] and "not ours alone" in answer["cache"]["why"]
    assert not cached_file(cache).exists() and conn.agent_cache is None
    agent.call(conn, "ping", {})                     # no miss again: the source goes at once
    assert conn.commands == 3 and "code" in conn.sent[2] and "store" not in conn.sent[2]


def test_check_mode_uses_the_cache_but_never_writes_it(cache):
    conn = LocalConn()
    conn.agent_cache = False
    agent.call(conn, "ping", {})
    agent.call(conn, "ping", {})
    assert not cache.exists()
    assert conn.commands == 3 and "store" not in conn.sent[1] and "code" in conn.sent[2]
    agent.call(LocalConn(), "ping", {})              # a run that writes fills it
    conn = LocalConn()
    conn.agent_cache = False
    agent.call(conn, "ping", {})
    assert conn.commands == 1 and "code" not in conn.sent[0]


def test_each_agent_version_keeps_its_file_and_only_the_newest_are_kept(tmp_path):
    d = tmp_path / "agent"
    for i in range(remote.CACHE_KEEP + 3):
        code = f"# version {i}\n"
        sha = hashlib.sha256(code.encode()).hexdigest()
        compiled = compile(code, "v", "exec")
        assert remote.cache_self({"code": code, "sha": sha}, str(d), compiled) == {"cached": True}
        os.utime(d / f"{sha}.py", (1000 + i, 1000 + i))
    versions = sorted(p.read_text() for p in d.glob("*.py"))
    assert versions == sorted(f"# version {i}\n" for i in range(3, remote.CACHE_KEEP + 3))
    kept = {p.name.split(".")[0] for p in d.iterdir()}       # each with its compiled code only
    assert len(list(d.glob("*.code"))) == remote.CACHE_KEEP and len(kept) == remote.CACHE_KEEP
    wrong = remote.cache_self({"code": "x", "sha": "0" * 64}, str(d))
    assert not wrong["cached"] and len(list(d.iterdir())) == 2 * remote.CACHE_KEEP


def test_a_check_run_tells_its_connections_to_write_no_cache(tmp_path):
    (tmp_path / "roles" / "one").mkdir(parents=True)
    (tmp_path / "roles" / "one" / "defaults.yml").write_text("one_x: 1\n")
    (tmp_path / "roles" / "one" / "__init__.py").write_text("def resources(v, ctx):\n    return []\n")
    doc = {"env": "cachetest", "known_hosts": str(tmp_path / "known_hosts"), "ssh": {"user": "root"},
           "hosts": {"web1": {"address": "192.0.2.1"}},
           "groups": {"all": {"hosts": ["web1"], "roles": ["one"]}}}
    (tmp_path / "cachetest.yml").write_text(json.dumps(doc))
    inv = load_inventory_file(tmp_path / "cachetest.yml", roles_root=[tmp_path / "roles"])
    seen = []

    class Conn(SimpleNamespace):
        def open(self):
            pass

        def close(self):
            pass

        def run(self, argv, stdin=None, **kw):
            seen.append(self.agent_cache)
            self.commands += 1
            op = json.loads(stdin)["op"]
            body = {"facts": {"os": {"id": "debian", "version_id": "12"}}} if op == "facts" else {}
            body["agent"] = {"version": agent.PROTOCOL}
            return Result(0, agent.MARKER + json.dumps(body).encode(), b"", 0.0)

    for check in (True, False):
        seen.clear()
        events = Events(task="provision", env=inv.env, json_out=True, verbose=0, diff=False,
                        check=check, stream_out=io.StringIO(), stream_err=io.StringIO())
        Runner(inv, events, Options(), connect=lambda h: Conn(commands=0, agent_cache=True)) \
            .run(inv.select(None))
        assert seen and set(seen) == {not check}


def test_modules_in_the_login_directory_are_never_imported(tmp_path):
    """python3 -I: sudo keeps the login user's directory as the working directory, which
    `python3 -c` would put first on sys.path: a json.py there would run as root."""
    (tmp_path / "json.py").write_text(f"open({str(tmp_path / 'planted-ran')!r}, 'w').close()\n")
    p = subprocess.run(agent.command(), input=agent.payload("ping", {}), capture_output=True,
                       timeout=60, cwd=tmp_path)
    assert agent.parse(p.stdout, p.stderr, p.returncode)["pong"]
    assert not (tmp_path / "planted-ran").exists()

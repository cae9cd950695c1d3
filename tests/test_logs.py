"""`invoke logs`, pure: the reader (the script the servers run, fed on stdin) on this machine
over a pm2 log folder made here, the redaction and escape stripping, the merge by time across
hosts, --follow ending when the controller closes the exec, and bad flags refused."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from engine_helpers import REPO
from provisioner import logs
from provisioner.cli.logs import Stream
from provisioner.errors import InputError
from provisioner.inventory import load_inventory_file
from provisioner.secret import Secret

SECRET = "logs-secret-Value-0042"


def reader(cfg: dict, **kw):
    argv = logs.reader_argv(cfg)
    return subprocess.Popen([sys.executable, *argv[1:]], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def pm2_home(tmp_path, lines: list[str]):
    (tmp_path / ".pm2" / "logs").mkdir(parents=True)
    (tmp_path / ".pm2" / "logs" / "sample-out.log").write_text("".join(l + "\n" for l in lines))
    return {"since": 3600, "units": [], "grep": None, "follow": False,
            "app": {"name": "sample", "home": str(tmp_path), "unit": "pm2-app.service"}}


def test_the_reader_gives_timed_lines_and_the_merge_orders_hosts_by_time(tmp_path):
    now = time.time()
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"
    cfg = pm2_home(tmp_path, [f"{iso(now - 30)}: listening", f"{iso(now - 10)}: GET /health 200",
                              f"{iso(now - 99999)}: too old"])
    p = reader(cfg)
    out, err = p.communicate(logs.READER, timeout=30)
    assert p.returncode == 0, err
    entries = [logs.parse(line) for line in out.splitlines()]
    assert [e["msg"] for e in entries] == ["listening", "GET /health 200"]
    assert entries[0]["src"] == "sample[out]" and abs(entries[0]["ts"] - (now - 30)) < 2
    other = [{"ts": now - 20, "src": "nginx.service", "msg": "reload"}]
    order = [(h, e["msg"]) for h, e in logs.merged({"web1": entries, "lb1": other})]
    assert order == [("web1", "listening"), ("lb1", "reload"), ("web1", "GET /health 200")]


def test_grep_filters_on_the_server(tmp_path):
    cfg = dict(pm2_home(tmp_path, ["2026-12-01T10:00:00Z: ok", "2026-12-01T10:00:01Z: ERROR x"]),
               grep="ERROR", since=10 ** 9)
    p = reader(cfg)
    out, _ = p.communicate(logs.READER, timeout=30)
    assert [logs.parse(l)["msg"] for l in out.splitlines()] == ["ERROR x"]


def test_secrets_and_escape_codes_never_reach_the_terminal(forget_secrets):
    Secret(SECRET)                                 # registered with the redactor, as the vault does
    line = logs.format_line("web1", {"ts": 0, "src": "app\x1b[31m", "msg": f"pw={SECRET} \x1b[0mok\x07"})
    assert SECRET not in line and "\x1b" not in line and "\x07" not in line
    assert line == "web1 1970-01-01T00:00:00.000Z app: pw=*** ok"


def test_follow_streams_new_lines_and_ends_when_the_exec_is_closed(tmp_path):
    cfg = dict(pm2_home(tmp_path, []), follow=True)
    p = reader(cfg)
    p.stdin.write(logs.READER)
    p.stdin.close()
    time.sleep(1.5)
    with open(tmp_path / ".pm2" / "logs" / "sample-out.log", "a") as f:
        f.write("2026-12-01T10:00:00Z: new line\n")
    first = logs.parse(p.stdout.readline())
    assert first["msg"] == "new line"
    p.stdout.close()                               # what closing the SSH exec does
    assert p.wait(timeout=15) == 0


def test_stream_splits_chunks_into_entries():
    got = []
    s = Stream("web1", lambda host, e: got.append((host, e["msg"])))
    s(b'{"ts": 1, "src": "a", "msg": "one"}\n{"ts": 2, "sr')
    s(b'c": "a", "msg": "two"}\n{}\n')
    assert got == [("web1", "one"), ("web1", "two")]


@pytest.mark.parametrize("kw,flag", [
    ({"since": "1 hour"}, "--since"), ({"unit": "ngi nx"}, "--unit"), ({"grep": "("}, "--grep"),
    ({"app": "sample", "unit": "nginx"}, "--app"),
])
def test_bad_flags_are_refused_naming_the_flag(kw, flag):
    inv = load_inventory_file(REPO / "inventories" / "local.yml")
    args = {"since": "1h", "app": None, "unit": None, "grep": None, "follow": False, **kw}
    with pytest.raises(InputError, match=flag.lstrip("-")):
        logs.reader_config(inv, inv.hosts["web1"], **args)


def test_an_app_is_read_only_where_pm2_runs_it():
    inv = load_inventory_file(REPO / "inventories" / "local.yml")
    args = {"since": "2h", "app": "sample", "unit": None, "grep": None, "follow": False}
    assert logs.reader_config(inv, inv.hosts["db1"], **args) is None
    cfg = logs.reader_config(inv, inv.hosts["web2"], **args)
    assert cfg["since"] == 7200 and cfg["app"] == {"name": "sample", "home": "/home/app",
                                                   "unit": "pm2-app.service"}


class FollowedChannel:
    """A channel that streams two chunks, then is closed by the controller (Ctrl-C): no exit
    status and no EOF ever arrive."""

    def __init__(self):
        self.chunks = [b'{"ts": 1, "src": "a", "msg": "one"}\n', b'{"ts": 2, "src": "a", "msg": "two"}\n']
        self.closed = False

    def exec_command(self, command):
        self.command = command

    def sendall(self, data):
        pass

    def shutdown_write(self):
        pass

    def recv_ready(self):
        return bool(self.chunks)

    def recv(self, n):
        chunk = self.chunks.pop(0)
        if not self.chunks:
            self.closed = True
        return chunk

    recv_stderr_ready = lambda self: False      # noqa: E731
    exit_status_ready = lambda self: self.closed  # noqa: E731 (paramiko: closed counts as ready)
    eof_received = False

    def recv_exit_status(self):
        return -1

    def close(self):
        pass


def test_a_streamed_exec_hands_on_every_chunk_and_ends_when_its_channel_closes():
    from types import SimpleNamespace
    from provisioner.connection import Connection
    host = SimpleNamespace(name="h1", address="192.0.2.10", port=22, user="root",
                           command_timeout=10, connect_timeout=5)
    conn = Connection(host, "/nonexistent")
    conn.open = lambda: None
    chan = FollowedChannel()
    conn._conn = SimpleNamespace(transport=SimpleNamespace(open_session=lambda timeout: chan))
    got = []
    r = conn.run(["python3", "-"], stdin=b"", on_stdout=Stream("h1", lambda h, e: got.append(e["msg"])),
                 timeout=10 * 365 * 86400.0)
    assert got == ["one", "two"] and r.stdout == b"" and r.rc == -1

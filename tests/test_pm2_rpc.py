"""pm2_processes (provisioner/remote/pm2.py): pm2's process list asked of its daemon over its
RPC socket, as pm2's own client frames it, and `pm2 jlist` only when the socket does not answer
so; a socket that is not the user's own, or reached through a symlink, is never talked to."""
from __future__ import annotations

import getpass
import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from fake_pm2 import jlist_output, pm2_host, proc
from provisioner.remote.pm2 import pm2_processes

APPS = [proc("sample", 0), proc("pm2-logrotate", 1, module=True)]
FROM_JLIST = [proc("from-jlist", 0)]


def frame(*args: bytes) -> bytes:
    return bytes([0x10 | len(args)]) + b"".join(struct.pack(">I", len(a)) + a for a in args)


def read_frame(conn) -> list[bytes]:
    data = b""
    while True:                          # the client sends one frame, then waits
        chunk = conn.recv(1 << 16)
        data += chunk
        argc, pos, args = data[0] & 0x0F, 1, []
        try:
            for _ in range(argc):
                n = struct.unpack(">I", data[pos:pos + 4])[0]
                if len(data) < pos + 4 + n:
                    raise IndexError
                args.append(data[pos + 4:pos + 4 + n])
                pos += 4 + n
            return args
        except (IndexError, struct.error):
            if not chunk:
                raise


class Daemon:
    """pm2's RPC end on <home>/.pm2/rpc.sock: answers getMonitorData with `procs` as pm2 6 does
    ([j:{"args": [list]}, s:<id>]), or with `reply` bytes when given. Records each request."""

    def __init__(self, path: Path, procs: list | None = None, reply: bytes | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.procs, self.reply, self.requests = path, procs, reply, []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(10)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    args = read_frame(conn)
                    self.requests.append(args)
                    answer = self.reply if self.reply is not None else frame(
                        b"j:" + json.dumps({"args": [self.procs]}).encode(), args[-1])
                    conn.sendall(answer)
        except OSError:
            pass


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A home with .pm2 in it, and `pm2 jlist` (runuser) listing FROM_JLIST."""
    monkeypatch.setenv("PATH", f"{pm2_host(tmp_path, jlist_output(FROM_JLIST))}:/usr/bin:/bin")
    return tmp_path / "home"


def test_the_list_comes_from_the_daemons_socket_with_the_call_pm2_jlist_makes(host):
    daemon = Daemon(host / ".pm2" / "rpc.sock", APPS)
    assert pm2_processes(getpass.getuser(), str(host)) == APPS
    (call, ident), = daemon.requests
    assert json.loads(call[2:]) == {"type": "call", "method": "getMonitorData", "args": [{}]}
    assert call.startswith(b"j:") and ident.startswith(b"s:")


def test_without_a_daemon_socket_pm2_jlist_is_asked(host):
    (host / ".pm2").mkdir(parents=True)
    assert pm2_processes(getpass.getuser(), str(host)) == FROM_JLIST


@pytest.mark.parametrize("answer", [b"", frame(b"s:nonsense"), frame(b'j:{"error": "no"}'),
                                    b"\x12\x00\x00"])
def test_a_socket_that_does_not_answer_as_pm2_does_falls_back_to_pm2_jlist(host, answer):
    Daemon(host / ".pm2" / "rpc.sock", reply=answer)
    assert pm2_processes(getpass.getuser(), str(host)) == FROM_JLIST


def test_a_symlink_in_place_of_the_socket_is_never_followed(host, tmp_path):
    elsewhere = Daemon(tmp_path / "other" / "root.sock", APPS)
    (host / ".pm2").mkdir(parents=True)
    (host / ".pm2" / "rpc.sock").symlink_to(elsewhere.path)
    assert pm2_processes(getpass.getuser(), str(host)) == FROM_JLIST
    assert elsewhere.requests == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to another user needs root")
def test_a_socket_of_another_user_is_never_talked_to(host):
    daemon = Daemon(host / ".pm2" / "rpc.sock", APPS)
    os.chown(daemon.path, 65534, 65534)
    assert pm2_processes(getpass.getuser(), str(host)) == FROM_JLIST
    assert daemon.requests == []

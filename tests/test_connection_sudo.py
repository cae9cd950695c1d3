"""How a connection talks to `sudo -S` (pure: a scripted channel plays sudo and the command).

The password must go only to a prompt sudo really shows: once harden's sudoers gives NOPASSWD,
sudo asks nothing, and a password line sent anyway became the start of the agent's request."""
from __future__ import annotations

import os
import shlex
from types import SimpleNamespace

import pytest

from provisioner.connection import Connection
from provisioner.secret import Secret

PASSWORD = "sudo-Pw-83kd-secret"


class ScriptedSudo:
    """A channel whose far end is sudo (asking for a password or not) running a command that
    echoes its whole stdin."""

    def __init__(self, asks: bool, accepts: bool = True):
        self.asks, self.accepts = asks, accepts
        self.stdin, self.out, self.err = bytearray(), bytearray(), bytearray()
        self.eof = self.done = False
        self.state = "start"
        self.r, self.w = os.pipe()
        os.write(self.w, b"x")                           # always "readable": the loop polls

    def exec_command(self, command):
        argv = shlex.split(command)
        assert argv[0] == "sudo" and "-S" in argv
        self.prompt = argv[argv.index("-p") + 1].encode()
        self.ready = argv[argv.index("sh") + 3].encode() if "sh" in argv else b""
        self.step()

    def step(self):
        if self.state == "start":
            if self.asks:
                self.err += self.prompt
                self.state = "asked"
            else:
                self.err += self.ready
                self.state = "running"
        elif self.state == "asked" and b"\n" in self.stdin:
            line, _, rest = bytes(self.stdin).partition(b"\n")
            self.stdin = bytearray(rest)
            if line.decode() == PASSWORD and self.accepts:
                self.err += self.ready
                self.state = "running"
            else:
                self.err += b"Sorry, try again.\n" + self.prompt
                self.state = "asked-again"
        elif self.state == "asked-again" and self.eof:
            self.err += b"sudo: no password was provided\n"
            self.rc, self.done = 1, True
        elif self.state == "running" and self.eof:
            self.out += b"command read: " + bytes(self.stdin)
            self.rc, self.done = 0, True

    def sendall(self, data):
        self.stdin += bytes(data)
        self.step()

    def shutdown_write(self):
        self.eof = True
        self.step()

    def recv_ready(self):
        return bool(self.out)

    def recv_stderr_ready(self):
        return bool(self.err)

    def recv(self, n):
        data, self.out = bytes(self.out), bytearray()
        return data

    def recv_stderr(self, n):
        data, self.err = bytes(self.err), bytearray()
        return data

    def exit_status_ready(self):
        return self.done

    eof_received = property(lambda self: self.done)
    closed = False

    def recv_exit_status(self):
        return self.rc

    def fileno(self):
        return self.r

    def close(self):
        os.close(self.r)
        os.close(self.w)


def _run(channel):
    host = SimpleNamespace(name="h1", address="192.0.2.10", port=22, user="ops", command_timeout=10,
                           connect_timeout=5)
    conn = Connection(host, "/nonexistent", Secret(PASSWORD, register=False))
    conn.open = lambda: None
    conn._conn = SimpleNamespace(transport=SimpleNamespace(open_session=lambda timeout: channel))
    return conn.run(["python3", "-c", "agent"], stdin=b'{"op": "ping"}')


def test_no_password_is_sent_when_sudo_does_not_ask():
    r = _run(ScriptedSudo(asks=False))
    assert r.rc == 0
    assert r.stdout == b'command read: {"op": "ping"}'       # the request, and nothing before it
    assert r.stderr == b""                                       # our tokens are not output


def test_the_password_goes_to_sudo_and_the_request_to_the_command():
    r = _run(ScriptedSudo(asks=True))
    assert r.rc == 0
    assert r.stdout == b'command read: {"op": "ping"}'
    assert PASSWORD.encode() not in r.stdout + r.stderr


def test_a_wrong_password_is_sent_once_and_the_command_never_gets_the_request():
    r = _run(ScriptedSudo(asks=True, accepts=False))
    assert r.rc == 1
    assert b"command read" not in r.stdout
    assert b"Sorry, try again." in r.stderr and b"[provisioner-" not in r.stderr

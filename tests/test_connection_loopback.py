"""Connections against the loopback SSH peers of tests/sshpeers.py: each SSH packet leaves at
once (TCP_NODELAY on the TCP socket that carries the connection) and paramiko's transport threads
wake seldom once connected, directly and behind a jump host, where commands still run; AES-GCM
is chosen where the server has it; the login key file is read once for all connections; the
handshake and the login are waited for without polling, and end as paramiko's did; a host key
that is not on record is refused (the live tests check a changed one)."""
from __future__ import annotations

import os
import socket
import threading
import time
from types import SimpleNamespace

import paramiko
import pytest

from provisioner import connection
from provisioner.connection import IDLE_POLL, Connection, HostKeyError, Unreachable
from sshpeers import SshServer, ed25519_key, known_line, write_private_key


def _host(port: int, key, jump=None):
    return SimpleNamespace(name="web1", address="127.0.0.1", port=port, user="root", key=key,
                           jump=jump, connect_timeout=5, command_timeout=10)


def _jump_to(tmp_path, jump: SshServer, jump_key, web: SshServer, web_key, key=None):
    """known_hosts (tmp_path/known) with both servers' keys; the jump host, as a host's `jump`."""
    (tmp_path / "known").write_text(known_line(f"[127.0.0.1]:{jump.port}", jump_key) +
                                    known_line(f"[127.0.0.1]:{web.port}", web_key))
    return SimpleNamespace(name="jump", address="127.0.0.1", port=jump.port, user="jump",
                           key=key, connect_timeout=5)


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_the_ssh_socket_sends_without_delay_and_wakes_its_thread_seldom(tmp_path):
    host_key, client_key = ed25519_key(), paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    with SshServer(host_key) as server:
        (tmp_path / "known").write_text(known_line(f"[127.0.0.1]:{server.port}", host_key))
        with Connection(_host(server.port, tmp_path / "id"), tmp_path / "known") as conn:
            conn.open()
            assert _nodelay(conn._conn.transport.sock)
            assert conn._conn.transport.sock.gettimeout() == IDLE_POLL > 0.1


def test_behind_a_jump_host_the_jump_host_s_socket_sends_without_delay(tmp_path):
    """...and both transport threads (ours reads a channel of the jump host's) wake seldom; the
    jump host's connection is closed with ours (Fabric's Connection left it open)."""
    jump_key, web_key, client_key = ed25519_key(), ed25519_key(), paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    with SshServer(jump_key, jump=True) as jump, SshServer(web_key) as web:
        via = _jump_to(tmp_path, jump, jump_key, web, web_key)
        with Connection(_host(web.port, tmp_path / "id", via), tmp_path / "known") as conn:
            conn.open()
            assert jump.forwarded == [("127.0.0.1", web.port)]
            assert isinstance(conn._conn.transport.sock, paramiko.Channel)   # inside the jump's
            assert _nodelay(conn._conn.gateway.transport.sock)
            assert conn._conn.transport.sock.gettimeout() == IDLE_POLL
            assert conn._conn.gateway.transport.sock.gettimeout() == IDLE_POLL
            gateway = conn._conn.gateway.transport
        assert not gateway.is_active()             # closed with the host's: no connection left


def test_an_unknown_host_key_is_refused_with_its_fingerprint(tmp_path):
    client_key = paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    with SshServer(ed25519_key()) as server:
        (tmp_path / "known").write_text(known_line("[127.0.0.1]:1", ed25519_key()))
        with Connection(_host(server.port, tmp_path / "id"), tmp_path / "known") as conn:
            with pytest.raises(HostKeyError, match="unknown host key \\(ssh-ed25519 SHA256:"):
                conn.open()
            assert conn._conn is None


def _reverse(command: str, stdin: bytes) -> tuple[int, bytes]:
    return (3 if command == "fail" else 0), stdin[::-1]


@pytest.mark.parametrize("via_jump", [False, True])
def test_commands_run_on_a_connection_that_is_up(tmp_path, via_jump, monkeypatch):
    """Its transport thread still takes each packet as it comes; stdin, stdout and the exit
    status travel whole, a command after another on the same connection. No Invoke Config is
    built for a connection (Fabric's Connection built one each: ~1 ms of CPU per host)."""
    import invoke.config
    built = []
    config_init = invoke.config.Config.__init__
    monkeypatch.setattr(invoke.config.Config, "__init__",
                        lambda self, *a, **kw: built.append(1) or config_init(self, *a, **kw))
    jump_key, web_key, client_key = ed25519_key(), ed25519_key(), paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    with SshServer(jump_key, jump=True) as jump, SshServer(web_key, execs=_reverse) as web:
        via = _jump_to(tmp_path, jump, jump_key, web, web_key, tmp_path / "id")
        if not via_jump:
            via = None
        with Connection(_host(web.port, tmp_path / "id", via), tmp_path / "known") as conn:
            data = bytes(range(256)) * 400                        # a few packets' worth
            r = conn.run(["cat"], stdin=data)
            assert (r.rc, r.stdout) == (0, data[::-1])
            r = conn.run(["fail"], stdin=b"abc")
            assert (r.rc, r.stdout, conn.commands) == (3, b"cba", 2)
    assert built == []


@pytest.mark.parametrize("offered, chosen", [
    (None, "aes128-gcm@openssh.com"),                  # paramiko's server offers ctr first
    (("aes256-ctr", "aes128-ctr", "aes256-gcm@openssh.com"), "aes256-gcm@openssh.com"),
    (("aes256-ctr", "aes128-ctr"), "aes128-ctr"),       # no GCM: paramiko's own order
])
def test_aes_gcm_is_chosen_where_the_server_has_it(tmp_path, offered, chosen):
    host_key, client_key = ed25519_key(), paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    with SshServer(host_key, execs=_reverse, ciphers=offered) as server:
        (tmp_path / "known").write_text(known_line(f"[127.0.0.1]:{server.port}", host_key))
        with Connection(_host(server.port, tmp_path / "id"), tmp_path / "known") as conn:
            assert conn.run(["cat"], stdin=b"gcm").stdout == b"mcg"
            t = conn._conn.transport
            assert (t.local_cipher, t.remote_cipher) == (chosen, chosen)
            assert server.transports[0].local_cipher == chosen


def test_the_login_key_file_is_read_once_for_all_connections(tmp_path):
    """...and again once it changes; one that does not load without a passphrase, or is
    missing, is left to paramiko, as before (which then tries the SSH agent, or says why)."""
    host_key = ed25519_key()
    first, second = ed25519_key(tmp_path / "id"), None
    connection._loaded_key.cache_clear()
    with SshServer(host_key) as server:
        (tmp_path / "known").write_text(known_line(f"[127.0.0.1]:{server.port}", host_key))
        host = _host(server.port, tmp_path / "id")
        for _ in range(3):
            with Connection(host, tmp_path / "known") as conn:
                conn.open()
        assert connection._loaded_key.cache_info().misses == 1
        second = ed25519_key(tmp_path / "id")
        os.utime(tmp_path / "id", ns=(1, 1))              # another version, whatever the clock
        with Connection(host, tmp_path / "known") as conn:
            conn.open()
    assert [(user, key.asbytes()) for user, key in server.logins] == \
        [("root", first.asbytes())] * 3 + [("root", second.asbytes())]
    paramiko.ECDSAKey.generate().write_private_key_file(str(tmp_path / "locked"), password="pw")
    assert connection._client_key(tmp_path / "locked") is None
    assert connection._client_key(tmp_path / "missing") is None


def test_a_late_banner_and_the_login_are_waited_for_without_polling(tmp_path, monkeypatch):
    """paramiko waited for the key exchange and the login in turns of Event.wait(0.1), each a
    wake-up that costs CPU; ours wait once each. Its transport thread, until connected, wakes
    in steps that divide the connect timeout (a missing banner is noticed after it, exactly)."""
    host_key, client_key = ed25519_key(), paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    waits = []
    wait = threading.Event.wait
    monkeypatch.setattr(threading.Event, "wait", lambda self, timeout=None: waits.append(
        (threading.get_ident(), timeout)) or wait(self, timeout))
    with SshServer(host_key, greeting=0.3) as server:
        (tmp_path / "known").write_text(known_line(f"[127.0.0.1]:{server.port}", host_key))
        host = _host(server.port, tmp_path / "id")
        host.connect_timeout = 2.5
        with Connection(host, tmp_path / "known") as conn:
            started = time.monotonic()
            conn.open()
            assert time.monotonic() - started >= 0.3
            assert conn._conn.transport.is_authenticated()
    mine = [timeout for thread, timeout in waits if thread == threading.get_ident()]
    assert mine.count(2.5) == 2                            # the exchange's, the login's
    assert mine.count(0.1) <= 1          # paramiko's check of how the login ended: already set
    assert connection._handshake_poll(2.5) == 2.5 / 3 and connection._handshake_poll(10) == 1
    assert connection._handshake_poll(0.5) == 0.5


def test_a_refused_login_and_a_server_gone_in_the_handshake_end_as_before(tmp_path):
    """...and leave nothing open: behind a jump host, the jump host's connection is closed."""
    jump_key, host_key, client_key = ed25519_key(), ed25519_key(), paramiko.ECDSAKey.generate()
    write_private_key(client_key, tmp_path / "id")
    with SshServer(jump_key, jump=True) as jump, SshServer(host_key, refuse=True) as server:
        via = _jump_to(tmp_path, jump, jump_key, server, host_key, tmp_path / "id")
        with Connection(_host(server.port, tmp_path / "id", via), tmp_path / "known") as conn:
            with pytest.raises(Unreachable, match="authentication failed"):
                conn.open()
        deadline = time.monotonic() + 5
        while jump.transports[0].is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not jump.transports[0].is_active()
    assert len(server.logins) == 1
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def hang_up_after_the_banner():
        while True:
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            peer.sendall(b"SSH-2.0-gone\r\n")
            peer.close()
    threading.Thread(target=hang_up_after_the_banner, daemon=True).start()
    try:
        gone = _host(listener.getsockname()[1], tmp_path / "id")
        with pytest.raises(Unreachable, match="closed the connection during the SSH handshake"):
            connection.Connection(gone, tmp_path / "known").open()
    finally:
        listener.close()

"""Test peers on loopback for the command line's connection paths, no testbed needed: a port that
accepts TCP and says nothing, and a small SSH server (paramiko's server side) that presents
given host keys, accepts any public key, as a jump host carries direct-tcpip channels, and runs
execs through a function of the test's."""
from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def ed25519_key(path=None) -> paramiko.PKey:
    """A new ed25519 key; with `path`, also written there as an OpenSSH private key file (as
    `ssh-keygen -t ed25519` writes the testbed's client key)."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    if path is not None:
        Path(path).write_text(pem)
        Path(path).chmod(0o600)
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem))


def write_private_key(key: paramiko.PKey, path) -> None:
    """An OpenSSH private key file paramiko reads back (for the client side of a test)."""
    if isinstance(key, paramiko.Ed25519Key):
        raise ValueError("paramiko cannot write ed25519 keys: use ed25519_key(path)")
    key.write_private_key_file(str(path))


def closed_port() -> int:
    """A loopback port nothing listens on (just released by us)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def known_line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


class _Listener:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        """Keep the connection open and say nothing."""

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Silent(_Listener):
    """Accepts TCP and never sends an SSH banner (a wrong port, a hung daemon)."""


class _Iface(paramiko.ServerInterface):
    def __init__(self, execs=None, logins=None, refuse: bool = False) -> None:
        self.destinations: dict[int, tuple[str, int]] = {}
        self.execs, self.logins = execs, logins if logins is not None else []
        self.refuse = refuse

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        self.logins.append((username, key))
        return paramiko.AUTH_FAILED if self.refuse else paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED if kind == "direct-tcpip" or \
            (kind == "session" and self.execs is not None) else \
            paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        if self.execs is None:
            return False
        threading.Thread(target=_exec, args=(channel, command.decode(), self.execs),
                         daemon=True).start()
        return True

    def check_channel_direct_tcpip_request(self, chanid, origin, destination):
        self.destinations[chanid] = destination
        return paramiko.OPEN_SUCCEEDED


class SshServer(_Listener):
    """Presents `keys` as its host keys; with `jump`, forwards direct-tcpip channels (and lists
    where to in `forwarded`); with `execs`, runs each exec as execs(command, stdin) -> (exit
    status, stdout), once the client has closed stdin; with `ciphers`, offers only those; with
    `greeting`, sends its banner that many seconds late; with `refuse`, refuses every key.
    `transports` holds the server side of each connection (what was negotiated), `logins` the
    user and public key of each login."""

    def __init__(self, *keys: paramiko.PKey, jump: bool = False, execs=None,
                 ciphers: tuple[str, ...] | None = None, greeting: float = 0.0,
                 refuse: bool = False) -> None:
        self.keys, self.jump, self.execs, self.ciphers = keys, jump, execs, ciphers
        self.greeting, self.refuse = greeting, refuse
        self.transports: list[paramiko.Transport] = []
        self.logins: list[tuple[str, paramiko.PKey]] = []
        self.forwarded: list[tuple[str, int]] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        time.sleep(self.greeting)
        t = paramiko.Transport(conn)
        self.transports.append(t)
        for k in self.keys:
            t.add_server_key(k)
        if self.ciphers:
            t.get_security_options().ciphers = self.ciphers
        iface = _Iface(self.execs, self.logins, self.refuse)
        try:
            t.start_server(server=iface)
        except (paramiko.SSHException, EOFError, OSError):
            return
        while self.jump and t.is_active():
            chan = t.accept(timeout=1)
            if chan is not None:
                dest = iface.destinations[chan.get_id()]
                self.forwarded.append(dest)
                threading.Thread(target=_forward, args=(chan, dest), daemon=True).start()


def _exec(chan: paramiko.Channel, command: str, execs) -> None:
    stdin = bytearray()
    try:
        while data := chan.recv(65536):
            stdin += data
        rc, stdout = execs(command, bytes(stdin))
        chan.sendall(stdout)
        chan.send_exit_status(rc)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:                            # the client waits for the close, even after a bug here
        chan.close()


def _forward(chan: paramiko.Channel, dest: tuple[str, int]) -> None:
    def pump(recv, send) -> None:
        try:
            while data := recv(65536):
                send(data)
        except OSError:
            pass
    with socket.create_connection(dest, timeout=5) as sock:
        back = threading.Thread(target=pump, args=(sock.recv, chan.sendall), daemon=True)
        back.start()
        pump(chan.recv, sock.sendall)
        back.join(timeout=5)
    chan.close()

"""SSH connections on paramiko, made strict: one per host for the whole run.

Only the environment's own known_hosts counts (not ~/.ssh/known_hosts nor ~/.ssh/config),
unknown keys are rejected and a changed key is refused with both fingerprints. Commands are argv
lists; their data (agent source, file contents, secrets) travels on stdin, never on the command
line.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import logging
import math
import os
import secrets
import select
import shlex
import socket
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner.secret import Secret

if TYPE_CHECKING:
    import paramiko

# paramiko is imported where a connection is made or its errors are told apart: the tasks that
# touch no server (`invoke check`, ...) do not load it, and roles import this module (through
# provisioner.api) for their guards.

RETRIES = 2              # extra connection attempts on transient network errors
RETRY_DELAY = 1.0
# what a server may send back for one command: the agent's answers are far smaller (facts carry
# at most 256 KiB per file); a broken or hostile server must not fill the controller's memory
MAX_STDOUT = 256 * 1024 * 1024
MAX_STDERR = 1024 * 1024       # only its tail is kept
# paramiko's transport thread waits for the server's packets in recv() with a 0.1 s timeout, and
# on each timeout looks whether the connection was closed, a keepalive is due or the banner is
# late: ~50-100 us of CPU per wake-up, 0.5-1 ms per host per second a connection lives or waits
# for a busy sshd (50 hosts at once on the testbed live seconds). Ours wake every IDLE_POLL
# seconds once connected, and during the handshake in the longest step of at most IDLE_POLL that
# divides the connect timeout (the banner's: a missing banner is still noticed after exactly that
# timeout). Packets still wake them at once; a close is seen within IDLE_POLL (nothing waits for
# it); keepalives (15 s) stay on time.
IDLE_POLL = 1.0

# paramiko logs a failed handshake (a port that sends no SSH banner ...) with its traceback from
# its transport thread; without a handler of ours Python prints that on stderr, inside the live
# view and beside --json. The error itself reaches us as an exception, described below.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class Unreachable(Exception):
    """The host could not be reached or refused us: the message says why and what to do."""


class HostKeyError(Unreachable):
    """Unknown or changed host key: never connect, say how to check and trust it."""


@dataclass
class Result:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def connect_error(e: BaseException, address: str, port: int, timeout: float) -> str:
    """Why a TCP/SSH connection to address:port failed, and what to check, in one sentence."""
    import paramiko
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        e = next(iter(e.errors.values()))                # one per address family; same cause
    code = getattr(e, "errno", None)
    if isinstance(e, socket.gaierror):
        return (f"cannot resolve {address!r} ({e.strerror}): check the address in the inventory "
                "and this machine's DNS")
    if isinstance(e, (socket.timeout, TimeoutError)) or code == errno.ETIMEDOUT:
        return (f"no answer from {address} port {port} within {timeout:g} s: the server is down, "
                "or a firewall drops the packets; check the address, the port and the firewall")
    if code == errno.ECONNREFUSED:
        return (f"connection refused by {address} port {port}: no SSH server listens there; check "
                "the port in the inventory and that sshd runs")
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return (f"{address} port {port}: {e.strerror or 'no route to host'}: the address is wrong, "
                "the server is down, or this machine has no route to its network")
    if isinstance(e, paramiko.ChannelException):       # from a jump host
        return (f"the jump host could not open a connection to {address} port {port} "
                f"({e.text}): check the address and port, and the jump host's own network")
    if isinstance(e, paramiko.SSHException) and "banner" in str(e):
        return (f"{address} port {port} accepts TCP but sends no SSH banner: another service "
                "listens on that port, or sshd is overloaded; check the port in the inventory")
    if isinstance(e, (EOFError, ConnectionResetError)) or code in (errno.ECONNRESET, errno.EPIPE):
        return (f"{address} port {port} closed the connection during the SSH handshake: sshd "
                "refused us (MaxStartups, a ban by fail2ban, AllowUsers/AllowGroups?)")
    what = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return f"{address} port {port}: {what}"


def _as_seen(conn: _Ssh, e: BaseException) -> BaseException:
    """paramiko sometimes reports a handshake that never got the server's banner as "No
    existing session" (its transport thread lost a race with the timeout): say what was seen."""
    import paramiko
    t = conn.client.get_transport()
    if isinstance(e, paramiko.SSHException) and "banner" not in str(e) and t is not None \
            and not t.remote_version:
        return paramiko.SSHException(f"Error reading SSH protocol banner ({e})")
    return e


class _Reject:
    """paramiko's missing host key policy (it calls missing_host_key): never accept."""

    def __init__(self, label: str, known_hosts: Path):
        self.label, self.known_hosts = label, known_hosts

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(
            f"{self.label}: unknown host key ({key.get_name()} {fingerprint(key)}), not in "
            f"{self.known_hosts}. Check the fingerprint with the server's provider or console "
            f"(`ssh-keygen -lf /etc/ssh/ssh_host_{key.get_name().split('-')[-1]}_key.pub`), then "
            "run `invoke hosts.trust --env ENV` to record it.")


@lru_cache(maxsize=8)
def _known_lines(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """(hostnames field, line) of each entry of a known_hosts file, read once per version."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f]
    return tuple((line.split(None, 1)[0], line) for line in lines
                 if line and not line.startswith("#"))


def _names_match(field: str, name: str) -> bool:
    """Does a hostnames field (comma-separated, plain or hashed |1|salt|hash) hold `name`? As
    paramiko matches them (no patterns)."""
    import paramiko
    return any(h == name or (h.startswith("|1|") and paramiko.HostKeys.hash_host(name, h) == h)
               for h in field.split(","))


def host_keys_for(known_hosts: Path, host: str, port: int) -> paramiko.HostKeys:
    """The entries of known_hosts for one server, as paramiko would look them up. paramiko's
    HostKeys.load parses every key in the file and checks each entry against all entries before
    it: per connection, quadratic in the file's length (most of a converged run's controller
    CPU per host on 50 servers). Only this server's lines are parsed here."""
    import paramiko
    keys = paramiko.HostKeys()
    try:
        st = known_hosts.stat()
    except FileNotFoundError:
        return keys
    name = host if port == 22 else f"[{host}]:{port}"
    for field, line in _known_lines(str(known_hosts), st.st_mtime_ns, st.st_size):
        if _names_match(field, name):
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            if entry is not None:
                keys.add(name, entry.key.get_name(), entry.key)
    return keys


def _handshake_poll(timeout: float) -> float:
    """How often a transport thread wakes until connected (see IDLE_POLL)."""
    return timeout / max(1, math.ceil(timeout / IDLE_POLL)) if timeout else 0.1


def _client_key(path) -> paramiko.PKey | None:
    """The private key file at `path` loaded as SSHClient's key_filename would load it (RSA,
    ECDSA or Ed25519, its -cert.pub beside it if there is one), once per version of the files
    for all connections: SSHClient read and parsed it for every connection, trying each key
    type in turn (~0.13 ms). None when it cannot be loaded so (missing, needs a passphrase):
    then SSHClient tries the file itself, and says why it fails, as before."""
    def version(p: str) -> tuple[int, int] | None:
        try:
            st = os.stat(p)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size
    path = str(path)
    key = version(path)
    return _loaded_key(path, key, version(path + "-cert.pub")) if key else None


@lru_cache(maxsize=8)
def _loaded_key(path: str, version: tuple, cert: tuple | None) -> paramiko.PKey | None:
    import paramiko
    for kind in (paramiko.RSAKey, paramiko.ECDSAKey, paramiko.Ed25519Key):
        try:
            key = kind.from_private_key_file(path)
        except (paramiko.SSHException, OSError, ValueError):
            continue
        if cert is not None:
            key.load_certificate(path + "-cert.pub")
        return key
    return None


def _strict_client(conn: _Ssh, known_hosts: Path, label: str) -> None:
    import paramiko
    client = conn.client
    client._system_host_keys = paramiko.HostKeys()      # ignore ~/.ssh/known_hosts
    client._host_keys = host_keys_for(known_hosts, conn.host, conn.port)
    client.set_missing_host_key_policy(_Reject(label, known_hosts))


def _hops(conn: _Ssh):
    """What carries each SSH connection of the chain: our TCP socket, or behind a jump host a
    channel inside the jump host's connection, then the jump host's TCP socket."""
    while conn is not None:
        if conn.transport is not None:
            yield conn.transport.sock
        conn = conn.gateway


def _no_delay(conn: _Ssh) -> None:
    """Send every SSH packet at once (TCP_NODELAY, as OpenSSH does for its sessions). With
    Nagle's algorithm, a command's small packets written back to back (exec request, stdin,
    EOF) wait for the server's delayed ACK: 40-70 ms per exec."""
    for sock in _hops(conn):
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:           # not TCP (a proxy's unix socket): nothing to delay
                pass


def _idle_poll(conn: _Ssh) -> None:
    """The transport threads of a connection that is up wake every IDLE_POLL seconds."""
    for sock in _hops(conn):
        sock.settimeout(IDLE_POLL)


class _Ssh:
    """One SSH connection on paramiko's SSHClient, directly or through a jump host's (gateway,
    which it opens and closes with it): all we used of Fabric's Connection, which cost ~1 ms of
    CPU per connection, building an Invoke Config for each and merging it again. A Config
    shared between connections is no way out: Fabric writes into it (inline_ssh_env), which
    re-merges it while other threads read it."""

    def __init__(self, address: str, port: int, user: str | None, key, timeout: float,
                 gateway: _Ssh | None = None):
        import paramiko
        self.host, self.port, self.user, self.key = address, int(port), user, key
        self.timeout, self.gateway = timeout, gateway
        self.client = paramiko.SSHClient()
        self.transport: paramiko.Transport | None = None

    @property
    def is_connected(self) -> bool:
        return self.transport is not None and self.transport.active

    def open(self) -> None:
        if self.is_connected:
            return
        sock = None
        if self.gateway is not None:
            self.gateway.open()
            sock = self.gateway.transport.open_channel("direct-tcpip", (self.host, self.port),
                                                       ("", 0))
        from provisioner.sshtransport import Transport
        pkey = _client_key(self.key) if self.key else None
        self.client.connect(
            self.host, port=self.port, username=self.user, sock=sock, pkey=pkey,
            key_filename=[str(self.key)] if self.key and pkey is None else None,
            look_for_keys=self.key is None, allow_agent=True, timeout=self.timeout,
            banner_timeout=self.timeout, auth_timeout=self.timeout,
            transport_factory=partial(Transport, poll=_handshake_poll(self.timeout)))
        self.transport = self.client.get_transport()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.transport = None
            if self.gateway is not None:
                self.gateway.close()


class _SudoTalk:
    """What `sudo -S` says on stderr: its prompt (unique per command, so no output is taken for
    it) and, once the command runs, a ready token; both are cut out of the stderr we keep."""

    def __init__(self) -> None:
        nonce = secrets.token_hex(8)
        self.prompt = f"[provisioner-sudo-{nonce}]".encode()
        self.ready = f"[provisioner-ready-{nonce}]".encode()
        self.asked = False

    def hear(self, err: bytearray) -> tuple[bytearray, str | None]:
        if self.ready in err:
            return bytearray(err.replace(self.ready, b"", 1)), "running"
        if self.prompt in err:
            err = bytearray(err.replace(self.prompt, b"", 1))
            said = "refused" if self.asked else "password"
            self.asked = True
            return err, said
        return err, None


class Connection:
    """One SSH connection to one host, opened lazily and reused; counts remote commands."""

    def __init__(self, host, known_hosts: Path, sudo_password: Secret | None = None,
                 user: str | None = None):
        self.host = host
        self.user = user or host.user
        self.known_hosts = Path(known_hosts)
        self.sudo_password = sudo_password
        self.commands = 0
        # the agent's cache on the server (provisioner/agent.py call()): True uses and fills
        # it, False only uses it (check mode writes nothing), None sends the agent every exec
        self.agent_cache: bool | None = True
        self._conn: _Ssh | None = None

    @property
    def label(self) -> str:
        return f"{self.host.name} ({self.user}@{self.host.address}:{self.host.port})"

    def open(self) -> None:
        if self._conn is not None and self._conn.is_connected:
            return
        import paramiko
        h = self.host
        gateway = None
        if h.jump:
            j = h.jump
            gateway = _Ssh(j.address, j.port, j.user, getattr(j, "key", None) or h.key,
                           getattr(j, "connect_timeout", h.connect_timeout))
            _strict_client(gateway, self.known_hosts, f"jump host {j.address}")
        conn = _Ssh(h.address, h.port, self.user, h.key, h.connect_timeout, gateway)
        _strict_client(conn, self.known_hosts, self.label)
        last: Exception | None = None
        try:
            for attempt in range(RETRIES + 1):
                try:
                    conn.open()
                    conn.transport.set_keepalive(15)
                    _no_delay(conn)
                    _idle_poll(conn)
                    self._conn = conn
                    return
                except HostKeyError:
                    raise
                except paramiko.BadHostKeyException as e:
                    raise HostKeyError(
                        f"{self.label}: HOST KEY CHANGED. known_hosts ({self.known_hosts}) has "
                        f"{e.expected_key.get_name()} {fingerprint(e.expected_key)}, the server "
                        f"now presents {e.key.get_name()} {fingerprint(e.key)}. This is what a "
                        "man-in-the-middle looks like; if the server was really rebuilt, remove "
                        "its old line from known_hosts and run `invoke hosts.trust --env ENV`."
                    ) from None
                except paramiko.AuthenticationException as e:
                    raise Unreachable(f"{self.label}: authentication failed ({e}); check the user "
                                      "and key in the inventory's `ssh` settings") from None
                except (OSError, socket.timeout, paramiko.SSHException, EOFError) as e:
                    last = _as_seen(conn, e)
                    if attempt < RETRIES:
                        time.sleep(RETRY_DELAY * (attempt + 1))
        except BaseException:           # refused: nothing of it is left open (the jump host's
            conn.close()                # connection, a transport thread)
            raise
        at_jump = gateway is not None and not gateway.is_connected
        conn.close()
        where = (h.jump.address, h.jump.port) if at_jump else (h.address, h.port)
        why = connect_error(last, *where, h.connect_timeout) if last else "no answer"
        via = f" (through jump host {h.jump.address})" if h.jump else ""
        raise Unreachable(f"{self.label}: cannot connect{via}: {why}")

    def tunnel(self, address: str, port: int, timeout: float) -> paramiko.Channel:
        """A TCP stream from this host to address:port: what a jump host carries."""
        import paramiko
        self.open()
        try:
            return self._conn.transport.open_channel("direct-tcpip", (address, port),
                                                     ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise Unreachable(f"{self.label}: cannot open a connection to {address} port {port}: "
                              f"{connect_error(e, address, port, timeout)}") from None

    def run(self, argv: list[str], stdin: bytes | None = None, sudo: bool = True,
            timeout: float | None = None, on_stdout=None) -> Result:
        """Run argv (as root through sudo unless the login user is root), feeding stdin.
        on_stdout(bytes): each chunk of output as it arrives, for commands that stream (logs
        --follow); the Result then holds no stdout and no output limit applies."""
        import paramiko
        self.open()
        data = stdin or b""
        asks = None
        if sudo and self.user != "root":
            if self.sudo_password is not None:
                # the password goes only to a prompt sudo really shows (NOPASSWD, e.g. after
                # harden's sudoers, shows none); the command's stdin only once it runs
                asks = _SudoTalk()
                argv = ["sudo", "-S", "-p", asks.prompt.decode(), "--",
                        "sh", "-c", 'printf %s "$0" >&2 && exec "$@"', asks.ready.decode(), *argv]
            else:
                argv = ["sudo", "-n", "--", *argv]
        timeout = timeout or self.host.command_timeout
        started = time.monotonic()
        self.commands += 1
        try:
            chan = self._conn.transport.open_session(timeout=self.host.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError):
            self.close()                      # dropped: one fresh connection, then the command
            self.open()
            chan = self._conn.transport.open_session(timeout=self.host.connect_timeout)
        try:
            return self._exec(chan, shlex.join(argv), data, timeout, started, asks, on_stdout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.close()
            raise Unreachable(f"{self.label}: connection lost during a command: {e}") from None

    def _exec(self, chan, command: str, data: bytes, timeout: float, started: float,
              asks: _SudoTalk | None = None, on_stdout=None) -> Result:
        chan.exec_command(command)

        def send_stdin() -> None:
            # a memoryview: paramiko's sendall slices what is left after each packet, which
            # copies a bytes object every time (quadratic: 80 MB of stdin took 65 s)
            chan.sendall(memoryview(data))
            chan.shutdown_write()
        if asks is None:
            send_stdin()
        out, err = bytearray(), bytearray()
        while True:
            if chan.recv_ready() and on_stdout is not None:
                on_stdout(chan.recv(65536))
            elif chan.recv_ready():
                out += chan.recv(65536)
                if len(out) > MAX_STDOUT:
                    chan.close()
                    return Result(125, bytes(out[:4096]), bytes(err) + f"\nstopped: the command sent "
                                  f"more than {MAX_STDOUT >> 20} MiB of output".encode(),
                                  time.monotonic() - started)
            elif chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                if len(err) > MAX_STDERR:
                    del err[:len(err) - MAX_STDERR]
                if asks is not None:
                    err, say = asks.hear(err)
                    if say == "password":
                        chan.sendall(self.sudo_password.reveal().encode() + b"\n")
                    elif say == "refused":        # asked again: the password was wrong
                        chan.shutdown_write()
                        asks = None
                    elif say == "running":
                        send_stdin()
                        asks = None
            elif chan.exit_status_ready() and chan.eof_received:
                break
            elif chan.closed:                 # closed under us (logs --follow ended by Ctrl-C)
                break
            else:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    chan.close()
                    return Result(124, bytes(out), bytes(err) + f"\ntimed out after {timeout:.0f} s".encode(),
                                  time.monotonic() - started)
                select.select([chan], [], [], min(left, 1.0))   # wakes on data, EOF or exit
        rc = chan.recv_exit_status()
        chan.close()
        return Result(rc, bytes(out), bytes(err), time.monotonic() - started)

    def ping(self) -> None:
        """Run the agent (under sudo, as every run does) and check its answer: what a guard's
        fresh login must prove, not just that some command exits 0."""
        from provisioner import agent
        r = self.run(agent.command(), stdin=agent.payload("ping", {}))
        if not agent.parse(r.stdout, r.stderr, r.rc).get("pong"):
            raise agent.AgentError(f"{self.label}: the agent did not answer the ping")

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

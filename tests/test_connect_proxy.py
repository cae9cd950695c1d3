"""The testbed's HTTPS proxy, on loopback: tunnels, refusals, and name lookups made once and
retried (the reason it exists: this machine's resolver fails bursts of concurrent lookups)."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import pytest

from provisioner.testbed import connect_proxy
from provisioner.testbed.network import CONNECT_PROXY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def echo_port():
    """A TCP server on loopback that sends back what it gets."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def echo(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    yield port
    srv.close()


ALLOWED_HOSTS = ("127.0.0.1", "localhost", "no-such-host.invalid")


def _start_proxy(allow: str, echo_port: int) -> tuple[subprocess.Popen, int]:
    """The proxy on a free loopback port, once it accepts connections."""
    port = _free_port()
    hosts = [a for h in ALLOWED_HOSTS for a in ("--allow-host", h)]
    proc = subprocess.Popen([sys.executable, CONNECT_PROXY, "--listen", "127.0.0.1", "--port",
                             str(port), "--allow", allow, "--port-allowed", str(echo_port), *hosts])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def proxy(echo_port):
    proc, port = _start_proxy("127.0.0.0/8", echo_port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def _request(port: int, head: bytes, then: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                return reply
            reply += chunk
        if then:
            s.sendall(then)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                reply += chunk
        return reply


def test_connect_opens_a_tunnel(proxy, echo_port):
    reply = _request(proxy, f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                     then=b"hello through the tunnel")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"\r\n\r\nhello through the tunnel")


def test_connect_by_name(proxy, echo_port):
    reply = _request(proxy, f"CONNECT localhost:{echo_port} HTTP/1.1\r\n\r\n".encode(), then=b"x")
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"x")


def test_plain_http_and_other_ports_are_refused(proxy, echo_port):
    assert _request(proxy, b"GET http://127.0.0.1/ HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    other = _free_port()
    reply = _request(proxy, f"CONNECT 127.0.0.1:{other} HTTP/1.1\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403 ") and str(other).encode() in reply


def test_hosts_that_are_not_registries_are_refused(proxy, echo_port):
    reply = _request(proxy, f"CONNECT 127.0.0.2:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403 ") and b"127.0.0.2 is not one of the package" in reply
    reply = _request(proxy, f"CONNECT LOCALHOST:{echo_port} HTTP/1.1\r\n\r\n".encode(), then=b"x")
    assert reply.startswith(b"HTTP/1.1 200 ")          # names are matched without case


def test_unknown_name_is_a_502_naming_it(proxy, echo_port):
    reply = _request(proxy, f"CONNECT no-such-host.invalid:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ") and b"no-such-host.invalid" in reply


def test_clients_outside_the_allowed_subnet_get_nothing(echo_port):
    proc, port = _start_proxy("10.255.255.0/24", echo_port)
    try:
        try:
            reply = _request(port, f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())
        except ConnectionResetError:       # closed with the request unread
            reply = b""
        assert reply == b""
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_lookups_are_shared_cached_and_retried(monkeypatch):
    monkeypatch.setattr(connect_proxy, "DNS_RETRIES", (0.01, 0.01, 0.01))
    calls = []

    async def flaky_getaddrinfo(self, host, port, **kw):
        calls.append(host)
        await asyncio.sleep(0.05)
        if len(calls) <= 2:       # the resolver's "Temporary failure in name resolution"
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", flaky_getaddrinfo)

    async def burst():
        r = connect_proxy.Resolver()
        results = await asyncio.gather(*(r.resolve("registry.example", 443) for _ in range(50)))
        return results, await r.resolve("registry.example", 443)

    results, later = asyncio.run(burst())
    assert all(addrs == [("192.0.2.1", 443)] for addrs in results) and later == results[0]
    assert calls == ["registry.example"] * 3     # 2 failures, 1 answer, then all from the cache


def test_a_failing_resolver_falls_back_to_the_last_answer(monkeypatch):
    monkeypatch.setattr(connect_proxy, "DNS_RETRIES", (0.01,))
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]])

    async def getaddrinfo(self, host, port, **kw):
        try:
            return next(answers)
        except StopIteration:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)

    async def run():
        r = connect_proxy.Resolver()
        first = await r.resolve("registry.example", 443)
        r.cache["registry.example:443"] = (0.0, first)          # expired
        return first, await r.resolve("registry.example", 443)

    first, stale = asyncio.run(run())
    assert stale == first == [("192.0.2.1", 443)]

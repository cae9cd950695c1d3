"""The testbed's package proxy, on loopback against local peers: HTTPS tunnels, apt requests
(indexes passed through, immutable files cached), refusals, and name lookups made once and
retried (this machine's resolver fails bursts of concurrent lookups)."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from provisioner.testbed import package_proxy
from provisioner.testbed.network import PACKAGE_PROXY


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


def _start_proxy(allow: str, echo_port: int, *apt_args: str,
                 apt_port: int | None = None) -> tuple[subprocess.Popen, int]:
    """The proxy on a free loopback port (and apt_port, if given), once it accepts connections."""
    port = _free_port()
    hosts = [a for h in ALLOWED_HOSTS for a in ("--allow-host", h)]
    apt = ["--apt-port", str(apt_port), *apt_args] if apt_port else []
    proc = subprocess.Popen([sys.executable, PACKAGE_PROXY, "--listen", "127.0.0.1", "--port",
                             str(port), "--allow", allow, "--port-allowed", str(echo_port), *hosts,
                             *apt])
    deadline = time.monotonic() + 10
    for wanted in (port, apt_port or port):
        while True:
            try:
                socket.create_connection(("127.0.0.1", wanted), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise
                time.sleep(0.05)
    return proc, port


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
    monkeypatch.setattr(package_proxy, "DNS_RETRIES", (0.01, 0.01, 0.01))
    calls = []

    async def flaky_getaddrinfo(self, host, port, **kw):
        calls.append(host)
        await asyncio.sleep(0.05)
        if len(calls) <= 2:       # the resolver's "Temporary failure in name resolution"
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", flaky_getaddrinfo)

    async def burst():
        r = package_proxy.Resolver()
        results = await asyncio.gather(*(r.resolve("registry.example", 443) for _ in range(50)))
        return results, await r.resolve("registry.example", 443)

    results, later = asyncio.run(burst())
    assert all(addrs == [("192.0.2.1", 443)] for addrs in results) and later == results[0]
    assert calls == ["registry.example"] * 3     # 2 failures, 1 answer, then all from the cache


def test_a_failing_resolver_falls_back_to_the_last_answer(monkeypatch):
    monkeypatch.setattr(package_proxy, "DNS_RETRIES", (0.01,))
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]])

    async def getaddrinfo(self, host, port, **kw):
        try:
            return next(answers)
        except StopIteration:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)

    async def run():
        r = package_proxy.Resolver()
        first = await r.resolve("registry.example", 443)
        r.cache["registry.example:443"] = (0.0, first)          # expired
        return first, await r.resolve("registry.example", 443)

    first, stale = asyncio.run(run())
    assert stale == first == [("192.0.2.1", 443)]


# ---- apt: a loopback "mirror" that records what reaches it -----------------------------------

class Mirror:
    """An HTTP origin on loopback: an InRelease that changes, pool files, and misbehaviours."""

    def __init__(self) -> None:
        self.files = {"/debian/dists/stable/InRelease": b"index v1\n" * 100,
                      "/debian/pool/main/h/hello/hello_1.0_amd64.deb": os.urandom(300_000),
                      "/debian/dists/stable/main/by-hash/SHA256/ab12": os.urandom(5000)}
        self.hits: collections.Counter = collections.Counter()
        self.hosts_seen: list[list[str]] = []
        self.short: set[str] = set()          # paths answered with half the promised bytes
        self.lock = threading.Lock()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                with mirror.lock:
                    mirror.hits[self.path] += 1
                    mirror.hosts_seen.append(self.headers.get_all("Host") or [])
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path.endswith("/chunked"):
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 777):
                        piece = body[i:i + 777]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if self.headers.get("If-None-Match") == '"v"':
                    self.send_response(304)
                    self.send_header("ETag", '"v"')
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v"')
                self.end_headers()
                if self.path in mirror.short:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def mirror():
    m = Mirror()
    yield m
    m.server.shutdown()


@pytest.fixture
def apt_proxy(mirror, echo_port, tmp_path):
    """(port, cache folder) of a proxy that serves the mirror above and no other origin."""
    cache = tmp_path / "cache"
    apt_port = _free_port()
    proc, _ = _start_proxy("127.0.0.0/8", echo_port, "--apt-cache", str(cache),
                           "--apt-origin", f"127.0.0.1:{mirror.port}", apt_port=apt_port)
    yield apt_port, cache
    proc.terminate()
    proc.wait(timeout=10)


def _get(port: int, url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", url, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        conn.close()


INDEX = "/debian/dists/stable/InRelease"
DEB = "/debian/pool/main/h/hello/hello_1.0_amd64.deb"


def test_indexes_pass_through_uncached_with_one_host_header(apt_proxy, mirror):
    port, cache = apt_proxy
    # apt sends its own Host header: the mirror must still see exactly one (a second one is the
    # 400 that apt-cacher-ng's pass-through mode caused).
    status, body, _ = _get(port, mirror.url(INDEX), {"Host": f"127.0.0.1:{mirror.port}"})
    assert status == 200 and body == mirror.files[INDEX]
    mirror.files[INDEX] = b"index v2\n" * 100                 # the mirror publishes anew
    status, body, _ = _get(port, mirror.url(INDEX))
    assert status == 200 and body == b"index v2\n" * 100     # never served from a cache
    assert mirror.hits[INDEX] == 2
    assert mirror.hosts_seen == [[f"127.0.0.1:{mirror.port}"]] * 2
    assert not [f for f in cache.rglob("*") if f.is_file()]


def test_immutable_files_are_fetched_once_then_served_from_the_cache(apt_proxy, mirror):
    port, cache = apt_proxy
    by_hash = "/debian/dists/stable/main/by-hash/SHA256/ab12"
    for _ in range(3):
        for path in (DEB, by_hash):
            status, body, headers = _get(port, mirror.url(path))
            assert status == 200 and body == mirror.files[path]
            assert headers["Content-Length"] == str(len(body))
    assert mirror.hits[DEB] == 1 and mirror.hits[by_hash] == 1
    kept = [f for f in cache.rglob("*") if f.is_file()]
    assert sorted(f.name for f in kept) == ["ab12", "hello_1.0_amd64.deb"]


def test_concurrent_fetches_each_get_the_whole_file(apt_proxy, mirror):
    port, cache = apt_proxy
    # what broke apt-cacher-ng: several servers refreshing the same index in the same second
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: (i % 2, _get(port, mirror.url((INDEX, DEB)[i % 2]))),
                                range(32)))
    for which, (status, body, _) in results:
        assert status == 200 and body == mirror.files[(INDEX, DEB)[which]]
    assert (cache / f"127.0.0.1_{mirror.port}" / DEB.lstrip("/")).read_bytes() == mirror.files[DEB]
    assert not list(cache.rglob(".part-*"))


def test_pipelined_requests_are_answered_in_order_on_one_connection(apt_proxy, mirror):
    port, _ = apt_proxy
    heads = b"".join(f"GET {mirror.url(p)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                     for p in (INDEX, DEB, INDEX))          # apt pipelines like this
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(heads)
        stream = s.makefile("rb")
        for path in (INDEX, DEB, INDEX):
            status = stream.readline()
            headers = dict(line.decode().rstrip("\r\n").split(": ", 1)
                           for line in iter(stream.readline, b"\r\n"))
            body = stream.read(int(headers["Content-Length"]))
            assert status.startswith(b"HTTP/1.1 200 ") and body == mirror.files[path], path
            assert headers["Connection"] == "keep-alive"


def test_a_conditional_request_gets_304_and_the_connection_goes_on(apt_proxy, mirror):
    port, _ = apt_proxy
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", mirror.url(INDEX), headers={"If-None-Match": '"v"'})
    r = conn.getresponse()
    assert r.status == 304 and r.read() == b""
    conn.request("GET", mirror.url(INDEX))
    r = conn.getresponse()
    assert r.status == 200 and r.read() == mirror.files[INDEX]
    conn.close()


def test_chunked_answers_are_relayed_whole(apt_proxy, mirror):
    port, _ = apt_proxy
    mirror.files["/debian/dists/stable/chunked"] = os.urandom(10_000)
    status, body, _ = _get(port, mirror.url("/debian/dists/stable/chunked"))
    assert status == 200 and body == mirror.files["/debian/dists/stable/chunked"]


def test_a_mirror_that_stops_short_leaves_nothing_in_the_cache(apt_proxy, mirror):
    port, cache = apt_proxy
    mirror.short.add(DEB)
    with pytest.raises(http.client.IncompleteRead):
        _get(port, mirror.url(DEB))
    assert not [f for f in cache.rglob("*") if f.is_file()]     # no partial file, no truncated copy
    mirror.short.clear()
    status, body, _ = _get(port, mirror.url(DEB))                 # apt's retry
    assert status == 200 and body == mirror.files[DEB]


def test_apt_refuses_what_it_does_not_serve(apt_proxy, mirror):
    port, _ = apt_proxy
    other = f"http://127.0.0.1:{_free_port()}/debian/dists/stable/InRelease"
    status, body, _ = _get(port, other)
    assert status == 403 and b"not one of the apt mirrors" in body
    assert _request(port, f"POST {mirror.url(INDEX)} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 405 ")
    assert _request(port, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    for bad in ("/debian/pool/../../etc/passwd", "/debian/pool/a b", "/debian/x?y=1"):
        reply = _request(port, f"GET http://127.0.0.1:{mirror.port}{bad} HTTP/1.1\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 400 "), bad
    assert sum(mirror.hits.values()) == 0


def test_prune_drops_stale_and_partial_files_only(tmp_path):
    fresh, stale, part = tmp_path / "a" / "fresh.deb", tmp_path / "b" / "stale.deb", tmp_path / "a" / ".part-x1"
    for f in (fresh, stale, part):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
    old = time.time() - 31 * 86400
    os.utime(stale, (old, old))
    assert package_proxy.prune_cache(tmp_path) == 2
    assert [f for f in tmp_path.rglob("*") if f.is_file()] == [fresh]

"""HTTP(S) from the host to the test servers, for the load balancer's live tests and its bench:
a connection that dials an address but speaks for a name (SNI and Host, as a browser would
after DNS), one request, and a bounded load (a fixed number of requests over a few keep-alive
connections, each with a timeout: it stops by itself)."""
from __future__ import annotations

import http.client
import socket
import ssl
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


class Connection(http.client.HTTPSConnection):
    """HTTPS to `address` for `name`: SNI, certificate check and Host all use the name."""

    def __init__(self, name: str, address: str, context: ssl.SSLContext, port: int = 443,
                 timeout: float = 10):
        super().__init__(name, port, context=context, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class PlainConnection(http.client.HTTPConnection):
    """Plain HTTP to `address` with `Host: name`."""

    def __init__(self, name: str, address: str, port: int = 80, timeout: float = 10):
        super().__init__(name, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


def trusting(ca_file: str, **versions) -> ssl.SSLContext:
    """A client context whose only trust anchor is ca_file (minimum_version=..., maximum_version=...)."""
    ctx = ssl.create_default_context(cafile=ca_file)       # cafile given: no system CAs
    for key, value in versions.items():
        setattr(ctx, key, value)
    return ctx


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    cert: dict | None = None         # the peer certificate as ssl decodes it (verified)
    cert_der: bytes | None = None
    protocol: str | None = None


def get(conn: http.client.HTTPConnection, path: str = "/") -> Answer:
    try:
        conn.connect()                 # the TLS session read before a closing answer drops it
        sock = conn.sock
        tls = isinstance(sock, ssl.SSLSocket)
        cert, der, version = ((sock.getpeercert(), sock.getpeercert(binary_form=True),
                               sock.version()) if tls else (None, None, None))
        conn.request("GET", path)
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read(), cert, der, version)
    finally:
        conn.close()


@dataclass
class Load:
    statuses: list = field(default_factory=list)     # per request: HTTP status or the error
    latencies: list = field(default_factory=list)    # seconds, successful requests
    seconds: float = 0.0
    retried: int = 0         # GETs sent again after nginx closed a kept-alive connection

    @property
    def failed(self) -> list:
        return [s for s in self.statuses if s != 200]

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000    # noqa: E731
        return (f"{len(self.statuses)} requests in {self.seconds:.1f} s: "
                f"{len(self.statuses) / self.seconds if self.seconds else 0:.0f} req/s, "
                f"p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms, "
                f"mean {statistics.fmean(lat) * 1000:.1f} ms, {len(self.failed)} failed"
                + (f", {self.retried} retried on a new connection" if self.retried else ""))


def load(connect: Callable[[], http.client.HTTPConnection], total: int, threads: int = 8,
         path: str = "/", at: dict[int, Callable[[], None]] | None = None,
         until: threading.Event | None = None, retry_closed: bool = False) -> Load:
    """`total` GETs of `path` over `threads` keep-alive connections (a failed one is opened
    again). `at` = {n: fn}: one at a time and in order of n, fn() runs once n requests have
    completed, while the load goes on. `until`: stop early once it is set (e.g. by the last
    fn). Each request has the connection's timeout: bounded.

    retry_closed: a GET whose kept-alive connection the server closed before any answer came is
    sent once more on a new connection, as browsers and most HTTP clients do. nginx's graceful
    reload closes its idle client connections (documented behaviour; blue-green's flip reloads
    it): without this, a client that does not retry sees that close as a failure."""
    out = Load()
    lock = threading.Lock()
    progress = threading.Condition(lock)
    taken = [0]

    def controller() -> None:
        for n, fn in sorted((at or {}).items()):
            with progress:
                progress.wait_for(lambda: len(out.statuses) >= min(n, total))
            fn()

    def worker() -> None:
        conn = connect()
        while True:
            with lock:
                if taken[0] >= total or (until is not None and until.is_set()):
                    break
                taken[0] += 1
            t0 = time.monotonic()
            for attempt in (1, 2):
                reused = conn.sock is not None
                try:
                    conn.request("GET", path)
                    r = conn.getresponse()
                    r.read()
                    status: object = r.status
                    if r.will_close:
                        conn.close()
                except (OSError, http.client.HTTPException) as e:
                    status = f"{type(e).__name__}: {e}"
                    conn.close()
                    if retry_closed and reused and attempt == 1 and isinstance(
                            e, (http.client.RemoteDisconnected, ConnectionResetError,
                                BrokenPipeError)):
                        with lock:
                            out.retried += 1
                        continue
                break
            dt = time.monotonic() - t0
            with progress:
                out.statuses.append(status)
                if status == 200:
                    out.latencies.append(dt)
                progress.notify_all()
        conn.close()

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    control = threading.Thread(target=controller)
    for t in (*pool, control):
        t.start()
    for t in pool:
        t.join()
    out.seconds = time.monotonic() - t0
    control.join()                  # whatever is still due runs after the load
    return out

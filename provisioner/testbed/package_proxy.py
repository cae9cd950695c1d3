"""The testbed's package proxy, the only way test servers reach the package registries.

Two listeners in one process, both open only to the test subnet:
- HTTPS (CONNECT): tunnels to the registries (the hosts given with --allow-host) on port 443,
  nothing else: npm and pip.
- apt (plain HTTP, proxy requests): the Debian mirrors given with --apt-origin. Files at
  immutable paths (`pool/`, `by-hash/`: Debian never changes the content behind such a path)
  are kept in --apt-cache and served from there the next time, across runs and checkouts;
  everything else (InRelease, Release) is passed through uncached, so a refresh always sees
  the mirror's current index. A cached file appears by an atomic rename once complete, so
  servers that fetch the same file at the same moment each get it whole.

Why not tinyproxy and apt-cacher-ng: tinyproxy looked each registry name up per tunnel, and this
machine's resolver fails bursts of concurrent lookups (172 of 300 at 100 at a time), which failed
npm installs. apt-cacher-ng raced on renaming a cached InRelease that several servers refreshed in
the same second (one got a truncated file and its apt-get update hung), and in its uncached mode
forwarded each request with a second Host header, which the mirror rightly answers with 400.
Here a name is looked up once for all requests waiting on it, kept for a while, retried with
backoff, and served stale rather than not at all; and each upstream request is written from
scratch with one Host header.

Standalone and stdlib only: started as its own process (`python3 package_proxy.py ...`); it
drops to --user once listening. Errors go to stderr, one line each, without request contents.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import socket
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
IDLE_TIMEOUT = 600.0
DNS_TTL = 300.0
DNS_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)     # backoff between lookups that fail


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class Resolver:
    """Name -> addresses, one lookup in flight per name, kept DNS_TTL, stale on failure."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[float, list[tuple]]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def resolve(self, host: str, port: int) -> list[tuple]:
        key = f"{host}:{port}"
        async with self.locks.setdefault(key, asyncio.Lock()):
            hit = self.cache.get(key)
            if hit and hit[0] > time.monotonic():
                return hit[1]
            loop = asyncio.get_running_loop()
            error: Exception | None = None
            for pause in (*DNS_RETRIES, None):
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    addrs = [info[4] for info in infos]
                    self.cache[key] = (time.monotonic() + DNS_TTL, addrs)
                    return addrs
                except socket.gaierror as exc:
                    error = exc
                    if exc.errno != socket.EAI_AGAIN or pause is None:
                        break
                    await asyncio.sleep(pause)
            if hit:
                log(f"lookup of {host} failed ({error}); using the addresses from "
                    f"{time.monotonic() - hit[0] + DNS_TTL:.0f} s ago")
                return hit[1]
            raise LookupError(f"lookup of {host} failed: {error}")


async def open_upstream(resolver: Resolver, host: str, port: int, limit: int = 2**16):
    error: Exception | None = None
    for addr in await resolver.resolve(host, port):
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(addr[0], addr[1], limit=limit), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            error = exc
    raise OSError(f"no address of {host} answered: {error!r}")


async def reply(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """A short error answer; the connection is closed after it."""
    body = (reason + "\n").encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
    await writer.drain()


def allowed_peer(writer: asyncio.StreamWriter, allow: ipaddress.IPv4Network) -> str | None:
    peer = writer.get_extra_info("peername") or ("?", 0)
    try:
        return peer[0] if ipaddress.ip_address(peer[0]) in allow else None
    except ValueError:
        return None


async def serve_client(writer: asyncio.StreamWriter, allow: ipaddress.IPv4Network, what: str,
                       session) -> None:
    """Runs `await session(peer)` for a client of the allowed subnet (others get nothing); a
    lost connection ends it quietly, any other error is logged; the connection is closed after."""
    try:
        peer = allowed_peer(writer, allow)
        if peer is not None:
            await session(peer)
    except (ConnectionError, OSError):
        pass
    except Exception as exc:          # one client's bug must not take the others down
        log(f"{what}: {exc!r}")
    finally:
        writer.close()


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One request or response head; None when the peer closed, stalled or sent too much."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
        return None


class TunnelProxy:
    """CONNECT host:port to the registries, for HTTPS clients (npm, pip)."""

    def __init__(self, allow: ipaddress.IPv4Network, ports: set[int],
                 hosts: set[str] | None, resolver: Resolver) -> None:
        self.allow = allow
        self.ports = ports
        self.hosts = hosts          # None: any host (only for tests on loopback)
        self.resolver = resolver

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_client(writer, self.allow, "CONNECT",
                           lambda peer: self.tunnel(reader, writer, peer))

    async def tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> None:
        head = await read_head(reader)
        if head is None:
            return
        method, _, target = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        target = target.rsplit(" ", 1)[0]
        host, _, port_text = target.rpartition(":")
        host = host.strip("[]")
        if method != "CONNECT" or not host or not port_text.isdigit():
            return await reply(writer, 405, "only CONNECT host:port is served here")
        port = int(port_text)
        if port not in self.ports:
            return await reply(writer, 403, f"port {port} is not allowed")
        if self.hosts is not None and host.lower() not in self.hosts:
            log(f"{peer} CONNECT {host}:{port}: refused, not a registry")
            return await reply(writer, 403, f"{host} is not one of the package "
                                            "registries this proxy serves")
        try:
            up_reader, up_writer = await open_upstream(self.resolver, host, port)
        except (LookupError, OSError, asyncio.TimeoutError) as exc:
            log(f"{peer} CONNECT {host}:{port}: {exc}")
            return await reply(writer, 502, str(exc))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))
        finally:
            up_writer.close()

    @staticmethod
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await asyncio.wait_for(src.read(65536), IDLE_TIMEOUT)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            try:
                dst.write_eof()
            except (OSError, RuntimeError):
                dst.close()


# Debian never changes the file behind these paths (a pool file's name carries its version, a
# by-hash name is its content's hash), so a copy is good forever.
IMMUTABLE = re.compile(r"/(pool|by-hash)/")
SAFE_PATH = re.compile(r"/[A-Za-z0-9._~+%:@=,/-]*\Z")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade"}
CACHE_KEEP_DAYS = 30            # a cached file unused this long is dropped at start
READ_TIMEOUT = 60.0


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class Request:
    method: str
    host: str
    port: int
    path: str
    headers: list[tuple[str, str]]
    keep_alive: bool


def parse_request(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(400, "malformed request line") from None
    headers = []
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, "malformed header line")
            headers.append((name, value.strip()))
    if method not in ("GET", "HEAD"):
        raise BadRequest(405, "only GET and HEAD of apt repositories are served here")
    url = urllib.parse.urlsplit(target)
    if url.scheme != "http" or not url.hostname or url.query or url.fragment:
        raise BadRequest(400, "a proxy request for an http:// URL is expected")
    path = url.path or "/"
    if not SAFE_PATH.match(path) or any(seg in ("..", ".") for seg in path.split("/")):
        raise BadRequest(400, "unexpected characters or segments in the path")
    if any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        raise BadRequest(400, "a request body is not expected")
    conn = {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",")}
    keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
    return Request(method, url.hostname.lower(), url.port or 80, path, headers, keep)


class Upstream:
    """A response from the mirror: its head parsed, its body readable once."""

    def __init__(self, reader: asyncio.StreamReader, head: bytes, method: str) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise OSError("the mirror sent a malformed status line")
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        self.headers = [(k, v.strip()) for k, _, v in
                        (line.partition(":") for line in lines[1:] if line)]
        values = {k.lower(): v for k, v in self.headers}
        self.chunked = "chunked" in values.get("transfer-encoding", "").lower()
        length = values.get("content-length")
        self.length = int(length) if length and length.isdigit() and not self.chunked else None
        self.bodiless = method == "HEAD" or self.status in (204, 304) or self.status < 200
        self.reader = reader

    async def body(self):
        """The body's bytes in pieces; OSError when the mirror stops short."""
        if self.bodiless:
            return
        read = lambda n: asyncio.wait_for(self.reader.read(n), READ_TIMEOUT)   # noqa: E731
        if self.chunked:
            while True:
                line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), READ_TIMEOUT)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass                                   # trailers, dropped
                    return
                while size:
                    data = await read(min(size, 65536))
                    if not data:
                        raise OSError("the mirror closed the connection mid-chunk")
                    size -= len(data)
                    yield data
                await self.reader.readexactly(2)
        elif self.length is not None:
            left = self.length
            while left:
                data = await read(min(left, 65536))
                if not data:
                    raise OSError(f"the mirror closed the connection {left} bytes short")
                left -= len(data)
                yield data
        else:
            while data := await read(65536):
                yield data


class AptProxy:
    """apt's HTTP proxy: immutable files cached, indexes passed through."""

    def __init__(self, allow: ipaddress.IPv4Network, origins: set[tuple[str, int]] | None,
                 cache: Path, resolver: Resolver) -> None:
        self.allow = allow
        self.origins = origins      # None: any origin (only for tests on loopback)
        self.cache = cache
        self.resolver = resolver

    def cached_path(self, req: Request) -> Path | None:
        """Where an immutable file is kept (parse_request lets only GET and HEAD through)."""
        if IMMUTABLE.search(req.path):
            return self.cache / f"{req.host}_{req.port}" / req.path.lstrip("/")
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_client(writer, self.allow, "apt",
                           lambda peer: self.requests(reader, writer, peer))

    async def requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       peer: str) -> None:
        # apt pipelines: requests are answered one after the other, in order.
        while (head := await read_head(reader)) is not None:
            try:
                req = parse_request(head)
            except BadRequest as exc:
                return await reply(writer, exc.status, str(exc))
            if self.origins is not None and (req.host, req.port) not in self.origins:
                log(f"{peer} GET {req.host}:{req.port}: refused, not a Debian mirror")
                return await reply(writer, 403, f"{req.host}:{req.port} is not one of the "
                                                "apt mirrors this proxy serves")
            if not await self.serve(req, writer, peer):
                return

    async def serve(self, req: Request, writer: asyncio.StreamWriter, peer: str) -> bool:
        """Answer one request; True when the connection may carry the next one."""
        target = self.cached_path(req)
        if target is not None and target.is_file():
            return await self.from_cache(req, target, writer)
        try:
            up_reader, up_writer = await open_upstream(self.resolver, req.host, req.port)
        except (LookupError, OSError, asyncio.TimeoutError) as exc:
            log(f"{peer} GET {req.host}{req.path}: {exc}")
            await reply(writer, 502, f"cannot reach {req.host}: {exc}")
            return False
        try:
            return await self.forward(req, target, up_reader, up_writer, writer, peer)
        finally:
            up_writer.close()

    async def from_cache(self, req: Request, target: Path, writer: asyncio.StreamWriter) -> bool:
        size = target.stat().st_size
        os.utime(target)                    # marks it used, for the pruning at start
        writer.write(self.head(200, "OK", [("Content-Type", "application/octet-stream"),
                                           ("Content-Length", str(size))], req.keep_alive))
        if req.method == "GET":
            with open(target, "rb") as f:
                while data := f.read(65536):
                    writer.write(data)
                    await writer.drain()
        await writer.drain()
        return req.keep_alive

    async def forward(self, req: Request, target: Path | None, up_reader, up_writer,
                      writer: asyncio.StreamWriter, peer: str) -> bool:
        # Written from scratch: one Host header, the client's end-to-end headers once each; for
        # a file to be cached, no conditions or ranges (the cache needs the whole file).
        skip = HOP_BY_HOP | {"host"}
        if target is not None:
            skip |= {"range", "if-range", "if-modified-since", "if-none-match"}
        lines = [f"{req.method} {req.path} HTTP/1.1",
                 f"Host: {req.host}" + (f":{req.port}" if req.port != 80 else "")]
        lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in skip]
        lines.append("Connection: close")
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await up_writer.drain()
        head = await read_head(up_reader)
        if head is None:
            log(f"{peer} GET {req.host}{req.path}: no answer from the mirror")
            await reply(writer, 504, f"no answer from {req.host}")
            return False
        up = Upstream(up_reader, head, req.method)
        headers = [(k, v) for k, v in up.headers
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        keep = req.keep_alive
        if up.bodiless:
            if up.length is not None and req.method == "HEAD":
                headers.append(("Content-Length", str(up.length)))
        elif up.length is not None:
            headers.append(("Content-Length", str(up.length)))
        else:
            headers.append(("Transfer-Encoding", "chunked"))
        chunked = not up.bodiless and up.length is None
        part = None
        if target is not None and up.status == 200 and up.length is not None \
                and req.method == "GET":
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(dir=target.parent, prefix=".part-")
                part = (os.fdopen(fd, "wb"), Path(name))
            except OSError as exc:                  # served all the same, just not kept
                log(f"cannot cache {target}: {exc}")
        writer.write(self.head(up.status, up.reason, headers, keep))
        body = up.body()
        try:
            while True:
                try:
                    data = await body.__anext__()
                except StopAsyncIteration:
                    break
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                    log(f"{peer} GET {req.host}{req.path}: from the mirror: {exc!r}")
                    raise ConnectionError(str(exc)) from None   # the client sees a short answer
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if part:
                    part[0].write(data)
                await writer.drain()                 # a client that left ends it here, quietly
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            if part:
                part[0].close()
                os.replace(part[1], target)        # whole, or not there at all
                part = None
        finally:
            if part:
                part[0].close()
                part[1].unlink(missing_ok=True)
        return keep

    @staticmethod
    def head(status: int, reason: str, headers: list[tuple[str, str]], keep: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}".rstrip(), *(f"{k}: {v}" for k, v in headers),
                 "Connection: " + ("keep-alive" if keep else "close")]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def prune_cache(cache: Path, keep_days: float = CACHE_KEEP_DAYS) -> int:
    """Drop cached files unused for keep_days and partial files of an interrupted run."""
    cutoff = time.time() - keep_days * 86400
    dropped = 0
    for f in cache.rglob("*"):
        try:
            if f.is_file() and (f.name.startswith(".part-") or f.stat().st_mtime < cutoff):
                f.unlink()
                dropped += 1
        except OSError:
            pass
    return dropped


def origin(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected host:port")
    return host.lower(), int(port)


async def serve(args: argparse.Namespace) -> None:
    allow = ipaddress.ip_network(args.allow)
    resolver = Resolver()
    hosts = None if args.allow_any_host else {h.lower() for h in args.allow_host}
    tunnels = TunnelProxy(allow, set(args.port_allowed), hosts, resolver)
    servers = [await asyncio.start_server(tunnels.handle, args.listen, args.port,
                                          limit=HEAD_LIMIT, backlog=512)]
    if args.apt_port:
        cache = Path(args.apt_cache)
        cache.mkdir(parents=True, exist_ok=True)
        prune_cache(cache)
        origins = None if args.apt_any_origin else set(args.apt_origin)
        apt = AptProxy(allow, origins, cache, resolver)
        servers.append(await asyncio.start_server(apt.handle, args.listen, args.apt_port,
                                                  limit=HEAD_LIMIT, backlog=512))
    if args.user:
        # Start the lookup threads first: after the drop, the interpreter's own files may be
        # unreadable (a Python under /root), so nothing may be imported lazily from then on.
        await asyncio.get_running_loop().getaddrinfo("localhost", 0)
        drop_privileges(args.user)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def drop_privileges(user: str) -> None:
    """After binding: the proxies need no privilege. (Done here rather than by the starter, so
    that the interpreter and this file need not be readable by that user.)"""
    import pwd
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="address to listen on (the bridge's)")
    p.add_argument("--port", type=int, required=True, help="the HTTPS (CONNECT) port")
    p.add_argument("--allow", required=True, help="client subnet, e.g. 10.77.0.0/24")
    p.add_argument("--port-allowed", type=int, action="append", default=[],
                   help="destination port a tunnel may reach (repeatable)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="host name a tunnel may reach (repeatable); none given: no host")
    p.add_argument("--allow-any-host", action="store_true",
                   help="any host name (for tests on loopback only)")
    p.add_argument("--apt-port", type=int, help="the apt (plain HTTP) port; none: no apt proxy")
    p.add_argument("--apt-origin", type=origin, action="append", default=[],
                   help="host:port of an apt mirror (repeatable)")
    p.add_argument("--apt-any-origin", action="store_true",
                   help="any mirror (for tests on loopback only)")
    p.add_argument("--apt-cache", help="folder for the cached immutable files")
    p.add_argument("--user", help="run as this user once listening")
    args = p.parse_args(argv)
    if args.apt_port and not args.apt_cache:
        p.error("--apt-port needs --apt-cache")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

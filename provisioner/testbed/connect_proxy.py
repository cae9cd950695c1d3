"""The testbed's HTTPS proxy: CONNECT tunnels from the test subnet to the package registries
(the hosts given with --allow-host) on port 443, nothing else.

It replaces tinyproxy because of name lookups. npm opens a tunnel per request in bursts of
dozens, tinyproxy resolves the registry's name for each one, and this machine's resolver
answers a burst of concurrent lookups with "Temporary failure in name resolution" (measured:
172 of 300 lookups failed at 100 at a time), which failed npm installs on the servers. Here a
name is looked up once for all tunnels waiting on it, kept for a while, retried with backoff
when the resolver fails, and served stale rather than not at all.

Standalone and stdlib only: started as its own process (`python3 connect_proxy.py ...`); it
drops to --user once listening. Errors go to stderr, one line each, without request contents.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import sys
import time

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


class Proxy:
    def __init__(self, allow: ipaddress.IPv4Network, ports: set[int],
                 hosts: set[str] | None) -> None:
        self.allow = allow
        self.ports = ports
        self.hosts = hosts          # None: any host (only for tests on loopback)
        self.resolver = Resolver()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            if ipaddress.ip_address(peer[0]) not in self.allow:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                return
            method, _, target = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            target = target.rsplit(" ", 1)[0]
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]")
            if method != "CONNECT" or not host or not port_text.isdigit():
                return await self.refuse(writer, 405, "only CONNECT host:port is served here")
            port = int(port_text)
            if port not in self.ports:
                return await self.refuse(writer, 403, f"port {port} is not allowed")
            if self.hosts is not None and host.lower() not in self.hosts:
                log(f"{peer[0]} CONNECT {host}:{port}: refused, not a registry")
                return await self.refuse(writer, 403, f"{host} is not one of the package "
                                                      "registries this proxy serves")
            try:
                upstream = await self.open(host, port)
            except (LookupError, OSError, asyncio.TimeoutError) as exc:
                log(f"{peer[0]} CONNECT {host}:{port}: {exc}")
                return await self.refuse(writer, 502, str(exc))
            up_reader, up_writer = upstream
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            try:
                await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:          # one tunnel's bug must not take the others down
            log(f"{peer[0]}: {exc!r}")
        finally:
            writer.close()

    async def open(self, host: str, port: int):
        error: Exception | None = None
        for addr in await self.resolver.resolve(host, port):
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(addr[0], addr[1]), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                error = exc
        raise OSError(f"no address of {host} answered: {error!r}")

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

    @staticmethod
    async def refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        body = (reason + "\n").encode()
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()


async def serve(args: argparse.Namespace) -> None:
    hosts = None if args.allow_any_host else {h.lower() for h in args.allow_host}
    proxy = Proxy(ipaddress.ip_network(args.allow), set(args.port_allowed), hosts)
    server = await asyncio.start_server(proxy.handle, args.listen, args.port, limit=HEAD_LIMIT,
                                        backlog=512)
    if args.user:
        # Start the lookup threads first: after the drop, the interpreter's own files may be
        # unreadable (a Python under /root), so nothing may be imported lazily from then on.
        await asyncio.get_running_loop().getaddrinfo("localhost", 0)
        drop_privileges(args.user)
    async with server:
        await server.serve_forever()


def drop_privileges(user: str) -> None:
    """After binding: the tunnels need no privilege. (Done here rather than by the starter, so
    that the interpreter and this file need not be readable by that user.)"""
    import pwd
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="address to listen on (the bridge's)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--allow", required=True, help="client subnet, e.g. 10.77.0.0/24")
    p.add_argument("--port-allowed", type=int, action="append", default=[],
                   help="destination port a tunnel may reach (repeatable)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="host name a tunnel may reach (repeatable); none given: no host")
    p.add_argument("--allow-any-host", action="store_true",
                   help="any host name (for tests on loopback only)")
    p.add_argument("--user", help="run as this user once listening")
    asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()

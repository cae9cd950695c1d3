"""Redis from Debian: bound to localhost and the private address, a password from the vault
(requirepass), a memory limit and eviction policy, protected mode. The whole redis.conf is
ours (mode 0640, owner redis: it holds the password; diffs show it as ***); a change restarts
redis-server. Redis has no offline config check, so every var is checked here instead.
Which clients may reach the port is the firewall's job (role harden), not Redis'.
"""
from __future__ import annotations

import re

from provisioner.api import apt, config_settings, is_secret, private_address, systemd, templates

HANDLER = "restart redis"
POLICIES = ("noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru",
            "volatile-lfu", "volatile-random", "volatile-ttl")
MEMORY_RE = re.compile(r"^[0-9]+(b|k|kb|m|mb|g|gb)?\Z", re.I)
PASSWORD_RE = re.compile(r'^[!#-&(-\[\]-~]{16,512}\Z')       # printable ASCII but space " ' \
NAME_RE = re.compile(r"^[a-z][a-z0-9-]*\Z")
MANAGED = {"bind", "port", "protected-mode", "requirepass", "maxmemory", "maxmemory-policy",
           "daemonize", "supervised", "pidfile", "logfile", "dir", "dbfilename", "include",
           "user", "aclfile"}


def check(v: dict, ctx) -> dict:
    return config(v, ctx)           # every var is judged there, from the inventory alone


def config(v: dict, ctx) -> dict:
    port = v["redis_port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"redis_port: {port!r} is not a port (1-65535)")
    ip = private_address("redis_bind_address", v["redis_bind_address"], ctx.host, "redis")
    bind = "127.0.0.1 -::1" + ("" if ip.is_loopback else f" {ip}")
    pw = v["redis_password"]
    if not is_secret(pw):
        raise ValueError("redis_password: must come from the vault (`redis_password: !vault "
                         "NAME`), never plain text in the inventory")
    if not PASSWORD_RE.match(pw.reveal()):
        raise ValueError("redis_password: the vault value must be 16 to 512 printable ASCII "
                         "characters without spaces, quotes or backslashes (generate one: "
                         "`openssl rand -hex 24`)")
    maxmemory = str(v["redis_maxmemory"])
    if not MEMORY_RE.match(maxmemory):
        raise ValueError(f"redis_maxmemory: {maxmemory!r} is not a size like 256mb or 2gb")
    policy = v["redis_maxmemory_policy"]
    if policy not in POLICIES:
        raise ValueError(f"redis_maxmemory_policy: {policy!r} is not one of {', '.join(POLICIES)}")
    settings = [f"{name} {value}" for name, value in config_settings(
        "redis_settings", v["redis_settings"], file="redis.conf", name_re=NAME_RE,
        managed=MANAGED).items()]
    return {"bind": bind, "port": port, "password": pw, "maxmemory": maxmemory.lower(),
            "maxmemory_policy": policy,
            "protected_mode": "yes" if v["redis_protected_mode"] else "no", "settings": settings}


def resources(v, ctx):
    c = config(v, ctx)
    yield apt.packages(["redis-server"])
    yield templates.template("/etc/redis/redis.conf", "redis/redis.conf.j2", c, mode="0640",
                             owner="redis", group="redis", notify=HANDLER)
    yield systemd.service("redis-server", enabled=True, running=True)


def handlers(v, ctx):
    return {HANDLER: systemd.handler("restart", "redis-server")}

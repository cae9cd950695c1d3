"""Debian's nginx as a load balancer and TLS reverse proxy, one site per entry of `nginx_sites`:

    nginx_sites:
      - name: app                       # file names, upstream and zone names: [a-z0-9-]
        server_names: [app.example.com, www.app.example.com]   # the first one names the certificate
        upstream_group: app             # inventory group of the app servers (their addresses) ...
        upstream_port: 3000             # ... and the port their app listens on
        static: [{location: /assets/, root: /srv/app/public}]  # served by nginx, cached a year, immutable
        rate_limits: [{location: /login, rate: 5r/s, burst: 10}]
        cache: [{location: /api/catalog/, minutes: 5}]   # the app's 200 answers kept that long

The whole nginx.conf is ours (it holds the TLS profile: Mozilla "intermediate", TLS 1.2 and
1.3, no session tickets, no OCSP stapling; gzip; the access log with request and upstream
times) and includes only `conf.d/*.conf` and `sites-enabled/*.conf`, so Debian's `default`
site is left out. A default server answers an unknown Host with 444 and refuses the TLS
handshake. Each site has two files in sites-available:

- `<name>.conf` (enabled here): port 80, the ACME challenge from /var/www/acme, everything
  else redirected to https;
- `<name>-tls.conf`: the upstream and the TLS server, with its certificate at
  `/etc/nginx/tls/<name>/fullchain.pem` and `privkey.pem`. It is enabled by role letsencrypt
  once that certificate exists (issued or self-signed), so `nginx -t` never sees a TLS block
  whose certificate is missing.

A site whose upstream_group and upstream_port are those of an app with `strategy: blue-green`
(the inventory's `apps:`) gets two upstreams, `<name>_blue` on the app's `port` and
`<name>_green` on its `green_port`, and proxies to the one named in `/etc/nginx/live/<name>.conf`.
That file is `invoke deploy`'s (it flips it); this role writes it only when it is missing, so a
provision never flips a site back nor reports drift (see provisioner/colours.py).

Every change goes through one file group checked by `nginx -t` over the whole configuration
(all reverted on failure) and a graceful reload. A site taken out of `nginx_sites` is disabled:
its links in sites-enabled go (its files stay in sites-available, Debian's way), so nginx stops
serving it on the same run; links made by hand to files elsewhere are left alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from provisioner.api import (Change, Noop, apt, colours, file_group, files, handler, links, reject,
                             run_step, systemd, templates, write_step)

HANDLER = "reload nginx"
AVAILABLE, ENABLED = "/etc/nginx/sites-available", "/etc/nginx/sites-enabled"
TLS_DIR = "/etc/nginx/tls"                  # /etc/nginx/tls/<site>/{fullchain,privkey}.pem
ACME_WEBROOT = "/var/www/acme"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}\Z")
HOST_RE = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
LOCATION_RE = re.compile(r"/[A-Za-z0-9._~/-]*\Z")
RATE_RE = re.compile(r"[1-9][0-9]{0,5}r/[sm]\Z")
SIZE_RE = re.compile(r"[0-9]{1,6}[km]?\Z")
SITE_KEYS = {"name", "server_names", "upstream_group", "upstream_port", "static", "rate_limits",
             "cache"}
CACHE_DIR = "/var/cache/nginx"             # /var/cache/nginx/<site>: a site's proxy cache


def _int(var: str, value, low: int, high: int, example: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        reject(var, f"{value!r} is not a whole number from {low} to {high}", f"write e.g. {example}")
    return value


def _location(var: str, value) -> str:
    if not isinstance(value, str) or not LOCATION_RE.match(value):
        reject(var, f"{value!r} is not a URL path", "write a path like /assets/ (letters, digits, "
               "._~-/ only, starting with /)")
    return value


def _site(i: int, s, ctx, seen: set) -> dict:
    at = f"nginx_sites[{i}]"
    if not isinstance(s, dict) or not {"name", "server_names", "upstream_group",
                                       "upstream_port"} <= set(s) or set(s) - SITE_KEYS:
        reject(at, f"{s!r} is not a site", "write {name: app, server_names: [app.example.com], "
               f"upstream_group: app, upstream_port: 3000}} (keys: {', '.join(sorted(SITE_KEYS))})")
    name = s["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        reject(f"{at}.name", f"{name!r} is not a site name", "use 1-40 lowercase letters, digits "
               "and dashes, e.g. app")
    if name in seen:
        reject(f"{at}.name", f"site {name} is listed twice", "give each site its own name")
    seen.add(name)
    names = s["server_names"]
    if not isinstance(names, list) or not names:
        reject(f"{at}.server_names", f"{names!r} is not a list of host names",
               "write e.g. [app.example.com]")
    for j, n in enumerate(names):
        if not isinstance(n, str) or not HOST_RE.match(n):
            reject(f"{at}.server_names[{j}]", f"{n!r} is not a host name",
                   "write a lowercase DNS name like app.example.com (no wildcard, no port)")
    group = s["upstream_group"]
    if not isinstance(group, str) or group not in ctx.inventory.groups:
        reject(f"{at}.upstream_group", f"no group {group!r} in the inventory (groups: "
               f"{', '.join(ctx.inventory.groups)})", "name the group of the app servers")
    servers = [h.address for h in ctx.inventory.hosts_in(group)]
    if not servers:
        reject(f"{at}.upstream_group", f"group {group} has no hosts", "add the app servers to it")
    port = _int(f"{at}.upstream_port", s["upstream_port"], 1, 65535, "3000")
    static = []
    for j, st in enumerate(s.get("static") or []):
        if not isinstance(st, dict) or set(st) != {"location", "root"}:
            reject(f"{at}.static[{j}]", f"{st!r} is not a static path",
                   "write {location: /assets/, root: /srv/app/public}")
        root = st["root"]
        if not isinstance(root, str) or not re.fullmatch(r"/[A-Za-z0-9._/-]*", root) or ".." in root:
            reject(f"{at}.static[{j}].root", f"{root!r} is not an absolute directory path",
                   "write e.g. /srv/app/public")
        static.append({"location": _location(f"{at}.static[{j}].location", st["location"]),
                       "root": root})
    limits = []
    for j, rl in enumerate(s.get("rate_limits") or []):
        if not isinstance(rl, dict) or not {"location", "rate"} <= set(rl) \
                or set(rl) - {"location", "rate", "burst"}:
            reject(f"{at}.rate_limits[{j}]", f"{rl!r} is not a rate limit",
                   "write {location: /login, rate: 5r/s, burst: 10}")
        if not isinstance(rl["rate"], str) or not RATE_RE.match(rl["rate"]):
            reject(f"{at}.rate_limits[{j}].rate", f"{rl['rate']!r} is not an nginx rate",
                   "write requests per second or minute, e.g. 5r/s or 30r/m")
        limits.append({"location": _location(f"{at}.rate_limits[{j}].location", rl["location"]),
                       "rate": rl["rate"], "zone": f"{name}_{j}",
                       "burst": _int(f"{at}.rate_limits[{j}].burst", rl.get("burst", 10),
                                     0, 10000, "10")})
    cache = []
    for j, c in enumerate(s.get("cache") or []):
        if not isinstance(c, dict) or set(c) != {"location", "minutes"}:
            reject(f"{at}.cache[{j}]", f"{c!r} is not a cached path",
                   "write {location: /api/catalog/, minutes: 5}")
        cache.append({"location": _location(f"{at}.cache[{j}].location", c["location"]),
                      "minutes": _int(f"{at}.cache[{j}].minutes", c["minutes"], 1, 1440, "5")})
    taken = [x["location"] for x in static + limits + cache]
    for loc in taken:
        if taken.count(loc) > 1 or loc == "/":
            reject(f"{at}", f"location {loc} is given twice or is /",
                   "give each static path, rate limit and cached path its own location below /")
    return {"name": name, "server_names": names, "servers": servers, "port": port,
            "colours": _colours(ctx, name, group, port),
            "static": static, "rate_limits": limits, "cache": cache,
            "cache_dir": f"{CACHE_DIR}/{name}",
            "cert": f"{TLS_DIR}/{name}/fullchain.pem", "key": f"{TLS_DIR}/{name}/privkey.pem"}


def _colours(ctx, site: str, group: str, port: int) -> dict | None:
    """A blue-green app behind this site: each colour's upstream name and port, the live file
    and the variable it sets (None: one upstream, `<site>_app`)."""
    for app in getattr(ctx.inventory, "apps", {}).values():
        if app.group == group and app.port == port and app.colours:
            return {"upstreams": [{"name": colours.upstream(site, c), "port": p}
                                  for c, p in app.colours.items()],
                    "live_path": colours.live_path(site), "live_var": colours.live_var(site)}
    return None


def check(v: dict, ctx) -> dict:
    """Every var, from the inventory alone; returns what the templates render."""
    if not isinstance(v["nginx_sites"], list):
        reject("nginx_sites", f"{v['nginx_sites']!r} is not a list", "write a list of sites")
    seen: set = set()
    sites = [_site(i, s, ctx, seen) for i, s in enumerate(v["nginx_sites"])]
    all_names = [n for s in sites for n in s["server_names"]]
    for n in all_names:
        if all_names.count(n) > 1:
            reject("nginx_sites", f"server name {n} is in two sites", "list each name once")
    size = str(v["nginx_client_max_body_size"])
    if not SIZE_RE.match(size):
        reject("nginx_client_max_body_size", f"{size!r} is not an nginx size", "write e.g. 10m or 512k")
    return {
        "sites": sites, "client_max_body_size": size, "gzip": bool(v["nginx_gzip"]),
        "ipv6": bool(v["nginx_ipv6"]), "acme_webroot": ACME_WEBROOT,
        "keepalive": _int("nginx_keepalive", v["nginx_keepalive"], 0, 1024, "16"),
        "max_fails": _int("nginx_max_fails", v["nginx_max_fails"], 0, 100, "2"),
        "fail_timeout": _int("nginx_fail_timeout", v["nginx_fail_timeout"], 1, 3600, "10"),
        "connect_timeout": _int("nginx_proxy_connect_timeout", v["nginx_proxy_connect_timeout"],
                                1, 75, "3"),
        "read_timeout": _int("nginx_proxy_read_timeout", v["nginx_proxy_read_timeout"], 1, 86400, "60"),
        "body_timeout": _int("nginx_client_body_timeout", v["nginx_client_body_timeout"], 1, 3600, "30"),
        "hsts_max_age": _int("nginx_hsts_max_age", v["nginx_hsts_max_age"], 0, 10 ** 9, "31536000"),
    }


def http2_directive(os: dict) -> bool:
    """nginx 1.25.1 brought `http2 on;` (Debian 13: 1.26) and deprecated `listen ... http2`
    (Debian 12: 1.22, where `http2 on;` is unknown)."""
    try:
        return int(str((os or {}).get("version_id", "13")).split(".")[0]) >= 13
    except ValueError:
        return True


@dataclass(frozen=True)
class StaleSites:
    """The links in sites-enabled that this role (or letsencrypt) made for a site no longer in
    nginx_sites: `<name>.conf` and `<name>-tls.conf` pointing into sites-available."""
    keep: tuple[str, ...]             # the sites in nginx_sites

    @property
    def id(self) -> str:
        return f"sites enabled in {ENABLED}"

    def facts(self) -> dict:
        return {"dirs": [ENABLED]}

    def stale(self, facts) -> list[str]:
        wanted = {f"{n}{suffix}.conf" for n in self.keep for suffix in ("", "-tls")}
        return sorted(name for name, e in (facts.dir(ENABLED) or {}).items()
                      if e.get("type") == "link" and name.endswith(".conf") and name not in wanted
                      and str(e.get("target") or "").startswith(f"{AVAILABLE}/"))

    def plan(self, facts) -> list:
        stale = self.stale(facts)
        if not stale:
            return [Noop(self.id, "only the sites of nginx_sites")]
        return [Change(self.id, "disable", f"not in nginx_sites: {', '.join(stale)}",
                       (run_step(["rm", "-f", "--", *(f"{ENABLED}/{n}" for n in stale)]),),
                       None, (HANDLER,))]

    def expect(self, facts) -> dict:
        return {}


@dataclass(frozen=True)
class LiveColour:
    """A blue-green site's live file, written (blue) only when missing: afterwards it is
    `invoke deploy`'s, whatever colour it names."""
    site: str

    @property
    def id(self) -> str:
        return f"live colour of site {self.site}"

    @property
    def path(self) -> str:
        return colours.live_path(self.site)

    def facts(self) -> dict:
        return {"files": [self.path]}

    def plan(self, facts) -> list:
        f = facts.file(self.path)
        if f.exists:
            return [Noop(self.id, f"deploy's: {colours.live_colour(self.site, f.content) or '?'}"
                                  f" (in {self.path})")]
        return [Change(self.id, "write", f"{self.path} absent: blue until the first deploy",
                       (write_step(self.path, colours.live_conf(self.site, "blue"), "0644",
                                   "root", "root"),), None, (HANDLER,))]

    def expect(self, facts) -> dict:
        return {}


def resources(v, ctx):
    c = dict(check(v, ctx), http2_directive=http2_directive(ctx.os))
    yield apt.packages(["nginx"])
    yield files.directory(ACME_WEBROOT)
    for s in c["sites"]:
        if s["cache"]:
            yield files.directory(s["cache_dir"], mode="0700", owner="www-data", group="root")
    if any(s["colours"] for s in c["sites"]):
        yield files.directory(colours.LIVE_DIR)
    for s in c["sites"]:          # before the group: its nginx -t reads them
        if s["colours"]:
            yield LiveColour(s["name"])
    members = [templates.template("/etc/nginx/nginx.conf", "nginx/nginx.conf.j2", c)]
    for s in c["sites"]:
        site = dict(c, site=s)
        members += [
            templates.template(f"{AVAILABLE}/{s['name']}.conf", "nginx/site.conf.j2", site),
            templates.template(f"{AVAILABLE}/{s['name']}-tls.conf", "nginx/site-tls.conf.j2", site),
            links.link(f"{ENABLED}/{s['name']}.conf", f"{AVAILABLE}/{s['name']}.conf"),
        ]
    yield file_group("nginx", members, check=["nginx", "-t", "-q"], notify=HANDLER)
    yield StaleSites(tuple(s["name"] for s in c["sites"]))
    yield systemd.service("nginx", enabled=True, running=True)


def handlers(v, ctx):
    return {HANDLER: handler("reload", "nginx")}

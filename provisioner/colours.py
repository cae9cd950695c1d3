"""Blue-green (`strategy: blue-green` of an app): which colour a load balancer sends a site's
requests to, as one small nginx file per site that role nginx includes and `invoke deploy` /
`invoke rollback` own.

Why a file owned by deploy rather than a var: the live colour changes at every deploy, and the
inventory must not say which one it is, or the next `invoke provision` would flip it back (or
report drift until someone edits the inventory). So role nginx renders everything that comes
from the inventory (both upstreams, `<site>_blue` and `<site>_green`, with the group's servers
and each colour's port; `proxy_pass http://$<site>_live`) and writes this file only when it
is missing (blue: the first deploy goes live as green); deploy rewrites it, checks `nginx -t`,
reloads. A host added to the group joins both upstreams at the next provision and serves the
live colour; nothing the role plans depends on the colour.
"""
from __future__ import annotations

import re

COLOURS = ("blue", "green")
LIVE_DIR = "/etc/nginx/live"          # one file per blue-green site, included by its TLS server


def other(colour: str) -> str:
    return COLOURS[1 - COLOURS.index(colour)]


def live_path(site: str) -> str:
    return f"{LIVE_DIR}/{site}.conf"


def live_var(site: str) -> str:
    """The nginx variable naming the live upstream (site names may hold '-')."""
    return f"{site.replace('-', '_')}_live"


def upstream(site: str, colour: str) -> str:
    return f"{site}_{colour}"


def process(app: str, colour: str) -> str:
    """The pm2 app of one colour of an app (role pm2 writes it, deploy starts it)."""
    return f"{app}-{colour}"


def ecosystem(app: str, colour: str | None) -> str:
    """The pm2 ecosystem file of an app (colour None) or of one of its colours."""
    return f"/srv/{app}/ecosystem{'-' + colour if colour else ''}.config.js"


def link(app: str, colour: str) -> str:
    """The link a colour runs from: /srv/<app>/<colour> -> releases/<id>."""
    return f"/srv/{app}/{colour}"


def live_conf(site: str, colour: str) -> str:
    """The file's whole text: a map whose only value is the live colour's upstream."""
    return (f"# Managed by invoke deploy (blue-green): the colour site {site} sends requests to.\n"
            f"# Role nginx writes it only when missing; deploy and rollback flip it.\n"
            f"map $host ${live_var(site)} {{\n    default {upstream(site, colour)};\n}}\n")


def live_colour(site: str, text: str | None) -> str | None:
    """The colour a live file names (None: missing or not ours)."""
    m = re.search(rf"^\s*default\s+{re.escape(site)}_(blue|green);", text or "", re.M)
    return m.group(1) if m else None

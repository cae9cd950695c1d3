"""The load balancers in front of an app, as a deploy sees them: which hosts (role nginx with a
site whose upstream_group and upstream_port are the app's), and for `strategy: blue-green`
the colour their sites send requests to, read and flipped in one exec per load balancer
(provisioner/remote/deploy.py: ops `colours` and `flip`; the file format: provisioner/colours.py).
"""
from __future__ import annotations

from provisioner import colours
from provisioner.inventory import App, Host, Inventory


def balancers(inv: Inventory, app: App) -> list[tuple[Host, tuple[str, ...]]]:
    """(host, the names of its sites in front of the app) for every such host, file order."""
    out = []
    for h in inv.hosts.values():
        if "nginx" not in inv.roles_for(h.name):
            continue
        sites = tuple(s["name"] for s in inv.hostvars(h.name).get("nginx_sites") or []
                      if isinstance(s, dict) and s.get("upstream_group") == app.group
                      and s.get("upstream_port") == app.port and isinstance(s.get("name"), str))
        if sites:
            out.append((h, sites))
    return out


def live_colour(fleet) -> tuple[str | None, str]:
    """The colour every load balancer sends the app's requests to: (colour, what was seen);
    None when they are unreachable, disagree or have no live file (not provisioned yet)."""
    def fn(h: Host):
        paths = [colours.live_path(s) for s in fleet.sites[h.name]]
        a = fleet.call(h, {"op": "colours", "app": fleet.app.name, "files": paths})
        if not a.get("ok"):
            return "failed", a.get("error", "failed"), a
        a["live"] = {site: colours.live_colour(site, a["files"][colours.live_path(site)])
                     for site in fleet.sites[h.name]}
        return "ok", ", ".join(f"site {s}: {c or 'no live file'}"
                               for s, c in a["live"].items()), a
    answers = fleet.each([h for h, _ in fleet.balancers], "live colour", fn)
    seen = {f"{n} site {s}": c for n, a in answers.items()
            for s, c in (a.get("live") or {}).items()}
    found = set(seen.values())
    text = "; ".join(f"{k}: {v or 'none'}" for k, v in seen.items()) or "no answer"
    if all(a.get("ok") for a in answers.values()) and len(found) == 1 and None not in found:
        return found.pop(), text
    return None, text


def flip(fleet, colour: str) -> dict[str, dict]:
    """Every load balancer's sites to `colour`, in parallel: live files written, `nginx -t`,
    graceful reload (a refused check keeps the old files)."""
    def fn(h: Host):
        sites = fleet.sites[h.name]
        a = fleet.call(h, {"op": "flip", "app": fleet.app.name,
                           "files": {colours.live_path(s): colours.live_conf(s, colour)
                                     for s in sites}})
        if not a.get("ok"):
            return "failed", a.get("error", "failed"), a
        return "changed", (f"site {', '.join(sites)} -> {colour} (nginx -t, reload) in "
                           f"{a['seconds']:.2f} s"), a
    return fleet.each([h for h, _ in fleet.balancers], f"flip to {colour}", fn)

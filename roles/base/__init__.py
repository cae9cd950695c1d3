"""Role `base`: what every server shares: timezone, extra packages, provisioner's own folders."""
import re

from provisioner.api import apt, files, links, reject

ZONE_RE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")     # no '..', no newline


def check(v, ctx):
    if not isinstance(v["base_timezone"], str) or not ZONE_RE.match(v["base_timezone"]):
        reject("base_timezone", f"{v['base_timezone']!r} is not a time zone name",
               "write a name from /usr/share/zoneinfo, e.g. UTC or Europe/Paris")


def resources(v, ctx):
    check(v, ctx)
    if v["base_packages"]:
        yield apt.packages(v["base_packages"])
    yield files.file("/etc/timezone", v["base_timezone"] + "\n", mode="0644")
    yield links.link("/etc/localtime", f"/usr/share/zoneinfo/{v['base_timezone']}")
    yield files.directory("/var/log/provisioner", mode="0750")

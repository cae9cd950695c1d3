"""Role `base`: what every server shares: timezone, extra packages, provisioner's own folders."""
from provisioner.api import apt, files, links


def resources(v, ctx):
    if v["base_packages"]:
        yield apt.packages(v["base_packages"])
    yield files.file("/etc/timezone", v["base_timezone"] + "\n", mode="0644")
    yield links.link("/etc/localtime", f"/usr/share/zoneinfo/{v['base_timezone']}")
    yield files.directory("/var/log/provisioner", mode="0750")

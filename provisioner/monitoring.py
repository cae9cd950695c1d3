"""What the monitoring roles agree on, derived from the inventory alone: which exporters a host
runs (from its roles), on which ports, and which hosts may scrape them. Role monitoring_agent
starts the exporters, role harden opens their ports to the monitoring servers, role monitoring
scrapes them: one table, so the three cannot drift apart. Roles reach it through
provisioner.api.
"""
from __future__ import annotations

# exporter -> (the role that brings it in, or None for every agent host; its port: Debian's
# default for each package, kept so that the packages' own docs stay true)
EXPORTERS = {
    "node": (None, 9100),
    "postgres": ("postgresql", 9187),
    "redis": ("redis", 9121),
    "nginx": ("nginx", 9113),
}
AGENT_ROLE = "monitoring_agent"
SERVER_ROLE = "monitoring"
# the ports harden opens to the monitoring servers on an agent host: all of EXPORTERS, one
# rule per source (a range: a later exporter needs no firewall change)
PORT_RANGE = f"{min(p for _, p in EXPORTERS.values())}:{max(p for _, p in EXPORTERS.values())}"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"     # the node exporter's textfile collector


def exporters_of(inventory, host_name: str) -> dict[str, int]:
    """{exporter: port} a host runs: none unless it has the agent role."""
    roles = inventory.roles_for(host_name)
    if AGENT_ROLE not in roles:
        return {}
    return {name: port for name, (role, port) in EXPORTERS.items() if role is None or role in roles}


def agent_hosts(inventory) -> list:
    """The inventory's hosts that run the agent, in file order."""
    return [h for h in inventory.hosts.values() if AGENT_ROLE in inventory.roles_for(h.name)]


def monitoring_sources(inventory) -> list[str]:
    """The addresses of the hosts that scrape (role monitoring), in file order."""
    return [h.address for h in inventory.hosts.values()
            if SERVER_ROLE in inventory.roles_for(h.name)]

"""The server operating systems provisioner supports, and the refusal of any other.

Checked on the first exec of a run, before any role is planned: a role written for Debian must
never half-apply on another system.
"""
from __future__ import annotations

# Debian's version -> codename, for the releases every role is tested on (both in the local env).
DEBIAN = {"12": "bookworm", "13": "trixie"}


def unsupported(os_facts: dict) -> str | None:
    """Why the server's system is not supported (None when it is)."""
    name = os_facts.get("id") or "an unknown system"
    version = os_facts.get("version_id") or "?"
    supported = ", ".join(f"Debian {v} ({c})" for v, c in DEBIAN.items())
    if name == "debian" and version in DEBIAN:
        return None
    what = f"Debian {version}" if name == "debian" else f"{name} {version}"
    return (f"{what} is not supported; provisioner supports {supported}: upgrade the server or "
            "leave it out of this run (--limit)")

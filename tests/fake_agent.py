"""A connection that answers the agent's requests in-process, for runner tests without servers:
`answer(op, request)` returns the agent's answer body (the protocol version is added here)."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Callable

from provisioner import agent
from provisioner.facts import Facts, check_key


class AgentConn:
    def __init__(self, answer: Callable[[str, dict], dict]):
        self.answer, self.commands = answer, 0

    def open(self):
        pass

    def close(self):
        pass

    def run(self, argv, stdin=None):
        self.commands += 1
        doc = json.loads(stdin)
        body = {**self.answer(doc["op"], doc["request"]), "agent": {"version": agent.PROTOCOL}}
        return SimpleNamespace(stdout=agent.MARKER + json.dumps(body).encode(), stderr=b"", rc=0)


def all_applied(request: dict) -> dict:
    """The apply answer of a server where every change of `request` succeeded."""
    return {"ok": True, "handlers": [],
            "results": [{"id": c["id"], "status": "ok"} for c in request["changes"]]}


def two_role_inventory(tmp_path, env: str, role_source: str, default: str):
    """Env `env`: web1 and web2 (TEST-NET addresses: never reached) with roles one and two, each
    `role_source` and the defaults line `default` with {name} filled in."""
    return roles_inventory(tmp_path, env, {
        name: (role_source.replace("{name}", name), default.replace("{name}", name))
        for name in ("one", "two")})


def roles_inventory(tmp_path, env: str, roles: dict[str, tuple[str, str]]):
    """Env `env`: web1 and web2 (TEST-NET addresses: never reached) with these roles, in this
    order: name -> (its source, its defaults line)."""
    from provisioner.inventory import load_inventory_file
    for name, (source, default) in roles.items():
        (tmp_path / "roles" / name).mkdir(parents=True)
        (tmp_path / "roles" / name / "defaults.yml").write_text(default + "\n")
        (tmp_path / "roles" / name / "__init__.py").write_text(source)
    doc = {"env": env, "known_hosts": str(tmp_path / "known_hosts"), "ssh": {"user": "root"},
           "hosts": {"web1": {"address": "192.0.2.1"}, "web2": {"address": "192.0.2.2"}},
           "groups": {"all": {"hosts": ["web1", "web2"], "roles": list(roles)}}}
    (tmp_path / f"{env}.yml").write_text(json.dumps(doc))
    return load_inventory_file(tmp_path / f"{env}.yml", roles_root=[tmp_path / "roles"])


# folders of a fresh Debian image that roles write into
DEBIAN_FOLDERS = ("/etc", "/etc/default", "/etc/systemd/system", "/usr/local/lib", "/usr/local/bin",
                  "/var/lib", "/var/log", "/srv", "/opt")


def fresh_server(request: dict, os_facts: dict, folders=()) -> Facts:
    """What a never-provisioned server answers to `request` (a facts request): nothing the
    roles ask for exists, but these `folders` (e.g. DEBIAN_FOLDERS)."""
    absent = {"files": {"exists": False}, "sysctl": {"value": None, "persisted": []},
              "http": {"error": "connection refused"}}
    there = {"exists": True, "type": "dir", "mode": "0755", "owner": "root", "group": "root"}
    d = {"os": os_facts}
    for kind, keys in request.items():
        if kind == "packages":
            d[kind] = {"installed": {k: None for k in keys}, "lists_age": None}
        elif kind == "checks":
            d[kind] = {check_key(k["argv"] if isinstance(k, dict) else k): 1 for k in keys}
        elif kind == "files":
            d[kind] = {k: dict(there) if k in folders else absent["files"] for k in keys}
        elif kind != "os":
            d[kind] = {k: absent.get(kind) for k in keys}
    return Facts(d)

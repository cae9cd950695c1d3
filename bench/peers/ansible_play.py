"""ansible-core's side of the peers benchmark: the workload spec (bench/peers/workload.py) as a
playbook of ansible.builtin modules only (what ansible-core ships), its inventory and its
ansible.cfg. Pure: writes files, runs nothing.

Settings, each the documented way to make ansible fast, so that it is measured at its best:
no fact gathering (nothing here reads a fact), SSH pipelining (one SSH command per task instead
of copying the module first), and ansible's own SSH multiplexing as it ships (ControlPersist
keeps a connection between runs; ours opens a new one per run). Host keys are checked against
the testbed's known_hosts only.
"""
from __future__ import annotations

import json
from pathlib import Path


def playbook(spec: dict) -> list[dict]:
    tasks: list[dict] = []
    for i, s in enumerate(spec["steps"]):
        tasks += _tasks(i, s)
    handlers = [{"name": name, "ansible.builtin.command": {"argv": ["sh", "-c", command]}}
                for name, command in spec["handlers"].items()]
    play = {"name": "peers benchmark", "hosts": "all", "gather_facts": False, "tasks": tasks}
    if handlers:
        play["handlers"] = handlers
    return [play]


def _tasks(i: int, s: dict) -> list[dict]:
    kind = s["kind"]
    if kind == "packages":
        # lists refreshed only when a day old: a converged run never refreshes (as ours)
        return [{"name": "packages", "ansible.builtin.apt": {
            "name": s["names"], "state": "present", "install_recommends": False,
            "update_cache": True, "cache_valid_time": 86400}}]
    if kind == "group":
        return [{"name": f"group {s['name']}", "ansible.builtin.group": {"name": s["name"]}}]
    if kind == "user":
        args = {"name": s["name"], "shell": s["shell"], "home": s["home"], "system": s["system"],
                "create_home": True}
        if s["groups"]:
            args.update(groups=s["groups"], append=True)
        return [{"name": f"user {s['name']}", "ansible.builtin.user": args}]
    if kind == "touch":
        # state touch alone changes the times on every run: keep them, so that it converges
        return [{"name": f"touch {s['path']}", "ansible.builtin.file": {
            "path": s["path"], "state": "touch", "modification_time": "preserve",
            "access_time": "preserve"}}]
    if kind == "copy":
        return [{"name": f"copy {s['path']}", "ansible.builtin.copy": {
            "src": s["src"], "dest": s["path"], "mode": s["mode"]}}]
    if kind == "owner":
        return [{"name": f"owner of {s['path']}", "ansible.builtin.file": {
            "path": s["path"], "owner": s["owner"]}}]
    if kind == "file":
        task = {"name": f"file {s['path']}", "ansible.builtin.copy": {
            "content": s["content"], "dest": s["path"], "mode": s["mode"], "owner": s["owner"],
            "group": s["group"]}}
        if s.get("notify"):
            task["notify"] = [s["notify"]]
        if not s.get("after"):
            return [task]
        task["register"] = f"step{i}"
        return [task, {"name": f"after {s['path']}", "when": f"step{i} is changed",
                       "ansible.builtin.command": {"argv": ["sh", "-c", s["after"]]}}]
    if kind == "dir":
        return [{"name": f"dir {s['path']}", "ansible.builtin.file": {
            "path": s["path"], "state": "directory", "mode": s["mode"], "owner": s["owner"],
            "group": s["group"]}}]
    if kind == "line":
        return [{"name": f"line in {s['path']}", "ansible.builtin.lineinfile": {
            "path": s["path"], "regexp": s["regexp"], "line": s["line"]}}]
    if kind == "command":
        # ansible's way of "unless": a check that never reports a change, then the command
        # (read-only: it runs in --check mode too, so the command's condition can be judged)
        return [{"name": f"check: {s['name']}", "register": f"step{i}", "changed_when": False,
                 "failed_when": False, "check_mode": False,
                 "ansible.builtin.command": {"argv": ["sh", "-c", s["unless"]]}},
                {"name": s["name"], "when": f"step{i}.rc != 0",
                 "ansible.builtin.command": {"argv": ["sh", "-c", s["run"]]}}]
    if kind == "service":
        return [{"name": f"service {s['name']}", "ansible.builtin.systemd_service": {
            "name": s["name"], "enabled": True, "state": "started"}}]
    raise ValueError(f"unknown step kind {kind!r}")


def arguments(plays: list[dict]) -> dict[str, set[str]]:
    """{module: the argument names the plays give it} (for checking them against its doc)."""
    used: dict[str, set[str]] = {}
    for play in plays:
        for task in play["tasks"] + play.get("handlers", []):
            module = next(k for k in task if k.startswith("ansible.builtin."))
            used.setdefault(module, set()).update(task[module])
    return used


def inventory(hosts: dict[str, str], key: Path, known_hosts: Path) -> dict:
    """{name: address} as an ansible YAML inventory, logging in as root with the testbed key."""
    return {"all": {"hosts": {name: {"ansible_host": address} for name, address in hosts.items()},
                    "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(key),
                             "ansible_python_interpreter": "/usr/bin/python3",
                             "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} "
                                                        "-o StrictHostKeyChecking=yes"}}}


CONFIG = """[defaults]
host_key_checking = True
gathering = explicit
forks = 50
stdout_callback = default
retry_files_enabled = False
interpreter_python = /usr/bin/python3

[ssh_connection]
pipelining = True
"""


def write(spec: dict, hosts: dict[str, str], key: Path, known_hosts: Path, folder: Path) -> dict[str, Path]:
    """playbook.yml, inventory.yml and ansible.cfg in `folder` (JSON is YAML)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"playbook": folder / "playbook.yml", "inventory": folder / "inventory.yml",
           "config": folder / "ansible.cfg"}
    out["playbook"].write_text(json.dumps(playbook(spec), indent=1) + "\n")
    out["inventory"].write_text(json.dumps(inventory(hosts, key, known_hosts), indent=1) + "\n")
    out["config"].write_text(CONFIG)
    return out

"""Plain Fabric doing the small workload without idempotence: one command (or one upload) per
step, every time, no facts, no change report. The floor of what SSH round trips cost for these
steps from Python: the other tools each add their checking and reporting on top of it.

    python3 fabric_small.py SPEC KEY KNOWN_HOSTS ADDRESS...     (run by run.py)

Hosts one after the other, as a plain script would; with one host (the default) that is moot.
"""
import json
import shlex
import sys

import paramiko
from fabric import Connection


def commands(step: dict) -> list[str]:
    """The shell command a plain script runs for a step (copy is an upload, not a command)."""
    kind, q = step["kind"], shlex.quote
    if kind == "user":
        return [f"id -u {q(step['name'])} >/dev/null 2>&1 || useradd -m -s {q(step['shell'])} "
                f"-d {q(step['home'])} {q(step['name'])}"]
    if kind == "touch":
        return [f"touch {q(step['path'])}"]
    if kind == "copy":
        return []                 # the upload (Fabric's put keeps the local file's mode, 0644)
    if kind == "owner":
        return [f"chown {q(step['owner'])} {q(step['path'])}"]
    raise ValueError(f"plain Fabric runs the small workload only, not a {kind!r} step")


def main(spec_path: str, key: str, known_hosts: str, *addresses: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    for address in addresses:
        c = Connection(address, user="root", connect_kwargs={"key_filename": key})
        c.client.load_host_keys(known_hosts)          # strict, as the other tools
        c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        with c:
            for step in spec["steps"]:
                if step["kind"] == "copy":
                    c.put(step["src"], step["path"])
                for command in commands(step):
                    c.run(command, hide=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

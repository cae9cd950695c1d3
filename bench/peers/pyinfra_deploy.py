"""pyinfra's side of the peers benchmark: the workload in the spec file named by PEERS_SPEC
(bench/peers/workload.py), as pyinfra operations. Run by `pyinfra -y INVENTORY thisfile`
inside the benchmark's own venv; it imports only pyinfra and the standard library.

pyinfra has no handlers: a step's `notify` becomes a shell operation at the end that runs only
if one of the operations that notify it changed (operations.util.any_changed), and `after`
one right behind its file. A `command`'s check runs as a fact while the deploy is planned."""
import json
import os
from io import StringIO

from pyinfra import host
from pyinfra.facts.server import Command
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

with open(os.environ["PEERS_SPEC"], encoding="utf-8") as f:
    SPEC = json.load(f)
notified: dict[str, list] = {name: [] for name in SPEC["handlers"]}

for s in SPEC["steps"]:
    kind = s["kind"]
    if kind == "packages":
        # lists refreshed only when a day old: a converged run never refreshes (as ours)
        apt.packages(name="packages", packages=s["names"], update=True, cache_time=86400,
                     no_recommends=True)
    elif kind == "group":
        server.group(name=f"group {s['name']}", group=s["name"])
    elif kind == "user":
        server.user(name=f"user {s['name']}", user=s["name"], shell=s["shell"], home=s["home"],
                    system=s["system"], groups=s["groups"] or None, append=True, create_home=True)
    elif kind == "touch":
        files.file(name=f"touch {s['path']}", path=s["path"], present=True)
    elif kind == "copy":
        files.put(name=f"copy {s['path']}", src=s["src"], dest=s["path"], mode=s["mode"])
    elif kind == "owner":
        files.file(name=f"owner of {s['path']}", path=s["path"], user=s["owner"])
    elif kind == "file":
        op = files.put(name=f"file {s['path']}", src=StringIO(s["content"]), dest=s["path"],
                       mode=s["mode"], user=s["owner"], group=s["group"])
        if s.get("notify"):
            notified[s["notify"]].append(op)
        if s.get("after"):
            server.shell(name=f"after {s['path']}", commands=[s["after"]], _if=op.did_change)
    elif kind == "dir":
        files.directory(name=f"dir {s['path']}", path=s["path"], mode=s["mode"],
                        user=s["owner"], group=s["group"])
    elif kind == "line":
        files.line(name=f"line in {s['path']}", path=s["path"], line=s["regexp"],
                   replace=s["line"])
    elif kind == "command":
        done = host.get_fact(Command, command=f"({s['unless']}) >/dev/null 2>&1 && echo yes || echo no")
        if done != "yes":
            server.shell(name=s["name"], commands=[s["run"]])
    elif kind == "service":
        systemd.service(name=f"service {s['name']}", service=s["name"], running=True, enabled=True)
    else:
        raise ValueError(f"unknown step kind {kind!r}")

for handler, ops in notified.items():
    if ops:
        server.shell(name=f"handler {handler}", commands=[SPEC["handlers"][handler]],
                     _if=any_changed(*ops))

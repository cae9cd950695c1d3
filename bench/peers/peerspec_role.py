"""Role `peerspec` (the peers benchmark's copy of it): the workload in spec.json beside it
(bench/peers/workload.py), as our resources. run.py copies this file to
<throwaway root>/roles/peerspec/__init__.py with the spec and an empty defaults.yml."""
import json
from pathlib import Path

from provisioner.api import apt, commands, files, lines, run_step, systemd, users

SPEC = json.loads(Path(__file__).with_name("spec.json").read_text())


def resources(v, ctx):
    steps = SPEC["steps"]
    # ours: a file's owner is part of the one resource that manages the file
    owners = {s["path"]: s["owner"] for s in steps if s["kind"] == "owner"}
    for s in steps:
        kind = s["kind"]
        if kind == "packages":
            yield apt.packages(s["names"])
        elif kind == "group":
            yield users.group(s["name"])
        elif kind == "user":
            yield users.user(s["name"], groups=s["groups"], shell=s["shell"], home=s["home"],
                             system=s["system"])
        elif kind == "touch":
            yield commands.command(["touch", s["path"]], creates=s["path"])
        elif kind == "copy":
            yield files.file(s["path"], Path(s["src"]).read_text(), mode=s["mode"],
                             owner=owners.get(s["path"], "root"))
        elif kind == "file":
            yield files.file(s["path"], s["content"], mode=s["mode"], owner=s["owner"],
                             group=s["group"], notify=s.get("notify") or (),
                             after=[["sh", "-c", s["after"]]] if s.get("after") else ())
        elif kind == "dir":
            yield files.directory(s["path"], mode=s["mode"], owner=s["owner"], group=s["group"])
        elif kind == "line":
            yield lines.line(s["path"], s["line"], regexp=s["regexp"])
        elif kind == "command":
            yield commands.command(["sh", "-c", s["run"]], unless=["sh", "-c", s["unless"]],
                                   name=s["name"])
        elif kind == "service":
            yield systemd.service(s["name"], enabled=True, running=True)
        # "owner": done by the copy above


def handlers(v, ctx):
    return {name: [run_step(["sh", "-c", command])] for name, command in SPEC["handlers"].items()}

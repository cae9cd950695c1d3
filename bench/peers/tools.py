"""How each tool of the peers benchmark is run and how its output says whether the run changed
anything: pure command lines, files and parsers (run.py runs them).

Every tool runs as a fresh process, as a user starts it: interpreter start-up and imports count,
for us too (the `invoke provision` of a throwaway checkout, as bench/startup.py runs it).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from peers.workload import write

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TESTBED = REPO / ".testbed"
KEY = TESTBED / "id_ed25519"
KNOWN_HOSTS = TESTBED / "known_hosts"

TOOLS = ("ours", "pyinfra", "ansible", "fabric", "ours-roles")
ROLES = ("base", "harden", "node", "pm2", "postgresql")        # ours-roles: our real ones
SPEC_ROLES = {"small": "peers_small", "provision": "peers_provision"}   # our role per workload


@dataclass(frozen=True)
class Outcome:
    changed: int                   # steps/tasks/operations that changed something
    failed: int                    # failed or unreachable
    execs: int | None = None       # remote commands per host (ours only)


def assign(tools: list[str], per_tool: int, first: int) -> dict[str, list[str]]:
    """Each tool its own bench servers, `per_tool` each, from bench<first> on: no tool ever
    finds the state another left, nor fights it."""
    out, n = {}, first
    for tool in tools:
        out[tool] = [f"bench{i:02d}" for i in range(n, n + per_tool)]
        n += per_tool
    return out


# --- ours ---------------------------------------------------------------------------------

def ours_inventory(env: str, hosts: dict[str, str], roles: list[str], *, real: bool,
                   gateway: str) -> dict:
    """An inventory of `hosts` ({name: address}) with `roles`. The spec roles log in as root,
    as the peers do. Our real roles harden the server: they log in as `deploy` (root only
    until harden made it, as on a fresh server) and trust the controller's address."""
    ssh = {"user": "root", "key": str(KEY), "connect_timeout": 10}
    env_vars: dict = {}
    if real:
        ssh.update(user="deploy", bootstrap_user="root")
        env_vars = {"harden_trusted_sources": [gateway], "postgresql_client_group": ""}
    return {"env": env, "known_hosts": str(KNOWN_HOSTS), "ssh": ssh, "vars": env_vars,
            "hosts": {name: {"address": address} for name, address in hosts.items()},
            "groups": {"peers": {"hosts": list(hosts), "roles": list(roles)}}}


def ours_root(folder: Path, specs: dict[str, dict], inventories: dict[str, dict]) -> Path:
    """A throwaway checkout: our roles (linked), one role per workload spec (peerspec_role.py
    with the spec beside it) and the inventories. The product's checkout is never written."""
    roles = folder / "roles"
    roles.mkdir(parents=True)
    for name in ROLES:
        (roles / name).symlink_to(REPO / "roles" / name)
    for workload, spec in specs.items():
        role = roles / SPEC_ROLES[workload]
        role.mkdir()
        shutil.copyfile(HERE / "peerspec_role.py", role / "__init__.py")
        (role / "defaults.yml").write_text("# no vars: the workload is spec.json\n")
        write(spec, role / "spec.json")
    (folder / "inventories").mkdir()
    for env, doc in inventories.items():
        (folder / "inventories" / f"{env}.yml").write_text(json.dumps(doc, indent=1) + "\n")
    return folder


def ours_argv(root: Path, env: str) -> list[str]:
    from startup import HARNESS          # the real `invoke` program on a throwaway checkout
    return [sys.executable, "-c", HARNESS, str(REPO), str(root), "0",
            "provision", "--env", env, "--yes", "--json"]


def ours_outcome(stdout: str) -> Outcome:
    """From the recap, the last line of `--json` output."""
    recap = json.loads(stdout.strip().splitlines()[-1])
    if recap.get("event") != "recap":
        raise ValueError("no recap at the end of the output")
    execs = max((h["remote_commands"] for h in recap["hosts"].values()), default=0)
    return Outcome(recap["changed"], recap["failed"] + recap["unreachable"], execs)


# --- pyinfra --------------------------------------------------------------------------------

def pyinfra_inventory(hosts: dict[str, str]) -> str:
    """An inventory file: the hosts by address, root with the testbed key, strict host keys."""
    data = {"ssh_user": "root", "ssh_key": str(KEY), "ssh_known_hosts_file": str(KNOWN_HOSTS),
            "ssh_strict_host_key_checking": "yes"}
    rows = ",\n".join(f"    ({address!r}, {data!r})" for address in hosts.values())
    return f"hosts = [\n{rows},\n]\n"


def pyinfra_argv(venv: Path, inventory: Path) -> list[str]:
    return [str(venv / "bin" / "pyinfra"), "-y", str(inventory), str(HERE / "pyinfra_deploy.py")]


_TOTAL = re.compile(r"^\s*Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", re.M)


def pyinfra_outcome(output: str) -> Outcome:
    """From the results table's last row: Grand total, hosts, success (= changed), error,
    no change; "-" is 0."""
    m = _TOTAL.search(_plain(output))
    if not m:
        raise ValueError("no 'Grand total' row in pyinfra's output")
    n = [0 if x == "-" else int(x) for x in m.groups()]
    return Outcome(changed=n[1], failed=n[2])


# --- ansible --------------------------------------------------------------------------------

def ansible_argv(venv: Path, files: dict[str, Path]) -> list[str]:
    return [str(venv / "bin" / "ansible-playbook"), "-i", str(files["inventory"]),
            str(files["playbook"])]


_RECAP = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ansible_outcome(output: str) -> Outcome:
    """From PLAY RECAP: changed, and failed + unreachable, summed over the hosts."""
    rows = _RECAP.findall(_plain(output.split("PLAY RECAP", 1)[-1]))
    if "PLAY RECAP" not in output or not rows:
        raise ValueError("no PLAY RECAP in ansible's output")
    return Outcome(changed=sum(int(r[1]) for r in rows),
                   failed=sum(int(r[2]) + int(r[3]) for r in rows))


# --- plain Fabric ---------------------------------------------------------------------------

def fabric_argv(spec: Path, addresses: list[str]) -> list[str]:
    return [sys.executable, str(HERE / "fabric_small.py"), str(spec), str(KEY), str(KNOWN_HOSTS),
            *addresses]


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)

"""Start-up cost of the command line, measured without any server: what a user waits for before
`invoke` does anything, and what a converged run spends before its first connection.

    python3 bench/startup.py [--rounds 9] [--packages 12] [--json]

Each command runs `--rounds` times in a fresh interpreter (interleaved, so drift on a loaded
machine hits them alike), after one warm-up round; it prints the median wall time and the median
CPU time of the child (CPU is steadier than wall on a shared machine), then the heaviest
packages `invoke --list` and the provision run import. The environment is used as it is (the
first line says whether PYTHONDONTWRITEBYTECODE makes every run compile our sources again).
"Before the first connection" is `invoke provision` of one host with web1's roles (base, harden,
node, pm2) and a vault, in a throwaway checkout: the time from starting the interpreter to its
first TCP connect (seen by an audit hook, which imports nothing), after which the run stops.
`--json` adds the medians as one JSON line (bench/all.py reads it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import cryptography  # noqa: E402
from sshpeers import closed_port, ed25519_key, known_line, write_private_key  # noqa: E402

# The child runs the real invoke program from a throwaway checkout, and invoke loads tasks.py
# itself, after parsing its own flags, as the `invoke` command does (importing it first would
# hide that invoke turns the bytecode cache off before it loads tasks.py); with a port, it ends
# at its first TCP connect to that port and prints the monotonic clock (system-wide on Linux, so
# comparable with ours).
HARNESS = """
import sys
port = int(sys.argv[3])
if port:
    def _hook(event, args, _port=port):
        if event == "socket.connect" and args[1][1:2] == (_port,):
            import os, time
            print("connect-at", time.monotonic(), flush=True)
            os._exit(0)
    sys.addaudithook(_hook)
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import provisioner.cli.common as common
common.REPO_ROOT = Path(sys.argv[2])
from invoke import Program
Program(binary="invoke", name="invoke").run(["invoke", "--search-root", sys.argv[1], *sys.argv[4:]])
"""

WEB1 = """env: bench
known_hosts: known_hosts/bench
ssh: {{user: deploy, bootstrap_user: root, key: id_bench, connect_timeout: 1}}
vars:
  harden_trusted_sources: [127.0.0.1]
hosts:
  web1: {{address: 127.0.0.1, port: {port}}}
groups:
  app:
    hosts: [web1]
    roles: [base, harden, node, pm2]
    vars:
      node_apps: [sample]
      pm2_apps:
        - name: sample
          script: server.js
          env: {{PORT: "3000", DATABASE_PASSWORD: !vault pg_app_password}}
"""


def make_root(tmp: Path, port: int) -> tuple[Path, dict[str, str]]:
    """A checkout with env `bench` (web1 on 127.0.0.1:port), its key, known_hosts and vault;
    and the environment that opens that vault without a prompt."""
    import paramiko
    from provisioner import vault
    root = tmp / "root"
    (root / "inventories" / "known_hosts").mkdir(parents=True)
    (root / "roles").symlink_to(REPO / "roles")
    (root / "inventories" / "bench.yml").write_text(WEB1.format(port=port))
    write_private_key(paramiko.ECDSAKey.generate(), root / "inventories" / "id_bench")
    host_key = known_line(f"[127.0.0.1]:{port}", ed25519_key())
    (root / "inventories" / "known_hosts" / "bench").write_text(host_key)
    password = "bench-only-password"          # a throwaway vault in a temp folder
    vault.save_vault(vault.vault_path("bench", root), {"pg_app_password": "x" * 24}, password)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROVISIONER_VAULT")}
    env[vault.PASSWORD_ENV] = password
    return root, env


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, child CPU seconds, stdout) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    for line in p.stdout.splitlines():         # a provision run: up to its first connect
        if line.startswith("connect-at "):
            wall = float(line.split()[1]) - t0
    return wall, cpu, p.stdout


def heaviest_packages(argv: list[str], cwd: Path, env: dict[str, str], top: int):
    """(milliseconds, package) of what `argv` imports, by top-level package (self times summed:
    what loading that package itself costs), heaviest first."""
    p = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    by_package: dict[str, int] = {}
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and parts[0].split(":")[1].strip().isdigit():
            package = parts[2].strip().split(".")[0]
            by_package[package] = by_package.get(package, 0) + int(parts[0].split(":")[1])
    return sorted(((us / 1000, name) for name, us in by_package.items()), reverse=True)[:top]


def medians(walls: dict[str, list[float]], cpus: dict[str, list[float]]) -> dict:
    """{"wall": {command: median s}, "cpu": {command: median s}}."""
    return {"wall": {k: statistics.median(v) for k, v in walls.items()},
            "cpu": {k: statistics.median(v) for k, v in cpus.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--packages", type=int, default=12, help="heaviest packages to list")
    ap.add_argument("--json", action="store_true", help="also the medians as one JSON line")
    a = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        port = closed_port()
        root, env = make_root(Path(tmp), port)
        harness = [py, "-c", HARNESS, str(REPO), str(root)]
        provision = [*harness, str(port), "provision", "--env", "bench", "--yes"]
        runs = {
            "python3 -c pass (the floor)": [py, "-c", "pass"],
            "import tasks": [py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import tasks"],
            "invoke --list": [*harness, "0", "--list"],
            "invoke provision --help": [*harness, "0", "provision", "--help"],
            "provision web1: to 1st connect": provision,
        }
        walls: dict[str, list[float]] = {k: [] for k in runs}
        cpus: dict[str, list[float]] = {k: [] for k in walls}
        for argv in runs.values():                     # warm-up (caches, bytecode if written)
            timed(argv, root, env)
        for _ in range(a.rounds):
            for what, argv in runs.items():
                wall, cpu, _out = timed(argv, root, env)
                walls[what].append(wall)
                cpus[what].append(cpu)
        print(f"medians of {a.rounds} runs each, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f} (a loaded machine stretches wall time; CPU less so); "
              f"bytecode cache {'OFF (PYTHONDONTWRITEBYTECODE)' if env.get('PYTHONDONTWRITEBYTECODE') else 'on'}; "
              f"cryptography {cryptography.__version__} (50+ derives the vault's key beside the "
              "engine's import: provisioner/vault.py)")
        med = medians(walls, cpus)
        print(f"{'':<34} {'wall':>8} {'CPU':>8}")
        for what in walls:
            print(f"{what:<34} {med['wall'][what]:>7.3f}s {med['cpu'][what]:>7.3f}s")
        for what, argv in (("invoke --list", runs["invoke --list"]), ("provision web1", provision)):
            print(f"heaviest packages `{what}` imports (ms of import time, one run):")
            print("  " + ", ".join(f"{name} {ms:.0f}" for ms, name in
                                   heaviest_packages(argv, root, env, a.packages)))
    if a.json:
        print(json.dumps({"rounds": a.rounds, **med}))


if __name__ == "__main__":
    main()

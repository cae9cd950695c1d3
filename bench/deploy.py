"""What a deploy costs, measured in one run on web1 + web2: a code-only deploy (package-lock.json
unchanged: node_modules hard-linked), the same deploy with `npm ci` every time (a new
package-lock.json each round) for the ratio, and a rollback. Wall time of the whole
`invoke deploy` / `invoke rollback` (build, SSH, prepare, switch, health gate, finish) and
remote execs per host, from the --json recap, and the median seconds of each step. Targets
(issue 14): code-only 8 s, rollback 3 s. `--serial` is the deploys'; the rollback switches every
host at once, as `invoke rollback` does by default.

--blue-green: the same app deployed blue-green (env localbg, made and removed by
tests/bluegreen_env.py; it provisions web1, web2 and lb1 for it, and for `local` again at the
end): per round a code-only deploy (the idle colour, then the flip) and a rollback, which is
only the flip back (the old colour still runs the release). Target: the flip 1.5 s (the whole
`invoke rollback`); the flip's own exec on lb1 (nginx -t, reload) is printed beside it.

    python3 bench/deploy.py [--rounds 3] [--serial 1] [--blue-green]

Needs the testbed with the local env provisioned (`invoke testbed.up`, then
`invoke provision --env local`). Deploys examples/sample-app from a scratch git repository
(one commit per round) made in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]   # this checkout, whatever pip installed
from engine_helpers import json_events  # noqa: E402


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=bench", "-c",
                           "user.email=bench@example.com", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def commit(repo: Path, label: str, new_lock: bool) -> str:
    """A commit that changes the code (and the lock file's root version with new_lock)."""
    server = repo / "server.js"
    server.write_text(server.read_text() + f"// {label}\n")
    if new_lock:
        lock = json.loads((repo / "package-lock.json").read_text())
        lock["packages"][""]["version"] = lock["version"] = f"1.0.{int(time.time() * 1000)}"
        (repo / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
        pkg = json.loads((repo / "package.json").read_text())
        pkg["version"] = lock["version"]
        (repo / "package.json").write_text(json.dumps(pkg, indent=2) + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", label)
    return git(repo, "rev-parse", "HEAD")


SERIAL = ["--serial", "1"]
ENV = ["local"]


def timed(*args: str) -> tuple[float, dict]:
    """Wall time of `invoke ARGS --json` and its recap (with every step event of the run
    under "steps"); exits on a failure."""
    t0 = time.monotonic()
    # --serial is the deploys' (a rollback switches every host at once, its default)
    serial = SERIAL if args[0] == "deploy" else []
    r = subprocess.run([sys.executable, "-m", "invoke", *args, "--env", ENV[0], "--yes",
                        "--json", *serial], cwd=REPO, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"invoke {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    events = json_events(r.stdout)
    recap = dict(events[-1], steps=[e for e in events if e.get("event") == "step"])
    return seconds, recap


def execs(recap: dict, hosts=("web1", "web2")) -> str:
    return ", ".join(f"{h} {recap['hosts'][h]['remote_commands']}" for h in hosts)


def where(recaps: list[dict]) -> str:
    """Median seconds of each step of these runs, in the order of the first: where the time
    went (steps on different hosts overlap; a host's switches in --serial batches do not)."""
    steps: dict[str, list[float]] = {}
    for recap in recaps:
        for e in recap["steps"]:
            steps.setdefault(f"{e['host']} {e['resource'].split(' 2')[0]}", []).append(e["seconds"])
    return ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in steps.items())


def flip_seconds(recap: dict) -> float:
    """The flip's exec on the load balancer(s): the slowest `flip to <colour>` step."""
    return max(e["seconds"] for e in recap["steps"] if e["resource"].startswith("flip to"))


def blue_green(rounds: int) -> None:
    from bluegreen_env import blue_green_env

    def provision(env: str) -> None:
        subprocess.run([sys.executable, "-m", "invoke", "provision", "--env", env, "--limit",
                        "app,lb", "--yes"], cwd=REPO, check=True, capture_output=True,
                       timeout=3000)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp, \
            blue_green_env(provision) as env:
        ENV[0] = env
        repo = Path(tmp) / "sample-app"
        shutil.copytree(REPO / "examples" / "sample-app", repo)
        git(repo, "init", "-q")
        for label in ("base", "base 2"):          # warm-up: both colours run a release
            timed("deploy", "--source", str(repo), "--ref", commit(repo, label, new_lock=False))
        results: dict[str, list[float]] = {"deploy": [], "flip": []}
        flips, last = [], {}
        for i in range(rounds):
            sha = commit(repo, f"code-only {i}", new_lock=False)
            seconds, last["deploy"] = timed("deploy", "--source", str(repo), "--ref", sha)
            results["deploy"].append(seconds)
            seconds, last["flip"] = timed("rollback")
            results["flip"].append(seconds)
            flips.append(flip_seconds(last["flip"]))
        for kind, times in results.items():
            print(f"blue-green {kind:<6} median {statistics.median(times):5.2f} s  "
                  f"(runs: {', '.join(f'{t:.2f}' for t in times)}); execs per host: "
                  f"{execs(last[kind], ('web1', 'web2', 'lb1'))}")
        print(f"the flip's exec on lb1 (nginx -t, reload): median {statistics.median(flips):.2f} s;"
              f" target for the whole flip (invoke rollback): 1.5 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="deploys of each kind (1..10)")
    p.add_argument("--serial", type=int, default=1, help="hosts switched at a time (1 or 2)")
    p.add_argument("--blue-green", action="store_true",
                   help="the blue-green deploy and its flip back instead (env localbg)")
    a = p.parse_args()
    if not 1 <= a.rounds <= 10 or a.serial not in (1, 2):
        p.error("--rounds 1..10, --serial 1 or 2")
    SERIAL[1] = str(a.serial)
    if a.blue_green:
        blue_green(a.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        repo = Path(tmp) / "sample-app"
        shutil.copytree(REPO / "examples" / "sample-app", repo)
        git(repo, "init", "-q")
        base = commit(repo, "base", new_lock=False)
        timed("deploy", "--source", str(repo), "--ref", base)       # warm-up: a live release
        results: dict[str, list[float]] = {"code-only": [], "npm ci": [], "rollback": []}
        recaps: dict[str, list[dict]] = {kind: [] for kind in results}
        for i in range(a.rounds):
            for kind, new_lock in (("code-only", False), ("npm ci", True)):
                sha = commit(repo, f"{kind} {i}", new_lock)
                seconds, recap = timed("deploy", "--source", str(repo), "--ref", sha)
                results[kind].append(seconds)
                recaps[kind].append(recap)
            seconds, recap = timed("rollback")
            results["rollback"].append(seconds)
            recaps["rollback"].append(recap)
        for kind, times in results.items():
            print(f"{kind:<10} median {statistics.median(times):5.2f} s  "
                  f"(runs: {', '.join(f'{t:.2f}' for t in times)}); execs per host: "
                  f"{execs(recaps[kind][-1])}\n           steps (s): {where(recaps[kind])}")
        ratio = statistics.median(results["npm ci"]) / statistics.median(results["code-only"])
        print(f"npm ci every time / code-only: {ratio:.2f}x")


if __name__ == "__main__":
    main()

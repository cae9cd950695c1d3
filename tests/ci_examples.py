"""The example pipelines (examples/ci) read as their CI system would: each job's shell commands
in the order the pipeline runs them, for the pure tests (tasks and flags exist) and the live one
(the commands run against the testbed)."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "ci"
GITHUB = sorted((EXAMPLES / "github-actions").glob("*.yml"))
GITLAB = EXAMPLES / "gitlab-ci" / ".gitlab-ci.yml"
GITLAB_KEYWORDS = {"stages", "default", "variables", "include", "workflow", "image", "services",
                   "before_script", "after_script", "cache"}


def _in_needs_order(jobs: dict) -> list[str]:
    """Job names so that every job comes after the jobs it needs (file order otherwise)."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        needs = jobs[name].get("needs") or []
        for n in [needs] if isinstance(needs, str) else needs:
            visit(n if isinstance(n, str) else n["job"])
        done.append(name)
    for name in jobs:
        visit(name)
    return done


def github_commands(path: Path) -> list[tuple[str, str]]:
    """(job, the `run:` text) of every step, jobs in `needs` order."""
    jobs = yaml.safe_load(path.read_text())["jobs"]
    return [(job, step["run"]) for job in _in_needs_order(jobs)
            for step in jobs[job]["steps"] if "run" in step]


def gitlab_commands(path: Path = GITLAB) -> list[tuple[str, str]]:
    """(job, command) of every job's before_script, script and after_script, jobs in stage
    order (then `needs` and file order)."""
    doc = yaml.safe_load(path.read_text())
    default = doc.get("default") or {}
    jobs = {k: v for k, v in doc.items() if k not in GITLAB_KEYWORDS and isinstance(v, dict)}
    stages = doc.get("stages") or []
    order = sorted(_in_needs_order(jobs), key=lambda j: stages.index(jobs[j].get("stage", "test")))
    out = []
    for job in order:
        for part in ("before_script", "script", "after_script"):
            lines = jobs[job].get(part, default.get(part) if part != "script" else None) or []
            out += [(job, line) for line in lines]
    return out


def invoke_lines(commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(job, one `invoke ...` command line) in the commands."""
    out = []
    for job, text in commands:
        for line in text.splitlines():
            for part in line.split(";"):
                part = part.strip()
                for word in ("do ", "then "):
                    if part.startswith(word):
                        part = part[len(word):]
                if part.startswith("invoke "):
                    out.append((job, part.split(">")[0].strip()))
    return out


def _skip_reason(command: str) -> str | None:
    if command.startswith("python3 -m pip install"):
        return "installs the checkout: .ci/setup ran the same command"
    return None


def run_pipeline(commands: list[tuple[str, str]], workdir: Path,
                 env: dict[str, str], timeout: float = 1800) -> list[str]:
    """Run each command with bash -eo pipefail (as GitHub's `run:` does), in order, in
    `workdir`, with the envs of the examples (staging, prod) replaced by the testbed's `local`.
    Raises AssertionError naming the command that failed; returns what was skipped and why."""
    import os
    import re
    import subprocess
    skipped = []
    for job, command in commands:
        why = _skip_reason(command.strip())
        if why:
            skipped.append(f"{job}: {command.strip()}: {why}")
            continue
        local = re.sub(r"--env (staging|prod)\b", "--env local", command)
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", local],
                           cwd=workdir, env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, (f"job {job}: `{local}` exited {r.returncode}\n{r.stdout[-3000:]}"
                                   f"\n{r.stderr[-3000:]}")
    return skipped

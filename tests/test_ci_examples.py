"""The example pipelines (examples/ci) without servers: they validate against the schemas their
CI systems publish (as bundled by check-jsonschema: no network), every `invoke` line names a task
and flags that exist, and the gates are where the pipelines promise them."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from ci_examples import GITHUB, GITLAB, REPO, github_commands, gitlab_commands, invoke_lines

PENDING_TASKS = {"deploy"}          # issue 14 builds `invoke deploy`; checked once it exists


def _validate(schema: str, *files) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is a test extra: "
                        "python3 -m pip install -e '.[test]'")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema,
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def test_the_github_workflows_validate_against_the_published_schema():
    r = _validate("vendor.github-workflows", *GITHUB)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_gitlab_pipeline_validates_against_the_published_schema():
    r = _validate("vendor.gitlab-ci", GITLAB)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_workflow_is_caught_by_the_schema(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text((REPO / "examples/ci/github-actions/deploy.yml").read_text()
                   .replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest", 1))
    assert _validate("vendor.github-workflows", bad).returncode != 0


def _tasks() -> dict[str, set[str]]:
    import tasks
    return {ctx.name: set(ctx.flags) for ctx in tasks.ns.to_contexts()}


@pytest.mark.parametrize("source", [*(p.name for p in GITHUB), "gitlab"])
def test_every_invoke_line_names_a_task_and_flags_that_exist(source):
    commands = gitlab_commands() if source == "gitlab" else github_commands(
        next(p for p in GITHUB if p.name == source))
    lines = invoke_lines(commands)
    assert lines, "no invoke command found"
    known = _tasks()
    for job, line in lines:
        words = shlex.split(line)
        task = words[1]
        if task in PENDING_TASKS and task not in known:
            continue
        assert task in known, f"{source} job {job}: no task {task!r}: {line}"
        flags = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
        assert flags <= known[task], f"{source} job {job}: unknown {flags - known[task]}: {line}"


def test_the_github_pipeline_gates_prod_behind_a_reviewed_plan():
    import yaml
    jobs = yaml.safe_load((REPO / "examples/ci/github-actions/deploy.yml").read_text())["jobs"]
    assert jobs["staging"]["needs"] == "check" and "refs/heads/main" in jobs["staging"]["if"]
    assert jobs["prod"]["environment"] == "production" and jobs["prod"]["needs"] == "plan-prod"
    assert "refs/tags/v" in jobs["plan-prod"]["if"]
    for job in ("staging", "prod"):                  # one deploy per env at a time
        assert jobs[job]["concurrency"]["cancel-in-progress"] is False
    runs = [c for _, c in github_commands(REPO / "examples/ci/github-actions/deploy.yml")]
    assert runs.index(next(c for c in runs if "--out plan.json" in c)) < \
        runs.index(next(c for c in runs if "invoke apply plan.json" in c))
    for job in jobs.values():                        # the vault password from the secret store
        assert job["env"]["PROVISIONER_VAULT_PASSWORD"] == "${{ secrets.PROVISIONER_VAULT_PASSWORD }}"


def test_the_gitlab_pipeline_gates_prod_with_a_manual_job_in_a_protected_environment():
    import yaml
    doc = yaml.safe_load(GITLAB.read_text())
    assert doc["prod"]["rules"][0]["when"] == "manual" and doc["prod"]["needs"] == ["plan-prod"]
    assert doc["prod"]["environment"]["name"] == "production"
    assert doc["staging"]["resource_group"] and doc["prod"]["resource_group"]
    assert len(doc["drift"]["parallel"]["matrix"][0]["SHARD"]) == 10


def test_the_drift_timer_and_service_are_valid_systemd_units(tmp_path):
    import shutil
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is missing (Debian's systemd package has it)")
    for f in (REPO / "examples" / "drift").iterdir():
        shutil.copy(f, tmp_path / f.name)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "provisioner-drift.timer"),
                        str(tmp_path / "provisioner-drift.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    service = (tmp_path / "provisioner-drift.service").read_text()
    assert "ExecStart=/usr/bin/env invoke drift --env prod --yes" in service
    assert "PASSWORD=" not in service.replace("PASSWORD_FILE=", "")    # never the password itself

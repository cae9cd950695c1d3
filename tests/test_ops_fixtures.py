"""JSON fixture tests for the operations (pyinfra style): desired state + facts in, changes out.

Each tests/fixtures/ops/<module>.<constructor>--<case>.json holds:
  "op":       "files.file"                           the constructor, provisioner.ops.<module>
  "args", "kwargs"                                   its arguments; {"$secret": "v"} is a Secret
  "facts":    the agent's facts answer (the value of its "facts" key)
  "expect":   [{"noop": why} | {"action", "why", "steps", "diff"?, "notify"?}]
              a "write" step may give "content" (text) instead of "b64"
  or "error": {"type": "PlanError", "match": regex}  the plan refuses
  or "ctor_error": {"type": "ValueError", "match": regex}
  "converges": false                                 skip the predicted-idempotence check

Every fixture is also checked for: determinism (plan twice, same result), JSON-able steps, no
secret value on any argv or in any why/diff/id/repr, and idempotence against the predicted
facts (plan again over facts.overlay(resource.expect(facts)) gives only Noops).
"""
from __future__ import annotations

import base64
import copy
import importlib
import json
import re
from pathlib import Path

import pytest

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.secret import Secret

FIXTURES = Path(__file__).parent / "fixtures" / "ops"
FILES = sorted(FIXTURES.glob("*.json"))


def _secrets(value, found):
    if isinstance(value, dict):
        if set(value) == {"$secret"}:
            found.append(value["$secret"])
            return Secret(value["$secret"], register=False)
        return {k: _secrets(v, found) for k, v in value.items()}
    if isinstance(value, list):
        return [_secrets(v, found) for v in value]
    return value


def _constructor(name):
    module, func = name.split(".")
    return getattr(importlib.import_module(f"provisioner.ops.{module}"), func)


def _expected_step(step):
    step = dict(step)
    if "content" in step:
        step["b64"] = base64.b64encode(step.pop("content").encode()).decode()
    return step


def _as_dict(item):
    if isinstance(item, Noop):
        return {"noop": item.why}
    d = {"action": item.action, "why": item.why, "steps": list(item.steps)}
    return d


def _load(path):
    data = json.loads(path.read_text())
    secrets: list[str] = []
    args = _secrets(data.get("args", []), secrets)
    kwargs = _secrets(data.get("kwargs", {}), secrets)
    return data, args, kwargs, secrets


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_fixture(path):
    data, args, kwargs, secrets = _load(path)
    ctor = _constructor(data["op"])
    if "ctor_error" in data:
        err = data["ctor_error"]
        with pytest.raises(Exception) as info:
            ctor(*args, **kwargs)
        assert type(info.value).__name__ == err["type"]
        assert re.search(err["match"], str(info.value)), str(info.value)
        return
    resource = ctor(*args, **kwargs)
    facts = Facts(copy.deepcopy(data["facts"]))
    if "error" in data:
        with pytest.raises(Exception) as info:
            resource.plan(facts)
        assert type(info.value).__name__ == data["error"]["type"]
        assert re.search(data["error"]["match"], str(info.value)), str(info.value)
        return

    result = resource.plan(facts)
    assert resource.plan(Facts(copy.deepcopy(data["facts"]))) == result, "plan is not deterministic"
    expect = data["expect"]
    assert len(result) == len(expect), [_as_dict(r) for r in result]
    for got, want in zip(result, expect):
        assert got.resource == resource.id
        if "noop" in want:
            assert isinstance(got, Noop), _as_dict(got)
            assert got.why == want["noop"]
            continue
        assert isinstance(got, Change), got
        assert got.action == want["action"]
        assert got.why == want["why"]
        assert list(got.steps) == [_expected_step(s) for s in want["steps"]], \
            json.dumps(list(got.steps), indent=1)
        if "diff" in want:
            assert got.diff == want["diff"], got.diff
        if "notify" in want:
            assert list(got.notify) == want["notify"]
        json.dumps(list(got.steps))                          # steps are JSON-able

    # no secret value where people or the process table can see it
    shown = [resource.id, repr(resource)]
    for item in result:
        shown.append(item.why)
        if isinstance(item, Change):
            shown.append(item.diff or "")
            for step in item.steps:
                for argv in [step.get("run") or []] + list(step.get("after") or []):
                    shown.extend(argv)
                if isinstance(step.get("validate"), (str, list)):
                    shown.append(json.dumps(step["validate"]))
    for s in secrets:
        for text in shown:
            assert s not in text, f"secret {s!r} visible in {text!r}"

    # idempotence against the predicted state
    if data.get("converges", True) and any(isinstance(c, Change) for c in result):
        after = facts.overlay(resource.expect(facts))
        again = resource.plan(after)
        assert all(isinstance(c, Noop) for c in again), [_as_dict(c) for c in again]


def test_fixtures_cover_every_constructor():
    ops = {json.loads(p.read_text())["op"] for p in FILES}
    for name in ["apt.packages", "apt.repository", "files.file", "files.directory",
                 "files.absent", "templates.template", "lines.line", "links.link",
                 "users.user", "users.group", "systemd.service", "sysctl.sysctl",
                 "commands.command"]:
        assert name in ops, f"no fixture for {name}"

"""Saved plans: what `provision --check --out FILE` writes and `invoke apply FILE` checks.

A plan holds, per host, the changes check mode found (resource, action, why, the redacted
diff, and a digest of the steps that would do it) and a fingerprint of the facts they were
planned from: one short digest per fact (a file, a package, a service ...). It never holds a
step itself: steps carry file contents and secrets. Apply plans again from the same commit of
the config and fresh facts, and sends a change only when its digest is one the plan holds, so
what runs is what was reviewed; a host whose facts differ from the plan's is refused, with the
facts that drifted, before anything is sent to it.

Everything here is pure: the runner gathers, the CLI reads and writes the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from provisioner import secret        # secret.REDACTOR looked up at use: tests replace it
from provisioner.change import Change
from provisioner.errors import InputError, Problem

FORMAT = 1
DIGEST_CHARS = 16        # 64 bits: tells two states apart; the plan is no place for full hashes

# Fact fields that move on their own, without anyone changing the server: they would make
# every plan look drifted. What they decide (an apt list refresh) still shows in the changes,
# which apply compares by digest.
# A unit's sub-state too: a timer is "waiting" or, while its service runs, "running" (its
# active and enabled states, which the plans use, do not move).
_VOLATILE = {"timers": ("last", "next"), "http": ("headers", "body"), "services": ("sub",)}


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


def fact_items(raw: Mapping[str, Any]) -> dict[str, str]:
    """{"<kind> <key>": digest} of a facts answer: one entry per thing a role looked at, so
    that a refusal can say which ones differ."""
    items: dict[str, str] = {}
    for kind, value in raw.items():
        if kind == "packages" and isinstance(value, Mapping):
            # lists_age counts seconds since apt's last refresh: volatile (see _VOLATILE)
            for name, version in (value.get("installed") or {}).items():
                items[f"package {name}"] = digest(version)
        elif kind == "os" or not isinstance(value, Mapping):
            items[kind] = digest(value)
        else:
            drop = _VOLATILE.get(kind, ())
            for key, v in value.items():
                if isinstance(v, Mapping) and drop:
                    v = {a: b for a, b in v.items() if a not in drop}
                if kind == "dirs" and isinstance(v, Mapping) and isinstance(v.get("entries"), Mapping):
                    # an entry's mtime moves whenever something writes inside it (a log folder)
                    v = {name: {a: b for a, b in e.items() if a != "mtime"}
                         for name, e in v["entries"].items()}
                items[f"{kind.rstrip('s')} {key}"] = digest(v)
    return items


def change_digest(c: Change) -> str:
    """What a change does (its steps and the handlers it notifies), not why nor its action's
    name: the why quotes facts that move (an apt list's age), and a file a package install
    created before the write turns "create" into "write" with the same steps."""
    return digest({"resource": c.resource, "steps": list(c.steps), "notify": list(c.notify)})


def change_entry(c: Change) -> dict:
    entry = {"resource": secret.REDACTOR.redact(c.resource), "action": c.action,
             "why": secret.REDACTOR.redact(c.why), "digest": change_digest(c)}
    if c.diff:
        entry["diff"] = secret.REDACTOR.redact(c.diff)
    return entry


def drifted(planned: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The facts whose digest is not the plan's: changed, gone or new."""
    return sorted(k for k in set(planned) | set(now) if planned.get(k) != now.get(k))


@dataclass
class HostPlan:
    facts: dict[str, str]                                   # fact_items() of the planned facts
    roles: dict[str, list[dict]] = field(default_factory=dict)   # role -> change entries

    def allowed(self, role: str) -> set[str]:
        return {c["digest"] for c in self.roles.get(role, [])}

    def refusal(self, facts_now: Mapping[str, Any], changes_now: Mapping[str, Iterable[Change]]) -> str | None:
        """Why this host must not be applied now, or None: its facts drifted from the plan's,
        or the same facts plan other changes (the config changed without a commit)."""
        gone = drifted(self.facts, fact_items(facts_now))
        if gone:
            shown = ", ".join(gone[:10]) + (f" and {len(gone) - 10} more" if len(gone) > 10 else "")
            return f"{len(gone)} fact(s) drifted since the plan: {shown}"
        for role, changes in changes_now.items():
            extra = [c.resource for c in changes if change_digest(c) not in self.allowed(role)]
            if extra:
                return f"role {role} now plans changes the plan does not hold: {', '.join(extra)}"
        return None


@dataclass
class Plan:
    env: str
    commit: str | None
    dirty: bool
    hosts: dict[str, HostPlan]
    roles: list[str] | None = None          # --roles of the planning run
    created: str = ""
    not_planned: dict[str, str] = field(default_factory=dict)   # host -> why it has no plan
    secrets: list[str] = field(default_factory=list)   # the vault names the config uses: names only

    def to_json(self) -> dict:
        return {"plan": FORMAT, "env": self.env, "commit": self.commit, "dirty": self.dirty,
                "created": self.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "roles": self.roles,
                "hosts": {name: {"facts": h.facts, "roles": h.roles}
                          for name, h in self.hosts.items()},
                "not_planned": self.not_planned, "secrets": self.secrets}


def from_results(env: str, results: Iterable, *, commit: str | None = None, dirty: bool = False,
                 roles: list[str] | None = None, secrets: Iterable[str] = ()) -> Plan:
    """The plan of a check-mode run (the runner's HostResults): every host that planned
    cleanly; one that failed or was unreachable is listed in not_planned, and apply leaves it
    alone."""
    hosts = {r.host: HostPlan(dict(r.facts or {}), dict(r.planned)) for r in results
             if r.status in ("ok", "changed") and r.facts is not None}
    missing = {r.host: r.error or r.status for r in results if r.host not in hosts}
    return Plan(env=env, commit=commit, dirty=dirty, hosts=hosts, roles=roles,
                not_planned=missing, secrets=sorted(secrets))


def count(plan: Plan) -> int:
    return sum(len(c) for h in plan.hosts.values() for c in h.roles.values())


def write(path: Path, plan: Plan) -> None:
    """Write atomically (temp file + rename): a half-written plan must never be applied."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def read(path: Path) -> Plan:
    """The plan in `path`; InputError naming the file, the key and the fix otherwise."""
    def bad(key: str | None, message: str, fix: str) -> InputError:
        return InputError(Problem(path, None, key, message, fix))
    remake = "make it again with `invoke provision --env ENV --check --out FILE`"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad(None, "no such plan file", "pass the file `provision --check --out` wrote") from None
    except (OSError, UnicodeDecodeError) as e:
        raise bad(None, f"cannot read it: {e}", "pass a readable plan file") from None
    except json.JSONDecodeError as e:
        raise bad(None, f"not JSON ({e.msg} at line {e.lineno})", remake) from None
    if not isinstance(doc, dict) or "plan" not in doc:
        raise bad(None, "not a saved plan (no `plan` key)", remake)
    if doc["plan"] != FORMAT:
        raise bad("plan", f"format {doc['plan']!r}, this version reads {FORMAT}", remake)
    problems = []

    def need(key: str, kind: type | tuple, value: Any) -> Any:
        if not isinstance(value, kind):
            problems.append(Problem(path, None, key, f"missing or of the wrong type ({type(value).__name__})",
                                    remake))
            return None
        return value
    env = need("env", str, doc.get("env"))
    commit = need("commit", (str, type(None)), doc.get("commit"))
    roles = need("roles", (list, type(None)), doc.get("roles"))
    hosts: dict[str, HostPlan] = {}
    for name, h in (need("hosts", dict, doc.get("hosts")) or {}).items():
        if not need(f"hosts.{name}", dict, h):
            continue
        facts = need(f"hosts.{name}.facts", dict, h.get("facts"))
        by_role = need(f"hosts.{name}.roles", dict, h.get("roles"))
        for role, entries in (by_role or {}).items():
            for i, e in enumerate(need(f"hosts.{name}.roles.{role}", list, entries) or []):
                if not isinstance(e, dict) or not isinstance(e.get("digest"), str):
                    problems.append(Problem(path, None, f"hosts.{name}.roles.{role}[{i}].digest",
                                            "missing", remake))
        if facts is not None and by_role is not None:
            hosts[name] = HostPlan(facts, by_role)
    if problems:
        raise InputError(problems)
    return Plan(env=env, commit=commit, dirty=bool(doc.get("dirty")), hosts=hosts, roles=roles,
                created=str(doc.get("created") or ""), not_planned=dict(doc.get("not_planned") or {}),
                secrets=list(doc.get("secrets") or []))

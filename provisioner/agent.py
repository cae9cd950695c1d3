"""Local side of the remote agent: the bootstrap command, the payload, parsing the answer.

Per host and role the runner makes two execs, each `call(conn, op, request)`: one
`conn.run(command(), stdin=payload(...))` (under sudo when needed), then `parse(stdout, stderr,
rc)`:

1. facts:  payload("facts", merge_requests(r.facts() for r in resources))
   request  {"files": [path..], "packages": [name..], "package_candidates": [name..],
             "services": [unit..], "users": [name..], "groups": [name..],
             "sysctl": [key..], "checks": [[argv..] | {"argv": [..], "stdin": str}..]}
                                                          (every kind optional)
   answer   {"facts": {"os": {id, version_id, codename, virt, hostname, pid1, systemd, arch,..},
                       "files": {path: {exists, type, mode, owner, group, size, sha256,
                                        content, target} },
                       "packages": {"installed": {name: version|null}, "lists_age": s|null},
                       "package_candidates": {name: version|null},
                       "services": {unit: {unit, load, active, sub, enabled} | {error} | null},
                       "users": {name: {uid, gid, group, home, shell, groups, ssh_dir,
                                        authorized_keys} | null},
                       "groups": {name: {gid, members} | null},
                       "sysctl": {key: {value, persisted: [[file, value]..]}},
                       "checks": {shlex-joined argv: exit code},
                       "errors": {kind: message}?},
             "agent": {version, op, commands, seconds}}
   Also "dirs", "hashes", "certs", "timers", "http": every kind is declared in
   provisioner/facts.py KINDS, its collector is `fact_<kind>` in remote/agent.py.
   Wrap it with provisioner.facts.Facts(answer["facts"]).

2. apply:  payload("apply", apply_request(changes, handlers))
   request  {"changes": [{"id", "resource", "steps": [step..], "notify": [name..]}..],
             "handlers": {name: [step..]},             (definition order = run order)
             "handlers_on_failure": true}
   answer   {"ok": bool,
             "results": [{id, status: ok|failed|not_run, rc, error, output, step?}..],
             "handlers": [{name, status: ok|failed|not_run, error, output}..],
             "agent": {...}}
   Changes run in order and stop at the first failure (the rest are not_run). Each handler
   notified by a change that succeeded runs once, in definition order, also when a later
   change failed (see remote/agent.py apply() for why). Outputs are raw server output: the
   runner redacts secrets before printing them.

Steps are documented in provisioner/change.py. Nothing secret is on the command line: the
agent source, the request, file contents and secrets all travel on stdin.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from provisioner.change import Change, Noop

PROTOCOL = 1
MARKER = b"\n--provisioner-agent-v1--\n"   # must match provisioner/remote/agent.py
AGENT_PATH = Path(__file__).resolve().parent / "remote" / "agent.py"
BOOTSTRAP = ('import sys,json;d=json.loads(sys.stdin.buffer.read());'
             'exec(compile(d["code"],"provisioner-agent","exec"),'
             '{"REQ":d,"__name__":"__provisioner_agent__"})')


class AgentError(RuntimeError):
    """The remote side did not answer with the agent's JSON (or the agent crashed)."""


def command(python: str = "python3") -> list[str]:
    """The fixed, harmless argv that runs the agent; everything else comes on stdin."""
    return [python, "-c", BOOTSTRAP]


@lru_cache(maxsize=1)
def source() -> str:
    return AGENT_PATH.read_text(encoding="utf-8")


def payload(op: str, request: Mapping) -> bytes:
    if op not in ("facts", "apply", "finish", "ping", "switch"):
        raise ValueError(f"unknown agent op {op!r}")
    return json.dumps({"v": PROTOCOL, "op": op, "code": source(), "request": request},
                      separators=(",", ":")).encode("utf-8")


def call(conn, op: str, request: Mapping) -> dict:
    """One round trip: the agent run on the server (one exec) with this request; its answer,
    or AgentError."""
    r = conn.run(command(), stdin=payload(op, request))
    return parse(r.stdout, r.stderr, r.rc)


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode("utf-8", "replace")


def parse(stdout: bytes | str, stderr: bytes | str = b"", rc: int | None = None) -> dict:
    """The agent's JSON answer, or AgentError saying what went wrong and what to do."""
    out = stdout.encode("utf-8") if isinstance(stdout, str) else (stdout or b"")
    err = _text(stderr).strip()
    pos = out.rfind(MARKER)
    if pos < 0:
        hint = ""
        low = (err + _text(out)).lower()
        if rc == 127 or "python3: not found" in low or "python3: command not found" in low \
                or "no such file or directory" in low and "python3" in low:
            hint = "python3 is missing on the server: install python3 on the server " \
                   "(apt-get install python3)"
        elif rc == 1 and "syntaxerror" in low:
            hint = "the server's python3 is too old for the agent (needs Python 3.9+)"
        else:
            hint = "the output is not the provisioner agent's JSON"
        detail = (err or _text(out).strip())
        if len(detail) > 2000:          # whole lines: a secret cut in two escapes redaction
            detail = "..." + detail[-2000:].partition("\n")[2]
        raise AgentError(f"{hint} (exit {rc}): {detail}" if detail else f"{hint} (exit {rc})")
    try:
        doc = json.loads(out[pos + len(MARKER):].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AgentError(f"agent output is truncated or not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AgentError("agent answer is not a JSON object")
    version = (doc.get("agent") or {}).get("version")
    if version != PROTOCOL:
        raise AgentError(f"agent protocol {version!r} != {PROTOCOL}")
    if "error" in doc:
        tb = doc.get("traceback") or ""
        raise AgentError(f"agent error: {doc['error']}\n{tb}".rstrip())
    return doc


def apply_request(changes: Iterable[Change | Noop], handlers: Mapping[str, list] | None = None,
                  handlers_on_failure: bool = True) -> dict:
    """Build the apply request. Noops are skipped; change ids are their index in `changes`
    (the runner maps results back with the same index) so they stay unique."""
    handlers = dict(handlers or {})
    items = []
    for i, ch in enumerate(changes):
        if isinstance(ch, Noop):
            continue
        missing = [n for n in ch.notify if n not in handlers]
        if missing:
            raise ValueError(f"{ch.resource}: notifies unknown handler(s) {missing}; "
                             f"defined: {sorted(handlers)}")
        items.append({"id": str(i), "resource": ch.resource, "steps": list(ch.steps),
                      "notify": list(ch.notify)})
    return {"changes": items, "handlers": {k: list(v) for k, v in handlers.items()},
            "handlers_on_failure": handlers_on_failure}

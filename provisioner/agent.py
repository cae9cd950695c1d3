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

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from provisioner.change import Change, Noop

PROTOCOL = 1
MARKER = b"\n--provisioner-agent-v1--\n"   # must match provisioner/remote/agent.py
AGENT_PATH = Path(__file__).resolve().parent / "remote" / "agent.py"
# Where the server keeps agent sources it was sent, as <sha256>.py, so that later execs send
# only their request. The agent runs as root, and this folder is root's alone (0700, checked
# by the agent before it writes there); what the bootstrap reads from it runs only if its
# sha256 is the one this controller asked for, so a file that was changed, truncated or
# planted is never executed: the agent is sent again instead (see call()). One file per agent
# version: controllers of different versions each find their own.
# Beside it the agent keeps that source compiled, <sha256>.<magic>.code (marshal, for the
# server python's bytecode magic), which spares each exec the compile (12 of its 40 ms of
# CPU). Compiled code cannot be checked against the sha256, so it is trusted as Python trusts
# __pycache__, only stricter: a regular file of root's (or the login user's) that no one else
# can write, in a folder and under parents that no one else can write or swap (sticky
# folders excepted, as for /tmp), and its CRC matches (a torn write is compiled afresh).
CACHE_DIR = "/var/cache/provisioner/agent"
CACHE_MAX = 1 << 22               # bytes the bootstrap reads from a cache file
# The bootstrap: read the request; take the agent's compiled code from the cache, else its
# source from the request, else from the cache when the file there is a regular file (not
# followed if a symlink, never blocking on a FIFO) whose sha256 is the requested one; with
# none, answer need_code; run the agent (passing the code it compiled, for the agent to
# keep). `-I -S`: no site-packages, no PYTHON* variables, and not the login directory on
# sys.path (the agent is stdlib-only), which also saves ~10 ms of start-up per exec.
BOOTSTRAP = f"""import sys,os,json,marshal,binascii
d=json.loads(sys.stdin.buffer.read());c=d.get("code");h=d.get("sha","");D=sys.argv[1];k=None;u=(0,os.geteuid())
def r(p):
 f=os.open(p,os.O_RDONLY|os.O_NOFOLLOW|os.O_NONBLOCK)
 try:
  s=os.fstat(f);return(os.read(f,{CACHE_MAX}),s.st_uid in u and not s.st_mode&0o22)if s.st_mode&0o170000==0o100000 else(b"",0)
 finally:
  os.close(f)
def t(p):
 while 1:
  s=os.lstat(p)
  if s.st_uid not in u or s.st_mode&0o22 and not s.st_mode&0o1000 or s.st_mode&0o170000!=0o40000:return 0
  if p==os.path.dirname(p):return 1
  p=os.path.dirname(p)
if c is None and len(h)==64 and not h.strip("0123456789abcdef"):
 try:
  from _frozen_importlib_external import MAGIC_NUMBER as m;b,o=r(os.path.join(D,h+"."+m.hex()+".code"))
  if o and b[4:]and binascii.crc32(b[4:])==int.from_bytes(b[:4],"big")and t(D):k=marshal.loads(b[4:])
 except(ImportError,OSError,ValueError,EOFError,TypeError):
  pass
 if k is None:
  try:
   import hashlib;b=r(os.path.join(D,h+".py"))[0]
   if hashlib.sha256(b).hexdigest()==h:c=b.decode()
  except OSError:
   pass
if k is None and c is None:
 print({json.dumps(MARKER.decode())}+json.dumps({{"need_code":True,"agent":{{"version":{PROTOCOL}}}}}))
else:
 g={{"REQ":d,"__name__":"__provisioner_agent__"}}
 if k is None:k=g["COMPILED"]=compile(c,"provisioner-agent","exec")
 exec(k,g)"""


class AgentError(RuntimeError):
    """The remote side did not answer with the agent's JSON (or the agent crashed)."""


def command(python: str = "python3", cache_dir: str | None = None) -> list[str]:
    """The fixed, harmless argv that runs the agent; everything else comes on stdin."""
    return [python, "-I", "-S", "-c", BOOTSTRAP, cache_dir or CACHE_DIR]


@lru_cache(maxsize=1)
def source() -> str:
    return AGENT_PATH.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def source_sha() -> str:
    """The agent version's name in the server's cache: the sha256 of its source."""
    return hashlib.sha256(source().encode("utf-8")).hexdigest()


def payload(op: str, request: Mapping, *, code: bool = True, store: bool = False) -> bytes:
    """The agent's stdin: the request, and the agent's source unless `code` is False (then
    the server runs the copy it cached). `store`: the agent keeps its source, and the code
    the bootstrap compiled from it, in the cache."""
    if op not in ("facts", "apply", "finish", "ping", "switch"):
        raise ValueError(f"unknown agent op {op!r}")
    doc = {"v": PROTOCOL, "op": op, "sha": source_sha(), "request": request}
    if code:
        doc["code"] = source()
    if store:
        doc["store"] = True
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def call(conn, op: str, request: Mapping) -> dict:
    """One round trip: the agent run on the server (one exec) with this request; its answer,
    or AgentError.

    Only the request is sent while the server's cache holds this agent version. When it does
    not (first contact, a new version, a file that failed its hash), the bootstrap answers
    need_code without running anything, and the same request goes again with the source,
    which the agent then caches: one more exec, once per host and version. `conn.agent_cache`:
    True (the default) uses and fills the cache; False only uses it (check mode writes
    nothing on a server); None sends the source with every exec, which a connection falls
    back to after a miss that was not cached (check mode, or a folder not root's alone)."""
    cache = getattr(conn, "agent_cache", True)
    if cache is not None:               # store: the agent keeps what it compiled, if it did
        r = conn.run(command(), stdin=payload(op, request, code=False, store=cache is True))
        answer = parse(r.stdout, r.stderr, r.rc)
        if not answer.get("need_code"):
            return answer
    r = conn.run(command(), stdin=payload(op, request, store=cache is True))
    answer = parse(r.stdout, r.stderr, r.rc)
    if not (answer.get("cache") or {}).get("cached"):
        conn.agent_cache = None          # not in the cache now, nor on the next exec: send it
    return answer


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

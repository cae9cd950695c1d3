"""Shared pieces of the operations: input checks, step builders, attribute drift, file diffs.

Every resource is a frozen dataclass with:
  .id                  "file /etc/x", "apt nginx", ... (used as Change.resource / Noop.resource)
  .facts()             request fragment (merged by provisioner.facts.merge_requests)
  .plan(facts)         PURE: list[Change | Noop] from desired state + provisioner.facts.Facts
  .expect(facts)       facts overlay describing the state after its changes (optional; used by
                       provisioner.ops.plan_all so later resources of a role see it)
Drift is worded "<what> <have> != <want>", e.g. "mode 0644 != 0600".
"""
from __future__ import annotations

import base64
import difflib
import hashlib
import posixpath
import re
from typing import Any, Iterable, Sequence

from provisioner.facts import FileFact
from provisioner.templating import MASK, Rendered, is_secret


class PlanError(ValueError):
    """The desired state cannot be planned safely from these facts (e.g. a directory where a
    file is wanted). The runner reports it as a failed resource; nothing is applied."""


NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]*\$?\Z")
MODE_RE = re.compile(r"^[0-7]{3,4}\Z")


def abs_path(path: str) -> str:
    """An absolute, normalised path other than "/" (no '..', '//', trailing '/')."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or "\n" in path:
        raise ValueError(f"path must be an absolute path, not {path!r}")
    if path == "/" or "//" in path or posixpath.normpath(path) != path:
        raise ValueError(f"path must be normalised and not '/': {path!r}")
    return path


def norm_mode(mode: str | int | None) -> str | None:
    if mode is None:
        return None
    if isinstance(mode, int):
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"bad mode {mode!r}")
        return "%04o" % mode
    if not isinstance(mode, str) or not MODE_RE.match(mode):
        raise ValueError(f"mode must be an octal string like '0644', not {mode!r}")
    return "%04o" % int(mode, 8)


def check_name(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not (NAME_RE.match(value) or value.isdigit()) \
            or len(value) > 32:
        raise ValueError(f"bad {what} name {value!r}")
    return value


def check_argv(argv: Sequence[Any], what: str = "command") -> list[str]:
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError(f"{what} must be a non-empty argv list, not {argv!r}")
    out = []
    for a in argv:
        if is_secret(a):
            raise TypeError(f"{what}: a secret must not be on a command line; "
                            "pass it on stdin or in a file")
        if not isinstance(a, (str, int)):
            raise TypeError(f"{what}: argv items must be str, not {type(a).__name__}")
        out.append(str(a))
    return out


def names(values: Iterable[str] | str, what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    return tuple(dict.fromkeys(check_name(v, what) for v in values))


# --- steps -------------------------------------------------------------------------------------

def run(argv: Sequence[Any], stdin: str | None = None, env: dict | None = None,
        ok: Sequence[int] = (0,), timeout: float | None = None, attempts: int = 1) -> dict:
    """A command. timeout: seconds before it is killed, with what it started; attempts: runs
    until one exits with an ok code (for commands that are safe to repeat)."""
    step = {"run": check_argv(argv), "stdin": stdin, "env": dict(env or {}), "ok": list(ok)}
    if timeout is not None:
        step["timeout"] = timeout
    if attempts > 1:
        step["attempts"] = attempts
    return step


def write(path: str, data: str | bytes, mode: str | None, owner: str | None,
          group: str | None, validate: str | None = None, after: Sequence = ()) -> dict:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return {"write": path, "b64": base64.b64encode(raw).decode("ascii"), "mode": mode,
            "owner": owner, "group": group, "validate": validate,
            "after": [check_argv(a, "after") for a in after]}


def directory(path: str, mode: str | None, owner: str | None, group: str | None) -> dict:
    return {"dir": path, "mode": mode, "owner": owner, "group": group}


def attrs(path: str, mode: str | None, owner: str | None, group: str | None) -> dict:
    return {"attrs": path, "mode": mode, "owner": owner, "group": group}


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


# --- drift -------------------------------------------------------------------------------------

def drift(f: FileFact, mode: str | None, owner: str | None, group: str | None) -> list[str]:
    """What differs in mode/owner/group (None = not managed)."""
    out = []
    if mode is not None and f.mode != mode:
        out.append(f"mode {f.mode} != {mode}")
    if owner is not None and f.owner != owner:
        out.append(f"owner {f.owner} != {owner}")
    if group is not None and f.group != group:
        out.append(f"group {f.group} != {group}")
    return out


def attrs_text(mode: str | None, owner: str | None, group: str | None,
               f: FileFact | None = None) -> str:
    m = mode or (f.mode if f else None) or "-"
    o = owner or (f.owner if f else None) or "-"
    g = group or (f.group if f else None) or "-"
    return f"{m} {o}:{g}"


def file_fact(path: str, content: str | bytes | None, mode: str | None, owner: str | None,
              group: str | None, old: FileFact | None, type_: str = "file") -> dict:
    """A predicted file fact (for .expect())."""
    keep = old if old is not None and old.exists and old.type == type_ else None
    text = None
    size = None
    if content is not None:
        raw = content.encode("utf-8") if isinstance(content, str) else content
        size = len(raw)
        if size <= 256 * 1024 and b"\0" not in raw:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = None
    return {"__replace__": True, "exists": True, "type": type_,
            "mode": mode or (keep.mode if keep else ("0755" if type_ == "dir" else "0644")),
            "owner": owner or (keep.owner if keep else "root"),
            "group": group or (keep.group if keep else "root"),
            "sha256": sha256(content) if content is not None else None,
            "content": text, "size": size, "target": None}


# --- diffs -------------------------------------------------------------------------------------

_KEY = re.compile(r"(\s*[^\s=:]+(?:\s*[=:]\s*|\s+))(?=\S)")


def _masked_value(line: str) -> str:
    """A line with all but its key (first word, up to `=` or `:`) shown as ***."""
    m = _KEY.match(line)
    return (m.group(1) + MASK) if m else (MASK if line.strip() else line)


def file_diff(path: str, old: FileFact, new: Rendered) -> str:
    """Unified diff old -> new as users may see it: secrets as ***, or a note instead."""
    if new.display is None:
        return f"--- {path}\n+++ {path}\n(diff hidden: {new.hidden})\n"
    if old.predicted and old.content is None:
        return (f"--- {path}\n+++ {path}\n(old content not known yet: an earlier change of "
                f"this role creates the file)\n")
    if old.exists and old.type == "file" and old.content is None:
        return (f"--- {path}\n+++ {path}\n(old content not shown: binary or larger than "
                f"256 KiB; new content {len(new.text.encode())} bytes)\n")
    before = []
    if old.exists and old.type == "file":
        before = [new.mask_line(x) for x in old.content.splitlines()]
    after = new.display.splitlines()
    lines = list(difflib.unified_diff(before, after, fromfile=f"a{path}" if old.exists
                                      else "/dev/null", tofile=f"b{path}", lineterm=""))
    if new.has_secrets or (old.exists and old.mode and int(old.mode, 8) & 0o004 == 0):
        # a file that carries secrets (now, or readable by its owner only): a line going away
        # may hold a secret no one knows any more (removed from the inventory and the vault)
        lines = [line if not line.startswith("-") or line.startswith("---")
                 else "-" + _masked_value(line[1:]) for line in lines]
    if not lines:
        if old.exists and old.type == "file" and old.content != new.text:
            what = ("secret values" if new.has_secrets and old.content.splitlines()
                    != new.text.splitlines() else "line endings or the final newline")
            return f"--- a{path}\n+++ b{path}\n(content differs only in {what})\n"
        return ""
    return new.redact("\n".join(lines) + "\n")

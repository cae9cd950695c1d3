"""Secret values: revealed only on purpose, shown as ``***`` everywhere else.

A :class:`Secret` wraps a ``str``. It is deliberately *not* a ``str`` subclass, so it cannot
slip into string concatenation, ``str.join``, ``os.environ``, an argv list or a subprocess env
unnoticed: those raise ``TypeError`` until the code calls :meth:`Secret.reveal` explicitly.

How it behaves:

* ``str()``, ``repr()``, f-strings / ``format()``, ``%s`` / ``%r`` formatting and therefore
  ``logging`` and exception messages (``traceback.format_exc()`` included) show ``***``.
* ``json.dumps(obj)`` raises ``TypeError`` (no value); ``json.dumps(obj, default=json_default)``
  writes ``"***"``.
* ``pickle`` refuses (``TypeError``): a pickle is bytes on their way out of the process, and
  an unpickled Secret would be a second copy to track. ``copy.copy``/``copy.deepcopy`` return
  the same object (a Secret is immutable; the value never leaves the process).
* Equality compares values in constant time and only between Secrets (``Secret("a") == "a"``
  is ``False``); ``hash`` is derived from the value, so Secrets work as dict keys and in sets.
  ``bool(secret)`` tells whether the value is non-empty.
* Every Secret registers its value with the process-wide :data:`REDACTOR` when it is created,
  so the output layer and exception handler mask it even where someone revealed it by mistake
  (e.g. a failing command that echoed it). Pass ``register=False`` to opt out (tests).

Templates: ``provisioner/templating.py`` is the one place secrets meet Jinja2; its docstring
holds the policy. Outside it a template shows ``***`` (``str()`` of a Secret). We do not
implement ``__html__``: markupsafe's ``escape()`` calls it anywhere in the process, which would
turn every escaped rendering into a leak.

Redaction replaces every occurrence of a secret's value with ``***`` — also its JSON-escaped
and percent-encoded forms, the ways a value most often reappears in output. Overlapping or
adjacent matches are merged into one ``***``. Each line (of 4 or more characters) of a
multi-line value is also masked on its own, since output is redacted line by line. Short
values are *not* ignored: a one-character
secret masks every occurrence of that character. Readable output is worth less than a leak, and
a one-character secret is a bug to fix in the vault. Only the empty value is skipped: it has
nothing to hide and would match between every two characters.
"""
from __future__ import annotations

import hmac
import json
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "Secret", "reveal", "json_default", "redact", "Redactor", "REDACTOR"]

MASK = "***"


class Secret:
    """A secret string value. ``str(s)`` is ``***``; ``s.reveal()`` is the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret, *, register: bool = True) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            # do not put the value in the message: it may be the secret in the wrong type
            raise TypeError(f"Secret wraps a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)
        if register:
            REDACTOR.register(value)

    def reveal(self) -> str:
        """The real value. Call only where it goes into a file, an env or stdin."""
        return self._value

    # --- display: never the value --------------------------------------------------------
    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __format__(self, spec: str) -> str:
        try:
            return format(MASK, spec)
        except (TypeError, ValueError):      # a numeric spec like ":d" on a str
            return MASK

    # --- value semantics, without showing the value --------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode("utf-8"), other._value.encode("utf-8"))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    # --- immutability, copying, pickling -------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Secret is immutable")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a Secret cannot be pickled; reveal() it explicitly if it really "
                        "must leave the process")

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(None)

    def __getstate__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


def reveal(value: Any) -> Any:
    """``value.reveal()`` for a Secret, anything else unchanged."""
    return value.reveal() if isinstance(value, Secret) else value


def json_default(obj: Any) -> Any:
    """``default=`` hook for ``json.dumps``: a Secret becomes ``"***"``."""
    if isinstance(obj, Secret):
        return MASK
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


# --- redaction ---------------------------------------------------------------------------

def _forms(value: str) -> set[str]:
    """The value plus the encodings it most often shows up in within output."""
    forms = {value,
             json.dumps(value)[1:-1],                       # inside a JSON string
             json.dumps(value, ensure_ascii=False)[1:-1],
             urllib.parse.quote(value, safe=""),            # in a URL / DSN
             urllib.parse.quote_plus(value, safe="")}
    if "\n" in value:
        # output is redacted line by line: each line of a multi-line secret (a PEM key) is a
        # needle of its own; lines shorter than 4 characters ("{", "}") would mask too much
        forms |= {line.strip() for line in value.splitlines() if len(line.strip()) >= 4}
    forms.discard("")
    return forms


def _mask(text: str, needles: Iterable[str]) -> str:
    # Collect every occurrence (overlapping ones too) of every needle, merge the spans, and
    # replace each merged span with one mask. Replacing needles one after another would leave
    # the tail of a secret that overlaps an already-masked one in the output.
    spans: list[tuple[int, int]] = []
    for needle in sorted(set(needles), key=len, reverse=True):
        if not needle:
            continue
        start = text.find(needle)
        while start != -1:
            spans.append((start, start + len(needle)))
            start = text.find(needle, start + 1)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    pos = 0
    cur_start, cur_end = spans[0]
    for s, e in spans[1:]:
        if s <= cur_end:                    # overlapping or touching: one mask
            cur_end = max(cur_end, e)
            continue
        out += [text[pos:cur_start], MASK]
        pos = cur_end
        cur_start, cur_end = s, e
    out += [text[pos:cur_start], MASK, text[cur_end:]]
    return "".join(out)


def _needles(secrets: Iterable[Secret | str]) -> set[str]:
    needles: set[str] = set()
    for s in secrets:
        value = s.reveal() if isinstance(s, Secret) else s
        if value:
            needles |= _forms(value)
    return needles


def redact(text: str, secrets: Iterable[Secret | str]) -> str:
    """``text`` with every occurrence of each secret value (and its JSON-escaped and
    percent-encoded forms) replaced by ``***``. Empty values are skipped; short ones are not."""
    return _mask(text, _needles(secrets))


class Redactor:
    """A thread-safe registry of secret values that output passes through on its way out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._needles: tuple[str, ...] = ()

    def register(self, secret: Secret | str) -> None:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if not isinstance(value, str):
            raise TypeError(f"register() takes a Secret or str, not {type(value).__name__}")
        if not value:
            return
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            self._needles = tuple(sorted(_needles(self._values), key=len, reverse=True))

    def redact(self, text: str) -> str:
        needles = self._needles                   # an immutable snapshot; no lock needed
        return _mask(text, needles) if needles else text

    def clear(self) -> None:
        """Forget every value (for tests)."""
        with self._lock:
            self._values.clear()
            self._needles = ()

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<Redactor: {len(self._values)} secret(s)>"


#: The process-wide registry; every Secret registers itself here unless told not to.
REDACTOR = Redactor()

"""Jinja2 rendering over the repository's templates/ folder, and the one policy for secrets
in templates.

The policy: a secret (any object with .reveal(), e.g. provisioner.secret.Secret) renders as its
REAL value into the file, wherever the template reaches it (a var, inside a dict or list, an
attribute of an object) and whatever filter or test it goes through (`{{ pw | urlencode }}`
writes the encoded real value). People never see it: the display (diffs, events) shows `***`
in its place, and when a filter or test transformed a secret, or a secret spans lines, the
display is withheld entirely ("diff hidden") rather than guessed. There is no `reveal` filter
and nothing to opt into. One trap: `~` and `%` call str() on a secret reached through an
attribute, which is `***`; pass such values as vars (or dict items) instead.

How: render() renders a template TWICE:
  1. for the file: every secret is replaced by its real value;
  2. for people: every secret is replaced by a unique sentinel, which becomes "***".
If replacing the sentinels by the real values does not give exactly the first rendering (a
filter or test transformed a secret), the display is withheld.

The second rendering also says which LINES carry a secret (e.g. `password = ***`): the diff
masks any line of the OLD file content matching such a line's shape, so a rotated secret
(whose old value we no longer know) is not shown either. As a last resort every known secret
value is replaced by *** in the final diff text.

The environment: StrictUndefined (a missing variable is an error, not an empty string),
keep_trailing_newline, trim_blocks + lstrip_blocks (block tags on their own lines leave no
blank lines, as in Ansible), no autoescaping (these are config files, not HTML).
"""
from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MASK = "***"
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000\\d+\ue001")
_registry: contextvars.ContextVar[dict | None] = contextvars.ContextVar("_registry", default=None)


def is_secret(value: Any) -> bool:
    return callable(getattr(value, "reveal", None))


def reveal(value: Any) -> Any:
    return value.reveal() if is_secret(value) else value


def _sentinel_for(value: Any) -> str:
    reg = _registry.get()
    real = str(value.reveal())
    if reg is None:          # outside render(): never leak
        return MASK
    if real not in reg:
        reg[real] = _SENTINEL.format(len(reg))
    return reg[real]


def _walk(value: Any, fn) -> Any:
    if is_secret(value):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _walk(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v, fn) for v in value)
    return value


def _finalize_real(value: Any) -> Any:
    return str(value.reveal()) if is_secret(value) else value


def _finalize_mask(value: Any) -> Any:
    return _sentinel_for(value) if is_secret(value) else value


def _wrap_filter(func, convert):
    """A filter given a secret (reached through an attribute) sees `convert(secret)`."""
    def wrapped(*args, **kwargs):
        return func(*(convert(a) if is_secret(a) else a for a in args),
                    **{k: convert(v) if is_secret(v) else v for k, v in kwargs.items()})
    if hasattr(func, "jinja_pass_arg"):
        wrapped.jinja_pass_arg = func.jinja_pass_arg
    return wrapped


@lru_cache(maxsize=1)
def _compiled_once():
    """The code a template compiles to, kept for the other environment of its root: the real
    and the masked one compile every template to the same code (they differ in finalize and
    filters, which that code looks up from its environment as it renders; a test holds that
    for every template), and compiling is most of a rendering's time. Made with the first
    environment: jinja2 is imported only by a run that renders a template (~22 ms)."""
    import jinja2

    class CompiledOnce(jinja2.BytecodeCache):
        def __init__(self) -> None:
            self._code: dict[tuple[str, str], Any] = {}

        def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            bucket.code = self._code.get((bucket.key, bucket.checksum))  # the source's checksum

        def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            self._code[(bucket.key, bucket.checksum)] = bucket.code
    return CompiledOnce()


@lru_cache(maxsize=8)
def environment(root: str | None = None, masked: bool = False) -> jinja2.Environment:
    """The Jinja2 environment over `root` (default: the repository's templates/).

    masked=False writes real secret values; masked=True writes sentinels (see render()).
    Filters get a secret argument revealed (or masked), so `{{ obj.pw | urlencode }}` writes
    the real value into the file (the display is then withheld: a filter transformed it).
    """
    import jinja2
    convert = _sentinel_for if masked else (lambda s: str(s.reveal()))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root or TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,            # a {% block %} line leaves no blank line (as Ansible)
        lstrip_blocks=True,
        autoescape=False,
        finalize=_finalize_mask if masked else _finalize_real,
        bytecode_cache=_compiled_once(),
    )
    for name, func in list(env.filters.items()):
        env.filters[name] = _wrap_filter(func, convert)
    return env


@dataclass(frozen=True)
class Rendered:
    """File content plus what may be shown of it.

    text     the real content (secrets revealed): goes into the file, never printed
    display  the content as users may see it (secrets as ***), or None when withheld
    hidden   why the display is withheld (None when it is not)
    patterns regexes (full line) of lines that carry a secret, and their display form
    secrets  revealed secret values, for last-resort redaction
    """
    text: str = field(repr=False)
    display: str | None = field(repr=False, default=None)
    hidden: str | None = None
    patterns: tuple[tuple[str, str], ...] = field(repr=False, default=())
    secrets: tuple[str, ...] = field(repr=False, default=())

    @classmethod
    def plain(cls, text: str) -> "Rendered":
        return cls(text=text, display=text)

    @classmethod
    def of(cls, value: Any) -> "Rendered":
        """Content given directly: str (shown), a secret (withheld)."""
        if isinstance(value, Rendered):
            return value
        if is_secret(value):
            real = str(value.reveal())
            return cls(text=real, display=None, hidden="the content is a secret",
                       secrets=(real,) if real else ())
        if isinstance(value, str):
            return cls.plain(value)
        raise TypeError(f"file content must be str or a secret, not {type(value).__name__}")

    @property
    def has_secrets(self) -> bool:
        return bool(self.secrets) or self.hidden is not None

    def redact(self, text: str) -> str:
        if not self.secrets:
            return text
        try:
            from provisioner.secret import redact      # also JSON/percent-encoded forms
        except ImportError:                              # pragma: no cover
            for s in sorted(self.secrets, key=len, reverse=True):
                text = text.replace(s, MASK)
            return text
        return redact(text, self.secrets)

    def mask_line(self, line: str) -> str:
        """A line as it may be shown: lines shaped like a secret-bearing line are masked."""
        for rx, shown in self.patterns:
            if re.fullmatch(rx, line, flags=re.S):
                return shown
        return self.redact(line)


def render(src: str, vars: Mapping[str, Any] | None = None, *, root: str | Path | None = None
           ) -> Rendered:
    """Render templates/<src> with `vars`: the real content and its safe display."""
    vars = dict(vars or {})
    root_s = str(root) if root else None
    real = environment(root_s, False).get_template(src).render(
        _walk(vars, lambda s: str(s.reveal())))
    reg: dict[str, str] = {}
    token = _registry.set(reg)
    try:
        masked = environment(root_s, True).get_template(src).render(_walk(vars, _sentinel_for))
    finally:
        _registry.reset(token)
    secrets = tuple(v for v in reg if v)
    rebuilt = masked
    for value, sentinel in reg.items():
        rebuilt = rebuilt.replace(sentinel, value)
    if rebuilt != real:
        return Rendered(text=real, display=None, secrets=secrets,
                        hidden="a template filter or test transforms a secret value")
    if any("\n" in v or "\r" in v for v in secrets):
        return Rendered(text=real, display=None, secrets=secrets,
                        hidden="the file contains a multi-line secret")
    patterns = []
    for line in masked.splitlines():
        if _SENTINEL_RE.search(line):
            parts = _SENTINEL_RE.split(line)
            rx = "(.*)".join(re.escape(p) for p in parts)
            patterns.append((rx, _SENTINEL_RE.sub(MASK, line)))
    display = _SENTINEL_RE.sub(MASK, masked)
    return Rendered(text=real, display=display, secrets=secrets, patterns=tuple(patterns))

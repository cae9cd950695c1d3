"""Secret never shows its value unless asked; redaction masks values in any text."""
from __future__ import annotations

import copy
import json
import logging
import pickle
import traceback

import jinja2
import pytest

from provisioner import plan, secret as secret_mod
from provisioner.change import Change
from provisioner.cli import backup
from provisioner.secret import (
    MASK, Redactor, Secret, json_default, redact, reveal,
)

VALUE = "s3cr3t-Value-For-Tests-9f1c"


@pytest.fixture(autouse=True)
def private_redactor(monkeypatch):
    """Secrets made here register with a throwaway registry, not the process-wide one."""
    monkeypatch.setattr(secret_mod, "REDACTOR", Redactor())


@pytest.fixture
def s():
    return Secret(VALUE, register=False)


# --- display -----------------------------------------------------------------------------

def test_str_repr_format_and_percent_never_show_the_value(s):
    shown = [
        str(s), repr(s), f"{s}", f"{s!r}", f"{s!s}", f"{s:>40}", f"{s:d}", "{}".format(s),
        "{0!r}".format(s), format(s), "%s" % s, "%r" % (s,), "%(p)s" % {"p": s},
        str([s]), str({"k": s}), repr((s,)),
    ]
    for text in shown:
        assert VALUE not in text
        assert MASK in text
    assert str(s) == "***"


def test_reveal_gives_the_value(s):
    assert s.reveal() == VALUE
    assert reveal(s) == VALUE
    assert reveal("plain") == "plain"


def test_not_a_str_so_it_cannot_slip_into_strings_unnoticed(s):
    assert not isinstance(s, str)
    with pytest.raises(TypeError) as e:
        "".join(["a", s])             # type: ignore[list-item]
    assert VALUE not in str(e.value)
    with pytest.raises(TypeError):
        "a" + s                       # type: ignore[operator]
    with pytest.raises(TypeError):
        Secret(123)                   # type: ignore[arg-type]


def test_json_needs_the_hook_and_the_hook_masks(s):
    with pytest.raises(TypeError) as e:
        json.dumps({"pw": s})
    assert VALUE not in str(e.value)
    assert json.loads(json.dumps({"pw": s, "n": [s]}, default=json_default)) == \
        {"pw": "***", "n": ["***"]}
    with pytest.raises(TypeError):
        json.dumps({"x": object()}, default=json_default)


def test_logging_with_percent_args(s, caplog):
    log = logging.getLogger("test.secret")
    with caplog.at_level(logging.DEBUG, logger="test.secret"):
        log.info("password is %s", s)
        log.info("password is %r", s)
        log.info("context %s", {"password": s})
        log.info(s)
    assert VALUE not in caplog.text
    assert all(VALUE not in r.getMessage() for r in caplog.records)
    assert "password is ***" in caplog.text


def test_exception_messages_and_tracebacks(s):
    try:
        raise RuntimeError("cannot connect", s)
    except RuntimeError as e:
        assert VALUE not in str(e) and VALUE not in repr(e)
        tb = traceback.format_exc()
    assert VALUE not in tb
    assert "***" in tb

    try:
        try:
            raise ValueError(s)
        except ValueError as inner:
            raise KeyError({"password": s}) from inner
    except KeyError:
        tb = traceback.format_exc()
    assert VALUE not in tb


def test_pickle_refused_copy_is_identity(s):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError) as e:
            pickle.dumps(s, protocol=protocol)
        assert VALUE not in str(e.value)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [s]})
    assert copy.copy(s) is s
    assert copy.deepcopy({"a": [s]})["a"][0] is s


def test_equality_and_hash_by_value_without_showing_it(s):
    same = Secret(VALUE, register=False)
    other = Secret("different", register=False)
    assert s == same and hash(s) == hash(same)
    assert s != other
    assert s != VALUE                   # only Secrets compare equal to Secrets
    assert len({s, same, other}) == 2
    assert bool(s) and not Secret("", register=False)


def test_immutable(s):
    with pytest.raises(AttributeError):
        s._value = "x"                 # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.other = 1                     # type: ignore[attr-defined]
    assert not hasattr(s, "__dict__")


def test_wrapping_a_secret_does_not_nest(s):
    assert Secret(s, register=False).reveal() == VALUE


# --- redaction ---------------------------------------------------------------------------

def test_redact_every_occurrence():
    assert redact("a=hunter2 b=hunter2", ["hunter2"]) == "a=*** b=***"
    assert redact("nothing here", ["hunter2"]) == "nothing here"


def test_redact_longest_first_for_prefixes():
    # "pass" alone must not leave "***word" behind
    assert redact("x password y pass z", ["pass", "password"]) == "x *** y *** z"


def test_redact_overlapping_secrets_leave_no_tail():
    assert redact("abcdefghi!", ["abcdef", "defghi"]) == "***!"
    assert redact("[aaaa]", ["aaa"]) == "[***]"              # overlapping occurrences
    assert redact("abcdef", ["abc", "def"]) == "***"         # adjacent: one mask
    assert redact("abc-def", ["abc", "def"]) == "***-***"


def test_redact_short_values_too_and_skips_empty():
    assert redact("a1b1", ["1"]) == "a***b***"
    assert redact("text", [""]) == "text"


def test_redact_accepts_secrets_and_encoded_forms(s):
    tricky = Secret('p"a\\s s/&?', register=False)
    assert redact(f"pw={VALUE}", [s]) == "pw=***"
    assert redact(json.dumps({"pw": tricky.reveal()}), [tricky]) == '{"pw": "***"}'
    assert redact("postgres://u:p%22a%5Cs%20s%2F%26%3F@db/x", [tricky]) == \
        "postgres://u:***@db/x"


def test_redact_multiline_secrets_line_by_line():
    key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n}\n-----END KEY-----\n"
    r = Redactor()
    r.register(Secret(key, register=False))
    lines = [r.redact(line) for line in f"loaded:\n{key}done }}".splitlines()]
    assert lines == ["loaded:", "***", "***", "***", "}", "***", "done }"]
    assert r.redact(f"x{key}y") == "x***y"


def test_redactor_registry():
    r = Redactor()
    assert r.redact("x hunter2") == "x hunter2"
    r.register(Secret("hunter2", register=False))
    r.register("other-value")
    r.register("")
    assert len(r) == 2
    assert r.redact("hunter2 other-value") == "*** ***"
    r.clear()
    assert r.redact("hunter2") == "hunter2"


def test_secrets_register_with_the_process_wide_redactor():
    value = "auto-registered-7c2e91"
    Secret(value)
    assert secret_mod.REDACTOR.redact(f"echo {value}") == "echo ***"
    unregistered = "not-registered-51ab03"
    Secret(unregistered, register=False)
    assert secret_mod.REDACTOR.redact(unregistered) == unregistered


def test_plans_and_backup_messages_redact_with_the_redactor_in_place_when_they_run(capsys):
    """Each test's private Redactor (the fixture replaces secret.REDACTOR) reaches every output
    path: plan.py and cli/backup.py once bound the process-wide one at import."""
    Secret(VALUE)
    entry = plan.change_entry(Change(f"file /etc/{VALUE}", "write", f"was {VALUE}", (),
                                     diff=f"+{VALUE}"))
    assert (entry["resource"], entry["why"], entry["diff"]) == ("file /etc/***", "was ***", "+***")
    backup._say(f"pg_restore: password {VALUE} refused")
    assert capsys.readouterr().err == "pg_restore: password *** refused\n"


def test_a_template_outside_provisioner_templating_shows_stars(s):
    out = jinja2.Environment().from_string("{{ pw }}").render(pw=s)
    assert out == "***"

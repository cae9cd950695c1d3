"""Flag errors keep the exit-code promise: a bad flag is bad input (exit 2) with the fix, and
under `--json` stdout still ends on a recap.

Invoke parses flags before any task code runs and answers a bad one with exit 1 (or a
traceback for `--forks abc`), so `install()` wraps its task parsing once, from `tasks.py`.
It also accepts `-v N` / `--verbose=N` as N times `-v`, which the help text promises.
"""
from __future__ import annotations

import difflib
import re

from invoke import Exit
from invoke.exceptions import ParseError
from invoke.parser import ParserContext
from invoke.program import Program

from provisioner.errors import EXIT_BAD_INPUT

_INT = re.compile(r"invalid literal for int\(\) with base 10: '(.*)'")
_NO_IDEA = re.compile(r"No idea what '(.*)' is!")
_NO_VALUE = re.compile(r"Flag <Argument: (\S+)")


def expand_verbose(argv: list[str]) -> list[str]:
    """`-v 3`, `-v3`, `--verbose 3` and `--verbose=3` as `-v -v -v`: verbosity counts -v flags."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        count = None
        if token.startswith("--verbose="):
            count = token.split("=", 1)[1]
        elif re.fullmatch(r"-v\d+", token):
            count = token[2:]
        elif token in ("-v", "--verbose") and i + 1 < len(argv) and argv[i + 1].isdigit():
            count = argv[i + 1]
            i += 1
        if count is not None and count.isdigit():
            out += ["-v"] * int(count)
        else:
            out.append(token)
        i += 1
    return out


def _task_names(program: Program) -> list[str]:
    names = list(program.collection.task_names)
    for aliases in program.collection.task_names.values():
        names += aliases
    return names


def _task(argv: list[str], program: Program) -> str | None:
    names = set(_task_names(program))
    return next((t for t in argv if t in names), None)


def _flags(program: Program, task: str | None) -> list[str]:
    """The long flags of `task` (a name or alias) as invoke parses them: the parser context of
    that one task (invoke's own parsing then builds every task's)."""
    if task is None:
        return []
    ctx = ParserContext(name=task, args=program.collection[task].get_arguments())
    return sorted(name for name in ctx.flags if name.startswith("--"))


def _problem(error: Exception, argv: list[str], program: Program, task: str | None,
             flags: list[str]) -> tuple[str, str]:
    """(what is wrong, how to fix it) for a parse error."""
    help_cmd = f"`invoke --help {task}`" if task else "`invoke --list`"
    text = str(error)
    m = _INT.search(text)
    if m:
        value = m.group(1)
        flag = next((argv[i - 1] for i, t in enumerate(argv) if t == value and i), None)
        flag = flag or next((t.split("=", 1)[0] for t in argv if t.endswith("=" + value)), "a flag")
        return f"{flag}: expected an integer, got '{value}'", f"pass a whole number, e.g. {flag} 2"
    m = _NO_VALUE.search(text)
    if m:
        return f"--{m.group(1).replace('_', '-')} needs a value", f"pass one, see {help_cmd}"
    m = _NO_IDEA.search(text)
    if m:
        what = m.group(1)
        if what.startswith("-"):
            close = difflib.get_close_matches(what.split("=", 1)[0], flags, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]}? " if close else ""
            return f"unknown flag {what}" + (f" for {task}" if task else ""), f"{hint}see {help_cmd}"
        if task:
            return f"unexpected argument '{what}' for {task}", f"see {help_cmd}"
        close = difflib.get_close_matches(what, _task_names(program), n=1, cutoff=0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"no task named '{what}'", f"{hint}see `invoke --list`"
    return text, f"see {help_cmd}"


def _wants_json(argv: list[str], flags: list[str]) -> bool:
    return "--json" in flags and any(t == "--json" or re.fullmatch(r"-[a-z]*j[a-z]*", t)
                                     for t in argv)


def _env(argv: list[str]) -> str:
    for i, t in enumerate(argv):
        if t in ("--env", "-e") and i + 1 < len(argv):
            return argv[i + 1]
        if t.startswith("--env="):
            return t.split("=", 1)[1]
    return ""


def install() -> None:
    """Wrap invoke's task parsing (idempotent)."""
    if getattr(Program.parse_tasks, "provisioner", False):
        return
    parse = Program.parse_tasks

    def parse_tasks(self: Program) -> None:
        argv = list(self.core.unparsed)
        if "--verbose" in _flags(self, _task(argv, self)):     # -v means verbose there only
            self.core.unparsed = expand_verbose(argv)
        try:
            parse(self)
        except (ParseError, ValueError) as e:
            task = getattr(getattr(e, "context", None), "name", None) or _task(argv, self)
            flags = _flags(self, task)
            message, fix = _problem(e, argv, self, task, flags)
            from provisioner.events import Events        # only a bad command line needs it
            events = Events(task=task or "invoke", env=_env(argv), json_out=_wants_json(argv, flags),
                            verbose=0, diff=False, check=False)
            raise Exit(code=events.fail_run(EXIT_BAD_INPUT, f"{message}\n    fix: {fix}")) from None

    parse_tasks.provisioner = True
    Program.parse_tasks = parse_tasks

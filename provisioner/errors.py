"""Errors a user can fix, and the exit codes of the whole tool.

`InputError` carries every problem found in one pass (never just the first), each with where it
is (file:line and key path), what is wrong, and how to fix it. The CLI prints `str(error)` and
exits with `EXIT_BAD_INPUT`.

Exit codes are stable and documented; scripts and CI depend on them:
  0 ok, 1 a step failed, 2 bad input, 3 a host unreachable, 4 a lock held,
  5 changes pending (under `--check --detailed-exitcode`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_LOCKED = 4
EXIT_PENDING = 5


def display_path(path: Path | str | None) -> str:
    """A path as a user would type it: relative to the working directory when below it."""
    if path is None:
        return ""
    p = Path(path)
    try:
        rel = os.path.relpath(p)
    except ValueError:          # another drive (Windows); keep it absolute
        return str(p)
    return rel if not rel.startswith("..") else str(p)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input. `line` is 1-based; `key` is a path like `groups.app.hosts[1]`."""

    file: Path | str | None
    line: int | None
    key: str | None
    message: str
    fix: str | None = None

    @property
    def where(self) -> str:
        place = display_path(self.file)
        if place and self.line is not None:
            place = f"{place}:{self.line}"
        if self.key:
            place = f"{place}: {self.key}" if place else self.key
        return place

    def __str__(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        return f"{head}\n    fix: {self.fix}" if self.fix else head


def _sort_key(p: Problem) -> tuple:
    return (str(p.file or ""), p.line if p.line is not None else -1, p.key or "")


class InputError(Exception):
    """Bad input (inventory, role defaults, flags, missing secrets): exit code 2.

    `problems` lists all of them, sorted by file and line.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Problem | str | Iterable[Problem]):
        if isinstance(problems, str):
            problems = [Problem(None, None, None, problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = sorted(problems, key=_sort_key)
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        files = {display_path(p.file) for p in self.problems}
        head = f"{len(self.problems)} problems"
        if len(files) == 1 and "" not in files:
            head += f" in {files.pop()}"
        body = "\n".join("  " + str(p).replace("\n", "\n  ") for p in self.problems)
        return f"{head}:\n{body}"

    def __str__(self) -> str:
        return self.render()

"""How a run looks: NDJSON for programs, plain lines for logs, a rich live view for terminals.

:mod:`provisioner.events` decides what happened, keeps the counts and redacts every value before
a writer sees it; the writers here only render. What a human sees is decided once, in
:class:`HumanWriter` (which steps show at which verbosity, output tails, diffs, the recap rows);
:class:`PlainWriter` writes those lines as text and :class:`LiveWriter` draws them with rich.

Every writer is called with the events lock held, so a writer never sees two calls at once and
each event is written with one ``write`` call: lines never interleave.

Plain output carries no ANSI codes at all, and neither plain nor live output passes on the
control characters found in values (remote command output often has colour codes and ``\\r``):
escape sequences are dropped and other control characters are shown escaped (``\\x07``), so a
value can neither restyle the terminal nor forge a line.
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, TextIO

from provisioner.secret import json_default

Line = tuple[str, "str | None"]          # (text, rich style); the plain writer ignores the style

STATUS_STYLE = {"ok": "green", "changed": "yellow", "failed": "bold red",
                "skipped": "dim", "unreachable": "bold magenta"}
RECAP_COUNTS = ("ok", "changed", "failed", "unreachable", "skipped")
RECAP_COLUMNS = ("host", *RECAP_COUNTS, "seconds", "remote commands")
FAILING = ("failed", "unreachable")
OUTPUT_TAIL = 20                          # lines of a failing step's output shown below -vv
INDENT = "    "                           # continuation lines (diffs, output) of a step line

# CSI (colours, cursor moves), OSC (titles, hyperlinks) and the other two-byte ESC sequences
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")       # all but \t and \n


def _escape(match: re.Match) -> str:
    return f"\\x{ord(match.group()):02x}"


def _sanitize(text: str) -> str:
    return _CONTROL.sub(_escape, _ESCAPES.sub("", text))


def one_line(value: Any) -> str:
    """A value as one printable line ("-" for nothing)."""
    if value is None or value == "":
        return "-"
    text = str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return _sanitize(text)


def text_lines(text: str) -> list[str]:
    """Printable lines of a multi-line text, trailing blank lines dropped."""
    lines = [_sanitize(line) for line in str(text).splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def isatty(stream: Any) -> bool:
    """Whether a live view can be drawn on ``stream``: a terminal that is not "dumb"."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def _write(stream: TextIO, text: str) -> bool:
    """One write and a flush; False when the reader went away (closed pipe).

    A provisioning run must not stop halfway because whoever read its output left (`| head`),
    so a broken stream is dropped, not raised.
    """
    try:
        try:
            stream.write(text)
        except UnicodeEncodeError:       # an ASCII-only locale: escape, never drop a line
            encoding = getattr(stream, "encoding", None) or "ascii"
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()
        return True
    except (OSError, ValueError):        # BrokenPipeError, EIO, "I/O operation on closed file"
        return False


class JsonWriter:
    """NDJSON: one event per line, on one stream (stdout), nothing else on it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def emit(self, event: dict) -> None:
        if self.broken:
            return
        line = json.dumps(event, default=json_default, allow_nan=False)
        if not _write(self.stream, line + "\n"):
            self.broken = True


class HumanWriter:
    """What people see, whatever draws it. Subclasses implement the ``start`` .. ``close``
    sinks; the ``*_lines`` methods decide the content."""

    def __init__(self, *, out: TextIO, err: TextIO, verbose: int, diff: bool, check: bool) -> None:
        self.out = out
        self.err = err
        self.verbose = verbose
        self.diff = diff
        self.check = check
        self.broken: set[int] = set()

    # --- content ------------------------------------------------------------------------
    def shows(self, status: str) -> bool:
        """Changes and failures always show; ok and skipped steps with -v."""
        return status in ("changed", *FAILING) or self.verbose >= 1

    def start_lines(self, ev: dict) -> list[Line]:
        hosts = [one_line(h) for h in ev["hosts"]]
        text = (f"{one_line(ev['task'])} on {one_line(ev['env'])}: {len(hosts)} "
                f"host{'' if len(hosts) == 1 else 's'}: {', '.join(hosts) or '-'}")
        if ev["check"]:
            text += " (check mode: nothing will be changed)"
        if self.verbose >= 1:
            text += f"; run {ev['run_id']}"
        return [(text, "bold")]

    def step_lines(self, ev: dict, diff: str | None, output: str | None) -> list[Line]:
        status = ev["status"]
        if not self.shows(status):
            return []
        head = " | ".join(one_line(ev[k]) for k in ("host", "role", "resource")) + f" | {status}"
        if ev["reason"]:
            head += f": {one_line(ev['reason'])}"
        if self.verbose >= 2:
            head += f" ({ev['seconds']:.2f}s)"
        lines: list[Line] = [(head, STATUS_STYLE[status])]
        if diff and self.diff:
            lines += [(INDENT + line, _diff_style(line)) for line in text_lines(diff)]
        if output and (status in FAILING or self.verbose >= 3):
            out = text_lines(output)
            if status in FAILING and self.verbose < 2 and len(out) > OUTPUT_TAIL:
                hidden = len(out) - OUTPUT_TAIL
                lines.append((f"{INDENT}... {hidden} earlier line{'' if hidden == 1 else 's'} "
                              f"of output hidden (-vv shows all)", "dim"))
                out = out[-OUTPUT_TAIL:]
            lines += [(INDENT + line, None) for line in out]
        return lines

    def host_lines(self, ev: dict) -> list[Line]:
        """The per-host "done" line, with -v (the recap has the same numbers)."""
        if self.verbose < 1:
            return []
        return [(f"{one_line(ev['host'])} | done: {ev['status']} in {ev['seconds']:.2f}s, "
                 f"{ev['remote_commands']} remote commands", STATUS_STYLE.get(ev["status"]))]

    def message_lines(self, prefix: str, message: Any, style: str) -> list[Line]:
        lines = text_lines(message) or ["-"]
        return [(f"{prefix}: {lines[0]}", style)] + [(line, style) for line in lines[1:]]

    def progress_lines(self, ev: dict) -> list[Line]:
        """Shown at every verbosity: a long wait says it is still waiting."""
        head = " | ".join(one_line(ev[k]) for k in ("host", "role", "resource"))
        return [(f"{head} | {one_line(ev['message'])}", "cyan")]

    def warning_lines(self, ev: dict) -> list[Line]:
        prefix = f"warning: {one_line(ev['host'])}" if ev.get("host") else "warning"
        return self.message_lines(prefix, ev["message"], "yellow")

    def host_error_lines(self, ev: dict) -> list[Line]:
        return self.message_lines(f"error: {one_line(ev['host'])}", ev["error"], "bold red")

    def error_lines(self, ev: dict) -> list[Line]:
        return self.message_lines("error", ev["message"], "bold red")

    def drift_lines(self, ev: dict) -> list[Line]:
        last = ev.get("last_run")
        run = (f"{one_line(last['ts'])} by {one_line(last['who'])}@{one_line(last['from'])}, "
               f"config {one_line(last['config'])}" if last else None)
        host = one_line(ev["host"])
        if not ev["drifted"]:
            return [(f"drift: {host}: matches its roles"
                     + (f" (last run that changed it: {run})" if run else ""), "green")]
        n = len(ev["drifted"])
        since = f"since the last run that changed it ({run})" if run else "(no run of ours on record)"
        return [(f"drift: {host}: {n} resource{'' if n == 1 else 's'} drifted {since}: "
                 f"{', '.join(one_line(d) for d in ev['drifted'])}", "yellow")]

    def recap_rows(self, ev: dict) -> list[list[str]]:
        """Rows of the recap table: one per host, then the totals (no header)."""
        def row(name: str, c: dict) -> list[str]:
            return [one_line(name), *(str(c[k]) for k in RECAP_COUNTS), f"{c['seconds']:.1f}",
                    str(c["remote_commands"])]
        return [row(host, c) for host, c in ev["hosts"].items()] + [row("total", ev)]

    def recap_note(self, ev: dict) -> list[Line]:
        if not ev["check"]:
            return []
        n = ev["changed"]
        return [(f"check mode: nothing was applied; {n} change{'' if n == 1 else 's'} pending",
                 "yellow" if n else None)]

    # --- sinks (subclasses) --------------------------------------------------------------
    def start(self, ev: dict) -> None: ...
    def step(self, ev: dict, diff: str | None, output: str | None, tally: dict) -> None: ...
    def host(self, ev: dict, repeat: bool = True) -> None: ...
    def progress(self, ev: dict) -> None: ...
    def warning(self, ev: dict) -> None: ...
    def drift(self, ev: dict) -> None: ...
    def error(self, ev: dict) -> None: ...
    def recap(self, ev: dict) -> None: ...
    def close(self) -> None: ...

    def write_plain(self, stream: TextIO, lines: list[Line]) -> None:
        if lines and id(stream) not in self.broken:
            if not _write(stream, "".join(text + "\n" for text, _ in lines)):
                self.broken.add(id(stream))


def _diff_style(line: str) -> str | None:
    if line.startswith(("+++", "---")):
        return "bold"
    if line.startswith("+"):
        return "green"
    if line.startswith("-"):
        return "red"
    if line.startswith("@@"):
        return "cyan"
    return None


def plain_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """Aligned columns: the first left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(r[i]) for r in [list(header), *rows]) for i in range(len(header))]

    def fmt(r: list[str] | tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(cells).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]


class PlainWriter(HumanWriter):
    """Not a terminal (CI, cron, a pipe): plain lines, no ANSI codes, no redrawing."""

    def start(self, ev: dict) -> None:
        self.write_plain(self.out, self.start_lines(ev))

    def step(self, ev: dict, diff: str | None, output: str | None, tally: dict) -> None:
        self.write_plain(self.out, self.step_lines(ev, diff, output))

    def host(self, ev: dict, repeat: bool = True) -> None:
        if ev.get("error") and repeat:
            self.write_plain(self.err, self.host_error_lines(ev))
        self.write_plain(self.out, self.host_lines(ev))

    def progress(self, ev: dict) -> None:
        self.write_plain(self.out, self.progress_lines(ev))

    def warning(self, ev: dict) -> None:
        self.write_plain(self.err, self.warning_lines(ev))

    def drift(self, ev: dict) -> None:
        self.write_plain(self.out, self.drift_lines(ev))

    def error(self, ev: dict) -> None:
        self.write_plain(self.err, self.error_lines(ev))

    def recap(self, ev: dict) -> None:
        if not ev["hosts"]:              # stopped before any host (bad input): nothing to count
            return
        table = plain_table(RECAP_COLUMNS, self.recap_rows(ev))
        lines = [("", None), ("recap", None)] + [(t, None) for t in table] + self.recap_note(ev)
        self.write_plain(self.out, lines)


class LiveWriter(HumanWriter):
    """A terminal: one live line per host (spinner, current role and resource, counts), the
    shown steps printed above it, and at the end the recap as a table."""

    def __init__(self, *, out: TextIO, err: TextIO, verbose: int, diff: bool, check: bool,
                 width: int | None = None) -> None:
        super().__init__(out=out, err=err, verbose=verbose, diff=diff, check=check)
        from rich.console import Console
        # NO_COLOR asks for plain text: rich would only drop colours and keep bold and dim
        plain = bool(os.environ.get("NO_COLOR"))
        self.console = Console(file=out, force_terminal=True, markup=False, emoji=False,
                               highlight=False, width=width,
                               color_system=None if plain else "auto")
        # warnings and errors go to stderr; when that is the same terminal, they go through the
        # live console so they do not tear the live view
        self.err_on_console = err is out or isatty(err)
        self._live: Any = None
        self._view_lock = threading.Lock()   # a leaf lock: rich's refresh thread takes it too
        self._rows: dict[str, dict] = {}
        self._spinners: dict[str, Any] = {}

    def _print(self, lines: list[Line]) -> None:
        if not lines:
            return
        from rich.text import Text
        text = Text()
        for i, (line, style) in enumerate(lines):
            if i:
                text.append("\n")
            text.append(line, style=style)
        try:
            self.console.print(text, soft_wrap=True)
        except (OSError, ValueError):
            pass

    def _print_err(self, lines: list[Line]) -> None:
        if self.err_on_console:
            self._print(lines)
        else:
            self.write_plain(self.err, lines)

    def _view(self, host: str, **fields: Any) -> None:
        with self._view_lock:
            row = self._rows.setdefault(host, {"role": None, "resource": None, "done": None,
                                               "seconds": 0.0, "tally": {}})
            row.update(fields)

    def _render(self) -> Any:
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text
        with self._view_lock:
            rows = [(host, dict(row)) for host, row in self._rows.items()]
        grid = Table.grid(padding=(0, 2))
        for host, row in rows:
            tally = row["tally"]
            if row["done"]:
                icon: Any = Text(row["done"], style=STATUS_STYLE.get(row["done"]))
                doing = Text(f"done in {row['seconds']:.1f}s", style="dim")
            else:
                icon = self._spinners.setdefault(host, Spinner("line", style="cyan"))
                doing = (Text(f"{one_line(row['role'])} | {one_line(row['resource'])}")
                         if row["resource"] else Text("waiting", style="dim"))
            counts = Text()
            for key in RECAP_COUNTS:
                n = tally.get(key, 0)
                if n or key == "ok":
                    counts.append(f"{key} {n}  ", style=STATUS_STYLE[key] if n else "dim")
            grid.add_row(icon, Text(one_line(host), style="bold"), counts, doing)
        return grid

    def start(self, ev: dict) -> None:
        from rich.live import Live
        for host in ev["hosts"]:
            self._view(host)
        self._print(self.start_lines(ev))
        self._live = Live(get_renderable=self._render, console=self.console, transient=True,
                          refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)
        try:
            self._live.start()
        except (OSError, ValueError):
            self._live = None

    def step(self, ev: dict, diff: str | None, output: str | None, tally: dict) -> None:
        self._view(ev["host"], role=ev["role"], resource=ev["resource"], tally=tally)
        self._print(self.step_lines(ev, diff, output))

    def host(self, ev: dict, repeat: bool = True) -> None:
        self._view(ev["host"], done=ev["status"], seconds=ev["seconds"])
        if ev.get("error") and repeat:
            self._print_err(self.host_error_lines(ev))
        self._print(self.host_lines(ev))

    def progress(self, ev: dict) -> None:
        self._print(self.progress_lines(ev))

    def warning(self, ev: dict) -> None:
        self._print_err(self.warning_lines(ev))

    def drift(self, ev: dict) -> None:
        self._print(self.drift_lines(ev))

    def error(self, ev: dict) -> None:
        self._print_err(self.error_lines(ev))

    def recap(self, ev: dict) -> None:
        from rich import box
        from rich.table import Table
        from rich.text import Text
        self.close()
        if not ev["hosts"]:
            return
        table = Table(title="recap", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      show_edge=False, collapse_padding=True)
        for col in RECAP_COLUMNS:
            table.add_column(col, justify="left" if col == "host" else "right", no_wrap=True)
        rows = self.recap_rows(ev)
        for i, row in enumerate(rows):
            cells = [Text(cell, style=STATUS_STYLE[col] if col in RECAP_COUNTS and col != "ok"
                          and cell != "0" else None)
                     for col, cell in zip(RECAP_COLUMNS, row)]
            table.add_row(*cells, style="bold" if i == len(rows) - 1 else None,
                          end_section=i == len(rows) - 2)
        try:
            self.console.print(table)
        except (OSError, ValueError):
            pass
        self._print(self.recap_note(ev))

    def close(self) -> None:
        """Stop the live view (idempotent); the terminal is left as it was."""
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()
            except (OSError, ValueError):
                pass


def human_writer(*, out: TextIO, err: TextIO, verbose: int, diff: bool, check: bool,
                 tty: bool | None = None) -> HumanWriter:
    """The live view on a terminal, plain lines otherwise (``tty`` overrides the detection)."""
    live = isatty(out) if tty is None else tty
    cls = LiveWriter if live else PlainWriter
    return cls(out=out, err=err, verbose=verbose, diff=diff, check=check)

"""What people see: plain lines users grep, verbosity, diffs, output tails, the recap table,
no ANSI codes off a terminal, and the rich live view on one."""
from __future__ import annotations

import io
import json
import re

import pytest

from provisioner import secret as secret_mod
from provisioner.events import Events
from provisioner.output import (
    OUTPUT_TAIL, LiveWriter, PlainWriter, human_writer, isatty, one_line, plain_table,
    text_lines,
)
from provisioner.secret import Redactor


@pytest.fixture(autouse=True)
def private_redactor(monkeypatch):
    monkeypatch.setattr(secret_mod, "REDACTOR", Redactor())


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def make(verbose=0, diff=False, check=False, tty=False):
    out, err = io.StringIO(), io.StringIO()
    ev = Events(task="provision", env="local", json_out=False, verbose=verbose, diff=diff,
                check=check, stream_out=out, stream_err=err, tty=tty)
    return ev, out, err


def step(ev, host="web1", status="changed", **kw):
    args = dict(host=host, role="nginx", resource="file /etc/nginx/nginx.conf", status=status,
                reason="content differs", seconds=0.25)
    args.update(kw)
    ev.step(**args)


# --- plain lines ---------------------------------------------------------------------------

def test_plain_step_lines_are_stable():
    ev, out, _ = make()
    step(ev)
    step(ev, "web2", "failed", resource="service nginx", reason="exit status 1")
    step(ev, "db1", "unreachable", role="base", resource="connect", reason="timed out")
    step(ev, "web1", "changed", resource="apt nginx", reason="")
    assert out.getvalue().splitlines() == [
        "web1 | nginx | file /etc/nginx/nginx.conf | changed: content differs",
        "web2 | nginx | service nginx | failed: exit status 1",
        "db1 | base | connect | unreachable: timed out",
        "web1 | nginx | apt nginx | changed",
    ]


def test_start_line_and_check_mode():
    ev, out, _ = make(check=True)
    ev.start(["web1", "web2"])
    step(ev)
    ev.recap()
    text = out.getvalue()
    assert text.splitlines()[0] == ("provision on local: 2 hosts: web1, web2 "
                                    "(check mode: nothing will be changed)")
    assert "web1 | nginx | file /etc/nginx/nginx.conf | changed: content differs" in text
    assert text.rstrip().endswith("check mode: nothing was applied; 1 change pending")


def test_ok_and_skipped_steps_only_with_v():
    ev, out, _ = make(verbose=0)
    step(ev, status="ok", reason="already present: nginx 1.22.1-9")
    step(ev, status="skipped", reason="only on web hosts")
    ev.host_done("web1", remote_commands=2, seconds=1.0)
    assert out.getvalue() == ""
    ev, out, _ = make(verbose=1)
    ev.start(["web1"])
    step(ev, status="ok", reason="already present: nginx 1.22.1-9")
    step(ev, status="skipped", reason="only on web hosts")
    ev.host_done("web1", remote_commands=2, seconds=1.0)
    assert out.getvalue().splitlines() == [
        f"provision on local: 1 host: web1; run {ev.run_id}",
        "web1 | nginx | file /etc/nginx/nginx.conf | ok: already present: nginx 1.22.1-9",
        "web1 | nginx | file /etc/nginx/nginx.conf | skipped: only on web hosts",
        "web1 | done: ok in 1.00s, 2 remote commands",
    ]


def test_vv_adds_step_durations():
    ev, out, _ = make(verbose=2)
    step(ev, seconds=0.1234)
    assert out.getvalue() == ("web1 | nginx | file /etc/nginx/nginx.conf | changed: "
                              "content differs (0.12s)\n")


DIFF = "--- /etc/nginx/nginx.conf\n+++ /etc/nginx/nginx.conf (new)\n@@ -1 +1 @@\n-a\n+b\n"


def test_diff_only_in_diff_mode_indented_under_its_step():
    ev, out, _ = make(diff=False)
    step(ev, diff=DIFF)
    assert out.getvalue().count("\n") == 1
    ev, out, _ = make(diff=True)
    step(ev, diff=DIFF)
    assert out.getvalue().splitlines() == [
        "web1 | nginx | file /etc/nginx/nginx.conf | changed: content differs",
        "    --- /etc/nginx/nginx.conf",
        "    +++ /etc/nginx/nginx.conf (new)",
        "    @@ -1 +1 @@",
        "    -a",
        "    +b",
    ]


def test_failure_output_tail_and_all_with_vv():
    output = "".join(f"line {i}\n" for i in range(1, 31)) + "\n\n"
    ev, out, _ = make()
    step(ev, status="failed", reason="exit status 1", output=output)
    shown = out.getvalue().splitlines()
    assert shown[1] == "    ... 10 earlier lines of output hidden (-vv shows all)"
    assert shown[2:] == [f"    line {i}" for i in range(11, 31)]
    assert len(shown[2:]) == OUTPUT_TAIL
    ev, out, _ = make(verbose=2)
    step(ev, status="failed", reason="exit status 1", output=output)
    assert out.getvalue().splitlines()[1:] == [f"    line {i}" for i in range(1, 31)]


def test_output_of_other_steps_only_at_vvv():
    for verbose, shown in ((2, False), (3, True)):
        ev, out, _ = make(verbose=verbose)
        step(ev, status="ok", output="npm ci: added 120 packages")
        assert ("    npm ci: added 120 packages" in out.getvalue()) is shown


def test_recap_table_is_aligned_with_totals():
    ev, out, _ = make()
    clock_t = [0.0]
    ev._clock = lambda: clock_t[0]                                    # noqa: SLF001
    ev.start(["web1", "database-1"])
    for _ in range(12):
        step(ev, "web1", "ok")
    step(ev, "web1", "changed")
    step(ev, "database-1", "failed")
    ev.host_done("web1", remote_commands=14, seconds=2.345)
    ev.host_done("database-1", remote_commands=3, seconds=1.0)
    clock_t[0] = 3.04
    ev.recap()
    table = out.getvalue().split("\nrecap\n")[1].splitlines()
    assert table == [
        "host        ok  changed  failed  unreachable  skipped  seconds  remote commands",
        "web1        12        1       0            0        0      2.3               14",
        "database-1   0        0       1            0        0      1.0                3",
        "total       12        1       1            0        0      3.0               17",
    ]


def test_plain_table_aligns_first_column_left_and_others_right():
    assert plain_table(("a", "bb"), [["xyz", "1"], ["q", "100"]]) == [
        "a     bb", "xyz    1", "q    100"]


# --- no ANSI, no control characters --------------------------------------------------------

def test_not_a_tty_gives_no_ansi_even_from_coloured_remote_output():
    ev, out, err = make(verbose=3, diff=True)
    ev.start(["web1"])
    step(ev, status="failed", reason="\x1b[31mred\x1b[0m reason\r\nsecond line",
         output="\x1b[1mbold\x1b[0m\rprogress 50%\rprogress 100%\n\x07bell",
         diff="-\x1b[32ma\n+b\n")
    ev.warn("\x1b]0;title\x07warned")
    ev.host_done("web1", remote_commands=1, seconds=1, error="\x1b[2Jcleared")
    ev.recap()
    text = out.getvalue() + err.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "web1 | nginx | file /etc/nginx/nginx.conf | failed: red reason second line" in text
    assert "    \\x07bell" in text                                   # shown, escaped
    assert "warning: warned" in err.getvalue()
    assert "error: web1: cleared" in err.getvalue()


def test_one_line_and_text_lines():
    assert one_line(None) == "-" and one_line("") == "-"
    assert one_line("a\nb\r\nc\td") == "a b c\td"
    assert one_line("\x1b[31mx\x1b[0m\x00") == "x\\x00"
    assert text_lines("a\n\x1b[1mb\x1b[0m\n\n  \n") == ["a", "b"]


def test_human_writer_picks_plain_off_a_terminal_and_live_on_one(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    kw = dict(err=io.StringIO(), verbose=0, diff=False, check=False)
    assert isinstance(human_writer(out=io.StringIO(), **kw), PlainWriter)
    assert isinstance(human_writer(out=FakeTTY(), **kw), LiveWriter)
    assert isinstance(human_writer(out=FakeTTY(), tty=False, **kw), PlainWriter)
    monkeypatch.setenv("TERM", "dumb")
    assert not isatty(FakeTTY())


def test_an_ascii_only_stream_gets_escaped_text_not_an_error():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    ev = Events(task="provision", env="local", json_out=False, verbose=0, diff=False,
                check=False, stream_out=stream, stream_err=io.StringIO(), tty=False)
    step(ev, host="wéb1")
    step(ev, host="web2")
    stream.flush()
    assert raw.getvalue().decode("ascii").splitlines() == [
        "w\\xe9b1 | nginx | file /etc/nginx/nginx.conf | changed: content differs",
        "web2 | nginx | file /etc/nginx/nginx.conf | changed: content differs"]


# --- the live view -------------------------------------------------------------------------

def test_live_view_on_a_terminal_prints_steps_and_ends_with_the_recap_table():
    out, err = FakeTTY(), io.StringIO()
    ev = Events(task="provision", env="local", json_out=False, verbose=0, diff=True,
                check=False, stream_out=out, stream_err=err)
    ev.start(["web1", "web2"])
    step(ev, diff=DIFF)
    step(ev, "web2", "ok")
    step(ev, "web2", "failed", reason="exit status 1", output="boom\n")
    ev.warn("to stderr: not a terminal")
    ev.host_done("web1", remote_commands=3, seconds=1.0)
    ev.host_done("web2", remote_commands=2, seconds=1.5)
    ev.recap()
    text = out.getvalue()
    assert "\x1b[" in text                                          # colours on a terminal
    assert "changed: content differs" in text and "+b" in text and "boom" in text
    assert "recap" in text and "remote commands" in text and "total" in text
    assert ev._human._live is None                                   # noqa: SLF001 stopped
    assert err.getvalue() == "warning: to stderr: not a terminal\n"  # plain: not a terminal


def test_live_view_shows_user_text_literally_not_as_rich_markup():
    out = FakeTTY()
    ev = Events(task="provision", env="local", json_out=False, verbose=0, diff=False,
                check=False, stream_out=out, stream_err=out)
    ev.start(["web1"])
    step(ev, reason="[bold red]not markup[/] :smile:")
    ev.recap()
    assert "[bold red]not markup[/] :smile:" in out.getvalue()


def test_json_mode_on_a_terminal_draws_the_live_view_on_stderr_only():
    out, err = FakeTTY(), FakeTTY()
    ev = Events(task="provision", env="local", json_out=True, verbose=0, diff=False,
                check=False, stream_out=out, stream_err=err)
    ev.start(["web1"])
    step(ev)
    ev.warn("careful")
    ev.recap()
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
        "start", "step", "warning", "recap"]
    assert "\x1b[" in err.getvalue() and "careful" in err.getvalue()


def test_close_stops_the_live_view_without_a_recap():
    out = FakeTTY()
    with Events(task="provision", env="local", json_out=False, verbose=0, diff=False,
                check=False, stream_out=out, stream_err=out) as ev:
        ev.start(["web1"])
        assert ev._human._live is not None                           # noqa: SLF001
    assert ev._human._live is None                                   # noqa: SLF001


def test_no_color_means_no_styles_at_all_in_the_live_view(monkeypatch):
    """NO_COLOR: no colour and no bold either; the live view itself still works."""
    monkeypatch.setenv("NO_COLOR", "1")
    out, err = FakeTTY(), io.StringIO()
    ev = Events(task="provision", env="local", json_out=False, verbose=0, diff=False,
                check=False, stream_out=out, stream_err=err)
    ev.start(["web1"])
    step(ev, status="failed", reason="exit status 1")
    ev.host_done("web1", remote_commands=3, seconds=1.0)
    ev.recap()
    styles = [m for m in re.findall(r"\x1b\[([0-9;]*)m", out.getvalue()) if m not in ("", "0")]
    assert styles == []
    assert "web1 | nginx | file /etc/nginx/nginx.conf | failed: exit status 1" in out.getvalue()


def test_a_host_error_already_said_by_its_failing_step_is_not_repeated():
    ev, out, err = make()
    ev.start(["web1", "web2"])
    step(ev, "web1", "unreachable", role=None, resource="connection", reason="refused")
    ev.host_done("web1", remote_commands=0, seconds=1.0, error="refused")
    ev.host_done("web2", remote_commands=0, seconds=1.0, error="lost during apply")
    said = out.getvalue() + err.getvalue()
    assert said.count("refused") == 1
    assert "error: web2: lost during apply" in err.getvalue()

"""Events: the NDJSON stream, recap math, exit codes, redaction everywhere, thread safety."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
import threading
import time

import pytest

from provisioner import secret as secret_mod
from provisioner.errors import InputError
from provisioner.events import SCHEMA, STATUSES, Events
from provisioner.secret import Redactor, Secret


@pytest.fixture(autouse=True)
def private_redactor(monkeypatch):
    """Secrets made here register with a throwaway registry, not the process-wide one."""
    redactor = Redactor()
    monkeypatch.setattr(secret_mod, "REDACTOR", redactor)
    return redactor


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(json_out=True, verbose=0, diff=False, check=False, **kw):
    out, err = io.StringIO(), io.StringIO()
    ev = Events(task="provision", env="local", json_out=json_out, verbose=verbose, diff=diff,
                check=check, stream_out=out, stream_err=err, **kw)
    return ev, out, err


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def step(ev, host="web1", status="changed", **kw):
    args = dict(host=host, role="nginx", resource="file /etc/nginx/nginx.conf", status=status,
                reason="content differs", seconds=0.25)
    args.update(kw)
    ev.step(**args)


# --- the NDJSON stream ---------------------------------------------------------------------

def test_every_line_is_json_with_schema_run_id_and_utc_timestamp():
    ev, out, err = make(run_id="r1")
    ev.start(["web1", "web2"])
    step(ev)
    ev.warn("low disk", host="web2")
    ev.host_done("web1", remote_commands=3, seconds=1.5)
    ev.recap()
    events = lines(out)
    assert [e["event"] for e in events] == ["start", "step", "warning", "host", "recap"]
    for e in events:
        assert e["schema"] == SCHEMA == 1
        assert e["run_id"] == "r1"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["ts"])
        assert dt.datetime.fromisoformat(e["ts"]).utcoffset() == dt.timedelta(0)
    assert out.getvalue().endswith("\n")


def test_run_id_defaults_to_a_uuid4_hex():
    a, _, _ = make()
    b, _, _ = make()
    assert re.fullmatch(r"[0-9a-f]{32}", a.run_id) and a.run_id != b.run_id


def test_event_fields():
    ev, out, _ = make(check=True)
    ev.start(["web1"])
    step(ev, seconds=0.12345)
    ev.warn("a warning")
    ev.host_done("web1", remote_commands=4, seconds=2.0)
    start, st, warning, host = lines(out)
    assert {k: start[k] for k in ("task", "env", "hosts", "check")} == {
        "task": "provision", "env": "local", "hosts": ["web1"], "check": True}
    assert {k: st[k] for k in ("host", "role", "resource", "status", "reason", "seconds",
                               "check")} == {
        "host": "web1", "role": "nginx", "resource": "file /etc/nginx/nginx.conf",
        "status": "changed", "reason": "content differs", "seconds": 0.123, "check": True}
    assert "diff" not in st and "output" not in st
    assert warning["message"] == "a warning" and warning["host"] is None
    assert host == {**host, "host": "web1", "remote_commands": 4, "seconds": 2.0,
                    "status": "changed"}
    assert "error" not in host


def test_json_mode_keeps_stdout_pure_and_humans_read_stderr():
    ev, out, err = make(json_out=True)
    ev.start(["web1"])
    step(ev)
    ev.warn("careful")
    ev.recap()
    for line in out.getvalue().splitlines():
        json.loads(line)
    assert "web1 | nginx | file /etc/nginx/nginx.conf | changed: content differs" in err.getvalue()
    assert "warning: careful" in err.getvalue()
    assert "recap" in err.getvalue()


def test_human_mode_writes_lines_to_stdout_and_warnings_to_stderr():
    ev, out, err = make(json_out=False)
    ev.start(["web1"])
    step(ev)
    ev.warn("careful", host="web1")
    ev.host_done("web1", remote_commands=1, seconds=1, error="gave up")
    assert "| changed: content differs" in out.getvalue()
    assert "careful" not in out.getvalue() and "gave up" not in out.getvalue()
    assert "warning: web1: careful" in err.getvalue()
    assert "error: web1: gave up" in err.getvalue()


def test_progress_is_an_event_and_a_line_at_every_verbosity_and_counts_nothing():
    ev, out, err = make(json_out=True)
    ev.start(["db1"])
    ev.progress(host="vault", role="shop", resource="first full backup",
                message="pgbackrest-db1-full still running after 30 s")
    [_, progress] = lines(out)
    assert {k: progress[k] for k in ("event", "host", "role", "resource", "message")} == {
        "event": "progress", "host": "vault", "role": "shop", "resource": "first full backup",
        "message": "pgbackrest-db1-full still running after 30 s"}
    assert "vault | shop | first full backup | pgbackrest-db1-full still running after 30 s" \
        in err.getvalue()
    assert ev.recap()["ok"] == 0 and ev.exit_code(detailed=False) == 0
    ev, out, _ = make(json_out=False, verbose=0)
    ev.progress(host="vault", role=None, resource="wait", message="still running")
    assert "vault | - | wait | still running" in out.getvalue()


def test_diff_only_in_diff_mode():
    for diff_on in (False, True):
        ev, out, _ = make(diff=diff_on)
        step(ev, diff="--- a\n+++ b\n-old\n+new\n")
        step(ev, status="ok", diff=None)
        changed, ok = lines(out)
        assert ("diff" in changed) is diff_on
        assert "diff" not in ok
        if diff_on:
            assert changed["diff"] == "--- a\n+++ b\n-old\n+new\n"


def test_output_in_json_for_failing_steps_and_for_every_step_at_vvv():
    ev, out, _ = make(verbose=0)
    step(ev, status="failed", output="boom\n")
    step(ev, status="ok", output="fine\n")
    failed, ok = lines(out)
    assert failed["output"] == "boom\n" and "output" not in ok
    ev, out, _ = make(verbose=3)
    step(ev, status="ok", output="fine\n")
    assert lines(out)[0]["output"] == "fine\n"


def test_unknown_status_is_a_programming_error():
    ev, _, _ = make()
    with pytest.raises(ValueError, match="not one of"):
        step(ev, status="done")
    assert set(STATUSES) == {"ok", "changed", "failed", "skipped", "unreachable"}


def test_start_twice_is_an_error():
    ev, _, _ = make()
    ev.start(["web1"])
    with pytest.raises(RuntimeError):
        ev.start(["web1"])


# --- the recap -----------------------------------------------------------------------------

def test_recap_math():
    clock = Clock()
    ev, out, _ = make(clock=clock)
    ev.start(["web1", "web2", "db1"])
    for status, n in (("ok", 5), ("changed", 2), ("skipped", 1)):
        for _ in range(n):
            step(ev, "web1", status)
    step(ev, "web2", "ok")
    step(ev, "web2", "failed")
    step(ev, "db1", "unreachable")
    ev.host_done("web1", remote_commands=7, seconds=3.25)
    ev.host_done("web2", remote_commands=2, seconds=1.0)
    ev.host_done("db1", remote_commands=0, seconds=10.0)
    clock.t += 12.5
    recap = ev.recap()
    assert recap == lines(out)[-1]
    assert recap["event"] == "recap"
    assert {k: recap[k] for k in ("ok", "changed", "failed", "unreachable", "skipped",
                                  "remote_commands", "seconds")} == {
        "ok": 6, "changed": 2, "failed": 1, "unreachable": 1, "skipped": 1,
        "remote_commands": 9, "seconds": 12.5}
    assert list(recap["hosts"]) == ["web1", "web2", "db1"]      # the order given to start()
    assert recap["hosts"]["web1"] == {"ok": 5, "changed": 2, "failed": 0, "unreachable": 0,
                                      "skipped": 1, "remote_commands": 7, "seconds": 3.25}
    assert recap["hosts"]["db1"]["unreachable"] == 1
    host_status = {e["host"]: e["status"] for e in lines(out) if e["event"] == "host"}
    assert host_status == {"web1": "changed", "web2": "failed", "db1": "unreachable"}


def test_recap_lists_hosts_that_never_reported_and_hosts_not_announced():
    ev, out, _ = make()
    ev.start(["web1", "web2"])
    step(ev, "extra", "ok")
    recap = ev.recap()
    assert list(recap["hosts"]) == ["web1", "web2", "extra"]
    assert recap["hosts"]["web2"] == {"ok": 0, "changed": 0, "failed": 0, "unreachable": 0,
                                      "skipped": 0, "remote_commands": 0, "seconds": 0.0}


def test_recap_is_printed_once_and_last():
    ev, out, err = make()
    ev.start(["web1"])
    first = ev.recap()
    second = ev.recap()
    assert [e["event"] for e in lines(out)] == ["start", "recap"]
    assert first["ok"] == second["ok"] == 0
    assert err.getvalue().count("recap") == 1


def test_host_error_without_a_failed_step_counts_as_a_failure():
    ev, out, _ = make()
    ev.start(["web1", "web2"])
    step(ev, "web1", "ok")
    ev.host_done("web1", remote_commands=1, seconds=1, error="connection reset")
    step(ev, "web2", "failed")
    ev.host_done("web2", remote_commands=1, seconds=1, error="the step above failed")
    recap = ev.recap()
    assert recap["hosts"]["web1"]["failed"] == 1
    assert recap["hosts"]["web2"]["failed"] == 1                  # not counted twice
    host = [e for e in lines(out) if e["event"] == "host"]
    assert host[0]["status"] == "failed" and host[0]["error"] == "connection reset"
    assert ev.exit_code(detailed=False) == 1


# --- exit codes ----------------------------------------------------------------------------

@pytest.mark.parametrize("statuses, check, detailed, code", [
    ([], False, False, 0),
    (["ok", "skipped"], False, True, 0),
    (["ok", "changed"], False, False, 0),
    (["ok", "changed"], False, True, 0),          # pending only means something in check mode
    (["ok", "changed"], True, False, 0),
    (["ok", "changed"], True, True, 5),
    (["ok", "skipped"], True, True, 0),
    (["unreachable", "changed"], True, True, 3),
    (["unreachable", "ok"], False, False, 3),
    (["failed", "unreachable", "changed"], True, True, 1),
    (["failed"], False, False, 1),
])
def test_exit_code_table(statuses, check, detailed, code):
    ev, _, _ = make(check=check)
    for i, status in enumerate(statuses):
        step(ev, f"h{i}", status)
    assert ev.exit_code(detailed=detailed) == code


def test_fail_run_emits_error_then_recap_and_sets_the_exit_code():
    ev, out, err = make()
    ev.start(["web1"])
    step(ev, status="failed")
    assert ev.fail_run(4, "deploy lock held by alice since 10:02") == 4
    *_, error, recap = lines(out)
    assert error == {**error, "event": "error", "code": 4,
                     "message": "deploy lock held by alice since 10:02"}
    assert recap["event"] == "recap" and recap["failed"] == 1
    assert ev.exit_code(detailed=True) == 4
    assert "error: deploy lock held by alice since 10:02" in err.getvalue()


def test_fail_run_before_start_still_ends_on_a_recap():
    ev, out, _ = make()
    ev.fail_run(2, InputError("inventories/prod.yml:3: hosts: must not be empty"))
    assert [e["event"] for e in lines(out)] == ["error", "recap"]
    assert lines(out)[-1]["hosts"] == {}


def test_fail_run_after_the_recap_repeats_the_recap_as_the_last_line():
    ev, out, err = make()
    ev.start(["web1"])
    ev.recap()
    ev.fail_run(1, "releasing the lock failed")
    assert [e["event"] for e in lines(out)] == ["start", "recap", "error", "recap"]
    assert err.getvalue().count("\nrecap\n") == 1                  # people see one table


def test_fail_run_first_code_wins_and_zero_is_refused():
    ev, _, _ = make()
    ev.fail_run(4, "locked")
    ev.fail_run(1, "and then something else")
    assert ev.exit_code(detailed=False) == 4
    with pytest.raises(ValueError):
        ev.fail_run(0, "fine")


def test_an_exception_leaving_the_with_block_emits_error_and_recap():
    out = io.StringIO()
    with pytest.raises(InputError):
        with Events(task="deploy", env="prod", json_out=True, verbose=0, diff=False, check=False,
                    stream_out=out, stream_err=io.StringIO()) as ev:
            ev.start(["web1"])
            raise InputError("flag --serial: must be a positive number")
    *_, error, recap = lines(out)
    assert error["code"] == 2 and error["message"] == "flag --serial: must be a positive number"
    assert recap["event"] == "recap"
    assert ev.exit_code(detailed=False) == 2

    out = io.StringIO()
    with pytest.raises(KeyError):
        with Events(task="deploy", env="prod", json_out=True, verbose=0, diff=False, check=False,
                    stream_out=out, stream_err=io.StringIO()) as ev:
            raise KeyError("x")
    assert lines(out)[-2]["code"] == 1 and lines(out)[-2]["message"] == "KeyError: 'x'"


# --- redaction -----------------------------------------------------------------------------

SECRET = 'pa"ss\\w0rd-7f3e'           # its JSON-escaped form differs from the value


def _leaks(text: str) -> list[str]:
    forms = [SECRET, json.dumps(SECRET)[1:-1], "pa%22ss"]
    return [f for f in forms if f in text]


@pytest.mark.parametrize("json_out", [True, False])
@pytest.mark.parametrize("tty", [False, True])
def test_a_registered_secret_never_leaves_in_any_field(json_out, tty):
    secret = Secret(SECRET)
    ev, out, err = make(json_out=json_out, verbose=3, diff=True, tty=tty)
    ev.start([f"web1-{SECRET}"])
    step(ev, host=f"web1-{SECRET}", role=f"role {SECRET}", resource=f"env {SECRET}",
         reason=f"password {SECRET} differs", diff=f"-old\n+password={SECRET}\n",
         output=f"echo {SECRET}\n{json.dumps(SECRET)}\n")
    step(ev, status="failed", reason=secret, output=f"{SECRET}\n" * 30)
    step(ev, status="ok", output=f"ok {SECRET}")
    ev.warn(f"warning about {SECRET}", host=SECRET)
    ev.host_done(f"web1-{SECRET}", remote_commands=1, seconds=1, error=f"failed with {SECRET}")
    ev.host_done("web1", remote_commands=1, seconds=1, error=RuntimeError(f"boom {SECRET}"))
    ev.fail_run(1, f"run failed: {SECRET}")
    everything = out.getvalue() + err.getvalue()
    assert _leaks(everything) == []
    assert "***" in everything
    if json_out:
        events = lines(out)
        step_ev = [e for e in events if e["event"] == "step"]
        assert step_ev[0]["reason"] == "password *** differs"
        assert step_ev[0]["diff"] == "-old\n+password=***\n"
        assert step_ev[0]["output"] == "echo ***\n\"***\"\n"
        assert step_ev[1]["reason"] == "***"                       # a Secret object
        assert "web1-***" in events[-1]["hosts"]                   # recap keys too


def test_a_secret_registered_after_events_were_made_is_still_redacted():
    ev, out, _ = make()
    Secret("late-registered-value")
    step(ev, reason="saw late-registered-value")
    assert "late-registered-value" not in out.getvalue()


# --- threads -------------------------------------------------------------------------------

class ChoppyStream(io.StringIO):
    """A stream that writes each text in two halves and lets other threads run in between: any
    write not serialised by Events would interleave mid-line here."""

    def write(self, s: str) -> int:
        half = len(s) // 2
        super().write(s[:half])
        time.sleep(0)
        super().write(s[half:])
        return len(s)


@pytest.mark.parametrize("json_out", [True, False])
def test_fifty_threads_of_forty_steps_count_exactly_and_never_interleave(json_out):
    threads_n, per_thread = 50, 40
    out, err = ChoppyStream(), ChoppyStream()
    ev = Events(task="provision", env="local", json_out=json_out, verbose=1, diff=False,
                check=False, stream_out=out, stream_err=err, tty=False)
    hosts = [f"host{i:02d}" for i in range(threads_n)]
    ev.start(hosts)
    barrier = threading.Barrier(threads_n)

    def work(host: str) -> None:
        barrier.wait()
        for j in range(per_thread):
            ev.step(host=host, role="base", resource=f"file /etc/f{j}", status=STATUSES[j % 5],
                    reason=f"reason {j}", seconds=0.001)
        ev.host_done(host, remote_commands=per_thread, seconds=1.0)

    threads = [threading.Thread(target=work, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recap = ev.recap()
    each = per_thread // 5
    total = threads_n * each
    assert {k: recap[k] for k in STATUSES} == dict.fromkeys(STATUSES, total)
    assert recap["remote_commands"] == threads_n * per_thread
    for host in hosts:
        assert recap["hosts"][host] == {**dict.fromkeys(STATUSES, each),
                                        "remote_commands": per_thread, "seconds": 1.0}

    if json_out:
        events = lines(out)
        steps = [e for e in events if e["event"] == "step"]
        assert len(steps) == threads_n * per_thread
        assert events[-1]["event"] == "recap"
        human = err.getvalue()
    else:
        human = out.getvalue()
    step_line = re.compile(r"host\d\d \| base \| file /etc/f\d+ \| "
                           r"(ok|changed|failed|skipped|unreachable): reason \d+")
    shown = [line for line in human.splitlines() if " | " in line]
    done = [line for line in shown if " | done: " in line]
    assert len(shown) - len(done) == threads_n * per_thread             # -v shows every step
    assert all(step_line.fullmatch(line) for line in shown if line not in done)
    assert len(done) == threads_n


def test_a_closed_pipe_does_not_stop_the_run():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    ev = Events(task="provision", env="local", json_out=True, verbose=0, diff=False, check=False,
                stream_out=Broken(), stream_err=Broken())
    ev.start(["web1"])
    step(ev, status="failed")
    assert ev.recap()["failed"] == 1
    assert ev.exit_code(detailed=False) == 1


def test_default_streams_are_the_current_sys_streams(capsys):
    ev = Events(task="provision", env="local", json_out=True, verbose=0, diff=False, check=False)
    ev.start(["web1"])
    ev.recap()
    captured = capsys.readouterr()
    assert [json.loads(l)["event"] for l in captured.out.splitlines()] == ["start", "recap"]
    assert "recap" in captured.err


@pytest.mark.parametrize("json_out", [True, False])
def test_an_escape_sequence_inside_a_secret_does_not_rejoin_it(json_out):
    """Escape sequences are dropped for the terminal: redacting before that let a secret split
    by one (`s3cr<ESC>[0met`) through whole."""
    Secret("s3cr3t-value-7781")
    ev, out, err = make(json_out=json_out, verbose=3)
    ev.start(["web1"])
    step(ev, status="failed", output="token: s3cr3t-\x1b[0mvalue-7781\n")
    ev.recap()
    shown = out.getvalue() + err.getvalue()
    assert "value-7781" not in shown.replace("\\u001b[0m", "")

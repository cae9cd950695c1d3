"""The event stream of a run: what happened on each host, the recap, and the exit code.

The runner reports every step result, host end and warning to one :class:`Events`, from as
many threads as it likes. Events keeps the counts (under one lock, so they are exact), redacts
every value, and hands the result to the writers in :mod:`provisioner.output`:

* ``--json``: NDJSON on stdout (one object per line, ``"schema": 1``); human output then goes
  to stderr, so stdout stays pure NDJSON;
* otherwise human lines on stdout, warnings and errors on stderr: a rich live view on a
  terminal, plain greppable lines when not (CI, cron, pipes).

Redaction: every string that leaves this module (host, role, resource, reason, diff, output,
warning and error messages) passes through :data:`provisioner.secret.REDACTOR` at the moment
it is emitted, and a :class:`~provisioner.secret.Secret` renders as ``***``. The writers only
ever see redacted values.

Exit codes (:mod:`provisioner.errors`): a failed step -> 1, else an unreachable host -> 3, else
changes pending in check mode with ``detailed`` -> 5, else 0. A run stopped by something else
(bad input 2, lock held 4, ...) calls :meth:`Events.fail_run`, which emits an ``error`` event
and the recap, so a JSON consumer always gets a recap as the last line.

Use::

    events = Events(task="provision", env="prod", json_out=False, verbose=0, diff=False,
                    check=False)
    events.start(["web1", "web2"])
    events.step(host="web1", role="nginx", resource="file /etc/nginx/nginx.conf",
                status="changed", reason="content differs", seconds=0.12, diff=diff_text)
    events.host_done("web1", remote_commands=4, seconds=2.3)
    events.recap()
    sys.exit(events.exit_code(detailed=args.detailed_exitcode))
"""
from __future__ import annotations

import datetime as _dt
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from provisioner import secret as _secret
from provisioner.errors import EXIT_FAILED, EXIT_OK, EXIT_PENDING, EXIT_UNREACHABLE
from provisioner.output import RECAP_COUNTS, HumanWriter, JsonWriter, human_writer
from provisioner.output import _ESCAPES

__all__ = ["SCHEMA", "STATUSES", "Events"]

SCHEMA = 1
STATUSES = ("ok", "changed", "failed", "skipped", "unreachable")


def _text(value: Any) -> str:
    """A free-text field: redacted, never None."""
    if value is None:
        return ""
    if isinstance(value, _secret.Secret):
        return _secret.MASK
    text = value if isinstance(value, str) else str(value)
    # escape sequences go first: dropped after redaction, one inside a secret would join its
    # halves back together on the terminal
    return _secret.REDACTOR.redact(_ESCAPES.sub("", text))


def _seconds(value: Any) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return 0.0
    return round(s, 3) if math.isfinite(s) else 0.0


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


@dataclass
class _Tally:
    """What happened on one host."""

    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    remote_commands: int = 0
    seconds: float = 0.0
    done: bool = False
    said: set[str] = field(default_factory=set)     # reasons of its failing steps, as shown

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in RECAP_COUNTS}

    @property
    def status(self) -> str:
        """failed > unreachable > changed > ok, the precedence of the exit codes; a host whose
        every step was skipped (never started, lock held) is "skipped", not "ok"."""
        if self.failed:
            return "failed"
        if self.unreachable:
            return "unreachable"
        if self.changed:
            return "changed"
        return "skipped" if self.skipped and not self.ok else "ok"


class Events:
    """Collects one run's events; see the module docstring. Every method is thread-safe."""

    def __init__(self, *, task: str, env: str, json_out: bool, verbose: int, diff: bool,
                 check: bool, stream_out: TextIO | None = None, stream_err: TextIO | None = None,
                 run_id: str | None = None, clock: Callable[[], float] = time.monotonic,
                 tty: bool | None = None) -> None:
        """``stream_out``/``stream_err`` default to the *current* sys.stdout/sys.stderr.
        ``tty`` forces (True) or forbids (False) the live view; None detects a terminal."""
        self.task = task
        self.env = env
        self.json_out = json_out
        self.verbose = int(verbose or 0)
        self.diff = bool(diff)
        self.check = bool(check)
        self.run_id = run_id or uuid.uuid4().hex
        self._clock = clock
        self._t0 = clock()
        out = stream_out if stream_out is not None else sys.stdout
        err = stream_err if stream_err is not None else sys.stderr
        self._lock = threading.RLock()
        self._hosts: dict[str, _Tally] = {}
        self._started = False
        self._recapped = False
        self._failure: int | None = None
        self._json = JsonWriter(out) if json_out else None
        human_out = err if json_out else out
        self._human: HumanWriter = human_writer(out=human_out, err=err, verbose=self.verbose,
                                                diff=self.diff, check=self.check, tty=tty)

    # --- reporting (the runner calls these) ----------------------------------------------
    def start(self, hosts: list[str]) -> None:
        """The run begins on ``hosts`` (in this order); the live view starts on a terminal."""
        names = [str(h) for h in hosts]
        body = {"task": _text(self.task), "env": _text(self.env),
                "hosts": [_text(h) for h in names], "check": self.check, "diff": self.diff}
        with self._lock:
            if self._started:
                raise RuntimeError("Events.start() called twice")
            self._started = True
            self._t0 = self._clock()
            for name in names:
                self._hosts.setdefault(name, _Tally())
            ev = self._emit("start", body)
            self._human.start(ev)

    def step(self, *, host: str, role: str | None, resource: str, status: str,
             reason: str | None, seconds: float, diff: str | None = None,
             output: str | None = None) -> None:
        """One step result. ``status`` is one of :data:`STATUSES`; in check mode a would-be
        change is "changed" (the event says ``"check": true``). ``diff`` is kept only in diff
        mode; ``output`` (of a failed command) is shown for failing steps, and for all at -vvv."""
        if status not in STATUSES:
            raise ValueError(f"step status {status!r} is not one of {', '.join(STATUSES)}")
        name = str(host)
        body: dict[str, Any] = {
            "host": _text(name), "role": None if role is None else _text(role),
            "resource": _text(resource),
            "status": status, "reason": _text(reason), "seconds": _seconds(seconds),
            "check": self.check,
        }
        diff_text = _text(diff) if self.diff and diff else None
        out_text = _text(output) if output else None
        if diff_text is not None:
            body["diff"] = diff_text
        if out_text is not None and (status in ("failed", "unreachable") or self.verbose >= 3):
            body["output"] = out_text
        with self._lock:
            tally = self._hosts.setdefault(name, _Tally())
            setattr(tally, status, getattr(tally, status) + 1)
            if status in ("failed", "unreachable"):
                tally.said.add(body["reason"])
            ev = self._emit("step", body)
            self._human.step(ev, diff_text, out_text, tally.counts())

    def host_done(self, host: str, *, remote_commands: int, seconds: float,
                  error: str | None = None) -> None:
        """A host finished (or gave up, with ``error``). An error on a host that has no failed
        or unreachable step counts as one failure, so the run cannot end with exit code 0."""
        name = str(host)
        error_text = _text(error) if error else None
        with self._lock:
            tally = self._hosts.setdefault(name, _Tally())
            tally.remote_commands = int(remote_commands or 0)
            tally.seconds = _seconds(seconds)
            tally.done = True
            if error_text is not None and not (tally.failed or tally.unreachable):
                tally.failed += 1
            body: dict[str, Any] = {"host": _text(name), "remote_commands": tally.remote_commands,
                                    "seconds": tally.seconds, "status": tally.status}
            if error_text is not None:
                body["error"] = error_text
            ev = self._emit("host", body)
            # people read an error once: not again when a failing step already said it
            self._human.host(ev, repeat=error_text is not None and error_text not in tally.said)

    def progress(self, *, host: str, role: str | None, resource: str, message: str) -> None:
        """A step still under way says how far it got (a long wait: a first full backup); no
        count changes, the step's own result follows."""
        body = {"host": _text(host), "role": None if role is None else _text(role),
                "resource": _text(resource), "message": _text(message)}
        with self._lock:
            ev = self._emit("progress", body)
            self._human.progress(ev)

    def warn(self, message: str, host: str | None = None) -> None:
        """Something a user should know that does not fail the run (stderr for humans)."""
        body = {"host": _text(host) if host is not None else None, "message": _text(message)}
        with self._lock:
            ev = self._emit("warning", body)
            self._human.warning(ev)

    def drift(self, host: str, drifted: list[str], last_run: dict | None) -> None:
        """`invoke drift`'s verdict for one host: the resources that no longer match its roles,
        and the last run that changed it (its audit line: when, who, which config)."""
        last = None
        if last_run:
            last = {k: _text(last_run.get(k)) if last_run.get(k) is not None else None
                    for k in ("ts", "who", "from", "ci_job", "task", "config", "result")}
        body = {"host": _text(host), "drifted": [_text(d) for d in drifted], "last_run": last}
        with self._lock:
            ev = self._emit("drift", body)
            self._human.drift(ev)

    def recap(self) -> dict:
        """Print the recap (once; later calls only return it) and return the recap event."""
        with self._lock:
            ev = self._recap_event()
            if not self._recapped:
                self._recapped = True
                if self._json is not None:
                    self._json.emit(ev)
                self._human.recap(ev)
            return ev

    def fail_run(self, code: int, message: str | BaseException) -> int:
        """The run stops for a reason outside the steps (bad input 2, lock held 4, an internal
        error ...): emit ``{"event": "error", "code", "message"}`` and then the recap, so a JSON
        consumer always ends on a recap (re-emitted if one was already written). The first
        code given becomes :meth:`exit_code`'s answer; it is returned for ``sys.exit``."""
        code = int(code)
        if code == EXIT_OK:
            raise ValueError("fail_run() needs a non-zero exit code")
        body = {"code": code, "message": _text(message)}
        with self._lock:
            if self._failure is None:
                self._failure = code
            ev = self._emit("error", body)
            self._human.error(ev)
            if self._recapped and self._json is not None:
                self._json.emit(self._recap_event())
            self.recap()
        return code

    def exit_code(self, *, detailed: bool) -> int:
        """0 ok, 1 a step failed, 3 a host unreachable, 5 changes pending (check mode and
        ``detailed``); a code given to :meth:`fail_run` wins over all of them."""
        with self._lock:
            if self._failure is not None:
                return self._failure
            tallies = list(self._hosts.values())
        if any(t.failed for t in tallies):
            return EXIT_FAILED
        if any(t.unreachable for t in tallies):
            return EXIT_UNREACHABLE
        if self.check and detailed and any(t.changed for t in tallies):
            return EXIT_PENDING
        return EXIT_OK

    def close(self) -> None:
        """Stop the live view without a recap (e.g. on an exception); idempotent."""
        with self._lock:
            self._human.close()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """On an exception that escapes before the recap: an error event and the recap (with the
        exception's ``exit_code`` if it has one, else 1). The exception still propagates."""
        if exc is not None and not self._recapped:
            code = getattr(exc, "exit_code", None)
            if isinstance(exc, KeyboardInterrupt):
                code = 130                           # as a shell reports SIGINT
            elif not isinstance(code, int) or code == EXIT_OK:
                code = EXIT_FAILED
            if isinstance(exc, KeyboardInterrupt):
                message = "interrupted"
            elif hasattr(exc, "exit_code"):          # a user-facing error (InputError ...)
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}"
            self.fail_run(code, message)
        self.close()

    # --- internals -------------------------------------------------------------------------
    def _emit(self, event: str, body: dict) -> dict:
        """Stamp an event (the caller holds the lock, so stamps follow the output order) and
        write it to the NDJSON stream; returns it for the human writer."""
        ev = {"schema": SCHEMA, "event": event, "run_id": self.run_id, "ts": _utc_now(), **body}
        if self._json is not None:
            self._json.emit(ev)
        return ev

    def _recap_event(self) -> dict:
        hosts = {}
        totals = dict.fromkeys(RECAP_COUNTS, 0)
        remote = 0
        for name, t in self._hosts.items():
            counts = t.counts()
            for k, n in counts.items():
                totals[k] += n
            remote += t.remote_commands
            hosts[_text(name)] = {**counts, "remote_commands": t.remote_commands,
                                  "seconds": t.seconds}
        return {"schema": SCHEMA, "event": "recap", "run_id": self.run_id, "ts": _utc_now(),
                **totals, "remote_commands": remote,
                "seconds": _seconds(self._clock() - self._t0), "check": self.check,
                "hosts": hosts}

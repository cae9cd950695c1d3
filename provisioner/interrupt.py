"""Ctrl-C and SIGTERM during a run: start nothing new, let what was sent finish, end on a recap.

The first SIGINT or SIGTERM only sets a flag that the runner reads before each host and each
role; an apply already sent to a server is not cut (the agent is never killed mid-write) and its
result is reported. The run then ends with an `error` event and the recap, exit 128 + the
signal's number (130 for SIGINT, 143 for SIGTERM), as shells report a signal. A second signal
ends the process at once, as it would without us.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """Set once a stop was asked for; read by every worker thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    @property
    def code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def reason(self) -> str:
        return f"the run was interrupted ({self.name})"


@contextmanager
def on_signals(stop: Stop) -> Iterator[Stop]:
    """While inside, SIGINT and SIGTERM set `stop`; the handlers before are put back after.
    Only the main thread can take signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        if stop:                                   # the second one: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.request(signum)

    before = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)

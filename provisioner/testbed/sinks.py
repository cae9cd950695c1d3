"""Start, stop and read the testbed's alert sink (alert_sink.py): SMTP on the gateway's port
SMTP_PORT, webhooks on WEBHOOK_PORT, messages under `.testbed/alerts/`. inventories/local.yml
points role monitoring at these two addresses.
"""
from __future__ import annotations

import email
import email.policy
import json
import subprocess
import time
from pathlib import Path

from . import network, procs
from .config import STATE_DIR, Layout

SMTP_PORT = 2525
WEBHOOK_PORT = 9095
SYSTEM_PYTHON = "/usr/bin/python3"          # Debian's python3-aiosmtpd lives there
SCRIPT = str(Path(__file__).with_name("alert_sink.py"))
MARKER = "alert_sink.py"
ALERTS_DIR = STATE_DIR / "alerts"
PIDFILE_NAME = "alert-sink.pid"


def available() -> bool:
    """Whether the system python3 has aiosmtpd (Debian's python3-aiosmtpd)."""
    return subprocess.run([SYSTEM_PYTHON, "-c", "import aiosmtpd"], capture_output=True).returncode == 0 \
        if Path(SYSTEM_PYTHON).exists() else False


def argv(smtp: str, webhook: str, directory: Path) -> list[str]:
    return [SYSTEM_PYTHON, SCRIPT, "--smtp", smtp, "--webhook", webhook, "--dir", str(directory)]


def start(smtp_host: str, smtp_port: int, webhook_port: int, directory: Path, pidfile: Path,
          log: Path) -> bool:
    """Start the sink (or keep the one running with these settings) and wait for both ports."""
    started = procs.ensure(argv(f"{smtp_host}:{smtp_port}", f"{smtp_host}:{webhook_port}",
                                directory), log, pidfile, MARKER)
    network.wait_port(smtp_host, smtp_port, "the alert sink (SMTP)", pidfile, MARKER)
    network.wait_port(smtp_host, webhook_port, "the alert sink (webhook)", pidfile, MARKER)
    return started


def up(lay: Layout) -> bool:
    run = STATE_DIR / "run"
    run.mkdir(parents=True, exist_ok=True)
    return start(lay.gateway, SMTP_PORT, WEBHOOK_PORT, ALERTS_DIR, run / PIDFILE_NAME,
                 STATE_DIR / "logs" / "alert-sink.log")


def health() -> list[tuple[str, str | None]]:
    """(what, None when it runs or the error), for `invoke testbed.status`."""
    pid = procs.running(STATE_DIR / "run" / PIDFILE_NAME, MARKER)
    return [("alert sink (SMTP + webhook)", None if pid else "not running: `invoke testbed.up` "
             "starts it")]


def down() -> list[str]:
    return ["alert sink"] if procs.stop(STATE_DIR / "run" / PIDFILE_NAME, MARKER) else []


def mails(directory: Path = ALERTS_DIR) -> list[email.message.EmailMessage]:
    """Every stored mail, oldest first."""
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in sorted((directory / "mail").glob("*.eml"))]


def webhooks(directory: Path = ALERTS_DIR) -> list[dict]:
    """Every stored webhook body (Alertmanager's JSON), oldest first."""
    return [json.loads(p.read_text()) for p in sorted((directory / "webhook").glob("*.json"))]


def wait_mail(match, timeout: float, directory: Path = ALERTS_DIR, after: int = 0):
    """The first mail (of those after the first `after`) whose subject matches `match`
    (a callable taking the subject), within `timeout` seconds; None otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        for m in mails(directory)[after:]:
            if match(str(m["Subject"] or "")):
                return m
        if time.monotonic() > deadline:
            return None
        time.sleep(1)

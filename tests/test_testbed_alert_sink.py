"""The testbed's alert sink on loopback (pure: no testbed): a mail sent over SMTP and a webhook
POST are each stored whole under the sink's folder, read back by sinks.mails/webhooks, and
`stop` ends the process."""
from __future__ import annotations

import json
import smtplib
import socket
import urllib.request
from email.message import EmailMessage

import pytest

from provisioner.testbed import procs, sinks

pytestmark = pytest.mark.skipif(not sinks.available(), reason="python3-aiosmtpd (Debian, "
                                ".ci/setup) is not installed for /usr/bin/python3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sink(tmp_path):
    smtp, web = free_port(), free_port()
    pidfile = tmp_path / "sink.pid"
    sinks.start("127.0.0.1", smtp, web, tmp_path / "alerts", pidfile, tmp_path / "sink.log")
    yield smtp, web, tmp_path / "alerts"
    assert procs.stop(pidfile, sinks.MARKER)
    assert procs.running(pidfile, sinks.MARKER) is None


def test_a_mail_and_a_webhook_are_stored_and_read_back(sink):
    smtp, web, folder = sink
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alerts@app.test", "ops@app.test", "[FIRING:1] AppDown"
    msg.set_content("app sample on web2 has no instance online")
    with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as s:
        s.send_message(msg)
    body = {"status": "firing", "alerts": [{"labels": {"alertname": "AppDown"}}]}
    req = urllib.request.Request(f"http://127.0.0.1:{web}/alerts", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        assert r.status == 200
    got = sinks.wait_mail(lambda subject: "AppDown" in subject, 10, folder)
    assert got is not None and got["X-Sink-Rcpt-To"] == "ops@app.test"
    assert "no instance online" in got.get_content()
    assert sinks.webhooks(folder) == [body]
    assert sinks.wait_mail(lambda subject: "RESOLVED" in subject, 0, folder) is None

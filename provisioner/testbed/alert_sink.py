"""The testbed's alert sink: an SMTP server and a webhook receiver on the host side of the
bridge, where the monitoring server (role monitoring, local env) sends its alerts. Every mail
is stored as `<dir>/mail/<time>-<n>.eml`, every webhook POST as `<dir>/webhook/<time>-<n>.json`
(written to a temp name, then renamed: a reader never sees half a message).

This file runs as a script under the system python3 (`/usr/bin/python3`: Debian's
python3-aiosmtpd is installed for it, see .ci/setup), started by `invoke testbed.up` and stopped
by `invoke testbed.down` through provisioner/testbed/sinks.py:

    /usr/bin/python3 alert_sink.py --smtp ADDR:PORT --webhook ADDR:PORT --dir DIR

It accepts any sender and recipient and relays nothing. Standard library and aiosmtpd only.
"""
import argparse
import itertools
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1024 * 1024
_counter = itertools.count()
_lock = threading.Lock()


def store(folder, suffix, data):
    os.makedirs(folder, exist_ok=True)
    with _lock:
        n = next(_counter)
    name = f"{time.time():.6f}-{os.getpid()}-{n:06d}{suffix}"
    tmp = os.path.join(folder, "." + name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(folder, name))
    return name


class MailHandler:
    def __init__(self, folder):
        self.folder = folder

    async def handle_DATA(self, server, session, envelope):
        head = (f"X-Sink-Mail-From: {envelope.mail_from}\r\n"
                f"X-Sink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n").encode()
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode()
        store(self.folder, ".eml", head + content)
        return "250 Message accepted for delivery"


def webhook_handler(folder):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.send_error(413)
                return
            store(folder, ".json", self.rfile.read(length))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt, *args):     # quiet: one line per POST is noise
            pass
    return Handler


def split(hostport):
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smtp", required=True)
    p.add_argument("--webhook", required=True)
    p.add_argument("--dir", required=True)
    a = p.parse_args()
    from aiosmtpd.controller import Controller
    host, port = split(a.smtp)
    smtp = Controller(MailHandler(os.path.join(a.dir, "mail")), hostname=host, port=port)
    smtp.start()
    web = ThreadingHTTPServer(split(a.webhook), webhook_handler(os.path.join(a.dir, "webhook")))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=web.shutdown).start())
    print(f"alert sink: smtp {a.smtp}, webhook {a.webhook}, messages in {a.dir}", flush=True)
    try:
        web.serve_forever()
    finally:
        smtp.stop()


if __name__ == "__main__":
    main()

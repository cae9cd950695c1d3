"""`invoke logs --env E [--limit H] [--app NAME | --unit UNIT] [--since 1h] [--grep RE]
[--follow]`: every host's journald (and an app's pm2) logs, merged by time, host-prefixed,
secrets redacted. Ctrl-C ends --follow cleanly: every exec is closed, exit 130."""
from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from invoke import Exit, task

from provisioner.cli.common import FLAG_HELP, fail_input, load
from provisioner.connection import Connection, Unreachable
from provisioner.errors import EXIT_UNREACHABLE, InputError
from provisioner.logs import READER, format_line, merged, parse, reader_argv, reader_config

FOLLOW_TIMEOUT = 10 * 365 * 86400.0        # following has no end but Ctrl-C


class Stream:
    """Splits one exec's output into lines as it arrives and hands each parsed entry on."""

    def __init__(self, host: str, deliver):
        self.host, self.deliver, self.buf = host, deliver, b""

    def __call__(self, chunk: bytes) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            entry = parse(line.decode("utf-8", "replace"))
            if entry is not None:
                self.deliver(self.host, entry)


def read_host(conn: Connection, cfg: dict, deliver, follow: bool) -> str | None:
    """Run the reader on one host; entries go to deliver(host, entry). The error, or None."""
    try:
        r = conn.run(reader_argv(cfg), stdin=READER.encode(), on_stdout=Stream(conn.host.name, deliver),
                     timeout=FOLLOW_TIMEOUT if follow else 300)
    except Unreachable as e:
        return str(e)
    if r.rc != 0 and not follow:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        return f"{conn.host.name}: the log reader failed: {err[-1] if err else r.rc}"
    return None


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"], "yes": FLAG_HELP["yes"],
            "app": "only this pm2 app: its log files and its pm2 daemon's journal",
            "unit": "only this systemd unit's journal (e.g. nginx, ssh)",
            "since": "how far back: 30m, 1h, 2d (default 1h)",
            "grep": "only lines matching this Python regular expression",
            "follow": "keep printing new lines until Ctrl-C"})
def logs(c, env="local", limit=None, app=None, unit=None, since="1h", grep=None, follow=False,
         yes=False):
    """Journald and pm2 logs of every host, merged by time, host-prefixed, secrets redacted."""
    try:
        inv, hosts = load(env, interactive=not yes and sys.stdin.isatty(), limit=limit)
        cfgs = {h.name: reader_config(inv, h, since=since, app=app, unit=unit, grep=grep,
                                      follow=follow) for h in hosts}
    except InputError as e:
        raise fail_input(str(e)) from None
    hosts = [h for h in hosts if cfgs[h.name] is not None]
    if not hosts:
        raise fail_input(f"--app: no host of env {env} runs pm2 app {app!r}; the inventory's "
                         "pm2_apps name the apps")
    width = max(len(h.name) for h in hosts)
    conns = [Connection(h, inv.known_hosts, h.sudo_password) for h in hosts]
    collected: dict[str, list[dict]] = {h.name: [] for h in hosts}
    printing = threading.Lock()

    def deliver(host: str, entry: dict) -> None:
        if follow:                        # live: print as it comes, one line at a time
            with printing:
                print(format_line(host, entry, width), flush=True)
        else:
            collected[host].append(entry)

    pool = ThreadPoolExecutor(max_workers=min(len(conns), 50))
    futures = [pool.submit(read_host, conn, cfgs[conn.host.name], deliver, follow) for conn in conns]
    try:
        errors = [e for e in (f.result() for f in futures) if e]
    except KeyboardInterrupt:
        for conn in conns:                # closing the execs ends the readers on the servers
            conn.close()
        pool.shutdown(wait=False, cancel_futures=True)
        raise Exit(code=130) from None
    finally:
        for conn in conns:
            conn.close()
    pool.shutdown()
    for host, entry in merged(collected):
        print(format_line(host, entry, width))
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        raise Exit(code=EXIT_UNREACHABLE)

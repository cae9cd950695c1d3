"""What `invoke logs` runs on one server, in one exec: `python3 - CONFIG_JSON` with this file
on stdin, as root. Prints one JSON object a line: {"ts": unix time, "src": where, "msg": text}.
Standard library only; reads, never writes.

CONFIG: {"since": seconds back, "units": [unit, ...] | [], "app": {"name", "home", "unit"} | null,
         "grep": Python regex | null, "follow": bool}

- journald through `journalctl -o json` (all units, or `units`; for an app its pm2 daemon's unit).
- an app's pm2 log files (`<home>/.pm2/logs/<app>-out.log`, `-error.log`): pm2 writes no time on
  a line unless the app's log_date_format says so; a line that starts with an ISO time gets that
  time, any other line its file's modification time (when reading back) or the time it was read
  (when following).
- with follow, journalctl -f and the files are read as they grow until the exec is closed.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime

ISO_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?)[: ]\s*")
FILE_LINES = 2000            # at most this many lines back from each pm2 log file
KEEPALIVE = 5                # s: following, an empty object this often finds a closed exec
_out_lock = threading.Lock()
_children = []


def write(doc):
    """One line out; the controller gone (Ctrl-C closed the exec): stop everything."""
    try:
        with _out_lock:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()
    except (BrokenPipeError, OSError):
        for p in _children:
            p.kill()
        os._exit(0)


def emit(ts, src, msg, pattern):
    if pattern is None or pattern.search(msg):
        write({"ts": ts, "src": src, "msg": msg})


def journal(cfg, pattern):
    argv = ["journalctl", "-o", "json", "--no-pager", "-q",
            "--since=@%d" % int(time.time() - cfg["since"])]
    for unit in cfg["units"]:
        argv += ["-u", unit]
    if cfg["follow"]:
        argv.append("-f")
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:                                    # no journald here: the files still count
        return
    _children.append(p)
    for raw in p.stdout:
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        msg = e.get("MESSAGE")
        if isinstance(msg, list):                      # journald sends non-UTF-8 as bytes
            msg = bytes(msg).decode("utf-8", "replace")
        src = e.get("_SYSTEMD_UNIT") or e.get("SYSLOG_IDENTIFIER") or "journal"
        emit(int(e.get("__REALTIME_TIMESTAMP", 0)) / 1e6, src, msg or "", pattern)
    p.wait()


def line_time(line, fallback):
    m = ISO_RE.match(line)
    if m:
        try:
            return datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp(), line[m.end():]
        except ValueError:
            pass
    return fallback, line


def pm2_file(path, src, cfg, pattern):
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            f.seek(max(0, st.st_size - 4 * 1024 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()[-FILE_LINES:]
            pos = f.tell()
    except OSError:
        lines, pos, st = [], 0, None
    since = time.time() - cfg["since"]
    for line in lines:
        ts, msg = line_time(line, st.st_mtime if st else time.time())
        if ts >= since:
            emit(ts, src, msg, pattern)
    while cfg["follow"]:
        time.sleep(0.5)
        try:
            if os.stat(path).st_size < pos:
                pos = 0                                # truncated: rotated (copytruncate)
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
        except OSError:
            continue
        end = data.rfind(b"\n") + 1
        pos += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            ts, msg = line_time(line, time.time())
            emit(ts, src, msg, pattern)


def main(cfg):
    pattern = re.compile(cfg["grep"]) if cfg.get("grep") else None
    app = cfg.get("app")
    if app:
        cfg["units"] = [app["unit"]]
    workers = [threading.Thread(target=journal, args=(cfg, pattern), daemon=True)]
    if app:
        for stream in ("out", "error"):
            path = os.path.join(app["home"], ".pm2", "logs", "%s-%s.log" % (app["name"], stream))
            workers.append(threading.Thread(target=pm2_file, daemon=True, args=(
                path, "%s[%s]" % (app["name"], stream), cfg, pattern)))
    for w in workers:
        w.start()
    while cfg["follow"]:
        time.sleep(KEEPALIVE)
        write({})
    for w in workers:
        w.join()


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except (KeyboardInterrupt, BrokenPipeError):
        pass

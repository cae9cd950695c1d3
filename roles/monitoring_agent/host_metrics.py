#!/usr/bin/python3
"""Host figures no Debian exporter gives, written for the node exporter's textfile collector.

Installed by role monitoring_agent and run as root by provisioner-host-metrics.timer:
    python3 host_metrics.py /etc/provisioner/host-metrics.json

The JSON config says what this host has: {"out": "<dir>/provisioner_host.prom",
"state": "<dir>", "pm2": {"user", "home", "unit", "apps": [names]} | null,
"fail2ban": bool, "nginx_log": "/var/log/nginx/access.log" | null}.

- pm2: per process online/restarts/memory/cpu from pm2's process list (pm2_processes: from
  its daemon's RPC socket), asked only while its daemon's unit is active, and per
  expected app the number of online instances (0 when pm2 lost it: no series would not alert).
  pm2's own modules (pm2-logrotate) are left out (pm2_app_procs): they are no apps, and the
  app alerts would page for them.
- fail2ban: banned now, total bans and failures per jail (`fail2ban-client status <jail>`).
- nginx: the access log's new lines since the last run (offset kept in `state`; a rotated log
  is read from its start): responses by status class, and request time as a histogram, so
  Prometheus can compute the 5xx rate and p99 latency (nginx's stub_status has neither).
The output is written to a temporary file and renamed: the collector never reads half a file.
Standard library only (it runs under the server's python3). The role installs it with
pm2_processes, pm2_jlist and pm2_app_procs (provisioner/remote/pm2.py) ahead of its code.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATUS_RE = re.compile(r'"[^"]*" (\d{3}) ')
TIME_RE = re.compile(r"request_time=([0-9.]+)")
MAX_READ = 64 * 1024 * 1024        # a run reads at most this much of the log (a burst waits)
PM2_STATUS_OK = "online"


def label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def pm2_lines(cfg):
    user, home = cfg["user"], cfg["home"]
    active = subprocess.run(["systemctl", "is-active", "--quiet", cfg["unit"]]).returncode == 0
    out = [f"pm2_daemon_up {int(active)}"]
    procs = []
    if active:
        try:
            procs = pm2_processes(user, home)
        except (OSError, ValueError, subprocess.SubprocessError):
            procs = []
    online = {name: 0 for name in cfg["apps"]}
    for proc in pm2_app_procs(procs):
        env = proc.get("pm2_env") or {}
        name, inst = proc.get("name", "?"), env.get("NODE_APP_INSTANCE", proc.get("pm_id", 0))
        labels = f'app="{label(name)}",pm2_instance="{label(inst)}"'   # `instance` is the host's
        up = env.get("status") == PM2_STATUS_OK
        online[name] = online.get(name, 0) + int(up)
        monit = proc.get("monit") or {}
        out += [f"pm2_up{{{labels}}} {int(up)}",
                f"pm2_restarts_total{{{labels}}} {int(env.get('restart_time', 0))}",
                f"pm2_memory_bytes{{{labels}}} {int(monit.get('memory', 0))}",
                f"pm2_cpu_percent{{{labels}}} {float(monit.get('cpu', 0))}"]
    out += [f'pm2_app_online_instances{{app="{label(n)}"}} {c}' for n, c in online.items()]
    return out


def fail2ban_lines():
    p = subprocess.run(["fail2ban-client", "status"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return ["fail2ban_up 0"]
    m = re.search(r"Jail list:\s*(.*)", p.stdout)
    jails = [j.strip() for j in (m.group(1) if m else "").split(",") if j.strip()]
    out = ["fail2ban_up 1"]
    for jail in jails:
        s = subprocess.run(["fail2ban-client", "status", jail], capture_output=True, text=True,
                           timeout=30).stdout
        for key, metric in (("Currently banned", "fail2ban_banned"),
                            ("Total banned", "fail2ban_banned_total"),
                            ("Total failed", "fail2ban_failed_total")):
            m = re.search(key + r":\s*(\d+)", s)
            if m:
                out.append(f'{metric}{{jail="{label(jail)}"}} {m.group(1)}')
    return out


def nginx_lines(log, state_dir):
    state_file = os.path.join(state_dir, "nginx-log.json")
    try:
        with open(state_file) as f:
            st = json.load(f)
    except (OSError, ValueError):
        st = {}
    counts = st.get("counts") or {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    buckets = st.get("buckets") or [0] * len(BUCKETS)
    total, seconds = st.get("count", 0), st.get("sum", 0.0)
    try:
        info = os.stat(log)
        offset = st.get("offset", 0)
        if st.get("inode") != info.st_ino or info.st_size < offset:
            offset = 0                     # rotated or truncated: the new file from its start
        with open(log, "rb") as f:
            f.seek(offset)
            data = f.read(MAX_READ)
        end = data.rfind(b"\n") + 1        # a line still being written waits for the next run
        for line in data[:end].decode(errors="replace").splitlines():
            m = STATUS_RE.search(line)
            if not m:
                continue
            cls = m.group(1)[0] + "xx"
            counts[cls] = counts.get(cls, 0) + 1
            t = TIME_RE.search(line)
            if t:
                v = float(t.group(1))
                total, seconds = total + 1, seconds + v
                for i, le in enumerate(BUCKETS):
                    if v <= le:
                        buckets[i] += 1
        st = {"inode": info.st_ino, "offset": offset + end, "counts": counts,
              "buckets": buckets, "count": total, "sum": seconds}
        write_atomic(state_file, json.dumps(st))
    except OSError:
        pass                               # no log yet: the counters stay where they were
    out = [f'nginx_http_responses_total{{code="{c}"}} {n}' for c, n in sorted(counts.items())]
    out += [f'nginx_http_request_duration_seconds_bucket{{le="{le}"}} {n}'
            for le, n in zip(BUCKETS, buckets)]
    out += [f'nginx_http_request_duration_seconds_bucket{{le="+Inf"}} {total}',
            f"nginx_http_request_duration_seconds_sum {seconds}",
            f"nginx_http_request_duration_seconds_count {total}"]
    return out


def write_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(config_path):
    with open(config_path) as f:
        cfg = json.load(f)
    os.makedirs(cfg["state"], mode=0o700, exist_ok=True)
    lines = []
    for part, run in (("pm2", lambda: pm2_lines(cfg["pm2"]) if cfg.get("pm2") else []),
                      ("fail2ban", lambda: fail2ban_lines()
                       if cfg.get("fail2ban") and shutil.which("fail2ban-client") else []),
                      ("nginx", lambda: nginx_lines(cfg["nginx_log"], cfg["state"])
                       if cfg.get("nginx_log") else [])):
        try:
            got = run()
            ok = 1
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            print(f"host_metrics: {part}: {e}", file=sys.stderr)
            got, ok = [], 0
        lines += got
        lines.append(f'provisioner_host_metrics_ok{{part="{part}"}} {ok}')
    lines.append(f"provisioner_host_metrics_last_run_timestamp_seconds {time.time():.0f}")
    write_atomic(cfg["out"], "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""What `invoke status` reads on one server, in one exec: `python3 - CONFIG_JSON` with this
file on stdin, as root. Prints one JSON document. Standard library only; read-only (pm2 is asked
only while its daemon's unit is active: `pm2 jlist`, its fallback, would otherwise start one).

CONFIG: {"apps": [names], "pm2": {"user", "home"} | null, "textfile": dir,
         "alertmanager": "http://addr:9093" | null, "audit_log": path}
"""
import glob
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request

if __name__ != "__main__":
    # imported on the controller (tests); on a server, provisioner/status.py sent the source
    # of pm2_processes, pm2_jlist and pm2_app_procs ahead of this file's
    from provisioner.remote.pm2 import pm2_app_procs, pm2_processes

METRIC_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def run(argv, timeout=20):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout
    except (OSError, subprocess.SubprocessError):
        return None, ""


def memory():
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    total = info.get("MemTotal", 0)
    return {"total": total, "available": info.get("MemAvailable", 0),
            "used_percent": round(100 * (1 - info.get("MemAvailable", 0) / total), 1) if total else None}


def disks():
    out, seen = [], set()
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mount, fstype = line.split()[:3]
            if fstype in ("proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "devtmpfs",
                          "securityfs", "pstore", "bpf", "tracefs", "debugfs", "configfs",
                          "fusectl", "autofs", "binfmt_misc", "nsfs", "squashfs", "ramfs",
                          "hugetlbfs", "tmpfs") or mount.startswith(("/proc", "/sys", "/dev", "/run")):
                continue
            try:
                st = os.statvfs(mount)
            except OSError:
                continue
            if not st.f_blocks or (st.f_fsid, st.f_blocks) in seen:
                continue
            seen.add((st.f_fsid, st.f_blocks))
            used = 100 * (1 - st.f_bavail / st.f_blocks)
            out.append({"mount": mount, "used_percent": round(used, 1)})
    return out


def failed_units():
    rc, text = run(["systemctl", "list-units", "--state=failed", "--plain", "--no-legend"])
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def apps(cfg):
    out = []
    procs = []
    pm2 = cfg.get("pm2")
    if pm2:
        rc, _ = run(["systemctl", "is-active", "--quiet", pm2["unit"]])
        if rc == 0:
            try:
                procs = pm2_processes(pm2["user"], pm2["home"])
            except (OSError, ValueError, subprocess.SubprocessError):
                procs = []
    for name in cfg.get("apps") or []:
        env = [p.get("pm2_env") or {} for p in pm2_app_procs(procs, name)]
        try:
            release = os.path.basename(os.readlink(f"/srv/{name}/current"))
        except OSError:
            release = None
        out.append({"name": name, "instances": len(env),
                    "online": sum(e.get("status") == "online" for e in env),
                    "restarts": sum(int(e.get("restart_time", 0)) for e in env),
                    "release": release})
    return out


def certificates():
    out = []
    for path in sorted(glob.glob("/etc/nginx/tls/*/fullchain.pem")):
        try:
            cert = ssl._ssl._test_decode_cert(path)
            left = (ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()) / 86400
            out.append({"site": path.split("/")[-2], "days_left": round(left, 1)})
        except (OSError, ValueError, KeyError):
            out.append({"site": path.split("/")[-2], "days_left": None})
    return out


def textfile_metrics(folder):
    """Every sample of the textfile collector's *.prom files: [(name, labels, value)]."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.prom"))):
        try:
            with open(path) as f:
                for line in f:
                    m = METRIC_RE.match(line)
                    if m and not line.startswith("#"):
                        out.append((m.group(1), dict(LABEL_RE.findall(m.group(2) or "")),
                                    float(m.group(3))))
        except (OSError, ValueError):
            continue
    return out


def backups(samples):
    last = {s[1].get("backup"): s[2] for s in samples
            if s[0] == "provisioner_backup_last_success_timestamp_seconds"}
    limit = {s[1].get("backup"): s[2] for s in samples if s[0] == "provisioner_backup_max_age_seconds"}
    now = time.time()
    return [{"name": name, "age_seconds": round(now - ts), "max_age_seconds": limit.get(name)}
            for name, ts in sorted(last.items(), key=lambda kv: str(kv[0]))]


def last_run(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
        doc = json.loads(lines[-1])
        return {k: doc.get(k) for k in ("ts", "task", "result", "who", "changed", "failed")}
    except (OSError, ValueError, IndexError):
        return None


def alerts(url):
    if not url:
        return None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url + "/api/v2/alerts?active=true&silenced=false&inhibited=false",
                         timeout=10) as r:
            data = json.loads(r.read())
        return [{"name": a["labels"].get("alertname"), "instance": a["labels"].get("instance"),
                 "severity": a["labels"].get("severity"), "summary": a.get("annotations", {}).get("summary")}
                for a in data]
    except (OSError, ValueError, KeyError) as e:
        return {"error": str(e)}


def main(cfg):
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    samples = textfile_metrics(cfg["textfile"])
    print(json.dumps({
        "uptime_seconds": round(uptime), "load": os.getloadavg(), "cpus": os.cpu_count(),
        "memory": memory(), "disks": disks(), "failed_units": failed_units(), "apps": apps(cfg),
        "certificates": certificates(), "backups": backups(samples),
        "last_run": last_run(cfg["audit_log"]), "alerts": alerts(cfg.get("alertmanager")),
    }))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

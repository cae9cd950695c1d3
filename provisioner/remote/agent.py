"""The remote agent: gathers facts and applies changes ON THE SERVER.

Runs under the server's own python3 (Debian 11+: Python 3.9+). Standard library only, and no
imports from the provisioner package: the local side sends this file's source on stdin (or
the server runs the copy it cached, see cache_self) and the bootstrap command
(provisioner/agent.py) exec()s it with the request in the global REQ:

    {"v": 1, "op": "facts" | "apply" | ..., "sha": <sha256 of this source>,
     "code"?: <this source>, "store"?: true, "request": {...}}

The answer is ONE JSON document on stdout, after a marker line (shell start-up files may print
before us). Nothing a child process prints reaches our stdout: children get pipes, and stdin
from /dev/null unless a step gives one.

This module is also imported locally (the pure helpers, e.g. edit_lines, are shared with the
ops so that plan and apply agree); main() only runs when exec'd by the bootstrap.

Request and response formats are documented in provisioner/agent.py.
"""
from __future__ import annotations

import base64
import binascii
import errno
import grp
import json
import os
import pwd
import re
import shlex
import stat
import subprocess
import sys
import time

VERSION = 1
MARKER = "\n--provisioner-agent-v1--\n"
TEXT_LIMIT = 256 * 1024      # file content is returned for UTF-8 files up to this size
TAIL = 4000                  # characters of output kept per change / handler
CHECK_TIMEOUT = 60           # seconds for one `unless` guard
BASE_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
SYSCTL_DIRS = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d",
               "/lib/sysctl.d")

STATS = {"commands": 0}
CHILDREN = set()             # process groups of the commands running now (see _on_term)


# ----------------------------------------------------------------------------------------------
# small helpers

# Imported where used, not at the top: every exec starts this module, and hashlib (OpenSSL),
# shutil and traceback cost 2-3 ms of a server's CPU each, for work most execs never do.

def sha256(data=b""):
    """hashlib.sha256 without hashlib's OpenSSL start-up: CPython's built-in module when there
    is one (_sha2 from Python 3.12, _sha256 before), else hashlib's."""
    try:
        from _sha2 import sha256 as new
    except ImportError:
        try:
            from _sha256 import sha256 as new
        except ImportError:
            from hashlib import sha256 as new
    return new(data)


def rmtree(path, ignore_errors=False):
    import shutil
    shutil.rmtree(path, ignore_errors=ignore_errors)


def _env(extra=None):
    env = dict(os.environ)
    env.update(BASE_ENV)
    path = env.get("PATH") or "/usr/bin:/bin"
    for d in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if d not in path.split(":"):
            path = path + ":" + d
    env["PATH"] = path
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _run(argv, stdin=None, env=None, timeout=None):
    """Run argv (no shell). Returns (rc, output) with stderr merged; rc 127 if not found."""
    STATS["commands"] += 1
    try:
        # its own process group, so that a timeout kills what it started too (apt's methods)
        p = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=_env(env), start_new_session=True)
    except FileNotFoundError as e:
        return 127, "command not found: %s" % (e.filename or argv[0])
    except PermissionError as e:
        return 126, "permission denied: %s" % (e.filename or argv[0])
    CHILDREN.add(p.pid)
    try:
        out, _ = p.communicate(stdin.encode() if isinstance(stdin, str) else stdin, timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            pass
        out, _ = p.communicate()
        return 124, out.decode("utf-8", "replace") + "\ntimed out after %ss" % timeout
    finally:
        CHILDREN.discard(p.pid)
    return p.returncode, out.decode("utf-8", "replace")


def _on_term(signum, frame):
    """Stopped (finish after a command timeout, or the revert timer): take the commands we
    started with us; each runs in its own process group."""
    for pid in list(CHILDREN):
        try:
            os.killpg(pid, 9)
        except OSError:
            pass
    os._exit(128 + signum)


def _run_split(argv, timeout=None):
    """Run argv, keep stdout and stderr apart. Returns (rc, stdout, stderr)."""
    STATS["commands"] += 1
    try:
        p = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                           timeout=timeout)
    except FileNotFoundError:
        return 127, "", "command not found: %s" % argv[0]
    except subprocess.TimeoutExpired:
        return 124, "", "timed out"
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def _tail(text, n=TAIL):
    """The end of text, whole lines only: a secret cut in two would escape the controller's
    redaction, which masks whole values (and each line of a multi-line one)."""
    if len(text) <= n:
        return text
    end = text[-n:]
    first = end.find("\n")
    return "...\n" + end[first + 1:] if first >= 0 else "...(last line longer than %d characters)" % n


def _cmdline(argv):
    return " ".join(shlex.quote(str(a)) for a in argv)


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _uid(owner):
    if owner is None:
        return None
    if str(owner).isdigit():
        return int(owner)
    return pwd.getpwnam(owner).pw_uid          # KeyError -> reported as "no such user"


def _gid(group):
    if group is None:
        return None
    if str(group).isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def _mode(mode):
    if mode is None:
        return None
    if isinstance(mode, int):
        return mode
    return int(str(mode), 8)


class StepError(Exception):
    def __init__(self, message, rc=None, output=""):
        Exception.__init__(self, message)
        self.rc = rc
        self.output = output


# ----------------------------------------------------------------------------------------------
# pure helpers shared with the local ops (imported by provisioner/ops/lines.py)

def edit_lines(text, line, regexp=None, state="present", insert_after=None):
    """lineinfile semantics on a text (None = file absent). Returns the new text.

    present, regexp given: the LAST line matching regexp is replaced by `line`; if none matches
      and `line` is not already there, `line` is inserted after the last line matching
      insert_after (or appended at the end).
    present, no regexp: `line` is added as above unless an identical line exists.
    absent: every line matching regexp (or equal to `line` when no regexp) is removed.
    """
    lines = [] if text is None else text.splitlines()
    rx = re.compile(regexp) if regexp else None
    if state == "absent":
        if rx is not None:
            kept = [x for x in lines if not rx.search(x)]
        else:
            kept = [x for x in lines if x != line]
        if text is None or len(kept) == len(lines):
            return text
        return "\n".join(kept) + ("\n" if kept else "")
    if state != "present":
        raise ValueError("state must be present or absent")
    if rx is not None:
        hits = [i for i, x in enumerate(lines) if rx.search(x)]
        if hits:
            if lines[hits[-1]] == line:
                return text
            lines[hits[-1]] = line
            return "\n".join(lines) + "\n"
    if line in lines:
        return text
    pos = len(lines)
    if insert_after:
        arx = re.compile(insert_after)
        hits = [i for i, x in enumerate(lines) if arx.search(x)]
        if hits:
            pos = hits[-1] + 1
    lines.insert(pos, line)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# facts

def fact_os(_req):
    info = {}
    try:
        with open("/etc/os-release") as f:
            for raw in f:
                if "=" in raw:
                    k, v = raw.rstrip("\n").split("=", 1)
                    info[k] = v.strip().strip('"').strip("'")
    except OSError:
        pass
    rc, out, _ = _run_split(["systemd-detect-virt"])
    virt = out.strip() or "none"
    if rc == 127:
        virt = None
    try:
        with open("/proc/1/comm") as f:
            pid1 = f.read().strip()
    except OSError:
        pid1 = None
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386",
            "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
    return {
        "id": info.get("ID"), "version_id": info.get("VERSION_ID"),
        "codename": info.get("VERSION_CODENAME"), "pretty_name": info.get("PRETTY_NAME"),
        "virt": virt, "hostname": os.uname().nodename, "pid1": pid1,
        "systemd": pid1 == "systemd", "arch": arch, "machine": machine,
        "python": "%d.%d.%d" % sys.version_info[:3], "uid": os.geteuid(),
    }


def file_fact(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"exists": False}
    except NotADirectoryError:
        return {"exists": False}
    except OSError as e:
        return {"exists": None, "error": str(e)}
    fact = {
        "exists": True, "mode": "%04o" % stat.S_IMODE(st.st_mode),
        "owner": _user_name(st.st_uid), "group": _group_name(st.st_gid),
        "size": st.st_size,
    }
    if stat.S_ISLNK(st.st_mode):
        fact["type"] = "link"
        fact["target"] = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        fact["type"] = "dir"
    elif stat.S_ISREG(st.st_mode):
        fact["type"] = "file"
        h = sha256()
        head = b""
        try:
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    if len(head) <= TEXT_LIMIT:
                        head += chunk
        except OSError as e:
            fact["error"] = str(e)
            fact["sha256"] = None
            fact["content"] = None
            return fact
        fact["sha256"] = h.hexdigest()
        content = None
        if st.st_size <= TEXT_LIMIT and b"\0" not in head:
            try:
                content = head.decode("utf-8")
            except UnicodeDecodeError:
                content = None
        fact["content"] = content
    else:
        fact["type"] = "other"
    return fact


def fact_files(paths):
    return {p: file_fact(p) for p in paths}


APT_STAMP = "/var/lib/apt/periodic/provisioner-update-stamp"


def apt_lists_age():
    """Seconds since `apt-get update` last ran; None if the lists were never fetched.

    The mtimes of the list files are the REPOSITORY's Last-Modified times (apt keeps them, and
    does not touch unchanged lists), so they only bound the answer. apt writes into
    lists/partial on every update, and our update step touches APT_STAMP: the newest of all
    these is the last update."""
    newest = None
    have_lists = False
    try:
        for e in os.scandir("/var/lib/apt/lists"):
            if e.name in ("lock", "partial", "auxfiles") or not e.is_file():
                continue
            have_lists = True
            m = e.stat().st_mtime
            newest = m if newest is None or m > newest else newest
    except OSError:
        return None
    if not have_lists:
        return None
    for extra in ("/var/lib/apt/lists/partial", APT_STAMP):
        try:
            m = os.stat(extra).st_mtime
        except OSError:
            continue
        newest = m if newest is None or m > newest else newest
    return max(0, int(time.time() - newest))


def fact_packages(names):
    installed = {n: None for n in names}
    if names:
        plain = [n.split("=", 1)[0] for n in names]
        rc, out, _ = _run_split(["dpkg-query", "-W",
                                 "-f=${Package}\t${Architecture}\t${db:Status-Abbrev}\t${Version}\n",
                                 "--"] + plain)
        found = {}
        for row in out.splitlines():
            parts = row.split("\t")
            if len(parts) != 4:
                continue
            pkg, arch, abbrev, version = parts
            for key in (pkg, pkg + ":" + arch):
                # second letter of the abbreviation is the status: "i" = installed
                # ("ii ", "hi "); "rc " (config-files only) and others are not installed
                if abbrev[1:2] == "i":
                    found[key] = version
                else:
                    found.setdefault(key, None)
        for n, p in zip(names, plain):
            installed[n] = found.get(p)
    return {"installed": installed, "lists_age": apt_lists_age()}


def fact_package_candidates(names):
    cands = {n: None for n in names}
    if not names:
        return cands
    plain = [n.split("=", 1)[0] for n in names]
    rc, out, _ = _run_split(["apt-cache", "policy", "--"] + plain)
    current = None
    for row in out.splitlines():
        if row and not row[0].isspace() and row.rstrip().endswith(":"):
            current = row.rstrip()[:-1]
        elif current and row.strip().startswith("Candidate:"):
            v = row.split(":", 1)[1].strip()
            for n, p in zip(names, plain):
                if p == current or p == current.split(":")[0]:
                    cands[n] = None if v == "(none)" else v
    return cands


def _unit(name):
    return name if "." in name.rsplit("/", 1)[-1] else name + ".service"


def _systemctl_show(names, props):
    """`systemctl show` of each unit, one dict per name (in order; {} for one not shown), or
    RuntimeError with systemctl's complaint when it answered nothing."""
    rc, out, err = _run_split(["systemctl", "show", "--no-pager", "--property=" + ",".join(props),
                               "--"] + list(names))
    if rc != 0 and not out.strip():
        raise RuntimeError((err.strip() or out.strip() or "systemctl failed (rc %d)" % rc)
                           .splitlines()[-1])
    blocks, cur = [], {}
    for row in out.splitlines() + [""]:
        if not row.strip():
            if cur:
                blocks.append(cur)
            cur = {}
            continue
        k, _, v = row.partition("=")
        cur[k] = v
    if len(blocks) != len(names):        # positional unless systemd skipped some: then by Id
        by_id = {b.get("Id"): b for b in blocks}
        blocks = [by_id.get(n, {}) for n in names]
    return blocks


def fact_services(units):
    result = {u: None for u in units}
    if not units:
        return result
    names = [_unit(u) for u in units]
    try:
        blocks = _systemctl_show(names, ["Id", "LoadState", "ActiveState", "SubState",
                                         "UnitFileState"])
    except RuntimeError as e:
        return {u: {"error": str(e)} for u in units}
    for u, n, b in zip(units, names, blocks):
        if not b:
            continue
        result[u] = {
            "unit": b.get("Id") or n, "load": b.get("LoadState") or None,
            "active": b.get("ActiveState") or None, "sub": b.get("SubState") or None,
            "enabled": b.get("UnitFileState") or None,
        }
    return result


def fact_users(names):
    out = {}
    for n in names:
        try:
            pw = pwd.getpwnam(n)
        except KeyError:
            out[n] = None
            continue
        groups = sorted(g.gr_name for g in grp.getgrall() if n in g.gr_mem)
        ssh_dir = os.path.join(pw.pw_dir, ".ssh")
        out[n] = {
            "uid": pw.pw_uid, "gid": pw.pw_gid, "group": _group_name(pw.pw_gid),
            "home": pw.pw_dir, "shell": pw.pw_shell, "groups": groups,
            "ssh_dir": file_fact(ssh_dir),
            "authorized_keys": file_fact(os.path.join(ssh_dir, "authorized_keys")),
        }
    return out


def fact_groups(names):
    out = {}
    for n in names:
        try:
            g = grp.getgrnam(n)
        except KeyError:
            out[n] = None
            continue
        out[n] = {"gid": g.gr_gid, "members": list(g.gr_mem)}
    return out


def _sysctl_files():
    """The sysctl.d files systemd-sysctl reads, in the order it applies them."""
    by_name = {}
    for d in SYSCTL_DIRS:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if n.endswith(".conf") and n not in by_name:
                by_name[n] = os.path.join(d, n)
    return [by_name[n] for n in sorted(by_name)]


def _parse_sysctl_conf(text):
    values = {}
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s[0] in "#;" or "=" not in s:
            continue
        k, v = s.split("=", 1)
        k = k.strip().lstrip("-").replace("/", ".")
        values[k] = " ".join(v.split())
    return values


def fact_sysctl(keys):
    parsed = []
    for path in _sysctl_files():
        try:
            with open(path) as f:
                parsed.append((path, _parse_sysctl_conf(f.read())))
        except OSError:
            continue
    out = {}
    for key in keys:
        proc = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(proc) as f:
                value = " ".join(f.read().split())
        except OSError:
            value = None
        out[key] = {
            "value": value,
            "persisted": [[p, vals[key]] for p, vals in parsed if key in vals],
        }
    return out


def check_key(argv):
    return _cmdline(argv)


def fact_checks(argvs):
    """Exit code of each check. A check is an argv list, or {"argv": [...], "stdin": str} for
    one that needs input kept off its command line (e.g. a password to compare)."""
    out = {}
    for item in argvs:
        stdin = None
        if isinstance(item, dict):
            item, stdin = item["argv"], item.get("stdin")
        rc, _ = _run(item, stdin=stdin, timeout=CHECK_TIMEOUT)
        out[check_key(item)] = rc
    return out


def fact_dirs(paths):
    """Each directory's entries: {name: {type, target (links), mtime}}; None when absent."""
    out = {}
    for path in paths:
        try:
            entries = {}
            with os.scandir(path) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    kind = ("link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                            else "file" if e.is_file(follow_symlinks=False) else "other")
                    entries[e.name] = {"type": kind, "mtime": st.st_mtime,
                                       "target": os.readlink(e.path) if kind == "link" else None}
            out[path] = {"entries": entries}
        except (FileNotFoundError, NotADirectoryError):
            out[path] = None
        except OSError as e:
            out[path] = {"error": str(e)}
    return out


def fact_hashes(paths):
    """sha256 of each regular file, of any size (no content); None when it is not one."""
    out = {}
    for path in paths:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                out[path] = None
                continue
            h = sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[path] = h.hexdigest()
        except FileNotFoundError:
            out[path] = None
        except OSError as e:
            out[path] = {"error": str(e)}
    return out


def fact_last_lines(paths):
    """The last line of each text file (an audit log: the newest entry), read from its end so
    a long log costs the same; None when the file is absent or empty."""
    out = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = [ln for ln in f.read().split(b"\n") if ln.strip()]
            out[path] = lines[-1].decode("utf-8", "replace") if lines else None
        except FileNotFoundError:
            out[path] = None
        except OSError as e:
            out[path] = {"error": str(e)}
    return out


def fact_certs(paths):
    """The first certificate of each PEM file: subject, SANs, serial, notAfter (as printed by
    Python's ssl module, e.g. "Mar  1 12:00:00 2027 GMT"); None when the file is absent."""
    import ssl
    out = {}
    for path in paths:
        if not os.path.exists(path):
            out[path] = None
            continue
        try:
            d = ssl._ssl._test_decode_cert(path)         # stdlib, no openssl binary needed
        except (OSError, ssl.SSLError, ValueError) as e:
            out[path] = {"error": "not a PEM certificate: %s" % e}
            continue
        subject = {k: v for rdn in d.get("subject", ()) for k, v in rdn}
        out[path] = {"subject": subject, "serial": d.get("serialNumber"),
                     "not_after": d.get("notAfter"), "not_before": d.get("notBefore"),
                     "sans": [v for _, v in d.get("subjectAltName", ())]}
    return out


def fact_timers(timers):
    """Each timer's last and next trigger and the result of the service it starts; None for a
    timer systemd does not know."""
    if not timers:
        return {}
    names = [t if t.endswith(".timer") else t + ".timer" for t in timers]
    shown = _systemctl_show(names, ["Id", "LoadState", "ActiveState", "Unit", "LastTriggerUSec",
                                    "NextElapseUSecRealtime", "Result"])
    units = sorted({b.get("Unit") for b in shown if b.get("LoadState") == "loaded" and b.get("Unit")})
    services = dict(zip(units, _systemctl_show(units, ["Id", "Result", "ExecMainStatus"])
                        if units else []))
    out = {}
    for t, b in zip(timers, shown):
        if b.get("LoadState") != "loaded":
            out[t] = None
            continue
        svc = services.get(b.get("Unit")) or {}
        status = svc.get("ExecMainStatus")
        out[t] = {"active": b.get("ActiveState"), "unit": b.get("Unit"),
                  "last": b.get("LastTriggerUSec") or None,
                  "next": b.get("NextElapseUSecRealtime") or None,
                  "result": svc.get("Result") or None,
                  "exit_status": int(status) if status and status.isdigit() else None}
    return out


LOOPBACK = ("127.0.0.1", "::1", "localhost")
HTTP_BODY = 1024


def fact_http(urls):
    """GET each URL on the server's own loopback: status, headers (names lowercased), the first
    KB of the body; {"error"} when nothing answered. Redirects are not followed."""
    import http.client
    from urllib.parse import urlsplit
    out = {}
    for url in urls:
        u = urlsplit(url)
        if u.scheme != "http" or u.hostname not in LOOPBACK:
            out[url] = {"error": "only http:// on the loopback (127.0.0.1, ::1, localhost)"}
            continue
        try:
            c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
            c.request("GET", (u.path or "/") + ("?" + u.query if u.query else ""))
            r = c.getresponse()
            body = r.read(HTTP_BODY)
            out[url] = {"status": r.status,
                        "headers": {k.lower(): v for k, v in r.getheaders()},
                        "body": body.decode("utf-8", "replace")}
            c.close()
        except (OSError, http.client.HTTPException) as e:
            out[url] = {"error": "%s: %s" % (type(e).__name__, e)}
    return out


# every fact kind: `fact_<kind>`, named once in provisioner/facts.py KINDS with its accessor
FACTS = {name[len("fact_"):]: fn for name, fn in list(globals().items())
         if name.startswith("fact_") and name != "fact_os" and callable(fn)}


# The run lock: a directory (atomic mkdir) holding owner.json. Every look at it and change
# of it (take, take over, release) happens under MUTEX, a flock on a file beside it, so two
# agents never both decide to take over the same stale lock. An exec that works under a run
# (apply) holds a shared flock on EXEC_LOCK inside the directory for its whole life and
# records its PID in EXEC_PID: while it lives, the lock is neither stale nor released.
MUTEX_SUFFIX = ".mutex"
EXEC_LOCK = "exec.lock"
EXEC_PID = "exec.pid"
STOP_WAIT = 10               # seconds a stopped exec gets to end before SIGKILL


class _Mutex(object):
    def __init__(self, d):
        import fcntl
        os.makedirs(os.path.dirname(d), mode=0o755, exist_ok=True)
        self.fd = os.open(d + MUTEX_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _holder(d, ttl):
    try:
        with open(os.path.join(d, "owner.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"started_epoch": os.stat(d).st_mtime, "ttl": ttl, "who": "unknown (no owner.json)"}


def _age(holder):
    """Seconds since the run last showed it was alive (it refreshes on every exec)."""
    return time.time() - max(holder.get("started_epoch", 0), holder.get("refreshed_epoch", 0))


def flock_held(path):
    """True while a process holds a flock on `path` (an exec of a lock's run: it is alive);
    False when nobody does or the file is missing. One test lock, given up at once.
    Self-contained (its own imports): provisioner/releases.py sends this function's source
    ahead of the deploy helper (remote/deploy.py), whose busy flock it tests too."""
    import fcntl
    import os
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _exec_busy(d):
    """True while an exec of the lock's run holds EXEC_LOCK (it is alive)."""
    return flock_held(os.path.join(d, EXEC_LOCK))


def _write_json(path, doc):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)


def run_lock(req):
    """Take the run lock (an atomic mkdir holding owner.json), or say who holds it. A lock not
    refreshed within its TTL is stale, and so is one whose run id is take_from (its process
    is gone): it is taken over and the old owner reported, unless an exec of that run is
    still alive on this server. The runner asks for this only outside check mode."""
    d = req["dir"]
    owner = dict(req["owner"])
    with _Mutex(d):
        def take():
            os.mkdir(d, 0o700)
            _write_json(os.path.join(d, "owner.json"), owner)
            return {"acquired": True}

        try:
            return take()
        except FileExistsError:
            pass
        holder = _holder(d, owner["ttl"])
        age = _age(holder)
        # take_from: the controller found this holder's process dead on its own machine
        dead = req.get("take_from") is not None and holder.get("run_id") == req["take_from"]
        if age <= holder.get("ttl", 0) and not dead:
            return {"acquired": False, "holder": holder, "age": age}
        if _exec_busy(d):
            return {"acquired": False, "holder": holder, "age": age, "busy": True}
        # aside by one rename, then gone: no one ever sees a half-removed lock
        aside = "%s.stale-%d-%s" % (d, os.getpid(), os.urandom(4).hex())
        os.rename(d, aside)
        rmtree(aside, ignore_errors=True)
        out = take()
        out["stale"] = holder
        out["dead"] = dead
        return out


EXEC_HOLD = []               # the open EXEC_LOCK of this exec: closed when the process ends


def hold_run(req):
    """At the start of an exec under a run: check the lock is still this run's, hold
    EXEC_LOCK for the rest of the process, record our PID and refresh the lock's TTL.
    Returns an error message when the lock is not ours any more (nothing is applied then)."""
    import fcntl
    d = req["dir"]
    with _Mutex(d):
        try:
            with open(os.path.join(d, "owner.json")) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            return "the run lock %s is gone (released or taken over); nothing applied" % d
        if holder.get("run_id") != req["run_id"]:
            return ("the run lock %s is held by another run now (%s@%s, run %s); nothing applied"
                    % (d, holder.get("who"), holder.get("from"), holder.get("run_id")))
        fd = os.open(os.path.join(d, EXEC_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        EXEC_HOLD.append(fd)
        _write_json(os.path.join(d, EXEC_PID), {"pid": os.getpid(), "start": _start_ticks(os.getpid())})
        holder["refreshed_epoch"] = time.time()
        _write_json(os.path.join(d, "owner.json"), holder)
    return None


def _start_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _stop_exec(d):
    """Stop a still-running exec of this run (e.g. after the controller's command timeout):
    SIGTERM (it kills its command's process group), then SIGKILL. True when it ended."""
    import signal
    try:
        with open(os.path.join(d, EXEC_PID)) as f:
            rec = json.load(f)
        pid = int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return not _exec_busy(d)
    for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, 5)):
        if _start_ticks(pid) != rec.get("start"):
            break                                # gone (or the PID is someone else's now)
        try:
            os.kill(pid, sig)
        except OSError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _exec_busy(d):
            time.sleep(0.1)
        if not _exec_busy(d):
            return True
    return not _exec_busy(d)


def finish(req):
    """Append the audit line (when the run changed something) and release our run lock; an
    exec of ours still running (a command that timed out) is stopped first, and while it
    cannot be stopped the lock stays."""
    if req.get("audit"):
        log = req["audit_log"]
        os.makedirs(os.path.dirname(log), mode=0o750, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (json.dumps(req["audit"], sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    d = req["dir"]
    with _Mutex(d):
        try:
            with open(os.path.join(d, "owner.json")) as f:
                mine = json.load(f).get("run_id") == req["run_id"]
        except (OSError, ValueError):
            mine = False
        if not mine:
            return {"released": False}
        if _exec_busy(d) and not _stop_exec(d):
            return {"released": False, "busy": True}
        aside = "%s.done-%d-%s" % (d, os.getpid(), os.urandom(4).hex())
        os.rename(d, aside)
        rmtree(aside, ignore_errors=True)
    return {"released": True}


def gather(request):
    result = {"os": fact_os(None)}
    errors = {}
    for kind, keys in request.items():
        if kind == "os":
            continue
        if kind == "run_lock":
            result["run_lock"] = run_lock(keys)
            continue
        fn = FACTS.get(kind)
        if fn is None:
            errors[kind] = "unknown fact kind"
            continue
        try:
            result[kind] = fn(list(keys or ()))
        except Exception as e:  # a broken fact must not hide the others
            errors[kind] = "%s: %s" % (type(e).__name__, e)
            result[kind] = None
    if errors:
        result["errors"] = errors
    return result


# ----------------------------------------------------------------------------------------------
# apply: steps

def _attrs(st_exists, mode, owner, group, default_mode):
    """Resolve the (mode, uid, gid) to set: None keeps the existing value or uses a default."""
    uid = _uid(owner)
    gid = _gid(group)
    if st_exists is not None:
        m = _mode(mode) if mode is not None else stat.S_IMODE(st_exists.st_mode)
        uid = st_exists.st_uid if uid is None else uid
        gid = st_exists.st_gid if gid is None else gid
    else:
        m = _mode(mode) if mode is not None else default_mode
        if uid is None:
            uid = os.geteuid()
        if gid is None:
            gid = pwd.getpwuid(uid).pw_gid if owner is not None else os.getegid()
    return m, uid, gid


def _validate_argv(validate, tmp):
    argv = shlex.split(validate) if isinstance(validate, str) else list(validate)
    if not any("{path}" in a for a in argv):       # the ops refuse it too: never guess where
        raise StepError("validate command %s does not name the file ({path})" % _cmdline(argv))
    return [a.replace("{path}", tmp) for a in argv]


def _run_after(after, log):
    for argv in after or ():
        rc, out = _run(argv)
        log.append("$ %s\n%s" % (_cmdline(argv), out))
        if rc != 0:
            raise StepError("after-command failed (exit %d): %s" % (rc, _cmdline(argv)), rc)


def write_file(path, data, mode=None, owner=None, group=None, validate=None, log=None):
    """Atomic write: temp file beside the target, owner+mode set, validated, renamed."""
    log = [] if log is None else log
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):
        raise StepError("directory %s does not exist" % d)
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise StepError("%s is a directory" % path)
    if old is not None and stat.S_ISLNK(old.st_mode):
        old = None          # a link is replaced by the file; do not copy the link's attributes
    try:
        m, uid, gid = _attrs(old, mode, owner, group, 0o644)
    except KeyError as e:
        raise StepError("no such user or group: %s" % e)
    # the temp file keeps the extension: some validators go by it (systemd-analyze verify)
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(d, ".%s.provisioner-%d-%s%s" % (stem, os.getpid(), os.urandom(4).hex(),
                                                      ext))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fchown(fd, uid, gid)      # chown first: it may clear setuid/setgid bits
            os.fchmod(fd, m)
            os.fsync(fd)
        finally:
            os.close(fd)
        if validate:
            argv = _validate_argv(validate, tmp)
            rc, out = _run(argv)
            log.append("$ %s\n%s" % (_cmdline(argv), out))
            if rc != 0:
                raise StepError("validation failed (exit %d): %s\n%s"
                                % (rc, _cmdline(argv), _tail(out, 2000)), rc)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def step_write(step, log):
    data = base64.b64decode(step.get("b64") or "")
    write_file(step["write"], data, step.get("mode"), step.get("owner"), step.get("group"),
               step.get("validate"), log)
    log.append("wrote %s (%d bytes)" % (step["write"], len(data)))
    _run_after(step.get("after"), log)
    return 0


def step_line(step, log):
    path = step["line"]
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        text = None
    except UnicodeDecodeError:
        raise StepError("%s is not UTF-8 text" % path)
    new = edit_lines(text, step["text"], step.get("regexp"), step.get("state", "present"),
                     step.get("insert_after"))
    if new == text:
        log.append("%s: line already as wanted" % path)
        return 0
    if text is None and not step.get("create", True):
        raise StepError("%s does not exist" % path)
    write_file(path, new.encode("utf-8"), step.get("mode"), step.get("owner"),
               step.get("group"), step.get("validate"), log)
    log.append("edited %s" % path)
    _run_after(step.get("after"), log)
    return 0


def step_dir(step, log):
    path = step["dir"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise StepError("%s exists and is not a directory" % path)
    try:
        m, uid, gid = _attrs(st, step.get("mode"), step.get("owner"), step.get("group"),
                             0o755)
    except KeyError as e:
        raise StepError("no such user or group: %s" % e)
    if st is None:
        os.makedirs(path, 0o755, exist_ok=True)
        log.append("created %s" % path)
    _set_attrs(path, uid, gid, m, os.O_DIRECTORY)
    return 0


def _set_attrs(path, uid, gid, mode, kind=0):
    """chown + chmod through an fd opened without following a symlink: a path swapped for a link
    after it was checked must not pass our owner and mode on to the link's target."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | kind)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StepError("%s changed meanwhile (a symlink now?); refusing to change attributes "
                            "through it" % path)
        raise
    try:
        os.fchown(fd, uid, gid)         # chown first: it may clear setuid/setgid bits
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def step_attrs(step, log):
    path = step["attrs"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StepError("%s does not exist" % path)
    if stat.S_ISLNK(st.st_mode):
        raise StepError("%s is a symlink; refusing to change attributes through it" % path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise StepError("%s is not a regular file or a directory" % path)
    try:
        m, uid, gid = _attrs(st, step.get("mode"), step.get("owner"), step.get("group"),
                             0o644)
    except KeyError as e:
        raise StepError("no such user or group: %s" % e)
    _set_attrs(path, uid, gid, m)
    log.append("%s: mode %04o owner %s:%s" % (path, m, _user_name(uid), _group_name(gid)))
    return 0


def step_fetch(step, log):
    """Download a URL (stdlib urllib, honours *_proxy env) into a file, atomically."""
    import urllib.request
    url = step["fetch"]
    try:
        with urllib.request.urlopen(url, timeout=step.get("timeout", 60)) as r:
            data = r.read()
    except Exception as e:
        raise StepError("download of %s failed: %s" % (url, e))
    want = step.get("sha256")
    if want and sha256(data).hexdigest() != want:
        raise StepError("download of %s: sha256 %s != expected %s"
                        % (url, sha256(data).hexdigest(), want))
    write_file(step["path"], data, step.get("mode"), step.get("owner"), step.get("group"),
               step.get("validate"), log)
    log.append("fetched %s -> %s (%d bytes)" % (url, step["path"], len(data)))
    return 0


def step_run(step, log):
    argv = step["run"]
    ok = step.get("ok") or [0]
    for attempt in range(step.get("attempts") or 1, 0, -1):
        rc, out = _run(argv, step.get("stdin"), step.get("env"), step.get("timeout"))
        log.append("$ %s\n%s" % (_cmdline(argv), out))
        if rc in ok:
            break
        if attempt > 1:
            log.append("exit %d: trying again (%d more)" % (rc, attempt - 1))
            time.sleep(step.get("delay", 2))
    if rc not in ok:
        raise StepError("exit %d: %s" % (rc, _cmdline(argv)), rc)
    return rc


def _snapshot(path):
    """What `path` is now, to put it back: None (absent), ("link", target) or ("file", bytes,
    mode, uid, gid). Directories are never part of a group (the op refuses them)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if not stat.S_ISREG(st.st_mode):
        raise StepError("%s is not a file or a link; a file group cannot put it back" % path)
    with open(path, "rb") as f:
        return ("file", f.read(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def _restore(path, saved, log):
    if saved is None:
        try:
            os.unlink(path)
            log.append("removed %s (it was new)" % path)
        except FileNotFoundError:
            pass
    elif saved[0] == "link":
        tmp = "%s.provisioner-restore-%s" % (path, os.urandom(4).hex())
        os.symlink(saved[1], tmp)
        os.rename(tmp, path)
        log.append("restored %s -> %s" % (path, saved[1]))
    else:
        _, data, mode, uid, gid = saved
        write_file(path, data, "%04o" % mode, str(uid), str(gid), None, log)
        log.append("restored %s" % path)


def step_file_group(step, log):
    """Several files written, then ONE command checks the whole configuration in place (`nginx
    -t`); if a write or the check fails, every file of the group goes back to what it was
    (removed if it was new) and the step fails with the command's output."""
    paths = step["file_group"]
    saved = [(p, _snapshot(p)) for p in paths]
    inner = run_steps(step.get("steps") or [])
    if inner["output"]:
        log.append(inner["output"])
    if inner["status"] == "ok":
        argv = step["check"]
        rc, out = _run(argv, timeout=step.get("timeout"))
        log.append("$ %s\n%s" % (_cmdline(argv), out))
        if rc == 0:
            return 0
        error = "check failed (exit %d): %s\n%s" % (rc, _cmdline(argv), _tail(out, 2000))
    else:
        rc, error = inner["rc"], inner["error"]
    for p, before in saved:
        _restore(p, before, log)
    raise StepError("%s\nevery file of the group was put back as it was" % error, rc)


STEPS = (("run", step_run), ("write", step_write), ("line", step_line), ("dir", step_dir),
         ("attrs", step_attrs), ("fetch", step_fetch), ("file_group", step_file_group))


RELOAD = ["systemctl", "daemon-reload"]
# what `systemctl is-enabled` prints for a unit that enabling would not change (ops/systemd.py)
ENABLED = ("enabled", "static", "indirect", "generated", "transient", "alias")


class Reloads:
    """systemd's daemon-reloads of one apply, as few as keep it right. Each costs systemd
    0.1-0.3 CPU-s, and a role writing and enabling several timers made one per unit file run
    and one per `systemctl enable`. Here:
    - a unit file's reload waits for the next command that may act on a unit: several files,
      and the writes and enables between them, cost one;
    - `systemctl enable|disable -- U` runs with --no-reload, and is not run at all when U is
      enabled already (its package enabled it on install, after the facts were read); the
      enablement's reload is folded into the next one;
    - whatever is left is done before the handlers run, so systemd knows every file and link
      when the apply ends (`systemctl show` caches a unit's enablement until a reload)."""

    def __init__(self):
        self.units = False      # a unit file changed: reload before acting on any unit
        self.links = False      # an enablement changed: reload before the apply ends

    def run(self, step, log):
        """Run a `run` step, reloading first when it needs it."""
        argv = step["run"]
        verb = argv[1] if len(argv) == 4 and argv[0] == "systemctl" and argv[2] == "--" else None
        if verb not in ("enable", "disable"):
            if self.units:
                self.flush(log)
            return step_run(step, log)
        if verb == "enable":
            _, out = _run(["systemctl", "is-enabled", "--", argv[3]])
            if out.strip() in ENABLED:
                log.append("%s is %s already" % (argv[3], out.strip()))
                return 0
        rc = step_run(dict(step, run=[argv[0], verb, "--no-reload", "--", argv[3]]), log)
        self.links = True
        return rc

    def flush(self, log):
        self.units = self.links = False
        _run_after([RELOAD], log)


def run_steps(steps, reloads=None):
    """Run steps in order; stop at the first failure. Returns a result dict (no id).
    `reloads`: the apply's Reloads, which runs the `run` steps and defers the daemon-reloads."""
    log = []
    rc = 0
    for i, step in enumerate(steps):
        kind = next((k for k, _ in STEPS if k in step), None)
        try:
            if kind is None:
                raise StepError("unknown step type: %s" % sorted(step))
            if kind == "run" and reloads is not None:
                rc = reloads.run(step, log)
            else:
                rc = dict(STEPS)[kind](step, log)
        except StepError as e:
            return {"status": "failed", "rc": e.rc, "error": "step %d (%s): %s" % (i + 1, kind, e),
                    "output": _tail("\n".join(log)), "step": i}
        except Exception as e:
            return {"status": "failed", "rc": None,
                    "error": "step %d (%s): %s: %s" % (i + 1, kind, type(e).__name__, e),
                    "output": _tail("\n".join(log)), "step": i}
    return {"status": "ok", "rc": rc, "error": None, "output": _tail("\n".join(log))}


def _after_of(change):
    """The after-commands of a change that is one file write, else None. Consecutive such
    changes with the same ones run them once, after the last (a unit file's daemon-reload is
    Reloads' to make)."""
    steps = change.get("steps") or []
    if len(steps) == 1 and "write" in steps[0] and steps[0].get("after"):
        return steps[0]["after"]
    return None


def _bare(steps):
    """(action, unit) of a handler whose one action is a bare `systemctl reload|restart -- U`
    (a stay-up check may follow), else None."""
    acts = [s.get("run") for s in steps if not s.get("settle")]
    if (len(acts) == 1 and acts[0] and len(acts[0]) == 4 and acts[0][0] == "systemctl"
            and acts[0][1] in ("reload", "restart") and acts[0][2] == "--"):
        return acts[0][1], acts[0][3]
    return None


def _restarted_by(steps, later):
    """The later notified handler that restarts the unit this handler only reloads, if any:
    the restart reads the new configuration anyway. Only a bare reload (and its stay-up check)
    gives way, and only to a bare restart: a handler that validates first keeps its order."""
    act = _bare(steps)
    if act is None or act[0] != "reload":
        return None
    for name, other in later:
        if _bare(other) == ("restart", act[1]):
            return name
    return None


def _started_after(steps, since):
    """(why, how long its unit has been up) when a bare reload or restart handler has nothing
    to do, else None: its unit is active and its current run began after the last change that
    notified it finished (`since`, from time.monotonic(): systemd's monotonic timestamps use the
    same clock), so the unit read those files when it started. On a fresh server, a unit this
    run started after writing its config."""
    act = _bare(steps)
    if act is None or since is None:
        return None
    rc, out = _run(["systemctl", "show", "--property=ActiveState,InactiveExitTimestampMonotonic",
                    "--", act[1]], timeout=30)
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        began = int(props.get("InactiveExitTimestampMonotonic", "")) / 1e6
    except ValueError:
        return None
    if rc != 0 or props.get("ActiveState") != "active" or began <= since:
        return None
    return ("not run: %s started %.1f s after the last change that notified this handler, "
            "with it in place" % (act[1], began - since), time.monotonic() - began)


def _settle(checks):
    """The handlers' stay-up checks (a restarted unit must stay active for a few seconds: see
    provisioner/ops/systemd.py), run together once every handler acted: their waits overlap
    instead of adding up, and each unit is still watched that long after its own action."""
    if not checks:
        return
    import threading
    done = {}

    def watch(i, step):
        done[i] = _run(step["run"], step.get("stdin"), step.get("env"), step.get("timeout"))

    threads = [threading.Thread(target=watch, args=(i, c[1])) for i, c in enumerate(checks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (res, step, number) in enumerate(checks):
        rc, out = done[i]
        res["output"] = _tail(res["output"] + "\n$ %s\n%s" % (_cmdline(step["run"]), out))
        if rc not in (step.get("ok") or [0]):
            res.update(status="failed", rc=rc, error="step %d (run): exit %d: %s"
                       % (number, rc, _cmdline(step["run"])))


def apply(request):
    """Run changes in order, stop at the first failure, then the notified handlers.

    Handlers: every handler notified by a change that SUCCEEDED runs once, in the order the
    handlers are defined, even when a later change failed (request "handlers_on_failure",
    default true). Reason: the changed file is already in place, so the next run will find it
    converged and never notify again; skipping the handler would leave the service running on
    the old configuration indefinitely. Files are validated before they replace the old ones,
    so a handler never loads an unvalidated file. With "handlers_on_failure": false the
    notified handlers are reported as not_run instead. A failing handler does not stop the
    other handlers.

    A unit file's daemon-reload waits for the next command that may act on a unit, and an
    enable's is folded into it (Reloads); every reload left is made before the handlers run.
    Consecutive changes that each write one file with the same other after-commands run those
    once, after the last of them (_after_of); if a later one fails, they run then. A handler
    that only reloads a unit gives way to a later one that restarts it (_restarted_by); a
    bare reload or restart is not run when its unit began its current run after the changes
    that notified it (_started_after); the handlers' stay-up checks run together after the
    last handler (_settle).
    """
    changes = request.get("changes") or []
    handlers = request.get("handlers") or {}
    results = []
    failed = False
    armed = None
    pending = None          # after-commands a write left to the next write's, the same ones
    # handler -> when the last change that notified it finished; "notified": those of its
    # role's writes that an earlier exec made (the package batch carries them ahead)
    done_at = dict(request.get("notified") or {})
    notified = set(done_at)
    reloads = Reloads()
    for i, ch in enumerate(changes):
        if failed:
            results.append({"id": ch.get("id"), "status": "not_run", "rc": None,
                            "error": None, "output": ""})
            continue
        if ch.get("arm") and armed is None and request.get("switch"):
            armed = arm_switch(request["switch"])       # just before the first risky change
        steps = ch.get("steps") or []
        after = _after_of(ch)
        later = after is not None and i + 1 < len(changes) and after == _after_of(changes[i + 1])
        if later or after == [RELOAD]:
            steps = [dict(steps[0], after=None)]
        r = run_steps(steps, reloads)
        r["id"] = ch.get("id")
        results.append(r)
        if r["status"] == "ok":
            r["done_at"] = time.monotonic()     # for handlers that a later exec runs
            notified.update(ch.get("notify") or ())
            done_at.update(dict.fromkeys(ch.get("notify") or (), r["done_at"]))
            pending = after if later and after != [RELOAD] else None
            reloads.units = reloads.units or after == [RELOAD]
        else:
            failed = True
            if pending:                 # the writes before it still get theirs
                log = []
                try:
                    _run_after(pending, log)
                except StepError as e:
                    log.append(str(e))
                r["output"] = _tail(r["output"] + "\n" + "\n".join(log))
    hres = []
    if reloads.units or reloads.links:      # systemd knows every file and link from here on
        log = []
        try:
            reloads.flush(log)
        except StepError as e:
            log.append(str(e))
            hres.append({"name": "systemctl daemon-reload", "status": "failed", "rc": e.rc,
                         "error": str(e), "output": _tail("\n".join(log))})
    unknown = sorted(n for n in notified if n not in handlers)
    for name in unknown:
        hres.append({"name": name, "status": "failed", "error": "no such handler", "output": ""})
    run_handlers = request.get("handlers_on_failure", True) or not failed
    todo = [(name, steps or []) for name, steps in handlers.items() if name in notified]
    settle = []             # (its handler's result, its stay-up check), watched together
    for k, (name, steps) in enumerate(todo):
        if not run_handlers:
            hres.append({"name": name, "status": "not_run", "output": "",
                         "error": "skipped because a change failed (handlers_on_failure=false)"})
            continue
        by = _restarted_by(steps, todo[k + 1:])
        if by:
            hres.append({"name": name, "status": "superseded", "error": None, "rc": None,
                         "output": "not run: handler %r restarts the unit after it" % by})
            done_at[by] = max(done_at[by], done_at[name])   # the restart covers its changes too
            continue
        watch = steps[-1] if steps and steps[-1].get("settle") else None
        started = _started_after(steps, done_at.get(name))
        if started:     # still watched: the unit stays up after its start as after a restart,
            why, up = started       # unless it has been up that long already
            if watch and up >= watch["settle"]:    # its seconds (ops/systemd.py stays_up)
                why += "; up %.0f s since, so it stayed up" % up
                watch = None
            hres.append({"name": name, "status": "superseded", "error": None, "rc": None,
                         "output": why})
        else:
            r = run_steps(steps[:-1] if watch else steps)
            hres.append({"name": name, "status": r["status"], "error": r["error"],
                         "output": r["output"], "rc": r["rc"]})
        if watch and hres[-1]["status"] in ("ok", "superseded"):
            settle.append((hres[-1], watch, len(steps)))
    _settle(settle)
    ok = not failed and all(h["status"] in ("ok", "superseded") for h in hres)
    out = {"ok": ok, "results": results, "handlers": hres}
    if armed is not None:
        out["switch"] = armed
    return out


# ----------------------------------------------------------------------------------------------
# the dead man's switch: before the first change that can cut the controller off (sshd, sudoers,
# firewall), the files it may touch are copied aside and a transient systemd timer is armed
# that puts them back and reloads, on its own, unless the controller's guard disarms it after a
# fresh login worked. So a controller killed mid-run, a dropped network or a hung guard leave
# the server as it was within a bounded time.

SWITCH_ROOT = "/var/lib/provisioner/revert"
# run by the timer's service (python3 SCRIPT DIR) and by the guard's rollback: one way back
REVERT_SCRIPT = r"""
import fcntl, json, os, subprocess, sys
d = sys.argv[1]
lock = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX)
done = os.path.join(d, "done.json")
if os.path.exists(done):
    print(open(done).read())
    sys.exit(0)
with open(os.path.join(d, "manifest.json")) as f:
    m = json.load(f)
restored, failed = [], []
for i, e in enumerate(m["files"]):
    p = e["path"]
    tmp = "%s.provisioner-revert-%d" % (p, os.getpid())
    try:
        if e["kind"] == "absent":
            if os.path.lexists(p):
                os.unlink(p)
        elif e["kind"] == "link":
            os.symlink(e["target"], tmp)
            os.rename(tmp, p)
        elif e["kind"] == "file":
            with open(os.path.join(d, str(i)), "rb") as f:
                data = f.read()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.fchown(fd, e["uid"], e["gid"])
                os.fchmod(fd, e["mode"])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, p)
        else:
            raise OSError("%s was %s before: not restorable" % (p, e["kind"]))
        restored.append(p)
    except OSError as ex:
        failed.append("%s: %s" % (p, ex))
        if os.path.lexists(tmp):
            os.unlink(tmp)
after = []
for argv in m["after"]:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120)
        rc, out = r.returncode, r.stdout.decode("utf-8", "replace")[-2000:].partition("\n")[2]
    except (OSError, subprocess.SubprocessError) as ex:
        rc, out = None, str(ex)
    after.append({"argv": argv, "rc": rc, "output": out})
result = json.dumps({"restored": restored, "failed": failed, "after": after})
with open(done, "w") as f:
    f.write(result)
print(result)
"""


def _switch_dir(sid):
    if not re.match(r"[A-Za-z0-9_-]{1,80}\Z", sid):
        raise StepError("bad switch id %r" % (sid,))
    return os.path.join(SWITCH_ROOT, sid), "provisioner-revert-%s" % sid


def _switch_snapshot(path, into, i):
    """What `path` is now, and its bytes copied to into/i (never through a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"path": path, "kind": "absent"}
    if stat.S_ISLNK(st.st_mode):
        return {"path": path, "kind": "link", "target": os.readlink(path)}
    if not stat.S_ISREG(st.st_mode):
        return {"path": path, "kind": "a directory" if stat.S_ISDIR(st.st_mode) else "special"}
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)                   # of what we read, not of what lstat saw
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    write_file(os.path.join(into, str(i)), data, 0o600)
    return {"path": path, "kind": "file", "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
            "gid": st.st_gid}


def arm_switch(sw):
    """Copy sw["paths"] aside and arm the revert timer (sw["seconds"] from now).
    Returns {"armed": True, "unit", "seconds"} or {"armed": False, "why"}."""
    d, unit = _switch_dir(sw["id"])
    if os.path.isdir(d):
        rmtree(d)                    # a leftover of this same id: start afresh
    os.makedirs(d, 0o700)
    try:
        files = [_switch_snapshot(p, d, i) for i, p in enumerate(sw["paths"])]
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump({"files": files, "after": sw.get("after") or []}, f)
        script = os.path.join(d, "revert.py")
        with open(script, "w") as f:
            f.write(REVERT_SCRIPT)
        rc, out = _run(["systemd-run", "--unit", unit, "--description",
                        "provisioner: revert a change that may lock the controller out",
                        "--on-active=%ds" % int(sw["seconds"]), "--timer-property=AccuracySec=1s",
                        "--property=Type=oneshot", sys.executable, script, d], timeout=30)
    except (OSError, StepError) as e:
        rc, out = None, str(e)
    if rc != 0:
        rmtree(d, ignore_errors=True)
        return {"armed": False, "why": ("systemd-run failed (exit %s): %s" % (rc, out.strip()))[-500:]}
    return {"armed": True, "unit": unit, "seconds": int(sw["seconds"]),
            "unrestorable": [f["path"] + " (" + f["kind"] + ")" for f in files
                             if f["kind"] not in ("absent", "link", "file")]}


def switch(req):
    """disarm: the guard's fresh login worked, stop the timer and drop the copies.
    revert: the guard failed, put everything back now (what the timer would do)."""
    d, unit = _switch_dir(req["id"])
    if req["action"] == "revert":
        rc, out = _run([sys.executable, os.path.join(d, "revert.py"), d], timeout=300)
    _run_split(["systemctl", "stop", unit + ".timer"])
    _run_split(["systemctl", "reset-failed", unit + ".service", unit + ".timer"])
    if req["action"] == "disarm":
        fired = None
        try:                                # too late: the timer reverted while the guard ran
            with open(os.path.join(d, "done.json")) as f:
                fired = json.load(f)
        except (OSError, ValueError):
            pass
        rmtree(d, ignore_errors=True)
        return {"disarmed": fired is None, "fired": fired}
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"restored": [], "failed": ["the revert script failed (exit %s): %s" % (rc, _tail(out, 500))],
                "after": []}
    rmtree(d, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------
# the agent's cache on the server (read by the bootstrap in provisioner/agent.py)

CACHE_KEEP = 8               # agent versions kept: controllers of different versions each keep theirs
CACHE_TMP_AGE = 600          # seconds after which a temp file left by a killed agent is removed


def cache_self(req, cache_dir, compiled=None):
    """Keep this agent in the cache for the bootstrap to run next time instead of receiving
    it: its source (REQ["code"], when it was sent) as <cache_dir>/<sha256>.py, and the code
    the bootstrap compiled from it (`compiled`) as <sha256>.<magic>.code, a CRC32 and the
    marshalled code, which only this python (its bytecode magic) reads. Only into a folder
    that is ours alone (owned by our user, no access for others) and never through a
    symlink, so that no other local user can have us write elsewhere; the bootstrap checks
    each source's hash anyway. Returns {"cached": bool, "why"?: str}, or None when there was
    nothing to keep (the bootstrap ran the compiled code); a failure only means the source
    is sent, or compiled, again."""
    code, sha = req.get("code"), req.get("sha", "")
    if code is None and compiled is None:
        return None
    data = code.encode("utf-8") if isinstance(code, str) else None
    if not cache_dir or len(sha) != 64 or sha.strip("0123456789abcdef") \
            or data is not None and sha256(data).hexdigest() != sha:
        return {"cached": False, "why": "no cache folder, or the source does not match its hash"}
    try:
        os.makedirs(os.path.dirname(cache_dir), mode=0o755, exist_ok=True)
        try:
            os.mkdir(cache_dir, 0o700)
        except FileExistsError:
            pass
        fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        return {"cached": False, "why": "%s: %s" % (cache_dir, e.strerror or e)}
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return {"cached": False, "why": "%s is not ours alone (owner uid %d, mode %o)"
                                             % (cache_dir, st.st_uid, stat.S_IMODE(st.st_mode))}
        if data is not None:
            _store(fd, sha + ".py", data)
        magic = _magic()
        if compiled is not None and magic:
            import marshal
            body = marshal.dumps(compiled)
            _store(fd, "%s.%s.code" % (sha, magic), binascii.crc32(body).to_bytes(4, "big") + body)
        _prune_cache(fd)
        return {"cached": True}
    except OSError as e:
        return {"cached": False, "why": "%s: %s" % (cache_dir, e.strerror or e)}
    finally:
        os.close(fd)


def _magic():
    """This python's bytecode magic number in hex (what the bootstrap names .code files by)."""
    try:
        from _frozen_importlib_external import MAGIC_NUMBER
    except ImportError:        # not CPython: the bootstrap compiles the source every time
        return None
    return MAGIC_NUMBER.hex()


def _store(fd, name, data):
    """Write a cache file whole, under its final name only once written (a temp file, then a
    rename). No fsync: a file torn by a crash fails the bootstrap's checks and is replaced."""
    tmp = ".%s.%d.tmp" % (name, os.getpid())
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
    try:
        os.write(out, data)
    finally:
        os.close(out)
    os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)


def _prune_cache(fd):
    """Keep the CACHE_KEEP agent versions stored last (their source and compiled code), and no
    old temp file."""
    sources, others, now = [], [], time.time()
    for name in os.listdir(fd):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        if name.endswith(".py"):
            sources.append((st.st_mtime, name))
        elif name.endswith(".code"):
            others.append(name)
        elif name.endswith(".tmp") and now - st.st_mtime > CACHE_TMP_AGE:
            _unlink_quietly(name, fd)
    sources.sort(reverse=True)
    kept = {name[:-3] for _, name in sources[:CACHE_KEEP]}
    for name in [n for _, n in sources[CACHE_KEEP:]] + [n for n in others if n.split(".")[0] not in kept]:
        _unlink_quietly(name, fd)


def _unlink_quietly(name, fd):
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass               # another agent removed it first


# ----------------------------------------------------------------------------------------------

def main(req):
    started = time.time()
    import signal
    signal.signal(signal.SIGTERM, _on_term)
    try:
        op = req.get("op")
        if op == "facts":
            body = {"facts": gather(req.get("request") or {})}
        elif op == "apply":
            request = req.get("request") or {}
            refused = hold_run(request["run_lock"]) if request.get("run_lock") else None
            body = {"error": refused} if refused else apply(request)
        elif op == "finish":
            body = finish(req.get("request") or {})
        elif op == "switch":
            body = switch(req.get("request") or {})
        elif op == "ping":
            body = {"pong": True}
        else:
            body = {"error": "unknown op %r" % (op,)}
    except Exception:
        import traceback
        body = {"error": "agent crashed", "traceback": traceback.format_exc()}
    if req.get("store"):         # sent whole after a miss, or compiled: keep it for the next execs
        cached = cache_self(req, sys.argv[1] if len(sys.argv) > 1 else None,
                            globals().get("COMPILED"))
        if cached is not None:
            body["cache"] = cached
    body["agent"] = {"version": VERSION, "op": req.get("op"), "commands": STATS["commands"],
                     "seconds": round(time.time() - started, 3)}
    out = MARKER + json.dumps(body, separators=(",", ":")) + "\n"
    sys.stdout.write(out)
    sys.stdout.flush()


if __name__ == "__provisioner_agent__":
    main(REQ)  # noqa: F821  (REQ is injected by the bootstrap command)

"""pm2 helpers of the scripts that run on servers and ship as one file each (role pm2's status
check, role monitoring_agent's host metrics, `invoke status`'s probe): provisioner.remote's
with_helpers() puts a helper's source ahead of each, so each helper imports what it uses."""


def pm2_unit(user):
    """The systemd unit that runs `user`'s pm2 daemon (role pm2 writes it)."""
    return "pm2-%s.service" % user


def pm2_jlist(output):
    """pm2's process list from `pm2 jlist`'s stdout: its last line that parses as a JSON list.
    pm2 writes the list as one line (JSON.stringify, no newline after it), and may print lines
    of its own ahead of it, some starting with "[": "[PM2] Spawning PM2 daemon with
    pm2_home=..." and "[PM2] PM2 Successfully daemonized" when the call started its daemon,
    its banner on its first call, ">>>> In-memory PM2 is out-of-date" after an upgrade.
    ValueError when no line is a list (pm2 failed)."""
    import json
    for line in reversed(output.splitlines()):
        try:
            procs = json.loads(line)
        except ValueError:
            continue
        if isinstance(procs, list):
            return procs
    raise ValueError("no process list in pm2 jlist's output")


def pm2_app_procs(procs, name=None):
    """The processes of apps in pm2's process list (of app `name` only, when given): not pm2's
    own modules (pm2-logrotate), which pm2 lists beside the apps with `pmx_module` set in
    their pm2_env; nothing keeps an app from a module's name, and as an app a module would be
    counted, alerted on, reloaded. The one rule of every script that asks pm2; deploy's reload
    (PM2_RELOAD in remote/deploy.py, JavaScript on pm2's API) applies it too."""
    return [p for p in procs if not (p.get("pm2_env") or {}).get("pmx_module")
            and (name is None or p.get("name") == name)]


def pm2_processes(user, home, pm2="/usr/local/bin/pm2", timeout=30):
    """The process list of `user`'s pm2 daemon (PM2_HOME <home>/.pm2), as `pm2 jlist` prints
    it; ValueError or OSError when pm2 cannot be asked. Callers check first that the daemon's
    unit is active: `pm2 jlist` starts a daemon when none runs.

    Asked of the daemon itself over its RPC socket, <PM2_HOME>/rpc.sock, with the call `pm2
    jlist` makes (getMonitorData), framed as pm2's axon does (amp: a byte of version and
    argument count, then each argument as a 4-byte big-endian length and "j:" JSON or "s:"
    text): a few ms, where pm2's CLI costs 0.3 s of CPU on every call. Only a socket that the
    user owns is talked to, never one a symlink points to (opened without following, then
    connected through /proc/self/fd), so root asks nothing the user could not. `pm2 jlist`
    as the user when the socket does not answer that way (another pm2)."""
    import json
    import os
    import pwd
    import socket
    import stat
    import struct
    import subprocess

    def ask_daemon():
        fd = os.open(home + "/.pm2/rpc.sock", os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != pwd.getpwnam(user).pw_uid:
                raise ValueError("rpc.sock is not a socket of " + user)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(timeout)
                s.connect("/proc/self/fd/%d" % fd)
                args = [b"j:" + json.dumps({"type": "call", "method": "getMonitorData",
                                            "args": [{}]}).encode(), b"s:provisioner:1"]
                s.sendall(bytes([0x10 | len(args)]) + b"".join(
                    struct.pack(">I", len(a)) + a for a in args))
                buf = bytearray()

                def take(n):
                    while len(buf) < n:
                        chunk = s.recv(1 << 16)
                        if not chunk:
                            raise ValueError("pm2 closed its RPC socket mid-answer")
                        buf.extend(chunk)
                    out = bytes(buf[:n])
                    del buf[:n]
                    return out
                argc = take(1)[0] & 0x0F
                reply = [take(struct.unpack(">I", take(4))[0]) for _ in range(argc)]
        finally:
            os.close(fd)
        if not reply or not reply[0].startswith(b"j:"):
            raise ValueError("not an answer of pm2's RPC")
        answer = json.loads(reply[0][2:])
        procs = (answer.get("args") or [None])[0] if isinstance(answer, dict) else None
        if not isinstance(procs, list):
            raise ValueError("pm2's RPC answered %s" % str(answer)[:200])
        return procs
    try:
        return ask_daemon()
    except (OSError, ValueError, KeyError):
        pass
    p = subprocess.run(["runuser", "-u", user, "--", "env", "-i", "--chdir=" + home,
                        "HOME=" + home, "PM2_HOME=" + home + "/.pm2",
                        "PATH=" + os.path.dirname(pm2) + ":/usr/bin:/bin", "LANG=C.UTF-8",
                        pm2, "jlist"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout)
    if p.returncode != 0:
        raise ValueError("pm2 jlist exited %d" % p.returncode)
    return pm2_jlist(p.stdout.decode("utf-8", "replace"))

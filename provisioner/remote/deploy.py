"""Server side of `invoke deploy` / `rollback` / `releases` / `deploy.unlock`: stdlib only, run
by python3 as root (through sudo), one exec per phase. provisioner/releases.py sends this source
and a JSON request as the first line of stdin; the release artifact (a tar.gz) follows it on
stdin. The answer is one JSON object after MARKER on stdout.

Layout of an app (ROOT = /srv/<app>):
    ROOT/releases/<id>/        code + node_modules, owned by the app user, read-only once built
    ROOT/releases/<id>.building   a release being prepared (removed when its deploy dies)
    ROOT/shared/               paths kept across releases, linked into each release
    ROOT/current -> releases/<id>   swapped atomically (symlink beside it, then rename)
    ROOT/blue, ROOT/green -> releases/<id>   blue-green: what each colour's pm2 app runs
                               (current: the live colour's release, set once the flip is done)
    ROOT/releases.json         the manifest: [{id, commit, ref, sha256, at, by, state, ...}];
                               `backup`: the pre-migration backup a deploy took before that
                               release migrated (its kind, host, path or restore point), when
                               there was one (manifests written before it have no such key)
    ROOT/.deploy.lock/         the deploy lock: made by one mkdir; owner.json says who
States: prepared -> live -> retired (passed its health gate: a rollback target) | failed |
rolled-back.
"""
import fcntl
import glob
import hashlib
import json
import os
import pwd
import re
import select
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import traceback
import urllib.request

if __name__ != "__provisioner_deploy__":
    # imported on the controller (tests); on a server, provisioner/releases.py sent the
    # source of the helpers shared with the agent and the roles ahead of this file's
    from provisioner.remote.agent import flock_held
    from provisioner.remote.sql import sql_literal

MARKER = "\n--provisioner-deploy-v1--\n"      # must match provisioner/releases.py
GOOD = ("live", "retired")                     # states of releases that passed a health gate


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Fail(Exception):
    """A phase failed: the message goes to the controller as the answer's error."""


PM2 = "/usr/local/bin/pm2"                    # role pm2's global install
# argv: pm2's module folder, the pm2 app name, its ecosystem file. Only the app's own online
# processes are reloaded: named so, no pm2 module (the rule of pm2_app_procs in
# provisioner/remote/pm2.py: `pmx_module` in pm2_env), and run from the ecosystem file's `cwd`
# (pm2 keeps it in pm_cwd, resolved as here; role pm2 writes /srv/<app>/current, or the
# colour's /srv/<app>/<colour>), so that another process of that name is left alone. pm2's
# reload lock is honoured (a reload begun by someone else fails this one), then each instance
# is reloaded on its own, concurrently.
PM2_RELOAD = r"""
const [module, name, eco] = process.argv.slice(1);
const path = require('path');
const pm2 = require(module);
const lock = require(module + '/lib/Common.js');
const fail = (e) => { console.error(String(e && e.message || e)); process.exit(1); };
const conf = require(eco).apps[0];
const cwd = conf.cwd ? path.resolve(conf.cwd) : null;
const own = (p) => p.name === name && !p.pm2_env.pmx_module
  && (cwd === null || p.pm2_env.pm_cwd === cwd);
pm2.connect(false, (err) => {
  if (err) return fail(err);
  pm2.list((err, list) => {
    if (err) return fail(err);
    const ids = list.filter((p) => own(p) && p.pm2_env.status === 'online')
      .map((p) => p.pm_id);
    if (ids.length && lock.lockReload() > 0) {
      return fail('another pm2 reload is in progress on this host; try again in a minute');
    }
    Promise.all(ids.map((id) => new Promise((ok, ko) =>
      pm2.reload(id, {force: true}, (e) => (e ? ko(e) : ok())))))
      .then(() => { console.log(JSON.stringify({reloaded: ids.length})); },
            (e) => { process.exitCode = 1; console.error(String(e && e.message || e)); })
      .finally(() => { if (ids.length) lock.unlockReload(); pm2.disconnect(); });
  });
});
"""


class App:
    def __init__(self, req):
        self.req = req
        self.name = req["app"]
        self.root = "/srv/" + self.name
        self.releases = self.root + "/releases"
        self.shared = self.root + "/shared"
        self.current = self.root + "/current"
        self.manifest_path = self.root + "/releases.json"
        self.lock = self.root + "/.deploy.lock"
        self.busy = self.lock + "/busy"        # flock'd by every exec of the lock's run
        self.user = req.get("user")            # the app user (not on a database host)
        self.home = req.get("home")
        self.commands = 0

    # --- manifest ---------------------------------------------------------------------------
    def manifest(self):
        try:
            with open(self.manifest_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return []

    def save(self, entries):
        tmp = self.manifest_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.manifest_path)

    def set_state(self, release, state, **extra):
        entries = self.manifest()
        for e in entries:
            if e["id"] == release:
                e["state"] = state
                e.update(extra)
        self.save(entries)

    def live(self):
        """The release `current` points to (None before the first deploy)."""
        try:
            return os.path.basename(os.readlink(self.current))
        except OSError:
            return None

    # --- commands ---------------------------------------------------------------------------
    def as_user(self, argv, cwd=None, env=None, timeout=900, user=None, home=None, what=None):
        """argv as the app user (or `user`) with a clean environment (+ env); the output, or
        Fail. Stops (and kills the command) when the controller is gone: a killed deploy
        leaves no command running. The environment goes to runuser through its own
        environment, never its argv (it may hold the app's secrets)."""
        base = {"HOME": home or self.home or "/", "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8"}
        base.update(env or {})
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"    # our PATH (sudo's), not base's
        full = [runuser, "-u", user or self.user, "--"] + list(argv)
        self.commands += 1
        proc = subprocess.Popen(full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, env=base)
        out = []
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out.append(chunk)
            if controller_gone() or time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                raise Fail("%s stopped: %s" % (argv[0], "the controller is gone"
                                                if controller_gone() else "timed out"))
        rc = proc.wait()
        text = b"".join(out).decode("utf-8", "replace")
        if rc != 0:
            raise Fail("%s exited %d:\n%s" % (what or " ".join(argv[:3]), rc, text[-4000:]))
        return text

    def pm2(self, *args):
        return self.as_user([PM2] + list(args), cwd=self.home,
                            env={"PM2_HOME": self.home + "/.pm2"})

    def start_pm2(self):
        """pm2's daemon as role pm2's systemd unit runs it (a no-op when it is up): were it
        down, a pm2 call would start a daemon of its own, outside systemd, gone at the next
        boot and without the unit's environment (its cluster scheduling)."""
        unit = "pm2-%s.service" % self.user
        r = subprocess.run(["systemctl", "start", unit], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=180)
        if r.returncode != 0:
            raise Fail("systemctl start %s exited %d: %s; provision the host (role pm2 writes "
                       "the unit), or see `journalctl -u %s`" % (
                           unit, r.returncode, r.stdout.decode("utf-8", "replace").strip(), unit))

    def reload_online(self, name, eco):
        """pm2 reload of every online instance of pm2 app `name` run from ecosystem file `eco`
        (PM2_RELOAD: no pm2 module, no other process of that name), all at once: the number
        reloaded (0: none online, nothing done). One node process on pm2's own API in place of
        `pm2 jlist` + `pm2 reload` (two CLI start-ups), and the instances side by side: pm2's CLI
        reloads a cluster of two or fewer one instance after the other, so a host's reload took
        two of the app's graceful shutdowns in a row. Each old instance still stops only once
        its replacement listens, so the app never has fewer instances listening."""
        module = os.path.dirname(os.path.dirname(os.path.realpath(PM2)))
        out = self.as_user(["/usr/bin/node", "-e", PM2_RELOAD, module, name, eco], cwd=self.home,
                           env={"PM2_HOME": self.home + "/.pm2"}, what="pm2 reload " + name)
        return json.loads(out.strip().splitlines()[-1])["reloaded"]

    def colour_links(self, colours):
        """blue-green: {colour: the release its link points to, or None}."""
        out = {}
        for colour, c in (colours or {}).items():
            try:
                out[colour] = os.path.basename(os.readlink(c["link"]))
            except OSError:
                out[colour] = None
        return out


def controller_gone():
    """True once nobody reads our stdout any more (the SSH session closed: the deploy died)."""
    p = select.poll()
    p.register(1, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


# --- the lock ------------------------------------------------------------------------------

def take_lock(app, owner, take_from):
    """Make the lock (one mkdir) or say who holds it. take_from: the run id of a holder the
    controller found dead; its lock is taken over unless one of its commands still runs here
    (its busy flock is held). A lock older than its TTL is taken over too."""
    os.makedirs(app.root, mode=0o755, exist_ok=True)
    for _ in range(3):
        try:
            os.mkdir(app.lock, 0o700)
        except FileExistsError:
            holder = read_json(app.lock + "/owner.json") or {}
            if holder.get("run_id") == owner["run_id"]:
                return {"acquired": True}
            age = time.time() - holder.get("started_epoch", time.time())
            stale = age > holder.get("ttl", 4 * 3600)
            if not (stale or (take_from and holder.get("run_id") == take_from)):
                return {"acquired": False, "holder": holder, "age": age}
            if flock_held(app.busy):        # an exec of that run still runs here
                return {"acquired": False, "holder": holder, "age": age, "busy": True}
            gone = "%s.taken-%d" % (app.lock, os.getpid())
            try:
                os.rename(app.lock, gone)          # one winner among racing takeovers
            except FileNotFoundError:
                continue
            shutil.rmtree(gone, ignore_errors=True)
            owner = dict(owner, took_over=holder)
            continue
        with open(app.lock + "/owner.json", "w") as f:
            json.dump(owner, f)
        return {"acquired": True, "took_over": owner.get("took_over")}
    raise Fail("the deploy lock %s keeps changing hands; try again" % app.lock)


def hold(app, run_id):
    """Check the lock is this run's and hold its busy flock for this exec."""
    holder = read_json(app.lock + "/owner.json") or {}
    if holder.get("run_id") != run_id:
        raise Fail("the deploy lock is no longer this run's (held by %s@%s since %s)"
                   % (holder.get("who"), holder.get("from"), holder.get("started")))
    fd = os.open(app.busy, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- phases --------------------------------------------------------------------------------

def op_lock(app, req, data):
    """Take the lock, clear what a dead deploy left (a .building folder, a release prepared
    but never switched to), and answer the manifest. With an artifact: prepare the release."""
    got = take_lock(app, req["owner"], req.get("take_from"))
    if not got["acquired"]:
        return dict(got, ok=False)
    fd = hold(app, req["owner"]["run_id"])
    answer = {"ok": True, "took_over": got.get("took_over"),
              "cleaned": clean(app, req.get("colours"))}
    if req.get("artifact"):
        try:
            answer.update(prepare(app, req, data))
        except BaseException:
            # a failed prepare lets go of the lock; a deploy that died keeps it (with who and
            # when) until the next deploy takes it over and says so
            os.close(fd)
            if not controller_gone():
                release_lock(app, req["owner"]["run_id"])
            raise
    answer["manifest"] = app.manifest()
    answer["current"] = app.live()
    if req.get("colours"):       # blue-green: what each colour runs, and whether it answers
        answer["colours"] = {}
        for colour, rel in app.colour_links(req["colours"]).items():
            url = health_url({"port": req["colours"][colour]["port"],
                              "health_path": req["health_path"]})
            healthy, seen = probe(url, rel) if rel else (False, "never started")
            answer["colours"][colour] = {"release": rel, "healthy": healthy, "seen": seen}
    os.close(fd)
    return answer


def clean(app, colours=None):
    os.makedirs(app.releases, 0o755, exist_ok=True)
    running = set(app.colour_links(colours).values())    # blue-green: each colour's release
    live = app.live()
    entries = app.manifest()
    cleaned = []
    for name in sorted(os.listdir(app.releases)):
        path = os.path.join(app.releases, name)
        if name.endswith(".building"):
            shutil.rmtree(path, ignore_errors=True)
            cleaned.append(name)
    keep = []
    for e in entries:
        if e.get("state") == "prepared" and e["id"] != live and e["id"] not in running:
            shutil.rmtree(os.path.join(app.releases, e["id"]), ignore_errors=True)
            cleaned.append(e["id"])
        else:
            keep.append(e)
    if len(keep) != len(entries):
        app.save(keep)
    return cleaned


def prepare(app, req, data):
    art = req["artifact"]
    release = req["release"]
    final = os.path.join(app.releases, release)
    building = final + ".building"
    if os.path.exists(final):
        raise Fail("release %s exists already on this host" % release)
    blob = data.read(art["size"] + 1)
    if len(blob) != art["size"] or hashlib.sha256(blob).hexdigest() != art["sha256"]:
        raise Fail("the artifact arrived incomplete or changed (sha256 differs)")
    uid, gid = pwd.getpwnam(app.user).pw_uid, pwd.getpwnam(app.user).pw_gid
    try:
        os.mkdir(building, 0o755)
        unpack(blob, building)
        chown_tree(building, uid, gid)
        with open(building + "/RELEASE", "w") as f:
            f.write(release + "\n")
        install = dependencies(app, building)
        link_shared(app, building, req["shared"], uid, gid)
        read_only(building)
        os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    entries = [e for e in app.manifest() if e["id"] != release]
    entries.append({"id": release, "commit": req["commit"], "ref": req["ref"],
                    "sha256": art["sha256"], "at": now(), "by": req["owner"]["by"],
                    "state": "prepared"})
    app.save(entries)
    return {"release": release, "install": install}


def unpack(blob, dest):
    import io
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for m in tar.getmembers():       # git archive holds files, folders and symlinks only
            if m.name.startswith("/") or ".." in m.name.split("/") or not (
                    m.isfile() or m.isdir() or m.issym()):
                raise Fail("the artifact has an unsafe entry: %r" % m.name)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def chown_tree(top, uid, gid):
    for dirpath, dirs, files in os.walk(top):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirs + files]:
            os.lchown(n, uid, gid)


def read_only(top):
    """Code is never changed in place: no write bits (node_modules is hard-linked between
    releases, so a write would change an older release too)."""
    for dirpath, dirs, files in os.walk(top):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in files]:
            if not os.path.islink(n):
                os.chmod(n, os.stat(n).st_mode & ~0o222)


def sha_of(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def lock_twin(app, lock):
    """A prepared release whose package-lock.json has sha256 `lock`: the live one first, then
    the newest (after a rollback the live release is older than the one that last installed
    these packages). Only prepared releases are folders without `.building`."""
    live = app.live()
    names = sorted((n for n in os.listdir(app.releases) if not n.endswith(".building")
                    and n != live), reverse=True) if os.path.isdir(app.releases) else []
    for name in ([live] if live else []) + names:
        if sha_of(os.path.join(app.releases, name, "package-lock.json")) == lock:
            return name
    return None


def dependencies(app, release_dir):
    """node_modules: hard links to a prepared release's when its package-lock.json is the same
    (seconds), else `npm ci --omit=dev` as the app user with a cache shared by releases."""
    lock = sha_of(release_dir + "/package-lock.json")
    if lock is None:
        pkg = read_json(release_dir + "/package.json") or {}
        if pkg.get("dependencies"):
            raise Fail("package.json has dependencies but the release has no package-lock.json:"
                       " commit one (npm install writes it)")
        return "none (no dependencies)"
    twin = lock_twin(app, lock)
    if twin:
        old = os.path.join(app.releases, twin)
        if not os.path.isdir(old + "/node_modules"):          # npm ci made none: no packages
            return "none (package-lock.json as in %s, which has no node_modules)" % twin
        app.commands += 1
        subprocess.run(["cp", "-al", old + "/node_modules", release_dir + "/node_modules"],
                       check=True)
        return "hard-linked from " + twin
    cache = app.shared + "/.npm"
    os.makedirs(cache, 0o700, exist_ok=True)
    user = pwd.getpwnam(app.user)
    os.chown(cache, user.pw_uid, user.pw_gid)
    app.as_user(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier",
                 "--cache", cache], cwd=release_dir)
    return "npm ci"


def link_shared(app, release_dir, shared, uid, gid):
    os.makedirs(app.shared, 0o755, exist_ok=True)
    for entry in shared:
        folder = entry.endswith("/")
        rel = entry.rstrip("/")
        target = os.path.join(app.shared, rel)
        if not os.path.lexists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if folder:
                os.mkdir(target, 0o750)
            else:
                open(target, "a").close()
                os.chmod(target, 0o640)
            os.lchown(target, uid, gid)
        here = os.path.join(release_dir, rel)
        if os.path.isdir(here) and not os.path.islink(here):
            shutil.rmtree(here)
        elif os.path.lexists(here):
            os.unlink(here)
        os.makedirs(os.path.dirname(here), exist_ok=True)
        os.symlink(target, here)


def point(link, release):
    """link (current, or a colour's) -> releases/<release>, atomically: a new link beside
    it, renamed over it."""
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink("releases/" + release, tmp)
    os.rename(tmp, link)


def reload(app, name, eco):
    """pm2 reload of pm2 app `name` (cluster mode: one instance at a time, no request
    dropped); the first release starts it from the ecosystem file role pm2 wrote, and records
    its stamp so that the next provision sees it started from that file."""
    if not os.path.exists(eco):
        raise Fail("%s is missing: provision the host first (role pm2 writes it)" % eco)
    app.start_pm2()
    if app.reload_online(name, eco):
        return "reloaded"
    app.pm2("start", eco)
    app.pm2("save")
    stamp = "%s/.pm2/provisioner-%s.ecosystem.sha256" % (app.home, name)
    if os.path.isdir(os.path.dirname(stamp)):
        with open(stamp, "w") as f:
            f.write(sha_of(eco) + "\n")
        user = pwd.getpwnam(app.user)
        os.chown(stamp, user.pw_uid, user.pw_gid)
        os.chmod(stamp, 0o600)
    return "started"


def probe(url, release):
    """One ask of the health URL: (healthy: 200 naming `release`, what the answer was)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            body = r.read(4096).decode("utf-8", "replace")
            return r.status == 200 and release in body, "%d %s" % (r.status, body.strip()[:300])
    except Exception as e:                 # HTTPError, refused, reset, timeout
        code = getattr(e, "code", None)
        return False, ("%s %s" % (code, e.read(300).decode("utf-8", "replace").strip()) if code
                       else "%s: %s" % (type(e).__name__, e))


def health_url(req):
    return "http://127.0.0.1:%d%s" % (req["port"], req["health_path"])


def health(app, req, release):
    """Ask the health URL on loopback until it answers 200 naming `release`, or time out.
    Returns (passed, what the last answer was)."""
    deadline = time.monotonic() + req["health_timeout"]
    good = 0
    while True:
        ok, seen = probe(health_url(req), release)
        # two answers in a row: every instance of a 2-instance cluster is usually asked
        good = good + 1 if ok else 0
        if good >= 2:
            return True, seen
        if time.monotonic() > deadline:
            return False, seen
        time.sleep(0.2)


def op_switch(app, req, data):
    """current (blue-green: the idle colour's link) -> req["release"], reload, health gate
    on the port given; a failed gate switches this host back (and reloads) when it had a
    release there before."""
    fd = hold(app, req["run_id"])
    release = req["release"]
    link = req.get("link") or app.current
    name = req.get("process") or app.name
    eco = req.get("ecosystem") or app.root + "/ecosystem.config.js"
    if not os.path.isdir(os.path.join(app.releases, release)):
        raise Fail("release %s is not on this host" % release)
    try:
        before = os.path.basename(os.readlink(link))
    except OSError:
        before = None
    point(link, release)
    try:
        how = reload(app, name, eco)
    except Fail as e:
        raise Fail("pm2 could not run %s: %s\n%s" % (release, e, undo_switch(
            app, link, before, release, name, eco)))
    passed, seen = health(app, req, release)
    answer = {"ok": passed, "previous": before, "seen": seen, "how": how}
    if not passed and before and before != release and req.get("revert", True):
        point(link, before)
        try:
            reload(app, name, eco)
            back, seen_back = health(app, req, before)
        except Fail as e:
            back, seen_back = False, "pm2 reload failed: %s" % e
        answer.update(reverted=before, revert_ok=back, revert_seen=seen_back)
    os.close(fd)
    return answer


def undo_switch(app, link, before, release, name, eco):
    """After pm2 failed to start or reload `release` (a reload may have moved some instances
    already): the link back where it was, and pm2 reloaded onto that, so the link never names
    a release pm2 does not run. Returns what was done, for the error."""
    if before == release:
        return "%s stays on %s, where it was" % (link, release)
    if before is None:
        os.unlink(link)                 # there was none: a provision would start what it names
        return "%s removed again (it named no release before)" % link
    point(link, before)
    try:
        reload(app, name, eco)
    except Fail as e:
        return "%s is back on %s, but pm2 failed to reload that too: %s" % (link, before, e)
    return "%s is back on %s (pm2 reloaded)" % (link, before)


# --- the canary's hold: its health on loopback, its 5xx rate in the load balancers' logs ----

ACCESS_LOG = "/var/log/nginx/access.log"          # role nginx: one log, format `timed`
UPSTREAM_RE = re.compile(r" upstream=(.*?) upstream_status=(.*?) upstream_time=")
MIN_ANSWERS = 100      # a rate judged before the hold ends needs this many answers behind it


def canary_statuses(line, upstreams):
    """The statuses the `upstreams` (addr:port) gave to one request of an access log line in
    role nginx's `timed` format. nginx lists every server it tried (", " between tries, " : "
    across internal redirects): a canary's 502 hidden by a retry on another server counts."""
    m = UPSTREAM_RE.search(line)
    if not m:
        return []
    addrs, statuses = re.split(r", | : ", m.group(1)), re.split(r", | : ", m.group(2))
    return [st for addr, st in zip(addrs, statuses) if addr in upstreams]


def log_names(upstreams):
    """The canaries ("address:port", their inventory address) as nginx's log names them.
    nginx resolves a server given by name when it loads its configuration and logs the
    address it connected to: a name is resolved here the same way, on the same host, or a
    canary addressed by name would never be counted (and a hold would see no answer)."""
    names = set(upstreams)
    for upstream in upstreams:
        host, _, port = upstream.rpartition(":")
        try:
            found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            continue                      # as given: nginx would not have started without it
        for family, _, _, _, addr in found:
            names.add(("[%s]:%s" if family == socket.AF_INET6 else "%s:%s") % (addr[0], port))
    return names


def too_many_5xx(errors, answers, max_percent, final):
    """Over the threshold: at the end of the hold, of what was seen; before it, only once the
    errors pass the threshold of MIN_ANSWERS answers (a first 502 is not yet a rate)."""
    if final:
        return answers > 0 and errors * 100 > max_percent * answers
    return errors * 100 > max_percent * max(answers, MIN_ANSWERS)


def stop_path(req):
    """The file that ends every watcher of this run on this host: a watcher that saw trouble
    has the controller write it on the others (op stop_watch), so the switch-back need not
    wait for the rest of their hold."""
    return "/run/provisioner-watch-%s.stop" % req.get("run_id")


def watching(req, deadline):
    return (time.monotonic() < deadline and not controller_gone()
            and not (req.get("run_id") and os.path.exists(stop_path(req))))


STOP_FILES_KEPT = 86400       # seconds: an older stop file's run is over


def op_stop_watch(app, req, data):
    """Stop this run's watchers here. The stop also reaches watchers that had ended (the one
    that saw trouble, at least), so its file would stay in /run: those of runs a day old go."""
    for old in glob.glob(stop_path({"run_id": "*"})):
        try:
            if time.time() - os.stat(old).st_mtime > STOP_FILES_KEPT:
                os.unlink(old)
        except OSError:
            pass                    # another run's stop removed it first
    with open(stop_path(req), "w"):
        pass
    return {"ok": True}


def op_watch(app, req, data):
    """On a canary: its health URL once a second for the hold; unhealthy at the second failing
    answer in a row (one slow answer is not a verdict). Ends early then, or when stopped."""
    fd = hold(app, req["run_id"])
    deadline = time.monotonic() + req["hold"]
    bad, asked, seen = 0, 0, "no answer"
    while watching(req, deadline):
        ok, seen = probe(health_url(req), req["release"])
        asked += 1
        bad = 0 if ok else bad + 1
        if bad >= 2:
            break
        time.sleep(1)
    os.close(fd)
    return {"ok": bad < 2, "seen": seen, "asked": asked,
            "stopped": bad < 2 and time.monotonic() < deadline}


def op_watch_5xx(app, req, data):
    """On a load balancer: follow nginx's access log for the hold, counting the canaries'
    answers and their 5xx; ends early once over the threshold. Answers counts only (a log line
    may hold a token in its URL: none is sent back)."""
    path, ups = req.get("log") or ACCESS_LOG, log_names(req["upstreams"])
    log = open(path, "rb")
    log.seek(0, 2)
    inode = os.fstat(log.fileno()).st_ino
    deadline = time.monotonic() + req["hold"]
    answers, errors, seen, rest = 0, 0, {}, b""
    try:
        while watching(req, deadline):
            chunk = log.read(1 << 20)
            if not chunk:
                try:                        # rotated: the path names a new file now
                    if os.stat(path).st_ino != inode:
                        log.close()
                        log = open(path, "rb")
                        inode = os.fstat(log.fileno()).st_ino
                        continue
                except FileNotFoundError:
                    pass
                time.sleep(0.3)
                continue
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                for st in canary_statuses(line.decode("utf-8", "replace"), ups):
                    answers += 1
                    seen[st] = seen.get(st, 0) + 1
                    errors += st.startswith("5")
            if too_many_5xx(errors, answers, req["max_5xx"], final=False):
                break
    finally:
        log.close()
    return {"ok": not too_many_5xx(errors, answers, req["max_5xx"], final=True),
            "answers": answers, "errors": errors, "statuses": seen,
            "stopped": time.monotonic() < deadline}


def op_finish(app, req, data):
    """States in the manifest (and the pre-migration backup of the release deployed), old
    releases pruned, the audit line, the lock released."""
    fd = hold(app, req["run_id"])
    if req.get("point"):            # blue-green: the flip is done, current names what is live
        point(app.current, req["point"])
        retire_single(app)
    live = app.live()
    gone = req.get("discard")
    if gone and gone != live:           # a prepared release whose deploy stopped before the switch
        shutil.rmtree(os.path.join(app.releases, gone), ignore_errors=True)
        app.save([e for e in app.manifest() if e["id"] != gone])
    entries = app.manifest()
    taken = req.get("backups") or {}     # what the database host saved before a release migrated
    for e in entries:
        new = req.get("states", {}).get(e["id"])
        if new:
            e["state"] = new
            e["%s_at" % new.replace("-", "_")] = now()
        if e["id"] in taken:
            e["backup"] = taken[e["id"]]
        if e["id"] == live and e["state"] in GOOD:
            e["state"] = "live"
        elif e["state"] == "live" and e["id"] != live:
            e["state"] = "retired"
    running = set(app.colour_links(req.get("colours")).values())
    pruned = prune(app, entries, {live} | running, req["keep"])
    app.save([e for e in entries if e["id"] not in pruned])
    line = dict(req["audit"], host=os.uname()[1], current=live)
    os.makedirs(os.path.dirname(req["audit_log"]), 0o750, exist_ok=True)
    with open(req["audit_log"], "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    os.close(fd)
    release_lock(app, req["run_id"])
    return {"ok": True, "pruned": pruned, "current": live, "manifest": app.manifest()}


def retire_single(app):
    """An app turned blue-green still runs its old pm2 app `<app>` (started by a deploy or
    role pm2, which left its stamp): once a colour is live it serves nothing, and in pm2's
    cluster mode it would share the blue port with <app>-blue. Deleted (and the list saved)."""
    stamp = "%s/.pm2/provisioner-%s.ecosystem.sha256" % (app.home, app.name)
    if os.path.exists(stamp):
        try:
            app.pm2("delete", app.name)
        except Fail:                    # not in pm2's list any more: nothing to stop
            pass
        app.pm2("save")
        os.unlink(stamp)


def prune(app, entries, running, keep):
    """The oldest releases beyond `keep`: never current or a colour's, never the newest good
    one."""
    ids = sorted(e["id"] for e in entries)
    good = sorted(e["id"] for e in entries if e["state"] in GOOD)
    protect = set(running) | {good[-1] if good else None}
    extra = [i for i in ids if i not in protect][:max(0, len(ids) - keep)]
    for rid in extra:
        shutil.rmtree(os.path.join(app.releases, rid), ignore_errors=True)
    return extra


def release_lock(app, run_id):
    holder = read_json(app.lock + "/owner.json") or {}
    if holder.get("run_id") == run_id:
        gone = "%s.done-%d" % (app.lock, os.getpid())
        os.rename(app.lock, gone)
        shutil.rmtree(gone, ignore_errors=True)


def op_unlock(app, req, data):
    """Release the lock: this run's (a failed deploy), or any (`deploy.unlock`, after asking)."""
    holder = read_json(app.lock + "/owner.json")
    if holder is None and not os.path.isdir(app.lock):
        return {"ok": True, "holder": None}
    if req.get("force"):
        if flock_held(app.busy):
            return {"ok": False, "holder": holder, "busy": True}
        gone = "%s.removed-%d" % (app.lock, os.getpid())
        os.rename(app.lock, gone)
        shutil.rmtree(gone, ignore_errors=True)
    else:
        release_lock(app, req["run_id"])
    return {"ok": True, "holder": holder}


def op_list(app, req, data):
    holder = read_json(app.lock + "/owner.json")
    return {"ok": True, "manifest": app.manifest(), "current": app.live(), "lock": holder}


# --- the database: backups before migrations, migrations, restores --------------------------

BACKUPS = "/var/backups/provisioner"
PRUNED_KEPT = 1000      # entries of pruned.json: what db.restore can still explain
POINT_NAME_MAX = 63     # PostgreSQL keeps this many characters of a restore point's name


def backup_path(app, release):
    return "%s/%s/before-%s.dump" % (BACKUPS, app.name, release)


def point_path(app, release):
    """The record of a restore point made before `release` migrated (op_restore_point)."""
    return "%s/%s/before-%s.json" % (BACKUPS, app.name, release)


def pruned_path(app):
    """{release: {at, size, kind, taken}} of the backups pruned with their releases (op
    prune_backups)."""
    return "%s/%s/pruned.json" % (BACKUPS, app.name)


def backup_folder(app):
    """The app's folder of pre-migration backups, postgres's alone. Returns postgres's passwd
    entry (pg_dump, psql and pgBackRest run as postgres)."""
    folder = "%s/%s" % (BACKUPS, app.name)
    os.makedirs(folder, 0o700, exist_ok=True)
    pg = pwd.getpwnam("postgres")
    for d in (BACKUPS, folder):
        os.chown(d, pg.pw_uid, pg.pw_gid)
        os.chmod(d, 0o700)
    return pg


def op_backup(app, req, data):
    """pg_dump -Fc of the app's database as postgres, named after the release about to
    migrate it: what `invoke db.restore --before RELEASE` restores."""
    path = backup_path(app, req["release"])
    pg = backup_folder(app)
    app.as_user(["pg_dump", "-Fc", "-f", path + ".tmp", req["database"]], user="postgres",
                home=pg.pw_dir, cwd="/")
    os.rename(path + ".tmp", path)
    return {"ok": True, "path": path, "size": os.path.getsize(path), "at": now()}


def point_name(app, release):
    """`<app>-<release>`, the app's name cut to fit: recovery stops at the first point of a
    name, and the release id (time and commit) keeps it unique."""
    room = POINT_NAME_MAX - len(release) - 1
    return "%s-%s" % (app.name[:max(room, 1)], release)


def current_sets(info, stanza):
    """(the stanza's backup sets of its current database, that database's major or None) from
    `pgbackrest info --output=json`. After a major upgrade and stanza-upgrade the older
    major's sets stay until retention expires them, but nothing of the new cluster can be
    replayed from them (db.restore refuses them: provisioner/backups.py check_restorable)."""
    entry = next((s for s in info if s.get("name") == stanza), {})
    sets = entry.get("backup") or []
    dbs = [d for d in entry.get("db") or [] if isinstance(d, dict)]
    if not dbs:                      # no history to tell them apart: every set counts
        return sets, None
    current = max(dbs, key=lambda d: d.get("id", 0))
    return [b for b in sets if (b.get("database") or {}).get("id") == current.get("id")], \
        str(current.get("version"))


def op_restore_point(app, req, data):
    """Instead of a dump, when the env's pgBackRest backs the database server up: a named
    restore point, recorded beside the dumps, that `db.restore --before` rewinds the cluster
    to. Without a backup set of the running cluster in the repository (none yet, or only the
    sets of the major before an upgrade) nothing could be replayed up to it: the answer says
    so (no_backup, and what is `missing`) and makes nothing. `pgbackrest check` then switches
    the WAL and waits, within archive_timeout seconds, until that segment is in the
    repository; PostgreSQL archives segments in order, so the restore point's is there too."""
    pg = backup_folder(app)
    stanza = req["stanza"]

    def postgres(argv, timeout=900):
        return app.as_user(argv, user="postgres", home=pg.pw_dir, cwd="/", timeout=timeout)
    # only the JSON on the output (as_user merges stderr into it): an error alone on stderr
    info = json.loads(postgres(["pgbackrest", "--stanza=" + stanza, "--log-level-console=off",
                                "--log-level-stderr=error", "--output=json", "info"]) or "[]")
    sets, major = current_sets(info, stanza)
    if not sets:
        older = next((s.get("backup") for s in info if s.get("name") == stanza), None)
        missing = ("no backup of its current cluster (PostgreSQL %s) yet, only of the one "
                   "before it (a major upgrade)" % major if older else "no backup yet")
        return {"ok": False, "no_backup": True, "missing": missing,
                "error": "stanza %s has %s in the repository: a restore point would have "
                         "nothing to be replayed from" % (stanza, missing)}
    name = point_name(app, req["release"])
    out = postgres(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-p", str(req["port"]),
                    "-d", req["database"], "-c",
                    "WITH p AS (SELECT pg_create_restore_point(%s) AS lsn) SELECT lsn, "
                    "pg_walfile_name(lsn), extract(epoch FROM clock_timestamp()) FROM p"
                    % sql_literal(name)])
    lsn, wal, epoch = out.strip().splitlines()[-1].split("|")
    try:
        postgres(["pgbackrest", "--stanza=" + stanza, "--log-level-console=off",
                  "--archive-timeout=%d" % req["archive_timeout"], "check"],
                 timeout=req["archive_timeout"] + 120)
    except Fail as e:
        raise Fail("restore point %s made, but the WAL holding it did not reach the repository "
                   "(%s); archiving must work before a migration can be undone: see `invoke "
                   "backup.status`. %s" % (name, wal, e))
    record = {"kind": "pgbackrest", "stanza": stanza, "name": name, "lsn": lsn, "wal": wal,
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(epoch))),
              "base": sets[-1].get("label")}
    path = point_path(app, req["release"])
    write_atomic(path, json.dumps(record, indent=1))
    return dict(record, ok=True, path=path)


def backups(app):
    """The pre-migration backups kept for the app, one list of both kinds: {release: {kind,
    path, at, size}}, a restore point's record with its own fields (op_restore_point)."""
    folder = "%s/%s" % (BACKUPS, app.name)
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not name.startswith("before-"):
            continue
        if name.endswith(".dump"):
            st = os.stat(path)
            found[name[len("before-"):-len(".dump")]] = {
                "kind": "dump", "path": path, "size": st.st_size,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))}
        elif name.endswith(".json"):
            record = read_json(path)
            if record:
                found[name[len("before-"):-len(".json")]] = dict(
                    record, path=path, size=os.path.getsize(path))
    return found


def op_backups(app, req, data):
    """The backups kept, and those pruned with their releases (db.restore names them)."""
    return {"ok": True, "backups": backups(app), "pruned": read_json(pruned_path(app)) or {}}


def dumps_to_prune(dumps, kept):
    """The dumps (release ids: the release each was taken before) that go with their releases:
    those older than every release a host of the app still keeps (`kept`: the ids in every
    host's manifest after its prune, and every current). So a dump stays while its release
    is on any host (current and the newest good one always are), and the dump of a release
    that never went anywhere (its migration failed: what db.restore is for) stays until the
    releases of its time are pruned. Nothing is known without a kept release: nothing goes.
    A restore point's record goes the same way (the WAL needs nothing removed)."""
    if not kept:
        return []
    oldest = min(kept)
    return sorted(d for d in dumps if d < oldest)


def op_prune_backups(app, req, data):
    """Remove the dumps and records dumps_to_prune() chooses; each one is recorded in
    pruned.json (the newest PRUNED_KEPT), so that db.restore can say it was pruned, and when."""
    found = backups(app)
    gone = dumps_to_prune(found, req["kept"])
    if not gone:
        return {"ok": True, "pruned": []}
    record = read_json(pruned_path(app)) or {}
    for release in gone:
        os.unlink(found[release]["path"])
        record[release] = {"at": now(), "size": found[release]["size"],
                           "kind": found[release]["kind"], "taken": found[release]["at"]}
    newest = sorted(record)[-PRUNED_KEPT:]
    write_atomic(pruned_path(app), json.dumps({r: record[r] for r in newest}, indent=1))
    return {"ok": True, "pruned": gone}


def op_restore(app, req, data):
    """pg_restore --clean of the backup taken before `release`, as postgres."""
    path = backup_path(app, req["release"])
    if not os.path.exists(path):
        raise Fail("no backup %s on this host" % path)
    pg = pwd.getpwnam("postgres")
    out = app.as_user(["pg_restore", "--clean", "--if-exists", "--single-transaction",
                       "-d", req["database"], path], user="postgres", home=pg.pw_dir, cwd="/")
    return {"ok": True, "path": path, "output": out[-2000:]}


def app_env(app):
    """The pm2 app's environment as its ecosystem file (role pm2) sets it: what the app sees."""
    eco = app.req.get("ecosystem") or app.root + "/ecosystem.config.js"
    out = app.as_user(["node", "-e", "const a = require(process.argv[1]).apps[0];"
                       "process.stdout.write(JSON.stringify(a.env || {}))", eco], cwd=app.root)
    return {str(k): str(v) for k, v in json.loads(out).items()}


def op_migrate(app, req, data):
    """The migrate (or migrate_down) command in a release, as the app user with the app's
    environment (secrets included, in the environment only)."""
    fd = hold(app, req["run_id"])
    where = os.path.join(app.releases, req["release"])
    env = app_env(app)
    env.update(req.get("env") or {})
    out = app.as_user(req["argv"], cwd=where, env=env)
    os.close(fd)
    return {"ok": True, "output": out[-4000:]}


# --- the load balancer's side of blue-green: the live colour files --------------------------

def op_colours(app, req, data):
    """The live files of the app's sites (their text, None when missing)."""
    return {"ok": True, "files": {p: read_text(p) for p in req["files"]}}


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def op_flip(app, req, data):
    """Write the live files (each beside itself, then renamed over it), check the whole
    configuration with `nginx -t`, reload nginx gracefully; a failed check puts the old
    files back and reloads nothing."""
    old = {p: read_text(p) for p in req["files"]}
    for path, text in req["files"].items():
        write_atomic(path, text)
    app.commands += 1
    check = subprocess.run(["nginx", "-t", "-q"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    if check.returncode != 0:
        for path, text in old.items():
            if text is None:
                os.unlink(path)
            else:
                write_atomic(path, text)
        raise Fail("nginx -t refused the flip (old files kept):\n%s"
                   % check.stdout.decode("utf-8", "replace")[-2000:])
    app.commands += 1
    subprocess.run(["systemctl", "reload", "nginx"], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    return {"ok": True, "before": old}


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


OPS = {"colours": op_colours, "flip": op_flip,
       "backup": op_backup, "restore_point": op_restore_point, "backups": op_backups,
       "prune_backups": op_prune_backups,
       "restore": op_restore, "migrate": op_migrate,
       "lock": op_lock, "switch": op_switch, "finish": op_finish, "unlock": op_unlock,
       "list": op_list, "watch": op_watch, "watch_5xx": op_watch_5xx,
       "stop_watch": op_stop_watch}


def main(req, data):
    started = time.monotonic()
    app = App(req)
    try:
        answer = OPS[req["op"]](app, req, data)
    except Fail as e:
        answer = {"ok": False, "error": str(e)}
    except Exception as e:
        answer = {"ok": False, "error": "%s: %s" % (type(e).__name__, e),
                  "traceback": traceback.format_exc()}
    answer.update(commands=app.commands, seconds=round(time.monotonic() - started, 3))
    sys.stdout.write(MARKER + json.dumps(answer) + "\n")
    sys.stdout.flush()


if __name__ == "__provisioner_deploy__":
    main(REQ, DATA)  # noqa: F821  (given by the bootstrap: the request and the rest of stdin)

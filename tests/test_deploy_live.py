"""`invoke deploy`, `rollback`, `releases` and `deploy.unlock` on the testbed, as a user runs
them: the sample app from a scratch git repository made here (one commit per version), shipped
to web1 and web2 while a bounded load goes through lb1 (a fixed count of requests, each with a
timeout, stopped early once the last operation is done)."""
from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import engine_helpers
from bluegreen_env import PORTS as COLOUR_PORT
from bluegreen_env import blue_green_env
from conftest import REPO, invoke
from derived_env import NO_BACKUP_EDITS, NO_BACKUPS, derived_env
from engine_helpers import ADDRESSES, sh, wait_for
from http_load import Connection, get, load, trusting
from provisioner.testbed import acme

WEB = ("web1", "web2")
NAME = "app.test"
# per load: an upper bound (a few minutes at the testbed's rate); each load stops once its
# operations are done, and the tests check that they were done before the bound
MAX_REQUESTS = 400000


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=test", "-c",
                           "user.email=test@example.com", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The sample app at eight commits: v1; v2 (another answer, same package-lock.json); broken
    (its /health answers 500 on web2 only); slow (a new package-lock.json and an install that
    takes 40 s: a window to kill a deploy in); destructive (v1 + a migration that deletes the
    first note); tag (v1 + a migration that adds a column, and its down migration); sickening
    (v1 whose /health answers 500 once a process is 8 s old: past the gate, within a canary's
    hold); erring (v1 whose / answers 503 on web1: nginx retries on web2, its log keeps the 503)."""
    repo = tmp_path_factory.mktemp("sample-repo") / "sample-app"
    shutil.copytree(REPO / "examples" / "sample-app", repo)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    commits = {}

    def commit(label):
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", label)
        commits[label] = _git(repo, "rev-parse", "HEAD")
    commit("v1")
    server = (repo / "server.js").read_text()
    (repo / "server.js").write_text(server.replace("`sample-app ${appVersion}\\n`",
                                                   "`sample-app ${appVersion} v2\\n`"))
    commit("v2")
    (repo / "server.js").write_text(server.replace(
        "if (req.method === 'GET' && url === '/health') {",
        "if (req.method === 'GET' && url === '/health' && require('os').hostname() === 'web2') {"
        "\n    res.writeHead(500); res.end('broken on purpose\\n'); return;\n  }\n"
        "  if (req.method === 'GET' && url === '/health') {"))
    commit("broken")
    (repo / "server.js").write_text(server)
    pkg = json.loads((repo / "package.json").read_text())
    pkg["scripts"]["postinstall"] = "sleep 40"
    pkg["version"] = "1.0.1"
    (repo / "package.json").write_text(json.dumps(pkg, indent=2) + "\n")
    lock = json.loads((repo / "package-lock.json").read_text())
    lock["version"] = lock["packages"][""]["version"] = "1.0.1"
    (repo / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
    commit("slow")
    (repo / "package.json").write_bytes((REPO / "examples" / "sample-app" / "package.json").read_bytes())
    (repo / "package-lock.json").write_bytes(
        (REPO / "examples" / "sample-app" / "package-lock.json").read_bytes())
    (repo / "migrations" / "002_forget_the_first_note.js").write_text(
        "module.exports = {\n  async up(db) { await db.query(\"DELETE FROM notes WHERE body = "
        "'first note'\"); },\n  async down(db) {},\n};\n")
    commit("destructive")
    (repo / "migrations" / "002_forget_the_first_note.js").unlink()
    (repo / "migrations" / "002_tag.js").write_text(
        "module.exports = {\n  async up(db) { await db.query('ALTER TABLE notes ADD COLUMN tag "
        "text'); },\n  async down(db) { await db.query('ALTER TABLE notes DROP COLUMN tag'); },\n};\n")
    commit("tag")
    (repo / "migrations" / "002_tag.js").unlink()
    (repo / "server.js").write_text(server.replace(
        "if (req.method === 'GET' && url === '/health') {",
        "if (req.method === 'GET' && url === '/health' && process.uptime() > 8) {"
        "\n    res.writeHead(500); res.end('sick on purpose\\n'); return;\n  }\n"
        "  if (req.method === 'GET' && url === '/health') {"))
    commit("sickening")
    (repo / "server.js").write_text(server.replace(
        "if (req.method === 'GET' && url === '/') {",
        "if (req.method === 'GET' && url === '/' && require('os').hostname() === 'web1') {"
        "\n    res.writeHead(503); res.end('erring on purpose\\n'); return;\n  }\n"
        "  if (req.method === 'GET' && url === '/') {"))
    commit("erring")
    (repo / "server.js").write_text(server)
    return repo, commits


@pytest.fixture(scope="module")
def fleet(local_env):
    """web1, web2, db1 and lb1 provisioned, the sample app live (conftest's shared env) and
    served through lb1. Until the env's first deploy, mon1's probes through lb1 found no app:
    nginx counts both app servers failed and passes them nothing for its fail_timeout (10 s;
    15 s were seen), so a load begun right after that deploy gets "no live upstreams" (502)."""
    assert local_env["deploy"].returncode == 0, local_env["deploy"].stderr[-3000:]

    def served() -> bool:
        try:
            return all(get(lb(), "/health").status == 200 for _ in range(4))
        except OSError:
            return False
    wait_for("lb1 to pass requests to the app servers", served, 60, every=1)
    return WEB


def deploy(repo, ref, *more, task="deploy", env="local"):
    args = [task, "--env", env, "--yes", *more]
    if task == "deploy":
        args += ["--source", str(repo), "--ref", ref]
    t0 = time.monotonic()
    r = invoke(*args, check=False, timeout=600)
    r.seconds = time.monotonic() - t0
    print(f"\ninvoke {' '.join(args)}: exit {r.returncode} in {r.seconds:.1f} s\n{r.stdout}{r.stderr}")
    return r


def deploy_in_background(repo, ref, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`invoke deploy` of REF from REPO, running while the test acts on the servers."""
    return subprocess.Popen([sys.executable, "-m", "invoke", "deploy", "--env", "local", "--yes",
                             "--source", str(repo), "--ref", ref], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def health(host: str, port: int = 3000) -> dict:
    out = sh(host, "python3 -c \"import urllib.request as u; print(u.urlopen("
                   f"'http://127.0.0.1:{port}/health', timeout=5).read().decode())\"").stdout
    return json.loads(out)


def healthy_on(release: str) -> bool:
    """Every app host answers its health check (which asks the database) with `release`."""
    try:
        return all(health(h)["release"] == release for h in WEB)
    except Exception:                  # the check's request failed: not healthy yet
        return False


def current(host: str) -> str:
    return sh(host, "readlink /srv/sample/current").stdout.strip().rpartition("/")[2]


def releases(env: str = "local") -> dict:
    return json.loads(invoke("releases", "--env", env, "--json").stdout)["hosts"]


def backup_of(release: str, env: str = "local") -> dict:
    """The pre-migration backup `invoke releases --json` shows for `release`, the same on
    every app host."""
    seen = [{e["id"]: e["backup"] for e in h["releases"]}[release]
            for h in releases(env).values()]
    assert all(b == seen[0] for b in seen), seen
    return seen[0]


def lb() -> Connection:
    return Connection(NAME, ADDRESSES["lb1"], trusting(str(acme.ROOT_FILE)))


def through_lb(ops, retry_closed: bool = False) -> tuple:
    """A bounded load through lb1 while ops() runs (it starts after 200 requests).
    retry_closed: a GET on a kept-alive connection nginx closed at a reload is sent again, as
    clients do (see http_load.load)."""
    done = threading.Event()
    results = []

    def run():
        try:
            results.append(ops())
        finally:
            done.set()
    result = load(lb, MAX_REQUESTS, threads=3, at={200: run}, until=done,
                  retry_closed=retry_closed)
    print(f"\nload through lb1: {result.summary()}")
    assert len(result.statuses) < MAX_REQUESTS, "the load ended before the operations did"
    return result, results[0] if results else None


def test_deploys_and_a_rollback_under_load_lose_no_request(fleet, repo):
    repo, commits = repo
    first = deploy(repo, commits["v1"])              # whatever ran before: v1 is live now
    assert first.returncode == 0
    v1 = current("web1")

    def ops():
        steps = []
        for ref in ("v2", "v1"):
            r = deploy(repo, commits[ref])
            steps.append((ref, r.returncode, {h: health(h)["release"] for h in WEB},
                          {h: current(h) for h in WEB}, r.stdout))
            if ref == "v2":
                back = deploy(repo, None, task="rollback")
                steps.append(("rollback", back.returncode, {h: health(h)["release"] for h in WEB},
                              {h: current(h) for h in WEB}, back.stdout))
        return steps
    result, steps = through_lb(ops)
    assert result.failed == [], result.failed[:5]
    assert len(steps) == 3
    (_, code2, health2, cur2, out2), (_, code_rb, health_rb, _, _), (_, code1, health1, cur1, out1) = steps
    assert (code2, code_rb, code1) == (0, 0, 0)
    v2 = cur2["web1"]
    assert v2.endswith(commits["v2"][:12]) and cur2["web2"] == v2 and set(health2.values()) == {v2}
    assert set(health_rb.values()) == {v1}, "the rollback goes back to the release before v2"
    new_v1 = cur1["web1"]
    assert new_v1 != v1 and new_v1.endswith(commits["v1"][:12]) and set(health1.values()) == {new_v1}
    # the same package-lock.json: node_modules is not installed again
    assert "npm ci" not in out2 and out2.count("node_modules hard-linked from") == 2, out2
    # the reload found the app's own processes by the cwd pm2 keeps (pm_cwd) and its
    # ecosystem file's: not one of them would have been a `pm2 start` (a restart, not a reload)
    assert out2.count("pm2 reloaded") == 2 and "pm2 started" not in out2, out2
    states = {e["id"]: e["state"] for e in releases()["web2"]["releases"]}
    assert (states[new_v1], states[v2], states[v1]) == ("live", "rolled-back", "retired")


# On the server: GETs on loopback, each on a connection of its own (every one handed to a pm2
# worker), from 8 threads, each with a 4 s timeout, until /tmp/storm.stop exists or 120 s
# passed; then one line of JSON: answered, unanswered (timed out), failed (and the first
# failures: an app that is down fails fast, so they are not all kept).
STORM = r"""
import json, os, socket, threading, time
end, lock = time.monotonic() + 120, threading.Lock()
out = {"answered": 0, "unanswered": 0, "failed": 0, "first_failures": []}
def run():
    while time.monotonic() < end and not os.path.exists("/tmp/storm.stop"):
        try:
            with socket.create_connection(("127.0.0.1", 3000), timeout=4) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: storm\r\nConnection: close\r\n\r\n")
                data = b"".join(iter(lambda: s.recv(65536), b""))
            key = "answered" if data.startswith(b"HTTP/1.1 200") else None
        except socket.timeout:
            key = "unanswered"
        except OSError as e:
            key, data = None, repr(e).encode()
        with lock:
            out[key or "failed"] += 1
            if not key and len(out["first_failures"]) < 5:
                out["first_failures"].append(data[:60].decode("utf-8", "replace"))
threads = [threading.Thread(target=run) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(out))
"""


def test_pm2_reloads_under_a_storm_of_new_connections_leave_none_unanswered(fleet, repo):
    """Each new connection to the app is accepted by a worker itself (the listening socket is
    the workers', not pm2's daemon's): with Node's round-robin, pm2's daemon passed 15-24
    connections in 20 reloads to a worker that was exiting, never answered. Eight reloads the
    deploy's way (PM2_RELOAD) on both releases' web hosts at once, under that storm."""
    from provisioner.remote.deploy import PM2_RELOAD
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0

    def shipped(text, path):            # a file on the server, without quoting its text
        return f"echo {base64.b64encode(text.encode()).decode()} | base64 -d > {path}"
    script = " && ".join((
        shipped(STORM, "/tmp/storm.py"), shipped(PM2_RELOAD, "/tmp/pm2-reload.js"),
        "chmod 644 /tmp/pm2-reload.js", "rm -f /tmp/storm.stop")) + (
        "; python3 /tmp/storm.py > /tmp/storm.out & storm=$!; sleep 1; cd /home/app;"
        " for i in 1 2 3 4 5 6 7 8; do runuser -u app -- env -i HOME=/home/app"
        " PM2_HOME=/home/app/.pm2 PATH=/usr/bin:/bin node -e \"$(cat /tmp/pm2-reload.js)\""
        " /usr/local/lib/node_modules/pm2 sample /srv/sample/ecosystem.config.js || break; done;"
        " touch /tmp/storm.stop; wait $storm; cat /tmp/storm.out; ss -Hltnp 'sport = :3000'")
    outs = {}

    def storm(host):
        outs[host] = sh(host, script, timeout=300).stdout
    threads = [threading.Thread(target=storm, args=(h,)) for h in WEB]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for host in WEB:
        lines = outs[host].splitlines()
        assert [json.loads(line) for line in lines if line.startswith('{"reloaded"')] \
            == [{"reloaded": 2}] * 8, outs[host]
        result = json.loads(next(line for line in lines if line.startswith('{"answered"')))
        print(f"\n{host}: {result['answered']} answered during 8 reloads")
        assert result["answered"] > 1000 and result["failed"] == 0, (host, result)
        assert result["unanswered"] == 0, (host, result)
        listening = [line for line in lines if "LISTEN" in line]
        assert len(listening) == 1 and listening[0].count('"node /srv/sampl') == 2, lines


def test_a_failed_health_gate_switches_the_whole_fleet_back(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    before = {h: current(h) for h in WEB}

    result, r = through_lb(lambda: deploy(repo, commits["broken"]))
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "web2 | sample | switch" in out and "health gate failed" in out and "500" in out, out
    assert "switched back to " + before["web2"] in out
    # web1 had passed its gate: it went back too, the fleet runs one release
    assert {h: current(h) for h in WEB} == before
    assert {h: health(h)["release"] for h in WEB} == before
    assert result.failed == [], result.failed[:5]
    broken = [e for e in releases()["web1"]["releases"] if e["commit"] == commits["broken"]]
    assert [e["state"] for e in broken] == ["failed"]
    again = deploy(repo, None, task="rollback")     # a failed release is never a target
    assert broken[0]["id"] not in again.stdout


def test_a_second_deploy_exits_4_and_a_killed_one_is_cleaned_and_taken_over(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    before = {h: current(h) for h in WEB}
    slow = deploy_in_background(repo, commits["slow"], stderr=subprocess.STDOUT)
    try:
        wait_for("the slow deploy's install", lambda: all(
            sh(h, "ls -d /srv/sample/releases/*.building", check=False).returncode == 0 for h in WEB), 60)
        second = deploy(repo, commits["v2"])
        assert second.returncode == 4
        err = second.stderr
        assert "deploy lock of sample held by" in err and "started 20" in err and "pid" in err, err
        slow.send_signal(signal.SIGKILL)                 # kill -9 during prepare
        slow.wait(timeout=10)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert {h: current(h) for h in WEB} == before
    # the helper on each server sees its controller gone: it stops npm and removes the half
    # release; the lock stays, with who and when, until the next deploy takes it over
    wait_for("the half releases to go", lambda: all(
        sh(h, "ls -d /srv/sample/releases/*.building", check=False).returncode != 0 for h in WEB), 20)
    assert all(releases()[h]["lock"] for h in WEB)
    after = deploy(repo, commits["v2"])
    assert after.returncode == 0
    assert after.stdout.count("took over the lock of a dead run") == 2, after.stdout
    assert {h: health(h)["release"] for h in WEB} == {h: current(h) for h in WEB}
    assert all(not releases()[h]["lock"] for h in WEB)


def test_unlock_shows_and_removes_a_lock_a_deploy_elsewhere_left(fleet, repo):
    owner = {"run_id": "0" * 32, "who": "alice", "from": "laptop", "pid": 4242, "task": "deploy",
             "env": "local", "started": "2026-06-01T10:00:00+00:00", "started_epoch": time.time(),
             "ttl": 3600}
    sh("web1", f"mkdir /srv/sample/.deploy.lock && echo '{json.dumps(owner)}' "
               "> /srv/sample/.deploy.lock/owner.json")
    try:
        r = deploy(*repo, task="rollback")
        assert r.returncode == 4 and "alice@laptop (pid 4242)" in r.stderr
        assert "started 2026-06-01T10:00:00" in r.stderr
        assert releases()["web2"]["lock"] is None, "the lock taken on web2 was given back"
        out = invoke("deploy.unlock", "--env", "local", "--yes").stdout
        assert "web1: held by alice@laptop" in out and "web1: lock removed" in out
    finally:
        sh("web1", "rm -rf /srv/sample/.deploy.lock")


def test_no_secret_in_the_output_at_vvv(fleet, repo):
    repo, commits = repo
    secrets = json.loads(invoke("vault.view", "--env", "local", "--reveal").stdout)
    assert secrets
    r = deploy(repo, commits["v2"], "-vvv")
    assert r.returncode == 0
    out = r.stdout + r.stderr + invoke("releases", "--env", "local", "--json").stdout
    assert "npm" in out or "health" in out
    leaked = [name for name, value in secrets.items() if value in out]
    assert leaked == []


def psql(sql: str, db: str = "app") -> str:
    return engine_helpers.psql("db1", sql, db)


FIRST_NOTE = "SELECT count(*) FROM notes WHERE body = 'first note'"


def db_restore(env: str, release: str, *more: str):
    """`invoke db.restore` without a terminal, as in CI: it asks nothing, --yes or exit 2."""
    return invoke("db.restore", "--env", env, "--before", release, *more, check=False,
                  timeout=900, stdin=subprocess.DEVNULL)


def test_the_first_deploy_took_db1s_first_full_backup_before_its_restore_point(local_env):
    """conftest's local_env deploys to fresh servers: the stanza has no backup yet, so the
    deploy starts vault's full backup unit and waits for it in bounded polls (no exec as long
    as the backup) before it makes the restore point and migrates."""
    r = local_env["deploy"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stanza db1 had no backup yet: took a full one on vault first; restore point " \
        "sample-" in r.stdout, r.stdout[-3000:]


def test_a_destructive_migration_is_undone_by_db_restore(fleet, repo):
    """The local env backs db1 up with pgBackRest: the deploy makes a restore point instead of
    a dump, and db.restore rewinds the whole cluster to it."""
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    assert psql(FIRST_NOTE) == "1"
    r = deploy(repo, commits["destructive"])
    assert r.returncode == 0
    release = current("web1")
    point = f"sample-{release}"
    assert "up 002_forget_the_first_note.js" in r.stdout, r.stdout
    assert f"restore point {point} at " in r.stdout and "archived to vault, stanza db1" in r.stdout
    assert "saved to /var/backups" not in r.stdout, "no pg_dump where pgBackRest runs"
    shown = backup_of(release)
    assert (shown["kind"], shown["host"], shown["name"], shown["stanza"]) == (
        "pgbackrest", "db1", point, "db1"), shown
    assert psql(FIRST_NOTE) == "0"
    # written after the point in another database: the rewind takes the whole cluster back
    psql("DROP TABLE IF EXISTS after_the_point; CREATE TABLE after_the_point (n int)",
         db="postgres")
    refused = db_restore("local", release)
    assert refused.returncode == 2 and "pass --yes" in refused.stderr      # never without asking
    assert "Rewind the WHOLE PostgreSQL cluster on db1" in refused.stderr, refused.stderr
    assert f"to restore point {point}" in refused.stderr and psql(FIRST_NOTE) == "0"
    done = db_restore("local", release, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored and promoted" in done.stderr
    assert f"rewound the PostgreSQL cluster on db1 to restore point {point}" in done.stdout
    assert psql(FIRST_NOTE) == "1"
    assert psql("SELECT count(*) FROM pg_tables WHERE tablename = 'after_the_point'",
                db="postgres") == "0"
    wait_for("the app's health (its database check) after the rewind",
             lambda: healthy_on(release), 60)


@pytest.fixture(scope="module")
def unbacked(fleet):
    """env localnb: local without the pgbackrest role, on the same servers. Nothing to
    provision: only the deploy and db.restore read which roles the database server has."""
    with derived_env(NO_BACKUPS, NO_BACKUP_EDITS) as env:
        yield env


def test_without_backup_roles_the_deploy_dumps_and_db_restore_restores_the_dump(unbacked, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"], env=unbacked).returncode == 0
    assert psql(FIRST_NOTE) == "1"
    r = deploy(repo, commits["destructive"], env=unbacked)
    assert r.returncode == 0
    release = current("web1")
    assert "up 002_forget_the_first_note.js" in r.stdout, r.stdout
    assert f"saved to /var/backups/provisioner/sample/before-{release}.dump" in r.stdout
    assert "restore point" not in r.stdout
    shown = backup_of(release, unbacked)
    assert (shown["kind"], shown["host"], shown["path"]) == (
        "dump", "db1", f"/var/backups/provisioner/sample/before-{release}.dump"), shown
    assert shown["size"] > 0
    assert psql(FIRST_NOTE) == "0"
    refused = db_restore(unbacked, release)
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert "database app on db1" in refused.stderr and "taken 20" in refused.stderr
    done = db_restore(unbacked, release, "--yes")
    assert "restored database app on db1" in done.stdout, done.stdout + done.stderr
    assert psql(FIRST_NOTE) == "1"


def test_rollback_with_migrations_runs_the_down_migration(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    v1 = current("web1")
    assert deploy(repo, commits["tag"]).returncode == 0
    assert psql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' "
                "AND column_name = 'tag'") == "1"
    r = deploy(repo, None, "--with-migrations", task="rollback")
    assert r.returncode == 0 and "down 002_tag.js" in r.stdout
    assert psql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' "
                "AND column_name = 'tag'") == "0"
    assert {h: health(h)["release"] for h in WEB} == {h: v1 for h in WEB}


def test_a_host_cut_off_mid_rollout_exits_3_and_the_fleet_stays_on_one_release(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    before = {h: current(h) for h in WEB}
    rollout = deploy_in_background(repo, commits["v2"])
    try:
        wait_for("web1's switch", lambda: current("web1") != before["web1"], 120)
        invoke("testbed.cut", "web2")                  # while web1 switches (serial 1)
        out, err = rollout.communicate(timeout=300)
    finally:
        if rollout.poll() is None:
            rollout.kill()
        invoke("testbed.heal", "web2")
    print(out, err)
    assert rollout.returncode == 3
    assert "web2 unreachable during the rollout" in err and "web1 on the release it ran before" in err
    assert current("web1") == before["web1"] and current("web2") == before["web2"]
    assert {h: health(h)["release"] for h in WEB} == before
    after = deploy(repo, commits["v1"])            # takes over the lock the cut left on web2
    assert after.returncode == 0 and "took over the lock of a dead run" in after.stdout


# --- canaries (deploy --canary N): web1 first, held, watched; web2 follows or nothing moves ---

def test_a_healthy_canary_is_held_then_the_rest_follows(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    result, r = through_lb(lambda: deploy(repo, commits["v2"], "--canary", "1",
                                          "--canary-hold", "5", "-v"))   # -v: ok steps too
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "healthy through the 5 s hold" in out and "lb1 logged " in out, out
    assert " of 0 answers" not in out, "the load reached the canary and lb1 counted it"
    v2 = current("web1")
    assert v2.endswith(commits["v2"][:12]) and current("web2") == v2
    assert {h: health(h)["release"] for h in WEB} == {h: v2 for h in WEB}
    assert result.failed == [], result.failed[:5]


def test_a_canary_turning_unhealthy_switches_back_and_exits_1(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    before = {h: current(h) for h in WEB}
    t0 = time.monotonic()
    result, r = through_lb(lambda: deploy(repo, commits["sickening"], "--canary", "1",
                                          "--canary-hold", "20"))
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "canary web1 turned unhealthy during the hold" in out and "500 sick on purpose" in out
    assert "switched back: web1" in out, out
    assert {h: current(h) for h in WEB} == before, "web2 never moved; web1 went back"
    assert {h: health(h)["release"] for h in WEB} == before
    sick = [e for e in releases()["web1"]["releases"] if e["commit"] == commits["sickening"]]
    assert [e["state"] for e in sick] == ["failed"]
    assert result.failed == [], result.failed[:5]
    print(f"canary caught and switched back in {time.monotonic() - t0:.1f} s")


def test_a_canary_over_the_5xx_threshold_switches_back_and_exits_1(fleet, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"]).returncode == 0
    before = {h: current(h) for h in WEB}
    result, r = through_lb(lambda: deploy(repo, commits["erring"], "--canary", "1",
                                          "--canary-hold", "60"))
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "lb1 logged" in out and "x 503" in out and "(limit 1 %)" in out, out
    assert {h: current(h) for h in WEB} == before
    # nginx retried every 503 on web2: the load saw none of them
    assert result.failed == [], result.failed[:5]


# --- blue-green (strategy: blue-green): last in this module, they convert the sample app -----

@pytest.fixture(scope="module")
def bluegreen(fleet):
    """env localbg: the sample app deployed blue-green on the same servers (bluegreen_env)."""
    def provision(env):
        invoke("provision", "--env", env, "--limit", "app,lb", "--yes", timeout=3000)
    with blue_green_env(provision) as env:
        yield env


def through_lb_health() -> str:
    """The release lb1 serves (its /health, through nginx)."""
    return json.loads(get(lb(), "/health").body)["release"]


def flip_seconds(out: str) -> float:
    """The seconds of the flip step (`-> <colour> (nginx -t, reload) in X s`)."""
    import re
    found = re.findall(r"\(nginx -t, reload\) in ([0-9.]+) s", out)
    assert found, out
    return max(map(float, found))


def test_blue_green_deploys_and_a_flip_back_lose_no_request(bluegreen, repo):
    repo, commits = repo
    first = deploy(repo, commits["v1"], env=bluegreen)   # the first: green; `sample` retires
    assert first.returncode == 0, first.stdout + first.stderr
    v1 = current("web1")
    assert through_lb_health() == v1

    def ops():
        steps = []
        r = deploy(repo, commits["v2"], env=bluegreen)
        steps.append(("v2", r.returncode, through_lb_health(), r.stdout + r.stderr, current("web2")))
        t0 = time.monotonic()
        back = deploy(repo, None, task="rollback", env=bluegreen)
        steps.append(("rollback", back.returncode, through_lb_health(), back.stdout + back.stderr,
                      time.monotonic() - t0))
        return steps
    result, steps = through_lb(ops, retry_closed=True)
    (_, code2, live2, out2, v2), (_, code_rb, live_rb, out_rb, rb_seconds) = steps
    assert (code2, code_rb) == (0, 0), out2 + out_rb
    # `current` follows the flip: read after the v2 deploy, before the rollback flipped back
    assert v2.endswith(commits["v2"][:12]) and live2 == v2
    assert live_rb == v1, "the rollback flipped back to the colour still running v1"
    assert "| switch" not in out_rb, "a rollback to what the old colour runs is only a flip"
    # both colours run: each answers on its own port with its own release
    assert {health(h, COLOUR_PORT["green"])["release"] for h in WEB} == {v1}
    assert {health(h, COLOUR_PORT["blue"])["release"] for h in WEB} == {v2}
    assert {h: current(h) for h in WEB} == {h: v1 for h in WEB}
    states = {e["id"]: e["state"] for e in releases()["web1"]["releases"]}
    assert (states[v1], states[v2]) == ("live", "rolled-back")
    print(f"\nrollback (a flip): {rb_seconds:.2f} s in all, the flip on lb1 "
          f"{flip_seconds(out_rb):.2f} s; load retried {result.retried} GET(s) on a new "
          "connection after nginx's reloads")
    assert result.failed == [], result.failed[:5]


def test_a_blue_green_release_failing_its_gate_is_never_served(bluegreen, repo):
    repo, commits = repo
    assert deploy(repo, commits["v1"], env=bluegreen).returncode == 0
    live = current("web1")
    idle = next(c for c, port in COLOUR_PORT.items() if health("web1", port)["release"] != live)
    idle_before = {h: health(h, COLOUR_PORT[idle]) for h in WEB}
    result, r = through_lb(lambda: deploy(repo, commits["broken"], env=bluegreen),
                           retry_closed=True)
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert f"web2 | sample | switch {idle}" in out and "health gate failed" in out, out
    assert "flip to" not in out, "nothing flipped"
    assert through_lb_health() == live and {h: current(h) for h in WEB} == {h: live for h in WEB}
    # the idle colour went back to what it ran: still the way back for a rollback
    assert {h: health(h, COLOUR_PORT[idle])["release"] for h in WEB} == \
        {h: a["release"] for h, a in idle_before.items()}
    broken = [e for e in releases()["web1"]["releases"] if e["commit"] == commits["broken"]]
    assert [e["state"] for e in broken] == ["failed"]
    assert result.failed == [], result.failed[:5]

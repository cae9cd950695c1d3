"""pgBackRest with a dedicated repository host: the repository lives on the backup server
(`pgbackrest_repo_host`), which runs every backup and reaches each database server over SSH as
its postgres user; a database server pushes its WAL to the repository (archive_command) and
restores from it, but cannot log in there as anything but a restricted pgBackRest command, and
holds no cipher key.

The same role runs on both sides; which side a host is comes from the inventory alone. Both
hosts' SSH key pairs derive from one vault secret (see provisioner/sshkeys.py: each host's run
writes its half, with no round trip between them) and every known_hosts entry comes from the
inventory's known_hosts, so nothing is trusted on first sight. The repository host runs one
systemd service + timer per stanza and backup kind, through backupjob.py (no overlapping runs,
a status file and node exporter metrics per job, failures in the journal).

pgBackRest refuses a remote of another version (Debian 12 has 2.45, 13 has 2.55): every host
must run `pgbackrest_version`, checked from the package facts before anything is installed.

What hardening needs besides this role: the database and repository hosts in each other's
`harden_trusted_sources` (pgBackRest opens an SSH connection per WAL segment, more than ufw's
rate limit lets through), and the users here join `harden_ssh_group` (sshd AllowGroups).
"""
from __future__ import annotations

import json
import re
import runpy
from dataclasses import dataclass
from pathlib import Path

from provisioner.api import (Change, Noop, PlanError, apt, files, handler, is_secret,
                             known_host_lines, reject, render, run_step, ssh_keypair, systemd, templates,
                             users)
from roles import postgresql as pg

HERE = Path(__file__).resolve().parent
JOB_SOURCE = (HERE / "backupjob.py").read_text(encoding="utf-8")
DRILL_SOURCE = (HERE / "drill.py").read_text(encoding="utf-8")
backupjob = runpy.run_path(str(HERE / "backupjob.py"), run_name="backupjob")   # shared parsing
STANZA_CHECK_SOURCE = (HERE / "stanzacheck.py").read_text(encoding="utf-8")
stanzacheck = runpy.run_path(str(HERE / "stanzacheck.py"), run_name="stanzacheck")   # exit codes
TOOL_DIR = "/usr/local/lib/provisioner"
JOB = f"{TOOL_DIR}/backupjob.py"
DRILL = f"{TOOL_DIR}/drill.py"
# The known_hosts beside it comes from the inventory: ssh must neither trust a key on first
# sight nor rewrite the file (UpdateHostKeys, on by default, drops the key types a hardened
# peer no longer serves: the next run would find the file changed).
SSH_CONFIG = ("# Managed by provisioner (role pgbackrest)\nHost *\n    StrictHostKeyChecking yes\n"
              "    UpdateHostKeys no\n    BatchMode yes\n")
DRILL_DIR = "/var/lib/pgbackrest-drill"
REPO_USER = "pgbackrest"
KINDS = ("full", "diff", "incr")
COMPRESS = ("zst", "lz4", "gz", "bz2", "none")
RESTART = "restart postgresql for archiving"
VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\Z")
# repo-block is a beta in 2.45 and final from 2.46; the user guide recommends 2.52.1 or later, and
# before 2.54.2 turning it off again made the backup set's earlier bundles unreadable. Versions
# here are major.minor: 2.55 is the first all of whose releases have both
BLOCK_SINCE = (2, 55)
CALENDAR_RE = re.compile(r"^[A-Za-z0-9 *:.,/~+-]{1,100}\Z")
# what a key may do when it logs in: run pgBackRest (its remote protocol), nothing else
RESTRICT = ('no-agent-forwarding,no-X11-forwarding,no-port-forwarding,no-pty,'
            'command="/usr/bin/pgbackrest ${SSH_ORIGINAL_COMMAND#* }"')


@dataclass(frozen=True)
class Stanza:
    """One database server as the repository host sees it."""
    name: str               # the inventory host name
    address: str
    version: str | None     # PostgreSQL major (None before the server's Debian is known)
    data: str | None
    port: int
    databases: tuple[str, ...] = ()   # the app databases the inventory declares there


def check(v, ctx) -> dict:
    """Every var judged from the inventory alone; returns the side this host is on and its
    peers."""
    inv, host = ctx.inventory, ctx.host
    repo = v["pgbackrest_repo_host"]
    if repo not in inv.hosts:
        reject("pgbackrest_repo_host", f"{repo!r} is not a host of the inventory"
               if repo else "is not set", "name the backup server, e.g. pgbackrest_repo_host: "
               "vault (set it env-wide: both sides read it)")
    group = v["pgbackrest_db_group"]
    if group not in inv.groups:
        reject("pgbackrest_db_group", f"no group {group!r} in the inventory",
               f"name the database servers' group (groups: {', '.join(inv.groups)})")
    if not VERSION_RE.match(str(v["pgbackrest_version"])):
        reject("pgbackrest_version", f"{v['pgbackrest_version']!r} is not a version like 2.55",
               "write the major.minor every host of the repository runs")
    for var in ("pgbackrest_cipher_pass", "pgbackrest_ssh_seed"):
        if not is_secret(v[var]) or len(v[var].reveal()) < 20:
            reject(var, "must be a secret of 20 characters or more from the vault",
                   f"write `{var}: !vault {var[len('pgbackrest_'):]}` and set it with "
                   "`invoke vault.set` (a long random value)")
    if not re.fullmatch(r"/[A-Za-z0-9_./-]+", v["pgbackrest_repo_path"]) \
            or ".." in v["pgbackrest_repo_path"]:
        reject("pgbackrest_repo_path", f"{v['pgbackrest_repo_path']!r} is not an absolute path",
               "write e.g. /var/lib/pgbackrest")
    days = v["pgbackrest_retention_days"]
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
        reject("pgbackrest_retention_days", f"{days!r} is not a number of days (1-3650)",
               "write e.g. 30")
    if v["pgbackrest_compress_type"] not in COMPRESS:
        reject("pgbackrest_compress_type", f"{v['pgbackrest_compress_type']!r} is unknown",
               f"choose one of {', '.join(COMPRESS)}")
    for var, lo, hi in (("pgbackrest_process_max", 1, 64), ("pgbackrest_archive_timeout", 0, 3600),
                        ("pgbackrest_drill_port", 1024, 65000)):
        _whole(v, var, lo, hi)
    first_backup_timeout(v)
    schedule = _per_kind(v, "pgbackrest_schedule", str, "calendar expression")
    for kind, cal in schedule.items():
        if not CALENDAR_RE.match(cal):
            reject(f"pgbackrest_schedule.{kind}", f"{cal!r} is not a systemd calendar "
                   "expression on one line", "write e.g. \"Sun *-*-* 01:00:00\" or hourly "
                   "(`systemd-analyze calendar` checks one)")
    if not CALENDAR_RE.match(str(v["pgbackrest_drill_schedule"])):
        reject("pgbackrest_drill_schedule", f"{v['pgbackrest_drill_schedule']!r} is not a "
               "systemd calendar expression on one line", "write e.g. \"Sat *-*-* 05:00:00\"")
    drill_age = v["pgbackrest_drill_max_age_hours"]
    if not isinstance(drill_age, (int, float)) or isinstance(drill_age, bool) or drill_age <= 0:
        reject("pgbackrest_drill_max_age_hours", f"{drill_age!r} is not a number of hours above 0",
               "write e.g. 192")
    ages = _per_kind(v, "pgbackrest_max_age_hours", (int, float), "number of hours")
    if any(x <= 0 for x in ages.values()):
        reject("pgbackrest_max_age_hours", f"{ages!r} holds an age of 0 or less",
               "give each kind a number of hours above 0 (fractions work: 0.5)")

    ssh_group = v.get("harden_ssh_group") if "harden" in inv.roles_for(host.name) else None
    if host.name == repo:
        stanzas = [_stanza(h, inv, ctx) for h in inv.hosts_in(group)]
        if not stanzas:
            reject("pgbackrest_db_group", f"group {group!r} has no hosts", "list the database "
                   "servers in it")
        for s in stanzas:
            _known(inv, s.address, "the database server " + s.name, ctx)
        return {"side": "repo", "stanzas": stanzas, "ssh_group": ssh_group}
    if "postgresql" not in inv.roles_for(host.name):
        reject("pgbackrest_repo_host", f"host {host.name} has the pgbackrest role but is neither "
               f"the repository host ({repo}) nor a PostgreSQL server",
               "give the role only to the repository host and the database servers")
    if host not in inv.hosts_in(group):
        reject("pgbackrest_db_group", f"host {host.name} is a database server outside group "
               f"{group!r}, so the repository host would never back it up",
               f"add it to group {group}")
    _known(inv, inv.hosts[repo].address, f"the repository host {repo}", ctx)
    return {"side": "db", "stanza": _stanza(host, inv, ctx), "repo": inv.hosts[repo],
            "ssh_group": ssh_group}


def _whole(v, var: str, lo: int, hi: int) -> int:
    n = v[var]
    if not isinstance(n, int) or isinstance(n, bool) or not lo <= n <= hi:
        reject(var, f"{n!r} is not in {lo}..{hi}", f"write a whole number from {lo} to {hi}")
    return n


def first_backup_timeout(v) -> int:
    """pgbackrest_first_backup_timeout, checked: how long a deploy waits for a stanza's first
    full backup (provisioner/backups.py first_backup_limit reads it through here)."""
    return _whole(v, "pgbackrest_first_backup_timeout", 60, 604800)


def block_incremental(v) -> bool:
    """Whether the repository's new backups are block incremental (pgbackrest_block_incremental,
    where the version the role installs has it)."""
    version = tuple(int(x) for x in str(v["pgbackrest_version"]).split("."))
    return bool(v["pgbackrest_block_incremental"]) and version >= BLOCK_SINCE


def _per_kind(v, var: str, kind_type, what: str) -> dict:
    value = v[var]
    if not isinstance(value, dict) or set(value) != set(KINDS) \
            or any(not isinstance(x, kind_type) or isinstance(x, bool) for x in value.values()):
        reject(var, f"{value!r} does not give one {what} per backup kind",
               "write {full: ..., diff: ..., incr: ...}")
    return value


def _known(inv, address: str, what: str, ctx) -> list[str]:
    lines = known_host_lines(inv.known_hosts, address)
    if not lines and getattr(ctx, "os", None) is not None:
        # at plan time only: `invoke check` must work before the servers exist
        reject("pgbackrest_repo_host", f"the inventory's known_hosts has no key of {what} "
               f"({address}), which this host must trust", "record it first: `invoke "
               "hosts.trust --env ENV` (or `invoke testbed.up` for the testbed)")
    return lines


def _stanza(h, inv, ctx) -> Stanza:
    """A database server's cluster, from ITS vars: postgresql_version when set, else the
    Debian default of the server this role runs on (only a database server knows its own
    release; the repository host runs the same pgBackRest, hence the same Debian release)."""
    hv = inv.hostvars(h.name)
    if "postgresql_port" not in hv:
        reject("pgbackrest_db_group", f"host {h.name} has no "
               "postgresql role", "give the database servers' group the postgresql role")
    version, cluster = pg._cluster_of(hv, ctx)
    return Stanza(h.name, h.address, version, pg._paths(version, cluster)["data"],
                  hv["postgresql_port"],
                  tuple(d["name"] for d in hv.get("postgresql_databases") or [] if "name" in d))


@dataclass(frozen=True)
class SameVersion:
    """Stops the run before anything is installed when the server would run another pgBackRest
    than the repository's other hosts (pgBackRest refuses a remote of another version)."""
    want: str
    debian: str | None

    @property
    def id(self) -> str:
        return f"pgbackrest version {self.want}"

    def facts(self) -> dict:
        return {"packages": ["pgbackrest"], "package_candidates": ["pgbackrest"]}

    def plan(self, facts) -> list:
        have = facts.package("pgbackrest")
        if have in (None, apt.FORESEEN):       # check mode, a fresh server: what apt would take
            have = facts.candidate("pgbackrest")
        if have is None:
            return [Noop(self.id, "no pgbackrest in this server's package lists yet: apt will "
                                  "say so when installing")]
        upstream = have.split(":")[-1].split("-")[0]
        if upstream == self.want or upstream.startswith(self.want + "."):
            return [Noop(self.id, f"this server has pgbackrest {have}")]
        raise PlanError(
            f"this server (Debian {self.debian or '?'}) has pgbackrest {have}, and the "
            f"repository's hosts must all run {self.want} (pgbackrest_version): pgBackRest "
            "refuses a peer of another version. Nothing was installed. Put the repository host "
            "and the database servers on the same Debian release (12: 2.45, 13: 2.55), or set "
            "pgbackrest_version env-wide to the version they all have")

    def expect(self, facts) -> dict:
        return {}


STANZA_WAIT = 600          # s: a first run of the whole env sets the database server up meanwhile
STANZA_RETRY = 1           # s between tries: a try is one SSH login that fails at once (0.05 s,
                           # 30 ms of CPU); every second waited after the database server is
                           # ready is the env's


@dataclass(frozen=True)
class StanzaCreated:
    """The repository holds the stanza from the first run on: without it every WAL segment the
    database server pushes fails (and the archive alert fires) until the first backup would
    create it. In a first run of the whole env the database server is still being set up
    (PostgreSQL, its pgBackRest, the key): stanza-create is tried again, for a bounded time."""
    stanza: str
    repo_path: str

    @property
    def id(self) -> str:
        return f"stanza {self.stanza}"

    @property
    def info(self) -> str:
        return f"{self.repo_path}/backup/{self.stanza}/backup.info"

    def facts(self) -> dict:
        return {"files": [self.info]}

    def plan(self, facts) -> list:
        if facts.file(self.info).exists:
            return [Noop(self.id, f"the repository has it ({self.info})")]
        create = ["runuser", "-u", REPO_USER, "--", "pgbackrest", f"--stanza={self.stanza}",
                  "--log-level-console=warn", "stanza-create"]
        return [Change(self.id, "create", "not in the repository yet", (
            run_step(create, attempts=STANZA_WAIT // STANZA_RETRY, timeout=120)
            | {"delay": STANZA_RETRY},))]

    def expect(self, facts) -> dict:
        return {}


@dataclass(frozen=True)
class StanzaUpgraded:
    """After a major upgrade in place (role postgresql, postgresql_upgrade) the stanza still
    records the old cluster's version and system id, and pgBackRest refuses the new cluster's
    WAL (archive-push) and files (backup) until `stanza-upgrade`. It runs here, on the database
    server: the postgresql role's upgrade ran before this role, /etc/pgbackrest.conf already
    points at the new cluster, and this role writes the new cluster's archive settings only
    after it (settings pg_upgradecluster carried over make archive-push fail until then, and
    PostgreSQL keeps the WAL and retries). What the stanza records comes from stanzacheck.py, a
    check in the role's facts exec sent on stdin (nothing to install first: the run that
    upgrades has it), which asks the repository only while another major's cluster is on the
    server."""
    stanza: str
    version: str
    cluster: str
    data: str

    @property
    def id(self) -> str:
        return f"stanza {self.stanza} upgrade"

    @property
    def check(self) -> list[str]:
        return ["python3", "-", "--stanza", self.stanza, "--cluster", self.cluster,
                "--data", self.data]

    def facts(self) -> dict:
        return {"checks": [{"argv": self.check, "stdin": STANZA_CHECK_SOURCE}],
                "dirs": ["/etc/postgresql"]}

    def plan(self, facts) -> list:
        rc, here = facts.check(self.check), f"this server's cluster {self.version}/{self.cluster}"
        c = stanzacheck
        if rc == c["MATCH"]:
            return [Noop(self.id, f"the stanza records {here}")]
        if rc == c["NOT_UPGRADED"]:
            return [Noop(self.id, "no other PostgreSQL major's cluster on this server: no upgrade "
                                  "for the stanza to follow")]
        if rc == c["NO_STANZA"]:
            return [Noop(self.id, f"the repository has no stanza {self.stanza} yet: the "
                                  f"repository host creates it from {here}")]
        if rc == c["NO_CLUSTER"]:
            return [Noop(self.id, f"no cluster in {self.data} yet")]
        if rc == c["NEWER"]:
            raise PlanError(
                f"the repository's stanza {self.stanza} records a newer PostgreSQL major than "
                f"{here} (a rollback to the old cluster?): this role never moves a stanza back, "
                "and archive-push fails meanwhile. To back this cluster up, run `pgbackrest "
                f"--stanza={self.stanza} stanza-upgrade` as postgres here; to go on with the "
                "newer major, set postgresql_version to it")
        older = [m for m in pg._majors(facts) if m != self.version]
        if rc == c["OLDER"]:
            why = (f"the stanza records an older PostgreSQL major than {here} (PostgreSQL "
                   f"{', '.join(older) or '?'}'s cluster is still here: pg_upgradecluster moved "
                   "the data)")
        elif rc == c["OTHER_SYSTEM"]:
            why = (f"the stanza records PostgreSQL {self.version} of another system id: {here} "
                   "was made again since the stanza followed it (an upgrade done anew?)")
        else:
            return [Noop(self.id, f"could not compare {here} with the stanza (check exit {rc}: "
                                  "the repository host unreachable, or another pgBackRest "
                                  "there?); archive-push fails while they differ, the next "
                                  "run compares again")]
        argv = ["runuser", "-u", "postgres", "--", "pgbackrest", f"--stanza={self.stanza}",
                "--log-level-console=warn", "stanza-upgrade"]
        # a backup that holds the stanza's lock on the repository host soon fails on the
        # upgraded cluster: a few tries outlast it
        return [Change(self.id, "upgrade", why + ": archive-push and backups refuse the cluster "
                       "until stanza-upgrade", (run_step(argv, attempts=3, timeout=120)
                                                | {"delay": 10},))]

    def expect(self, facts) -> dict:
        return {}


def keys(v, name: str) -> dict:
    """The two key pairs: `repo` logs in from the repository host to the database servers'
    postgres, `db` from a database server to the repository's pgbackrest user."""
    return {side: ssh_keypair(v["pgbackrest_ssh_seed"], f"pgbackrest {side}",
                              f"pgbackrest-{side}@{name}")
            for side in ("repo", "db")}


def unit(stanza: str, kind: str) -> str:
    return f"pgbackrest-{stanza}-{kind}"


def seconds(hours) -> str:
    return f"{hours * 3600:g}"


def job_command(stanza: str, kind: str, max_age_hours) -> list[str]:
    """What the service runs: the stanza is created first when the repository has none yet
    (stanza-create is a no-op on a valid stanza), then the backup."""
    return ["/usr/bin/python3", JOB, "run", "--job", unit(stanza, kind),
            "--lock", f"pgbackrest-{stanza}", "--user", REPO_USER, "--stanza", stanza,
            "--max-age-seconds", seconds(max_age_hours),
            "--prepare", json.dumps(["pgbackrest", f"--stanza={stanza}", "stanza-create"]),
            "--", "pgbackrest", f"--stanza={stanza}", f"--type={kind}", "backup"]


def exec_start(argv: list[str]) -> str:
    """argv as a systemd ExecStart= line."""
    # systemd's own quoting: "..." with \" and \\ escaped; % and $ doubled (specifiers and
    # variable expansion)
    def q(a):
        a = a.replace("%", "%%").replace("$", "$$")
        return a if re.fullmatch(r"[A-Za-z0-9_./=:@+-]+", a) else \
            '"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(q(a) for a in argv)


def resources(v, ctx):
    c = check(v, ctx)
    debian = (ctx.os or {}).get("version_id")
    yield SameVersion(str(v["pgbackrest_version"]), debian)
    packages = ["pgbackrest"]
    if c["side"] == "db":
        # on a fresh server the cluster starts archiving at once: no restart for archive_mode
        yield from pg.createcluster_file("60-pgbackrest.conf", "role pgbackrest",
                                         _archive(v, c["stanza"]).splitlines())
    elif v["pgbackrest_drill"]:
        # the drill's server binaries only: Debian would create and start a cluster with them
        yield from pg.createcluster_file("50-provisioner-drill.conf", "role pgbackrest",
                                         ["create_main_cluster = false"])
        packages += _drill_packages(c["stanzas"])
    yield apt.packages(packages)
    pair = keys(v, ctx.host.name)
    groups = [c["ssh_group"]] if c["ssh_group"] else []
    if c["side"] == "repo":
        yield from _repo(v, ctx, c, pair, groups)
    else:
        yield from _db(v, ctx, c, pair, groups)


def _repo(v, ctx, c, pair, groups):
    home = v["pgbackrest_repo_path"]
    yield files.directory(TOOL_DIR, mode="0755")
    yield files.file(JOB, JOB_SOURCE, mode="0644")
    yield files.directory(backupjob["STATUS_DIR"], mode="0755")
    # the package made these postgres's (it pulls in postgresql-common): the repository is
    # this user's alone
    yield users.user(REPO_USER, groups=groups, shell="/bin/bash", home=home, system=True,
                     create_home=False, authorized_keys=[f"{RESTRICT} {pair['db'][1]}"])
    for d in (home, "/var/log/pgbackrest", "/var/spool/pgbackrest"):
        yield files.directory(d, mode="0750", owner=REPO_USER, group=REPO_USER)
    yield files.file(f"{home}/.ssh/id_ed25519", pair["repo"][0], mode="0600", owner=REPO_USER,
                     group=REPO_USER)
    known = sorted({line for s in c["stanzas"] for line in _known(ctx.inventory, s.address,
                                                                   s.name, ctx)})
    yield files.file(f"{home}/.ssh/known_hosts", "".join(k + "\n" for k in known),
                     mode="0644", owner=REPO_USER, group=REPO_USER)
    yield files.file(f"{home}/.ssh/config", SSH_CONFIG, mode="0644", owner=REPO_USER,
                     group=REPO_USER)
    stanzas = c["stanzas"]
    yield templates.template(
        "/etc/pgbackrest.conf", "pgbackrest/repo.conf.j2",
        {"repo_path": home, "cipher_pass": v["pgbackrest_cipher_pass"],
         "retention_days": v["pgbackrest_retention_days"],
         "compress_type": v["pgbackrest_compress_type"],
         "process_max": v["pgbackrest_process_max"],
         "block_incremental": block_incremental(v),
         "stanzas": [{"name": s.name, "address": s.address, "data": s.data or "", "port": s.port}
                     for s in stanzas]},
        mode="0640", owner="root", group=REPO_USER)
    for s in stanzas:
        yield StanzaCreated(s.name, home)
        for kind in KINDS:
            yield from job_units("pgbackrest", unit(s.name, kind),
                                 f"pgBackRest {kind} backup of {s.name}",
                                 job_command(s.name, kind, v["pgbackrest_max_age_hours"][kind]),
                                 v["pgbackrest_schedule"][kind])
    if v["pgbackrest_drill"]:
        yield from _drill(v, stanzas)
    yield from job_timers([unit(s.name, kind) for s in stanzas
                           for kind in KINDS + (("verify",) if v["pgbackrest_drill"] else ())])


def _drill_packages(stanzas) -> list[str]:
    """The server binaries of each stanza's PostgreSQL for the drill."""
    return [f"postgresql-{m}" for m in sorted({s.version for s in stanzas if s.version})]


def _drill(v, stanzas):
    """The drill tool, its scratch folder, and one weekly drill per stanza."""
    yield files.file(DRILL, DRILL_SOURCE, mode="0644")
    yield files.directory(DRILL_DIR, mode="0700", owner=REPO_USER, group=REPO_USER)
    for i, s in enumerate(stanzas):
        yield from job_units("pgbackrest", unit(s.name, "verify"),
                             f"pgBackRest restore drill of {s.name}", drill_command(v, s, i),
                             v["pgbackrest_drill_schedule"])


def drill_command(v, s: Stanza, index: int) -> list[str]:
    """The drill shares the stanza's lock: it never runs during one of its backups."""
    return ["/usr/bin/python3", JOB, "run", "--job", unit(s.name, "verify"),
            "--lock", f"pgbackrest-{s.name}", "--user", REPO_USER, "--drill", "--",
            "/usr/bin/python3", DRILL, "pg", "--stanza", s.name,
            "--bin", f"/usr/lib/postgresql/{s.version}/bin",
            "--port", str(v["pgbackrest_drill_port"] + index),
            "--scratch", f"{DRILL_DIR}/{s.name}", *[a for d in s.databases
                                                   for a in ("--expect-db", d)]]


def job_units(role: str, name: str, what: str, argv: list[str], on_calendar: str,
              environment_file: str | None = None):
    """A scheduled job's unit files: `name`.service (a oneshot running argv, normally
    backupjob.py) and `name`.timer, which `job_timers` enables and starts. A role yields all
    its jobs' units, then their timers: systemd reloads once for them all, not once per job
    (remote/agent.py Reloads). Shared with the restic role."""
    # Description= expands systemd's %-specifiers too ("5% of the data")
    common = {"role": role, "unit": name, "what": what, "description": what.replace("%", "%%")}
    yield systemd.unit_file(f"{name}.service", render("backup/job.service.j2", {
        **common, "exec_start": exec_start(argv), "environment_file": environment_file,
        "status_file": f"{backupjob['STATUS_DIR']}/{name}.json"}).text)
    yield systemd.unit_file(f"{name}.timer", render("backup/job.timer.j2", {
        **common, "on_calendar": on_calendar, "random_delay": "5min"}).text)


def job_timers(names):
    for name in names:
        yield systemd.service(f"{name}.timer", enabled=True, running=True)


def _db(v, ctx, c, pair, groups):
    s, repo = c["stanza"], c["repo"]
    version, cluster = pg._cluster_of(v, ctx)
    pgc = {**pg._paths(version, cluster), "version": s.version, "port": s.port}
    # Debian's postgres user: its home is /var/lib/postgresql; only the repository host's key
    # gets in, and only to run pgBackRest
    yield users.user("postgres", groups=groups,
                     authorized_keys=[f"{RESTRICT} {pair['repo'][1]}"])
    home = "/var/lib/postgresql"
    yield files.file(f"{home}/.ssh/id_ed25519", pair["db"][0], mode="0600", owner="postgres",
                     group="postgres")
    known = _known(ctx.inventory, repo.address, f"the repository host {repo.name}", ctx)
    yield files.file(f"{home}/.ssh/known_hosts", "".join(k + "\n" for k in known),
                     mode="0644", owner="postgres", group="postgres")
    yield files.file(f"{home}/.ssh/config", SSH_CONFIG, mode="0644", owner="postgres",
                     group="postgres")
    for d in ("/var/log/pgbackrest", "/var/spool/pgbackrest"):
        yield files.directory(d, mode="0750", owner="postgres", group="postgres")
    yield templates.template(
        "/etc/pgbackrest.conf", "pgbackrest/db.conf.j2",
        {"repo_name": repo.name, "repo_address": repo.address, "repo_user": REPO_USER,
         "stanza": s.name, "data": pgc["data"], "port": pgc["port"]},
        mode="0644", owner="root", group="root")
    yield StanzaUpgraded(s.name, version, cluster, pgc["data"])
    yield templates.template(
        f"{pgc['etc']}/conf.d/60-pgbackrest.conf", ARCHIVE_TEMPLATE, _archive_vars(v, s),
        mode="0644", owner="postgres", group="postgres",
        validate=["runuser", "-u", "postgres", "--",
                  f"/usr/lib/postgresql/{pgc['version']}/bin/postgres", "-D", pgc["data"],
                  "--config-file={path}", "-C", "archive_mode"],
        notify=RESTART)


ARCHIVE_TEMPLATE = "pgbackrest/archive.conf.j2"


def _archive_vars(v, s: Stanza) -> dict:
    return {"stanza": s.name, "archive_timeout": v["pgbackrest_archive_timeout"]}


def _archive(v, s: Stanza) -> str:
    """The archiving settings of a stanza's cluster."""
    return render(ARCHIVE_TEMPLATE, _archive_vars(v, s)).text


def handlers(v, ctx):
    if v["pgbackrest_repo_host"] == ctx.host.name:
        return {}
    version, cluster = pg._cluster_of(v, ctx)
    paths = pg._paths(version, cluster)
    if paths["unit"] is None:
        return {}
    # reload, then restart only if a setting needs it (archive_mode does, the first time):
    # the postgresql role's own tool decides, as for its own settings
    return {RESTART: [*handler("reload", paths["unit"]),
                      run_step(["python3", pg.TOOL, "settle", "--cluster", paths["cluster_id"],
                                paths["unit"]])]}

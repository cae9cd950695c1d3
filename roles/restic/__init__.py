"""Files with restic: each source host backs up `restic_paths` (and, where it has the mongodb
role, a mongodump archive made just before) to its own repository, over SFTP, on the repository
host (`restic_repo_host`), where it has an SFTP-only account chrooted to its own folder: a
source host cannot see another's repository nor get a shell there.

On a source host: the restic password (from the vault) in a root-only file, an SSH key derived
from a vault seed (see provisioner/sshkeys.py: the repository host authorizes the same key in
the same run, with no round trip), the repository host's key from the inventory's known_hosts,
an ssh_config alias, and three scheduled jobs through the pgbackrest role's job tool (status
file, node exporter metrics, journal, never overlapping: they share one lock): backup, forget
--prune (restic_keep), and a weekly check --read-data-subset. The repository is initialised
by the first backup when it does not exist yet (the repository host may be provisioned after
the source host).

On the repository host: a group, one system user per source host (nologin, in the SSH group),
its chroot (root-owned, as sshd demands) with repo/ inside, and its authorized key in
/etc/ssh/authorized_keys/<user>. The sshd `Match Group` block belongs to harden's sshd_config
(harden_ssh_extra_lines, checked by `sshd -t`): this role refuses to run without it and prints
the exact lines to add.
"""
from __future__ import annotations

import json
import re

from provisioner.api import (apt, files, is_secret, known_host_lines, reject, render,
                             ssh_keypair, templates, users)
from roles import pgbackrest as jobs

GROUP = "resticsftp"
ALIAS = "restic-repo"
JOBS = ("backup", "forget", "check")
DRILL_DIR = "/var/tmp/provisioner-restic-drill"
LOCK = "restic"
DUMP = "/var/backups/provisioner-mongodump"
PATH_RE = re.compile(r"^/[^\0\n]*\Z")
SUBSET_RE = re.compile(r"^([0-9]{1,2}(\.[0-9]+)?%|100%|[0-9]+/[0-9]+)\Z")
KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def account(source: str) -> str:
    """The SFTP user of a source host on the repository host."""
    return f"restic-{source}"


def sources(inv, repo: str) -> list:
    return [h for h in inv.hosts.values() if h.name != repo
            and "restic" in inv.roles_for(h.name)
            and inv.hostvars(h.name)["restic_repo_host"] == repo]


def sshd_block(v) -> list[str]:
    return render("restic/sshd_match.j2", {"group": GROUP, "root": v["restic_sftp_root"]}
                  ).text.splitlines()


def check(v, ctx) -> dict:
    inv, host = ctx.inventory, ctx.host
    repo = v["restic_repo_host"]
    if repo not in inv.hosts:
        reject("restic_repo_host", f"{repo!r} is not a host of the inventory" if repo else
               "is not set", "name the SFTP repository host, e.g. restic_repo_host: vault "
               "(env-wide: both sides read it)")
    for var in ("restic_password", "restic_ssh_seed"):
        if not is_secret(v[var]) or len(v[var].reveal()) < 20:
            reject(var, "must be a secret of 20 characters or more from the vault",
                   f"write `{var}: !vault {var}` and set it with `invoke vault.set`")
    root = v["restic_sftp_root"]
    if not re.fullmatch(r"/[A-Za-z0-9_./-]+", root) or ".." in root or root == "/":
        reject("restic_sftp_root", f"{root!r} is not an absolute folder", "write e.g. /srv/sftp")
    paths = v["restic_paths"]
    if not isinstance(paths, list) or not paths or \
            any(not isinstance(p, str) or not PATH_RE.match(p) for p in paths):
        reject("restic_paths", f"{paths!r} is not a list of absolute paths",
               "write e.g. [/etc, /srv/shop/shared/uploads]")
    if not isinstance(v["restic_exclude"], list) or any(
            not isinstance(x, str) or not x or "\n" in x for x in v["restic_exclude"]):
        reject("restic_exclude", "must be a list of one-line patterns", "write e.g. ['*.tmp']")
    keep = v["restic_keep"]
    if not isinstance(keep, dict) or not keep or set(keep) - set(KEEP) or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in keep.values()):
        reject("restic_keep", f"{keep!r} is not a mapping of {', '.join(KEEP)} to counts >= 1",
               "write e.g. {last: 3, daily: 7, weekly: 5, monthly: 12}")
    if not isinstance(v["restic_check_subset"], str) or not SUBSET_RE.match(v["restic_check_subset"]):
        reject("restic_check_subset", f"{v['restic_check_subset']!r} is not a subset restic "
               "reads", "write a percentage like 5% or a fraction like 1/10")
    schedule = v["restic_schedule"]
    if not isinstance(schedule, dict) or set(schedule) != set(JOBS) or any(
            not isinstance(c, str) or not jobs.CALENDAR_RE.match(c) for c in schedule.values()):
        reject("restic_schedule", f"{schedule!r} does not give one calendar expression per job",
               "write {backup: \"*-*-* 02:15:00\", forget: \"*-*-* 03:15:00\", check: "
               "\"Sun *-*-* 04:15:00\"}")
    ages = v["restic_max_age_hours"]
    if not isinstance(ages, dict) or set(ages) != {"backup", "check", "verify"} or any(
            not isinstance(x, (int, float)) or isinstance(x, bool) or x <= 0 for x in ages.values()):
        reject("restic_max_age_hours", f"{ages!r} does not give hours above 0 for backup, check "
               "and verify", "write {backup: 36, check: 192, verify: 192}")
    if not isinstance(v["restic_drill_schedule"], str) or \
            not jobs.CALENDAR_RE.match(v["restic_drill_schedule"]):
        reject("restic_drill_schedule", f"{v['restic_drill_schedule']!r} is not a systemd "
               "calendar expression on one line", "write e.g. \"Sat *-*-* 05:30:00\"")
    ssh_group = v.get("harden_ssh_group") if "harden" in inv.roles_for(host.name) else None
    if host.name == repo:
        if ssh_group is not None:
            block = sshd_block(v)
            extra = [line.strip() for line in v.get("harden_ssh_extra_lines") or []]
            if not _contains(extra, [line.strip() for line in block]):
                reject("harden_ssh_extra_lines", "sshd has no SFTP-only, chrooted rule for "
                       f"the restic accounts (group {GROUP}) on the repository host {repo}",
                       "add these lines to harden_ssh_extra_lines for that host: "
                       + json.dumps(block))
        return {"side": "repo", "sources": sources(inv, repo), "ssh_group": ssh_group}
    known = known_host_lines(inv.known_hosts, inv.hosts[repo].address, inv.hosts[repo].port)
    if not known and getattr(ctx, "os", None) is not None:
        reject("restic_repo_host", f"the inventory's known_hosts has no key of the repository "
               f"host {repo} ({inv.hosts[repo].address})", "record it: `invoke hosts.trust "
               "--env ENV`")
    return {"side": "source", "repo": inv.hosts[repo], "known": known,
            "mongodb": "mongodb" in inv.roles_for(host.name)}


def _contains(lines: list[str], block: list[str]) -> bool:
    return any(lines[i:i + len(block)] == block for i in range(len(lines) - len(block) + 1))


def keypair(v, source: str):
    return ssh_keypair(v["restic_ssh_seed"], f"restic {source}", f"restic@{source}")


def resources(v, ctx):
    c = check(v, ctx)
    if c["side"] == "repo":
        yield from _repo(v, c)
    else:
        yield from _source(v, ctx, c)


def _repo(v, c):
    root = v["restic_sftp_root"]
    yield users.group(GROUP, system=True)
    yield files.directory(root, mode="0755")
    yield files.directory("/etc/ssh/authorized_keys", mode="0755")
    for h in c["sources"]:
        user = account(h.name)
        groups = [GROUP] + ([c["ssh_group"]] if c["ssh_group"] else [])
        # home: the chroot (sshd quietly starts in / inside it when the path is not there)
        yield users.user(user, groups=groups, shell="/usr/sbin/nologin", home=f"{root}/{user}",
                         system=True, create_home=False)
        # sshd's chroot must be root's and not writable by anyone else; the repository
        # inside is the account's alone
        yield files.directory(f"{root}/{user}", mode="0755")
        yield files.directory(f"{root}/{user}/repo", mode="0700", owner=user, group=user)
        yield files.file(f"/etc/ssh/authorized_keys/{user}",
                         f"restrict {keypair(v, h.name)[1]}\n", mode="0644")


def job_argv(v, job: str, mongodb: bool) -> list[str]:
    """What each job's service runs: backupjob.py around restic."""
    base = ["/usr/bin/python3", jobs.JOB, "run", "--job", f"restic-{job}", "--lock", LOCK]
    if job in v["restic_max_age_hours"]:
        base += ["--max-age-seconds", jobs.seconds(v["restic_max_age_hours"][job])]
    if job == "backup":
        init = ["sh", "-c", "restic cat config >/dev/null 2>&1 || restic init"]
        if mongodb:
            # the dump first (mongodump reads its password from a root-only config file), then
            # the repository exists or is made
            init = ["sh", "-c", f"mongodump --quiet --config=/etc/restic/mongodump.yml "
                                f"--gzip --archive={DUMP}/mongodb.archive.gz && {init[2]}"]
        paths = list(v["restic_paths"]) + ([DUMP] if mongodb else [])
        excludes = [a for x in ["/etc/restic"] + list(v["restic_exclude"])
                    for a in ("--exclude", x)]
        return base + ["--prepare", json.dumps(init), "--size-cmd", json.dumps(
            ["restic", "stats", "--json", "--mode", "raw-data", "--no-lock"]), "--",
            "restic", "backup", "--tag", "provisioner", *excludes, *paths]
    if job == "forget":
        keep = [a for k, n in v["restic_keep"].items() for a in (f"--keep-{k}", str(n))]
        return base + ["--", "restic", "forget", "--prune", "--tag", "provisioner", *keep]
    return base + ["--", "restic", "check", f"--read-data-subset={v['restic_check_subset']}"]


def _source(v, ctx, c):
    repo = c["repo"]
    yield apt.packages(["restic", "openssh-client"])
    yield files.directory("/etc/restic", mode="0700")
    yield files.directory("/var/cache/restic", mode="0700")
    yield files.file("/etc/restic/password", v["restic_password"], mode="0600")
    yield files.file("/etc/restic/id_ed25519", keypair(v, ctx.host.name)[0], mode="0600")
    yield files.file("/etc/restic/known_hosts", "".join(k + "\n" for k in c["known"]),
                     mode="0644")
    yield templates.template("/etc/ssh/ssh_config.d/restic.conf", "restic/ssh_config.j2",
                             {"alias": ALIAS, "address": repo.address, "port": repo.port,
                              "user": account(ctx.host.name)}, mode="0644")
    yield templates.template("/etc/restic/env", "restic/env.j2", {"alias": ALIAS}, mode="0600")
    if c["mongodb"]:
        yield files.directory(DUMP, mode="0700")
        yield templates.template(
            "/etc/restic/mongodump.yml", "restic/mongodump.yml.j2",
            {"uri": f"mongodb://{v['mongodb_admin_user']}@127.0.0.1:{v['mongodb_port']}/"
                    "?authSource=admin", "password": v["mongodb_admin_password"]}, mode="0600")
    yield files.directory(jobs.TOOL_DIR, mode="0755")
    yield files.file(jobs.JOB, jobs.JOB_SOURCE, mode="0644")
    yield files.directory(jobs.backupjob["STATUS_DIR"], mode="0755")
    for job in JOBS:
        what = {"backup": "restic backup of " + ", ".join(v["restic_paths"]),
                "forget": "restic forget --prune (retention)",
                "check": f"restic check of {v['restic_check_subset']} of the data"}[job]
        yield from jobs.job_units("restic", f"restic-{job}", what, job_argv(v, job, c["mongodb"]),
                                  v["restic_schedule"][job], environment_file="/etc/restic/env")
    if v["restic_drill"]:
        yield files.file(jobs.DRILL, jobs.DRILL_SOURCE, mode="0644")
        yield from jobs.job_units(
            "restic", "restic-verify", "restic restore drill of " + ", ".join(v["restic_paths"]),
            ["/usr/bin/python3", jobs.JOB, "run", "--job", "restic-verify", "--lock", LOCK,
             "--drill", "--",
             "/usr/bin/python3", jobs.DRILL, "files", "--scratch", DRILL_DIR, *v["restic_paths"]],
            v["restic_drill_schedule"], environment_file="/etc/restic/env")
    yield from jobs.job_timers([f"restic-{job}" for job in JOBS]
                               + (["restic-verify"] if v["restic_drill"] else []))

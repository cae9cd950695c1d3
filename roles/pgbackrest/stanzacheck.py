"""Does the repository's stanza record this database server's cluster? Role pgbackrest's facts
check on a database server (standard library only: the role sends it to the server's python3 on
stdin; it runs as root). The answer is the exit code.

    python3 - --stanza NAME --cluster main --data /var/lib/postgresql/17/main

Only a major upgrade in place leaves the stanza behind, and pg_upgradecluster keeps the old
major's cluster beside the new one (stopped, until pg_dropcluster): the repository is asked
(`pgbackrest info`, which logs in to the repository host) only while such a cluster is there, so
a converged server opens no connection for it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys

MATCH = 0           # the stanza's current database is this cluster
NOT_UPGRADED = 3    # no other major's cluster here: the repository was not asked
NO_STANZA = 4       # the repository has no stanza yet (the repository host creates it)
NO_CLUSTER = 5      # no cluster at --data yet
UNKNOWN = 6         # the repository could not be read
OLDER = 10          # the stanza records an older major
OTHER_SYSTEM = 11   # the stanza records this major, but another cluster (system id)
NEWER = 12          # the stanza records a newer major than this cluster
ETC = "/etc/postgresql"
INFO_TIMEOUT = 40   # seconds: below the agent's limit for one check, which then says nothing


def other_majors(etc: str, cluster: str, version: str) -> list[str]:
    """The majors other than `version` with a cluster of this name under `etc`."""
    try:
        names = os.listdir(etc)
    except OSError:
        return []
    return sorted(n for n in names
                  if n != version and os.path.isdir(os.path.join(etc, n, cluster)))


def system_id(data: str) -> int:
    """pg_control starts with the cluster's system identifier (uint64, the machine's byte
    order): what pgBackRest compares with the stanza's."""
    with open(os.path.join(data, "global", "pg_control"), "rb") as f:
        return struct.unpack("=Q", f.read(8))[0]


def _major(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def verdict(info, stanza: str, version: str, sysid: int) -> int:
    """How the stanza's current database (the newest of its history) in `pgbackrest
    --output=json info` compares with this cluster's major and system id."""
    for s in info if isinstance(info, list) else []:
        if not isinstance(s, dict) or s.get("name") != stanza:
            continue
        dbs = [d for d in s.get("db") or [] if isinstance(d, dict)]
        if not dbs:
            # status code 1 is "missing stanza path" (never created); any other (99 when the
            # repository host could not be read) says nothing about the stanza
            return NO_STANZA if (s.get("status") or {}).get("code") == 1 else UNKNOWN
        current = max(dbs, key=lambda d: d.get("id", 0))
        recorded = str(current.get("version"))
        if recorded == version:
            return MATCH if current.get("system-id") == sysid else OTHER_SYSTEM
        try:
            return OLDER if _major(recorded) < _major(version) else NEWER
        except ValueError:
            return UNKNOWN
    return UNKNOWN


def read_info(stanza: str):
    """The repository's view of the stanza, as the database server's pgBackRest reads it
    (through the repository host, which holds the cipher key); no log file."""
    # its own process group: a timeout (the repository host down) takes pgbackrest's ssh too
    p = subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbackrest", f"--stanza={stanza}",
                          "--output=json", "--log-level-console=off", "--log-level-file=off",
                          "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=INFO_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    if p.returncode != 0:
        raise RuntimeError(err.strip())
    return json.loads(out)


def decide(stanza: str, cluster: str, data: str, etc: str = ETC, info=read_info) -> int:
    try:
        with open(os.path.join(data, "PG_VERSION"), encoding="ascii") as f:
            version = f.read().strip()
        sysid = system_id(data)
    except (OSError, struct.error, UnicodeDecodeError):
        return NO_CLUSTER
    if not other_majors(etc, cluster, version):
        return NOT_UPGRADED
    try:
        answer = info(stanza)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError):
        return UNKNOWN
    return verdict(answer, stanza, version, sysid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stanzacheck")
    p.add_argument("--stanza", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--data", required=True)
    a = p.parse_args(argv)
    return decide(a.stanza, a.cluster, a.data)


if __name__ == "__main__":
    sys.exit(main())

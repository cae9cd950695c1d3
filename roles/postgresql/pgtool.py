"""Server-side helper of the postgresql role: installed as /usr/local/lib/provisioner/pgtool.py
and run by python3 as root (standard library only, Python 3.9+). Also imported by the role on
the controller, which computes SCRAM verifiers with the same code.

    pgtool.py sql      --cluster 15/main          SQL on stdin, run by psql as postgres
    pgtool.py password --cluster 15/main ROLE     password on stdin; 0 = ROLE can log in with it
    pgtool.py database --cluster 15/main DB OWNER [USER..]
                                                  0 = DB exists, is owned by OWNER, and exactly
                                                      USER.. (not PUBLIC) may CONNECT besides OWNER
    pgtool.py hba      --cluster 15/main          0 = pg_hba.conf on disk has no error rows
                                                  (pg_hba_file_rules); 1 = prints them
    pgtool.py settle   --cluster 15/main UNIT     after a reload: restart UNIT when a setting in
                                                  the config files needs it (pg_file_settings)

psql connects over the unix socket of the RUNNING server (port and socket directory from its
postmaster.pid), so a port change that is not applied yet does not break the run. Exit codes
of the checks: 0 yes, 1 no, 2 cannot tell (server down, psql missing). Nothing secret is ever
printed: the stored verifier stays inside this process.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys

SCRAM_PREFIX = "SCRAM-SHA-256$"
SCRAM_ITERATIONS = 4096          # PostgreSQL 15's fixed iteration count


# --- SCRAM-SHA-256 (RFC 5802 / 7677, as PostgreSQL stores it in pg_authid.rolpassword) --------

def _keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hashlib.sha256(client_key).digest(), server_key


def _prepared(password: str) -> bytes:
    """The bytes PostgreSQL and libpq hash. SASLprep leaves ASCII as it is (and for ASCII
    control characters, which SASLprep prohibits, both fall back to the raw bytes); the role
    refuses non-ASCII passwords rather than approximate SASLprep."""
    if not password.isascii():
        raise ValueError("only ASCII passwords are supported")
    return password.encode("ascii")


def scram_verifier(password: str, salt: bytes | None = None,
                   iterations: int = SCRAM_ITERATIONS) -> str:
    """The string PostgreSQL stores for `password` (what psql's \\password sends)."""
    salt = os.urandom(16) if salt is None else salt
    stored, server = _keys(_prepared(password), salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode("ascii")   # noqa: E731
    return f"{SCRAM_PREFIX}{iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def scram_matches(password: str, verifier: str) -> bool:
    """Does `password` match a stored verifier (with the verifier's own salt and iterations)?"""
    if not verifier.startswith(SCRAM_PREFIX):
        return False                     # md5 or no password: not what we want either way
    try:
        head, keys = verifier[len(SCRAM_PREFIX):].split("$", 1)
        iterations, salt = head.split(":", 1)
        stored, server = (base64.b64decode(k) for k in keys.split(":", 1))
        want_stored, want_server = _keys(_prepared(password), base64.b64decode(salt),
                                         int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(stored, want_stored) and hmac.compare_digest(server, want_server)


# --- talking to the running cluster -----------------------------------------------------------

class CannotTell(Exception):
    pass


def _pid_file(cluster: str) -> tuple[str, str, str]:
    version, name = cluster.split("/", 1)
    data = f"/var/lib/postgresql/{version}/{name}"
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            lines = f.read().splitlines()
    except OSError:
        raise CannotTell(f"cluster {cluster} is not running (no {data}/postmaster.pid)")
    if len(lines) < 5:
        raise CannotTell(f"cluster {cluster} is starting (postmaster.pid incomplete)")
    return version, lines[3].strip(), lines[4].strip()


def psql(cluster: str, sql: str, variables: dict | None = None, check: bool = True):
    """Run `sql` (stdin) as postgres; returns (rc, output). Variables are psql -v values."""
    version, port, socket_dir = _pid_file(cluster)
    argv = ["runuser", "-u", "postgres", "--", f"/usr/lib/postgresql/{version}/bin/psql",
            "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", socket_dir or "/var/run/postgresql",
            "-p", port, "-d", "postgres"]
    for k, v in (variables or {}).items():
        argv += ["-v", f"{k}={v}"]
    try:
        p = subprocess.run(argv, input=sql.encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, cwd="/", timeout=50)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CannotTell(f"psql: {e}")
    out = p.stdout.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise CannotTell(out.strip() or f"psql exited {p.returncode}")
    return p.returncode, out


def cmd_sql(cluster: str, args: list[str]) -> int:
    rc, out = psql(cluster, sys.stdin.read(), check=False)
    sys.stdout.write(out)
    return rc


def cmd_password(cluster: str, args: list[str]) -> int:
    (role,) = args
    password = sys.stdin.read()
    _, out = psql(cluster, "SELECT rolcanlogin, coalesce(rolpassword, '') FROM pg_authid "
                           "WHERE rolname = :'role';\n", {"role": role})
    row = out.strip()
    if not row:
        print(f"role {role} does not exist")
        return 1
    can_login, verifier = row.split("|", 1)
    if can_login != "t":
        print(f"role {role} cannot log in")
        return 1
    if not scram_matches(password, verifier):
        print(f"role {role} has another password" if verifier else f"role {role} has no password")
        return 1
    return 0


def cmd_database(cluster: str, args: list[str]) -> int:
    db, owner, users = args[0], args[1], set(args[2:]) - {args[1]}
    _, out = psql(cluster, """
SELECT r.rolname, d.datacl IS NULL,
       (SELECT coalesce(string_agg(DISTINCT coalesce(g.rolname, '=public'), ','), '')
          FROM aclexplode(d.datacl) a LEFT JOIN pg_roles g ON g.oid = a.grantee
         WHERE a.privilege_type = 'CONNECT' AND a.grantee <> d.datdba)
  FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = :'db';
""", {"db": db})
    row = out.strip()
    if not row:
        print(f"database {db} does not exist")
        return 1
    have_owner, default_acl, grantees = row.split("|", 2)
    if have_owner != owner:
        print(f"database {db} is owned by {have_owner}, not {owner}")
        return 1
    have = {"=public"} if default_acl == "t" else set(filter(None, grantees.split(",")))
    if have != users:
        print(f"database {db}: CONNECT granted to {sorted(have)}, wanted {sorted(users)}")
        return 1
    return 0


def cmd_hba(cluster: str, args: list[str]) -> int:
    _, out = psql(cluster, "SELECT line_number, current_setting('hba_file'), error "
                           "FROM pg_hba_file_rules WHERE error IS NOT NULL ORDER BY line_number;\n")
    rows = [r.split("|", 2) for r in out.splitlines() if r.strip()]
    for line, path, error in rows:
        text = ""
        try:
            with open(path) as f:
                text = f.read().splitlines()[int(line) - 1].strip()
        except (OSError, ValueError, IndexError):
            pass
        print(f"{path} line {line}: {error}" + (f": {text}" if text else ""))
    return 1 if rows else 0


def cmd_settle(cluster: str, args: list[str]) -> int:
    (unit,) = args
    _, out = psql(cluster, "SELECT name, sourcefile, sourceline, error FROM pg_file_settings "
                           "WHERE error IS NOT NULL ORDER BY name;\n")
    rows = [r.split("|", 3) for r in out.splitlines() if r.strip()]
    broken = [r for r in rows if r[3] != "setting could not be applied"]
    for name, path, line, error in broken:
        print(f"{path} line {line}: {name}: {error}")
    if broken:
        return 1
    if rows:
        print("restarting %s for %s" % (unit, ", ".join(sorted({r[0] for r in rows}))))
        return subprocess.call(["systemctl", "restart", "--", unit])
    print("no setting needs a restart")
    return 0


COMMANDS = {"sql": cmd_sql, "password": cmd_password, "database": cmd_database,
            "hba": cmd_hba, "settle": cmd_settle}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in COMMANDS or argv[1] != "--cluster":
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[2], argv[3:])
    except CannotTell as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

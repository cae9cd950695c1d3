"""PostgreSQL from Debian: listen on localhost and the private address, pg_hba rules for the app
servers only (scram-sha-256, TLS), login roles with passwords from the vault, databases with
CONNECT granted to their users only, tuning in a conf.d drop-in.

Idempotent passwords: `ALTER ROLE ... PASSWORD` cannot tell whether it changed anything, so each
role's command is guarded by `pgtool.py password ROLE` (a read-only check fed the wanted password
on stdin) that recomputes SCRAM-SHA-256 with the STORED salt and iterations and compares. The
new password is sent as a SCRAM verifier computed here (like psql's \\password): the plain
password never reaches the server's SQL text or logs.

Config changes: one handler reloads, checks pg_hba.conf (pg_hba_file_rules has no error rows),
then restarts only when a setting in the files needs it (pg_file_settings: "could not be
applied"), so a work_mem change does not drop connections and a listen_addresses change does
restart. A pg_hba.conf that PostgreSQL rejects is rolled back by a guard (then reload + restart
if needed run again, so the other settings of the run still take effect).

A fresh server: the role's own settings also go to a createcluster.conf drop-in before the
package, so the cluster the package creates starts on them (createcluster_file).
"""
from __future__ import annotations

import ipaddress
import re
import runpy
from dataclasses import dataclass
from pathlib import Path

from provisioner.api import (Change, Connection, Guard, Noop, PlanError, Secret, Unreachable, apt, commands,
                             config_settings, files, is_secret, private_address, run_step, sql_literal,
                             systemd, templates)

HERE = Path(__file__).resolve().parent
TOOL_SOURCE = (HERE / "pgtool.py").read_text(encoding="utf-8")
pgtool = runpy.run_path(str(HERE / "pgtool.py"), run_name="pgtool")     # SCRAM code, shared
TOOL_DIR = "/usr/local/lib/provisioner"
TOOL = f"{TOOL_DIR}/pgtool.py"
HANDLER = "reload postgresql"

CREATECLUSTER_D = "/etc/postgresql-common/createcluster.d"
# not passed to new clusters: keys pg_createcluster acts on instead of copying them (where and
# how it creates a cluster), and the port, which it picks itself (a free one for the new
# cluster of pg_upgradecluster)
NOT_FOR_NEW_CLUSTERS = {"start_conf", "data_directory", "waldir", "xlogdir", "initdb_options", "ssl",
                        "port"}
IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
MEMORY_RE = re.compile(r"^[0-9]+(B|kB|MB|GB|TB)\Z")
SETTING_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?\Z")
HBA_KEYWORDS = {"all", "sameuser", "samerole", "samegroup", "replication", "public"}
NOT_MANAGED = {"postgres", "template0", "template1"}
LOCALE_RE = re.compile(r"^[A-Za-z0-9_.@-]+\Z")


def _ident(name, what: str) -> str:
    if not isinstance(name, str) or not IDENT_RE.match(name) or name.startswith("pg_") \
            or name in HBA_KEYWORDS:
        raise ValueError(f"{what}: {name!r} is not a usable name; use lowercase letters, digits "
                         "and '_' (not starting with a digit or 'pg_', at most 63 characters, "
                         f"not one of {sorted(HBA_KEYWORDS)})")
    return name


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _network(value, what: str) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=True))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address or CIDR (like 10.0.0.5 or "
                         "10.0.5.0/24; DNS names are not allowed: pg_hba.conf would resolve "
                         "them on every connection)") from None


def _conf_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and "\n" not in value and "\0" not in value:
        return sql_literal(value)
    raise ValueError(f"a postgresql.conf value must be a number, bool or one-line string, "
                     f"not {value!r}")


def check(v: dict, ctx) -> dict:
    return config(v, ctx)           # every var is judged there, from the inventory alone


def config(v: dict, ctx) -> dict:
    """The role's vars, validated (ValueError naming the var and the fix), plus what is
    derived from the inventory: listen address and client addresses."""
    version, cluster = _cluster_of(v, ctx)
    port = v["postgresql_port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"postgresql_port: {port!r} is not a port (1-65535)")
    maxconn = v["postgresql_max_connections"]
    if not isinstance(maxconn, int) or isinstance(maxconn, bool) or not 1 <= maxconn <= 262143:
        raise ValueError(f"postgresql_max_connections: {maxconn!r} is not in 1..262143")
    for key in ("shared_buffers", "effective_cache_size", "work_mem"):
        value = v[f"postgresql_{key}"]
        if not isinstance(value, str) or not MEMORY_RE.match(value):
            raise ValueError(f"postgresql_{key}: {value!r} is not a size like 128MB "
                             "(units B, kB, MB, GB, TB; no space, case as written)")

    listen = str(private_address("postgresql_listen_address", v["postgresql_listen_address"],
                                 ctx.host, "PostgreSQL"))

    sources: list[tuple[str, str]] = []           # (CIDR, where it comes from)
    group = v["postgresql_client_group"]
    if group:
        if group not in ctx.inventory.groups:
            raise ValueError(f"postgresql_client_group: no group {group!r} in the inventory "
                             f"(groups: {', '.join(ctx.inventory.groups)}); name the app "
                             "servers' group, or set it to \"\" and list addresses in "
                             "postgresql_allowed_sources")
        for h in ctx.inventory.hosts_in(group):
            sources.append((_network(h.address, f"host {h.name} of postgresql_client_group "
                                                f"{group!r}"), f"{h.name} (group {group})"))
    for s in v["postgresql_allowed_sources"] or []:
        sources.append((_network(s, "postgresql_allowed_sources"), "postgresql_allowed_sources"))
    seen: set[str] = set()
    sources = [s for s in sources if not (s[0] in seen or seen.add(s[0]))]   # first one wins

    databases = []
    users = []
    for i, u in enumerate(v["postgresql_users"] or []):
        what = f"postgresql_users[{i}]"
        if not isinstance(u, dict) or set(u) - {"name", "password", "databases"} \
                or "name" not in u or "password" not in u:
            raise ValueError(f"{what}: write {{name: app, password: !vault NAME, databases: "
                             f"[app]}} (keys: name, password, databases)")
        name = _ident(u["name"], f"{what}.name")
        if name == "postgres":
            raise ValueError(f"{what}: postgres is the superuser, kept to local peer login")
        pw = u["password"]
        if not is_secret(pw):
            raise ValueError(f"{what}.password: must come from the vault (`password: !vault "
                             "NAME`), never plain text in the inventory")
        if not pw.reveal() or not pw.reveal().isascii():
            raise ValueError(f"{what}.password: the vault value must be non-empty ASCII "
                             "(non-ASCII passwords need SASLprep, which is not implemented)")
        dbs = u.get("databases") or []
        if not isinstance(dbs, list):
            raise ValueError(f"{what}.databases: a list of database names")
        users.append({"name": name, "password": pw,
                      "databases": [_ident(d, f"{what}.databases") for d in dbs]})
    if len({u["name"] for u in users}) != len(users):
        raise ValueError("postgresql_users: a name appears twice")
    for i, d in enumerate(v["postgresql_databases"] or []):
        what = f"postgresql_databases[{i}]"
        if not isinstance(d, dict) or set(d) - {"name", "owner", "encoding", "locale"} \
                or "name" not in d or "owner" not in d:
            raise ValueError(f"{what}: write {{name: app, owner: app}} (keys: name, owner, "
                             "encoding, locale)")
        name = _ident(d["name"], f"{what}.name")
        if name in NOT_MANAGED:
            raise ValueError(f"{what}.name: {name} is PostgreSQL's own database")
        owner = d["owner"]
        if owner != "postgres" and owner not in {u["name"] for u in users}:
            raise ValueError(f"{what}.owner: {owner!r} is neither postgres nor one of "
                             "postgresql_users; add the user first")
        encoding = d.get("encoding", "UTF8")
        locale = d.get("locale", "C.UTF-8")
        if not isinstance(encoding, str) or not re.fullmatch(r"[A-Za-z0-9_]+", encoding):
            raise ValueError(f"{what}.encoding: {encoding!r} is not an encoding name like UTF8")
        if not isinstance(locale, str) or not LOCALE_RE.match(locale):
            raise ValueError(f"{what}.locale: {locale!r} is not a locale name like C.UTF-8")
        databases.append({"name": name, "owner": owner, "encoding": encoding, "locale": locale,
                          "users": sorted(u["name"] for u in users
                                          if name in u["databases"] and u["name"] != owner)})
    if len({d["name"] for d in databases}) != len(databases):
        raise ValueError("postgresql_databases: a name appears twice")
    known = {d["name"] for d in databases}
    for i, u in enumerate(users):
        for d in u["databases"]:
            if d not in known:
                raise ValueError(f"postgresql_users[{i}].databases: {d!r} is not in "
                                 "postgresql_databases; declare it there (name, owner)")

    settings = {"listen_addresses": ",".join(["localhost", listen]), "port": port,
                "max_connections": maxconn, "shared_buffers": v["postgresql_shared_buffers"],
                "effective_cache_size": v["postgresql_effective_cache_size"],
                "work_mem": v["postgresql_work_mem"], "password_encryption": "scram-sha-256",
                "ssl": bool(v["postgresql_ssl"])}
    own = [f"{k} = {_conf_value(val)}" for k, val in settings.items()]
    lines = own + [f"{k} = {val}" for k, val in config_settings(
        "postgresql_settings", v["postgresql_settings"], file="postgresql.conf",
        name_re=SETTING_RE, managed=settings, bools=("on", "off"), quote=sql_literal).items()]

    extra = v["postgresql_hba_extra"] or []
    if not isinstance(extra, list) or any(not isinstance(x, str) or "\n" in x for x in extra):
        raise ValueError("postgresql_hba_extra: a list of one-line strings")

    rules = []
    kind = "hostssl" if v["postgresql_ssl"] else "host"
    for cidr, why in sources:
        for u in users:
            if u["databases"]:
                rules.append({"type": kind, "database": ",".join(u["databases"]),
                              "user": u["name"], "address": cidr, "why": why})
    return {"version": version, "cluster": cluster, **_paths(version, cluster),
            "listen": listen, "port": port, "settings": lines, "own_settings": own, "rules": rules,
            "hba_extra": list(extra), "upgrade": v["postgresql_upgrade"], "users": users, "databases": databases,
            "sources": sources}


# Debian's own PostgreSQL major per Debian version (what its `postgresql` package depends on)
DEBIAN_POSTGRESQL = {"12": "15", "13": "17"}


def _cluster_of(v: dict, ctx) -> tuple[str | None, str]:
    """(major version, cluster name). The version is postgresql_version, or the server's
    Debian default; None before the server is known (the pure check, which runs before any
    connection)."""
    cluster = v["postgresql_cluster"]
    if not isinstance(cluster, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*\Z", cluster):
        raise ValueError(f"postgresql_cluster: {cluster!r} is not a cluster name like 'main'")
    version = str(v["postgresql_version"])
    if version:
        if not re.fullmatch(r"[0-9]{2,3}\Z", version):
            raise ValueError(f"postgresql_version: {version!r} is not a major version like '17' "
                             "(or \"\" for the server's Debian default)")
        return version, cluster
    debian = (getattr(ctx, "os", None) or {}).get("version_id")
    if debian is None:
        return None, cluster
    if debian not in DEBIAN_POSTGRESQL:
        raise ValueError(f"postgresql_version: Debian {debian} has no default PostgreSQL known "
                         "to this role; set postgresql_version to the major version to install")
    return DEBIAN_POSTGRESQL[debian], cluster


def _paths(version: str | None, cluster: str) -> dict:
    if version is None:
        return {"cluster_id": None, "unit": None, "etc": None, "data": None}
    return {"cluster_id": f"{version}/{cluster}", "unit": f"postgresql@{version}-{cluster}",
            "etc": f"/etc/postgresql/{version}/{cluster}",
            "data": f"/var/lib/postgresql/{version}/{cluster}"}


def _tool(cmd: str, cluster_id: str, *args: str) -> list[str]:
    return ["python3", TOOL, cmd, "--cluster", cluster_id, *args]


def user_sql(name: str, verifier: str) -> str:
    return (f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"{sql_literal(name)}) THEN CREATE ROLE {_quote_ident(name)}; END IF; END$$;\n"
            f"ALTER ROLE {_quote_ident(name)} WITH LOGIN PASSWORD {sql_literal(verifier)};\n")


def database_sql(d: dict) -> str:
    q, lit = _quote_ident(d["name"]), sql_literal(d["name"])
    create = (f"CREATE DATABASE {q} OWNER {_quote_ident(d['owner'])} TEMPLATE template0 "
              f"ENCODING {sql_literal(d['encoding'])} LOCALE {sql_literal(d['locale'])}")
    keep = ", ".join(sql_literal(u) for u in d["users"])
    sql = [
        f"SELECT {sql_literal(create)} WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = {lit})",
        "\\gexec",
        f"ALTER DATABASE {q} OWNER TO {_quote_ident(d['owner'])};",
        f"REVOKE CONNECT, TEMPORARY ON DATABASE {q} FROM PUBLIC;",
        # users no longer listed lose CONNECT; the list is the whole truth
        "DO $$DECLARE r name; BEGIN FOR r IN SELECT g.rolname FROM pg_database d "
        "CROSS JOIN LATERAL aclexplode(d.datacl) a JOIN pg_roles g ON g.oid = a.grantee "
        f"WHERE d.datname = {lit} AND a.privilege_type = 'CONNECT' AND a.grantee <> d.datdba "
        f"AND g.rolname <> ALL (ARRAY[{keep}]::name[]) LOOP EXECUTE format("
        f"'REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM %I', {lit}, r); END LOOP; END$$;",
    ]
    if d["users"]:
        sql.append(f"GRANT CONNECT, TEMPORARY ON DATABASE {q} TO "
                   + ", ".join(_quote_ident(u) for u in d["users"]) + ";")
    return "\n".join(sql) + "\n"


def _majors(facts) -> list[str]:
    """The PostgreSQL majors with a config folder on the server, oldest first."""
    return sorted((name for name, e in (facts.dir("/etc/postgresql") or {}).items()
                   if e.get("type") == "dir" and name.isdigit()), key=int)


@dataclass(frozen=True)
class NoOtherMajor:
    """Refuses to put a second cluster of another major beside an existing one (a server
    upgraded from Debian 12 to 13 keeps its PostgreSQL 15 cluster, whose data the new 17 would
    not see): the run stops before anything is installed and says how to upgrade, unless
    postgresql_upgrade asks the role to do it (UpgradeCluster, after the install)."""
    version: str
    cluster: str
    upgrade: bool = False

    @property
    def id(self) -> str:
        return f"postgresql cluster {self.version}/{self.cluster}"

    def facts(self) -> dict:
        return {"dirs": ["/etc/postgresql"]}

    def plan(self, facts) -> list:
        majors = _majors(facts)
        others = [m for m in majors if m != self.version]
        if not others or self.version in majors:
            return [Noop(self.id, f"clusters on the server: {', '.join(majors) or 'none yet'}")]
        old = others[-1]
        if int(old) > int(self.version):
            raise PlanError(
                f"PostgreSQL {old} holds this server's data (/etc/postgresql/{old}) and "
                f"PostgreSQL {self.version} is older: a cluster is never downgraded. Set "
                f"postgresql_version: \"{old}\" (nothing was installed)")
        if self.upgrade:
            return [Noop(self.id, f"PostgreSQL {old}'s cluster {self.cluster} is upgraded to "
                                  f"{self.version} after the install (postgresql_upgrade)")]
        raise PlanError(
            f"PostgreSQL {old} already holds this server's data (/etc/postgresql/{old}) and "
            f"PostgreSQL {self.version} is the one to run now (postgresql_version, or the server's "
            f"Debian default): nothing was installed. To upgrade the data: set "
            f"postgresql_upgrade: true (the role runs `pg_upgradecluster {old} {self.cluster}`, "
            f"which keeps {old} stopped for a rollback; `pg_dropcluster {old} {self.cluster}` "
            f"once checked), or run that command as root yourself; to stay on {old}: set "
            f"postgresql_version: \"{old}\"")

    def expect(self, facts) -> dict:
        return {}


@dataclass(frozen=True)
class UpgradeCluster:
    """postgresql_upgrade: the newest older major's cluster becomes this version's, with
    Debian's pg_upgradecluster (dump and restore into a new cluster that takes the old one's
    port; the old one is kept, stopped and set to start manually). Runs after postgresql-N is
    installed: on a server with another cluster, installing it creates no cluster of its own."""
    version: str
    cluster: str

    @property
    def id(self) -> str:
        return f"postgresql upgrade to {self.version}/{self.cluster}"

    def facts(self) -> dict:
        return {"dirs": ["/etc/postgresql", f"/etc/postgresql/{self.version}"]}

    def plan(self, facts) -> list:
        if self.cluster in (facts.dir(f"/etc/postgresql/{self.version}") or {}):
            return [Noop(self.id, f"cluster {self.version}/{self.cluster} exists")]
        older = [m for m in _majors(facts) if int(m) < int(self.version)]
        if not older:
            return [Noop(self.id, "no older cluster on the server")]
        argv = ["pg_upgradecluster", "-v", self.version, older[-1], self.cluster]
        return [Change(self.id, "upgrade", f"PostgreSQL {older[-1]}'s cluster {self.cluster} "
                       f"holds the data, {self.version} has none", (run_step(argv),))]

    def expect(self, facts) -> dict:
        return {}


def resources(v, ctx):
    c = config(v, ctx)
    cid = c["cluster_id"]
    yield NoOtherMajor(c["version"], c["cluster"], c["upgrade"])
    # on a fresh server the cluster the package creates starts once, already on these settings
    # (listen_addresses would otherwise need a restart right after); not postgresql_settings:
    # PostgreSQL checks those in the drop-in below, before they are written anywhere
    yield from createcluster_file("50-provisioner.conf", "role postgresql", c["own_settings"])
    yield apt.packages([f"postgresql-{c['version']}"])
    if c["upgrade"]:
        yield UpgradeCluster(c["version"], c["cluster"])
    yield files.directory(TOOL_DIR, mode="0755")
    yield files.file(TOOL, TOOL_SOURCE, mode="0644")
    # the drop-in is checked by PostgreSQL itself (unknown names, bad values, ranges)
    yield templates.template(
        f"{c['etc']}/conf.d/50-provisioner.conf", "postgresql/provisioner.conf.j2",
        {"settings": c["settings"]}, mode="0644", owner="postgres", group="postgres",
        validate=["runuser", "-u", "postgres", "--", f"/usr/lib/postgresql/{c['version']}/bin/postgres",
                  "-D", c["data"], "--config-file={path}", "-C", "max_connections"],
        notify=HANDLER)
    yield templates.template(
        f"{c['etc']}/pg_hba.conf", "postgresql/pg_hba.conf.j2",
        {"rules": c["rules"], "extra": c["hba_extra"], "group": v["postgresql_client_group"]},
        mode="0640", owner="postgres", group="postgres", notify=HANDLER)
    yield systemd.service("postgresql", enabled=True, running=True)
    yield systemd.service(c["unit"], running=True)
    sql = _tool("sql", cid)
    for u in c["users"]:
        # a fresh salt each run; only sent when the check says the password differs
        verifier = Secret(pgtool["scram_verifier"](u["password"].reveal()))
        yield commands.command(sql, stdin=Secret(user_sql(u["name"], verifier.reveal())),
                               unless=_tool("password", cid, u["name"]),
                               unless_stdin=u["password"], name=f"postgresql role {u['name']}")
    for d in c["databases"]:
        yield commands.command(sql, stdin=database_sql(d),
                               unless=_tool("database", cid, d["name"], d["owner"], *d["users"]),
                               name=f"postgresql database {d['name']}")


def createcluster_file(name: str, role: str, settings: list[str]):
    """A drop-in of createcluster.conf's include folder, and its folders: settings ("name =
    value") that pg_createcluster copies into the clusters it creates from now on, as the one
    a server package creates when it is installed. Before that package in a role, the package
    batch writes it first (apt_batch), so that cluster starts on them. The cluster's own
    conf.d stays what the role manages; this only spares the restart its first change would
    need. '%' is doubled: pg_createcluster reads %v and %c in these values."""
    yield files.directory("/etc/postgresql-common")
    yield files.directory(CREATECLUSTER_D)
    kept = [x.replace("%", "%%") for x in settings if x.strip() and not x.startswith("#")
            and x.split("=", 1)[0].strip() not in NOT_FOR_NEW_CLUSTERS]
    yield files.file(f"{CREATECLUSTER_D}/{name}",
                     f"# Managed by provisioner ({role}): for the clusters created from now on\n"
                     + "".join(x + "\n" for x in kept))


def handlers(v, ctx):
    c = _paths(*_cluster_of(v, ctx))
    cid, unit = c["cluster_id"], c["unit"]
    # A reload never loads a pg_hba.conf PostgreSQL rejects (it keeps the old rules) but does
    # apply the other settings; a restart with such a file would not come back up, hence the
    # check before `settle` (restart only if a setting needs it). If the check fails, the guard
    # restores the file and runs the reload and settle again.
    return {HANDLER: _apply(cid, unit)[:1] + [run_step(_tool("hba", cid))] + _apply(cid, unit)[1:]}


def _apply(cid: str, unit: str) -> list[dict]:
    return [*systemd.handler("reload", unit), run_step(_tool("settle", cid, unit))]


def _connection(host, inventory) -> Connection:
    conn = Connection(host, inventory.known_hosts, host.sudo_password)
    try:
        conn.open()
        return conn
    except Unreachable as e:              # a first run that came in as the bootstrap user
        if not host.bootstrap_user or "authentication failed" not in str(e):
            raise
    conn = Connection(host, inventory.known_hosts, host.sudo_password, user=host.bootstrap_user)
    conn.open()
    return conn


def guards(v, ctx):
    """pg_hba.conf has no offline validator: after the change, PostgreSQL's pg_hba_file_rules
    must show no error rows, or the previous file comes back (and is reloaded)."""
    c = _paths(*_cluster_of(v, ctx))
    cid, unit, path = c["cluster_id"], c["unit"], f"{c['etc']}/pg_hba.conf"

    def check(host):
        with _connection(host, ctx.inventory) as conn:
            r = conn.run(_tool("hba", cid))
        if r.rc != 0:
            out = (r.stdout + r.stderr).decode("utf-8", "replace").strip()
            raise RuntimeError(f"PostgreSQL rejects pg_hba.conf: {out or 'exit %d' % r.rc}")
    return [Guard("pg_hba.conf accepted by PostgreSQL", (path,), check,
                  after_rollback=tuple(_apply(cid, unit)))]

"""Role `mongodb`: MongoDB (>= 5.0, default 7.0) on Debian.

Where the packages come from
  * MongoDB's apt repository (default): a deb822 /etc/apt/sources.list.d/mongodb-org-<v>.sources
    whose Signed-By is /etc/apt/keyrings/mongodb-org-<v>.asc, the key given in
    `mongodb_repo_key_b64` or fetched on the server from `mongodb_repo_key_url` (the vendor
    publishes one key per release series). Files of other series are removed, so an upgrade
    7.0 -> 8.0 leaves one repository.
  * `mongodb_packages_dir`, a folder of .debs on the controller (hosts without internet): when a
    .deb's package is not installed at the .deb's version, the run uploads the .debs that are
    needed (inside its one apply exec, like every file this engine writes), installs them with
    `apt-get install /path/x.deb ...` (apt resolves their dependencies from the host's Debian
    sources, as for any package), and deletes the uploads. A converged run only compares
    dpkg's versions with the .debs' control fields: nothing is uploaded or hashed. Chosen over
    a local apt repository on the server: no index to generate and sign there, no
    `[trusted=yes]` source left behind, nothing kept on disk.
  * `mongodb_install: false`: only the repository's files (no apt-get update: for a host that
    cannot reach the repository yet; the run that installs updates the lists first).

The server (`mongodb_server: true`)
  /etc/mongod.conf from templates/mongodb/mongod.conf.j2: bindIp 127.0.0.1 + the private
  address, authorization enabled, port, cacheSizeGB, log to a file. A changed file restarts a
  running mongod at once (`systemctl try-restart`), so the scripts below already talk to the new
  configuration. mongod.service enabled and running.

Users and init: mongosh scripts fed on stdin (`mongosh --nodb --file /dev/stdin`), never argv
  * users (templates/mongodb/users.js.j2): admin (root) and the app user (mongodb_app_roles on
    mongodb_app_database). The first admin is created through MongoDB's localhost exception;
    the app user is created or updated. The script runs when the marker file
    <dbPath>/.provisioner-users differs from a digest of the users' spec and passwords:
    sha256 over the names, roles and PBKDF2-SHA256 (200k rounds, salted with the host name)
    of each password. So a password changed in the vault is a changed digest: the script runs
    and sets it (the app user's with updateUser; the admin's needs the old password once, in
    `mongodb_admin_password_previous`). A password changed on the server behind the role's back
    is NOT detected (the marker still matches). The marker lives in dbPath: a wiped data
    directory loses it and the users are created again.
  * init (templates/mongodb/init.js.j2), one script per `mongodb_init` entry (a database):
    collections (created if absent; validator options applied with collMod), indexes
    (createIndex), seed documents (each must have an _id; inserted only when that _id is absent,
    so a re-run never duplicates nor overwrites). Run once per spec: the sha256 of the entry and
    of its seed files' bytes goes into the marker <dbPath>/.provisioner-init-<db> and into the
    tracking collection provisioner.init; a changed spec (or seed file) runs it again.
"""
import base64
import binascii
import hashlib
import io
import json
import posixpath
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.api import (Change, Facts, Noop, abs_path, apt, directory_step, file_fact, files,
                             is_secret, private_address, render, run_step, systemd, templates,
                             write_step)

MONGOSH = ("mongosh", "--quiet", "--nodb", "--norc", "--file", "/dev/stdin")
STAGING = "/var/lib/provisioner/mongodb-debs"
WAIT_SECONDS = 60                  # how long the scripts wait for a (re)started mongod to answer
PBKDF2_ROUNDS = 200_000
SERIES_RE = re.compile(r"^(\d+)\.(\d+)\Z")
DB_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}\Z")
USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}\Z")
ROLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}\Z")
COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,119}\Z")
RESERVED_DBS = ("admin", "local", "config", "provisioner")
INDEX_KEY_TYPES = (1, -1, "text", "2dsphere", "2d", "hashed")
INDEX_OPTIONS = ("name", "unique", "sparse", "expireAfterSeconds", "partialFilterExpression",
                 "collation", "hidden", "weights", "default_language", "language_override",
                 "textIndexVersion", "2dsphereIndexVersion", "bits", "min", "max",
                 "wildcardProjection")
COLLECTION_OPTIONS = ("capped", "size", "max", "validator", "validationLevel",
                      "validationAction", "timeseries", "expireAfterSeconds", "collation",
                      "clusteredIndex", "changeStreamPreAndPostImages", "storageEngine",
                      "indexOptionDefaults")


def _bad(var: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{var}: {problem}; {fix}")


# --- vars ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    version: str
    install: bool
    server: bool
    packages: tuple[str, ...]
    packages_dir: Path | None
    port: int
    bind_ip: tuple[str, ...]
    ipv6: bool
    cache_size_gb: float | int | None
    db_path: str
    log_path: str


def series(v) -> tuple[int, int]:
    m = SERIES_RE.match(str(v["mongodb_version"]))
    if not m:
        raise _bad("mongodb_version", f"{v['mongodb_version']!r} is not a release series",
                   'write major.minor as a string, e.g. mongodb_version: "7.0"')
    major, minor = int(m.group(1)), int(m.group(2))
    if major < 5:
        raise _bad("mongodb_version", f"{major}.{minor} is older than 5.0",
                   "use 5.0 or newer (7.0 is the default)")
    return major, minor


def _base_dir(v, ctx) -> Path:
    return Path(ctx.inventory.path).resolve().parent


def _local_path(v, ctx, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else _base_dir(v, ctx) / p


def bind_addresses(v, ctx) -> tuple[tuple[str, ...], bool]:
    """127.0.0.1 plus the private address (bindIp), and whether one of them is IPv6."""
    addr = private_address("mongodb_bind_address", v["mongodb_bind_address"], ctx.host, "mongod")
    out = ["127.0.0.1"]
    if str(addr) not in out:
        out.append(str(addr))
    return tuple(out), addr.version == 6


def check(v, ctx) -> Settings:
    return settings(v, ctx)         # every var is judged there, from the inventory alone


def settings(v, ctx) -> Settings:
    major, minor = series(v)
    for var in ("mongodb_install", "mongodb_server", "mongodb_apt_update"):
        if not isinstance(v[var], bool):
            raise _bad(var, f"{v[var]!r} is not true or false", f"write {var}: true or false")
    pkgs = v["mongodb_packages"]
    if not isinstance(pkgs, list) or not pkgs or not all(
            isinstance(p, str) and apt.PKG_RE.match(p) for p in pkgs):
        raise _bad("mongodb_packages", f"{pkgs!r} is not a list of Debian package names",
                   "e.g. [mongodb-org-server, mongodb-mongosh]")
    pdir = None
    if v["mongodb_packages_dir"]:
        pdir = _local_path(v, ctx, v["mongodb_packages_dir"])
        if not pdir.is_dir():
            raise _bad("mongodb_packages_dir", f"{pdir} is not a folder on this machine",
                       "point it at the folder of .debs (relative paths start at the "
                       "inventory's folder), or leave it empty to use the repository")
        if not v["mongodb_install"]:
            raise _bad("mongodb_install", "is false while mongodb_packages_dir is set: there is "
                       "no repository to set up and nothing would be done",
                       "set mongodb_install: true, or empty mongodb_packages_dir")
    port = v["mongodb_port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535:
        raise _bad("mongodb_port", f"{port!r} is not a port from 1024 to 65535",
                   "mongod runs as the unprivileged mongodb user: e.g. 27017")
    cache = v["mongodb_cache_size_gb"]
    if cache is not None and (isinstance(cache, bool) or not isinstance(cache, (int, float))
                              or not 0.25 <= cache <= 10000):
        raise _bad("mongodb_cache_size_gb", f"{cache!r} is not a number from 0.25 to 10000",
                   "give the WiredTiger cache in GB (e.g. 1.5), or null for mongod's default")
    paths = {}
    for var in ("mongodb_db_path", "mongodb_log_path"):
        value = v[var]
        try:
            abs_path(value)
        except ValueError:
            raise _bad(var, f"{value!r} is not an absolute, normalised path",
                       "e.g. /var/lib/mongodb") from None
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", value) or value.count("/") < 2:
            raise _bad(var, f"{value!r} must be a path below a top-level folder, made of "
                       "letters, digits and _ . - /", "e.g. /var/lib/mongodb")
        paths[var] = value
    bind_ip, ipv6 = bind_addresses(v, ctx) if v["mongodb_server"] else (("127.0.0.1",), False)
    return Settings(version=f"{major}.{minor}", install=v["mongodb_install"],
                    server=v["mongodb_server"], packages=tuple(dict.fromkeys(pkgs)),
                    packages_dir=pdir, port=port, bind_ip=bind_ip, ipv6=ipv6,
                    cache_size_gb=cache, db_path=paths["mongodb_db_path"],
                    log_path=paths["mongodb_log_path"])


# --- repository ---------------------------------------------------------------------------------

def repo_name(version: str) -> str:
    return f"mongodb-org-{version}"


def repository(v, ctx, version: str, update: bool) -> apt.Repository:
    suite = v["mongodb_repo_suite"]
    if not suite:
        codename = (ctx.os or {}).get("codename")
        if not codename:
            raise _bad("mongodb_repo_suite", "the host's Debian codename is unknown",
                       f'set it, e.g. "bookworm/mongodb-org/{version}"')
        suite = f"{codename}/mongodb-org/{version}"
    key_b64 = v["mongodb_repo_key_b64"] or None
    key_url = None
    if key_b64 is not None:
        try:
            raw = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("mongodb_repo_key_b64", "is not valid base64",
                       "write `base64 -w0 server-X.Y.asc` of the key file") from None
        if not (raw.lstrip().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
                or raw[:1] and raw[0] & 0x80):
            raise _bad("mongodb_repo_key_b64", "does not decode to an OpenPGP public key "
                       "(armored .asc or binary .gpg)", "encode the key file itself in base64")
    else:
        template = v["mongodb_repo_key_url"]
        if not template or "{" in template.replace("{version}", ""):
            raise _bad("mongodb_repo_key_url", f"{template!r} is not a URL template",
                       "give an https URL; {version} is replaced by mongodb_version")
        key_url = template.replace("{version}", version)
    sha = v["mongodb_repo_key_sha256"] or None
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _bad("mongodb_repo_key_sha256", "is not 64 lowercase hex digits",
                   "write the output of `sha256sum` of the key file, or leave it empty")
    if sha is not None and key_b64 is not None:
        raise _bad("mongodb_repo_key_sha256", "pins a downloaded key, but mongodb_repo_key_b64 "
                   "gives the key itself", "leave mongodb_repo_key_sha256 empty")
    try:
        return apt.repository(repo_name(version), v["mongodb_repo_uri"], [suite], ["main"],
                              key_b64=key_b64, key_url=key_url, key_sha256=sha, update=update)
    except ValueError as e:
        raise _bad("mongodb_repo_uri / mongodb_repo_suite / mongodb_repo_key_url", str(e),
                   "fix the value the message names") from None


def other_series_files(version: str) -> tuple[str, ...]:
    """Files this role would have written for other release series (5.0 up to a few majors
    past this one)."""
    major = int(version.split(".")[0])
    out: list[str] = []
    for m in range(5, max(major, 8) + 2):
        for n in range(0, 4):
            s = f"{m}.{n}"
            if s == version:
                continue
            name = repo_name(s)
            out += [f"{apt.SOURCES}/{name}.sources", f"{apt.SOURCES}/{name}.list",
                    f"{apt.KEYRINGS}/{name}.asc", f"{apt.KEYRINGS}/{name}.gpg"]
    return tuple(out)


@dataclass(frozen=True)
class OtherSeries:
    """Removes the repository files of other release series, so that a change of
    mongodb_version (7.0 -> 8.0) leaves one MongoDB repository; one resource, one reason."""
    version: str
    paths: tuple[str, ...]

    @property
    def id(self) -> str:
        return "mongodb repositories of other series"

    def facts(self) -> dict:
        return {"files": list(self.paths)}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        present = [p for p in self.paths if facts.file(p).exists]
        if not present:
            return [Noop(self.id, f"none: only {self.version} is configured")]
        return [Change(self.id, "remove", "present: " + ", ".join(present),
                       (run_step(["rm", "-f", "--", *present]),))]

    def expect(self, facts: Facts) -> dict:
        return {"files": {p: {"__replace__": True, "exists": False} for p in self.paths}}


def other_series(version: str) -> OtherSeries:
    return OtherSeries(version, other_series_files(version))


# --- .debs from a folder ------------------------------------------------------------------------

@dataclass(frozen=True)
class Deb:
    path: Path
    package: str
    version: str
    architecture: str
    size: int


def _control_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and last:
            fields[last] += "\n" + line.strip()
        elif ":" in line:
            k, _, val = line.partition(":")
            last = k.strip()
            fields[last] = val.strip()
    return fields


def _control_from_tar(name: str, data: bytes) -> str | None:
    if name.endswith(".zst"):
        return None                     # Python's tarfile cannot read zstd: ask dpkg-deb
    mode = "r:*"
    with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
        for member in tar.getmembers():
            if member.name.lstrip("./") == "control" and member.isfile():
                f = tar.extractfile(member)
                return f.read().decode("utf-8", "replace") if f else None
    raise ValueError("no control file in its control archive")


def read_deb(path: Path) -> Deb:
    """Package, Version and Architecture of a .deb, read from its control member (ar archive
    of debian-binary, control.tar.*, data.tar.*) without reading the data part."""
    size = path.stat().st_size
    text = None
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path} is not a .deb (no ar archive header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            length = int(header[48:58].decode("ascii").strip())
            if name.startswith("control.tar"):
                text = _control_from_tar(name, f.read(length))
                if text is None and shutil.which("dpkg-deb"):
                    text = subprocess.run(["dpkg-deb", "--field", str(path)], check=True,
                                          capture_output=True, text=True).stdout
                elif text is None:
                    raise ValueError(f"{path}: its control archive is zstd-compressed; "
                                     "install dpkg (dpkg-deb) on this machine to read it")
                break
            f.seek(length + (length & 1), 1)
    if text is None:
        raise ValueError(f"{path} has no control archive: not a Debian package")
    fields = _control_fields(text)
    pkg, ver = fields.get("Package", ""), fields.get("Version", "")
    if not apt.PKG_RE.match(pkg) or not ver:
        raise ValueError(f"{path}: control file without a valid Package/Version")
    return Deb(path=path, package=pkg, version=ver,
               architecture=fields.get("Architecture", ""), size=size)


SERVER_PACKAGES = ("mongodb-org-server", "mongodb-org", "mongodb-enterprise-server",
                   "mongodb-enterprise")
MONGOSH_PACKAGES = ("mongodb-mongosh", "mongodb-mongosh-shared-openssl3",
                    "mongodb-mongosh-shared-openssl11", "mongodb-org", "mongodb-enterprise")


def check_server_packages(names: tuple[str, ...], where: str) -> None:
    """A server needs mongod, and mongosh for the users and the init."""
    plain = {n.split("=")[0] for n in names}
    for wanted, what in ((SERVER_PACKAGES, "mongod"), (MONGOSH_PACKAGES, "mongosh")):
        if not plain & set(wanted):
            raise _bad("mongodb_packages", f"none of {sorted(plain)} {where} provides {what}",
                       f"add one of {', '.join(wanted)} (the role runs mongod and sets up "
                       "users and the init with mongosh), or set mongodb_server: false")


def debs_in(folder: Path, wanted: tuple[str, ...]) -> tuple[Deb, ...]:
    found = sorted(folder.glob("*.deb"))
    if not found:
        raise _bad("mongodb_packages_dir", f"{folder} holds no .deb file",
                   "put the .debs of MongoDB (e.g. mongodb-org-server, mongodb-mongosh) in it")
    debs: dict[str, Deb] = {}
    for p in found:
        try:
            d = read_deb(p)
        except (OSError, ValueError, tarfile.TarError, subprocess.CalledProcessError) as e:
            raise _bad("mongodb_packages_dir", f"cannot read {p.name}: {e}",
                       "remove the file or replace it with a valid .deb") from None
        if d.package in debs:
            raise _bad("mongodb_packages_dir", f"{debs[d.package].path.name} and {p.name} are "
                       f"both package {d.package}", "keep one version of each package")
        debs[d.package] = d
    missing = [n for n in wanted if n.split("=")[0] not in debs]
    if missing:
        raise _bad("mongodb_packages", f"{', '.join(missing)} not among the .debs of {folder} "
                   f"({', '.join(sorted(debs))})", "add their .debs, or list only packages "
                   "the folder has")
    return tuple(debs.values())


@dataclass(frozen=True)
class DebInstall:
    """Install the .debs whose package is not at the .deb's version (upload, apt-get install,
    delete the uploads), in one change."""
    folder: str
    debs: tuple[Deb, ...]
    update: bool = True

    @property
    def id(self) -> str:
        return "debs " + " ".join(d.package for d in self.debs)

    def facts(self) -> dict:
        return {"packages": [d.package for d in self.debs]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        todo, why = [], []
        for d in self.debs:
            have = facts.package(d.package)
            if have != d.version:
                todo.append(d)
                why.append(f"{d.package} {have or 'absent'} != {d.version}")
        if not todo:
            return [Noop(self.id, "already installed from " + self.folder + ": " + ", ".join(
                f"{d.package} {d.version}" for d in self.debs))]
        steps: list[dict] = [run_step(["rm", "-rf", "--", STAGING]),
                             directory_step(STAGING, "0755", "root", "root")]
        remote = []
        for d in todo:
            target = f"{STAGING}/{d.path.name}"
            remote.append(target)
            steps.append(write_step(target, d.path.read_bytes(), "0644", "root", "root"))
        stale = facts.apt_lists_age is None or facts.apt_lists_age > 3600
        if self.update and stale:
            steps.extend(apt.update_steps())
        steps.append(run_step([*apt.APT_GET, *apt.CONFFILES, "install", "--no-install-recommends",
                            *remote]))
        steps.append(run_step(["rm", "-rf", "--", STAGING]))
        size = sum(d.size for d in todo)
        return [Change(self.id, "install",
                       "; ".join(why) + f" (uploading {len(todo)} .deb(s), "
                       f"{size / 1e6:.1f} MB, from {self.folder})", tuple(steps))]

    def expect(self, facts: Facts) -> dict:
        frag: dict = {"packages": {"installed": {d.package: d.version for d in self.debs}}}
        if self.update and (facts.apt_lists_age is None or facts.apt_lists_age > 3600):
            frag["packages"]["lists_age"] = 0
        return frag


# --- mongosh scripts, run once per spec ---------------------------------------------------------

@dataclass(frozen=True)
class MongoScript:
    """A mongosh script (on stdin) run when the marker file does not hold `digest`; the marker
    is written after the script succeeded."""
    name: str
    script: str = field(repr=False)
    marker: str = ""
    digest: str = field(default="", repr=False)
    describe: str = ""                 # what the digest covers, for the reasons shown

    @property
    def id(self) -> str:
        return f"mongodb {self.name}"

    def facts(self) -> dict:
        return {"files": [self.marker]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        f = facts.file(self.marker)
        if f.exists and f.type == "file" and (f.content or "").strip() == self.digest:
            return [Noop(self.id, f"up to date: {self.marker} matches {self.describe}")]
        why = (f"{self.marker} absent: never run on this data directory" if not f.exists
               else f"{self.describe} changed since the last run ({self.marker} differs)")
        steps = (run_step(list(MONGOSH), stdin=self.script),
                 write_step(self.marker, self.digest + "\n", "0600", "root", "root"))
        return [Change(self.id, "run", why, steps)]

    def expect(self, facts: Facts) -> dict:
        return {"files": {self.marker: file_fact(self.marker, self.digest + "\n", "0600",
                                                   "root", "root", facts.file(self.marker))}}


def _password_digest(secret, salt: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", str(secret.reveal()).encode("utf-8"),
                               salt.encode("utf-8"), PBKDF2_ROUNDS).hex()


def _need_secret(v, var: str, optional: bool = False):
    value = v[var]
    if optional and value is None:
        return None
    if not is_secret(value):
        raise _bad(var, "must be a vault reference (`!vault NAME`)" if value is not None
                   else "is not set", f"write `{var}: !vault NAME` and store the password in "
                   "the vault")
    if not value.reveal():
        raise _bad(var, "the vault holds an empty password", "store a real password")
    return value


def users_spec(v) -> dict:
    for var in ("mongodb_admin_user", "mongodb_app_user"):
        if not isinstance(v[var], str) or not USER_RE.match(v[var]):
            raise _bad(var, f"{v[var]!r} is not a user name",
                       "use letters, digits and _ . @ - (at most 128)")
    db = v["mongodb_app_database"]
    if not isinstance(db, str) or not DB_RE.match(db) or db in RESERVED_DBS:
        raise _bad("mongodb_app_database", f"{db!r} is not a database name the app may own",
                   "letters, digits, _ and - (at most 63), not admin, local, config or "
                   "provisioner")
    roles = v["mongodb_app_roles"]
    if not isinstance(roles, list) or not roles or not all(
            isinstance(r, str) and ROLE_RE.match(r) for r in roles):
        raise _bad("mongodb_app_roles", f"{roles!r} is not a list of role names",
                   "e.g. [readWrite] or [readWrite, dbAdmin]")
    return {"admin": {"user": v["mongodb_admin_user"]},
            "app": {"user": v["mongodb_app_user"], "db": db, "roles": list(dict.fromkeys(roles))}}


def users_script(v, ctx, s: Settings) -> MongoScript:
    spec = users_spec(v)
    admin_pw = _need_secret(v, "mongodb_admin_password")
    app_pw = _need_secret(v, "mongodb_app_password")
    previous = _need_secret(v, "mongodb_admin_password_previous", optional=True)
    salt = f"provisioner/mongodb/{ctx.host.name}"
    digest = hashlib.sha256(json.dumps({
        "spec": spec,
        "admin_password": _password_digest(admin_pw, salt + "/" + spec["admin"]["user"]),
        "app_password": _password_digest(app_pw, salt + "/" + spec["app"]["user"]),
    }, sort_keys=True).encode()).hexdigest()
    rendered = render_users_js(spec, s.port, admin_pw, app_pw, previous)
    return MongoScript("users", rendered, f"{s.db_path}/.provisioner-users", digest,
                       "the users, their roles and passwords")


def render_users_js(spec: dict, port: int, admin_pw, app_pw, previous=None,
                    wait_seconds: int = WAIT_SECONDS) -> str:
    return render("mongodb/users.js.j2", {
        "port": port, "wait_seconds": wait_seconds, "spec_json": json.dumps(spec),
        "admin_password": admin_pw, "app_password": app_pw,
        "admin_password_previous": previous}).text


# --- database init ------------------------------------------------------------------------------

def _check_keys(var: str, where: str, got: dict, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in got if k not in allowed]
    if unknown:
        raise _bad(var, f"{where}: unknown key(s) {unknown}", f"allowed: {', '.join(allowed)}")


def _index(var: str, where: str, ix: Any) -> dict:
    if not isinstance(ix, dict) or not isinstance(ix.get("keys"), dict) or not ix["keys"]:
        raise _bad(var, f"{where}: {ix!r} is not an index", "write {keys: {field: 1}, "
                   "<options like unique: true>}")
    for k, t in ix["keys"].items():
        if not isinstance(k, str) or not k or k.startswith("$") and k != "$**" or \
                isinstance(t, bool) or t not in INDEX_KEY_TYPES:
            raise _bad(var, f"{where}: index key {k!r}: {t!r}", "a field name with 1, -1, "
                       "text, 2dsphere, 2d or hashed")
    options = {k: val for k, val in ix.items() if k != "keys"}
    _check_keys(var, where, options, INDEX_OPTIONS)
    return {"keys": ix["keys"], "options": options}


def _seed(var: str, where: str, item: Any, base: Path) -> dict:
    if isinstance(item, str):
        item = {"file": item}
    if not isinstance(item, dict) or not isinstance(item.get("file"), str) or not item["file"]:
        raise _bad(var, f"{where}: {item!r} is not a seed", "write a file path, or "
                   "{file: path, collection: name}")
    _check_keys(var, where, item, ("file", "collection"))
    path = Path(item["file"]).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise _bad(var, f"{where}: seed file {path} does not exist on this machine",
                   "relative paths start at mongodb_init_dir (default: the inventory's folder)")
    name = path.name
    collection = item.get("collection") or name.split(".", 1)[0]
    if not COLLECTION_RE.match(collection) or collection.startswith("system."):
        raise _bad(var, f"{where}: {collection!r} is not a collection name",
                   "name it with {file: ..., collection: name}")
    fmt = "ndjson" if name.endswith((".ndjson", ".jsonl")) else "json"
    if fmt == "json" and not name.endswith(".json"):
        raise _bad(var, f"{where}: {name} is neither .json (an array of documents) nor "
                   ".ndjson/.jsonl (one document per line)", "rename it after its format")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        docs = ([json.loads(line) for line in text.splitlines() if line.strip()]
                if fmt == "ndjson" else json.loads(text))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(var, f"{where}: {path} is not valid JSON: {e}",
                   "fix the file (MongoDB Extended JSON)") from None
    if not isinstance(docs, list):
        raise _bad(var, f"{where}: {path} holds {type(docs).__name__}, not an array of "
                   "documents", "wrap the documents in [ ... ]")
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or "_id" not in d:
            raise _bad(var, f"{where}: {path}: document {i + 1} has no _id", "give every seed "
                       "document an _id: a re-run inserts only the _ids that are missing, "
                       "so seeds are never duplicated")
    return {"file": name, "collection": collection, "format": fmt,
            "sha256": hashlib.sha256(raw).hexdigest(), "text": text, "documents": len(docs)}


def init_specs(v, ctx) -> list[dict]:
    """`mongodb_init`, checked and resolved: per database, its collections and indexes, and its
    seed files (read here, on the controller) with their sha256; plus the spec's sha256."""
    var = "mongodb_init"
    entries = v[var]
    if not isinstance(entries, list):
        raise _bad(var, f"{entries!r} is not a list", "write a list of {db, collections, seed}")
    base = _local_path(v, ctx, v["mongodb_init_dir"]) if v["mongodb_init_dir"] else \
        _base_dir(v, ctx)
    out, seen = [], set()
    for n, e in enumerate(entries):
        where = f"entry {n + 1}"
        if not isinstance(e, dict):
            raise _bad(var, f"{where} is not a mapping", "write {db: name, collections: [...], "
                       "seed: [...]}")
        _check_keys(var, where, e, ("db", "collections", "seed"))
        db = e.get("db")
        if not isinstance(db, str) or not DB_RE.match(db) or db in RESERVED_DBS:
            raise _bad(var, f"{where}: db {db!r} is not a database name the init may own",
                       "letters, digits, _ and - (at most 63), not admin, local, config or "
                       "provisioner")
        if db in seen:
            raise _bad(var, f"{where}: db {db} appears twice", "merge the two entries")
        seen.add(db)
        where = f"db {db}"
        collections = []
        names = set()
        for c in e.get("collections") or []:
            if isinstance(c, str):
                c = {"name": c}
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or \
                    not COLLECTION_RE.match(c["name"]) or c["name"].startswith("system."):
                raise _bad(var, f"{where}: {c!r} is not a collection", "write {name: users, "
                           "indexes: [{keys: {email: 1}, unique: true}]}")
            _check_keys(var, f"{where}, collection {c['name']}", c,
                        ("name", "options", "indexes"))
            if c["name"] in names:
                raise _bad(var, f"{where}: collection {c['name']} appears twice",
                           "merge the two entries")
            names.add(c["name"])
            options = c.get("options") or {}
            if not isinstance(options, dict):
                raise _bad(var, f"{where}, collection {c['name']}: options must be a mapping",
                           "e.g. {validator: {...}}")
            _check_keys(var, f"{where}, collection {c['name']} options", options,
                        COLLECTION_OPTIONS)
            indexes = c.get("indexes") or []
            if not isinstance(indexes, list):
                raise _bad(var, f"{where}, collection {c['name']}: indexes must be a list",
                           "e.g. [{keys: {email: 1}, unique: true}]")
            collections.append({"name": c["name"], "options": options,
                                "indexes": [_index(var, f"{where}, collection {c['name']}", ix)
                                            for ix in indexes]})
        seed_items = e.get("seed") or []
        if not isinstance(seed_items, list):
            raise _bad(var, f"{where}: seed must be a list", "e.g. [seeds/users.json]")
        seeds = [_seed(var, f"{where}, seed {i + 1}", s, base) for i, s in enumerate(seed_items)]
        public = {"db": db, "collections": collections,
                  "seeds": [{k: s[k] for k in ("file", "collection", "format", "sha256")}
                            for s in seeds]}
        sha = hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()
        out.append({**public, "sha256": sha, "seed_texts": [s["text"] for s in seeds]})
    return out


def render_init_js(spec: dict, port: int, admin_user: str, admin_pw,
                   wait_seconds: int = WAIT_SECONDS) -> str:
    public = {k: spec[k] for k in ("db", "sha256", "collections", "seeds")}
    return render("mongodb/init.js.j2", {
        "port": port, "wait_seconds": wait_seconds, "db": spec["db"],
        "admin_user": admin_user, "admin_password": admin_pw,
        "spec_json": json.dumps(public), "seed_texts_json": json.dumps(spec["seed_texts"]),
    }).text


def init_scripts(v, ctx, s: Settings) -> list[MongoScript]:
    admin_pw = _need_secret(v, "mongodb_admin_password")
    out = []
    for spec in init_specs(v, ctx):
        out.append(MongoScript(f"init {spec['db']}",
                               render_init_js(spec, s.port, v["mongodb_admin_user"], admin_pw),
                               f"{s.db_path}/.provisioner-init-{spec['db']}", spec["sha256"],
                               f"init spec {spec['sha256'][:12]}"))
    return out


# --- mongod.conf --------------------------------------------------------------------------------

def config_vars(s: Settings) -> dict:
    return {"db_path": s.db_path, "log_path": s.log_path, "port": s.port,
            "bind_ip": list(s.bind_ip), "ipv6": s.ipv6, "cache_size_gb": s.cache_size_gb}


def render_config(s: Settings) -> str:
    return render("mongodb/mongod.conf.j2", config_vars(s)).text


# --- the role -----------------------------------------------------------------------------------

def resources(v, ctx):
    s = settings(v, ctx)
    if not s.install:
        yield repository(v, ctx, s.version, update=False)
        yield other_series(s.version)
        return
    if s.packages_dir is not None:
        yield DebInstall(str(s.packages_dir), debs_in(s.packages_dir, s.packages),
                         update=v["mongodb_apt_update"])
    else:
        yield repository(v, ctx, s.version, update=True)
        yield other_series(s.version)
        # lists older than 0 s: a package to install refreshes them first, unless the
        # repository change just did (the lists must know the repository's packages)
        yield apt.packages(list(s.packages), update_cache_max_age=0)
    if not s.server:
        return
    # check everything that can be wrong before anything is planned
    check_server_packages(s.packages, "(mongodb_packages)")
    users = users_script(v, ctx, s)
    inits = init_scripts(v, ctx, s)
    yield templates.template("/etc/mongosh.conf", "mongodb/mongosh.conf.j2", {}, mode="0644")
    yield files.directory(s.db_path, mode="0750", owner="mongodb", group="mongodb")
    yield files.directory(posixpath.dirname(s.log_path), mode="0750", owner="mongodb",
                          group="mongodb")
    yield templates.template("/etc/mongod.conf", "mongodb/mongod.conf.j2", config_vars(s),
                             mode="0644", after=[["systemctl", "try-restart", "mongod.service"]])
    yield systemd.service("mongod", enabled=True, running=True)
    yield users
    yield from inits

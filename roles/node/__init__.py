"""Role `node`: Node.js >= 18 and npm, the app's system user, the apps' folders under /srv.

Node.js comes from Debian by default (Debian 12: nodejs 18 and npm 9). With
`node_nodesource_major` set, `nodejs` comes from NodeSource's apt repository instead: a deb822
source signed by NodeSource's key (`node_nodesource_key_url` or `node_nodesource_key_b64`), and
an apt preferences file that pins `nodejs` to that origin (priority 1001: NodeSource's build
wins over Debian's, and a change of major may downgrade). NodeSource's `nodejs` bundles npm, so
Debian's `npm` (which it conflicts with) is not installed then. An existing nodejs of another
major (e.g. Debian's 18 before the switch) is replaced: `apt.packages` alone would find "nodejs"
present and keep it.

npm: Debian's `npm` package by default (`node_npm: debian`), updated with Debian's security
updates. It brings about 330 packages of JavaScript libraries, one dpkg install each: most of a
fresh app server's apt time. `node_npm: registry` installs npm itself from its registry tarball
instead, at the version pinned by `node_npm_version` and checked against `node_npm_integrity`
(the registry's sha512; the role knows it for its default version), fetched on the server from
`node_npm_registry` or, when that is null, the `registry` of the server's npm config
(/etc/npmrc), through the proxy and CA that config names (roles/node/npm_install.py). It goes
where `npm install -g npm` would put it (/usr/local/lib/node_modules/npm, links in
/usr/local/bin) with the builtin config Debian's npm has: /etc/npmrc stays npm's global config
and global packages go to /usr/local. Debian's `npm` package is then removed (its libraries stay,
as packages `apt autoremove` may reap), so that one npm is on PATH. Its updates are then yours:
a new pin in the inventory, or in this role. With NodeSource's nodejs, npm comes bundled with it.
Going back to `node_npm: debian` installs Debian's npm but leaves this one, first on PATH: remove
it by hand (/usr/local/lib/node_modules/npm, /usr/local/bin/npm and npx), since the role cannot
tell it from an `npm install -g npm` of the user's own.

The app user is a system user with a home (pm2 keeps its state in <home>/.pm2), a locked
password and the shell /usr/sbin/nologin: nothing needs to log in as it. pm2 itself does not
need a login shell: systemd starts its daemon with User=, and the provisioner (like a deploy
user with sudo) runs pm2 as that user with runuser/sudo -u, which exec the command directly.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from provisioner.api import (Change, Noop, apt, commands, file_fact, files, links,
                             package_version, run_step, templates, users, write_step)

APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*\Z")
PREFERENCES = "/etc/apt/preferences.d/nodesource.pref"
REPO_NAME = "nodesource"
MIN_MAJOR = 18
NPM_SOURCES = ("debian", "registry")
# npm versions the role knows the registry's integrity of (`npm view npm@V dist.integrity`)
NPM_PINS = {
    "10.9.9": "sha512-1g+6jLQvaIuB4zwvHL7yrXuXcWZwDsCtBX8bbWDqbvJSSr9nPiDDWTHNgwXR27iIcTTW7v3A57hDW9RYv2W4Yg==",
}
NPM_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+\Z")
INTEGRITY_RE = re.compile(r"^sha(256|384|512)-[A-Za-z0-9+/]+={0,2}\Z")
NPM_PREFIX = "/usr/local"
NPM_DIR = f"{NPM_PREFIX}/lib/node_modules/npm"
# Debian's npm's builtin config (/usr/share/nodejs/npm/npmrc): the same global config file and
# global prefix whichever npm a server has
NPM_BUILTIN = "globalconfig=/etc/npmrc\nglobalignorefile=/etc/npmignore\nprefix=/usr/local\n"
NPM_INSTALL_SOURCE = (Path(__file__).resolve().parent / "npm_install.py").read_text(encoding="utf-8")
NPM_TIMEOUT = 300         # seconds for the download and unpacking (a slow proxy)


def _major(v) -> int | None:
    major = v["node_nodesource_major"]
    if major is None:
        return None
    if isinstance(major, bool) or not isinstance(major, int) or major < MIN_MAJOR:
        raise ValueError(f"node_nodesource_major: {major!r} is not a Node.js major >= {MIN_MAJOR}; "
                         "write e.g. `node_nodesource_major: 22`, or null for Debian's nodejs")
    return major


def nodesource_uri(v, major: int) -> str:
    uri = v["node_nodesource_uri"]
    if not isinstance(uri, str) or not uri:
        raise ValueError("node_nodesource_uri: needed with node_nodesource_major: set it to "
                         "NodeSource's deb repository for Debian (the URI NodeSource documents, "
                         "ending in /node_<major>.x; write {major} for the number) or a mirror of it")
    uri = uri.replace("{major}", str(major))
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"node_nodesource_uri: {uri!r} is not an http(s) URL; "
                         "write e.g. https://<host>/node_{major}.x")
    return uri


def _npm(v, major: int | None) -> "NpmFromRegistry | None":
    """npm from the registry as the vars pin it, or None for the package's own npm."""
    source = v["node_npm"]
    if source not in NPM_SOURCES:
        raise ValueError(f"node_npm: {source!r} is not one of {', '.join(NPM_SOURCES)}")
    if source == "debian":
        return None
    if major is not None:
        raise ValueError("node_npm: registry is for Debian's nodejs: NodeSource's nodejs "
                         "(node_nodesource_major) bundles its own npm; write node_npm: debian")
    version, integrity, registry = v["node_npm_version"], v["node_npm_integrity"], v["node_npm_registry"]
    if not isinstance(version, str) or not NPM_VERSION_RE.match(version):
        raise ValueError(f"node_npm_version: {version!r} is not an exact version like 10.9.9")
    if integrity is None:
        integrity = NPM_PINS.get(version)
        if integrity is None:
            raise ValueError(f"node_npm_integrity: needed for npm {version} (the role pins "
                             f"{', '.join(NPM_PINS)}): write the registry's "
                             f"`npm view npm@{version} dist.integrity`")
    elif not isinstance(integrity, str) or not INTEGRITY_RE.match(integrity):
        raise ValueError(f"node_npm_integrity: {integrity!r} is not an integrity like "
                         "sha512-<base64> (`npm view npm@<version> dist.integrity`)")
    if registry is not None:
        parts = urlsplit(registry) if isinstance(registry, str) else None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"node_npm_registry: {registry!r} is not an http(s) URL; write "
                             "your npm registry's URL, or null for the server's npm config")
        if parts.username or parts.password:
            raise ValueError("node_npm_registry: credentials do not belong in the URL (it is "
                             "shown in reports); use a registry that serves npm anonymously")
    return NpmFromRegistry(version, integrity, registry or "")


@dataclass(frozen=True)
class NpmFromRegistry:
    """npm itself, unpacked from its registry tarball (roles/node/npm_install.py)."""
    version: str
    integrity: str
    registry: str = ""           # "" = the one the server's npm config names

    id = "npm from the registry"
    manifest = f"{NPM_DIR}/package.json"
    builtin = f"{NPM_DIR}/npmrc"

    def facts(self) -> dict:
        return {"files": [self.manifest, self.builtin]}

    def plan(self, facts) -> list:
        f, rc = facts.file(self.manifest), facts.file(self.builtin)
        have = package_version(f.content) if f.exists else None
        if have != self.version:
            why = f"npm {have} != {self.version}" if have else f"{self.manifest} absent"
            argv = ["python3", "-", NPM_PREFIX, self.version, self.integrity, self.registry,
                    NPM_BUILTIN]
            return [Change(self.id, "install", why, (run_step(
                argv, stdin=NPM_INSTALL_SOURCE, env={"HOME": "/root"}, timeout=NPM_TIMEOUT,
                attempts=2),))]
        if not rc.exists or rc.content != NPM_BUILTIN:
            return [Change(self.id, "configure", f"{self.builtin} differs from npm's builtin "
                           "config (globalconfig /etc/npmrc, prefix /usr/local)",
                           (write_step(self.builtin, NPM_BUILTIN, "0644", "root", "root"),))]
        return [Noop(self.id, f"already installed: npm {have}")]

    def expect(self, facts) -> dict:
        manifest = json.dumps({"name": "npm", "version": self.version})
        return {"files": {
            self.manifest: file_fact(self.manifest, manifest, "0644", "root", "root",
                                     facts.file(self.manifest)),
            self.builtin: file_fact(self.builtin, NPM_BUILTIN, "0644", "root", "root",
                                    facts.file(self.builtin))}}


def npm_resources(npm: NpmFromRegistry):
    """npm from the registry, its links on PATH, Debian's npm gone (pure: also the tests')."""
    yield npm
    for cmd in ("npm", "npx"):
        yield links.link(f"{NPM_PREFIX}/bin/{cmd}", f"../lib/node_modules/npm/bin/{cmd}-cli.js")
    yield apt.packages(["npm"], state="absent")


def _check_apps(names) -> list[str]:
    if not isinstance(names, list):
        raise ValueError("node_apps: expected a list of app names")
    for n in names:
        if not isinstance(n, str) or not APP_NAME_RE.match(n) or len(n) > 64:
            raise ValueError(f"node_apps: {n!r} is not an app name; use lowercase letters, "
                             "digits, '.', '_' and '-' (it becomes /srv/<name>)")
    if len(set(names)) != len(names):
        raise ValueError("node_apps: an app name is listed twice")
    return names


def _check_user(v) -> None:
    user, home, shell = v["node_app_user"], v["node_app_home"], v["node_app_shell"]
    if not re.match(r"^[a-z_][a-z0-9_-]{0,31}\Z", user):
        raise ValueError(f"node_app_user: {user!r} is not a user name; use lowercase letters, "
                         "digits, '_' and '-' (up to 32), e.g. app")
    for key, path in (("node_app_home", home), ("node_app_shell", shell)):
        if not path.startswith("/") or path != posixpath.normpath(path) or path == "/":
            raise ValueError(f"{key}: {path!r} must be an absolute, normalised path "
                             f"(e.g. {'/home/app' if key == 'node_app_home' else '/usr/sbin/nologin'})")


def _debian_major(ctx) -> int | None:
    os_facts = getattr(ctx, "os", None) or {}
    if os_facts.get("id") != "debian":
        return None
    try:
        return int(str(os_facts.get("version_id") or "").split(".")[0])
    except ValueError:
        return None          # testing/sid: no VERSION_ID


def nodesource_resources(v, major: int):
    """The NodeSource repository, its pin, nodejs from it (pure: also used by the tests)."""
    uri = nodesource_uri(v, major)
    key_url, key_b64 = v["node_nodesource_key_url"], v["node_nodesource_key_b64"]
    if (key_url is None) == (key_b64 is None):
        raise ValueError("node_nodesource_key_url / node_nodesource_key_b64: give exactly one "
                         "(the URL of NodeSource's signing key, or the key itself in base64)")
    yield apt.repository(REPO_NAME, uri, v["node_nodesource_suite"], ["main"],
                         key_url=key_url, key_b64=key_b64,
                         key_sha256=v["node_nodesource_key_sha256"])
    yield templates.template(PREFERENCES, "node/nodesource.pref.j2",
                             {"uri": uri, "origin": urlsplit(uri).hostname}, mode="0644")
    yield apt.packages(["nodejs"])
    # nodejs already installed from elsewhere (Debian's 18) or of another major: the pin makes
    # NodeSource's build the candidate, and this install switches to it.
    installed = "dpkg-query -W -f='${Version}' nodejs 2>/dev/null"
    yield commands.command(
        ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=300", "--allow-downgrades",
         "install", "--no-install-recommends", "nodejs"],
        unless=["sh", "-c", f"! {installed} >/dev/null || {installed} | grep -q '^{major}\\.'"],
        name=f"nodejs {major}.x from NodeSource replaces another major")


def check(v, ctx) -> tuple[int | None, list[str], NpmFromRegistry | None]:
    """The role's vars judged (ValueError naming the var): the NodeSource major, the apps, where
    npm comes from."""
    major = _major(v)
    if major is not None:
        nodesource_uri(v, major)
    npm = _npm(v, major)
    apps = _check_apps(v["node_apps"])
    _check_user(v)
    return major, apps, npm


def resources(v, ctx):
    major, apps, npm = check(v, ctx)
    user, home = v["node_app_user"], v["node_app_home"]
    if major is None:
        debian = _debian_major(ctx)
        if debian is not None and debian < 12:
            raise ValueError(f"node_nodesource_major: Debian {debian} ships Node.js older than "
                             f"{MIN_MAJOR}; set a NodeSource major (e.g. 22), or use Debian 12")
        if npm is None:
            yield apt.packages(["nodejs", "npm"])
        else:
            yield apt.packages(["nodejs"])
            yield from npm_resources(npm)
    else:
        yield from nodesource_resources(v, major)
    yield users.user(user, system=True, home=home, shell=v["node_app_shell"])
    # pm2's dump (process list with each app's env, secrets included) lives under the home
    yield files.directory(home, mode="0750", owner=user, group=user)
    for name in apps:
        yield files.directory(f"/srv/{name}", mode="0750", owner=user, group=user)

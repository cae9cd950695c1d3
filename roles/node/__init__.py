"""Role `node`: Node.js >= 18 and npm, the app's system user, the apps' folders under /srv.

Node.js comes from Debian by default (Debian 12: nodejs 18 and npm 9). With
`node_nodesource_major` set, `nodejs` comes from NodeSource's apt repository instead: a deb822
source signed by NodeSource's key (`node_nodesource_key_url` or `node_nodesource_key_b64`), and
an apt preferences file that pins `nodejs` to that origin (priority 1001: NodeSource's build
wins over Debian's, and a change of major may downgrade). NodeSource's `nodejs` bundles npm, so
Debian's `npm` (which it conflicts with) is not installed then. An existing nodejs of another
major (e.g. Debian's 18 before the switch) is replaced: `apt.packages` alone would find "nodejs"
present and keep it.

The app user is a system user with a home (pm2 keeps its state in <home>/.pm2), a locked
password and the shell /usr/sbin/nologin: nothing needs to log in as it. pm2 itself does not
need a login shell: systemd starts its daemon with User=, and the provisioner (like a deploy
user with sudo) runs pm2 as that user with runuser/sudo -u, which exec the command directly.
"""
from __future__ import annotations

import posixpath
import re
from urllib.parse import urlsplit

from provisioner.api import apt, commands, files, templates, users

APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*\Z")
PREFERENCES = "/etc/apt/preferences.d/nodesource.pref"
REPO_NAME = "nodesource"
MIN_MAJOR = 18


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


def check(v, ctx) -> tuple[int | None, list[str]]:
    """The role's vars judged (ValueError naming the var): the NodeSource major, the apps."""
    major = _major(v)
    if major is not None:
        nodesource_uri(v, major)
    apps = _check_apps(v["node_apps"])
    _check_user(v)
    return major, apps


def resources(v, ctx):
    major, apps = check(v, ctx)
    user, home = v["node_app_user"], v["node_app_home"]
    if major is None:
        debian = _debian_major(ctx)
        if debian is not None and debian < 12:
            raise ValueError(f"node_nodesource_major: Debian {debian} ships Node.js older than "
                             f"{MIN_MAJOR}; set a NodeSource major (e.g. 22), or use Debian 12")
        yield apt.packages(["nodejs", "npm"])
    else:
        yield from nodesource_resources(v, major)
    yield users.user(user, system=True, home=home, shell=v["node_app_shell"])
    # pm2's dump (process list with each app's env, secrets included) lives under the home
    yield files.directory(home, mode="0750", owner=user, group=user)
    for name in apps:
        yield files.directory(f"/srv/{name}", mode="0750", owner=user, group=user)

#!/usr/bin/python3
# managed by provisioner (role node, node_npm: registry): npm from its registry tarball, checked
# against the integrity pinned in the inventory's role, unpacked where `npm install --global npm`
# would put it (PREFIX/lib/node_modules/npm) with the builtin config given on the command line.
# Runs on the server as root, stdlib only.
# usage: python3 - PREFIX VERSION INTEGRITY REGISTRY BUILTIN_NPMRC < npm_install.py
#   REGISTRY "" = the registry npm itself would use: npm_config_registry, /root/.npmrc, /etc/npmrc
# exit 0 installed, 2 no registry known, 3 download failed, 4 the tarball is not the pinned one
import base64
import hashlib
import io
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

TMP_PREFIX = ".npm-provisioner-"      # a run that died mid-way leaves these: removed next time
GLOBAL_NPMRC = "/etc/npmrc"


def fail(rc, message):
    print(message)
    sys.exit(rc)


def npmrc_values(path):
    """key -> value of an npmrc (ini: `key = value`, `;`/`#` comments, ${VAR} expanded)."""
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if not line or line[0] in ";#[" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = os.path.expandvars(value)
    return out


def npm_config(key):
    """key as npm run by root reads it: its environment, then root's npmrc, then the global one
    (/etc/npmrc, the globalconfig of Debian's npm and of the builtin config this installs)."""
    for env in ("npm_config_" + key.replace("-", "_"), "NPM_CONFIG_" + key.replace("-", "_").upper()):
        if os.environ.get(env):
            return os.environ[env]
    for path in (os.path.join(os.environ.get("HOME") or "/root", ".npmrc"), GLOBAL_NPMRC):
        value = npmrc_values(path).get(key)
        if value:
            return value
    return None


def shown(url):
    """url without credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += ":%d" % parts.port
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def download(url):
    cafile = npm_config("cafile")
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        fail(3, "npm's cafile %s cannot be read: %s" % (cafile, e))
    handlers = [urllib.request.HTTPSHandler(context=ctx)]
    proxy = npm_config("https-proxy" if url.startswith("https:") else "proxy") or npm_config("proxy")
    if proxy:                                   # else urllib's own: the *_proxy environment
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=60) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        hint = (": the registry wants credentials, which this download does not send; use one "
                "that serves npm anonymously, or node_npm: debian") if e.code in (401, 403) else ""
        fail(3, "download of %s failed: HTTP %d %s%s" % (shown(url), e.code, e.reason, hint))
    except Exception as e:
        fail(3, "download of %s failed: %s" % (shown(url), e))


def check_integrity(data, integrity, url):
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        fail(4, "%s is not the pinned npm: %s-%s != %s (node_npm_integrity); nothing was "
                "installed" % (shown(url), algo, got, integrity))


def unpack(data, into):
    """The tarball's package/ folder into `into` (fresh, ours): regular files and folders only."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if parts[0] != "package" or ".." in parts or m.name.startswith("/"):
                raise ValueError("unexpected member %r" % m.name)
            rel = "/".join(p for p in parts[1:] if p not in ("", "."))
            if not rel:
                continue
            dest = os.path.join(into, rel)
            if m.isdir():
                os.makedirs(dest, 0o755, exist_ok=True)
            elif m.isfile():
                os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
                with tf.extractfile(m) as src, open(dest, "xb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(dest, 0o755 if m.mode & 0o111 else 0o644)
            else:
                raise ValueError("member %r is not a file or a folder" % m.name)


def main(prefix, version, integrity, registry, builtin):
    registry = registry or npm_config("registry")
    if not registry:
        fail(2, "no npm registry is known to fetch npm %s from: set node_npm_registry in the "
                "inventory (your npm registry's URL), or registry= in the server's /etc/npmrc"
                % version)
    # credentials in the URL are not sent (nor shown): the tarball is fetched anonymously
    url = shown(registry.rstrip("/") + "/npm/-/npm-%s.tgz" % version)
    data = download(url)
    check_integrity(data, integrity, url)
    modules = os.path.join(prefix, "lib", "node_modules")
    final = os.path.join(modules, "npm")
    os.makedirs(modules, 0o755, exist_ok=True)
    for name in os.listdir(modules):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(modules, name), ignore_errors=True)
    new = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=modules)
    old = None
    try:
        unpack(data, new)
        with open(os.path.join(new, "npmrc"), "w", encoding="utf-8") as f:
            f.write(builtin)
        os.chmod(new, 0o755)
        if os.path.lexists(final):
            old = new + "-old"
            os.rename(final, old)
        os.rename(new, final)
    except BaseException:
        if old and not os.path.lexists(final):
            os.rename(old, final)               # the npm there before stays
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old and os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    elif old:
        os.unlink(old)                          # a link to an npm elsewhere: that one is kept
    print("npm %s from %s (%d bytes, %s checked) in %s"
          % (version, shown(url), len(data), integrity.partition("-")[0], final))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        fail(2, "usage: python3 - PREFIX VERSION INTEGRITY REGISTRY BUILTIN_NPMRC")
    os.umask(0o022)                             # readable by the app user that runs npm
    main(*sys.argv[1:])

"""Role node's `node_npm: registry`: npm itself from its registry tarball, pinned and checked.

Pure: what the role plans, and its installer (roles/node/npm_install.py) run here against a
registry served on loopback, with a tarball made by the test. On real servers it is the local
env's own setting (web1 Debian 13, web2 Debian 12): tests/test_local_env.py checks what it left
there, and tests/test_role_node_pm2.py switches a server from Debian's npm to it.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import re
import tarfile
import threading
from types import SimpleNamespace

import pytest

from provisioner.change import Change, Noop
from provisioner.facts import Facts
from test_role_node_pm2 import NODE as NODE_ROLE, _module, defaults

NODE = _module("node")            # its resource classes and constants
npm_install = _module("node", "npm_install")

CTX = SimpleNamespace(os={"id": "debian", "version_id": "13"}, check=False)
PIN = NODE.NPM_PINS["10.9.9"]


def registry_mode(**over):
    return defaults(**{"node_npm": "registry", "node_apps": ["shop"], **over})


def facts(version=None, builtin=NODE.NPM_BUILTIN):
    files = {"/usr/local/lib/node_modules/npm/package.json":
             {"exists": True, "type": "file", "content": json.dumps({"name": "npm", "version": version})}
             if version else {"exists": False},
             "/usr/local/lib/node_modules/npm/npmrc":
             {"exists": True, "type": "file", "content": builtin} if builtin is not None else {"exists": False}}
    return Facts({"files": files})


# --- what the role plans -------------------------------------------------------------------------

def test_registry_mode_installs_nodejs_from_debian_npm_from_its_tarball_and_removes_debians_npm():
    rs = list(NODE_ROLE.resources(registry_mode(), CTX))
    assert [r.id for r in rs] == [
        "apt nodejs", "npm from the registry", "link /usr/local/bin/npm", "link /usr/local/bin/npx",
        "apt npm", "user app", "directory /home/app", "directory /srv/shop"]
    assert rs[2].to == "../lib/node_modules/npm/bin/npm-cli.js"
    assert rs[3].to == "../lib/node_modules/npm/bin/npx-cli.js"
    assert rs[4].state == "absent"
    npm = rs[1]
    change, = npm.plan(facts())
    assert isinstance(change, Change) and change.action == "install"
    step, = change.steps
    # the installer goes on stdin, not on the command line that reports show
    assert step["run"] == ["python3", "-", "/usr/local", "10.9.9", PIN, "", NODE.NPM_BUILTIN]
    assert step["stdin"] == NODE.NPM_INSTALL_SOURCE and "def unpack" in step["stdin"]
    assert step["env"] == {"HOME": "/root"} and step["attempts"] == 2


def test_the_pinned_version_installed_is_ok_and_another_one_is_replaced():
    npm = NODE.NpmFromRegistry("10.9.9", PIN)
    noop, = npm.plan(facts("10.9.9"))
    assert isinstance(noop, Noop) and noop.why == "already installed: npm 10.9.9"
    change, = npm.plan(facts("10.8.1"))
    assert change.action == "install" and change.why == "npm 10.8.1 != 10.9.9"
    # after the install the role's later resources see it installed (check mode, the batch)
    fresh = facts()
    assert isinstance(npm.plan(fresh.overlay(npm.expect(fresh)))[0], Noop)


def test_a_changed_builtin_config_is_written_back_without_reinstalling():
    npm = NODE.NpmFromRegistry("10.9.9", PIN)
    change, = npm.plan(facts("10.9.9", builtin="prefix=/opt\n"))
    assert change.action == "configure" and "differs from npm's builtin config" in change.why
    step, = change.steps
    assert step["write"] == "/usr/local/lib/node_modules/npm/npmrc"
    assert base64.b64decode(step["b64"]).decode() == NODE.NPM_BUILTIN
    assert "globalconfig=/etc/npmrc\n" in NODE.NPM_BUILTIN and "prefix=/usr/local\n" in NODE.NPM_BUILTIN


def test_a_registry_and_an_integrity_of_the_inventorys_own_are_passed_on():
    other = "sha512-" + base64.b64encode(b"x" * 64).decode()
    rs = list(NODE_ROLE.resources(registry_mode(node_npm_version="10.8.1", node_npm_integrity=other,
                                           node_npm_registry="https://npm.example.test/repo/"), CTX))
    step, = rs[1].plan(facts())[0].steps
    assert step["run"][2:6] == ["/usr/local", "10.8.1", other, "https://npm.example.test/repo/"]


@pytest.mark.parametrize("over, message", [
    ({"node_npm": "nodesource"}, "node_npm: 'nodesource' is not one of debian, registry"),
    ({"node_npm_version": "10"}, "node_npm_version: '10' is not an exact version"),
    ({"node_npm_version": "^10.9.9"}, "node_npm_version: '^10.9.9' is not an exact version"),
    ({"node_npm_version": "10.8.1"}, "node_npm_integrity: needed for npm 10.8.1"),
    ({"node_npm_integrity": "md5-abc"}, "node_npm_integrity: 'md5-abc' is not an integrity"),
    ({"node_npm_registry": "ftp://npm.example.test/"}, "node_npm_registry: 'ftp://npm.example.test/' is not an http(s) URL"),
    ({"node_npm_registry": "https://u:p@npm.example.test/"}, "node_npm_registry: credentials do not belong in the URL"),
    ({"node_nodesource_major": 22, "node_nodesource_uri": "https://ns.example.test/node_{major}.x",
      "node_nodesource_key_url": "https://ns.example.test/k"}, "node_npm: registry is for Debian's nodejs"),
])
def test_registry_mode_refuses_bad_vars_naming_the_var(over, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        list(NODE_ROLE.resources(registry_mode(**over), CTX))


def test_the_credentials_refusal_does_not_repeat_them():
    with pytest.raises(ValueError) as e:
        list(NODE_ROLE.resources(registry_mode(node_npm_registry="https://u:hunter2@npm.example.test/"), CTX))
    assert "hunter2" not in str(e.value)


# --- the installer, against a registry on loopback ------------------------------------------------

def tarball(version="10.9.9", extra=()) -> bytes:
    """An npm-like package tarball: package/ with a manifest, an executable bin, a library."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        def add(name, data: bytes, mode=0o644, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.type, info.linkname = len(data), mode, kind, link
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("package/package.json", json.dumps({"name": "npm", "version": version}).encode())
        add("package/bin/npm-cli.js", b"#!/usr/bin/env node\n", 0o755)
        add("package/lib/npm.js", b"module.exports = {}\n", 0o664)
        for e in extra:
            add(*e)
    return buf.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def registry():
    """A registry on loopback: serves `files` by path, records each request line."""
    served = SimpleNamespace(files={}, requests=[], status=200)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.requests.append(self.requestline)
            path = self.path.split("://", 1)[-1]
            path = path[path.index("/"):] if "://" in self.path else path
            body = served.files.get(path)
            status = served.status if body is not None else 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}/"
    yield served
    server.shutdown()


@pytest.fixture
def server_config(tmp_path, monkeypatch):
    """The installer's view of npm's config: no environment of this machine's, root's npmrc and
    the global one in tmp_path."""
    for key in list(os.environ):
        if key.lower().startswith("npm_config_") or key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    home = tmp_path / "root"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(npm_install, "GLOBAL_NPMRC", str(tmp_path / "etc-npmrc"))
    return SimpleNamespace(home=home, global_npmrc=tmp_path / "etc-npmrc", prefix=tmp_path / "usr-local")


def install(cfg, version, pin, registry_url=""):
    npm_install.main(str(cfg.prefix), version, pin, registry_url, "prefix=/usr/local\n")


def test_the_installer_unpacks_the_checked_tarball_with_its_builtin_config(registry, server_config, capsys):
    data = tarball()
    registry.files["/npm/-/npm-10.9.9.tgz"] = data
    install(server_config, "10.9.9", integrity(data), registry.url)
    npm = server_config.prefix / "lib/node_modules/npm"
    assert json.loads((npm / "package.json").read_text())["version"] == "10.9.9"
    assert (npm / "bin/npm-cli.js").stat().st_mode & 0o777 == 0o755
    assert (npm / "lib/npm.js").stat().st_mode & 0o777 == 0o644     # no group write from the tar
    assert (npm / "npmrc").read_text() == "prefix=/usr/local\n"
    assert npm.stat().st_mode & 0o777 == 0o755
    assert os.listdir(npm.parent) == ["npm"]                          # no temporary folder left
    assert "npm 10.9.9 from http://127.0.0.1" in capsys.readouterr().out


def test_the_registry_proxy_and_a_new_version_come_from_the_servers_npm_config(registry, server_config):
    old, new = tarball("10.9.8"), tarball("10.9.9")
    registry.files.update({"/r/npm/-/npm-10.9.8.tgz": old, "/r/npm/-/npm-10.9.9.tgz": new})
    server_config.global_npmrc.write_text(f"; the testbed's kind of config\nregistry = {registry.url}r/\n")
    install(server_config, "10.9.8", integrity(old))
    assert registry.requests[-1] == "GET /r/npm/-/npm-10.9.8.tgz HTTP/1.1"
    # root's own npmrc wins over the global one, as for npm; its proxy is used (an absolute URL
    # on the request line is what a proxy gets)
    (server_config.home / ".npmrc").write_text(f'proxy="{registry.url}"\nregistry=http://npm.invalid/r/\n')
    install(server_config, "10.9.9", integrity(new))
    assert registry.requests[-1] == "GET http://npm.invalid/r/npm/-/npm-10.9.9.tgz HTTP/1.1"
    npm = server_config.prefix / "lib/node_modules/npm"
    assert json.loads((npm / "package.json").read_text())["version"] == "10.9.9"
    assert os.listdir(npm.parent) == ["npm"]


def refused(cfg, capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        install(cfg, *args)
    return e.value.code, capsys.readouterr().out


def test_a_tarball_that_is_not_the_pinned_one_installs_nothing(registry, server_config, capsys):
    good, evil = tarball(), tarball(extra=[("package/lib/extra.js", b"steal()\n")])
    registry.files["/npm/-/npm-10.9.9.tgz"] = evil
    rc, out = refused(server_config, capsys, "10.9.9", integrity(good), registry.url)
    assert rc == 4 and "is not the pinned npm" in out and "nothing was installed" in out
    assert not (server_config.prefix / "lib/node_modules/npm").exists()


@pytest.mark.parametrize("member", [
    ("package/../../etc/passwd", b"x"),
    ("package/bin/npm", b"", 0o777, tarfile.SYMTYPE, "/bin/sh"),
    ("other/file", b"x"),
])
def test_a_tarball_with_a_member_outside_package_or_a_link_leaves_the_installed_npm(
        registry, server_config, capsys, member):
    good = tarball("10.9.8")
    registry.files["/npm/-/npm-10.9.8.tgz"] = good
    install(server_config, "10.9.8", integrity(good), registry.url)
    bad = tarball(extra=[member])
    registry.files["/npm/-/npm-10.9.9.tgz"] = bad
    with pytest.raises(ValueError, match="unexpected member|is not a file or a folder"):
        install(server_config, "10.9.9", integrity(bad), registry.url)
    npm = server_config.prefix / "lib/node_modules/npm"
    assert json.loads((npm / "package.json").read_text())["version"] == "10.9.8"
    assert os.listdir(npm.parent) == ["npm"]
    assert not (server_config.prefix.parent / "etc/passwd").exists()


def test_no_registry_known_says_which_var_or_file_to_set(server_config, capsys):
    rc, out = refused(server_config, capsys, "10.9.9", PIN, "")
    assert rc == 2 and "set node_npm_registry in the inventory" in out and "/etc/npmrc" in out


def test_a_registry_that_wants_credentials_says_so_without_showing_any(registry, server_config, capsys):
    registry.files["/npm/-/npm-10.9.9.tgz"] = b"x"
    registry.status = 401
    url = registry.url.replace("http://", "http://user:s3cret@")
    rc, out = refused(server_config, capsys, "10.9.9", PIN, url)
    assert rc == 3 and "HTTP 401" in out and "wants credentials" in out and "node_npm: debian" in out
    assert "s3cret" not in out and "user" not in out
    registry.status = 200
    rc, out = refused(server_config, capsys, "10.9.8", PIN, registry.url)
    assert rc == 3 and "HTTP 404" in out and "/npm/-/npm-10.9.8.tgz" in out

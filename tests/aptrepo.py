"""A small, real, signed apt repository built on the test controller, for testing apt.repository
(and apt.packages against a package no Debian mirror has) on real Debian 12 servers.

    repo = build_repo(tmp_path)                  # pool/ + dists/<suite>/, signed, key exported
    with serve(repo, "10.x.y.1") as url:         # plain HTTP from a thread on this machine
        apt.repository("hello", url, repo.suite, repo.component, key_b64=repo.key_b64)

Needs apt-ftparchive (apt-utils), gpg (gnupg, with gpg-agent) and dpkg-deb (dpkg).

The layout is what Debian's own mirrors have: pool/<component>/p/<package>/<package>_<v>_all.deb
and dists/<suite>/{Release,InRelease,Release.gpg}, with <component>/binary-{amd64,arm64,all}/
Packages(.gz) all listing the arch:all package, and a Release with Origin, Label, Suite,
Codename, Date, Architectures (amd64 arm64 all), Components and SHA256 sums (no Valid-Until).

The signing key (ed25519, no passphrase) lives in a private GNUPGHOME, <workdir>/gnupg; no
gpg-agent is left running. Calling build_repo again on the same workdir keeps that key and the
.debs already in the pool, adds the new version and re-signs: the way to publish an upgrade
(version "1.0", then "1.1") for state="latest" tests. The public key is also published in the
repository root as repo-key.asc (armored) and repo-key.gpg (binary), for key_url tests.
"""
from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import gzip
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ARCHITECTURES = ("amd64", "arm64", "all")
KEY_UID = "provisioner test repository <apt-test@provisioner.invalid>"
KEY_ASC = "repo-key.asc"
KEY_GPG = "repo-key.gpg"
# gpg-agent's sockets live in GNUPGHOME when /run/user/<uid> is absent, and a unix socket path
# must fit in 108 bytes: a longer GNUPGHOME is reached through a short symlink in /tmp.
_MAX_GNUPGHOME = 60


@dataclass
class AptRepo:
    root: Path            # the repository folder (dists/, pool/)
    suite: str            # also the Codename
    component: str
    package: str
    version: str          # the version built last (the newest, if versions were built in order)
    key_b64: str          # the public key (armored unless build_repo(armored=False)), base64
    key_sha256: str       # sha256 of the decoded key bytes
    url: str | None = None  # the base URL while served
    fingerprint: str = ""
    deb: Path | None = None  # the .deb built last

    @property
    def key_bytes(self) -> bytes:
        return base64.b64decode(self.key_b64)

    @property
    def key_asc(self) -> Path:
        return self.root / KEY_ASC

    @property
    def key_gpg(self) -> Path:
        """The binary public key: a keyring gpgv --keyring (and apt's Signed-By) accepts."""
        return self.root / KEY_GPG

    @property
    def dists(self) -> Path:
        return self.root / "dists" / self.suite


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, **kw)
    if proc.returncode != 0:
        err = proc.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{err}")
    return proc


def _check_word(value: str, what: str, pattern: str = r"[a-z0-9][a-z0-9.+\-]*") -> None:
    if not re.fullmatch(pattern, value):
        raise ValueError(f"bad {what} {value!r}")


def _build_deb(workdir: Path, pool: Path, package: str, version: str) -> Path:
    stage = workdir / "build" / f"{package}_{version}"
    if stage.exists():
        shutil.rmtree(stage)
    share = stage / "usr" / "share" / package
    bindir = stage / "usr" / "bin"
    debian = stage / "DEBIAN"
    for d in (share, bindir, debian):
        d.mkdir(parents=True)
    (share / "VERSION").write_text(f"{version}\n")
    script = bindir / package
    script.write_text(f"#!/bin/sh\necho '{package} {version}'\n")
    (debian / "control").write_text(
        f"Package: {package}\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Maintainer: provisioner tests <apt-test@provisioner.invalid>\n"
        "Section: misc\n"
        "Priority: optional\n"
        "Description: provisioner test package\n"
        f" Installs /usr/share/{package}/VERSION and /usr/bin/{package};"
        " built by provisioner's tests.\n")
    for p in [stage, *stage.rglob("*")]:
        p.chmod(0o755 if p.is_dir() or p == script else 0o644)
    deb = pool / f"{package}_{version}_all.deb"
    deb.parent.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(stage), str(deb)])
    return deb


@contextlib.contextmanager
def _gnupghome(workdir: Path) -> Iterator[dict[str, str]]:
    """The environment for gpg with the private GNUPGHOME; kills its agent on exit."""
    home = workdir / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    home.chmod(0o700)
    link = None
    path = str(home)
    if len(path) > _MAX_GNUPGHOME:
        link = Path(tempfile.mkdtemp(prefix="aptrepo-")) / "g"
        link.symlink_to(home)
        path = str(link)
    env = {k: v for k, v in os.environ.items() if k not in ("GPG_AGENT_INFO", "GNUPGHOME")}
    env["GNUPGHOME"] = path
    try:
        yield env
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True)
        if link is not None:
            link.unlink()
            link.parent.rmdir()


def _gpg(env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    return _run(["gpg", "--batch", "--no-tty", "--pinentry-mode", "loopback",
                 "--passphrase", "", *args], env=env, **kw)


def _fingerprint(env: dict[str, str]) -> str | None:
    proc = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    return None


def _after_previous_release(path: Path) -> None:
    """A republished Release must carry a later Date (whole seconds) than the one it replaces:
    clients compare them. Waits out the rest of the second when needed."""
    if not path.exists():
        return
    m = re.search(r"^Date: (.+)$", path.read_text(), re.M)
    if not m:
        return
    before = email.utils.parsedate_to_datetime(m.group(1)).timestamp()
    while time.time() < before + 1:
        time.sleep(before + 1 - time.time() + 0.01)


def build_repo(workdir: Path, *, suite: str = "provisioner-test",
               package: str = "provisioner-hello", version: str = "1.0",
               component: str = "main", armored: bool = True) -> AptRepo:
    """Build (or extend, see the module doc) the signed repository <workdir>/repo."""
    _check_word(suite, "suite", r"[A-Za-z0-9][A-Za-z0-9._\-]*")
    _check_word(component, "component")
    _check_word(package, "package name")
    _check_word(version, "version (no epoch)", r"[0-9][A-Za-z0-9.+~\-]*")
    workdir = Path(workdir).resolve()
    root = workdir / "repo"
    pool = root / "pool" / component / package[0] / package
    deb = _build_deb(workdir, pool, package, version)

    # The indexes: one Packages listing for each architecture, like Debian's own mirrors.
    dists = root / "dists" / suite
    packages = _run(["apt-ftparchive", "packages", f"pool/{component}"], cwd=root).stdout
    for arch in ARCHITECTURES:
        d = dists / component / f"binary-{arch}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "Packages").write_bytes(packages)
        with open(d / "Packages.gz", "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(packages)
        (d / "Release").write_text(  # the per-component Release Debian also ships
            f"Archive: {suite}\nSuite: {suite}\nComponent: {component}\n"
            "Origin: provisioner-test\nLabel: provisioner-test\n"
            f"Architecture: {arch}\n")
    _after_previous_release(dists / "Release")
    for stale in ("Release", "InRelease", "Release.gpg"):
        (dists / stale).unlink(missing_ok=True)
    opts = {"Origin": "provisioner-test", "Label": "provisioner-test", "Suite": suite,
            "Codename": suite, "Architectures": " ".join(ARCHITECTURES),
            "Components": component, "Description": "provisioner test repository"}
    cmd = ["apt-ftparchive"]
    for k, v in opts.items():
        cmd += ["-o", f"APT::FTPArchive::Release::{k}={v}"]
    release = _run([*cmd, "release", str(dists)]).stdout
    (dists / "Release").write_bytes(release)

    with _gnupghome(workdir) as env:
        fpr = _fingerprint(env)
        if fpr is None:
            _gpg(env, "--quick-generate-key", KEY_UID, "ed25519", "sign", "never")
            fpr = _fingerprint(env)
            if fpr is None:
                raise RuntimeError("gpg made no key")
        sign = ["--local-user", fpr, "--digest-algo", "SHA512", "--yes"]
        _gpg(env, *sign, "--clearsign", "--output", str(dists / "InRelease"),
             str(dists / "Release"))
        _gpg(env, *sign, "--armor", "--detach-sign", "--output", str(dists / "Release.gpg"),
             str(dists / "Release"))
        binary = _gpg(env, "--export-options", "export-minimal", "--export", fpr).stdout
        asc = _gpg(env, "--export-options", "export-minimal", "--armor", "--export", fpr).stdout
    if not binary or not asc.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
        raise RuntimeError("gpg exported no public key")
    (root / KEY_GPG).write_bytes(binary)
    (root / KEY_ASC).write_bytes(asc)
    key = asc if armored else binary
    return AptRepo(root=root, suite=suite, component=component, package=package,
                   version=version, key_b64=base64.b64encode(key).decode(),
                   key_sha256=hashlib.sha256(key).hexdigest(), fingerprint=fpr, deb=deb)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        # Always the whole file: a repository republished within the second of a client's last
        # fetch would otherwise be answered 304 Not Modified (mtimes have 1 s resolution here).
        del self.headers["If-Modified-Since"]
        return super().send_head()

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def serve(repo: AptRepo, bind: str, port: int = 0) -> Iterator[str]:
    """Serve repo.root over plain HTTP on bind:port (0: any free port) from a thread; yield the
    base URL ("http://bind:port/") and set repo.url while serving."""
    handler = functools.partial(_QuietHandler, directory=str(repo.root))
    cls = _Server6 if ":" in bind else _Server
    server = cls((bind, port), handler)
    host = f"[{bind}]" if ":" in bind else bind
    url = f"http://{host}:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, name=f"aptrepo {url}",
                              kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    repo.url = url
    try:
        yield url
    finally:
        repo.url = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

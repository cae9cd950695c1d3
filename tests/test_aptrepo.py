"""The signed test apt repository (tests/aptrepo.py), checked on this machine alone: gpgv accepts
its signatures and refuses tampered ones, it is served over loopback HTTP, its Packages index
matches the .deb, and apt itself (with a private configuration, never /etc/apt) trusts it,
downloads from it and sees an upgrade."""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aptrepo import AptRepo, build_repo, serve

TOOLS = ("apt-ftparchive", "gpg", "gpgv", "gpgconf", "dpkg-deb")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="needs apt-ftparchive (apt-utils), gpg, gpgv (gnupg) and dpkg-deb")

# Loopback only, and never through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str) -> bytes:
    with OPENER.open(url, timeout=10) as resp:
        return resp.read()


def stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1].isspace() and key:
                fields[key] += "\n" + line.strip()
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        out.append(fields)
    return out


def dearmor(asc: bytes) -> bytes:
    lines = asc.decode().strip().splitlines()
    body = lines[lines.index("") + 1:-1]
    return base64.b64decode("".join(ln for ln in body if not ln.startswith("=")))


def gpgv(tmp: Path, keyring: Path, *files: Path) -> subprocess.CompletedProcess:
    home = tmp / "gpgv-home"
    home.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["gpgv", "--homedir", str(home), "--keyring", str(keyring),
                           *map(str, files)], capture_output=True, text=True)


def live_agents(marker: str) -> list[str]:
    """gpg-agent processes (not zombies) whose command line mentions marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(ln for ln in (proc / "status").read_text().splitlines()
                         if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if "gpg-agent" in cmd and marker in cmd and "Z" not in state.split()[1]:
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> AptRepo:
    return build_repo(tmp_path_factory.mktemp("aptrepo"))


def test_repository_layout_release_and_package(repo, tmp_path):
    dists = repo.root / "dists" / repo.suite
    for name in ("Release", "InRelease", "Release.gpg"):
        assert (dists / name).is_file(), name
    release = stanzas((dists / "Release").read_text())[0]
    assert release["Suite"] == repo.suite == "provisioner-test"
    assert release["Codename"] == repo.suite
    assert release["Components"] == repo.component == "main"
    assert release["Architectures"].split() == ["amd64", "arm64", "all"]
    assert release["Date"].endswith("+0000") or release["Date"].endswith("UTC")
    sha = {ln.split()[2]: ln.split()[0] for ln in release["SHA256"].splitlines() if ln}
    for arch in ("amd64", "arm64", "all"):
        for name in ("Packages", "Packages.gz"):
            rel = f"main/binary-{arch}/{name}"
            assert sha[rel] == hashlib.sha256((dists / rel).read_bytes()).hexdigest(), rel

    # The Packages index lists the package with the .deb's real hash and size.
    deb = repo.root / "pool/main/p/provisioner-hello/provisioner-hello_1.0_all.deb"
    assert repo.deb == deb and deb.is_file()
    (entry,) = stanzas((dists / "main/binary-amd64/Packages").read_text())
    assert entry["Package"] == repo.package == "provisioner-hello"
    assert entry["Version"] == repo.version == "1.0"
    assert entry["Architecture"] == "all"
    assert entry["Filename"] == "pool/main/p/provisioner-hello/provisioner-hello_1.0_all.deb"
    assert entry["SHA256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert int(entry["Size"]) == deb.stat().st_size

    # The .deb installs the two files, owned by root, the script executable.
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout
    assert "-rwxr-xr-x root/root" in next(ln for ln in listing.splitlines()
                                          if ln.endswith("./usr/bin/provisioner-hello"))
    assert "./usr/share/provisioner-hello/VERSION" in listing
    out = tmp_path / "x"
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(out)], check=True)
    assert (out / "usr/share/provisioner-hello/VERSION").read_text() == "1.0\n"
    run = subprocess.run([str(out / "usr/bin/provisioner-hello")], capture_output=True, text=True)
    assert run.stdout == "provisioner-hello 1.0\n"


def test_key_fields_and_no_agent_left(repo):
    key = base64.b64decode(repo.key_b64, validate=True)
    assert key.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")  # armored by default
    assert repo.key_sha256 == hashlib.sha256(key).hexdigest()
    assert key == repo.key_asc.read_bytes()
    assert dearmor(key) == repo.key_gpg.read_bytes()
    assert len(repo.fingerprint) == 40
    assert not live_agents(str(repo.root.parent)) and not live_agents("aptrepo-")


def test_signatures_verify_with_the_exported_key(repo, tmp_path):
    dists = repo.root / "dists" / repo.suite
    ok = gpgv(tmp_path, repo.key_gpg, dists / "InRelease")
    assert ok.returncode == 0, ok.stderr
    assert "Good signature" in ok.stderr
    ok = gpgv(tmp_path, repo.key_gpg, dists / "Release.gpg", dists / "Release")
    assert ok.returncode == 0, ok.stderr
    # The signed text of InRelease is the Release file.
    signed = (dists / "InRelease").read_text().split("\n\n", 1)[1].split(
        "\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    assert signed + "\n" == (dists / "Release").read_text()


def test_tampered_release_fails_verification(repo, tmp_path):
    dists = repo.root / "dists" / repo.suite
    release = (dists / "Release").read_text()
    forged = tmp_path / "Release"
    forged.write_text(release.replace("Suite: provisioner-test", "Suite: provisioner-evil"))
    bad = gpgv(tmp_path, repo.key_gpg, dists / "Release.gpg", forged)
    assert bad.returncode != 0 and "BAD signature" in bad.stderr

    inrelease = (dists / "InRelease").read_text()
    forged_in = tmp_path / "InRelease"
    forged_in.write_text(inrelease.replace("Components: main", "Components: main evil"))
    bad = gpgv(tmp_path, repo.key_gpg, forged_in)
    assert bad.returncode != 0 and "BAD signature" in bad.stderr


def test_another_key_does_not_verify(repo, tmp_path):
    other = build_repo(tmp_path / "other", armored=False)
    assert other.fingerprint != repo.fingerprint
    key = base64.b64decode(other.key_b64)
    assert key == other.key_gpg.read_bytes()  # armored=False: the binary key
    assert other.key_sha256 == hashlib.sha256(key).hexdigest()
    bad = gpgv(tmp_path, other.key_gpg, repo.root / "dists" / repo.suite / "InRelease")
    assert bad.returncode != 0


def test_served_over_loopback_http(repo):
    dists = repo.root / "dists" / repo.suite
    with serve(repo, "127.0.0.1") as url:
        assert repo.url == url
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        assert fetch(f"{url}dists/{repo.suite}/InRelease") == (dists / "InRelease").read_bytes()
        (entry,) = stanzas(fetch(f"{url}dists/{repo.suite}/main/binary-amd64/Packages").decode())
        deb = fetch(url + entry["Filename"])
        assert hashlib.sha256(deb).hexdigest() == entry["SHA256"]
        assert fetch(url + "repo-key.asc") == repo.key_asc.read_bytes()
        # Never 304: a repository republished within a second must still be fetched anew.
        req = urllib.request.Request(
            f"{url}dists/{repo.suite}/InRelease",
            headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
        with OPENER.open(req, timeout=10) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            fetch(f"{url}dists/nosuchsuite/InRelease")
        assert e.value.code == 404
    assert repo.url is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# apt itself, with a private configuration: every Dir::Etc file, the lists, the cache and the
# dpkg status live under tmp; /etc/apt and its apt.conf.d are never read (APT_CONFIG sets
# Dir::Etc before apt reads its parts dir), and only the loopback-served repository is listed.
def private_apt(tmp: Path, sources: str) -> dict[str, str]:
    etc = tmp / "etc"
    for d in ("apt.conf.d", "sources.list.d", "trusted.gpg.d", "preferences.d", "keyrings"):
        (etc / d).mkdir(parents=True, exist_ok=True)
    (etc / "sources.list").write_text("")
    (etc / "sources.list.d" / "provisioner-test.sources").write_text(sources)
    for d in ("state/lists/partial", "cache/archives/partial", "log"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "state" / "status").write_text("")
    conf = tmp / "apt.conf"
    conf.write_text(f'''Dir::Etc "{etc}";
Dir::State "{tmp}/state";
Dir::State::status "{tmp}/state/status";
Dir::Cache "{tmp}/cache";
Dir::Log "{tmp}/log";
Acquire::http::Proxy "DIRECT";
Acquire::Languages "none";
Acquire::Retries "0";
APT::Sandbox::User "{'root' if os.geteuid() == 0 else ''}";
''')
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(APT_CONFIG=str(conf), LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    return env


def apt(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "-q", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def sources_for(url: str, repo: AptRepo, keyring: Path) -> str:
    return (f"Types: deb\nURIs: {url}\nSuites: {repo.suite}\nComponents: {repo.component}\n"
            f"Signed-By: {keyring}\n")


needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is missing")


@needs_apt
@pytest.mark.parametrize("armored", [True, False], ids=["asc-keyring", "gpg-keyring"])
def test_apt_trusts_downloads_and_sees_an_upgrade(tmp_path, armored):
    repo = build_repo(tmp_path / "build", armored=armored)
    # What apt.repository writes: the decoded key_b64, .asc when armored, .gpg when binary.
    keyring = tmp_path / "apt" / "etc" / "keyrings" / ("provisioner-test" +
                                                       (".asc" if armored else ".gpg"))
    with serve(repo, "127.0.0.1") as url:
        env = private_apt(tmp_path / "apt", sources_for(url, repo, keyring))
        keyring.write_bytes(base64.b64decode(repo.key_b64))
        upd = apt(env, "update")
        assert upd.returncode == 0, upd.stdout + upd.stderr
        assert not [ln for ln in (upd.stdout + upd.stderr).splitlines()
                    if ln.startswith(("W:", "E:"))], upd.stdout + upd.stderr
        assert f"{url.rstrip('/')} {repo.suite} InRelease" in upd.stdout

        dl = tmp_path / "dl"
        dl.mkdir()
        got = apt(env, "download", repo.package, cwd=dl)
        assert got.returncode == 0, got.stdout + got.stderr
        deb = dl / "provisioner-hello_1.0_all.deb"
        assert deb.read_bytes() == repo.deb.read_bytes()

        # Publishing 1.1 into the same repository (same key, 1.0 kept in the pool).
        repo2 = build_repo(tmp_path / "build", version="1.1", armored=armored)
        assert repo2.fingerprint == repo.fingerprint and repo2.key_b64 == repo.key_b64
        assert repo2.root == repo.root
        versions = [s["Version"] for s in stanzas(
            (repo.root / f"dists/{repo.suite}/main/binary-amd64/Packages").read_text())]
        assert sorted(versions) == ["1.0", "1.1"]
        upd = apt(env, "update")
        assert upd.returncode == 0, upd.stdout + upd.stderr
        policy = subprocess.run(["apt-cache", "policy", repo.package], env=env,
                                capture_output=True, text=True).stdout
        assert "Candidate: 1.1" in policy, policy
        got = apt(env, "download", f"{repo.package}=1.0", cwd=dl)
        assert got.returncode == 0, got.stdout + got.stderr


@needs_apt
def test_apt_refuses_the_repository_signed_by_another_key(repo, tmp_path):
    other = build_repo(tmp_path / "other")
    keyring = tmp_path / "apt" / "etc" / "keyrings" / "provisioner-test.asc"
    with serve(repo, "127.0.0.1") as url:
        env = private_apt(tmp_path / "apt", sources_for(url, repo, keyring))
        keyring.write_bytes(base64.b64decode(other.key_b64))
        upd = apt(env, "update")
        out = upd.stdout + upd.stderr
        assert upd.returncode != 0, out
        assert "NO_PUBKEY" in out or "not signed" in out, out
        got = apt(env, "download", repo.package, cwd=tmp_path)
        assert got.returncode != 0
        assert not list(tmp_path.glob("*.deb"))

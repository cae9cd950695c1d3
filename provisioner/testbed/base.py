"""The base root file systems test servers are overlays of, one per Debian release: each built
once, cached by recipe.

The recipe's hash names the cache folder, so changing the release, the package list (or the
host's CA bundle, which the servers must trust) builds a new base and never reuses a stale one.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from provisioner.platforms import DEBIAN

from .config import CACHE_DIR, TestbedError

# The Debian releases a test server can run (codename: version); a host of the local inventory
# picks one with `testbed: {release: CODENAME}`.
RELEASES = {codename: version for version, codename in DEBIAN.items()}
DEFAULT_RELEASE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "sudo",
            "ca-certificates", "iproute2")
RECIPE_VERSION = 4   # bump when the post-build configuration below changes
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def host_apt_sources() -> list[dict[str, str]]:
    """The host's own deb822 apt sources: the mirrors this machine is configured to use."""
    stanzas = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", f.read_text()):
            fields = {}
            for line in block.splitlines():
                m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
                if m:
                    fields[m.group(1)] = m.group(2).strip()
            if fields.get("Types") and fields.get("URIs") and fields.get("Enabled", "yes") != "no":
                stanzas.append(fields)
    return stanzas


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise TestbedError("/etc/os-release names no VERSION_CODENAME: the testbed needs a Debian host")


def apt_sources(release: str) -> list[dict[str, str]]:
    """The host's apt sources with its release's suites renamed to `release` (bookworm-security
    -> trixie-security): the same mirrors, for a server of another release."""
    own = host_codename()

    def rename(suite: str) -> str:
        return release + suite[len(own):] if suite == own or suite.startswith(own + "-") else suite
    return [{**s, "Suites": " ".join(rename(x) for x in s.get("Suites", "").split())}
            for s in host_apt_sources()]


def mirror(release: str) -> str:
    for s in apt_sources(release):
        if release in s.get("Suites", "").split() and "main" in s.get("Components", "").split():
            return s["URIs"].split()[0]
    raise TestbedError(f"no Debian mirror for '{host_codename()} main' in "
                       "/etc/apt/sources.list.d/*.sources; configure this machine's apt first "
                       "(the testbed reads its mirror there)")


def recipe(release: str) -> dict:
    ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    return {"suite": release, "variant": "minbase", "packages": PACKAGES,
            "version": RECIPE_VERSION, "host_ca": hashlib.sha256(ca).hexdigest()}


def base_path(release: str = DEFAULT_RELEASE) -> Path:
    digest = hashlib.sha256(json.dumps(recipe(release), sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_DIR / f"base-{digest}"


def ensure_base(release: str, log) -> Path:
    """Return the cached base of a release, building it first if its recipe is new. Crash-safe:
    a half-built base is a `.tmp` folder that is thrown away, never used."""
    final = base_path(release)
    marker = final.with_name(final.name + ".recipe.json")
    if marker.exists() and final.is_dir():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    log(f"building the base image of Debian {RELEASES[release]} (debootstrap {release}, once; "
        f"about a minute) in {final}")
    cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), release, str(tmp),
           mirror(release)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        shutil.rmtree(tmp, ignore_errors=True)
        raise TestbedError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
    _configure(tmp, release)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    marker.write_text(json.dumps(recipe(release), indent=1) + "\n")
    lists_stamp(final).touch()
    log(f"base image built in {time.monotonic() - started:.0f} s")
    return final


# A base's apt lists are those of its build. Servers refresh their own when they install and the
# lists are older than an hour (apt.packages), so old lists still work; refreshing the base once
# saves every new server that refresh, and keeps the lists from drifting far behind the mirror.
LISTS_MAX_AGE = 24 * 3600


def lists_stamp(base: Path) -> Path:
    """When the base's lists were last fetched (beside the base, outside what servers see)."""
    return base.with_name(base.name + ".lists-fetched")


def lists_age(base: Path) -> float:
    """Seconds since the base's apt lists were fetched (its build, or the last refresh)."""
    for f in (lists_stamp(base), base.with_name(base.name + ".recipe.json")):
        try:
            return max(0.0, time.time() - f.stat().st_mtime)
        except OSError:
            continue
    return float("inf")


def refresh_lists(base: Path, apt_proxy: str, users: list[str]) -> str | None:
    """Refresh the base's apt lists in place when they are older than LISTS_MAX_AGE, unless
    servers run on it (an overlay's lower layer must not change under a mounted server).
    Returns what was done, for the output; None when the lists are fresh."""
    age = lists_age(base)
    if age <= LISTS_MAX_AGE:
        return None
    hours = "never recorded" if age == float("inf") else f"{age / 3600:.0f} h old"
    if users:
        return (f"base image apt lists are {hours}; not refreshed while {', '.join(users)} "
                "run on it (servers refresh their own lists before installing)")
    started = time.monotonic()
    proc = subprocess.run(["chroot", str(base), "apt-get", "-q", "-o", f"Acquire::http::Proxy={apt_proxy}",
                           "-o", "Acquire::Retries=3", "update", "--error-on=any"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-10:])
        raise TestbedError(f"refreshing the base image's apt lists failed (exit {proc.returncode}):"
                           f"\n{tail}\n`invoke testbed.status` checks the package path")
    lists_stamp(base).touch()
    return f"base image apt lists were {hours}: refreshed in place ({time.monotonic() - started:.0f} s)"


def prune_bases(keep: list[Path]) -> None:
    """Drop bases of older recipes, once no server is an overlay of them any more."""
    for old in CACHE_DIR.glob("base-*"):
        if not any(old.name.startswith(k.name) for k in keep):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _configure(root: Path, release: str) -> None:
    """Make the tree a neutral template; per-server identity is written into each overlay."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()                       # every server gets its own host keys
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("# no DNS on the test network: packages go through the proxy\n")
    # systemd-networkd reads the address file each server gets, before and after reboots.
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    unit = root / "lib/systemd/system/systemd-networkd.service"
    (wants / "systemd-networkd.service").symlink_to("/lib/systemd/system/systemd-networkd.service")
    if not unit.exists():
        raise TestbedError("the base has no systemd-networkd.service; the recipe needs updating")
    # The host's apt sources for this release, so servers use the same mirrors as this machine
    # (through the proxy).
    (root / "etc/apt/sources.list").write_text("")
    (root / "etc/apt/sources.list.d/debian.sources").write_text("\n".join(
        "".join(f"{k}: {v}\n" for k, v in stanza.items()) for stanza in apt_sources(release)))
    # Local CAs this machine trusts but Debian's bundle does not: HTTPS to the registries is
    # re-signed by one here, and npm/pip fail without it.
    own = {c for f in (root / "usr/share/ca-certificates").rglob("*.crt") for c in _certs(f.read_text())}
    extra = [c for c in _certs(HOST_CA_BUNDLE.read_text())
             if c not in own] if HOST_CA_BUNDLE.exists() else []
    trust(root, {f"testbed-host-{i}": cert for i, cert in enumerate(extra)})
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True, capture_output=True)


def trust(root: Path, certs: dict[str, str]) -> None:
    """Add CA certificates ({name: PEM}) to the trust store of the system at root."""
    if not certs:
        return
    local = root / "usr/local/share/ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    for name, cert in certs.items():
        (local / f"{name}.crt").write_text(cert)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)


def _certs(bundle: str) -> list[str]:
    return [c + "\n" for c in re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", bundle, re.S)]


def a_pool_file(base: Path, mirror_uri: str, release: str) -> str | None:
    """The path under mirror_uri of one .deb that the base's lists of release name there (for a
    check of the package path)."""
    prefix = mirror_uri.split("://", 1)[-1].rstrip("/").replace("/", "_") + f"_dists_{release}_"
    for lst in sorted((base / "var/lib/apt/lists").glob(f"{prefix}*_binary-*_Packages")):
        with open(lst, errors="replace") as f:
            for line in f:
                if line.startswith("Filename: "):
                    return line.split(None, 1)[1].strip()
    return None

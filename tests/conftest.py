"""Shared fixtures. The testbed (real Debian servers in systemd-nspawn containers) is brought up
once per test session by the real `invoke testbed.up` and torn down at the end, unless
PROVISIONER_KEEP_TESTBED=1 (handy while developing: the next run then starts in a second)."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run `invoke ARGS` from the repo, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"invoke {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _testbed_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the testbed boots containers and needs root"
    if not shutil.which("systemd-nspawn"):
        return "systemd-nspawn is missing (apt-get install systemd-container; .ci/run installs it)"
    return None


@pytest.fixture(scope="session")
def testbed():
    reason = _testbed_unavailable()
    if reason:
        pytest.skip(reason)
    from provisioner import testbed as tb
    # A session that will take the testbed down owns it alone: it waits for the others and they
    # wait for it. Sessions that keep it (PROVISIONER_KEEP_TESTBED=1) may share it.
    keep = os.environ.get("PROVISIONER_KEEP_TESTBED") == "1"
    tb.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(tb.STATE_DIR / "pytest-session.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if keep else fcntl.LOCK_EX)
        invoke("testbed.up")
        yield tb
        if not keep:
            tb.down()


def pytest_collection_modifyitems(config, items):
    # The live tier is every test that needs the testbed, found by its fixture (directly or
    # through another fixture) so that no test can forget its marker: `-m "not live"` runs
    # the pure tier, which touches no server.
    for item in items:
        if "testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.live)
    # Tests that take the testbed down must come after every test that uses it.
    items.sort(key=lambda item: item.get_closest_marker("testbed_teardown") is not None)


@pytest.fixture(scope="module")
def fresh_servers(testbed):
    """The local inventory's servers, never provisioned: other modules harden them (root login
    closed, firewall up), and these tests log in as root like on a fresh cloud VM."""
    from provisioner.testbed import config
    names = [s.name for s in config.inventory_servers()]
    for name in names:
        invoke("testbed.reset", name)
    return names

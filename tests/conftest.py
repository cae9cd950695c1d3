"""Shared fixtures. The testbed (real Debian servers in systemd-nspawn containers) is brought up
once per test session by the real `invoke testbed.up` and torn down at the end, unless
PROVISIONER_KEEP_TESTBED=1 (handy while developing: the next run then starts in a second)."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# A shell without job control starts background commands (`.ci/run &` from a script) with
# SIGINT ignored, and Python then keeps it ignored, as does every `invoke` it starts: the tests
# of what Ctrl-C does need the terminal's default, as a user at a terminal has it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def _redactor_state():
    from provisioner import secret
    # the registry's private set: Redactor shows no values on purpose
    return secret.REDACTOR, frozenset(secret.REDACTOR._values)


def _put_back(state) -> str | None:
    """Put the process-wide redactor back as it was in `state`; what had changed, in counts
    (never a value), or None."""
    from provisioner import secret
    redactor, values = state
    changes = []
    if secret.REDACTOR is not redactor:
        changes.append("replaced provisioner.secret.REDACTOR")
        secret.REDACTOR = redactor
    now = frozenset(redactor._values)
    if now - values:
        changes.append(f"left {len(now - values)} secret value(s) registered with the "
                       "process-wide redactor")
    if values - now:
        changes.append(f"removed {len(values - now)} secret value(s) from the process-wide "
                       "redactor")
    if now != values:
        redactor.clear()
        for value in values:
            redactor.register(value)
    return "; ".join(changes) or None


@pytest.fixture(autouse=True)
def redactor_guard(request):
    """A value left in the process-wide redactor masks as *** every later test's output that
    holds it: a pure test's "old" once hid a live test's site name. A pure test that leaks
    fails. A live test, which may handle the real env's secrets in-process, gets a warning
    instead, so that the guard never turns a passing live run red. Either way the registry is
    put back."""
    state = _redactor_state()
    yield
    change = _put_back(state)
    if change is None:
        return
    how = ("give the test a private Redactor (monkeypatch.setattr(secret, 'REDACTOR', "
           "Redactor())), Secret(value, register=False), or conftest's forget_secrets")
    if request.node.get_closest_marker("live"):
        warnings.warn(f"this test {change} (put back); {how}", stacklevel=1)
    else:
        pytest.fail(f"this test {change} (put back); {how}", pytrace=False)


@pytest.fixture(autouse=True)
def os_cache(tmp_path):
    """Each test's in-process runs start with no os facts kept (provisioner/oscache.py): what a
    run costs must not depend on which tests ran before it. `invoke` in a subprocess keeps the
    user's cache, as a user's runs do. (Not monkeypatch: autouse fixtures are set up in name
    order, and a monkeypatch set up before redactor_guard would undo a test's patches after
    the guard looked.)"""
    from provisioner import oscache
    kept, oscache.DIR = oscache.DIR, tmp_path / "os-facts"
    yield oscache.DIR
    oscache.DIR = kept


@pytest.fixture
def forget_secrets():
    """For a test whose secrets must reach the process-wide redactor itself, as in a real run
    (role code derives secrets of its own): what the test registers is forgotten after it."""
    state = _redactor_state()
    yield
    _put_back(state)


# The modules that check the whole local env share one provisioned env (`local_env`), in this
# order: the acceptance checks first, deploys (which change releases and the database) last.
LOCAL_ENV_MODULES = ("test_provision_local", "test_lb_https", "test_provision_local_monitoring",
                     "test_backup_live", "test_deploy_live")


def _run_order(item) -> tuple:
    """Tests that reset or rebuild the local env's servers run before the modules sharing
    `local_env` (which must find it as provisioned); tests that take the testbed down, last."""
    teardown = item.get_closest_marker("testbed_teardown") is not None
    if "local_env" not in getattr(item, "fixturenames", ()):
        return (teardown, 0)
    module = item.module.__name__.rpartition(".")[2]
    listed = module in LOCAL_ENV_MODULES
    return (teardown, 1 + (LOCAL_ENV_MODULES.index(module) if listed else len(LOCAL_ENV_MODULES)))


def pytest_collection_modifyitems(config, items):
    # The live tier is every test that needs the testbed, found by its fixture (directly or
    # through another fixture) so that no test can forget its marker: `-m "not live"` runs
    # the pure tier, which touches no server.
    for item in items:
        if "testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.live)
    items.sort(key=_run_order)           # stable: file order within each group


def provision_env(*args: str, timeout: float = 3000):
    """`invoke provision --env local --json --yes ARGS`: the process and its JSON events."""
    from engine_helpers import json_events
    r = invoke("provision", "--env", "local", "--json", "--yes", *args, check=False, timeout=timeout)
    return r, json_events(r.stdout)


@pytest.fixture(scope="session")
def local_env(testbed):
    """The whole local env from fresh servers, as a user brings it up: check what a provision
    would do, provision, deploy the sample app (its migration's restore point first takes db1's
    first full backup on vault), provision again. Shared by the modules in LOCAL_ENV_MODULES,
    each of which leaves the env as it found it; run before them, never between, the tests that
    reset servers."""
    from provisioner.testbed import config
    for server in config.inventory_servers():
        invoke("testbed.reset", server.name)
    checked = provision_env("--check")
    t0 = time.monotonic()
    first = provision_env()
    first_s = time.monotonic() - t0
    deployed = invoke("deploy", "--env", "local", "--yes", check=False, timeout=900)
    t0 = time.monotonic()
    second = provision_env()
    print(f"\nlocal env: fresh provision {first_s:.0f} s, converged run {time.monotonic() - t0:.1f} s")
    return {"checked": checked, "first": first, "deploy": deployed, "second": second}


@pytest.fixture(scope="module")
def fresh_servers(testbed):
    """The local inventory's servers, never provisioned: other modules harden them (root login
    closed, firewall up), and these tests log in as root like on a fresh cloud VM."""
    from provisioner.testbed import config
    names = [s.name for s in config.inventory_servers()]
    for name in names:
        invoke("testbed.reset", name)
    return names

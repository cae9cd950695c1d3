"""The testbed: real Debian 12 and 13 servers, reachable over SSH with strict host keys, isolated from
the outside, and cleaned up completely."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

from conftest import REPO, invoke
from engine_helpers import json_events
from provisioner.testbed import base as base_image
from provisioner.testbed import acme, config, network, procs, supervise

SERVERS = config.inventory_servers()
pytestmark = pytest.mark.usefixtures("fresh_servers")


def ssh(tb, name: str, command: str, check: bool = True, known_hosts: Path | None = None):
    argv = ["ssh", "-F", str(tb.ssh_config_path())]
    if known_hosts:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}"]
    proc = subprocess.run([*argv, name, command], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ssh {name} {command!r} exited {proc.returncode}: {proc.stderr}")
    return proc


def host(tb, name: str):
    return testinfra.get_host(f"ssh://{name}", ssh_config=str(tb.ssh_config_path()))


def boot_id(tb, name: str) -> str:
    return ssh(tb, name, "cat /proc/sys/kernel/random/boot_id").stdout.strip()


def test_local_inventory_hosts_are_the_testbed_servers(testbed):
    rows = {r.name: r for r in testbed.status()}
    for spec in SERVERS:
        assert rows[spec.name].address == spec.address
        assert rows[spec.name].state == "running" and rows[spec.name].ssh


@pytest.mark.parametrize("spec", SERVERS, ids=lambda s: s.name)
def test_server_is_a_booted_debian_of_its_release_with_systemd(testbed, spec):
    name = spec.name
    h = host(testbed, name)
    version = base_image.RELEASES[spec.release]
    assert h.system_info.distribution == "debian" and h.system_info.release.startswith(version)
    assert h.system_info.codename == spec.release
    row = next(r for r in testbed.status() if r.name == name)
    assert row.release == version
    assert h.check_output("systemctl is-system-running --wait") == "running"
    assert h.check_output("ps -o comm= -p 1") == "systemd"
    assert h.check_output("hostname") == name
    assert h.service("ssh").is_running
    # every server has its own identity
    assert h.file("/etc/machine-id").content_string.strip()


def test_servers_do_not_share_units(testbed):
    """Each server's systemd owns its own cgroup: stopping a unit on one leaves the others'."""
    a, b = SERVERS[0].name, SERVERS[1].name
    for name in (a, b):
        ssh(testbed, name, "systemd-run --unit=tb-probe sleep 600")
    try:
        ssh(testbed, a, "systemctl stop tb-probe")
        assert ssh(testbed, b, "systemctl is-active tb-probe", check=False).stdout.strip() == "active"
    finally:
        for name in (a, b):
            ssh(testbed, name, "systemctl stop tb-probe", check=False)


def test_each_server_has_its_own_host_keys_known_before_first_contact(testbed):
    lines = testbed.known_hosts_path().read_text().splitlines()
    by_addr = {}
    for line in lines:
        addr, kind, key = line.split()
        by_addr.setdefault(addr, set()).add(key)
    servers = testbed.current_layout().servers       # bench servers too, when some are up
    assert set(by_addr) == {s.address for s in servers}
    ed25519 = [line.split()[2] for line in lines if " ssh-ed25519 " in line]
    assert len(set(ed25519)) == len(servers), "two servers share a host key"


def test_changed_host_key_is_refused(testbed, tmp_path):
    web1, web2 = SERVERS[0], SERVERS[1]
    # web1's address with web2's keys: exactly what a man in the middle would present
    wrong = [f"{web1.address} {line.split(' ', 1)[1]}"
             for line in testbed.known_hosts_path().read_text().splitlines()
             if line.startswith(web2.address + " ")]
    bad = tmp_path / "known_hosts"
    bad.write_text("\n".join(wrong) + "\n")
    proc = ssh(testbed, web1.name, "true", check=False, known_hosts=bad)
    assert proc.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    proc = ssh(testbed, web1.name, "true", check=False, known_hosts=empty)
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr


def test_servers_reach_each_other_and_the_host(testbed):
    web1 = SERVERS[0].name
    for other in SERVERS[1:]:
        banner = ssh(testbed, web1, f"exec 3<>/dev/tcp/{other.address}/22 && head -c 4 <&3").stdout
        assert banner == "SSH-"
    gateway = config.layout().gateway
    assert ssh(testbed, web1, f"exec 3<>/dev/tcp/{gateway}/{config.PROXY_PORT} && echo open").stdout.strip() == "open"


def _host_addresses() -> list[str]:
    out = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True).stdout)
    return [a["local"] for i in out for a in i.get("addr_info", [])
            if a.get("family") == "inet" and i["ifname"] not in ("lo", config.BRIDGE)]


def test_servers_have_no_route_outside(testbed):
    # `ip route get` asks the routing table only: no packet leaves.
    outside = ["203.0.113.10", "198.51.100.7", "8.8.8.8", *_host_addresses()]
    h = host(testbed, SERVERS[0].name)
    assert "default" not in h.check_output("ip route")
    for addr in outside:
        r = h.run(f"ip route get {addr}")
        assert r.rc != 0 and "unreachable" in r.stderr, f"{addr} is routable: {r.stdout}"


def test_packages_come_through_the_proxies(testbed):
    h = host(testbed, SERVERS[0].name)
    r = h.run("apt-get update -qq")
    assert r.rc == 0, r.stderr
    assert "Acquire::http::Proxy" in h.file("/etc/apt/apt.conf.d/01testbed-proxy").content_string
    # HTTPS through the CONNECT proxy to the npm registry the host uses, trusting the host's CA.
    if not re.search(r"^registry=", h.file("/etc/npmrc").content_string, re.M):
        pytest.skip("this machine has no npm to read its registry from, so the servers' npmrc "
                    "names none")
    script = ("import urllib.request,re;"
              "reg=re.search(r'^registry=(.*)$',open('/etc/npmrc').read(),re.M);"
              "print(urllib.request.urlopen(reg.group(1).rstrip('/')+'/is-number',timeout=30).status)")
    r = h.run(f"set -a; . /etc/environment; python3 -c \"{script}\"")
    assert r.rc == 0 and r.stdout.strip() == "200", r.stderr
    # ... and to nothing else: refused by name, before any lookup (.invalid never resolves, so
    # even a proxy without the check would send nothing anywhere)
    gateway = config.layout().gateway
    # (403: not a registry; 405: apt's proxy tunnels nothing)
    for port, refusal in ((config.PROXY_PORT, "HTTP/1.1 403"), (config.APT_CACHE_PORT, "HTTP/1.1 405")):
        reply = h.check_output(f"exec 3<>/dev/tcp/{gateway}/{port}; printf 'CONNECT "
                               "not-a-registry.invalid:443 HTTP/1.1\\r\\n\\r\\n' >&3; head -c 12 <&3")
        assert reply == refusal, f"port {port}: {reply!r}"


def _in_server(tb, name: str, script: str) -> subprocess.Popen:
    """A root shell command inside a server without SSH, started now, output collected."""
    return subprocess.Popen(tb.shell_argv(name, ["/bin/bash", "-c", script]), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_every_server_refreshing_at_once_gets_whole_signed_indexes(testbed):
    """Index refreshes broke twice through the old cache: a rename race when servers refreshed
    the same InRelease in the same second (truncated file, hung apt), then 400 for every index
    in its uncached mode. Each round forgets the lists, so every index is really fetched."""
    suites = sum(len(s.get("Suites", "").split()) for s in base_image.host_apt_sources())
    # checked apart from apt, by the verifier each release's apt uses: gpgv on 12, sqv on 13
    keyring = "/usr/share/keyrings/debian-archive-keyring"
    verify = (f"if command -v gpgv >/dev/null; then gpgv --keyring {keyring}.gpg \"$f\"; "
              f"else rm -f /tmp/verified; sqv --keyring {keyring}.pgp --cleartext --output /tmp/verified "
              "\"$f\"; fi")     # sqv will not overwrite its output
    script = ("rm -rf /var/lib/apt/lists/*; apt-get update -q --error-on=any; rc=$?; "
              "for f in /var/lib/apt/lists/*_InRelease; do "
              f"if ({verify}) >/dev/null 2>&1; then echo \"SIGNED $f\"; else echo \"BAD $f\"; fi; "
              "done; exit $rc")
    for round_ in range(3):
        started = {s.name: _in_server(testbed, s.name, script) for s in SERVERS}
        for name, proc in started.items():
            out = proc.communicate(timeout=300)[0]
            where = f"round {round_ + 1}, {name}:\n{out}"
            assert proc.returncode == 0, where
            assert not re.search(r"^(E|W|Err):", out, re.M) and "BAD " not in out, where
            assert out.count("SIGNED ") == suites, where


def test_a_server_with_day_old_apt_lists_refreshes_them_and_provisions(testbed):
    """The base image's lists are those of its build: a day later every new server refreshes
    them before installing (apt.packages, max age 1 h), through the proxy."""
    name = SERVERS[-1].name
    age = ("touch -d '2 days ago' /var/lib/apt/lists/* /var/lib/apt/lists/partial; "
           "rm -f /var/lib/apt/periodic/provisioner-update-stamp")
    assert _in_server(testbed, name, age).wait(timeout=60) == 0
    try:
        r = invoke("provision", "--env", "local", "--limit", name, "--json", "--yes", check=False,
                   timeout=900)
        events = json_events(r.stdout, strict=True)
        failed = [e for e in events if e.get("status") in ("failed", "unreachable")]
        assert r.returncode == 0 and not failed, f"{failed}\n{r.stderr[-3000:]}"
        refreshed = [e for e in events if e["event"] == "step" and e["status"] == "changed"
                     and "refreshing first" in e["reason"]]
        assert refreshed, "no step refreshed the day-old package lists"
        stamp = _in_server(testbed, name, "echo $(( $(date +%s) - $(stat -c %Y "
                           "/var/lib/apt/periodic/provisioner-update-stamp) ))")
        assert int(stamp.communicate(timeout=60)[0]) < 900
    finally:
        invoke("testbed.reset", name)             # the next tests log in as root


def test_up_leaves_the_base_alone_while_servers_run_on_it(testbed):
    stamp = base_image.lists_stamp(base_image.base_path(SERVERS[0].release))
    before = stamp.stat().st_mtime if stamp.exists() else None
    old = time.time() - 2 * 86400
    stamp.touch()
    os.utime(stamp, (old, old))
    try:
        err = invoke("testbed.up").stderr
        assert "base image apt lists are 48 h old; not refreshed while" in err
        assert all(s.name in err for s in SERVERS if s.release == SERVERS[0].release)
        assert stamp.stat().st_mtime == old
    finally:
        if before is None:
            stamp.unlink()
        else:
            os.utime(stamp, (before, before))


def test_status_checks_the_package_path(testbed):
    out = invoke("testbed.status").stdout
    lines = [line for line in out.splitlines() if line.startswith("package path:")]
    assert [line.split()[2] for line in lines][:2] == ["apt", "apt"]
    assert len(lines) >= 2 and all(line.endswith(" ok") for line in lines), out
    pidfile = config.STATE_DIR / "run" / "package-proxy.pid"
    procs.stop(pidfile, network.PACKAGE_PROXY)       # a proxy that died
    try:
        r = invoke("testbed.status", check=False)
        assert r.returncode == 1 and "FAILED: " in r.stdout and "testbed.up` restarts" in r.stdout
    finally:
        invoke("testbed.up")


def test_status_checks_the_acme_server_and_its_root_is_written(testbed):
    out = invoke("testbed.status").stdout
    lines = [line for line in out.splitlines() if line.startswith("acme server:")]
    assert len(lines) == 3 and all(line.endswith(" ok") for line in lines), out
    assert "-----BEGIN CERTIFICATE-----" in acme.ROOT_FILE.read_text()
    procs.stop(config.STATE_DIR / "run" / "pebble.pid", acme.PEBBLE_MARKER)      # pebble died
    try:
        r = invoke("testbed.status", check=False)
        assert r.returncode == 1 and "acme server:  pebble" in r.stdout and "FAILED: " in r.stdout
    finally:
        invoke("testbed.up")
    # a new pebble has a new root: up wrote it
    assert invoke("testbed.status").returncode == 0


def test_up_again_changes_nothing(testbed):
    before = {s.name: boot_id(testbed, s.name) for s in SERVERS}
    out = invoke("testbed.up").stdout
    assert "no server created; all servers already running" in out
    assert {s.name: boot_id(testbed, s.name) for s in SERVERS} == before


def test_server_rebooting_itself_comes_back_with_its_address(testbed):
    name = SERVERS[1].name
    before = boot_id(testbed, name)
    ssh(testbed, name, "systemctl reboot", check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = ssh(testbed, name, "systemctl is-system-running --wait; cat /proc/sys/kernel/random/boot_id",
                check=False)
        if r.returncode == 0 and before not in r.stdout:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{name} did not come back within 60 s after rebooting itself")
    assert r.stdout.split()[0] == "running"


def test_stop_and_start(testbed):
    name = SERVERS[2].name
    invoke("testbed.stop", name)
    row = {r.name: r for r in testbed.status()}[name]
    assert row.state == "stopped" and not row.ssh
    assert ssh(testbed, name, "true", check=False).returncode == 255
    invoke("testbed.start", name)
    assert host(testbed, name).check_output("systemctl is-system-running --wait") == "running"


def _tcp_open(addr: str, port: int = 22, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((addr, port), timeout=timeout,
                                 source_address=(config.layout().gateway, 0)).close()
        return True
    except OSError:
        return False


def test_cut_and_heal(testbed):
    spec = SERVERS[3]
    invoke("testbed.cut", spec.name)
    try:
        assert not _tcp_open(spec.address)
        assert {r.name: r for r in testbed.status()}[spec.name].cut
    finally:
        invoke("testbed.heal", spec.name)
    assert _tcp_open(spec.address)
    assert ssh(testbed, spec.name, "hostname").stdout.strip() == spec.name


def test_reset_gives_a_fresh_server_with_new_host_keys(testbed):
    spec = SERVERS[1]
    ssh(testbed, spec.name, "touch /root/provisioned-marker")
    keys_before = testbed.known_hosts_path().read_text()
    invoke("testbed.reset", spec.name)
    assert testbed.known_hosts_path().read_text() != keys_before
    assert ssh(testbed, spec.name, "test -e /root/provisioned-marker", check=False).returncode == 1


def test_up_recovers_after_a_crash(testbed):
    """nspawn and its supervisor killed hard: the server's systemd lives on as an orphan."""
    name = SERVERS[0].name
    d = config.RUN_DIR / name
    for pidfile in ("supervisor.pid", "nspawn.pid"):
        os.kill(procs.recorded(d / pidfile), 9)
    r = invoke("testbed.up")
    assert f"started {name}" in r.stdout
    assert host(testbed, name).check_output("systemctl is-system-running --wait") == "running"
    # exactly one systemd per server: the orphan is gone
    inits = subprocess.run(["pgrep", "-f", f"supervise {name} "], capture_output=True, text=True).stdout.split()
    assert len(inits) == 1


def test_a_second_checkout_cannot_take_over_the_bridge_while_its_testbed_runs(testbed):
    owner = network._owner_file()
    mine = owner.read_text()
    owner.write_text("/srv/another/checkout\n")
    # what that checkout's running package proxy looks like in the process table
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              "/srv/another/checkout/provisioner/testbed/package_proxy.py"])
    try:
        r = invoke("testbed.up", check=False)
        assert r.returncode == 2
        assert "belongs to the testbed of the checkout at /srv/another/checkout, which still runs" \
            in r.stderr
    finally:
        other.kill()
        other.wait()
        owner.write_text(mine)


def test_a_bridge_left_by_a_testbed_that_no_longer_runs_is_taken_over(testbed):
    """The second day: a session's processes were ended but its bridge stayed; a fresh clone
    elsewhere (CI's) must not be stuck behind it."""
    owner = network._owner_file()
    owner.write_text("/srv/gone/checkout\n")
    r = invoke("testbed.up")
    assert f"the bridge {config.BRIDGE} was left by the testbed of the checkout at /srv/gone/checkout, which " \
           "no longer runs: taken over" in r.stderr
    assert owner.read_text().strip() == str(REPO)


def test_ssh_task_opens_a_shell_without_ssh(testbed):
    r = invoke("testbed.ssh", SERVERS[2].name, "--command", "hostname; id -u")
    assert r.stdout.split() == [SERVERS[2].name, "0"]


def _leftovers() -> list[str]:
    found = []
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
    found += [l["ifname"] for l in links if l["ifname"] == config.BRIDGE or l["ifname"].startswith("vb-")]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(m in cmd for m in ("provisioner.testbed.supervise", "systemd-nspawn",
                                      str(REPO / ".testbed"), network.PACKAGE_PROXY,
                                      acme.CHALLTESTSRV_MARKER)):
                found.append(f"pid {p.name}: {cmd[:80]}")
    for root in supervise.cgroup_roots():
        found += [str(p) for p in (root / "provisioner-testbed").glob(f"{config.RUN_DIR.name}-*")]
    mounts = Path("/proc/mounts").read_text()
    found += [line.split()[1] for line in mounts.splitlines() if str(config.RUN_DIR) in line]
    return found


@pytest.mark.testbed_teardown
@pytest.mark.skipif(os.environ.get("PROVISIONER_KEEP_TESTBED") == "1",
                    reason="PROVISIONER_KEEP_TESTBED=1: this session keeps the testbed up")
def test_down_leaves_nothing_behind_and_is_idempotent(testbed):
    first = invoke("testbed.down").stdout
    assert "removed bridge" in first
    assert _leftovers() == []
    assert invoke("testbed.down").stdout.strip() == "testbed already down"


@pytest.mark.testbed_teardown
@pytest.mark.skipif(os.environ.get("PROVISIONER_KEEP_TESTBED") == "1",
                    reason="PROVISIONER_KEEP_TESTBED=1: this session keeps the testbed up")
def test_up_refreshes_a_day_old_base_in_place_when_no_server_uses_it(testbed):
    """After the test above took the testbed down: no server is mounted on the base."""
    base = base_image.base_path(SERVERS[0].release)
    stamp = base_image.lists_stamp(base)
    old = time.time() - 2 * 86400
    stamp.touch()
    os.utime(stamp, (old, old))
    try:
        err = invoke("testbed.up").stderr
        assert "base image apt lists were 48 h old: refreshed in place" in err, err
        assert time.time() - stamp.stat().st_mtime < 600
        # apt keeps the mirror's Last-Modified as a list's mtime, but writes into partial/ on
        # every update
        assert (base / "var/lib/apt/lists/partial").stat().st_mtime > time.time() - 600
    finally:
        invoke("testbed.down")
    assert _leftovers() == []

"""Bad testbed input is refused with a message naming the fix, before anything is created."""
from __future__ import annotations

import os
import sys
import time

import pytest

from provisioner import testbed as tb
from provisioner.testbed import config, network


def _inventory(tmp_path, hosts: str):
    p = tmp_path / "local.yml"
    p.write_text("hosts:\n" + hosts)
    return p


def test_hosts_off_one_subnet_are_refused(tmp_path):
    inv = _inventory(tmp_path, "  a: {address: 10.77.0.11}\n  b: {address: 10.78.0.12}\n")
    with pytest.raises(config.TestbedError, match=r"host b has address 10.78.0.12, outside the testbed subnet 10.77.0.0/24"):
        config.layout(inventory=inv)


def test_reserved_addresses_are_refused(tmp_path):
    inv = _inventory(tmp_path, "  a: {address: 10.77.0.1}\n")
    with pytest.raises(config.TestbedError, match=r"\.1 is the host side"):
        config.layout(inventory=inv)


def test_count_out_of_range_is_refused():
    with pytest.raises(config.TestbedError, match="--count 500"):
        config.layout(count=500)


def test_bench_servers_follow_the_inventory_hosts():
    lay = config.layout(count=20)
    names = [s.name for s in lay.servers]
    assert names[-20:] == [f"bench{i:02d}" for i in range(1, 21)]
    assert len({s.address for s in lay.servers}) == len(lay.servers)
    assert all(s.address.startswith("10.77.0.") for s in lay.servers)


def test_subnet_clashing_with_a_host_interface_is_refused(tmp_path):
    used = [a["local"] for i in network.interfaces() for a in i.get("addr_info", [])
            if a.get("family") == "inet" and i["ifname"] not in ("lo", config.BRIDGE)]
    if not used:
        pytest.skip("this machine has no IPv4 address outside loopback to clash with")
    prefix = used[0].rsplit(".", 1)[0]
    inv = _inventory(tmp_path, f"  a: {{address: {prefix}.50}}\n")
    with pytest.raises(config.TestbedError, match=rf"clashes with {used[0]}.*move the hosts of inventories/local.yml"):
        network.check_subnet(config.layout(inventory=inv))


def test_missing_inventory_names_the_file(tmp_path):
    with pytest.raises(config.TestbedError, match="missing"):
        config.layout(inventory=tmp_path / "nope.yml")


def test_missing_tool_names_the_package(monkeypatch):
    monkeypatch.setitem(tb.TOOLS, "no-such-tool-xyz", "no-such-package")
    with pytest.raises(config.TestbedError) as e:
        tb.preflight(config.layout())
    assert "apt-get install -y" in str(e.value) and "no-such-package" in str(e.value)


def test_not_root_is_refused_before_anything_is_created(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    created = []
    monkeypatch.setattr(tb, "_ensure_key", lambda: created.append("key"))
    monkeypatch.setattr(tb.network, "bridge_up", lambda lay: created.append("bridge"))
    with pytest.raises(config.TestbedError, match="needs root"):
        tb.up()
    assert created == []


def test_a_port_held_by_another_process_is_refused_naming_it(tmp_path):
    import socket
    import subprocess
    holder = socket.create_server(("127.0.0.1", 0))        # what answers instead of ours
    port = holder.getsockname()[1]
    ours = subprocess.Popen(["sleep", "0"])                  # our proxy, which failed to bind
    ours.wait()
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(f"{ours.pid}\n")
    try:
        with pytest.raises(config.TestbedError, match=f"127.0.0.1:{port} answers, but not the "
                                                      "HTTPS proxy, which exited"):
            network.wait_port("127.0.0.1", port, "the HTTPS proxy", pidfile, "sleep", timeout=2)
    finally:
        holder.close()


def test_a_helper_process_is_restarted_only_when_its_command_line_changed(tmp_path):
    from provisioner.testbed import procs
    pidfile, log = tmp_path / "helper.pid", tmp_path / "helper.log"
    marker = f"{tmp_path}/marker"

    def helper(seconds):     # stays up, with the marker on its command line (`sleep 300 PATH`
        # would reject PATH and exit at once, so the test would race its exit)
        return [sys.executable, "-c", f"import time; time.sleep({seconds})", marker]

    def started():           # /proc/PID/cmdline reads empty for a moment after the spawn
        deadline = time.monotonic() + 5
        while not procs.running(pidfile, marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        return procs.running(pidfile, marker)
    try:
        assert procs.ensure(helper(300), log, pidfile, marker)       # started
        first = started()
        assert first
        assert not procs.ensure(helper(300), log, pidfile, marker)   # same: kept
        assert procs.running(pidfile, marker) == first
        assert procs.ensure(helper(301), log, pidfile, marker)       # new settings
        second = started()
        assert second and second != first
        assert procs.cmdline(first) == []           # the old one is gone (or an unreaped zombie)
    finally:
        procs.stop(pidfile, marker)


def test_each_host_gets_the_release_its_inventory_names(tmp_path):
    inv = _inventory(tmp_path, "  a: {address: 10.77.0.11, testbed: {release: trixie}}\n"
                               "  b: {address: 10.77.0.12}\n")
    assert [(s.name, s.release) for s in config.layout(inventory=inv).servers] == \
        [("a", "trixie"), ("b", "bookworm")]


def test_a_release_the_testbed_does_not_build_is_refused(tmp_path):
    inv = _inventory(tmp_path, "  a: {address: 10.77.0.11, testbed: {release: bullseye}}\n")
    with pytest.raises(config.TestbedError, match=r"host a: testbed release 'bullseye' is not one "
                                                  r"the testbed builds; choose one of bookworm, trixie"):
        config.layout(inventory=inv)


def test_servers_of_another_release_use_the_same_mirrors_with_its_suites(monkeypatch):
    from provisioner.testbed import base
    monkeypatch.setattr(base, "host_codename", lambda: "bookworm")
    monkeypatch.setattr(base, "host_apt_sources", lambda: [
        {"Types": "deb", "URIs": "http://mirror.test/debian", "Suites": "bookworm bookworm-updates",
         "Components": "main"},
        {"Types": "deb", "URIs": "http://mirror.test/debian-security", "Suites": "bookworm-security",
         "Components": "main"}])
    assert [s["Suites"] for s in base.apt_sources("trixie")] == ["trixie trixie-updates", "trixie-security"]
    assert [s["Suites"] for s in base.apt_sources("bookworm")] == ["bookworm bookworm-updates", "bookworm-security"]
    assert base.mirror("trixie") == "http://mirror.test/debian"
    # one base per release, each named by its own recipe
    assert base.base_path("trixie") != base.base_path("bookworm")

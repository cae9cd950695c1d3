"""bench/install_floor.py without servers: what a check run's events say a fresh host would
install, and the commands of its floor."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import install_floor  # noqa: E402


def step(host, resource, status, reason):
    return {"event": "step", "host": host, "role": None, "resource": resource, "status": status,
            "reason": reason}


# as `invoke provision --check --json` gives them for a fresh web1 and a db1 (reasons shortened)
EVENTS = [
    step("web1", "apt openssh-server sudo ufw", "changed",
         "would install: ufw absent (package lists 108 min old: refreshing first)"),
    step("web1", "apt batch: nodejs restic", "changed", "would install: nodejs absent, restic "
         "absent; for roles node, restic; written first: file /etc/default/x absent"),
    step("web1", "apt nodejs", "ok", "already present: nodejs (installed by this run)"),
    step("web1", "apt npm", "ok", "already absent: npm"),
    step("web1", "npm from the registry", "changed", "would install: /usr/local/lib/node_modules/"
         "npm/package.json absent"),
    step("web1", "npm -g pm2", "changed", "would install: pm2 absent"),
    step("db1", "apt openssh-server sudo ufw", "changed", "would install: ufw absent"),
    step("db1", "apt batch: postgresql-17 prometheus-node-exporter", "changed",
         "would install: postgresql-17 absent, prometheus-node-exporter absent; for roles x"),
    step("db1", "file /etc/x", "changed", "would create: absent"),
    {"event": "recap"},
]


def test_the_packages_each_apt_step_would_install_and_the_registry_installs():
    got = install_floor.installs(EVENTS)
    assert got == {
        "web1": {"apt": [["ufw"], ["nodejs", "restic"]], "npm": True, "pm2": True},
        "db1": {"apt": [["ufw"], ["postgresql-17", "prometheus-node-exporter"]], "npm": False,
                "pm2": False}}


def test_the_floor_of_a_host_is_its_installs_in_order_and_nothing_of_ours():
    want = install_floor.installs(EVENTS)
    web = install_floor.commands(want["web1"], ("10.9.9", "sha512-x", "prefix=/usr/local\n"), "6.0.14")
    assert web[0] == "apt-get -q update" and web[1] == install_floor.NO_CLUSTER
    assert web[2].endswith("install --no-install-recommends ufw")
    assert web[3].endswith("install --no-install-recommends nodejs restic")
    assert web[4].startswith("python3 - /usr/local 10.9.9 sha512-x '' 'prefix=/usr/local\n'")
    assert web[5].endswith("pm2@6.0.14") and len(web) == 6
    db = install_floor.commands(want["db1"], ("", "", ""), "")
    assert len(db) == 4 and not [c for c in db if "npm" in c]

"""Every pattern that guards a value must match the whole string: in Python `$` also matches
before a final newline, so `^name$` let "name\n" through into config files and commands
(a host key path with a newline could add an sshd directive). Pure tests."""
from __future__ import annotations

import pytest

import importlib

from provisioner import inventory, roles, yamlfile
from provisioner.ops import _base, apt, sysctl, systemd, ufw


def _role_pattern(role: str, name: str):
    return getattr(importlib.import_module(f"roles.{role}"), name)


PATTERNS = [
    (inventory.ENV_RE, "prod"), (inventory.NAME_RE, "web1"), (inventory.USER_RE, "deploy"),
    (yamlfile.VAULT_NAME_RE, "db_password"), (inventory.DNS_LABEL_RE, "web"),
    (_base.NAME_RE, "www-data"), (_base.MODE_RE, "0644"),
    (apt.PKG_RE, "nginx"), (apt.REPO_NAME_RE, "nodesource"), (sysctl.KEY_RE, "net.ipv4.tcp_syncookies"),
    (systemd.UNIT_RE, "ssh.service"), (ufw.COMMENT_RE, "ssh"), (roles.ROLE_NAME_RE, "harden"),
    (_role_pattern("harden", "ALGO_RE"), "curve25519-sha256"),
    (_role_pattern("harden", "TIME_RE"), "10m"), (_role_pattern("harden", "SIZE_RE"), "500M"),
    (_role_pattern("harden", "CLOCK_RE"), "04:00"),
    (_role_pattern("redis", "MEMORY_RE"), "256mb"), (_role_pattern("redis", "NAME_RE"), "appendonly"),
    (_role_pattern("redis", "PASSWORD_RE"), "0123456789abcdef0123"),
    (_role_pattern("postgresql", "IDENT_RE"), "app"), (_role_pattern("postgresql", "MEMORY_RE"), "128MB"),
    (_role_pattern("postgresql", "SETTING_RE"), "work_mem"),
    (_role_pattern("postgresql", "LOCALE_RE"), "C.UTF-8"),
    (_role_pattern("pm2", "ENV_NAME_RE"), "NODE_ENV"), (_role_pattern("pm2", "MEMORY_RE"), "10M"),
    (_role_pattern("pm2", "APP_NAME_RE"), "shop"), (_role_pattern("node", "APP_NAME_RE"), "shop"),
    (_role_pattern("mongodb", "DB_RE"), "shop"), (_role_pattern("mongodb", "USER_RE"), "app"),
]


@pytest.mark.parametrize("pattern, good", PATTERNS, ids=[p.pattern for p, _ in PATTERNS])
def test_a_trailing_newline_is_refused(pattern, good):
    assert pattern.match(good)
    assert not pattern.match(good + "\n")


@pytest.mark.parametrize("make", [
    lambda: ufw.rule("allow", 22, "tcp", comment="ssh\n"),
    lambda: sysctl.sysctl("net.ipv4.tcp_syncookies\n", 1),
    lambda: apt.packages(["nginx\n"]),
    lambda: systemd.service("ssh\n", enabled=True),
    lambda: apt.repository("nodesource", "https://deb.example.org/node\n", "nodistro",
                           key_url="https://deb.example.org/key.gpg"),
    lambda: apt.repository("nodesource", "https://deb.example.org/node", "nodistro",
                           key_url="https://deb.example.org/key.gpg\n"),
], ids=["ufw comment", "sysctl key", "apt package", "systemd unit", "apt uri", "apt key url"])
def test_ops_refuse_a_value_with_a_trailing_newline(make):
    with pytest.raises((ValueError, TypeError)):
        make()

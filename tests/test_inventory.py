"""Inventory loading and validation: pure, no servers.

Error tests assert what a user sees: file:line, the key path, the message and the fix.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from provisioner.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_PENDING,
                                EXIT_UNREACHABLE, InputError, Problem)
from provisioner.inventory import (Host, Inventory, VaultRef, is_valid_address, load_inventory,
                                   load_inventory_file)
from provisioner.roles import RoleInfo, available_roles

REPO = Path(__file__).resolve().parent.parent

ROLES = {
    "base": """\
        base_packages: []
        base_timezone: UTC
    """,
    "node": """\
        node_version: "20"
        node_port: 3000
        node_env: {}
        node_cluster: true
        node_extra: null
        node_ratio: 0.5
    """,
    "postgresql": """\
        postgresql_max_connections: 100
        postgresql_password: !vault postgresql_password
        postgresql_hba: []
    """,
}

GOOD = """\
env: test
known_hosts: known_hosts/test
ssh:
  user: admin
  bootstrap_user: root
  key: keys/id_ed25519
vars:
  node_port: 3001
hosts:
  web1: {address: 10.0.0.11}
  web2: {address: 10.0.0.12, port: 2222, user: deploy}
  db1:
    address: db1.example.com
    vars: {postgresql_max_connections: 200}
groups:
  app:
    hosts: [web1, web2]
    roles: [base, node]
    vars: {node_port: 3002}
  db:
    hosts: [db1]
    roles: [base, postgresql]
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, text in ROLES.items():
        (tmp_path / "roles" / name).mkdir(parents=True)
        (tmp_path / "roles" / name / "defaults.yml").write_text(textwrap.dedent(text))
    (tmp_path / "roles" / "not_a_role").mkdir()          # no defaults.yml: ignored
    (tmp_path / "inventories").mkdir()
    return tmp_path


def write(root: Path, text: str, env: str = "test") -> Path:
    path = root / "inventories" / f"{env}.yml"
    path.write_text(text)
    return path


def load(root: Path, text: str, env: str = "test") -> Inventory:
    write(root, text, env)
    return load_inventory(env, root=root)


def fail(root: Path, text: str, env: str = "test") -> InputError:
    write(root, text, env)
    with pytest.raises(InputError) as info:
        load_inventory(env, root=root)
    return info.value


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing needle."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


def only(err: InputError, key: str) -> Problem:
    hits = [p for p in err.problems if p.key == key]
    assert len(hits) == 1, f"expected one problem at {key}, got:\n{err}"
    return hits[0]


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --- the real inventories ----------------------------------------------------------------------

@pytest.mark.parametrize("env", ["local", "dev", "staging", "prod"])
def test_repo_inventories_load(env: str) -> None:
    inv = load_inventory(env)
    assert inv.env == env
    assert inv.path == REPO / "inventories" / f"{env}.yml"
    assert inv.hosts and inv.groups
    assert inv.select(None) == list(inv.hosts.values())
    for name in inv.hosts:
        assert inv.roles_for(name)
        inv.hostvars(name)


def test_local_inventory_targets_the_testbed() -> None:
    inv = load_inventory("local")
    assert {n: h.address for n, h in inv.hosts.items()} == {
        "web1": "10.77.0.11", "web2": "10.77.0.12", "db1": "10.77.0.13", "vault": "10.77.0.14",
        "lb1": "10.77.0.15", "mon1": "10.77.0.16"}
    assert inv.known_hosts == REPO / ".testbed" / "known_hosts"
    web1 = inv.hosts["web1"]
    assert (web1.user, web1.bootstrap_user, web1.port, web1.key, web1.jump) == (
        "deploy", "root", 22, REPO / ".testbed" / "id_ed25519", None)
    assert [h.name for h in inv.hosts_in("app")] == ["web1", "web2"]
    assert [h.name for h in inv.hosts_in("db")] == ["db1"]
    assert [h.name for h in inv.hosts_in("backup")] == ["vault"]
    assert inv.roles_for("web1") == ["base", "harden", "node", "pm2", "restic", "monitoring_agent"]
    assert inv.roles_for("db1") == ["base", "harden", "postgresql", "redis", "pgbackrest",
                                    "monitoring_agent"]
    assert inv.roles_for("vault") == ["base", "harden", "pgbackrest", "restic", "monitoring_agent"]
    assert inv.roles_for("mon1") == ["base", "harden", "monitoring", "monitoring_agent"]


def test_prod_goes_through_the_bastion_and_needs_the_sudo_secret() -> None:
    inv = load_inventory("prod")
    jump = inv.hosts["web1"].jump
    assert jump is not None and (jump.address, jump.port, jump.user) == ("bastion.example.com", 2222, "jump")
    assert inv.known_hosts == REPO / "inventories" / "known_hosts" / "prod"
    assert inv.known_hosts.is_file()
    assert inv.vault_refs() == {"sudo_password"}


def test_repo_roles_are_valid() -> None:
    roles = available_roles()
    assert "base" in roles
    assert roles["base"].path == REPO / "roles" / "base"
    assert all(k.startswith("base_") for k in roles["base"].defaults)


# --- the model ---------------------------------------------------------------------------------

def test_hosts_get_ssh_defaults_and_their_own_overrides(root: Path) -> None:
    inv = load(root, GOOD)
    web1, web2, db1 = inv.hosts["web1"], inv.hosts["web2"], inv.hosts["db1"]
    assert list(inv.hosts) == ["web1", "web2", "db1"]
    assert (web1.port, web1.user, web1.bootstrap_user) == (22, "admin", "root")
    assert (web2.port, web2.user) == (2222, "deploy")
    assert web1.key == root / "inventories" / "keys" / "id_ed25519"
    assert inv.known_hosts == root / "inventories" / "known_hosts" / "test"
    assert (web1.connect_timeout, web1.command_timeout) == (10, 900)
    assert db1.address == "db1.example.com"
    assert web1.groups == ("app",) and db1.groups == ("db",)
    assert isinstance(web1, Host) and hash(web1)         # usable as a dict key by the runner


def test_precedence_role_defaults_env_groups_in_file_order_host(root: Path) -> None:
    text = """\
env: test
known_hosts: kh
ssh: {user: root}
vars:
  node_port: 1
  node_version: "18"
  base_timezone: Europe/Paris
hosts:
  web1:
    address: 10.0.0.1
    vars: {node_version: "22"}
  web2: {address: 10.0.0.2}
groups:
  app:
    hosts: [web1, web2]
    roles: [node, base]
    vars: {node_port: 2, node_env: {A: "1"}}
  canary:
    hosts: [web1]
    roles: [base, postgresql, node]
    vars: {node_port: 3}
"""
    inv = load(root, text)
    web1, web2 = inv.hostvars("web1"), inv.hostvars("web2")
    assert web1["node_port"] == 3                   # later group wins over earlier group
    assert web2["node_port"] == 2                   # group wins over env
    assert web1["node_version"] == "22"             # host wins over env
    assert web2["node_version"] == "18"             # env wins over role default
    assert web1["base_timezone"] == "Europe/Paris"
    assert web2["node_cluster"] is True             # role default
    assert web1["node_env"] == {"A": "1"}
    assert "postgresql_max_connections" in web1 and "postgresql_max_connections" not in web2
    assert inv.roles_for("web1") == ["node", "base", "postgresql"]   # group order, first kept
    assert inv.roles_for("web2") == ["node", "base"]
    web1["node_env"]["A"] = "changed"               # a copy: the inventory stays as loaded
    assert inv.hostvars("web1")["node_env"] == {"A": "1"}


def test_hosts_in_and_select(root: Path) -> None:
    inv = load(root, GOOD)
    names = lambda hosts: [h.name for h in hosts]
    assert names(inv.hosts_in("app")) == ["web1", "web2"]
    assert names(inv.select(None)) == ["web1", "web2", "db1"]
    assert names(inv.select("db")) == ["db1"]
    assert names(inv.select("db1, web1")) == ["web1", "db1"]        # file order
    assert names(inv.select("app,web2")) == ["web1", "web2"]        # no duplicates
    with pytest.raises(InputError) as info:
        inv.select("web3,dbb,app")
    text = str(info.value)
    assert "no host or group named 'web3'" in text and "no host or group named 'dbb'" in text
    assert "did you mean 'db'?" in text and "hosts: web1, web2, db1; groups: app, db" in text
    assert "'app'" not in text.replace("groups: app", "")
    with pytest.raises(InputError, match="the limit is empty"):
        inv.select(" , ")                       # an empty variable never means "all hosts"
    with pytest.raises(InputError, match="no group named 'ap'"):
        inv.hosts_in("ap")


# --- secrets -----------------------------------------------------------------------------------

VAULTED = edit("  key: keys/id_ed25519\n", "  sudo_password: !vault sudo\n", edit(
    "vars: {postgresql_max_connections: 200}",
    "vars: {postgresql_max_connections: 200, postgresql_password: !vault db_pass,\n"
    "           postgresql_hba: [{user: app, password: !vault app_pass}]}"))


def test_vault_refs_load_and_resolve(root: Path) -> None:
    inv = load(root, VAULTED)
    assert inv.hosts["web1"].sudo_password == VaultRef("sudo")
    assert inv.hostvars("db1")["postgresql_password"] == VaultRef("db_pass")
    # the role default of postgresql is a reference too: the vault must hold it
    assert inv.vault_refs() == {"sudo", "db_pass", "app_pass", "postgresql_password"}
    secrets = {"sudo": "s1", "db_pass": "s2", "app_pass": "s3", "postgresql_password": "s4"}
    resolved = inv.resolve(secrets)
    assert resolved.hosts["web1"].sudo_password == "s1"
    db1 = resolved.hostvars("db1")
    assert db1["postgresql_password"] == "s2"
    assert db1["postgresql_hba"] == [{"user": "app", "password": "s3"}]
    assert resolved.vault_refs() == set()
    assert inv.hostvars("db1")["postgresql_password"] == VaultRef("db_pass")   # original intact


def test_missing_secrets_are_listed_together_with_where_they_are_used(root: Path) -> None:
    inv = load(root, VAULTED)
    with pytest.raises(InputError) as info:
        inv.resolve({"sudo": "x", "postgresql_password": "y"})
    err = info.value
    assert sorted(p.message.split("'")[1] for p in err.problems) == ["app_pass", "db_pass"]
    text = str(err)
    assert f"test.yml:{line_of(VAULTED, '!vault db_pass')}: hosts.db1.vars.postgresql_password: " \
           "secret 'db_pass' is not in the vault of env 'test'" in text
    assert "hosts.db1.vars.postgresql_hba[0].password: secret 'app_pass'" in text
    assert ("fix: add it: `invoke vault.set --env test db_pass`, or correct the name after !vault"
            in text)


def test_plain_text_sudo_password_is_refused_and_not_echoed(root: Path) -> None:
    text = edit("  key: keys/id_ed25519\n", "  sudo_password: hunter2\n")
    err = fail(root, text)
    p = only(err, "ssh.sudo_password")
    assert p.line == line_of(text, "sudo_password")
    assert "expected a vault reference" in p.message and "!vault NAME" in p.fix
    assert "hunter2" not in str(err)


def test_vault_ref_fits_a_string_var_but_not_others(root: Path) -> None:
    ok = edit("vars: {node_port: 3002}", "vars: {node_port: 3002, node_version: !vault nv}")
    assert load(root, ok).hostvars("web1")["node_version"] == VaultRef("nv")
    bad = edit("vars: {node_port: 3002}", "vars: {node_port: !vault port}")
    p = only(fail(root, bad), "groups.app.vars.node_port")
    assert p.message.startswith("'node_port' must be an integer") and "vault reference" in p.message
    plain = edit("vars: {postgresql_max_connections: 200}",
                 "vars: {postgresql_password: pw-in-git}")
    err = fail(root, plain)
    assert "must be a vault reference" in only(err, "hosts.db1.vars.postgresql_password").message
    assert "pw-in-git" not in str(err)


def test_vault_tag_needs_a_name(root: Path) -> None:
    text = edit("vars: {node_port: 3002}", "vars: {node_version: !vault ''}")
    p = only(fail(root, text), "groups.app.vars.node_version")
    assert "`!vault` needs the name of a secret" in p.message


# --- validation: one error, every problem, each with file:line, key, fix ------------------------

def test_problem_renders_file_line_key_message_and_fix(root: Path) -> None:
    text = edit("hosts: [web1, web2]", "hosts: [web1, web2, web3]")
    err = fail(root, text)
    line = line_of(text, "[web1, web2, web3]")
    path = root / "inventories" / "test.yml"
    assert str(err) == (
        f"{path}:{line}: groups.app.hosts[2]: unknown host 'web3' in group 'app'\n"
        f"    fix: did you mean 'web2'? define 'web3' under `hosts:`, or use a defined host: "
        f"web1, web2, db1")
    p = only(err, "groups.app.hosts[2]")
    assert p.file == root / "inventories" / "test.yml" and p.line == line
    assert err.exit_code == EXIT_BAD_INPUT


def test_many_problems_in_one_error(root: Path) -> None:
    text = GOOD.replace("env: test", "env: tset").replace("port: 2222", "port: 99999") \
        .replace("roles: [base, node]", "roles: [base, nodejs]") \
        .replace("hosts: [db1]", "hosts: [db2]").replace("node_port: 3001", "node_prot: 3001")
    err = fail(root, text)
    keys = [p.key for p in err.problems]
    assert keys == ["env", "vars.node_prot", "hosts.web2.port", "hosts.db1",
                    "groups.app.roles[1]", "groups.db.hosts[0]"]    # sorted by line
    assert str(err).startswith("6 problems in ")
    assert [p.line for p in err.problems] == sorted(p.line for p in err.problems)


def test_unknown_keys_suggest_the_close_one(root: Path) -> None:
    text = edit("known_hosts:", "known_host:").replace("  web1: {address: 10.0.0.11}",
                                                        "  web1: {adress: 10.0.0.11}")
    err = fail(root, text)
    p = only(err, "known_host")
    assert (p.line, p.message) == (2, "unknown key 'known_host'")
    assert p.fix.startswith("did you mean 'known_hosts'?")
    p = only(err, "hosts.web1.adress")
    assert p.line == line_of(text, "adress") and p.fix.startswith("did you mean 'address'?")
    assert "allowed keys under hosts.web1: address, port, user, bootstrap_user, vars" in p.fix
    # the missing keys those typos left behind are reported too
    assert only(err, "known_hosts").message == "missing required key 'known_hosts'"
    assert only(err, "hosts.web1.address").line == line_of(text, "adress")


def test_wrong_types(root: Path) -> None:
    text = edit("  bootstrap_user: root", "  bootstrap_user: yes\n  connect_timeout: soon")
    text = edit("roles: [base, postgresql]", "roles: base", text)
    text = edit("port: 2222", 'port: "2222"', text)
    err = fail(root, text)
    p = only(err, "ssh.bootstrap_user")
    assert p.message == "expected a user name, or null, got the boolean true"
    assert 'quote it: `bootstrap_user: "yes"`' in p.fix
    p = only(err, "ssh.connect_timeout")
    assert p.message == "expected a number of seconds (> 0), got the string 'soon'"
    assert p.fix == "write e.g. `connect_timeout: 10`"
    assert only(err, "groups.db.roles").message == "expected a list of role names, got the string 'base'"
    p = only(err, "hosts.web2.port")
    assert p.line == line_of(text, '"2222"') and "TCP port" in p.message


def test_missing_required_values(root: Path) -> None:
    text = "env: test\nhosts:\n  web1: {port: 22}\ngroups:\n  app: {roles: [base]}\n"
    err = fail(root, text)
    assert {p.key for p in err.problems} >= {"known_hosts", "ssh", "hosts.web1.address",
                                             "groups.app.hosts"}
    p = only(err, "hosts.web1.address")
    assert p.line == 3 and p.message == "missing required key 'address'"
    assert p.fix == "add `address: 10.0.0.5` under hosts.web1 (the host's IP address or DNS name)"


def test_empty_section_hints_at_indentation(root: Path) -> None:
    text = """\
env: test
known_hosts: kh
ssh: {user: root}
hosts:
web1: {address: 10.0.0.11}
groups:
  app: {hosts: [web1], roles: [base]}
"""
    err = fail(root, text)
    p = only(err, "hosts")
    assert p.line == 4
    assert p.message == ("expected a mapping of host names to hosts (at least one), "
                         "got an empty value (null)")
    assert "if the lines below belong to it, indent them" in p.fix
    assert only(err, "web1").message == "unknown key 'web1'"


def test_env_must_match_the_file_name(root: Path) -> None:
    p = only(fail(root, GOOD.replace("env: test", "env: prod")), "env")
    assert (p.line, p.message) == (1, "env 'prod' does not match the file name test.yml")
    assert p.fix == "write `env: test`, or rename the file to prod.yml"


def test_duplicate_host_names(root: Path) -> None:
    text = edit("  db1:\n", "  web1: {address: 10.0.0.99}\n  db1:\n")
    err = fail(root, text)
    p = only(err, "hosts.web1")
    assert p.line == line_of(text, "web1: {address", 2)
    assert p.message == f"duplicate key 'web1' (first at line {line_of(text, 'web1: {address')})"
    assert "YAML would silently keep only the last" in p.fix


def test_duplicate_keys_anywhere(root: Path) -> None:
    text = edit("  user: admin\n", "  user: admin\n  port: 22\n  port: 2200\n")
    text = edit("vars: {node_port: 3002}", "vars: {node_port: 1, node_port: 2}", text)
    err = fail(root, text)
    assert only(err, "ssh.port").line == line_of(text, "port: 2200")
    assert only(err, "groups.app.vars.node_port").message.startswith("duplicate key 'node_port'")


def test_two_hosts_with_the_same_address_and_port(root: Path) -> None:
    same = edit("address: 10.0.0.12, port: 2222", "address: 10.0.0.11, port: 22")
    p = only(fail(root, same), "hosts.web2.address")
    assert p.line == line_of(same, "web2:")
    assert p.message == ("host 'web2' has the same address and port as 'web1' "
                         f"(10.0.0.11:22, line {line_of(same, 'web1:')})")
    # the same machine on another port (e.g. a forwarded port) is a different host
    load(root, edit("address: 10.0.0.12, port: 2222", "address: 10.0.0.11, port: 2222"))
    # IPv6 spellings and DNS case are normalised
    v6 = edit("{address: 10.0.0.11}", "{address: '2001:db8::1'}").replace(
        "address: 10.0.0.12, port: 2222", "address: '2001:0db8:0::1'")
    assert only(fail(root, v6), "hosts.web2.address")


def test_host_in_no_group(root: Path) -> None:
    text = edit("  db1:\n", "  web3: {address: 10.0.0.13}\n  db1:\n")
    p = only(fail(root, text), "hosts.web3")
    assert (p.line, p.message) == (line_of(text, "web3"), "host 'web3' is in no group")
    assert "add it to the `hosts:` list of a group" in p.fix


def test_group_listing_an_unknown_or_repeated_host(root: Path) -> None:
    text = edit("hosts: [web1, web2]", "hosts: [web1, web2, wbe1, web1]")
    err = fail(root, text)
    p = only(err, "groups.app.hosts[2]")
    assert p.message == "unknown host 'wbe1' in group 'app'" and p.fix.startswith("did you mean 'web1'?")
    assert "listed twice" in only(err, "groups.app.hosts[3]").message


@pytest.mark.parametrize("address", ["10.0.0.1", "2001:db8::1", "db1.example.com", "localhost",
                                     "web-1.internal.", "fe80::1%eth0"])
def test_valid_addresses(address: str) -> None:
    assert is_valid_address(address)


@pytest.mark.parametrize("address, hint", [
    ("10.0.0.300", "write an IP address"),
    ("10.0.0", "write an IP address"),
    ("web_1.example.com", "write an IP address"),
    ("-web.example.com", "write an IP address"),
    ("ssh://web1.example.com", "no scheme or path"),
    ("10.0.0.5:2222", "write `address: 10.0.0.5` and put the port in `port: 2222`"),
    ("[2001:db8::1]", "without brackets"),
    ("web 1", "write an IP address"),
])
def test_invalid_addresses(root: Path, address: str, hint: str) -> None:
    text = edit("{address: 10.0.0.11}", f"{{address: '{address}'}}")
    p = only(fail(root, text), "hosts.web1.address")
    assert p.line == line_of(text, "web1:")
    assert p.message == f"'{address}' is not an IP address or a DNS name"
    assert hint in p.fix


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_ports_out_of_range(root: Path, port: int) -> None:
    text = edit("port: 2222", f"port: {port}")
    p = only(fail(root, text), "hosts.web2.port")
    assert p.message == f"expected a TCP port (1-65535), got the integer {port}"


def test_unknown_role_lists_the_available_ones(root: Path) -> None:
    text = edit("roles: [base, postgresql]", "roles: [base, postgres]")
    p = only(fail(root, text), "groups.db.roles[1]")
    assert (p.line, p.message) == (line_of(text, "postgres]"), "unknown role 'postgres'")
    assert p.fix == "did you mean 'postgresql'? available roles: base, node, postgresql"


def test_unknown_var_suggests_declared_ones(root: Path) -> None:
    text = edit("node_port: 3001", "node_prot: 3001")
    p = only(fail(root, text), "vars.node_prot")
    assert (p.line, p.message) == (line_of(text, "node_prot"), "unknown var 'node_prot'")
    assert p.fix.startswith("did you mean 'node_port'? role 'node' declares: node_version, "
                            "node_port, node_env")
    p = only(fail(root, edit("node_port: 3001", "nginx_workers: 2")), "vars.nginx_workers")
    assert "must be declared, with its default, in the defaults.yml of a role" in p.fix


def test_a_retired_var_says_what_to_write_instead(root: Path) -> None:
    (root / "roles" / "node" / "retired.yml").write_text(
        "node_old_port: write node_port instead\n")
    text = edit("node_port: 3001", "node_old_port: 3001")
    p = only(fail(root, text), "vars.node_old_port")
    assert (p.line, p.message) == (line_of(text, "node_old_port"),
                                   "var 'node_old_port' is no longer a var of role 'node'")
    assert p.fix == "write node_port instead"


@pytest.mark.parametrize("retired, message", [
    ("node_port: gone\n", "var 'node_port' is in defaults.yml too"),
    ("base_x: not this role's\n", "'base_x' is not a retired var of role 'node' with a text"),
    ("node_x: [a list]\n", "'node_x' is not a retired var of role 'node' with a text"),
])
def test_a_bad_retired_yml_is_refused_where_it_is_wrong(root: Path, retired: str, message: str) -> None:
    (root / "roles" / "node" / "retired.yml").write_text(retired)
    err = fail(root, GOOD)
    assert [p.message for p in err.problems] == [message]
    assert err.problems[0].file == root / "roles" / "node" / "retired.yml"


def test_the_pm2_roles_retired_vars_point_to_what_replaced_them() -> None:
    from provisioner.roles import available_roles
    retired = available_roles()["pm2"].retired
    assert set(retired) == {"pm2_logrotate_version", "pm2_logrotate_rotate_interval"}
    assert "pm2_logrotate_period" in retired["pm2_logrotate_rotate_interval"]


def test_vars_of_any_role_may_be_set_anywhere(root: Path) -> None:
    # web1 does not run postgresql, but the app may read the database's settings
    text = edit("{address: 10.0.0.11}", "{address: 10.0.0.11, vars: {postgresql_max_connections: 5}}")
    assert load(root, text).hostvars("web1")["postgresql_max_connections"] == 5


@pytest.mark.parametrize("var, value, kind, fix", [
    ("node_port", '"3000"', "an integer", "write a number without quotes, e.g. `node_port: 3000`"),
    ("node_version", "20", "a string", 'quote it to make it a string: `node_version: "20"`'),
    ("node_version", "no", "a string", 'quote it to make it a string: `node_version: "no"`'),
    ("node_env", "[a]", "a mapping", "write a mapping"),
    ("node_cluster", '"yes"', "true or false", "write `node_cluster: true` or `node_cluster: false`"),
    ("base_packages", "nginx", "a list", "write a list: `base_packages: [a, b]`"),
    ("node_ratio", "high", "a number", "write a number"),
])
def test_var_types_follow_the_role_defaults(root: Path, var: str, value: str, kind: str,
                                            fix: str) -> None:
    text = edit("vars: {node_port: 3002}", f"vars: {{{var}: {value}}}")
    p = only(fail(root, text), f"groups.app.vars.{var}")
    assert p.line == line_of(text, f"{var}: {value}")
    assert p.message.startswith(f"'{var}' must be {kind} (its default in ")
    assert "defaults.yml:" in p.message
    assert fix in p.fix


def test_var_types_that_fit(root: Path) -> None:
    text = edit("vars: {node_port: 3002}",
                "vars: {node_extra: [anything], node_ratio: 2, node_env: {A: b}}")
    hv = load(root, text).hostvars("web1")
    assert (hv["node_extra"], hv["node_ratio"]) == (["anything"], 2)


def test_missing_file_names_the_path_and_existing_envs(root: Path) -> None:
    write(root, GOOD, "staging")
    write(root, GOOD.replace("env: test", "env: prod"), "prod")
    with pytest.raises(InputError) as info:
        load_inventory("prdo", root=root)
    text = str(info.value)
    assert "no inventory for env 'prdo': " in text and "inventories/prdo.yml does not exist" in text
    assert "did you mean 'prod'? existing envs: prod, staging" in text
    with pytest.raises(InputError, match="invalid env name"):
        load_inventory("../etc/passwd", root=root)


def test_yaml_syntax_error_has_the_line(root: Path) -> None:
    text = edit("  web2: {address: 10.0.0.12, port: 2222, user: deploy}",
                "  web2: {address: 10.0.0.12, port: 2222\n  db2: x")
    err = fail(root, text)
    assert len(err.problems) == 1
    assert err.problems[0].message.startswith("invalid YAML: ")
    assert "(while parsing a flow mapping at line 11)" in err.problems[0].message


def test_empty_or_non_mapping_file(root: Path) -> None:
    assert "got an empty file" in str(fail(root, "# nothing yet\n"))
    assert "got a list" in str(fail(root, "- web1\n"))


def test_unknown_yaml_tags_are_reported(root: Path) -> None:
    p = only(fail(root, edit("node_port: 3001", "node_port: !secret 3001")), "vars.node_port")
    assert p.message == "unknown YAML tag '!secret'"


def test_anchors_and_merge_keys_work(root: Path) -> None:
    text = edit("  web1: {address: 10.0.0.11}",
                "  web1: &web {address: 10.0.0.11, vars: {node_version: \"21\"}}")
    text = edit("  web2: {address: 10.0.0.12, port: 2222, user: deploy}",
                "  web2: {<<: *web, address: 10.0.0.12}", text)
    inv = load(root, text)
    assert inv.hostvars("web2")["node_version"] == "21"
    assert inv.hosts["web2"].address == "10.0.0.12"


def test_names_are_checked(root: Path) -> None:
    text = edit("  web1: {address: 10.0.0.11}", "  web,1: {address: 10.0.0.11}")
    text = edit("hosts: [web1, web2]", "hosts: ['web,1', web2]", text)
    p = only(fail(root, text), "hosts['web,1']")
    assert p.message == "invalid name 'web,1'" and "--limit" in p.fix
    text = edit("  db:\n", "  web1:\n", GOOD)
    p = only(fail(root, text), "groups.web1")
    assert p.message == "group 'web1' has the same name as a host"


def test_bad_ssh_user(root: Path) -> None:
    p = only(fail(root, edit("user: admin", "user: Admin")), "ssh.user")
    assert p.message == "'Admin' is not a valid Linux user name"


def test_jump_host(root: Path) -> None:
    text = edit("  key: keys/id_ed25519\n",
                "  key: keys/id_ed25519\n  jump: {address: bastion.example.com, port: 2200}\n")
    jump = load(root, text).hosts["db1"].jump
    assert (jump.address, jump.port, jump.user) == ("bastion.example.com", 2200, "admin")
    assert jump.key == root / "inventories" / "keys" / "id_ed25519"
    bad = edit("port: 2200}", "prot: 2200}", text)
    p = only(fail(root, bad), "ssh.jump.prot")
    assert p.fix == "did you mean 'port'? allowed keys under ssh.jump: address, port, user"


# --- roles -------------------------------------------------------------------------------------

def test_available_roles_with_a_roots_override(root: Path) -> None:
    roles = available_roles(root / "roles")
    assert list(roles) == ["base", "node", "postgresql"]
    assert isinstance(roles["node"], RoleInfo)
    assert roles["node"].defaults["node_port"] == 3000
    assert roles["postgresql"].defaults["postgresql_password"] == VaultRef("postgresql_password")
    assert roles["node"].path == root / "roles" / "node"


def test_role_defaults_are_validated_with_lines(root: Path) -> None:
    (root / "roles" / "node" / "defaults.yml").write_text(
        "node_port: 3000\nport: 1\nnode_port: 3001\nbase_timezone: UTC\n")
    with pytest.raises(InputError) as info:
        available_roles(root / "roles")
    err = info.value
    defaults = root / "roles" / "node" / "defaults.yml"
    got = {(p.line, p.key): p for p in err.problems}
    assert got[(2, "port")].message == "var 'port' is not prefixed with the role name 'node_'"
    assert got[(2, "port")].fix.startswith("rename it to 'node_port'")
    assert got[(3, "node_port")].message.startswith("duplicate key 'node_port'")
    assert got[(4, "base_timezone")].file == defaults
    # role problems come together with the inventory's own
    text = edit("node_port: 3001", "node_prot: 3001")
    err = fail(root, text)
    assert any(p.file == defaults for p in err.problems)
    assert any(p.key == "vars.node_prot" for p in err.problems)


# --- errors module -----------------------------------------------------------------------------

def test_exit_codes_and_plain_input_error() -> None:
    assert (EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_LOCKED, EXIT_PENDING) == \
        (0, 1, 2, 3, 4, 5)
    err = InputError("wrong vault password")
    assert str(err) == "wrong vault password" and err.exit_code == 2
    assert err.problems == [Problem(None, None, None, "wrong vault password")]


def test_load_inventory_file_directly(root: Path) -> None:
    path = write(root, GOOD)
    inv = load_inventory_file(path, roles_root=root / "roles")
    assert inv.env == "test" and inv.path == path


def test_file_tag_reads_a_controller_file_relative_to_the_inventory(root: Path) -> None:
    (root / "inventories" / "keys").mkdir()
    (root / "inventories" / "keys" / "deploy.pub").write_text("ssh-ed25519 AAAAC3Nza deploy@laptop\n\n")
    inv = load(root, edit("node_port: 3001", "node_port: 3001\n  node_version: !file keys/deploy.pub"))
    assert inv.hostvars("web1")["node_version"] == "ssh-ed25519 AAAAC3Nza deploy@laptop"


def test_file_tag_with_a_missing_file_names_the_line_and_the_path(root: Path) -> None:
    text = edit("node_port: 3001", "node_port: 3001\n  node_version: !file keys/nope.pub")
    p = only(fail(root, text), "vars.node_version")
    assert "cannot read" in p.message and "nope.pub" in p.message
    assert p.line == line_of(text, "!file keys/nope.pub")


def test_a_testbed_release_is_one_the_testbed_builds(root: Path) -> None:
    inv = load(root, edit("  web1: {address: 10.0.0.11}",
                          "  web1: {address: 10.0.0.11, testbed: {release: trixie}}"))
    assert inv.hosts["web1"].address == "10.0.0.11"
    text = edit("  web1: {address: 10.0.0.11}", "  web1: {address: 10.0.0.11, testbed: {release: bullseye}}")
    p = only(fail(root, text), "hosts.web1.testbed.release")
    assert p.line == line_of(text, "bullseye")
    assert p.message == "'bullseye' is not a Debian release the testbed builds"
    assert p.fix == "write one of bookworm, trixie (Debian 12, 13)"

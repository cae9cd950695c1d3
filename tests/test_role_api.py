"""The role API (provisioner/api.py): roles import nothing else from provisioner, bad role vars
are refused before any server is touched (exit 2, where the var was set, the fix), a role
yielding something that is not a Resource is refused naming its line."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from invoke import Context, Exit

from provisioner import api
from provisioner.cli import provision as provision_cli
from provisioner.inventory import load_inventory_file
from provisioner.roles import available_roles, load_role
from provisioner.runner import resource_list

REPO = Path(__file__).resolve().parents[1]
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxTVjmFyJ8ajpm7R1CX0VrFOo1sOqcXNnfUKudZ+Ndz test"


def _provisioner_imports(path: Path, root: Path = REPO) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "provisioner" and name not in ("provisioner.api",) \
                    and not name.startswith("provisioner.api."):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return found


def test_roles_import_only_the_role_api():
    files = sorted((REPO / "roles").rglob("*.py")) + sorted((REPO / "tests" / "roles").rglob("*.py"))
    assert files
    assert [bad for f in files for bad in _provisioner_imports(f)] == []


def test_the_import_scan_sees_every_form_of_import(tmp_path):
    role = tmp_path / "probe.py"
    role.write_text("import provisioner.runner\nfrom provisioner import ops\n"
                    "from provisioner.api import apt\n"
                    "def f():\n    from provisioner.ops import _base\n")
    assert _provisioner_imports(role, tmp_path) == [
        "probe.py:1: provisioner.runner", "probe.py:2: provisioner", "probe.py:2: provisioner.ops",
        "probe.py:5: provisioner.ops", "probe.py:5: provisioner.ops._base"]


def test_roles_are_importable_modules_and_the_runner_loads_the_same_module():
    import roles.harden
    assert load_role(available_roles()["harden"]).module is roles.harden
    assert callable(roles.harden.check) and callable(roles.harden.resources)


def _inventory(tmp_path, **host_vars):
    doc = {"env": "apitest", "known_hosts": "known_hosts",
           "ssh": {"user": "deploy", "bootstrap_user": "root"},
           "vars": {"harden_deploy_keys": [PUBKEY]},
           "hosts": {"web1": {"address": "192.0.2.11", "vars": host_vars},
                     "web2": {"address": "192.0.2.12"}},
           "groups": {"app": {"hosts": ["web1", "web2"], "roles": ["harden"]}}}
    path = tmp_path / "apitest.yml"
    path.write_text(json.dumps(doc, indent=1))           # JSON is YAML: one key per line
    return load_inventory_file(path, roles_root=REPO / "roles")


@pytest.mark.parametrize("keys", [["/etc/ssh/../../root/x"],
                                  ["/etc/ssh/ssh_host_ed25519_key\nPermitRootLogin yes"]])
def test_invoke_check_refuses_a_bad_role_var_with_where_it_was_set(tmp_path, monkeypatch, capsys,
                                                                   keys):
    inv = _inventory(tmp_path, harden_ssh_host_keys=keys)
    monkeypatch.setattr(provision_cli, "load", lambda env, interactive, limit=None: (inv, inv.select(limit)))
    with pytest.raises(Exit) as e:
        provision_cli.check(Context(), env="apitest")
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(inv.path.read_text().splitlines(), 1)
                if '"harden_ssh_host_keys"' in text)
    assert f"apitest.yml:{line}: hosts.web1.vars.harden_ssh_host_keys:" in err
    assert "is not a key file under /etc/ssh/ (for web1)" in err and "fix: list normalised" in err


def test_invoke_check_passes_good_vars(tmp_path, monkeypatch, capsys):
    inv = _inventory(tmp_path, harden_ssh_host_keys=["/etc/ssh/ssh_host_ed25519_key"])
    monkeypatch.setattr(provision_cli, "load", lambda env, interactive, limit=None: (inv, inv.select(limit)))
    provision_cli.check(Context(), env="apitest")
    assert ": ok (2 hosts" in capsys.readouterr().out


def test_a_var_from_the_env_level_is_reported_there_once_for_all_its_hosts(tmp_path):
    from provisioner.errors import InputError
    from provisioner.varchecks import check_vars
    inv = _inventory(tmp_path)
    inv.vars["harden_ssh_port"] = 0
    with pytest.raises(InputError) as e:
        check_vars(inv, inv.hosts.values(), lambda r: load_role(inv.roles[r]))
    [problem] = e.value.problems
    assert problem.key == "vars.harden_ssh_port" and "(for web1, web2)" in problem.message


def test_a_role_yielding_something_else_is_refused_naming_the_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "defaults.yml").write_text("bad_x: 1\n")
    (tmp_path / "bad" / "__init__.py").write_text(
        "from provisioner.api import files\n\n\ndef resources(v, ctx):\n"
        "    yield files.file('/etc/x', 'x')\n    yield 'not a resource'\n")
    from provisioner.roles import discover_roles
    code = load_role(discover_roles(tmp_path, [])["bad"])
    with pytest.raises(TypeError, match=r"bad/__init__.py:6: role bad yielded str is not a "
                                        r"Resource \(no id, facts, plan, expect\)"):
        resource_list(code, {}, None)


def test_every_resource_the_ops_make_keeps_the_protocol():
    from provisioner.api import apt, files, users
    for r in (apt.packages(["nginx"]), files.file("/etc/x", "y"), users.group("g")):
        assert api.not_a_resource(r) is None


def test_every_role_checks_its_vars_before_any_server(tmp_path):
    from provisioner.errors import InputError
    from provisioner.varchecks import check_vars
    for name, info in available_roles().items():
        assert callable(load_role(info).check), f"role {name} has no check(v, ctx)"
    doc = {"env": "apitest", "known_hosts": "known_hosts", "ssh": {"user": "root"},
           "hosts": {"db1": {"address": "192.0.2.21",
                             "vars": {"base_timezone": "../../etc/shadow"}}},
           "groups": {"db": {"hosts": ["db1"], "roles": ["base", "redis"],
                             "vars": {"redis_port": 0}}}}
    (tmp_path / "apitest.yml").write_text(json.dumps(doc, indent=1))
    inv = load_inventory_file(tmp_path / "apitest.yml", roles_root=REPO / "roles")
    with pytest.raises(InputError) as e:
        check_vars(inv, inv.hosts.values(), lambda r: load_role(inv.roles[r]))
    assert sorted(p.key for p in e.value.problems) == ["groups.db.vars.redis_port",
                                                        "hosts.db1.vars.base_timezone"]
    assert all(p.line for p in e.value.problems)


def test_role_discovery_does_not_import_the_inventory():
    """Layers: the inventory reads roles' defaults, roles never read the inventory."""
    path = REPO / "provisioner" / "roles.py"
    mods = {n.module for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom)} | {a.name for n in ast.walk(ast.parse(path.read_text()))
                                                 if isinstance(n, ast.Import) for a in n.names}
    assert "provisioner.inventory" not in mods


def test_extra_config_settings_are_judged_by_one_function():
    import re
    from provisioner.api import VarError, config_settings
    name = re.compile(r"^[a-z_]+$")
    got = config_settings("x_settings", {"a": True, "b": 2, "c": "on disk", "d": ""},
                          file="x.conf", name_re=name, managed={"port"}, bools=("on", "off"),
                          quote=lambda s: f"'{s}'")
    assert got == {"a": "on", "b": "2", "c": "'on disk'", "d": "''"}
    for bad, why in [({"port": 1}, "managed by the role"), ({"Bad": 1}, "not a x.conf directive"),
                     ({"a": "x\nport 1"}, "one-line"), ({"a": [1]}, "one-line"),
                     ({"a": ""}, "one-line")]:
        with pytest.raises(VarError, match=why) as e:
            config_settings("x_settings", bad, file="x.conf", name_re=name, managed={"port"})
        assert e.value.var == "x_settings"


def test_the_example_role_of_the_guide_works(tmp_path):
    import re
    from provisioner.api import VarError
    from provisioner.facts import Facts
    from provisioner.ops import plan_all, request
    from provisioner.roles import discover_roles
    guide = (REPO / "docs" / "roles.md").read_text()
    section = guide.split("## A role in 30 lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    defaults = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 40
    (tmp_path / "status_page").mkdir()
    (tmp_path / "status_page" / "__init__.py").write_text(code)
    (tmp_path / "status_page" / "defaults.yml").write_text(defaults)
    info = discover_roles(tmp_path, [])["status_page"]
    role = load_role(info)
    v = dict(info.defaults)
    with pytest.raises(VarError, match="status_page_port"):
        role.check({**v, "status_page_port": 80}, None)
    resources = resource_list(role, v, None)
    facts = Facts({"files": {p: {"exists": False} for p in request(resources)["files"]},
                   "packages": {"installed": {"nginx": None}, "lists_age": 60},
                   "services": {"nginx.service": None}})
    planned = [c.resource for _, result in plan_all(resources, facts) for c in result]
    assert "file group status site" in planned and "apt nginx" in planned
    assert set(role.handlers(v, None)) == {"reload nginx"}


def _one_role_inventory(tmp_path, code):
    (tmp_path / "roles" / "probe").mkdir(parents=True)
    (tmp_path / "roles" / "probe" / "defaults.yml").write_text("probe_x: 1\n")
    (tmp_path / "roles" / "probe" / "__init__.py").write_text(code)
    doc = {"env": "probe", "known_hosts": "known_hosts", "ssh": {"user": "root"},
           "hosts": {"h1": {"address": "192.0.2.31"}},
           "groups": {"all": {"hosts": ["h1"], "roles": ["probe"]}}}
    (tmp_path / "probe.yml").write_text(json.dumps(doc))
    return load_inventory_file(tmp_path / "probe.yml", roles_root=tmp_path / "roles")


@pytest.mark.parametrize("body, message", [
    ("    yield files.file('/etc/x', 'y', validate=['nginx', '-t'])\n", "does not name the new file"),
    ("    yield 'text'\n", "yielded str is not a Resource"),
])
def test_a_role_that_cannot_be_built_is_bad_input_before_any_server(tmp_path, body, message):
    from provisioner.errors import InputError
    from provisioner.varchecks import check_vars
    inv = _one_role_inventory(tmp_path, "from provisioner.api import files\n\n\n"
                                        "def resources(v, ctx):\n" + body)
    with pytest.raises(InputError) as e:
        check_vars(inv, inv.hosts.values(), lambda r: load_role(inv.roles[r]))
    [p] = e.value.problems
    assert p.file.name == "__init__.py" and p.line == 5 and p.key == "role probe"
    assert message in p.message and "(for h1)" in p.message


def test_a_role_that_reads_the_servers_os_is_built_only_once_connected(tmp_path):
    from provisioner.varchecks import check_vars
    inv = _one_role_inventory(tmp_path, (
        "from provisioner.api import files\n\n\ndef resources(v, ctx):\n"
        "    if (ctx.os or {}).get('id') != 'debian':\n        raise ValueError('not Debian')\n"
        "    yield files.file('/etc/x', 'y')\n"))
    check_vars(inv, inv.hosts.values(), lambda r: load_role(inv.roles[r]))     # no error


@pytest.mark.parametrize("address, ok", [
    ("10.0.0.5", True), ("172.16.3.4", True), ("192.168.1.1", True), ("100.64.0.9", True),
    ("127.0.0.1", True), ("fd00::5", True),
    ("0.0.0.0", False), ("::", False),             # every interface, the public ones included
    ("203.0.113.7", False), ("8.8.8.8", False), ("169.254.1.1", False), ("2001:db8::1", False),
])
def test_private_address_allows_private_networks_only(address, ok):
    from types import SimpleNamespace
    from provisioner.api import VarError, private_address
    host = SimpleNamespace(address="10.9.9.9")
    if ok:
        assert str(private_address("x_bind", address, host, "x")) == address
        return
    with pytest.raises(VarError, match=rf"x_bind: '{re.escape(address)}' is not a private address"):
        private_address("x_bind", address, host, "x")

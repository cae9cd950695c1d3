"""The command line as a newcomer meets it, without any server: flags and limits, exit codes, the
JSON recap, errors that say what to do, and connection errors from peers on loopback.

Each test runs the real `invoke` program (tasks.py's namespace) in a subprocess, against a
throwaway checkout root that holds only an inventory and the real roles."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from engine_helpers import json_events
from sshpeers import Silent, SshServer, closed_port, ed25519_key, known_line, write_private_key

REPO = Path(__file__).resolve().parents[1]

HARNESS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import provisioner.cli.common as common
import provisioner.connection as connection
common.REPO_ROOT = Path(sys.argv[2])
connection.RETRY_DELAY = 0       # still retried as a run would; the tests need not wait between
import tasks
from invoke import Program
Program(namespace=tasks.ns, binary="invoke", name="invoke").run(["invoke", *sys.argv[3:]])
"""


def cli(root: Path, *argv: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_VAULT")}
    return subprocess.run([sys.executable, "-c", HARNESS, str(REPO), str(root), *argv],
                          input=stdin, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=root)                      # users run invoke from the checkout


def events(proc: subprocess.CompletedProcess) -> list[dict]:
    return json_events(proc.stdout, strict=True)


def make_root(tmp_path: Path, hosts: dict[str, int], *, known: str | None = "",
              ssh: str = "{user: root, connect_timeout: 1}", extra: str = "",
              group: str = "roles: [base]") -> Path:
    """A checkout root with env `test`: `hosts` (name: port on 127.0.0.1), all in group app
    with role base; `known` is the known_hosts text (None: no file)."""
    root = tmp_path / "root"
    (root / "inventories" / "known_hosts").mkdir(parents=True)
    (root / "roles").symlink_to(REPO / "roles")
    host_lines = "\n".join(f"  {n}: {{address: 127.0.0.1, port: {p}}}" for n, p in hosts.items())
    (root / "inventories" / "test.yml").write_text(
        f"env: test\nknown_hosts: known_hosts/test\nssh: {ssh}\n{extra}"
        f"hosts:\n{host_lines}\ngroups:\n  app: {{hosts: [{', '.join(hosts)}], {group}}}\n")
    if known is not None:
        (root / "inventories" / "known_hosts" / "test").write_text(known)
    return root


def all_known(hosts: dict[str, int]) -> str:
    key = ed25519_key()
    return "".join(known_line(f"[127.0.0.1]:{p}", key) for p in hosts.values())


@pytest.fixture
def two_hosts(tmp_path) -> Path:
    hosts = {"web1": closed_port(), "web2": closed_port()}
    return make_root(tmp_path, hosts, known=all_known(hosts))


# --- limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--limit", "--roles"])
def test_an_empty_limit_or_role_list_is_an_error_not_everything(two_hosts, flag):
    """A script that builds --limit from an empty variable must not provision the fleet."""
    r = cli(two_hosts, "provision", "--env", "test", flag, "", "--check", "--json")
    assert r.returncode == 2, r.stderr
    lines = events(r)
    assert [e["event"] for e in lines] == ["error", "recap"]       # no start: no host touched
    assert f"{flag}: the" in lines[0]["message"] and "is empty" in lines[0]["message"]


def test_hosts_trust_refuses_an_empty_limit(two_hosts):
    r = cli(two_hosts, "hosts.trust", "--env", "test", "--limit", "", "--yes")
    assert r.returncode == 2
    assert "--limit: the limit is empty" in r.stderr
    assert "presents" not in r.stdout and "cannot reach" not in r.stderr


# --- flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--forks", "abc"], "--forks: expected an integer, got 'abc'"),
    (["--forks=abc"], "--forks: expected an integer, got 'abc'"),
    (["--env"], "--env needs a value"),
    (["--chek"], "unknown flag --chek for provision"),
    (["web1"], "unexpected argument 'web1' for provision"),
])
def test_bad_flags_are_exit_2_with_a_json_recap(two_hosts, argv, says):
    r = cli(two_hosts, "provision", "--json", *argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = events(r)
    assert lines[-1]["event"] == "recap" and lines[0]["event"] == "error"
    assert lines[0]["code"] == 2 and says in lines[0]["message"]
    assert "fix:" in lines[0]["message"]


def test_a_misspelt_flag_gets_a_suggestion_and_no_empty_recap_table(two_hosts):
    r = cli(two_hosts, "provision", "--env", "test", "--chek")
    assert r.returncode == 2
    assert "did you mean --check?" in r.stderr
    assert "recap" not in r.stdout + r.stderr        # nothing ran: no table of zeros


def test_a_misspelt_task_is_exit_2_with_a_suggestion(two_hosts):
    r = cli(two_hosts, "provison")
    assert r.returncode == 2 and "did you mean 'provision'?" in r.stderr


@pytest.mark.parametrize("argv", [["-v", "3"], ["-v3"], ["--verbose=3"], ["-vvv"]])
def test_verbosity_as_a_number_or_repeated(two_hosts, argv):
    """Help shows `-v INT`: `-v 3` means what `-vvv` means (run id shown from -v on)."""
    r = cli(two_hosts, "provision", "--env", "test", "--limit", "web1", *argv)
    assert r.returncode == 3, r.stderr                   # a closed port: unreachable
    assert "; run " in r.stdout                          # -v and up
    assert "(0." in r.stdout or "s)" in r.stdout         # -vv and up: step durations


@pytest.mark.parametrize("argv, says", [
    (["--max-fail-percentage", "20"], "--max-fail-percentage: only means something with --serial"),
    (["--serial", "1", "--max-fail-percentage", "101"], "--max-fail-percentage: expected a percentage"),
    (["--serial", "1", "--max-fail-percentage", "-1"], "--max-fail-percentage: expected a percentage"),
])
def test_max_fail_percentage_needs_serial_and_a_percentage(two_hosts, argv, says):
    r = cli(two_hosts, "provision", "--env", "test", "--json", *argv)
    assert r.returncode == 2, r.stderr
    assert says in events(r)[0]["message"]


# --- check ----------------------------------------------------------------------------------

def test_check_refuses_a_missing_known_hosts_file(tmp_path):
    root = make_root(tmp_path, {"web1": closed_port()}, known=None)
    r = cli(root, "check", "--env", "test")
    assert r.returncode == 2
    assert "inventories/test.yml:2: known_hosts: inventories/known_hosts/test does not exist" in r.stderr
    assert "invoke hosts.trust --env test" in r.stderr


def test_provision_stops_before_connecting_when_a_host_key_is_not_on_record(tmp_path):
    with Silent() as peer:
        root = make_root(tmp_path, {"web1": peer.port},
                         known="# keys go here\n[127.0.0.1]:1 ecdsa-sha2-nistp256 not-base64!\n"
                               "a line\n")
        r = cli(root, "provision", "--env", "test", "--json")
        assert peer.held == []                          # no server was touched
    assert r.returncode == 2
    message = events(r)[0]["message"]
    assert "inventories/known_hosts/test:2: an unreadable ecdsa-sha2-nistp256 key" in message
    assert "inventories/known_hosts/test:3: not a host key line" in message
    assert f"hosts.web1: no key for host web1 ([127.0.0.1]:{peer.port})" in message


def test_provision_stops_before_connecting_on_a_wrong_vault_password(tmp_path):
    """The vault's key is derived while the engine loads (vault.open_env_vault_later): a wrong
    password still stops the run before any server is touched, said with the other problems."""
    from provisioner import vault
    with Silent() as peer:
        root = make_root(tmp_path, {"web1": peer.port}, known="",
                         ssh="{user: root, connect_timeout: 1, sudo_password: !vault sudo_password}")
        vault.save_vault(root / "inventories" / "test.vault", {"sudo_password": "s3cret-pw"}, "right")
        password = root / "inventories" / "test.vault-password"
        password.write_text("wrong\n")
        password.chmod(0o600)
        r = cli(root, "provision", "--env", "test", "--json")
        assert peer.held == []                          # no server was touched
    assert r.returncode == 2, r.stderr
    message = events(r)[0]["message"]
    assert "wrong vault password for inventories/test.vault" in message
    assert f"hosts.web1: no key for host web1 ([127.0.0.1]:{peer.port})" in message
    assert "s3cret-pw" not in r.stdout + r.stderr


def test_check_success_names_the_inventory_as_typed(two_hosts):
    r = cli(two_hosts, "check", "--env", "test")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("inventories/test.yml: ok (2 hosts, 1 groups, roles: base)")


def test_a_missing_vault_file_says_so_and_how_to_create_it(tmp_path):
    hosts = {"web1": closed_port()}
    root = make_root(tmp_path, hosts, known=all_known(hosts),
                     ssh="{user: root, sudo_password: !vault sudo_password}")
    r = cli(root, "check", "--env", "test")
    assert r.returncode == 2
    assert "inventories/test.vault does not exist" in r.stderr
    assert "invoke vault.set --env test sudo_password" in r.stderr


def test_an_env_name_with_capitals_is_refused_with_the_rule(two_hosts):
    r = cli(two_hosts, "check", "--env", "TEST")
    assert r.returncode == 2
    assert "lowercase" in r.stderr


# --- runs -----------------------------------------------------------------------------------

def test_a_port_without_ssh_is_unreachable_with_its_cause_and_no_traceback(tmp_path):
    with Silent() as peer:
        hosts = {"web1": peer.port}
        root = make_root(tmp_path, hosts, known=all_known(hosts))
        r = cli(root, "provision", "--env", "test", "--check", "--json")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr
    lines = events(r)
    assert lines[-1]["event"] == "recap"
    step = next(e for e in lines if e["event"] == "step")
    assert step["status"] == "unreachable" and step["role"] is None
    assert f"127.0.0.1 port {peer.port} accepts TCP but sends no SSH banner" in step["reason"]
    assert "check the port" in step["reason"]


def test_a_refused_connection_says_nothing_listens_and_is_reported_once(tmp_path):
    port = closed_port()
    root = make_root(tmp_path, {"web1": port}, known=all_known({"web1": port}))
    r = cli(root, "provision", "--env", "test", "--check")
    assert r.returncode == 3
    said = r.stdout + r.stderr
    assert f"connection refused by 127.0.0.1 port {port}" in said
    assert said.count("connection refused") == 1, said
    assert "Errno" not in said


def test_a_host_never_started_is_reported_skipped(tmp_path):
    hosts = {"web1": closed_port(), "web2": closed_port()}
    root = make_root(tmp_path, hosts, known=all_known(hosts))
    r = cli(root, "provision", "--env", "test", "--serial", "1", "--max-fail-percentage", "0",
            "--json")
    assert r.returncode == 3
    done = {e["host"]: e["status"] for e in events(r) if e["event"] == "host"}
    assert done == {"web1": "unreachable", "web2": "skipped"}


# --- hosts.trust ----------------------------------------------------------------------------

def test_hosts_trust_records_a_new_key_without_a_vault_password(tmp_path):
    key = ed25519_key()
    with SshServer(key) as server:
        root = make_root(tmp_path, {"web1": server.port},
                         ssh="{user: root, connect_timeout: 2, sudo_password: !vault sudo_password}")
        r = cli(root, "hosts.trust", "--env", "test", "--yes")
    assert r.returncode == 0, r.stderr
    assert "vault" not in r.stderr
    recorded = (root / "inventories" / "known_hosts" / "test").read_text()
    assert recorded == known_line(f"[127.0.0.1]:{server.port}", key)


def test_hosts_trust_refuses_a_key_of_another_type_for_a_trusted_host(tmp_path):
    known_key, other = ed25519_key(), paramiko.ECDSAKey.generate()
    with SshServer(other) as server:                  # the server now has only another type
        name = f"[127.0.0.1]:{server.port}"
        root = make_root(tmp_path, {"web1": server.port}, known=known_line(name, known_key),
                         ssh="{user: root, connect_timeout: 2}")
        r = cli(root, "hosts.trust", "--env", "test", "--yes")
    assert r.returncode == 3
    assert "HOST KEY CHANGED" in r.stderr and "ecdsa-sha2-nistp256" in r.stderr
    assert (root / "inventories" / "known_hosts" / "test").read_text() == known_line(name, known_key)


def test_hosts_trust_asks_for_the_type_on_record(tmp_path):
    """A server with two keys presents the one we know (here not the type a client prefers):
    already trusted, nothing added."""
    known_key, other = paramiko.ECDSAKey.generate(), ed25519_key()
    with SshServer(other, known_key) as server:
        name = f"[127.0.0.1]:{server.port}"
        root = make_root(tmp_path, {"web1": server.port}, known=known_line(name, known_key),
                         ssh="{user: root, connect_timeout: 2}")
        r = cli(root, "hosts.trust", "--env", "test", "--yes")
    assert r.returncode == 0, r.stderr
    assert "web1: already trusted (ecdsa-sha2-nistp256" in r.stdout
    assert (root / "inventories" / "known_hosts" / "test").read_text() == known_line(name, known_key)


def test_hosts_trust_goes_through_the_jump_host(tmp_path):
    jump_key, web_key, client_key = ed25519_key(), ed25519_key(), paramiko.ECDSAKey.generate()
    with SshServer(jump_key, jump=True) as jump, SshServer(web_key) as web:
        root = make_root(tmp_path, {"web1": web.port}, ssh=(
            f"{{user: root, key: ../id_test, connect_timeout: 2, "
            f"jump: {{address: 127.0.0.1, port: {jump.port}, user: jump}}}}"))
        write_private_key(client_key, root / "id_test")
        r = cli(root, "hosts.trust", "--env", "test", "--yes")
        assert jump.forwarded == [("127.0.0.1", web.port)]
    assert r.returncode == 0, r.stderr
    recorded = (root / "inventories" / "known_hosts" / "test").read_text()
    assert recorded == (known_line(f"[127.0.0.1]:{jump.port}", jump_key) +
                        known_line(f"[127.0.0.1]:{web.port}", web_key))
    assert cli(root, "check", "--env", "test").returncode == 0


# --- vars -----------------------------------------------------------------------------------

def test_vars_shows_each_value_where_it_was_set_and_what_it_overrode(tmp_path):
    root = make_root(tmp_path, {"web1": 2201, "web2": 2202},
                     extra="vars: {base_timezone: Etc/UTC}\n",
                     group="roles: [base, redis], vars: {base_timezone: Europe/Berlin}")
    path = root / "inventories" / "test.yml"
    path.write_text(path.read_text().replace("port: 2202}", "port: 2202, vars: {base_packages: [htop]}}"))
    r = cli(root, "vars", "--env", "test", "web2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = lines.index('base_timezone = "Europe/Berlin"')
    assert lines[at + 1:at + 4] == [
        "    from inventories/test.yml:9 (group app vars)",
        '    overrides inventories/test.yml:4 (env vars): "Etc/UTC"',
        '    overrides roles/base/defaults.yml:4 (role base defaults): "UTC"',
    ]
    assert "redis_password = *** (!vault redis_password)" in lines      # a secret stays ***
    r = cli(root, "vars", "--env", "test", "web2", "--var", "base_packages")
    assert r.stdout.splitlines() == [
        'base_packages = ["htop"]',
        "    from inventories/test.yml:7 (host web2 vars)",
        "    overrides roles/base/defaults.yml:3 (role base defaults): []",
    ]


def test_vars_of_an_unknown_host_or_var_is_exit_2_with_a_suggestion(two_hosts):
    r = cli(two_hosts, "vars", "--env", "test", "web11")
    assert r.returncode == 2 and "did you mean 'web1'?" in r.stderr
    r = cli(two_hosts, "vars", "--env", "test", "web1", "--var", "base_timezon")
    assert r.returncode == 2 and "did you mean 'base_timezone'?" in r.stderr


# --- first steps ----------------------------------------------------------------------------

@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_check_on_a_fresh_clone_lists_what_to_create_first(tmp_path, env):
    """The README's first steps: check names each command to run before it passes."""
    root = tmp_path / "clone"
    (root / "inventories" / "known_hosts").mkdir(parents=True)
    (root / "roles").symlink_to(REPO / "roles")
    for rel in (f"inventories/{env}.yml", f"inventories/known_hosts/{env}"):
        (root / rel).write_text((REPO / rel).read_text())
    r = cli(root, "check", "--env", env)
    assert r.returncode == 2
    assert f"`invoke hosts.trust --env {env}`" in r.stderr
    if "!vault sudo_password" in (root / "inventories" / f"{env}.yml").read_text():
        assert f"`invoke vault.set --env {env} sudo_password`" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("error, says", [
    (paramiko.ssh_exception.NoValidConnectionsError(
        {("192.0.2.77", 22): OSError(113, "No route to host")}),
     "192.0.2.77 port 22: No route to host: the address is wrong, the server is down"),
    (TimeoutError("timed out"), "no answer from 192.0.2.77 port 22 within 10 s"),
    (__import__("socket").gaierror(-2, "Name or service not known"),
     "cannot resolve '192.0.2.77' (Name or service not known)"),
    (EOFError(), "closed the connection during the SSH handshake"),
])
def test_connection_errors_keep_their_cause_and_say_what_to_check(error, says):
    """paramiko's wrapper said `[Errno None] Unable to connect to port 22 on 192.0.2.77`."""
    from provisioner.connection import connect_error
    text = connect_error(error, "192.0.2.77", 22, 10)
    assert says in text and "Errno" not in text


# --- start-up -------------------------------------------------------------------------------

def test_the_command_line_loads_no_engine_before_a_task_runs():
    """`invoke --list`, `--help` and every task's flag parsing import tasks.py and no more:
    validation, templates, SSH and the vault's crypto are imported by the task that runs (the
    start-up bench/startup.py measures)."""
    heavy = ["pydantic", "jinja2", "paramiko", "fabric", "cryptography", "rich", "runpy",
             "provisioner.inventory", "provisioner.runner", "provisioner.status"]
    code = f"import sys, tasks; print([m for m in {heavy!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_engine_imports_the_template_engine_only_when_a_template_is_rendered():
    """A run whose roles render no template (the small workload) never pays for jinja2; one
    that renders gets it, and a template's errors are still bad input (varchecks)."""
    code = ("import sys; from provisioner import api, runner, varchecks; from provisioner.cli import common; "
            "before = 'jinja2' in sys.modules; "
            "from provisioner.templating import render; import jinja2; "
            "print(before, jinja2.TemplateError in varchecks._build_errors())")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("up", [True, False], ids=["testbed up", "never brought up"])
def test_the_testbed_hint_comes_only_when_the_testbed_wrote_nothing(tmp_path, monkeypatch, up):
    """`invoke testbed.up` as the fix of a wrong vault password would send a user to rebuild
    servers that are up: the hint is for an env whose known_hosts or vault was never written."""
    from provisioner import vault
    from provisioner.cli import common
    from provisioner.errors import InputError
    from provisioner.testbed import config
    root = make_root(tmp_path, {"web1": closed_port()}, known="" if up else None,
                     ssh="{user: root, sudo_password: !vault sudo_password}")
    vault.save_vault(root / "inventories" / "test.vault", {"sudo_password": "s3cret-pw"}, "right")
    monkeypatch.setattr(common, "REPO_ROOT", root)
    monkeypatch.setattr(config, "LOCAL_INVENTORY", root / "inventories" / "test.yml")
    monkeypatch.setenv(vault.PASSWORD_ENV, "wrong")
    with pytest.raises(InputError) as e:
        common.load("test", interactive=False)
    said = str(e.value)
    assert "wrong vault password" in said
    assert ("is the testbed's" in said) is not up

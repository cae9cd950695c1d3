"""Role redis: pure checks of its vars and rendering, then live on one test server.

CI uses db1; while developing:
    PROVISIONER_KEEP_TESTBED=1 PROVISIONER_TEST_SERVER=bench06 python3 -m pytest -x -q tests/test_role_redis.py
"""
from __future__ import annotations

import re
import subprocess

import pytest
import testinfra

import roles.redis
from engine_helpers import ADDRESSES, REPO, Run, inventory, provision_twice, sh
from engine_helpers import test_server as server_for
from provisioner import testbed as tb
from provisioner.roles import available_roles, load_role
from provisioner.api import RoleContext
from provisioner.secret import Secret

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

ROLE = load_role(available_roles()["redis"])
SERVER = server_for("db1").split(",")[0]
PASSWORD = "redis-Pw-000000001-correct"
TIMES: dict[str, float] = {}


def redis_inventory(tmp_path, password=PASSWORD, **host_vars):
    inv = inventory(tmp_path, [SERVER], ["redis"], host_vars={SERVER: host_vars}, name="redistest")
    return inv.resolve({"redis_password": Secret(password)})      # the role's !vault default


def cli(*args: str, password: str | None = None, host="127.0.0.1") -> subprocess.CompletedProcess:
    """redis-cli inside the server; the password arrives on stdin and goes to REDISCLI_AUTH."""
    script = ("IFS= read -r REDISCLI_AUTH; [ -n \"$REDISCLI_AUTH\" ] && export REDISCLI_AUTH; "
              f'exec redis-cli --no-auth-warning -h {host} -p 6379 "$@"')
    return subprocess.run(tb.shell_argv(SERVER, ["/bin/sh", "-c", script, "cli", *args]),
                          input=(password or "") + "\n", capture_output=True, text=True, timeout=30)


# --- pure ---------------------------------------------------------------------------------------

def ctx_for(tmp_path, password=PASSWORD, **host_vars):
    inv = redis_inventory(tmp_path, password, **host_vars)
    return inv.hostvars(SERVER), RoleContext(inv.hosts[SERVER], inv, {}, False)


def test_rendered_config_binds_privately_and_hides_the_password(tmp_path):
    v, ctx = ctx_for(tmp_path, redis_settings={"appendonly": True})
    conf = [r for r in ROLE.resources(v, ctx) if r.id == "template /etc/redis/redis.conf"][0]
    assert (conf.mode, conf.owner, conf.group) == ("0640", "redis", "redis")
    lines = conf.content.text.splitlines()
    assert f"bind 127.0.0.1 -::1 {ADDRESSES[SERVER]}" in lines
    assert f'requirepass "{PASSWORD}"' in lines
    assert {"protected-mode yes", "maxmemory 256mb", "maxmemory-policy noeviction",
            "appendonly yes"} <= set(lines)
    assert PASSWORD not in conf.content.display and 'requirepass "***"' in conf.content.display
    assert PASSWORD not in repr(conf)


def test_loopback_bind_address_means_localhost_only(tmp_path):
    v, ctx = ctx_for(tmp_path, redis_bind_address="127.0.0.1")
    assert roles.redis.config(v, ctx)["bind"] == "127.0.0.1 -::1"


def test_a_public_address_is_refused(tmp_path):
    """redis listens on the inventory address by default: a public one must not be it."""
    import dataclasses
    v, ctx = ctx_for(tmp_path, redis_bind_address="1.2.3.4")
    with pytest.raises(ValueError, match="redis_bind_address: '1.2.3.4' is not a private address"):
        list(ROLE.resources(v, ctx))
    v, ctx = ctx_for(tmp_path)
    ctx = dataclasses.replace(ctx, host=dataclasses.replace(ctx.host, address="1.2.3.4"))
    with pytest.raises(ValueError, match="the host's inventory address '1.2.3.4' is not a private address.*private IP"):
        list(ROLE.resources(v, ctx))


@pytest.mark.parametrize("var,value,match", [
    ("redis_port", 0, "redis_port"),
    ("redis_bind_address", "cache.internal", "redis_bind_address"),
    ("redis_maxmemory", "256 MB", "redis_maxmemory"),
    ("redis_maxmemory_policy", "lru", "redis_maxmemory_policy"),
    ("redis_settings", {"requirepass": "x"}, "managed by the role"),
    ("redis_settings", {"Bad Name": 1}, "not a redis.conf directive"),
])
def test_bad_vars_are_refused_with_the_var_name(tmp_path, var, value, match):
    v, ctx = ctx_for(tmp_path, **{var: value})
    with pytest.raises(ValueError, match=match):
        list(ROLE.resources(v, ctx))


@pytest.mark.parametrize("password", ["short-pw", 'has"quote-0123456789', "has space 0123456789"])
def test_unusable_passwords_are_refused_without_showing_them(tmp_path, password):
    v, ctx = ctx_for(tmp_path, password=password)
    with pytest.raises(ValueError, match="redis_password") as info:
        list(ROLE.resources(v, ctx))
    assert password not in str(info.value)


def test_plain_text_password_is_refused(tmp_path):
    v, ctx = ctx_for(tmp_path)
    v["redis_password"] = PASSWORD                  # what a plain inventory value would give
    with pytest.raises(ValueError, match="from the vault"):
        list(ROLE.resources(v, ctx))


# --- live ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def provisioned(testbed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("redis")
    runs = provision_twice(redis_inventory(tmp), reset=[SERVER])
    TIMES["fresh"], TIMES["converged"] = runs.fresh_s, runs.converged_s
    assert runs.first.exit_code == 0, runs.first.err.getvalue()
    return {"inv": runs.inv, "tmp": tmp, "first": runs.first, "second": runs.second}


def test_second_run_changes_nothing(provisioned):
    assert provisioned["first"].host(SERVER)["changed"] >= 3
    second = provisioned["second"]
    assert second.exit_code == 0 and second.host(SERVER)["failed"] == 0
    assert second.host(SERVER)["changed"] == 0, second.steps(status="changed")
    print(f"\nredis on {SERVER}: fresh {TIMES['fresh']:.1f} s, converged {TIMES['converged']:.2f} s")


def test_service_and_config_file(provisioned):
    h = testinfra.get_host(f"ssh://{SERVER}", ssh_config=str(REPO / ".testbed" / "ssh_config"))
    assert h.service("redis-server").is_enabled and h.service("redis-server").is_running
    f = h.file("/etc/redis/redis.conf")
    assert (f.user, f.group, f.mode) == ("redis", "redis", 0o640)


def test_bound_to_localhost_and_the_private_address_only(provisioned):
    out = sh(SERVER, "ss -Hltn 'sport = :6379'").stdout
    addrs = {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()}
    assert {"127.0.0.1", ADDRESSES[SERVER]} <= addrs <= {"127.0.0.1", "::1", ADDRESSES[SERVER]}, addrs


def test_auth_is_required_and_a_wrong_password_refused(provisioned):
    for host in ("127.0.0.1", ADDRESSES[SERVER]):
        r = cli("ping", host=host)
        assert "NOAUTH Authentication required" in r.stdout + r.stderr, (r.stdout, r.stderr)
        r = cli("ping", host=host, password="wrong-password-0000000")
        assert "WRONGPASS" in r.stdout + r.stderr, (r.stdout, r.stderr)
        r = cli("ping", host=host, password=PASSWORD)
        assert r.stdout.strip() == "PONG", (r.stdout, r.stderr)


def test_memory_limit_policy_and_protected_mode_are_live(provisioned):
    r = cli("config", "get", "maxmemory*", password=PASSWORD)
    got = dict(zip(r.stdout.split()[::2], r.stdout.split()[1::2]))
    assert got["maxmemory-policy"] == "noeviction" and got["maxmemory"] == str(256 * 1024 ** 2)
    r = cli("config", "get", "protected-mode", password=PASSWORD)
    assert r.stdout.split() == ["protected-mode", "yes"]


def test_changes_restart_redis_and_the_diff_hides_the_password(provisioned):
    new = "redis-Pw-000000002-rotated"
    inv = redis_inventory(provisioned["tmp"], password=new, redis_maxmemory_policy="allkeys-lru")
    run = Run(inv, diff=True)
    assert run.exit_code == 0, run.err.getvalue()
    changed = {e["resource"]: e for e in run.steps(host=SERVER, status="changed")}
    assert set(changed) == {"template /etc/redis/redis.conf", "handler restart redis"}
    diff = changed["template /etc/redis/redis.conf"]["diff"]
    assert "+maxmemory-policy allkeys-lru" in diff and 'requirepass "***"' in diff
    everything = run.out.getvalue() + run.err.getvalue()
    assert PASSWORD not in everything and new not in everything
    assert cli("ping", password=new).stdout.strip() == "PONG"
    old = cli("ping", password=PASSWORD)
    assert "WRONGPASS" in old.stdout + old.stderr
    assert cli("config", "get", "maxmemory-policy", password=new).stdout.split()[1] == "allkeys-lru"
    assert Run(inv).host(SERVER)["changed"] == 0
    back = Run(provisioned["inv"])
    assert back.exit_code == 0 and cli("ping", password=PASSWORD).stdout.strip() == "PONG"


def test_drift_is_repaired(provisioned):
    sh(SERVER, "sed -i 's/^protected-mode yes/protected-mode no/' /etc/redis/redis.conf && "
               "chmod 0644 /etc/redis/redis.conf")
    run = Run(provisioned["inv"])
    reasons = {e["resource"]: e["reason"] for e in run.steps(host=SERVER, status="changed")}
    assert "content differs" in reasons["template /etc/redis/redis.conf"]
    assert "handler restart redis" in reasons
    assert re.search(r"^protected-mode yes$", sh(SERVER, "cat /etc/redis/redis.conf").stdout, re.M)
    assert sh(SERVER, "stat -c %a /etc/redis/redis.conf").stdout.strip() == "640"

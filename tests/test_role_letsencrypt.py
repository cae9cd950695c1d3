"""Role letsencrypt: pure checks of its vars and plans (the self-signed steps run for real on
this machine); the live issuance against pebble is in tests/test_lb_https.py."""
from __future__ import annotations

import subprocess
import time

import pytest

from engine_helpers import inventory
from provisioner.api import Change, Noop, RoleContext, VarError
from provisioner.facts import Facts
from provisioner.ops import plan_all
from provisioner.roles import available_roles, load_role
from test_agent import facts_of          # the agent run on this machine

ROLE = load_role(available_roles()["letsencrypt"])
SITE = {"name": "app", "server_names": ["app.test", "www.app.test"], "upstream_group": "app",
        "upstream_port": 3000}
URL = "https://10.77.0.1:14000/dir"
PEM = "/etc/letsencrypt/live/app/fullchain.pem"


def ctx_for(tmp_path, **lb_vars):
    groups = {"app": {"hosts": ["web1", "web2"], "roles": []},
              "lb": {"hosts": ["lb1"], "roles": ["nginx", "letsencrypt"],
                     "vars": {"nginx_sites": [SITE], "letsencrypt_directory_url": URL,
                              "letsencrypt_email": "ops@app.test", **lb_vars}}}
    inv = inventory(tmp_path, ["web1", "web2", "lb1"], [], groups=groups, name="letest")
    return inv.hostvars("lb1"), RoleContext(inv.hosts["lb1"], inv, {"version_id": "13"}, False)


def planned(tmp_path, cert, **lb_vars):
    """{resource id: [Change|Noop]} against a server whose certificate fact is `cert`."""
    v, ctx = ctx_for(tmp_path, **lb_vars)
    rs = list(ROLE.resources(v, ctx))
    path = [r for r in rs if r.id == "certificate app"][0].path
    rs = [r for r in rs if r.id.startswith(("certificate", "file group"))]
    absent = {p: {"exists": False} for r in rs for p in r.facts().get("files", [])}
    facts = Facts({"certs": {path: cert}, "files": absent})
    return {r.id: out for r, out in plan_all(rs, facts)}


def expiring_in(days: float) -> str:
    return time.strftime("%b %d %H:%M:%S %Y GMT", time.gmtime(time.time() + days * 86400))


def argv(change: Change) -> list[str]:
    [step] = change.steps
    return step["run"]


def test_first_run_issues_with_certbot_webroot_then_enables_tls(tmp_path):
    out = planned(tmp_path, None)
    [issue] = out["certificate app"]
    assert issue.action == "issue" and "no certificate" in issue.why
    a = argv(issue)
    assert a[:2] == ["certbot", "certonly"]
    for flag, value in (("--webroot-path", "/var/www/acme"), ("--cert-name", "app"),
                        ("--server", URL), ("--email", "ops@app.test")):
        assert a[a.index(flag) + 1] == value
    assert [a[i + 1] for i, x in enumerate(a) if x == "--domain"] == ["app.test", "www.app.test"]
    assert {"--webroot", "--non-interactive", "--agree-tos", "--no-random-sleep-on-renew"} <= set(a)
    assert "--force-renewal" not in a
    assert "reload nginx" in issue.notify
    [tls] = out["file group tls app"]
    assert tls.steps[0]["file_group"] == ["/etc/nginx/tls/app/fullchain.pem",
                                         "/etc/nginx/tls/app/privkey.pem",
                                         "/etc/nginx/sites-enabled/app-tls.conf"]
    assert tls.steps[0]["check"] == ["nginx", "-t", "-q"]


def test_a_valid_certificate_with_the_site_s_names_is_left_alone(tmp_path):
    cert = {"sans": ["www.app.test", "app.test"], "not_after": expiring_in(60), "serial": "01"}
    [noop] = planned(tmp_path, cert)["certificate app"]
    assert isinstance(noop, Noop) and "valid until" in noop.why


@pytest.mark.parametrize("cert, why", [
    ({"sans": ["app.test"], "not_after": expiring_in(60)}, "names app.test != app.test, www.app.test"),
    ({"sans": ["app.test", "www.app.test"], "not_after": expiring_in(5)}, "in 5 days"),
])
def test_other_names_or_near_expiry_force_a_new_certificate(tmp_path, cert, why):
    [renew] = planned(tmp_path, cert)["certificate app"]
    assert renew.action == "renew" and why in renew.why
    assert {"--force-renewal", "--expand"} <= set(argv(renew))


def test_selfsigned_mode_makes_a_certificate_with_the_site_s_names(tmp_path):
    [issue] = planned(tmp_path, None, letsencrypt_mode="selfsigned")["certificate app"]
    directory, openssl = issue.steps
    assert directory["dir"] == "/etc/nginx/tls/app/selfsigned" and directory["mode"] == "0700"
    a = [x.replace("/etc/nginx/tls/app/selfsigned", str(tmp_path)) for x in openssl["run"]]
    subprocess.run(a, check=True, capture_output=True)           # this machine's openssl
    pem = str(tmp_path / "fullchain.pem")
    fact = Facts(facts_of({"certs": [pem]})).cert(pem)
    assert sorted(fact["sans"]) == ["app.test", "www.app.test"]
    [noop] = planned(tmp_path, fact, letsencrypt_mode="selfsigned")["certificate app"]
    assert isinstance(noop, Noop)


@pytest.mark.parametrize("lb_vars, var, fix", [
    ({"letsencrypt_mode": "manual"}, "letsencrypt_mode", "acme or selfsigned"),
    ({"letsencrypt_directory_url": "http://acme.test/dir"}, "letsencrypt_directory_url", "https://"),
    ({"letsencrypt_email": "ops at app"}, "letsencrypt_email", "ops@example.com"),
    ({"letsencrypt_renew_days": 0}, "letsencrypt_renew_days", "30"),
    ({"nginx_sites": []}, "nginx_sites", "role nginx"),
])
def test_bad_vars_are_refused_naming_the_var_and_the_fix(tmp_path, lb_vars, var, fix):
    v, ctx = ctx_for(tmp_path, **lb_vars)
    with pytest.raises(VarError) as e:
        ROLE.check(v, ctx)
    assert e.value.var == var and fix in e.value.fix

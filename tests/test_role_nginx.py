"""Role nginx: pure checks of its vars and rendering (the real `nginx -t` on this machine when
it has nginx); the live tests through lb1 are in tests/test_lb_https.py."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import pytest

from engine_helpers import ADDRESSES, inventory
from provisioner import colours
from provisioner.api import RoleContext, VarError
from provisioner.facts import Facts
from provisioner.ops import plan_all
from provisioner.roles import available_roles, load_role

ROLE = load_role(available_roles()["nginx"])
SITE = {"name": "app", "server_names": ["app.test", "www.app.test"], "upstream_group": "app",
        "upstream_port": 3000, "static": [{"location": "/assets/", "root": "/srv/app/public"}],
        "rate_limits": [{"location": "/login", "rate": "5r/s", "burst": 10}],
        "cache": [{"location": "/api/catalog/", "minutes": 5}]}
TRIXIE = {"id": "debian", "version_id": "13", "codename": "trixie", "virt": "none"}
BOOKWORM = {"id": "debian", "version_id": "12", "codename": "bookworm", "virt": "none"}


# the app behind SITE deployed blue-green: blue on 3000, green on 3001
BLUE_GREEN = {"app": {"source": "../app", "group": "app", "strategy": "blue-green"}}


def ctx_for(tmp_path, os=TRIXIE, apps=None, **lb_vars):
    groups = {"app": {"hosts": ["web1", "web2"], "roles": []},
              "lb": {"hosts": ["lb1"], "roles": ["nginx"], "vars": {"nginx_sites": [SITE], **lb_vars}}}
    inv = inventory(tmp_path, ["web1", "web2", "lb1"], [], groups=groups, name="nginxtest",
                    apps=apps)
    return inv.hostvars("lb1"), RoleContext(inv.hosts["lb1"], inv, os, False)


def rendered(tmp_path, os=TRIXIE, apps=None, **lb_vars) -> dict[str, str]:
    v, ctx = ctx_for(tmp_path, os, apps, **lb_vars)
    group = [r for r in ROLE.resources(v, ctx) if r.id == "file group nginx"][0]
    return {m.path: getattr(m, "content", None) and m.content.text for m in group.members}


def test_a_typical_site_balances_the_app_group_over_tls_and_redirects_http(tmp_path):
    files = rendered(tmp_path)
    tls = files["/etc/nginx/sites-available/app-tls.conf"]
    for host in ("web1", "web2"):
        assert f"server {ADDRESSES[host]}:3000 max_fails=2 fail_timeout=10s;" in tls
    assert "keepalive 16;" in tls and "zone app_app 64k;" in tls
    assert "proxy_next_upstream error timeout http_502 http_503 http_504;" in tls
    assert "server_name app.test www.app.test;" in tls
    assert "ssl_certificate /etc/nginx/tls/app/fullchain.pem;" in tls
    assert "proxy_set_header Upgrade $http_upgrade;" in tls
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in tls
    assert "add_header X-Content-Type-Options nosniff always;" in tls
    assert "frame-ancestors 'none'" in tls and "Referrer-Policy" in tls and "Permissions-Policy" in tls
    assert "limit_req_zone $binary_remote_addr zone=app_0:10m rate=5r/s;" in tls
    assert "limit_req zone=app_0 burst=10 nodelay;" in tls
    assert 'Cache-Control "public, max-age=31536000, immutable"' in tls
    assert "proxy_cache_path /var/cache/nginx/app levels=1:2 keys_zone=app_cache:10m" in tls
    assert "location ^~ /api/catalog/ {" in tls and "proxy_cache_valid 200 5m;" in tls
    http = files["/etc/nginx/sites-available/app.conf"]
    assert "location ^~ /.well-known/acme-challenge/ {\n        root /var/www/acme;" in http
    assert "return 301 https://$host$request_uri;" in http
    main = files["/etc/nginx/nginx.conf"]
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in main and "ssl_session_tickets off;" in main
    assert "ssl_stapling" not in main + tls
    assert "return 444;" in main and "ssl_reject_handshake on;" in main
    assert "request_time=$request_time" in main and "upstream_time=$upstream_response_time" in main
    assert "include /etc/nginx/sites-enabled/*.conf;" in main    # Debian's `default` left out
    assert "/etc/nginx/sites-enabled/app.conf" in files          # the TLS file: letsencrypt's
    assert "/etc/nginx/sites-enabled/app-tls.conf" not in files


@pytest.mark.parametrize("os, on, listen", [
    (TRIXIE, True, "listen 443 ssl;"), (BOOKWORM, False, "listen 443 ssl http2;")])
def test_http2_is_written_the_way_each_release_s_nginx_reads_it(tmp_path, os, on, listen):
    tls = rendered(tmp_path, os)["/etc/nginx/sites-available/app-tls.conf"]
    assert ("http2 on;" in tls) is on
    assert listen in tls


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed on this machine")
@pytest.mark.parametrize("enabled, apps", [
    (("app.conf",), None), (("app.conf", "app-tls.conf"), None),
    (("app.conf", "app-tls.conf"), BLUE_GREEN)],
    ids=["before the certificate", "with TLS", "blue-green, green live"])
def test_the_rendered_configuration_passes_this_machine_s_nginx_t(tmp_path, enabled, apps):
    """Whole config as the server gets it, before role letsencrypt enabled the TLS server and
    after (a throwaway certificate), checked by the real nginx of this machine's release
    (http2 spelled the way it reads it); for a blue-green app with deploy's live file."""
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    major, minor = map(int, re.search(r"nginx/(\d+)\.(\d+)", version).groups())
    os = TRIXIE if (major, minor) >= (1, 25) else BOOKWORM
    files = rendered(tmp_path, os, apps)
    if apps:
        files[colours.live_path("app")] = colours.live_conf("app", "green")
        (tmp_path / "etc" / "live").mkdir(parents=True)
    root = tmp_path / "etc"
    shutil.copytree("/etc/nginx", root, symlinks=True, dirs_exist_ok=True)
    tls = root / "tls"
    tls.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=app.test", "-keyout", str(tls / "k.pem"),
                    "-out", str(tls / "c.pem")], check=True, capture_output=True)
    for path, text in files.items():
        if text is None:
            continue
        text = text.replace("/etc/nginx/tls/app/fullchain.pem", str(tls / "c.pem")) \
                   .replace("/etc/nginx/tls/app/privkey.pem", str(tls / "k.pem")) \
                   .replace("/etc/nginx/", f"{root}/").replace("pid /run/nginx.pid", f"pid {tmp_path}/pid") \
                   .replace("/var/cache/nginx/app", str(tmp_path / "cache"))
        target = root / path.removeprefix("/etc/nginx/")
        target.write_text(text)
    for name in enabled:
        (root / "sites-enabled" / name).symlink_to(root / "sites-available" / name)
    out = subprocess.run(["nginx", "-t", "-c", str(root / "nginx.conf"), "-e", "stderr"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("site, var, fix", [
    ({"upstream_group": "nope"}, r"nginx_sites\[0\].upstream_group", "name the group"),
    ({"server_names": ["app.test; evil"]}, r"nginx_sites\[0\].server_names\[0\]", "DNS name"),
    ({"upstream_port": 70000}, r"nginx_sites\[0\].upstream_port", "3000"),
    ({"name": "App Site"}, r"nginx_sites\[0\].name", "lowercase"),
    ({"static": [{"location": "/a/ {", "root": "/srv"}]}, r"nginx_sites\[0\].static\[0\].location", "URL path|path like"),
    ({"rate_limits": [{"location": "/login", "rate": "fast"}]}, r"nginx_sites\[0\].rate_limits\[0\].rate", "5r/s"),
    ({"proxy": "x"}, r"nginx_sites\[0\]", "keys:"),
    ({"cache": [{"location": "/login", "minutes": 5}]}, r"nginx_sites\[0\]", "its own location"),
    ({"cache": [{"location": "/api/", "minutes": 0}]}, r"nginx_sites\[0\].cache\[0\].minutes", "5"),
])
def test_a_bad_site_is_refused_naming_the_var_and_the_fix(tmp_path, site, var, fix):
    v, ctx = ctx_for(tmp_path)
    v["nginx_sites"] = [{**SITE, **site}]
    with pytest.raises(VarError) as e:
        ROLE.check(v, ctx)
    assert re.fullmatch(var, e.value.var), e.value.var
    assert re.search(fix, e.value.fix), e.value.fix


def test_a_bad_body_size_is_refused(tmp_path):
    v, ctx = ctx_for(tmp_path, nginx_client_max_body_size="ten megs")
    with pytest.raises(VarError, match="nginx_client_max_body_size.*10m"):
        ROLE.check(v, ctx)


def test_check_diff_shows_the_vhost_change(tmp_path):
    v, ctx = ctx_for(tmp_path)
    group = [r for r in ROLE.resources(v, ctx) if r.id == "file group nginx"][0]
    facts = {}
    for m in group.members:
        text = getattr(m, "content", None) and m.content.text
        if text is None:
            facts[m.path] = {"exists": True, "type": "link", "target": m.to}
        else:
            facts[m.path] = {"exists": True, "type": "file", "mode": "0644", "owner": "root",
                             "group": "root", "content": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert [type(c).__name__ for _, cs in plan_all([group], Facts({"files": facts})) for c in cs] == ["Noop"]
    old = facts["/etc/nginx/sites-available/app-tls.conf"]
    old["content"] = old["content"].replace("keepalive 16;", "keepalive 8;")
    old["sha256"] = "0" * 64
    (_, [change]), = plan_all([group], Facts({"files": facts}))
    assert "app-tls.conf" in change.why
    assert "-    keepalive 8;\n+    keepalive 16;" in change.diff


def test_invoke_check_refuses_a_bad_site_with_its_line_before_any_server(tmp_path):
    """The user's view: exit 2, the inventory line of the var, the problem and the fix; the
    host's port is closed, so nothing could have been touched."""
    from test_cli import all_known, cli, closed_port, make_root
    hosts = {"lb1": closed_port()}
    root = make_root(tmp_path, hosts, known=all_known(hosts), group=(
        "roles: [nginx],\n        vars: {nginx_sites: [{name: app, server_names: [app.test], "
        "upstream_group: app,\n          upstream_port: 99999}]}"))
    r = cli(root, "check", "--env", "test")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "inventories/test.yml:8: groups.app.vars.nginx_sites[0].upstream_port: 99999 is not " \
           "a whole number from 1 to 65535 (for lb1)" in r.stderr, r.stderr
    assert "write e.g. 3000" in r.stderr


@pytest.mark.parametrize("gzip", [True, False])
def test_only_static_files_are_compressed_over_tls(tmp_path, gzip):
    """The app's answers may carry secrets beside what a request reflects: compressed over TLS
    that is BREACH (testssl flags it). Static files carry none."""
    tls = rendered(tmp_path, nginx_gzip=gzip)["/etc/nginx/sites-available/app-tls.conf"]
    server, static = tls.split("location ^~ /assets/ {", 1)
    assert "\n    gzip off;\n" in server
    assert ("gzip on;" in static.split("}", 1)[0]) is gzip


def test_a_site_taken_out_of_nginx_sites_is_disabled_and_hand_made_links_stay(tmp_path):
    v, ctx = ctx_for(tmp_path)
    stale = [r for r in ROLE.resources(v, ctx) if r.id == "sites enabled in /etc/nginx/sites-enabled"][0]
    avail = "/etc/nginx/sites-available"
    entries = {"app.conf": f"{avail}/app.conf", "app-tls.conf": f"{avail}/app-tls.conf",
               "old.conf": f"{avail}/old.conf", "old-tls.conf": f"{avail}/old-tls.conf",
               "mine.conf": "/srv/mine/nginx.conf"}          # made by hand, pointing elsewhere
    facts = Facts({"dirs": {"/etc/nginx/sites-enabled": {"entries": {
        n: {"type": "link", "target": t} for n, t in entries.items()}}}})
    change, = stale.plan(facts)
    assert change.action == "disable" and change.notify == ("reload nginx",)
    assert [s["run"] for s in change.steps] == [
        ["rm", "-f", "--", "/etc/nginx/sites-enabled/old-tls.conf", "/etc/nginx/sites-enabled/old.conf"]]
    del entries["old.conf"], entries["old-tls.conf"]
    facts = Facts({"dirs": {"/etc/nginx/sites-enabled": {"entries": {
        n: {"type": "link", "target": t} for n, t in entries.items()}}}})
    assert [type(x).__name__ for x in stale.plan(facts)] == ["Noop"]


def test_a_blue_green_site_has_both_colours_and_proxies_to_the_live_one(tmp_path):
    tls = rendered(tmp_path, apps=BLUE_GREEN)["/etc/nginx/sites-available/app-tls.conf"]
    assert "upstream app_blue {" in tls and "upstream app_green {" in tls
    assert f"server {ADDRESSES['web1']}:3000 " in tls and f"server {ADDRESSES['web2']}:3001 " in tls
    assert "include /etc/nginx/live/app.conf;" in tls and "app_app" not in tls
    assert tls.count("proxy_pass http://$app_live;") == 3          # /, the rate limit, the cache
    (tmp_path / "plain").mkdir()
    plain = rendered(tmp_path / "plain")["/etc/nginx/sites-available/app-tls.conf"]
    assert "upstream app_app {" in plain and "/etc/nginx/live" not in plain


def test_the_live_colour_is_written_once_and_then_left_to_deploy(tmp_path):
    """Provision never flips a site back nor calls deploy's flip drift: the live file is
    written (blue) only when it is missing."""
    v, ctx = ctx_for(tmp_path, apps=BLUE_GREEN)
    live, = [r for r in ROLE.resources(v, ctx) if r.id == "live colour of site app"]
    change, = live.plan(Facts({"files": {"/etc/nginx/live/app.conf": {"exists": False}}}))
    assert change.notify == ("reload nginx",)
    assert colours.live_colour("app", __import__("base64").b64decode(
        change.steps[0]["b64"]).decode()) == "blue"
    flipped = {"exists": True, "type": "file", "content": colours.live_conf("app", "green")}
    noop, = live.plan(Facts({"files": {"/etc/nginx/live/app.conf": flipped}}))
    assert type(noop).__name__ == "Noop" and "deploy's: green" in noop.why
    (tmp_path / "plain").mkdir()
    assert not [r for r in ROLE.resources(*ctx_for(tmp_path / "plain")) if "live" in r.id]

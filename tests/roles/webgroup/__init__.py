"""nginx with one site: the vhost and its sites-enabled link are a file group checked by
`nginx -t` in place, so a bad vhost is put back and nginx keeps serving the old one."""
from provisioner.api import apt, file_group, files, handler, links, systemd

SITE = "/etc/nginx/sites-available/webgroup"


def resources(v, ctx):
    yield apt.packages(["nginx"])
    yield files.directory("/srv/webgroup")
    yield files.file("/srv/webgroup/index.html", v["webgroup_body"] + "\n")
    yield file_group("nginx site", [
        files.file(SITE, "server {\n    listen 127.0.0.1:%s;\n    root /srv/webgroup;\n}\n"
                   % v["webgroup_listen"]),
        links.link("/etc/nginx/sites-enabled/webgroup", SITE),
    ], check=["nginx", "-t", "-q"], notify="reload nginx")
    yield systemd.service("nginx", enabled=True, running=True)


def handlers(v, ctx):
    return {"reload nginx": handler("reload", "nginx")}

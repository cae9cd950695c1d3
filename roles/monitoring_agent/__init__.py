"""Role `monitoring_agent`: what the monitoring server scrapes on a host, from Debian's packages.

- `prometheus-node-exporter` on every host: CPU, memory, disk, network; the systemd collector
  (failed units); the textfile collector in /var/lib/prometheus/node-exporter, where backup
  jobs, restore drills and provisioner's own jobs write `*.prom` files.
- The exporter of each role the host has (provisioner/monitoring.py says which):
  `prometheus-postgres-exporter` (a `prometheus` database role in pg_monitor, reached by peer
  authentication over the socket: no password), `prometheus-redis-exporter` (the redis
  password in its environment file, mode 0600), `prometheus-nginx-exporter` (nginx's
  stub_status on a loopback-only server).
- The host metrics job (host_metrics.py, a systemd timer): pm2 apps (online, restarts, memory),
  fail2ban (bans, failed logins) and nginx's access log (5xx, request-time histogram).

Every exporter listens on the private address only (`/etc/default/<package>`, the packages
listen on all interfaces as installed); role harden lets only the monitoring servers in.
A changed environment file restarts its exporter.
"""
from __future__ import annotations

import json
from pathlib import Path

from provisioner.api import (EXPORTERS, TEXTFILE_DIR, apt, commands, exporters_of, file_group,
                             files, handler, is_secret, pm2_app_procs, pm2_jlist, pm2_processes,
                             pm2_unit, private_address, reject, systemd, templates, with_helpers)

HERE = Path(__file__).resolve().parent
METRICS_SOURCE = with_helpers((HERE / "host_metrics.py").read_text(encoding="utf-8"),
                              pm2_processes, pm2_jlist, pm2_app_procs)
TOOL_DIR = "/usr/local/lib/provisioner"
METRICS_TOOL = f"{TOOL_DIR}/host_metrics.py"
METRICS_CONFIG = "/etc/provisioner/host-metrics.json"
METRICS_UNIT = "provisioner-host-metrics"
STUB_STATUS = "127.0.0.1:8079"             # nginx's stub_status: loopback only, for the exporter
STUB_STATUS_CONF = "/etc/nginx/conf.d/provisioner-stub-status.conf"
PACKAGES = {"node": "prometheus-node-exporter", "postgres": "prometheus-postgres-exporter",
            "redis": "prometheus-redis-exporter", "nginx": "prometheus-nginx-exporter"}
# the pg_monitor grant, once: `unless` reads whether the role already has it
PG_ROLE_SQL = ("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'prometheus') "
               "THEN CREATE ROLE prometheus LOGIN; END IF; END $$; GRANT pg_monitor TO prometheus;")
PG_ROLE_CHECK = ("test \"$(runuser -u postgres -- psql -XtAc \"SELECT pg_has_role('prometheus', "
                 "'pg_monitor', 'MEMBER') FROM pg_roles WHERE rolname = 'prometheus'\")\" = t")


def restart(exporter: str) -> str:
    return f"restart {PACKAGES[exporter]}"


def check(v: dict, ctx) -> dict:
    # a public address is refused (ValueError naming the var: reported as bad input)
    ip = private_address("monitoring_agent_listen_address", v["monitoring_agent_listen_address"],
                         ctx.host, "an exporter")
    interval = v["monitoring_agent_metrics_interval"]
    if not isinstance(interval, int) or isinstance(interval, bool) or not 5 <= interval <= 3600:
        reject("monitoring_agent_metrics_interval", f"{interval!r} is not 5 to 3600 seconds",
               "write e.g. 30")
    exporters = exporters_of(ctx.inventory, ctx.host.name)
    roles = ctx.inventory.roles_for(ctx.host.name)
    if "redis" in exporters and not is_secret(v.get("redis_password")):
        reject("redis_password", "the redis exporter needs redis' password from the vault",
               "keep `redis_password: !vault NAME`")
    pm2 = None
    if "pm2" in roles:
        user = v.get("node_app_user")
        pm2 = {"user": user, "home": v.get("node_app_home"), "unit": pm2_unit(user),
               "apps": [a["name"] for a in v.get("pm2_apps") or [] if isinstance(a, dict)]}
    return {"address": str(ip), "exporters": exporters, "interval": interval, "pm2": pm2,
            "fail2ban": "harden" in roles, "nginx": "nginx" in exporters}


# Debian's node exporter also leaves out /mnt and /media, where block volumes are often mounted
# (a full volume there raised no alert: found live); only the kernel's and runtime mounts stay
# out. No backslash and no `$NAME` in it: it passes through systemd's EnvironmentFile and $ARGS.
MOUNT_POINTS_EXCLUDE = "^/(dev|proc|run|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"


def _env_file(exporter: str, body: str, **attrs) -> files.File:
    return files.file(f"/etc/default/{PACKAGES[exporter]}",
                      "# Managed by provisioner (role monitoring_agent)\n" + body,
                      notify=restart(exporter), **attrs)


def resources(v, ctx):
    c = check(v, ctx)
    addr, ex = c["address"], c["exporters"]
    # the exporters' settings first: on a fresh host the package batch writes them before it
    # installs the exporters, which then start on them (no restart, no stay-up wait)
    yield _env_file("node", f'ARGS="--web.listen-address={addr}:{EXPORTERS["node"][1]} '
                            f'--collector.textfile.directory={TEXTFILE_DIR} --collector.systemd '
                            f'--collector.filesystem.mount-points-exclude={MOUNT_POINTS_EXCLUDE}"\n')
    if "postgres" in ex:
        # the package's configure makes it prometheus:prometheus 0640 at each install and
        # upgrade (it may hold a password): that owner is left as it sets it
        yield _env_file("postgres", "DATA_SOURCE_NAME='user=prometheus host=/run/postgresql "
                                    "dbname=postgres sslmode=disable'\n"
                                    f'ARGS="--web.listen-address={addr}:{EXPORTERS["postgres"][1]}"\n',
                        mode="0640", owner=None, group=None)
    if "redis" in ex:
        # holds the password: root-only (systemd reads it before dropping to user prometheus)
        yield templates.template(f"/etc/default/{PACKAGES['redis']}",
                                 "monitoring_agent/redis-exporter.j2",
                                 {"password": v["redis_password"], "address": addr,
                                  "port": EXPORTERS["redis"][1],
                                  "redis_port": v.get("redis_port", 6379)},
                                 mode="0600", notify=restart("redis"))
    if "nginx" in ex:
        yield _env_file("nginx", f'ARGS="--web.listen-address={addr}:{EXPORTERS["nginx"][1]} '
                                 f'--nginx.scrape-uri=http://{STUB_STATUS}/stub_status"\n')
    yield apt.packages([PACKAGES[e] for e in ex])
    if "postgres" in ex:
        yield commands.command(["runuser", "-u", "postgres", "--", "psql", "-X", "-v",
                                "ON_ERROR_STOP=1", "-c", PG_ROLE_SQL],
                               unless=["sh", "-c", PG_ROLE_CHECK],
                               name="PostgreSQL role prometheus in pg_monitor")
    if "nginx" in ex:
        yield file_group("nginx stub_status", [files.file(STUB_STATUS_CONF, (
            "# Managed by provisioner (role monitoring_agent): for prometheus-nginx-exporter\n"
            f"server {{\n    listen {STUB_STATUS};\n    server_name localhost;\n"
            "    access_log off;\n    location = /stub_status {\n        stub_status;\n"
            "        allow 127.0.0.1;\n        deny all;\n    }\n"
            "    location / {\n        return 404;\n    }\n}\n"))],
            check=["nginx", "-t", "-q"], notify="reload nginx")
    for e in ex:
        yield systemd.service(PACKAGES[e], enabled=True, running=True)

    # the host metrics job
    yield files.directory(TOOL_DIR, mode="0755")
    yield files.file(METRICS_TOOL, METRICS_SOURCE, mode="0644")
    yield files.directory("/etc/provisioner", mode="0755")
    yield files.file(METRICS_CONFIG, json.dumps({
        "out": f"{TEXTFILE_DIR}/provisioner_host.prom", "state": "/var/lib/provisioner-metrics",
        "pm2": c["pm2"], "fail2ban": c["fail2ban"],
        "nginx_log": "/var/log/nginx/access.log" if c["nginx"] else None}, indent=1) + "\n")
    yield systemd.unit_file(f"{METRICS_UNIT}.service", (
        "# Managed by provisioner (role monitoring_agent)\n[Unit]\n"
        "Description=provisioner: host figures for the node exporter's textfile collector\n\n"
        # -I -S: no site-packages scan at each start; the lowest CPU and I/O priority (it must
        # never compete with the app it reports on)
        f"[Service]\nType=oneshot\nExecStart=/usr/bin/python3 -I -S {METRICS_TOOL} {METRICS_CONFIG}\n"
        "Nice=19\nCPUSchedulingPolicy=batch\nIOSchedulingClass=idle\n"))
    yield systemd.unit_file(f"{METRICS_UNIT}.timer", (
        "# Managed by provisioner (role monitoring_agent)\n[Unit]\n"
        "Description=provisioner: host figures every few seconds\n\n"
        f"[Timer]\nOnActiveSec=5s\nOnUnitActiveSec={c['interval']}s\nAccuracySec=2s\n\n"
        "[Install]\nWantedBy=timers.target\n"))
    yield systemd.service(f"{METRICS_UNIT}.timer", enabled=True, running=True)


def handlers(v, ctx):
    # a restarted exporter must stay up (systemd.stays_up): one that dies fails the run
    out = {restart(e): handler("restart", p, stay_up=3) for e, p in PACKAGES.items()}
    out["reload nginx"] = handler("reload", "nginx")
    return out

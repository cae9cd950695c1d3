"""The two workloads every tool runs, as plain data: each tool's own code (our role
peerspec_role.py, pyinfra's deploy pyinfra_deploy.py, the playbook ansible_play.py writes, the
plain Fabric script) reads the same spec, so they all converge the same state.

A spec is {"steps": [step, ..], "handlers": {name: shell command}}; a step is a dict with
"kind" and its fields:
    packages   names                                     Debian packages, installed
    group      name
    user       name, shell, home, system, groups
    touch      path                                      exists (created empty; never rewritten)
    copy       src (a local file), path, mode            the local file's content
    owner      path, owner                               the path's owner
    file       path, content, mode, owner, group, notify?, after?
               notify: a handler run once at the end when it changed;
               after: a shell command run right after it changed (systemctl daemon-reload)
    dir        path, mode, owner, group
    line       path, line, regexp                        one line of a file another package owns
    command    name, run, unless                         `run` when the shell check `unless` fails
    service    name                                      enabled and running

What none of them has: a firewall (ansible-core ships no ufw module: it is in a collection)
and SSH keys (ansible-core's authorized_key is in ansible.posix), so neither is in here.
"""
from __future__ import annotations

import json
from pathlib import Path

PM2_VERSION = "6.0.14"              # as roles/pm2's default
PM2_MANIFEST = "/usr/local/lib/node_modules/pm2/package.json"
COPY_TEXT = "copied by the peers benchmark\n"

# create a user, touch a file, copy a file, set its owner (the four steps)
SMALL_USER = "peers"


def small(copy_src: Path) -> dict:
    return {"steps": [
        {"kind": "user", "name": SMALL_USER, "shell": "/bin/bash", "home": f"/home/{SMALL_USER}",
         "system": False, "groups": []},
        {"kind": "touch", "path": "/srv/peers-touched"},
        {"kind": "copy", "src": str(copy_src), "path": "/srv/peers-copied.txt", "mode": "0644"},
        {"kind": "owner", "path": "/srv/peers-copied.txt", "owner": SMALL_USER},
    ], "handlers": {}}


SSHD = "# peers benchmark\nClientAliveInterval 300\nMaxAuthTries 4\n"
JAIL = "[sshd]\nenabled = true\nbackend = systemd\n"
SYSCTL = "net.ipv4.conf.all.log_martians = 1\nnet.ipv4.tcp_syncookies = 1\n"
APP = ("require('http').createServer((q, s) => s.end('ok\\n'))"
       ".listen(3100, '127.0.0.1');\n")
UNIT = """[Unit]
Description=pm2 for the app user (peers benchmark)
After=network.target

[Service]
User=app
Environment=PM2_HOME=/home/app/.pm2
ExecStart=/usr/local/bin/pm2-runtime start /srv/app/server.js --name app
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def provision() -> dict:
    """harden + node + pm2 + postgresql, in small: packages, users, sudo, an sshd drop-in,
    fail2ban, sysctls, an app user and folder, pm2 from npm under systemd, PostgreSQL and a
    login role. About 20 steps, where our real roles plan about 100 resources."""
    def file(path, content, mode="0644", owner="root", group="root", **more):
        return {"kind": "file", "path": path, "content": content, "mode": mode, "owner": owner,
                "group": group, **more}
    return {"steps": [
        {"kind": "packages", "names": ["sudo", "ufw", "fail2ban", "python3-systemd",
                                       "unattended-upgrades", "nodejs", "npm", "postgresql"]},
        {"kind": "group", "name": "sshusers"},
        {"kind": "user", "name": "deploy", "shell": "/bin/bash", "home": "/home/deploy",
         "system": False, "groups": ["sshusers"]},
        {"kind": "user", "name": "app", "shell": "/usr/sbin/nologin", "home": "/home/app",
         "system": True, "groups": []},
        file("/etc/sudoers.d/deploy", "deploy ALL=(ALL) NOPASSWD:ALL\n", mode="0440"),
        file("/etc/ssh/sshd_config.d/50-peers.conf", SSHD, notify="reload ssh"),
        file("/etc/fail2ban/jail.local", JAIL, notify="restart fail2ban"),
        file("/etc/sysctl.d/60-peers.conf", SYSCTL, notify="apply sysctl"),
        {"kind": "line", "path": "/etc/default/ufw", "line": "IPT_SYSCTL=/etc/sysctl.d/60-peers.conf",
         "regexp": "^IPT_SYSCTL="},
        {"kind": "service", "name": "fail2ban"},
        {"kind": "dir", "path": "/srv/app", "mode": "0750", "owner": "app", "group": "app"},
        {"kind": "dir", "path": "/home/app/.pm2", "mode": "0700", "owner": "app", "group": "app"},
        file("/srv/app/server.js", APP, owner="app", group="app"),
        {"kind": "command", "name": f"pm2 {PM2_VERSION} from npm",
         "run": f"npm install --global --prefix=/usr/local --no-audit --no-fund pm2@{PM2_VERSION}",
         "unless": f"grep -q '\"version\": \"{PM2_VERSION}\"' {PM2_MANIFEST}"},
        file("/etc/systemd/system/pm2-app.service", UNIT, after="systemctl daemon-reload"),
        {"kind": "service", "name": "pm2-app"},
        {"kind": "service", "name": "postgresql"},
        {"kind": "command", "name": "PostgreSQL role app",
         "run": "runuser -u postgres -- psql -qc 'CREATE ROLE app LOGIN'",
         "unless": "runuser -u postgres -- psql -tAc \"SELECT 1 FROM pg_roles WHERE "
                   "rolname = 'app'\" | grep -q 1"},
    ], "handlers": {"reload ssh": "systemctl reload ssh",
                    "restart fail2ban": "systemctl restart fail2ban",
                    "apply sysctl": "sysctl -q -p /etc/sysctl.d/60-peers.conf"}}


KINDS = {"packages", "group", "user", "touch", "copy", "owner", "file", "dir", "line", "command",
         "service"}


def check(spec: dict) -> dict:
    """The spec, or ValueError for a step kind no tool's code knows or a handler never defined."""
    for step in spec["steps"]:
        if step["kind"] not in KINDS:
            raise ValueError(f"unknown step kind {step['kind']!r}")
        if step.get("notify") and step["notify"] not in spec["handlers"]:
            raise ValueError(f"{step['path']}: notifies {step['notify']!r}, which is not a handler")
    return spec


def write(spec: dict, path: Path) -> Path:
    path.write_text(json.dumps(check(spec), indent=1) + "\n")
    return path

"""The testbed's sample app deployed blue-green, for the live tests (tests/test_deploy_live.py)
and bench/deploy.py --blue-green: env `localbg` is inventories/local.yml with `strategy:
blue-green` for the sample app (blue on 3000, green on 3001, which the app group's firewall
then allows from the test network) and the same servers and vault. Made for the duration of a
`with`, provisioned (web1, web2: two pm2 apps each; lb1: both colours' upstreams, blue live:
the old pm2 app `sample` on 3000, until the first deploy goes live as green and retires it);
afterwards the colours are deleted, `provision --env local` runs the app as before (pm2
`sample` from `current`) and lb1's live file goes (the next time starts from blue again)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from derived_env import derived_env
from engine_helpers import sh

ENV = "localbg"
PORTS = {"blue": 3000, "green": 3001}
WEB = ("web1", "web2")
EDITS = (("env: local", f"env: {ENV}"),
         ("    group: app\n    health_timeout: 10",
          "    group: app\n    strategy: blue-green\n    health_timeout: 10"),
         ("harden_allowed_ports: [{port: 3000, proto: tcp, from: 10.77.0.0/24}]",
          "harden_allowed_ports: [{port: 3000, proto: tcp, from: 10.77.0.0/24}, "
          "{port: 3001, proto: tcp, from: 10.77.0.0/24}]"))
LIVE_FILE = "/etc/nginx/live/app.conf"
PM2 = ("runuser -u app -- env -i HOME=/home/app PM2_HOME=/home/app/.pm2 "
       "PATH=/usr/local/bin:/usr/bin:/bin /usr/local/bin/pm2")


def reset_colours() -> None:
    """No colour on the app hosts: their pm2 apps deleted (and the list saved), their stamps
    and links gone (role pm2 would start a colour whose link exists)."""
    for h in WEB:
        sh(h, f"{PM2} delete sample-blue sample-green; {PM2} save; "
              "rm -f /home/app/.pm2/provisioner-sample-*.ecosystem.sha256 "
              "/srv/sample/blue /srv/sample/green", check=False)


@contextmanager
def blue_green_env(provision: Callable[[str], object]) -> Iterator[str]:
    """provision(env): `invoke provision --env <env> --limit app,lb --yes`, failing loudly."""
    try:
        with derived_env(ENV, EDITS):
            try:
                reset_colours()                # left by a run that stopped before its cleanup
                sh("lb1", f"rm -f {LIVE_FILE}")
                provision(ENV)
                yield ENV
            finally:
                reset_colours()
    finally:
        provision("local")
        sh("lb1", f"rm -f {LIVE_FILE}")        # no longer included by the site

"""Every operation, once: applied twice, the second run must change nothing."""
from pathlib import Path

from provisioner.api import (Connection, Guard, apt, commands, files, lines, links, sysctl, systemd,
                             templates, users)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
UNIT = """[Unit]
Description=provisioner test service

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


def resources(v, ctx):
    yield apt.packages(v["opsdemo_packages"])
    repo = v["opsdemo_repo"]
    if repo:
        yield apt.repository("opsdemo", repo["uri"], repo["suite"], key_b64=repo["key_b64"])
        yield apt.packages([repo["package"]])
    yield users.group("opsdemo")
    yield users.user(v["opsdemo_user"], groups=["opsdemo"], shell="/bin/bash",
                     authorized_keys=v["opsdemo_authorized_keys"])
    yield files.directory("/srv/opsdemo", mode="0750", owner=v["opsdemo_user"], group="opsdemo")
    yield files.directory("/srv/opsdemo/releases/1")
    yield links.link("/srv/opsdemo/current", to="/srv/opsdemo/releases/1")
    yield files.file("/srv/opsdemo/message", v["opsdemo_message"] + "\n", mode="0640",
                     owner=v["opsdemo_user"], group="opsdemo")
    yield templates.template("/etc/opsdemo.conf", "opsdemo/opsdemo.conf.j2",
                             {"message": v["opsdemo_message"], "secret": v["opsdemo_secret"]},
                             mode="0600", root=TEMPLATES, notify="restart opsdemo")
    yield lines.line("/etc/default/opsdemo", f"max_clients = {v['opsdemo_max_clients']}",
                     regexp=r"^max_clients\s*=")
    yield systemd.unit_file("opsdemo", UNIT, notify="restart opsdemo")
    yield systemd.service("opsdemo", enabled=True, running=True)
    yield sysctl.sysctl("net.ipv4.conf.all.log_martians", 1)
    yield commands.command(["touch", "/srv/opsdemo/created"], creates="/srv/opsdemo/created")
    yield commands.command(["sh", "-c", "date >> /srv/opsdemo/once.log"],
                           unless=["test", "-s", "/srv/opsdemo/once.log"])
    if v["opsdemo_pause"]:
        yield commands.command(["sleep", str(v["opsdemo_pause"])], name="pause")
    if v["opsdemo_fail"]:
        yield commands.command(["sh", "-c", "echo 'about to fail' >&2; exit 3"], name="failing step")


def handlers(v, ctx):
    return {"restart opsdemo": systemd.handler("restart", "opsdemo")}


def guards(v, ctx):
    """A guard checked over a brand-new SSH connection, like the sshd lockout check."""
    def check(host):
        with Connection(host, ctx.inventory.known_hosts) as c:
            if c.run(["grep", "-q", "hello", "/srv/opsdemo/message"]).rc != 0:
                raise RuntimeError("the message lost its greeting")
    return [Guard("greeting kept", ("/srv/opsdemo/message",), check)]

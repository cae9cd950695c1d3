"""Role `harden`: a fresh Debian server made fit to face the internet, without locking anyone out.

Order matters and is the safety story:
1. packages, then the SSH group, the deploy and admin users with their keys, and the sudoers
   file (checked by `visudo -cf` before it replaces the old one);
2. the whole /etc/ssh/sshd_config from a template, checked by `sshd -t -f` before it replaces
   the old one (a bad cipher name fails the run and leaves the old file), weak DH moduli removed;
3. ufw: the trusted sources first, then the rate-limited SSH port, then the ports the host needs;
4. fail2ban, unattended security upgrades, sysctl, time sync, journal, access logging.
sshd is reloaded (after `sshd -t`) once at the end of the role. Then the guard opens a BRAND-NEW
SSH connection as the deploy user on the new port and runs the agent under sudo: if that fails, the
sshd_config, sudoers file and ufw rules are restored from what they were before the run, sshd and
ufw are reloaded, and the role fails saying why. The connection the run came in on stays open
throughout. And if the controller never gets that far (killed, network gone, guard hung), the
server restores them itself: before the first of those changes the agent arms a transient
systemd timer (harden_lockout_revert_seconds, default 120) that only the passed guard disarms.

Inside a container (systemd-detect-virt: systemd-nspawn, lxc, docker ...) some things cannot
exist: kernel.* sysctls are read-only, auditd needs the initial user and PID namespace, and time
sync daemons do not start (ConditionVirtualization=!container / no CAP_SYS_TIME). Those are
configured where they can be and reported as skipped, with the reason, on every run.
"""

import base64
import dataclasses
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from provisioner.api import (EXPORTER_PORT_RANGE, USER_RE, Connection, Guard, Noop, VarError, abs_path,
                             apt, commands, exporters_of, files, lines, monitoring_sources, run_step,
                             sysctl, systemd, templates, ufw, users)

CONTAINERS = {"systemd-nspawn", "lxc", "lxc-libvirt", "docker", "podman", "rkt", "openvz", "wsl",
              "proot", "pouch", "container-other"}
SUDOERS = "/etc/sudoers.d/50-harden"
SSHD_CONFIG = "/etc/ssh/sshd_config"
SYSCTL_FILE = "/etc/sysctl.d/60-harden.conf"
BASE_PACKAGES = ["openssh-server", "sudo", "ufw", "nftables", "fail2ban", "python3-systemd",
                 "unattended-upgrades", "logrotate"]
ALGO_RE = re.compile(r"^[a-z0-9][a-z0-9@.+-]*\Z")
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
             "sk-ecdsa-sha2-nistp256@openssh.com")
TIME_RE = re.compile(r"^\d+[smhdw]?\Z")
SIZE_RE = re.compile(r"^\d+[KMGT]?\Z")
CLOCK_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d\Z")
HOST_KEY_RE = re.compile(r"/etc/ssh/[A-Za-z0-9_.-]+")       # fullmatch: one path, one line
SUDO_COMMAND_RE = re.compile(r"/[A-Za-z0-9_./-]+( [A-Za-z0-9_./@-]+)*")   # fullmatch: no sudoers specials


# --- a step that is configured elsewhere but cannot apply here ---------------------------------

@dataclass(frozen=True)
class Skip:
    """Nothing to do on this host, and why (reported as an ok step with the reason)."""
    what: str
    reason: str

    @property
    def id(self) -> str:
        return f"skip {self.what}"

    def facts(self) -> dict:
        return {}

    def plan(self, facts) -> list:
        return [Noop(self.id, self.reason)]

    def expect(self, facts) -> dict:
        return {}


def in_container(ctx) -> bool:
    return (ctx.os or {}).get("virt") in CONTAINERS


def _container_reason(ctx, what: str) -> str:
    return f"skipped in a container (systemd-detect-virt: {ctx.os.get('virt')}): {what}"


# --- input checks the type check cannot do -----------------------------------------------------

def _bad(var: str, problem: str, fix: str) -> VarError:
    return VarError(var, problem, fix)


def _rsa_bits(blob_b64: str) -> int | None:
    """Modulus size of an ssh-rsa public key blob (None when it cannot be read)."""
    try:
        data = base64.b64decode(blob_b64, validate=True)
        fields = []
        pos = 0
        for _ in range(3):                      # "ssh-rsa", e, n
            (n,) = struct.unpack(">I", data[pos:pos + 4])
            fields.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        n = int.from_bytes(fields[2], "big")
        return n.bit_length()
    except (ValueError, struct.error, IndexError):
        return None


def _keys(var: str, keys, min_rsa: int) -> list[str]:
    if not isinstance(keys, list) or not keys:
        raise _bad(var, "no SSH public key", "list at least one (e.g. the contents of ~/.ssh/id_ed25519.pub)")
    out = []
    for k in keys:
        parts = k.split() if isinstance(k, str) else []
        if len(parts) < 2 or parts[0] not in KEY_TYPES:
            raise _bad(var, f"{str(k)[:40]!r} is not an SSH public key line",
                       f"write '<type> <base64> [comment]' with a type among {', '.join(KEY_TYPES[:3])} ...")
        if parts[0] == "ssh-rsa":
            bits = _rsa_bits(parts[1])
            if bits is None:
                raise _bad(var, f"the RSA key {parts[1][:20]}... cannot be decoded", "copy it again from the .pub file")
            if bits < min_rsa:
                raise _bad(var, f"an RSA key of {bits} bits is below harden_ssh_required_rsa_size "
                                f"({min_rsa}): sshd would refuse it", "use an ed25519 key (or RSA >= that size)")
        out.append(" ".join(parts))
    return out


def _name(var: str, value) -> str:
    if not isinstance(value, str) or not USER_RE.match(value):
        raise _bad(var, f"{value!r} is not a user/group name", "use lowercase letters, digits, '_' and '-'")
    if value == "root":
        raise _bad(var, "root cannot be used", "name a personal user; root logins are closed by this role")
    return value


def _algos(var: str, value) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and ALGO_RE.match(a) for a in value):
        raise _bad(var, f"{value!r} is not a list of algorithm names",
                   "list names like 'aes256-gcm@openssh.com' (see `ssh -Q cipher|kex|mac|key`)")
    return value


def _int(var: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(var, f"{value!r} is out of range", f"use an integer from {lo} to {hi}")
    return value


def _public_key_of(path) -> str | None:
    """'type base64' of the inventory's private key: from its .pub beside it, or from the key
    itself when it has no passphrase; None when neither can be read."""
    if path is None:
        return None
    pub = Path(str(path) + ".pub")
    try:
        parts = pub.read_text().split()
        if len(parts) >= 2 and parts[0] in KEY_TYPES:
            return f"{parts[0]} {parts[1]}"
    except OSError:
        pass
    try:
        import paramiko
        key = paramiko.PKey.from_path(str(path))
        return f"{key.get_name()} {key.get_base64()}"
    except Exception:
        return None


@dataclass(frozen=True)
class Settings:
    deploy: str
    deploy_keys: list
    admins: list                      # [(name, keys)]
    absent: list
    ssh_group: str
    allow_groups: list
    port: int
    old_port: int | None              # the port this run connects on, while moving to `port`
    trusted: list                     # normalised sources
    rules: list                       # ufw rules, in order
    release: str | None = None        # the deploy identity (not root), its keys and exact sudo commands
    release_keys: list = dataclasses.field(default_factory=list)
    release_sudo: list = dataclasses.field(default_factory=list)     # [(as user, command)]


def check(v: dict, ctx) -> Settings:
    """Every role var the inventory's type check cannot judge (VarError names the var and the
    fix); pure, run before any server is touched."""
    min_rsa = _int("harden_ssh_required_rsa_size", v["harden_ssh_required_rsa_size"], 1024, 16384)
    deploy = _name("harden_deploy_user", v["harden_deploy_user"])
    if ctx.host.user == "root":
        raise _bad("ssh.user", f"the inventory logs in to {ctx.host.name} as root, and this role "
                   "closes root logins", f"set ssh.user: {deploy} and ssh.bootstrap_user: root "
                   "(root is then used only until the deploy user can log in)")
    listed = v["harden_deploy_keys"]
    if not isinstance(listed, list):
        raise _bad("harden_deploy_keys", f"{listed!r} is not a list", "list SSH public key lines")
    mine = _public_key_of(ctx.host.key)
    listed_blobs = {" ".join(str(k).split()[:2]) for k in listed}
    if v["harden_deploy_inventory_key"]:
        if mine is None and not listed:
            raise _bad("harden_deploy_keys", "no SSH public key, and the inventory's ssh.key "
                       f"({ctx.host.key or 'not set: agent keys'}) cannot be read to take its public half",
                       "list the public key the provisioner logs in with")
        if mine and mine not in listed_blobs:
            listed = list(listed) + [f"{mine} provisioner"]
    elif mine and mine not in listed_blobs and ctx.host.user == deploy:
        raise _bad("harden_deploy_keys", f"does not hold the public key of the inventory's ssh.key "
                   f"({ctx.host.key}): the next run could not log in", f"add `{mine}`")
    deploy_keys = _keys("harden_deploy_keys", listed, min_rsa)
    admins = []
    for i, a in enumerate(v["harden_admin_users"] or []):
        var = f"harden_admin_users[{i}]"
        if not isinstance(a, dict) or set(a) - {"name", "keys"} or "name" not in a:
            raise _bad(var, f"{a!r} is not {{name, keys}}", "write {name: alice, keys: ['ssh-ed25519 AAAA...']}")
        name = _name(f"{var}.name", a["name"])
        if name == deploy:
            raise _bad(f"{var}.name", f"{name} is the deploy user", "give admins their own users")
        admins.append((name, _keys(f"{var}.keys", a.get("keys"), min_rsa)))
    absent = [_name("harden_absent_users", n) for n in v["harden_absent_users"] or []]
    clash = set(absent) & ({deploy} | {n for n, _ in admins})
    if clash:
        raise _bad("harden_absent_users", f"{', '.join(sorted(clash))} also listed as present", "remove them from one list")
    group = _name("harden_ssh_group", v["harden_ssh_group"])
    allow = v["harden_ssh_allow_groups"]
    allow = [group] if allow is None else allow
    if not isinstance(allow, list) or not allow:
        raise _bad("harden_ssh_allow_groups", f"{allow!r} is not a list of groups", "list groups, or null for [harden_ssh_group]")
    allow = [_name("harden_ssh_allow_groups", g) for g in allow]
    port = _int("harden_ssh_port", v["harden_ssh_port"], 1, 65535)
    for var in ("harden_ssh_kex", "harden_ssh_ciphers", "harden_ssh_macs", "harden_ssh_host_key_algorithms"):
        _algos(var, v[var])
    for p in v["harden_ssh_host_keys"]:
        try:      # normalised: no '..' out of /etc/ssh, no newline that would add a directive
            under = isinstance(p, str) and abs_path(p).startswith("/etc/ssh/") \
                and HOST_KEY_RE.fullmatch(p) is not None
        except ValueError:
            under = False
        if not under:
            raise _bad("harden_ssh_host_keys", f"{p!r} is not a key file under /etc/ssh/",
                       "list normalised host key paths such as /etc/ssh/ssh_host_ed25519_key")
    _int("harden_ssh_moduli_min_bits", v["harden_ssh_moduli_min_bits"], 2048, 8192)
    _int("harden_ssh_max_auth_tries", v["harden_ssh_max_auth_tries"], 1, 10)
    _int("harden_ssh_max_sessions", v["harden_ssh_max_sessions"], 1, 100)
    _int("harden_ssh_login_grace_time", v["harden_ssh_login_grace_time"], 5, 600)
    _int("harden_ssh_client_alive_interval", v["harden_ssh_client_alive_interval"], 0, 3600)
    _int("harden_ssh_client_alive_count_max", v["harden_ssh_client_alive_count_max"], 0, 100)
    for line in v["harden_ssh_extra_lines"]:
        if not isinstance(line, str) or "\n" in line:
            raise _bad("harden_ssh_extra_lines", f"{line!r} is not one line", "one sshd_config line per item")
    for var in ("harden_fail2ban_bantime", "harden_fail2ban_findtime"):
        if not TIME_RE.match(str(v[var])):
            raise _bad(var, f"{v[var]!r} is not a fail2ban time", "write e.g. 600, 10m, 1h or 1d")
    _int("harden_fail2ban_maxretry", v["harden_fail2ban_maxretry"], 1, 100)
    if v["harden_fail2ban_sshd_mode"] not in ("normal", "ddos", "extra", "aggressive"):
        raise _bad("harden_fail2ban_sshd_mode", f"{v['harden_fail2ban_sshd_mode']!r} is unknown",
                   "use normal, ddos, extra or aggressive")
    if not CLOCK_RE.match(v["harden_unattended_reboot_time"]):
        raise _bad("harden_unattended_reboot_time", f"{v['harden_unattended_reboot_time']!r} is not HH:MM",
                   'quote it in YAML: "04:00"')
    for o in v["harden_unattended_extra_origins"]:
        if not isinstance(o, str) or '"' in o or "\n" in o or "=" not in o:
            raise _bad("harden_unattended_extra_origins", f"{o!r} is not an origin pattern",
                       "write e.g. origin=Debian,codename=${distro_codename}-updates")
    if v["harden_sysctl_rp_filter"] not in (0, 1, 2):
        raise _bad("harden_sysctl_rp_filter", f"{v['harden_sysctl_rp_filter']!r}", "use 1 (strict) or 2 (loose)")
    if v["harden_time_sync"] not in ("systemd-timesyncd", "chrony"):
        raise _bad("harden_time_sync", f"{v['harden_time_sync']!r} is unknown", "use systemd-timesyncd or chrony")
    for s in v["harden_ntp_servers"]:
        if not isinstance(s, str) or not re.match(r"^[A-Za-z0-9.:-]+\Z", s):
            raise _bad("harden_ntp_servers", f"{s!r} is not a host name or address", "list NTP server names")
    if not SIZE_RE.match(str(v["harden_journal_max_use"])):
        raise _bad("harden_journal_max_use", f"{v['harden_journal_max_use']!r} is not a size", "write e.g. 500M or 2G")
    log = v["harden_sudo_logfile"]
    if not isinstance(log, str) or not re.match(r"^/var/log/[A-Za-z0-9._/-]+\Z", log) or ".." in log:
        raise _bad("harden_sudo_logfile", f"{log!r}", "use a path under /var/log/")
    _int("harden_shell_timeout", v["harden_shell_timeout"], 0, 86400)
    if not isinstance(v["harden_banner"], str) or not v["harden_banner"].strip():
        raise _bad("harden_banner", "empty", "write a short warning text")
    for m in v["harden_blacklist_modules"]:
        if not isinstance(m, str) or not re.match(r"^[a-z0-9_-]+\Z", m):
            raise _bad("harden_blacklist_modules", f"{m!r} is not a module name", "write e.g. usb-storage")

    # ufw: the trusted sources, then the SSH rate limit for everyone else, then the host's ports
    trusted = []
    for s in v["harden_trusted_sources"]:
        try:
            r = ufw.rule("allow", port, "tcp", s, comment="trusted source")
        except ValueError as e:
            raise _bad("harden_trusted_sources", str(e), "list addresses or networks") from None
        trusted.append(r.src)
    old_port = ctx.host.port if ctx.host.port != port else None
    ssh_ports = [port] + ([old_port] if old_port else [])
    rules = []
    for p in ssh_ports:
        note = "" if p == port else " (old port, until the inventory uses the new one)"
        rules += [ufw.rule("allow", p, "tcp", s, comment="trusted source" + note) for s in trusted]
        rules.append(ufw.rule("limit", p, "tcp", "any", comment="ssh" + note))
    for i, item in enumerate(v["harden_allowed_ports"]):
        if not isinstance(item, dict) or "port" not in item:
            raise _bad(f"harden_allowed_ports[{i}]", f"{item!r} has no port", "write {port: 443, proto: tcp, from: any}")
        try:
            rules.append(ufw.as_rule({"action": "allow", "proto": "tcp", **item}))
        except (ValueError, TypeError) as e:
            raise _bad(f"harden_allowed_ports[{i}]", str(e), "fix that entry") from None
    # role monitoring_agent's exporters listen on the private address; only the monitoring
    # servers (hosts with role monitoring) may reach them
    if exporters_of(ctx.inventory, ctx.host.name):
        for src in monitoring_sources(ctx.inventory):
            if src == ctx.host.address:
                continue                          # a host scraping itself goes over loopback
            try:
                rules.append(ufw.rule("allow", EXPORTER_PORT_RANGE, "tcp", src, comment="monitoring"))
            except ValueError as e:
                raise _bad("harden_allowed_ports", f"the monitoring server's address {src!r}: {e}",
                           "give hosts with role monitoring an IP address in the inventory") from None
    if v["harden_ufw_outgoing"] not in ufw.POLICY_WORDS:
        raise _bad("harden_ufw_outgoing", f"{v['harden_ufw_outgoing']!r} is unknown", "use allow, deny or reject")
    try:
        ufw.firewall(rules)
    except ValueError as e:
        raise _bad("harden_allowed_ports", str(e), "drop the duplicate") from None
    release, release_keys, release_sudo = _release(v, deploy, deploy_keys, admins, absent, min_rsa)
    return Settings(deploy, deploy_keys, admins, absent, group, allow, port, old_port, trusted, rules,
                    release, release_keys, release_sudo)


def _release(v: dict, deploy: str, deploy_keys: list, admins: list, absent: list, min_rsa: int):
    """The deploy identity: a login that is not root, with nothing but the exact sudo commands
    listed; a key that also logs in as the provisioning user would make it root."""
    name = v["harden_release_user"]
    if name is None:
        if v["harden_release_keys"] or v["harden_release_sudo"]:
            raise _bad("harden_release_user", "not set, but harden_release_keys/_sudo are",
                       "name the user, e.g. release")
        return None, [], []
    name = _name("harden_release_user", name)
    if name in {deploy, *(n for n, _ in admins), *absent}:
        raise _bad("harden_release_user", f"{name} is also the deploy user, an admin or absent",
                   "give the deploy identity a user of its own")
    keys = _keys("harden_release_keys", v["harden_release_keys"], min_rsa)
    admin_keys = {" ".join(k.split()[:2]) for k in deploy_keys + [k for _, ks in admins for k in ks]}
    shared = [k for k in keys if " ".join(k.split()[:2]) in admin_keys]
    if shared:
        raise _bad("harden_release_keys", f"{shared[0][:40]}... also logs in as {deploy} or an admin "
                   "(root through sudo)", "give CI a key of its own (ssh-keygen -t ed25519)")
    sudo = []
    for i, item in enumerate(v["harden_release_sudo"] or []):
        var = f"harden_release_sudo[{i}]"
        if not isinstance(item, dict) or set(item) != {"as", "command"}:
            raise _bad(var, f"{item!r} is not {{as, command}}", "write {as: app, command: /usr/bin/pm2 reload shop}")
        if not isinstance(item["as"], str) or not USER_RE.match(item["as"]):
            raise _bad(f"{var}.as", f"{item['as']!r} is not a user name", "name the user the command runs as")
        if not isinstance(item["command"], str) or not SUDO_COMMAND_RE.fullmatch(item["command"]):
            raise _bad(f"{var}.command", f"{item['command']!r} is not an exact command",
                       "an absolute path and plain arguments (letters, digits, _ . / @ -), no wildcards")
        sudo.append((item["as"], item["command"]))
    return name, keys, sudo


# --- the role ----------------------------------------------------------------------------------

NET_SYSCTLS = {
    "net.ipv4.conf.all.accept_redirects": 0, "net.ipv4.conf.default.accept_redirects": 0,
    "net.ipv4.conf.all.secure_redirects": 0, "net.ipv4.conf.default.secure_redirects": 0,
    "net.ipv4.conf.all.send_redirects": 0, "net.ipv4.conf.default.send_redirects": 0,
    "net.ipv4.conf.all.accept_source_route": 0, "net.ipv4.conf.default.accept_source_route": 0,
    "net.ipv4.conf.all.log_martians": 1, "net.ipv4.conf.default.log_martians": 1,
    "net.ipv4.tcp_syncookies": 1, "net.ipv4.tcp_rfc1337": 1,
    "net.ipv4.icmp_echo_ignore_broadcasts": 1, "net.ipv4.icmp_ignore_bogus_error_responses": 1,
    "net.ipv6.conf.all.accept_redirects": 0, "net.ipv6.conf.default.accept_redirects": 0,
    "net.ipv6.conf.all.accept_source_route": 0, "net.ipv6.conf.default.accept_source_route": 0,
}
KERNEL_SYSCTLS = {
    "kernel.kptr_restrict": 2, "kernel.dmesg_restrict": 1, "kernel.yama.ptrace_scope": 1,
    "kernel.unprivileged_bpf_disabled": 1, "kernel.perf_event_paranoid": 3, "kernel.sysrq": 0,
    "kernel.core_uses_pid": 1, "kernel.randomize_va_space": 2, "net.core.bpf_jit_harden": 2,
    "fs.protected_hardlinks": 1, "fs.protected_symlinks": 1, "fs.protected_fifos": 2,
    "fs.protected_regular": 2, "fs.suid_dumpable": 0, "dev.tty.ldisc_autoload": 0,
}


def sysctls(v: dict) -> dict:
    out = dict(NET_SYSCTLS)
    out["net.ipv4.conf.all.rp_filter"] = v["harden_sysctl_rp_filter"]
    out["net.ipv4.conf.default.rp_filter"] = v["harden_sysctl_rp_filter"]
    if not v["harden_ipv6_accept_ra"]:
        out["net.ipv6.conf.all.accept_ra"] = 0
        out["net.ipv6.conf.default.accept_ra"] = 0
    return out


# What a Debian release's OpenSSH does not know yet (sshd -t would refuse it): Debian 12 has
# OpenSSH 9.2, without the ML-KEM hybrid key exchange (9.9) and per-source penalties (9.8).
NOT_IN_OPENSSH = {"12": {"mlkem768x25519-sha256", "PerSourcePenaltyExemptList"}}


# OpenSSH 9.8+ (Debian 13) refuses a failing source itself for a while and logs each refused
# connection ("drop connection #0 from [ADDR]:PORT on [ADDR]:22 penalty: failed authentication"):
# those count for fail2ban too, so a source that keeps trying is banned for bantime, not only
# slowed down (with only the failures counted, its retries never get past the penalty again).
SSHD_PENALTY_FILTER = """# Managed by provisioner (role harden): sshd's filter plus its per-source penalties.
[Definition]
failregex = %(known/failregex)s
            ^drop connection #\\d+ from \\[<HOST>\\]:\\d+ on \\[[^\\]]+\\]:\\d+ penalty: \\S
"""


def _unknown(os_facts: dict | None) -> set[str]:
    return NOT_IN_OPENSSH.get((os_facts or {}).get("version_id"), set())


def offered(algorithms: list[str], os_facts: dict | None) -> list[str]:
    """The algorithms the server's OpenSSH knows, in the order given (strongest first)."""
    return [a for a in algorithms if a not in _unknown(os_facts)]


def sshd_vars(v: dict, s: Settings, os_facts: dict | None = None) -> dict:
    # OpenSSH 9.8+ refuses for a while a source whose connections fail or never authenticate:
    # never the trusted sources (the controller's guard logins and probes, peers' backups)
    exempt = None if "PerSourcePenaltyExemptList" in _unknown(os_facts) else s.trusted
    kex = offered(v["harden_ssh_kex"], os_facts)
    if not kex:
        raise _bad("harden_ssh_kex", f"none of {v['harden_ssh_kex']} is known to this server's "
                   "OpenSSH", "add curve25519-sha256 (every supported release has it)")
    return {"port": s.port, "kex": kex, "penalty_exempt": exempt, "ciphers": v["harden_ssh_ciphers"],
            "macs": v["harden_ssh_macs"], "host_key_algorithms": v["harden_ssh_host_key_algorithms"],
            "host_keys": v["harden_ssh_host_keys"], "required_rsa_size": v["harden_ssh_required_rsa_size"],
            "allow_groups": s.allow_groups, "max_auth_tries": v["harden_ssh_max_auth_tries"],
            "max_sessions": v["harden_ssh_max_sessions"], "login_grace_time": v["harden_ssh_login_grace_time"],
            "client_alive_interval": v["harden_ssh_client_alive_interval"],
            "client_alive_count_max": v["harden_ssh_client_alive_count_max"],
            "allow_tcp_forwarding": v["harden_ssh_allow_tcp_forwarding"],
            "allow_agent_forwarding": v["harden_ssh_allow_agent_forwarding"],
            "banner": v["harden_ssh_banner"], "extra_lines": v["harden_ssh_extra_lines"]}


def resources(v, ctx):
    s = check(v, ctx)
    container = in_container(ctx)
    packages = list(BASE_PACKAGES) + [v["harden_time_sync"]] + list(v["harden_packages"])
    if not container:
        packages.append("auditd")
    yield apt.packages(list(dict.fromkeys(packages)))

    # 1. who may log in, and sudo
    yield users.group(s.ssh_group)
    yield users.user(s.deploy, groups=[s.ssh_group], shell="/bin/bash", authorized_keys=s.deploy_keys)
    for name, keys in s.admins:
        yield users.user(name, groups=[s.ssh_group], shell="/bin/bash", authorized_keys=keys)
    if s.release:
        yield users.user(s.release, groups=[s.ssh_group], shell="/bin/bash", authorized_keys=s.release_keys)
    for name in s.absent:
        yield users.user(name, state="absent")
    yield templates.template(SUDOERS, "harden/sudoers.j2", {
        "deploy": s.deploy, "admins": [n for n, _ in s.admins], "logfile": v["harden_sudo_logfile"],
        "admin_nopasswd": v["harden_admin_sudo_nopasswd"], "release": s.release,
        "release_sudo": s.release_sudo}, mode="0440", validate="visudo -cf {path}")

    # 2. sshd: the whole file, checked before it replaces the old one
    yield templates.template(SSHD_CONFIG, "harden/sshd_config.j2", sshd_vars(v, s, ctx.os), mode="0600",
                             validate=["sshd", "-t", "-f", "{path}"], notify="reload ssh")
    bits = v["harden_ssh_moduli_min_bits"] - 1          # moduli lists size as bits - 1
    yield commands.command(
        ["sh", "-c", f"awk '$1 ~ /^#/ || $5 >= {bits}' /etc/ssh/moduli > /etc/ssh/moduli.harden "
                     "&& chmod 0644 /etc/ssh/moduli.harden && mv /etc/ssh/moduli.harden /etc/ssh/moduli"],
        unless=["awk", f"$1 !~ /^#/ && $5 < {bits} {{ weak = 1 }} END {{ exit weak }}", "/etc/ssh/moduli"],
        name=f"remove DH moduli under {bits + 1} bits from /etc/ssh/moduli")

    # 3. firewall. ufw re-applies a sysctl file whenever it starts: make it ours, not its own
    #    (whose log_martians=0 would undo ours).
    yield lines.line("/etc/default/ufw", f"IPT_SYSCTL={SYSCTL_FILE}", regexp=r"^\s*IPT_SYSCTL=")
    yield ufw.firewall(s.rules, incoming="deny", outgoing=v["harden_ufw_outgoing"], routed="deny",
                       keep_open=[s.port] + ([s.old_port] if s.old_port else []))

    # 4. fail2ban
    ssh_ports = [s.port] + ([s.old_port] if s.old_port else [])
    if v["harden_fail2ban_nginx"]:
        yield files.directory("/var/log/nginx", mode="0755", owner="root", group="adm")
        for log in ("/var/log/nginx/access.log", "/var/log/nginx/error.log"):
            yield commands.command(["touch", log], creates=log)
    yield files.file("/etc/fail2ban/fail2ban.local",
                     "# Managed by provisioner (role harden)\n[Definition]\n"
                     "# said explicitly: without it fail2ban 1.0 warns on every start\nallowipv6 = auto\n",
                     notify="restart fail2ban")
    yield files.file("/etc/fail2ban/filter.d/sshd.local", SSHD_PENALTY_FILTER, notify="restart fail2ban")
    yield templates.template("/etc/fail2ban/jail.local", "harden/jail.local.j2", {
        "ignoreip": ["127.0.0.1/8", "::1"] + s.trusted, "bantime": v["harden_fail2ban_bantime"],
        "findtime": v["harden_fail2ban_findtime"], "maxretry": v["harden_fail2ban_maxretry"],
        "ssh_ports": ssh_ports, "mode": v["harden_fail2ban_sshd_mode"],
        "nginx": v["harden_fail2ban_nginx"]}, notify="restart fail2ban")
    yield systemd.service("fail2ban", enabled=True, running=True)

    # 5. security updates
    yield templates.template("/etc/apt/apt.conf.d/20auto-upgrades", "harden/20auto-upgrades.j2", {},
                             validate=["apt-config", "-c", "{path}", "dump"])
    yield templates.template("/etc/apt/apt.conf.d/50unattended-upgrades", "harden/50unattended-upgrades.j2", {
        "extra_origins": v["harden_unattended_extra_origins"], "reboot": v["harden_unattended_reboot"],
        "reboot_time": v["harden_unattended_reboot_time"]}, validate=["apt-config", "-c", "{path}", "dump"])
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        yield systemd.service(timer, enabled=True, running=True)

    # 6. kernel and network parameters
    for key, value in sysctls(v).items():
        yield sysctl.sysctl(key, value, file=SYSCTL_FILE)
    if container:
        yield Skip("kernel sysctls", _container_reason(
            ctx, "kernel-wide sysctls are read-only there (only net.* ones belong to the container's "
                 "network namespace): " + ", ".join(KERNEL_SYSCTLS)))
    else:
        for key, value in KERNEL_SYSCTLS.items():
            yield sysctl.sysctl(key, value, file=SYSCTL_FILE)
    yield files.directory("/etc/systemd/coredump.conf.d")
    yield files.file("/etc/systemd/coredump.conf.d/50-harden.conf",
                     "# Managed by provisioner (role harden): no core dumps (they can hold secrets)\n"
                     "[Coredump]\nStorage=none\nProcessSizeMax=0\n")
    yield files.file("/etc/security/limits.d/50-harden.conf",
                     "# Managed by provisioner (role harden): no core dumps (they can hold secrets)\n"
                     "* hard core 0\n* soft core 0\n")
    yield files.directory("/etc/modprobe.d")
    yield files.file("/etc/modprobe.d/50-harden.conf",
                     "# Managed by provisioner (role harden): modules this server never needs\n"
                     + "".join(f"install {m} /bin/false\nblacklist {m}\n" for m in v["harden_blacklist_modules"]))

    # 7. time sync
    sync = v["harden_time_sync"]
    if sync == "systemd-timesyncd":
        conf = ("# Managed by provisioner (role harden)\n[Time]\n"
                + (f"NTP={' '.join(v['harden_ntp_servers'])}\n" if v["harden_ntp_servers"] else ""))
        yield files.directory("/etc/systemd/timesyncd.conf.d")
        yield files.file("/etc/systemd/timesyncd.conf.d/50-harden.conf", conf, notify="restart time sync")
        unit, why = "systemd-timesyncd", "systemd-timesyncd has ConditionVirtualization=!container"
    else:
        conf = "# Managed by provisioner (role harden)\n" + "".join(
            f"server {n} iburst\n" for n in v["harden_ntp_servers"])
        yield files.file("/etc/chrony/sources.d/50-harden.sources", conf, notify="restart time sync")
        unit, why = "chrony", "chronyd needs CAP_SYS_TIME (ConditionCapability), which a container lacks"
    if container:
        yield systemd.service(unit, enabled=True)
        yield Skip(f"{unit} running", _container_reason(ctx, f"{why}; installed, configured and enabled"))
    else:
        yield systemd.service(unit, enabled=True, running=True)

    # 8. the journal: persistent, capped
    yield files.directory("/etc/systemd/journald.conf.d")
    yield templates.template("/etc/systemd/journald.conf.d/50-harden.conf", "harden/journald.conf.j2",
                             {"max_use": v["harden_journal_max_use"]}, notify="restart journald")

    # 9. access logging: sshd logs logins (LogLevel VERBOSE) and sudo logs commands to the journal;
    #    sudo also writes its own file; auditd records both where it can run
    yield templates.template("/etc/logrotate.d/harden-sudo", "harden/logrotate-sudo.j2",
                             {"logfile": v["harden_sudo_logfile"]})
    if container:
        yield Skip("auditd", _container_reason(
            ctx, "auditd needs the initial user and PID namespace; logins and sudo are recorded in "
                 f"the persistent journal and {v['harden_sudo_logfile']}"))
    else:
        yield templates.template("/etc/audit/rules.d/50-harden.rules", "harden/audit.rules.j2",
                                 {"sudo_logfile": v["harden_sudo_logfile"]}, mode="0640",
                                 notify="load audit rules")
        yield systemd.service("auditd", enabled=True, running=True)

    # 10. smaller things auditors ask for
    yield files.file("/etc/issue", v["harden_banner"].strip() + "\n")
    yield files.file("/etc/issue.net", v["harden_banner"].strip() + "\n")
    yield files.file("/etc/profile.d/50-harden.sh",
                     "# Managed by provisioner (role harden): no core dumps from login shells"
                     + ("; idle interactive shells log out" if v["harden_shell_timeout"] else "")
                     + "\nulimit -c 0\n"
                     + (f"TMOUT={v['harden_shell_timeout']}\nreadonly TMOUT\nexport TMOUT\n"
                        if v["harden_shell_timeout"] else ""))
    # password settings for the day someone sets one: strong hashing, no immediate re-change.
    # (No maximum age: a key-only user whose never-set password "expired" could not log in.)
    for key, value in (("SHA_CRYPT_MIN_ROUNDS", 65536), ("SHA_CRYPT_MAX_ROUNDS", 262144),
                       ("PASS_MIN_DAYS", 1)):
        yield lines.line("/etc/login.defs", f"{key} {value}", regexp=rf"^#?\s*{key}\s")
    if "needrestart" in v["harden_packages"]:
        yield files.directory("/etc/needrestart/conf.d")
        yield files.file("/etc/needrestart/conf.d/50-harden.conf",
                         "# Managed by provisioner (role harden): list services to restart after "
                         "upgrades, never restart them unasked\n$nrconf{restart} = 'l';\n")


def handlers(v, ctx):
    return {
        "reload ssh": systemd.handler("reload", "ssh", validate=["sshd", "-t"]),
        "restart fail2ban": systemd.handler("restart", "fail2ban", validate=["fail2ban-client", "-t"]),
        "restart journald": systemd.handler("restart", "systemd-journald"),
        "restart time sync": systemd.handler(
            "try-restart", "chrony" if v["harden_time_sync"] == "chrony" else "systemd-timesyncd"),
        "load audit rules": [run_step(["augenrules", "--load"])],
    }


# --- the lockout guard -------------------------------------------------------------------------

def _known_hosts_for(path: Path, address: str, port: int) -> Path:
    """known_hosts entries for address:port. On a new port the server presents the same host keys
    the run has already verified on the old one (22 or a custom port): copy them to a temporary
    file under the new name."""
    text = path.read_text() if path.exists() else ""
    name = address if port == 22 else f"[{address}]:{port}"
    rows = [line.split(None, 1) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and len(line.split(None, 1)) == 2]
    if any(name in names.split(",") for names, _ in rows):
        return path
    mine = re.compile(rf"{re.escape(address)}|\[{re.escape(address)}\]:\d+")
    extra = list(dict.fromkeys(f"{name} {key}" for names, key in rows
                               if any(mine.fullmatch(n) for n in names.split(","))))
    tmp = tempfile.NamedTemporaryFile("w", prefix="harden-known-hosts-", delete=False)
    tmp.write(text + "".join(x + "\n" for x in extra))
    tmp.close()
    return Path(tmp.name)


def login_check(host, known_hosts: Path, users_: list[str], port: int):
    """A brand-new SSH connection per user on `port`, then the agent under sudo over it, the way
    every later exec will run (`true` ignored stdin, so it passed where the agent failed)."""
    for user in users_:
        target = dataclasses.replace(host, port=port, user=user)
        kh = _known_hosts_for(Path(known_hosts), host.address, port)
        try:
            with Connection(target, kh, host.sudo_password) as c:
                try:
                    c.ping()
                except RuntimeError as e:           # AgentError: sudo or the agent failed
                    raise RuntimeError(f"{user} logged in on port {port} but the agent under "
                                       f"sudo failed: {str(e)[-300:]}") from None
        finally:
            if kh != Path(known_hosts):
                kh.unlink(missing_ok=True)


def guards(v, ctx):
    deploy = v["harden_deploy_user"]
    who = [deploy] + ([ctx.host.user] if ctx.host.user not in (deploy, "root") else [])
    port = v["harden_ssh_port"]

    def check(host):
        login_check(host, ctx.inventory.known_hosts, who, port)

    return [Guard("fresh SSH login as " + " and ".join(who) + f" with sudo on port {port}",
                  (SSHD_CONFIG, SUDOERS), check,
                  after_rollback=tuple(systemd.handler("reload", "ssh", validate=["sshd", "-t"])),
                  resources=("ufw",),
                  revert_paths=(SSHD_CONFIG, SUDOERS) + UFW_FILES,
                  revert_after=REVERT_AFTER,
                  revert_seconds=_int("harden_lockout_revert_seconds",
                                      v["harden_lockout_revert_seconds"], 30, 3600))]


# what the dead man's switch restores (sshd, sudo, the firewall's rules and state) and reloads
UFW_FILES = (ufw.USER_RULES, ufw.USER6_RULES, ufw.DEFAULTS, ufw.CONF)
REVERT_AFTER = (
    ("sh", "-c", "sshd -t && systemctl reload ssh.service"),
    ("sh", "-c", "command -v ufw >/dev/null || exit 0; "
                 "if grep -qs '^ENABLED=yes' /etc/ufw/ufw.conf; then ufw reload; else ufw --force disable; fi"),
)

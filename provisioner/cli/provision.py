"""`invoke provision`, `invoke check` and `invoke hosts.trust`."""
from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from invoke import Collection, Exit, task

from provisioner.cli.common import FLAG_HELP, Extras, Task, fail_input, inventory, load, run_task
from provisioner.errors import EXIT_UNREACHABLE, InputError, display_path

if TYPE_CHECKING:                 # imported where used: `invoke --list` needs none of them
    import paramiko

    from provisioner.inventory import Host, Jump

PROVISION_HELP = {**FLAG_HELP, "roles": "only these roles, comma-separated (in inventory order)"}


@task(klass=Task, help=PROVISION_HELP, incrementable=["verbose"])
def provision(c, env="local", limit=None, roles=None, check=False, diff=False, json=False, yes=False,
              serial=0, forks=50, verbose=0, detailed_exitcode=False, max_fail_percentage=0,
              shard=None, out=None):
    """Converge servers to their roles (harden, install the stack); a second run changes nothing."""
    run_task("provision", env=env, limit=limit, check=check, diff=diff, json=json, yes=yes,
             serial=serial, forks=forks, verbose=verbose, detailed_exitcode=detailed_exitcode,
             roles=roles, max_fail_percentage=max_fail_percentage, shard=shard,
             extras=Extras(out=out))


@task(help={"env": FLAG_HELP["env"]})
def check(c, env="local"):
    """Validate an inventory, its vars, secrets and known host keys; touches no server."""
    from provisioner.roles import load_role
    from provisioner.varchecks import check_vars
    try:
        inv, _ = load(env, interactive=sys.stdin.isatty())
        check_vars(inv, inv.hosts.values(), lambda role: load_role(inv.roles[role]))
    except InputError as e:
        raise fail_input(str(e)) from None
    print(f"{display_path(inv.path)}: ok ({len(inv.hosts)} hosts, {len(inv.groups)} groups, "
          f"roles: {', '.join(sorted(inv.roles)) or 'none'})")


def _key_types(recorded: Iterable[str], offered: list[str]) -> list[str]:
    """Host key algorithms to ask for first: the types on record (an RSA key is negotiated as
    rsa-sha2-*), so a server with several keys presents the one we know."""
    first: list[str] = []
    for t in recorded:
        first += ["rsa-sha2-512", "rsa-sha2-256", t] if t == "ssh-rsa" else [t]
    first = [t for t in dict.fromkeys(first) if t in offered]
    return first + [t for t in offered if t not in first]


def _scan(sock, timeout: float, recorded: Iterable[str]) -> paramiko.PKey:
    """The host key a server presents on `sock`, without authenticating."""
    import paramiko
    t = paramiko.Transport(sock)
    try:
        opts = t.get_security_options()
        opts.key_types = _key_types(recorded, list(opts.key_types))
        t.banner_timeout = timeout
        t.start_client(timeout=timeout)
        return t.get_remote_server_key()
    finally:
        t.close()


class _Trust:
    """The env's known_hosts as hosts.trust reads and extends it: a key is recorded only after
    its fingerprint was shown (and confirmed, unless --yes); any key on record for a name means
    that a different key, of any type, is a change and is refused."""

    def __init__(self, path: Path, yes: bool):
        import paramiko
        self.path, self.yes = path, yes
        self.known = paramiko.HostKeys()
        if path.exists():
            self.known.load(str(path))
        self.recorded = 0

    def types(self, name: str) -> list[str]:
        return list(self.known.lookup(name) or {})

    def decide(self, label: str, name: str, key: paramiko.PKey) -> bool:
        """Whether `key` is (now) trusted for `name`; records it when new and accepted."""
        from provisioner.connection import fingerprint
        have = dict(self.known.lookup(name) or {})
        shown = f"{key.get_name()} {fingerprint(key)}"
        if have.get(key.get_name()) == key:
            print(f"{label}: already trusted ({shown})")
            return True
        if have:
            known = ", ".join(f"{t} {fingerprint(k)}" for t, k in have.items())
            print(f"{label}: HOST KEY CHANGED: {display_path(self.path)} has {known} for {name}, "
                  f"the server presents {shown}; not recorded. If the server was really rebuilt, "
                  f"remove its line(s) from {display_path(self.path)} and run this again.",
                  file=sys.stderr)
            return False
        print(f"{label}: {name} presents {shown}")
        if not self.yes:
            if not sys.stdin.isatty():
                raise fail_input("not a terminal: check the fingerprints above, then run again "
                                 "with --yes")
            if input("  trust it? [y/N] ").strip().lower() not in ("y", "yes"):
                return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:      # at once: a jump host must be known before its hosts
            f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        self.known.add(name, key.get_name(), key)
        self.recorded += 1
        return True


def _jump_host(j: Jump) -> Host:
    from provisioner.inventory import Host
    return Host(name=j.name, address=j.address, port=j.port, user=j.user, bootstrap_user=None,
                key=j.key, jump=None, connect_timeout=j.connect_timeout,
                command_timeout=j.connect_timeout)


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"], "yes": "record without asking"})
def trust(c, env="local", limit=None, yes=False):
    """Show each host's key fingerprint and record it in the env's known_hosts (asks unless --yes).
    Hosts behind a jump host are scanned through it, after its own key. Keys already recorded
    are kept; a different key (of any type) is refused: remove the old line first."""
    import paramiko

    from provisioner.connection import Connection, Unreachable, connect_error
    from provisioner.inventory import known_host_name
    try:
        inv = inventory(env)                   # no vault: scanning host keys needs no secret
        hosts = inv.select(limit)
    except InputError as e:
        raise fail_input(str(e)) from None
    book = _Trust(inv.known_hosts, yes)
    by_jump: dict[Jump | None, list[Host]] = {}
    for h in hosts:
        by_jump.setdefault(h.jump, []).append(h)
    failed = False
    for jump, group in by_jump.items():
        if jump is None:
            for h in group:
                failed |= not _trust_direct(book, h.name, h.address, h.port, h.connect_timeout)
            continue
        if not _trust_direct(book, jump.name, jump.address, jump.port, jump.connect_timeout):
            print(f"{', '.join(h.name for h in group)}: not scanned: reached through "
                  f"{jump.name}, which is not trusted (see above)", file=sys.stderr)
            failed = True
            continue
        with Connection(_jump_host(jump), inv.known_hosts) as conn:
            for h in group:
                name = known_host_name(h.address, h.port)
                try:
                    key = _scan(conn.tunnel(h.address, h.port, h.connect_timeout),
                                h.connect_timeout, book.types(name))
                except Unreachable as e:
                    print(f"{h.name}: cannot reach {name}: {e}", file=sys.stderr)
                    failed = True
                    continue
                except (paramiko.SSHException, EOFError, OSError) as e:
                    print(f"{h.name}: cannot reach {name} through {jump.name}: "
                          f"{connect_error(e, h.address, h.port, h.connect_timeout)}",
                          file=sys.stderr)
                    failed = True
                    continue
                failed |= not book.decide(h.name, name, key)
    if book.recorded:
        print(f"recorded {book.recorded} key(s) in {display_path(inv.known_hosts)}")
    if failed:
        raise Exit(code=EXIT_UNREACHABLE)


def _trust_direct(book: _Trust, label: str, address: str, port: int, timeout: float) -> bool:
    import paramiko

    from provisioner.connection import connect_error
    from provisioner.inventory import known_host_name
    name = known_host_name(address, port)
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
        key = _scan(sock, timeout, book.types(name))
    except (paramiko.SSHException, EOFError, OSError) as e:
        print(f"{label}: cannot reach {name}: {connect_error(e, address, port, timeout)}",
              file=sys.stderr)
        return False
    return book.decide(label, name, key)


hosts_ns = Collection("hosts", trust)

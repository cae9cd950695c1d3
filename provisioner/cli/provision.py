"""`invoke provision`, `invoke check` and `invoke hosts.trust`."""
from __future__ import annotations

import sys

import paramiko
from invoke import Collection, Exit, task

from provisioner.cli.common import FLAG_HELP, fail_input, load, run_task
from provisioner.connection import fingerprint, known_host_name
from provisioner.errors import EXIT_UNREACHABLE, InputError
from provisioner.roles import load_role
from provisioner.varchecks import check_vars

PROVISION_HELP = {**FLAG_HELP, "roles": "only these roles, comma-separated (in inventory order)"}


@task(help=PROVISION_HELP, incrementable=["verbose"])
def provision(c, env="local", limit="", roles="", check=False, diff=False, json=False, yes=False,
              serial=0, forks=50, verbose=0, detailed_exitcode=False, max_fail_percentage=0):
    """Converge servers to their roles (harden, install the stack); a second run changes nothing."""
    run_task("provision", env=env, limit=limit, check=check, diff=diff, json=json, yes=yes,
             serial=serial, forks=forks, verbose=verbose, detailed_exitcode=detailed_exitcode,
             roles=roles, max_fail_percentage=max_fail_percentage)


@task(help={"env": FLAG_HELP["env"]})
def check(c, env="local"):
    """Validate an inventory (and its roles' vars) without touching any server."""
    try:
        inv = load(env, interactive=sys.stdin.isatty())
        check_vars(inv, inv.hosts.values(), lambda role: load_role(inv.roles[role]))
    except InputError as e:
        raise fail_input(str(e)) from None
    print(f"{inv.path}: ok ({len(inv.hosts)} hosts, {len(inv.groups)} groups, "
          f"roles: {', '.join(sorted(inv.roles)) or 'none'})")


def _scan(address: str, port: int, timeout: float) -> paramiko.PKey:
    """The host key a server presents, without authenticating."""
    import socket
    sock = socket.create_connection((address, port), timeout=timeout)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=timeout)
        return t.get_remote_server_key()
    finally:
        t.close()


@task(help={"env": FLAG_HELP["env"], "limit": FLAG_HELP["limit"], "yes": "record without asking"})
def trust(c, env="local", limit="", yes=False):
    """Show each host's key fingerprint and record it in the env's known_hosts (asks unless --yes).
    Keys already recorded are kept; a changed key is refused here too: remove the old line first."""
    try:
        inv = load(env, interactive=False)
        hosts = inv.select(limit or None)
    except InputError as e:
        raise fail_input(str(e)) from None
    known = paramiko.HostKeys()
    if inv.known_hosts.exists():
        known.load(str(inv.known_hosts))
    new_lines, failed = [], False
    for h in hosts:
        name = known_host_name(h.address, h.port)
        try:
            key = _scan(h.address, h.port, h.connect_timeout)
        except Exception as e:
            print(f"{h.name}: cannot reach {name}: {e}", file=sys.stderr)
            failed = True
            continue
        have = known.lookup(name) or {}
        if key.get_name() in have:
            if have[key.get_name()] == key:
                print(f"{h.name}: already trusted ({key.get_name()} {fingerprint(key)})")
            else:
                print(f"{h.name}: HOST KEY CHANGED: known {fingerprint(have[key.get_name()])}, server "
                      f"presents {fingerprint(key)}; not recorded. If the server was really rebuilt, "
                      f"remove its line from {inv.known_hosts} and run this again.", file=sys.stderr)
                failed = True
            continue
        print(f"{h.name}: {name} presents {key.get_name()} {fingerprint(key)}")
        if not yes:
            if not sys.stdin.isatty():
                raise Exit("not a terminal: check the fingerprints above, then run again with --yes",
                           code=2)
            if input("  trust it? [y/N] ").strip().lower() not in ("y", "yes"):
                continue
        new_lines.append(f"{name} {key.get_name()} {key.get_base64()}")
    if new_lines:
        inv.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(inv.known_hosts, "a") as f:
            f.write("".join(line + "\n" for line in new_lines))
        print(f"recorded {len(new_lines)} key(s) in {inv.known_hosts}")
    if failed:
        raise Exit(code=EXIT_UNREACHABLE)


hosts_ns = Collection("hosts", trust)

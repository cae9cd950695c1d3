"""SSH key pairs derived from a vault secret, and a peer's host keys from the inventory's
known_hosts: what lets two servers trust each other (a backup host and its database server)
without a round trip between them.

Each server's role runs on its own, in parallel with the others, and sees only its own facts: a
key generated on one server could not be authorized on the other in the same run. A key pair
derived on the controller from a `!vault` seed is the same wherever it is computed, so each side
writes its half. The private key is in OpenSSH's own format, built here byte for byte because
its "check" words are random in every library that writes it (a file rewritten on every run
would never converge); here they come from the seed too."""
from __future__ import annotations

import base64
import hashlib
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provisioner.inventory import known_host_name
from provisioner.secret import Secret
from provisioner.templating import is_secret


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ssh_keypair(seed, purpose: str, comment: str) -> tuple[Secret, str]:
    """(private key file text as a Secret, public key line) of the ed25519 key derived from the
    secret `seed` for `purpose` (one seed gives a distinct key per purpose)."""
    if not is_secret(seed):
        raise TypeError("an SSH key seed must be a secret (a `!vault` value)")
    material = hashlib.sha256(b"provisioner ssh key\0" + purpose.encode() + b"\0"
                              + seed.reveal().encode()).digest()
    key = Ed25519PrivateKey.from_private_bytes(material)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = _string(b"ssh-ed25519") + _string(public)
    check = hashlib.sha256(b"check\0" + material).digest()[:4]
    private = (check + check + _string(b"ssh-ed25519") + _string(public)
               + _string(material + public) + _string(comment.encode()))
    private += bytes(range(1, 1 + (-len(private)) % 8))         # padding 1, 2, 3, ...
    body = (b"openssh-key-v1\0" + _string(b"none") + _string(b"none") + _string(b"")
            + struct.pack(">I", 1) + _string(blob) + _string(private))
    text = base64.b64encode(body).decode()
    lines = [text[i:i + 70] for i in range(0, len(text), 70)]
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines) \
        + "\n-----END OPENSSH PRIVATE KEY-----\n"
    return Secret(pem), f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def known_host_lines(known_hosts_file, address: str, port: int = 22) -> list[str]:
    """The lines of the controller's known_hosts that name `address` (the keys the provisioner
    itself trusts for that server), for a peer's known_hosts. Empty when none: the caller says
    how to record them (`invoke hosts.trust`)."""
    name = known_host_name(address, port)
    out = []
    try:
        text = open(known_hosts_file, encoding="utf-8").read()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#") and name in parts[0].split(","):
            out.append(f"{name} {parts[1]} {parts[2]}")
    return sorted(set(out))

"""paramiko's Transport as our connections use it (provisioner/connection.py has SSHClient build
it as its transport_factory): AES-GCM offered first, its thread waking as often as it is told,
and the key exchange and the login each waited for in one wait, not in paramiko's loops that
wake every 0.1 s. Imported only where a connection is made (it imports paramiko)."""
from __future__ import annotations

import threading

import paramiko
from paramiko.ssh_exception import AuthenticationException, SSHException

# paramiko's first choice of cipher, aes128-ctr, needs a MAC, which paramiko computes with a
# Python HMAC object and compares byte by byte in Python for every packet; AES-GCM (an AEAD:
# the cipher authenticates, in C) costs ~0.1 ms less CPU per exec. It goes first, the rest of
# paramiko's list follows in its order: the same ciphers are offered, a server without GCM
# (OpenSSH has it since 6.2) still gets aes*-ctr.
FIRST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class Transport(paramiko.Transport):
    """Its thread waits for packets in recv() with a timeout of `poll` seconds (paramiko: 0.1)."""

    _preferred_ciphers = tuple(c for c in FIRST_CIPHERS
                               if c in paramiko.Transport._preferred_ciphers) + \
        tuple(c for c in paramiko.Transport._preferred_ciphers if c not in FIRST_CIPHERS)

    def __init__(self, sock, poll: float = 0.1, **kwargs):
        super().__init__(sock, **kwargs)
        self.sock.settimeout(poll)

    # paramiko waits for the handshake's and the login's end in loops of Event.wait(0.1), each
    # turn ~0.1-0.3 ms of CPU on a loaded machine: several ms per host while a busy sshd takes
    # its time. Its thread sets those events when it ends too, so one wait does: what follows
    # each is paramiko's own check of how it ended.

    def start_client(self, event=None, timeout=None):
        if event is not None:
            return super().start_client(event, timeout)
        done = threading.Event()
        super().start_client(done)
        done.wait(timeout)
        if not self.active:
            e = self.get_exception()
            if e is not None:
                raise e
            raise SSHException("Negotiation failed.")

    def auth_publickey(self, username, key, event=None):
        if event is not None:
            return super().auth_publickey(username, key, event)
        done = threading.Event()
        super().auth_publickey(username, key, done)
        if not done.wait(self.auth_timeout) and self.is_active():
            raise AuthenticationException("Authentication timeout.")
        return self.auth_handler.wait_for_response(done)       # set by now: it only checks

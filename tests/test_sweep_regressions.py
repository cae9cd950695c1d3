"""Regressions of the kinds the security review found, met elsewhere in the code: input that
costs unbounded time or memory, a path checked then used after it may have become a symlink,
and text cut before redaction (a secret cut in two escapes it). Pure."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from provisioner import vault
from provisioner.cli import vault as cli
from provisioner.connection import Connection
from provisioner.remote import agent as remote
from provisioner.secret import Redactor

from engine_helpers import REPO


# --- unbounded input ----------------------------------------------------------------------

def test_an_inventory_of_nested_aliases_is_refused_quickly(tmp_path):
    """Ten levels of ten aliases are 10**10 values once expanded: the loader must stop."""
    rows = ["env: bomb", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yml").write_text("\n".join(rows) + "\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from provisioner.inventory import load_inventory_file
        from provisioner.errors import InputError
        try:
            load_inventory_file({str(tmp_path / 'bomb.yml')!r}, roles_root=[])
        except InputError as e:
            print(e)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert "expands to more than 100000 values" in out.stdout, out.stdout + out.stderr


def test_vault_set_refuses_an_endless_value(tmp_path, monkeypatch):
    class Endless(io.TextIOBase):
        def isatty(self):
            return False

        def read(self, n=-1):
            assert n > 0, "read without a bound"
            return "x" * n
    monkeypatch.setattr(sys, "stdin", Endless())
    with pytest.raises(vault.VaultError, match="longer than 1 MiB"):
        cli._read_value("big")


def test_a_huge_password_file_is_refused(tmp_path):
    f = tmp_path / "pw"
    f.write_bytes(b"p" * (vault.MAX_PASSWORD + 10))
    f.chmod(0o600)
    with pytest.raises(vault.VaultError, match="more than 4096 bytes"):
        vault._read_password_file(f, "pw")


class Flood:
    """A channel whose command never stops printing."""
    def __init__(self):
        self.sent = 0
        self.r, self.w = os.pipe()
        os.write(self.w, b"x")

    def exec_command(self, command):
        pass

    def sendall(self, data):
        pass

    def shutdown_write(self):
        pass

    def recv_ready(self):
        return True

    def recv(self, n):
        self.sent += n
        return b"y" * n

    def fileno(self):
        return self.r

    def close(self):
        os.close(self.r)
        os.close(self.w)


def test_a_server_that_floods_output_is_stopped(monkeypatch):
    monkeypatch.setattr("provisioner.connection.MAX_STDOUT", 1024 * 1024)
    host = SimpleNamespace(name="h1", address="192.0.2.10", port=22, user="root", command_timeout=30,
                           connect_timeout=5)
    conn = Connection(host, "/nonexistent")
    conn.open = lambda: None
    chan = Flood()
    conn._conn = SimpleNamespace(transport=SimpleNamespace(open_session=lambda timeout: chan))
    r = conn.run(["python3", "-c", "agent"])
    assert r.rc == 125 and b"more than 1 MiB of output" in r.stderr
    assert chan.sent < 2 * 1024 * 1024


# --- a checked path swapped for a symlink ---------------------------------------------------

@pytest.mark.parametrize("kind", ["attrs", "dir"])
def test_attributes_never_reach_the_target_of_a_path_swapped_for_a_symlink(tmp_path, monkeypatch, kind):
    victim = tmp_path / "shadow"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    path = tmp_path / "managed"
    path.mkdir() if kind == "dir" else path.write_text("x\n")
    real_lstat = os.lstat

    def lstat_then_swap(p, *a, **kw):
        st = real_lstat(p, *a, **kw)
        if str(p) == str(path):                   # what an attacker does right after our check
            (os.rmdir if kind == "dir" else os.unlink)(path)
            os.symlink(victim, path)
        return st
    monkeypatch.setattr(remote.os, "lstat", lstat_then_swap)
    step = {kind: str(path), "mode": "0777", "owner": None, "group": None}
    with pytest.raises(remote.StepError, match="changed meanwhile"):
        (remote.step_attrs if kind == "attrs" else remote.step_dir)(step, [])
    assert stat.S_IMODE(real_lstat(victim).st_mode) == 0o600


# --- text cut before redaction ---------------------------------------------------------------

def test_output_is_cut_at_a_line_start_so_a_secret_is_whole_or_absent():
    secret = "Sk-Live-8f2a91c0d3"
    redactor = Redactor()
    redactor.register(secret)
    for pad in range(0, 40):
        text = "a" * 50 + "\n" + "b" * pad + f"token={secret}\n" + "c" * (remote.TAIL - 10) + "\n"
        shown = redactor.redact(remote._tail(text))
        assert not any(secret[i:] in shown for i in range(len(secret) - 3)), (pad, shown[:80])

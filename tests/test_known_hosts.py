"""Each connection reads only its server's entries of known_hosts (connection.host_keys_for),
and finds exactly what paramiko's own HostKeys.load of the whole file would."""
from __future__ import annotations

import paramiko
import pytest

from provisioner.connection import host_keys_for


def _key_line(names: str, key: paramiko.PKey) -> str:
    return f"{names} {key.get_name()} {key.get_base64()}"


@pytest.fixture(scope="module")
def keys() -> list[paramiko.PKey]:
    return [paramiko.Ed25519Key.from_private_key(_ed25519()) for _ in range(4)] + \
        [paramiko.ECDSAKey.generate()]


def _ed25519():
    import io

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())
    return io.StringIO(pem.decode())


def test_only_the_servers_entries_and_the_same_answers_as_paramiko(tmp_path, keys):
    hashed = paramiko.HostKeys.hash_host("10.0.0.2")
    lines = ["# a comment", "",
             _key_line("10.0.0.1,web1", keys[0]),
             _key_line(hashed, keys[1]),
             _key_line("[10.0.0.3]:2222", keys[2]),
             _key_line("10.0.0.30", keys[3]),               # not 10.0.0.3
             _key_line("10.0.0.1", keys[4]),                # a second type for 10.0.0.1
             *(_key_line(f"10.1.{i // 250}.{i % 250}", keys[i % 4]) for i in range(300))]
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    whole = paramiko.HostKeys(str(path))
    for host, port in (("10.0.0.1", 22), ("10.0.0.2", 22), ("10.0.0.3", 2222), ("10.0.0.3", 22),
                       ("web1", 22), ("10.9.9.9", 22)):
        name = host if port == 22 else f"[{host}]:{port}"
        mine = host_keys_for(path, host, port)
        want = whole.lookup(name)
        got = mine.lookup(name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert {t: k.asbytes() for t, k in got.items()} == \
                {t: k.asbytes() for t, k in want.items()}, name
        assert len(mine) <= 2, "only this server's entries"


def test_a_changed_file_is_read_again_and_a_missing_one_is_empty(tmp_path, keys):
    path = tmp_path / "known_hosts"
    assert len(host_keys_for(path, "10.0.0.1", 22)) == 0
    path.write_text(_key_line("10.0.0.1", keys[0]) + "\n")
    assert host_keys_for(path, "10.0.0.1", 22).lookup("10.0.0.1")["ssh-ed25519"].asbytes() == \
        keys[0].asbytes()
    path.write_text(_key_line("10.0.0.1", keys[1]) + "\n" + _key_line("10.0.0.9", keys[2]) + "\n")
    assert host_keys_for(path, "10.0.0.1", 22).lookup("10.0.0.1")["ssh-ed25519"].asbytes() == \
        keys[1].asbytes()

"""The vault: format, errors, atomic writes, password lookup, and the vault.* tasks."""
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection, Program

from provisioner import secret as secret_mod
from provisioner import vault
from provisioner.cli import vault as cli
from provisioner.secret import Redactor, Secret
from provisioner.vault import (
    Argon2idParams, ScryptParams, VaultError, decrypt, encrypt, load_vault, open_env_vault,
    save_vault, vault_path,
)

# cheap KDF costs for tests only; the defaults are checked separately
FAST_SCRYPT = ScryptParams(n=2**4, r=1, p=1)
FAST_ARGON = Argon2idParams(memory_kib=64, iterations=1, lanes=1)
PW = "correct horse battery staple"
VALUE = "pg-Pa55w0rd-e3b0c442"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # a private registry: the short test values must not mask output in other tests
    monkeypatch.setattr(secret_mod, "REDACTOR", Redactor())
    for var in (vault.PASSWORD_ENV, vault.PASSWORD_FILE_ENV, vault.NEW_PASSWORD_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(vault, "default_kdf", lambda: FAST_SCRYPT)
    monkeypatch.setattr(vault, "_tty_available", lambda: False)   # never hang on a prompt


@pytest.fixture
def root(tmp_path):
    (tmp_path / "inventories").mkdir()
    return tmp_path


def _header(path: Path) -> str:
    return path.read_text().splitlines()[0]


# --- format ------------------------------------------------------------------------------

@pytest.mark.parametrize("kdf", [FAST_SCRYPT, FAST_ARGON], ids=["scrypt", "argon2id"])
def test_round_trip(root, kdf):
    if isinstance(kdf, Argon2idParams) and not vault.argon2id_available():
        pytest.skip("argon2id not supported by this cryptography build")
    path = vault_path("prod", root)
    data = {"db_password": VALUE, "pem": "-----BEGIN-----\nabc\n-----END-----\n",
            "unicode": "pässwörd ✓"}
    save_vault(path, data, PW, kdf=kdf)
    got = load_vault(path, PW)
    assert all(isinstance(v, Secret) for v in got.values())
    assert {k: v.reveal() for k, v in got.items()} == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.isascii() and VALUE not in text
    fields = _header(path).split(";")
    assert fields[:4] == ["$PROVISIONER_VAULT", "1", kdf.kdf_id, kdf.encode()]
    assert fields[5] == "aes-256-gcm"


def test_each_write_uses_a_fresh_salt_and_nonce(root):
    a, b = encrypt({"x": "y"}, PW, kdf=FAST_SCRYPT), encrypt({"x": "y"}, PW, kdf=FAST_SCRYPT)
    assert a != b
    assert a.splitlines()[0].split(b";")[4] != b.splitlines()[0].split(b";")[4]


def test_size_does_not_reveal_exact_lengths():
    short = encrypt({"x": "a"}, PW, kdf=FAST_SCRYPT)
    longer = encrypt({"x": "a" * 100}, PW, kdf=FAST_SCRYPT)
    assert len(short) == len(longer)


def test_defaults_are_strong_and_reading_follows_the_file(monkeypatch):
    monkeypatch.undo()           # the real default_kdf
    monkeypatch.setattr(secret_mod, "REDACTOR", Redactor())     # still a private registry
    kdf = vault.default_kdf()
    if isinstance(kdf, Argon2idParams):
        assert kdf.memory_kib >= 64 * 1024 and kdf.iterations >= 3
    else:
        assert kdf.n >= 2**17 and kdf.r >= 8
    # a file written with other parameters is read with its own
    blob = encrypt({"k": "v"}, PW, kdf=ScryptParams(n=2**5, r=2, p=1))
    assert decrypt(blob, PW) == {"k": "v"}


def test_names_follow_the_inventory_rule(root):
    for bad in ("bad name", "-x", "_x", "a/b", ""):
        with pytest.raises(VaultError, match="invalid secret name"):
            save_vault(vault_path("prod", root), {bad: "x"}, PW)
    save_vault(vault_path("prod", root), {"db.password": "x", "api-key_2": "y"}, PW)
    with pytest.raises(VaultError, match="must be a string"):
        save_vault(vault_path("prod", root), {"n": 1}, PW)      # type: ignore[dict-item]


def test_env_names_cannot_escape_inventories(root):
    for env in ("../etc", "a/b", "", ".hidden", "Prod"):
        with pytest.raises(VaultError, match="invalid environment name"):
            vault_path(env, root)


# --- wrong password, tampering -----------------------------------------------------------

WRONG = "wrong vault password for inventories/prod.vault, or the file was modified"


def test_wrong_password_says_so_clearly(root, monkeypatch):
    path = vault_path("prod", root)
    save_vault(path, {"db_password": VALUE}, PW, kdf=FAST_SCRYPT)
    with pytest.raises(VaultError) as e:
        load_vault(path, "not the password", display="inventories/prod.vault")
    assert str(e.value) == WRONG
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert e.value.exit_code == 2
    monkeypatch.setenv(vault.PASSWORD_ENV, "also wrong")
    with pytest.raises(VaultError, match="^wrong vault password for inventories/prod.vault, or"):
        open_env_vault("prod", root, interactive=False)


def _tamper(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert old in blob
    return blob.replace(old, new, 1)


def _flip_char(line: str, i: int) -> str:
    c = line[i]
    return line[:i] + ("A" if c != "A" else "B") + line[i + 1:]


def test_tampered_ciphertext_is_rejected(root):
    blob = encrypt({"db_password": VALUE}, PW, kdf=FAST_SCRYPT)
    lines = blob.decode().splitlines()
    lines[1] = _flip_char(lines[1], 10)
    with pytest.raises(VaultError) as e:
        decrypt(("\n".join(lines) + "\n").encode(), PW, display="inventories/prod.vault")
    assert str(e.value) == WRONG
    # a truncated body too
    with pytest.raises(VaultError):
        decrypt(("\n".join(lines[:2]) + "\n").encode(), PW)


def test_tampered_header_is_rejected(root):
    blob = encrypt({"db_password": VALUE}, PW, kdf=FAST_SCRYPT)
    header = blob.decode().splitlines()[0]
    fields = header.split(";")
    salt, nonce = fields[4], fields[6]
    tampered = [
        _tamper(blob, b"n=16,r=1,p=1", b"n=32,r=1,p=1"),              # KDF parameters
        _tamper(blob, salt.encode(), _flip_char(salt, 3).encode()),     # salt
        _tamper(blob, nonce.encode(), _flip_char(nonce, 3).encode()),   # nonce
    ]
    for bad in tampered:
        with pytest.raises(VaultError) as e:
            decrypt(bad, PW, display="inventories/prod.vault")
        assert str(e.value) == WRONG
    malformed = [
        _tamper(blob, b"scrypt", b"bcrypt"),
        _tamper(blob, b"aes-256-gcm", b"aes-128-gcm"),
        _tamper(blob, b"$PROVISIONER_VAULT", b"$SOMETHING_ELSE"),
        _tamper(blob, b";1;", b";0;"),
        _tamper(blob, b"n=16,r=1,p=1", b"r=1,n=16,p=1"),
        _tamper(blob, b"n=16", b"n=15"),                             # not a power of two
        b"\x00\x01binary",
        b"",
    ]
    for bad in malformed:
        with pytest.raises(VaultError, match="not a valid vault file"):
            decrypt(bad, PW, display="inventories/prod.vault")


def test_newer_format_asks_for_an_upgrade():
    blob = _tamper(encrypt({}, PW, kdf=FAST_SCRYPT), b"$PROVISIONER_VAULT;1;",
                   b"$PROVISIONER_VAULT;2;")
    with pytest.raises(VaultError, match="upgrade provisioner"):
        decrypt(blob, PW)


def test_crafted_header_cannot_demand_huge_memory():
    blob = _tamper(encrypt({}, PW, kdf=FAST_SCRYPT), b"n=16,r=1,p=1", b"n=1073741824,r=8,p=1")
    with pytest.raises(VaultError, match="out of bounds"):
        decrypt(blob, PW)


@pytest.mark.parametrize("kdf, params", [
    ("argon2id", "m=1048576,t=64,p=4"),          # 1 GiB, 64 passes: minutes of work
    ("argon2id", "m=4194304,t=1,p=4"),           # 4 GiB of memory
    ("scrypt", "n=1048576,r=8,p=64"),            # 1 GiB, 64 times over
])
def test_crafted_header_cannot_demand_unbounded_work(kdf, params):
    # refused before any key derivation: the test would take minutes (or the machine's
    # memory) if the parameters were followed
    if kdf == "argon2id":
        header = f"$PROVISIONER_VAULT;1;argon2id;{params};"
        blob = _tamper(encrypt({}, PW, kdf=FAST_ARGON), b"$PROVISIONER_VAULT;1;argon2id;m=64,t=1,p=1;",
                       header.encode()) if vault.argon2id_available() else None
    else:
        blob = _tamper(encrypt({}, PW, kdf=FAST_SCRYPT), b"n=16,r=1,p=1", params.encode())
    with pytest.raises(ValueError, match="out of bounds"):
        vault._KDFS[kdf].decode(params)
    if blob is not None:
        with pytest.raises(VaultError, match="out of bounds"):
            decrypt(blob, PW)


def test_default_costs_are_within_the_bounds():
    for kdf in (Argon2idParams(), ScryptParams()):
        assert type(kdf).decode(kdf.encode()) == kdf


# --- atomic writes -----------------------------------------------------------------------

def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync", "encrypt"])
def test_failed_write_leaves_the_old_file_intact(root, monkeypatch, failing):
    path = vault_path("prod", root)
    save_vault(path, {"db_password": "old"}, PW, kdf=FAST_SCRYPT)
    before, names = path.read_bytes(), _siblings(path)

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")
    # only the failure is undone after: monkeypatch.undo() would also give the process-wide
    # redactor back, and "old" loaded below would then be masked in every later test's output
    with monkeypatch.context() as m:
        if failing == "encrypt":
            from cryptography.hazmat.primitives.ciphers import aead
            m.setattr(aead.AESGCM, "encrypt", boom)
        else:
            m.setattr(vault.os, failing.split(".")[1], boom)
        with pytest.raises((VaultError, OSError)) as e:
            save_vault(path, {"db_password": "new"}, PW, kdf=FAST_SCRYPT)
    if isinstance(e.value, VaultError):
        assert "unchanged" in str(e.value)
    assert path.read_bytes() == before
    assert _siblings(path) == names                       # no temp file left behind
    assert load_vault(path, PW)["db_password"].reveal() == "old"


def test_interrupted_write_cleans_its_temp_file(root, monkeypatch):
    path = vault_path("prod", root)
    monkeypatch.setattr(vault.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_vault(path, {"a": "b"}, PW, kdf=FAST_SCRYPT)
    assert _siblings(path) == []


# --- passwords ---------------------------------------------------------------------------

def test_password_from_env_var(root, monkeypatch):
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    assert vault.get_password("prod", root, interactive=False) == PW
    monkeypatch.setenv(vault.PASSWORD_ENV, "")
    with pytest.raises(VaultError, match="set but empty"):
        vault.get_password("prod", root, interactive=False)


def test_password_file_from_env_var_must_be_private(root, tmp_path, monkeypatch):
    file = tmp_path / "pw"
    file.write_text(PW + "\n")
    file.chmod(0o600)
    monkeypatch.setenv(vault.PASSWORD_FILE_ENV, str(file))
    assert vault.get_password("prod", root, interactive=False) == PW    # newline stripped
    file.chmod(0o644)
    with pytest.raises(VaultError, match=r"mode 0644.*chmod 600"):
        vault.get_password("prod", root, interactive=False)
    monkeypatch.setenv(vault.PASSWORD_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(VaultError, match="does not exist"):
        vault.get_password("prod", root, interactive=False)


def test_env_var_wins_over_password_files(root, tmp_path, monkeypatch):
    file = tmp_path / "pw"
    file.write_text("from-file")
    file.chmod(0o600)
    monkeypatch.setenv(vault.PASSWORD_FILE_ENV, str(file))
    monkeypatch.setenv(vault.PASSWORD_ENV, "from-env")
    assert vault.get_password("prod", root, interactive=False) == "from-env"


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@needs_git
def test_inventory_password_file_must_be_git_ignored(root):
    _git(root, "init", "-q")
    file = vault.password_file_path("prod", root)
    file.write_text(PW)
    file.chmod(0o600)
    with pytest.raises(VaultError, match="not git-ignored"):
        vault.get_password("prod", root, interactive=False)
    (root / ".gitignore").write_text("inventories/*.vault-password\n")
    assert vault.get_password("prod", root, interactive=False) == PW
    file.chmod(0o640)
    with pytest.raises(VaultError, match="chmod 600"):
        vault.get_password("prod", root, interactive=False)


def test_inventory_password_file_outside_git_is_used(root):
    if subprocess.run(["git", "-C", str(root), "rev-parse"], capture_output=True).returncode == 0:
        pytest.skip("the temp dir is inside a git checkout")
    file = vault.password_file_path("prod", root)
    file.write_text(PW + "\r\n")
    file.chmod(0o600)
    assert vault.get_password("prod", root, interactive=False) == PW


def test_non_interactive_without_password_says_how_to_provide_it(root):
    with pytest.raises(VaultError) as e:
        vault.get_password("prod", root, interactive=False)
    msg = str(e.value)
    for way in (vault.PASSWORD_ENV, vault.PASSWORD_FILE_ENV, "inventories/prod.vault-password",
                "0600"):
        assert way in msg


def test_interactive_prompt_without_echo(root, monkeypatch):
    monkeypatch.setattr(vault, "_tty_available", lambda: True)
    prompts = []
    monkeypatch.setattr(vault.getpass, "getpass", lambda p: prompts.append(p) or PW)
    assert vault.get_password("prod", root, interactive=True) == PW
    assert prompts == ["Vault password for inventories/prod.vault: "]
    # --yes / non-interactive never prompts, even with a terminal
    with pytest.raises(VaultError, match="non-interactive"):
        vault.get_password("prod", root, interactive=False)


def test_new_password_twice_must_match(monkeypatch):
    monkeypatch.setattr(vault, "_tty_available", lambda: True)
    answers = iter(["one", "two"])
    monkeypatch.setattr(vault.getpass, "getpass", lambda p: next(answers))
    with pytest.raises(VaultError, match="differ"):
        vault.get_new_password("prod", interactive=True)
    monkeypatch.setenv(vault.NEW_PASSWORD_ENV, "new-one")
    assert vault.get_new_password("prod", interactive=False) == "new-one"


def test_open_env_vault(root, monkeypatch):
    assert open_env_vault("prod", root, interactive=False) == {}       # no vault: no password
    save_vault(vault_path("prod", root), {"db_password": VALUE}, PW, kdf=FAST_SCRYPT)
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    secrets = open_env_vault("prod", root, interactive=False)
    assert secrets["db_password"].reveal() == VALUE
    assert secret_mod.REDACTOR.redact(f"PGPASSWORD={VALUE}") == "PGPASSWORD=***"


# --- the vault.* tasks -------------------------------------------------------------------

@pytest.fixture
def run(root, monkeypatch, capsys):
    """Run ``invoke vault.<task> ...`` in-process against ``root``: (exit code, out, err)."""
    monkeypatch.setattr(cli, "repo_root", lambda: root)
    top = Collection()
    top.add_collection(cli.ns)

    def _run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = 0
        try:
            Program(namespace=top, version="test").run(["invoke", *argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err
    return _run


def test_cli_set_then_view_never_prints_values_without_reveal(run, root, monkeypatch):
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    code, out, err = run("vault.set", "db_password", "--env", "prod", stdin=VALUE + "\n")
    assert code == 0, err
    assert "added db_password" in out
    assert run("vault.set", "api_key", "--env", "prod", stdin="k-123")[0] == 0
    code, out, err = run("vault.view", "--env", "prod")
    assert code == 0
    assert out.split() == ["api_key", "db_password"]
    assert VALUE not in out + err
    code, out, err = run("vault.set", "db_password", "--env", "prod", stdin="changed\n")
    assert "updated db_password" in out and "changed" not in out + err
    saved = load_vault(vault_path("prod", root), PW)
    assert saved["db_password"].reveal() == "changed"            # one trailing newline stripped


def test_cli_view_reveal_warns(run, root, monkeypatch):
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    save_vault(vault_path("prod", root), {"db_password": VALUE, "b": "x"}, PW, kdf=FAST_SCRYPT)
    code, out, err = run("vault.view", "--env", "prod", "--reveal")
    assert code == 0
    assert json.loads(out) == {"db_password": VALUE, "b": "x"}
    assert "warning" in err and VALUE not in err
    code, out, _ = run("vault.view", "--env", "prod", "--reveal", "--name", "db_password")
    assert out == VALUE + "\n"
    code, out, _ = run("vault.view", "--env", "prod", "--name", "db_password")
    assert out == "db_password\n"


def test_cli_errors_are_one_line_exit_2(run, root, monkeypatch):
    code, out, err = run("vault.view", "--env", "prod")
    assert code == 2 and "vault.create --env prod" in err
    save_vault(vault_path("prod", root), {"db_password": VALUE}, PW, kdf=FAST_SCRYPT)
    code, out, err = run("vault.view", "--env", "prod")
    assert code == 2 and "non-interactive" in err and vault.PASSWORD_ENV in err
    monkeypatch.setenv(vault.PASSWORD_ENV, "wrong")
    code, out, err = run("vault.set", "db_password", "--env", "prod", stdin="new-value")
    assert code == 2
    assert err.strip() == f"error: {WRONG}"
    assert "Traceback" not in err and VALUE not in out + err
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    code, _, err = run("vault.set", "db_password", "--env", "prod", stdin="")
    assert code == 2 and "empty value" in err
    code, _, err = run("vault.set", "bad/name", "--env", "prod", stdin="x")
    assert code == 2 and "invalid secret name" in err
    assert load_vault(vault_path("prod", root), PW)["db_password"].reveal() == VALUE


def test_cli_create_and_unset(run, root, monkeypatch):
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    assert run("vault.create", "--env", "staging")[0] == 0
    assert load_vault(vault_path("staging", root), PW) == {}
    code, _, err = run("vault.create", "--env", "staging")
    assert code == 2 and "already exists" in err
    run("vault.set", "a", "--env", "staging", stdin="1")
    code, out, _ = run("vault.unset", "a", "--env", "staging")
    assert code == 0 and "removed a" in out
    assert run("vault.unset", "a", "--env", "staging")[0] == 2


def test_cli_rekey(run, root, monkeypatch):
    path = vault_path("prod", root)
    save_vault(path, {"db_password": VALUE}, PW, kdf=FAST_SCRYPT)
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    code, _, err = run("vault.rekey", "--env", "prod")
    assert code == 2 and vault.NEW_PASSWORD_ENV in err            # no terminal to ask on
    monkeypatch.setenv(vault.NEW_PASSWORD_ENV, "the new one")
    code, out, err = run("vault.rekey", "--env", "prod")
    assert code == 0, err
    with pytest.raises(VaultError):
        load_vault(path, PW)
    assert load_vault(path, "the new one")["db_password"].reveal() == VALUE


EDITOR = r'''
import json, os, stat, sys
path = sys.argv[1]
record = {"path": path, "mode": stat.S_IMODE(os.stat(path).st_mode),
          "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)}
open(os.environ["EDITOR_RECORD"], "w").write(json.dumps(record))
action = os.environ["EDITOR_ACTION"]
if action == "fail":
    sys.exit(3)
if action == "garbage":
    open(path, "w").write("{not json")
    sys.exit(0)
if action == "duplicate":
    open(path, "w").write('{"db_password": "first-value-1", "db_password": "second-value-2"}')
    sys.exit(0)
data = json.load(open(path))
data["new_key"] = "new-value-123"
data.pop("remove_me")
data["db_password"] = "edited-value-456"
json.dump(data, open(path, "w"))
'''


@pytest.fixture
def editor(tmp_path, monkeypatch):
    script = tmp_path / "editor.py"
    script.write_text(EDITOR)
    record = tmp_path / "record.json"
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    monkeypatch.setenv("EDITOR_RECORD", str(record))

    def _use(action: str) -> Path:
        monkeypatch.setenv("EDITOR_ACTION", action)
        return record
    return _use


def test_cli_edit(run, root, monkeypatch, editor):
    path = vault_path("prod", root)
    save_vault(path, {"db_password": VALUE, "remove_me": "x", "keep": "k"}, PW, kdf=FAST_SCRYPT)
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    record = editor("edit")
    code, out, err = run("vault.edit", "--env", "prod")
    assert code == 0, err
    assert "added: new_key; changed: db_password; removed: remove_me" in out
    for value in (VALUE, "new-value-123", "edited-value-456"):
        assert value not in out + err
    seen = json.loads(record.read_text())
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert not os.path.exists(seen["path"])
    assert not os.path.exists(os.path.dirname(seen["path"]))        # temp dir gone
    got = {k: v.reveal() for k, v in load_vault(path, PW).items()}
    assert got == {"db_password": "edited-value-456", "keep": "k", "new_key": "new-value-123"}


@pytest.mark.parametrize("action", ["fail", "garbage", "duplicate"])
def test_cli_edit_failure_saves_nothing_and_removes_the_temp_file(run, root, monkeypatch,
                                                                   editor, action):
    path = vault_path("prod", root)
    save_vault(path, {"db_password": VALUE, "remove_me": "x"}, PW, kdf=FAST_SCRYPT)
    before = path.read_bytes()
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    record = editor(action)
    code, out, err = run("vault.edit", "--env", "prod")
    assert code == 2 and "nothing saved" in err
    assert VALUE not in out + err
    assert path.read_bytes() == before
    seen = json.loads(record.read_text())
    assert not os.path.exists(os.path.dirname(seen["path"]))


def test_cli_edit_refuses_a_name_given_twice(run, root, monkeypatch, editor):
    path = vault_path("prod", root)
    save_vault(path, {"db_password": VALUE, "remove_me": "x"}, PW, kdf=FAST_SCRYPT)
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    editor("duplicate")
    code, out, err = run("vault.edit", "--env", "prod")
    assert code == 2
    assert "'db_password' is given twice" in err and "nothing saved" in err
    assert "first-value-1" not in out + err and "second-value-2" not in out + err
    assert load_vault(path, PW)["db_password"].reveal() == VALUE


def test_two_vault_set_at_once_keep_both_secrets(root, monkeypatch, capsys):
    """Both commands read the vault before either writes: each must still see the other's
    secret. The barrier holds both inside the (slow, in real life) encryption, which is where
    the race was; with the lock the second one waits before it reads, and the barrier gives up."""
    import threading
    monkeypatch.setattr(cli, "repo_root", lambda: root)
    monkeypatch.setenv(vault.PASSWORD_ENV, PW)
    save_vault(vault_path("prod", root), {"first": "1"}, PW, kdf=FAST_SCRYPT)
    values = {"alpha": "alpha-value", "beta": "beta-value"}
    monkeypatch.setattr(cli, "_read_value", lambda name: values[name])
    barrier = threading.Barrier(2, timeout=1.0)
    real_encrypt = vault.encrypt

    def slow_encrypt(*args, **kwargs):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return real_encrypt(*args, **kwargs)
    monkeypatch.setattr(vault, "encrypt", slow_encrypt)
    errors = []

    def set_one(name):
        try:
            cli.set_.body(None, name, env="prod")
        except BaseException as e:                # Exit is a BaseException
            errors.append(e)
    threads = [threading.Thread(target=set_one, args=(n,)) for n in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    out = capsys.readouterr().out
    assert "added alpha" in out and "added beta" in out
    got = {k: v.reveal() for k, v in load_vault(vault_path("prod", root), PW).items()}
    assert got == {"first": "1", **values}

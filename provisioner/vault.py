"""Encrypted secrets per environment: ``inventories/<env>.vault``.

A vault holds a flat mapping ``name -> str``; :func:`load_vault` hands the values back as
:class:`~provisioner.secret.Secret` (which also registers them for redaction).

File format (version 1), ASCII text so that git treats it as text and ``head -1`` tells what
it is::

    $PROVISIONER_VAULT;1;argon2id;m=65536,t=3,p=4;<salt>;aes-256-gcm;<nonce>
    <ciphertext+tag, base64, 64 characters a line>
    ...

* Line 1 is the header, ``;``-separated, fixed order: magic, format version, KDF id, KDF
  parameters, salt (base64), AEAD id, nonce (base64). Parsing is strict: any other field,
  order, KDF, cipher or bound is refused.
* KDF ``argon2id`` (``m`` = memory in KiB, ``t`` = iterations, ``p`` = lanes; default
  64 MiB, 3, 4) when this ``cryptography`` build supports it, else ``scrypt`` (``n``, ``r``,
  ``p``; default 2**17, 8, 1: 128 MiB). Reading always follows the parameters in the file, so
  defaults can grow without breaking old vaults; ``rekey`` rewrites with the current defaults.
  Parameters read from a file are bounded (at most 1 GiB of memory and 4 GiB x passes of
  work) so a crafted file cannot exhaust the machine before the tag check fails. The password is NFC-normalised, then UTF-8.
* AEAD ``aes-256-gcm`` with a random 96-bit nonce under a key from a fresh random 128-bit
  salt on every write. The whole header line (its exact bytes) is the associated data, so a
  change to any header field, salt or nonce fails authentication like a change to the body.
* Plaintext: a JSON object of names to strings, keys sorted, padded with spaces to a multiple
  of 256 bytes so that the file size does not reveal the exact length of the secrets.

Every write re-encrypts everything (new salt and nonce), so a git diff of a vault shows the
whole body changed: that is inherent to an encrypted file and nothing to worry about.

Writes are atomic: a temp file (mode 0600) in the same directory, fsync, ``os.replace``, fsync
of the directory. A failure at any point leaves the previous vault untouched. A change reads,
modifies and replaces the file under :func:`locked` (an exclusive ``flock`` on
``.<env>.vault.lock`` beside it), so two commands at once never lose each other's secret.

Password lookup (:func:`get_password`): ``PROVISIONER_VAULT_PASSWORD``, then the file named by
``PROVISIONER_VAULT_PASSWORD_FILE``, then ``inventories/<env>.vault-password`` (which must be
git-ignored), then a no-echo prompt on the terminal. Password files must be regular files
readable by their owner only (no group/other bits: 0600 or 0400); one trailing newline is
stripped.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import getpass
import json
import os
import re
import stat
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# cryptography is imported where a vault is encrypted or opened: the vault commands' names and
# help, and the tasks that need no secret, start without loading it

from provisioner.secret import Secret

__all__ = [
    "VaultError", "Argon2idParams", "ScryptParams", "default_kdf", "encrypt", "decrypt",
    "load_vault", "save_vault", "vault_path", "password_file_path", "get_password",
    "get_new_password", "configured_password", "open_env_vault", "open_env_vault_later",
    "validate_name", "validate_env", "PASSWORD_ENV", "PASSWORD_FILE_ENV", "NEW_PASSWORD_ENV",
]

MAGIC = "$PROVISIONER_VAULT"
FORMAT_VERSION = 1
CIPHER = "aes-256-gcm"
PASSWORD_ENV = "PROVISIONER_VAULT_PASSWORD"
PASSWORD_FILE_ENV = "PROVISIONER_VAULT_PASSWORD_FILE"
NEW_PASSWORD_ENV = "PROVISIONER_NEW_VAULT_PASSWORD"

_SALT_BYTES = 16
_NONCE_BYTES = 12
_KEY_BYTES = 32
_PAD_TO = 256
_LINE = 64
# what a KDF read from a file may ask for: a crafted header must not cost more than a few
# seconds and 1 GiB before the tag check can fail (the defaults cost 64-128 MiB, one pass)
_MAX_MEMORY = 1024**3               # bytes
_MAX_WORK = 4 * 1024**3             # bytes x passes (argon2id: m x t; scrypt: 128 n r x p)
MAX_PASSWORD = 4096                 # bytes of a vault password (files, prompts)
MAX_VALUE = 1024 * 1024             # bytes of one secret given to vault.set
MAX_VAULT_FILE = 64 * 1024 * 1024   # bytes of a vault file read
_LOCK_WAIT = 60.0                   # seconds another vault command may hold the lock
# the same rules as inventory.py's `!vault NAME` and environment names, so that whatever an
# inventory can reference, the vault can hold (kept here: the vault does not import inventory)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_ENV_RE = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit"


try:
    from provisioner.errors import InputError as _BadInput
except ImportError:             # pragma: no cover - keeps this module usable on its own
    class _BadInput(Exception):  # type: ignore[no-redef]
        exit_code = 2


class VaultError(_BadInput):
    """Bad input around a vault: wrong password, modified or unreadable file, no password.

    An ``InputError`` (exit code 2). The message is meant for the user as is; it never
    contains a secret value.
    """

    exit_code = 2            # EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- KDFs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Argon2idParams:
    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4
    kdf_id = "argon2id"

    def encode(self) -> str:
        return f"m={self.memory_kib},t={self.iterations},p={self.lanes}"

    @classmethod
    def decode(cls, text: str) -> Argon2idParams:
        v = _parse_params(text, ("m", "t", "p"))
        m, t, p = v["m"], v["t"], v["p"]
        if not (1 <= p <= 64 and 1 <= t <= 64 and 8 * p <= m and m * 1024 <= _MAX_MEMORY
                and m * 1024 * t <= _MAX_WORK):
            raise ValueError(f"argon2id parameters out of bounds: {text}")
        return cls(m, t, p)

    def derive(self, password: bytes, salt: bytes) -> bytes:
        return self.kdf(salt).derive(password)

    def kdf(self, salt: bytes):
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
        return Argon2id(salt=salt, length=_KEY_BYTES, iterations=self.iterations,
                        lanes=self.lanes, memory_cost=self.memory_kib)


@dataclass(frozen=True)
class ScryptParams:
    n: int = 2**17
    r: int = 8
    p: int = 1
    kdf_id = "scrypt"

    def encode(self) -> str:
        return f"n={self.n},r={self.r},p={self.p}"

    @classmethod
    def decode(cls, text: str) -> ScryptParams:
        v = _parse_params(text, ("n", "r", "p"))
        n, r, p = v["n"], v["r"], v["p"]
        if not (n > 1 and n & (n - 1) == 0 and 1 <= r <= 64 and 1 <= p <= 64
                and 128 * n * r <= _MAX_MEMORY and 128 * n * r * p <= _MAX_WORK):
            raise ValueError(f"scrypt parameters out of bounds: {text}")
        return cls(n, r, p)

    def derive(self, password: bytes, salt: bytes) -> bytes:
        return self.kdf(salt).derive(password)

    def kdf(self, salt: bytes):
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
        return Scrypt(salt=salt, length=_KEY_BYTES, n=self.n, r=self.r, p=self.p)


KdfParams = Argon2idParams | ScryptParams
_KDFS: dict[str, type[Argon2idParams] | type[ScryptParams]] = {
    "argon2id": Argon2idParams, "scrypt": ScryptParams}


def _parse_params(text: str, keys: tuple[str, ...]) -> dict[str, int]:
    parts = text.split(",")
    if len(parts) != len(keys):
        raise ValueError(f"expected parameters {','.join(k + '=' for k in keys)}, got {text!r}")
    out: dict[str, int] = {}
    for part, key in zip(parts, keys):
        name, sep, value = part.partition("=")
        if name != key or not sep or not value.isdigit() or len(value) > 12:
            raise ValueError(f"bad KDF parameter {part!r} (expected {key}=<number>)")
        out[key] = int(value)
    return out


@lru_cache(maxsize=1)
def argon2id_available() -> bool:
    from cryptography.exceptions import UnsupportedAlgorithm
    try:
        Argon2idParams(memory_kib=8, iterations=1, lanes=1).derive(b"probe", b"\0" * 16)
    except (ImportError, UnsupportedAlgorithm):
        return False
    return True


def default_kdf() -> KdfParams:
    """The strong default: Argon2id (64 MiB) where available, else scrypt (128 MiB)."""
    return Argon2idParams() if argon2id_available() else ScryptParams()


# --- names -------------------------------------------------------------------------------

def validate_name(name: str) -> str:
    """Secret names follow the inventory's `!vault NAME` rule."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise VaultError(f"invalid secret name {name!r}: use {_NAME_RULE}")
    return name


def validate_env(env: str) -> str:
    if not isinstance(env, str) or not _ENV_RE.match(env):
        raise VaultError(f"invalid environment name {env!r}: use lowercase letters, digits, "
                         "'-' and '_'")
    return env


def _check_mapping(data: Mapping, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise VaultError(f"{where}: invalid secret name {name!r}: use {_NAME_RULE}")
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise VaultError(f"{where}: the value of {name} must be a string, "
                             f"not {type(value).__name__}")
        out[name] = value
    return out


def load_json_object(text: str | bytes) -> object:
    """json.loads, refusing a name given twice (json keeps the last one silently)."""
    def pairs(items: list) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                raise VaultError(f"the name {key!r} is given twice; keep one of them")
            out[key] = value
        return out
    return json.loads(text, object_pairs_hook=pairs)


# --- encryption (pure) -------------------------------------------------------------------

def encrypt(data: Mapping[str, str | Secret], password: str, *,
            kdf: KdfParams | None = None) -> bytes:
    """The vault file's bytes for ``data`` under ``password``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    values = _check_mapping(data, "vault")
    kdf = kdf or default_kdf()
    salt, nonce = os.urandom(_SALT_BYTES), os.urandom(_NONCE_BYTES)
    header = ";".join([MAGIC, str(FORMAT_VERSION), kdf.kdf_id, kdf.encode(),
                       _b64(salt), CIPHER, _b64(nonce)]).encode("ascii")
    plain = json.dumps(values, sort_keys=True, ensure_ascii=False).encode("utf-8")
    plain += b" " * (-len(plain) % _PAD_TO)
    key = kdf.derive(_password_bytes(password), salt)
    body = _b64(AESGCM(key).encrypt(nonce, plain, header))
    lines = [header.decode("ascii")] + [body[i:i + _LINE] for i in range(0, len(body), _LINE)]
    return ("\n".join(lines) + "\n").encode("ascii")


def decrypt(blob: bytes, password: str, *, display: str = "vault") -> dict[str, str]:
    """The mapping inside a vault file's bytes. Raises VaultError, never InvalidTag."""
    return _decrypt_later(blob, password, display)()


def _decrypt_later(blob: bytes, password: str, display: str) -> Callable[[], dict[str, str]]:
    """decrypt in two halves: the file is checked now and its key derived in a thread; the
    function returned waits for the key and decrypts (a wrong password is its VaultError).
    cryptography 50 and later release the GIL while a KDF runs (Argon2id: ~0.15 s of CPU), so
    the caller's own work until the call runs beside it; with older ones the caller waits as
    it would have. The thread makes that one call into cryptography and nothing else: no
    import (two threads importing one package can see it half-initialised)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def invalid(why: str) -> VaultError:
        return VaultError(f"{display} is not a valid vault file: {why}")

    try:
        text = blob.decode("ascii")
    except UnicodeDecodeError:
        raise invalid("it is not ASCII text") from None
    lines = text.splitlines()
    if not lines or not lines[0].startswith(MAGIC + ";"):
        raise invalid(f"it does not start with {MAGIC}")
    header_line = lines[0]
    fields = header_line.split(";")
    if len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) > FORMAT_VERSION:
        raise VaultError(f"{display} uses vault format {fields[1]}; this provisioner reads "
                         f"format {FORMAT_VERSION}: upgrade provisioner")
    if len(fields) != 7:
        raise invalid("the header must have 7 ';'-separated fields")
    _, version, kdf_id, kdf_text, salt_text, cipher, nonce_text = fields
    if version != str(FORMAT_VERSION):
        raise invalid(f"unknown format version {version!r}")
    if kdf_id not in _KDFS:
        raise invalid(f"unknown KDF {kdf_id!r}")
    if cipher != CIPHER:
        raise invalid(f"unknown cipher {cipher!r}")
    try:
        kdf = _KDFS[kdf_id].decode(kdf_text)
        salt = _unb64(salt_text)
        nonce = _unb64(nonce_text)
        body = _unb64("".join(line.strip() for line in lines[1:]))
    except ValueError as e:
        raise invalid(str(e)) from None
    if not 16 <= len(salt) <= 64:
        raise invalid("bad salt length")
    if len(nonce) != _NONCE_BYTES:
        raise invalid("bad nonce length")
    if len(body) < 16:
        raise invalid("the encrypted body is missing or truncated")
    if kdf_id == "argon2id" and not argon2id_available():
        raise VaultError(f"{display} uses argon2id, which this cryptography/OpenSSL build "
                         "does not support")

    derive = kdf.kdf(salt).derive
    password_bytes = _password_bytes(password)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault-kdf")
    key = pool.submit(derive, password_bytes)
    pool.shutdown(wait=False)                    # its thread ends with its one job

    def finish() -> dict[str, str]:
        try:
            plain = AESGCM(key.result()).decrypt(nonce, body, header_line.encode("ascii"))
        except InvalidTag:
            raise VaultError(f"wrong vault password for {display}, or the file was modified") \
                from None
        try:
            data = load_json_object(plain.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise invalid("the decrypted content is not JSON") from None
        if not isinstance(data, dict):
            raise invalid("the decrypted content is not a JSON object")
        return _check_mapping(data, display)
    return finish


def _password_bytes(password: str | Secret) -> bytes:
    if isinstance(password, Secret):
        password = password.reveal()
    if not isinstance(password, str) or not password:
        raise VaultError("the vault password must not be empty")
    return unicodedata.normalize("NFC", password).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("bad base64") from None


# --- files -------------------------------------------------------------------------------

def _display(path: Path) -> str:
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path)


def load_vault(path: str | os.PathLike, password: str, *,
               display: str | None = None) -> dict[str, Secret]:
    """Decrypt the vault at ``path``: name -> Secret (registered for redaction)."""
    return _load_vault_later(path, password, display)()


def _load_vault_later(path: str | os.PathLike, password: str,
                      display: str | None) -> Callable[[], dict[str, Secret]]:
    """load_vault in two halves, as _decrypt_later."""
    path = Path(path)
    display = display or _display(path)
    try:
        blob = read_vault_bytes(path)
    except FileNotFoundError:
        raise VaultError(f"no vault at {display}") from None
    except OSError as e:
        raise VaultError(f"cannot read {display}: {e.strerror}") from None
    opened = _decrypt_later(blob, password, display)
    return lambda: {name: Secret(value) for name, value in sorted(opened().items())}


def read_vault_bytes(path: Path) -> bytes:
    """The vault file's bytes; refused past MAX_VAULT_FILE (a vault is kilobytes)."""
    with open(path, "rb") as f:
        blob = f.read(MAX_VAULT_FILE + 1)
    if len(blob) > MAX_VAULT_FILE:
        raise VaultError(f"{_display(path)} is larger than {MAX_VAULT_FILE >> 20} MiB: not a vault")
    return blob


def save_vault(path: str | os.PathLike, data: Mapping[str, str | Secret], password: str, *,
               kdf: KdfParams | None = None, display: str | None = None) -> None:
    """Encrypt ``data`` into ``path`` atomically (mode 0600). On failure the old file stays."""
    path = Path(path)
    blob = encrypt(data, password, kdf=kdf)
    try:
        _atomic_write(path, blob)
    except OSError as e:
        raise VaultError(f"cannot write {display or _display(path)}: {e.strerror or e}; "
                         "the previous file, if any, is unchanged") from None


def _atomic_write(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):           # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def locked(path: str | os.PathLike, wait: float = _LOCK_WAIT):
    """Hold the vault's lock (flock on a file beside it: the vault itself is replaced by
    rename, so it cannot carry the lock) from reading the vault to replacing it."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VaultError(f"another vault command has held {_display(lock)} for "
                                     f"{wait:.0f} s; wait for it to finish and run this again") \
                        from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)                 # closing releases the lock


def vault_path(env: str, root: str | os.PathLike) -> Path:
    return Path(root) / "inventories" / f"{validate_env(env)}.vault"


def password_file_path(env: str, root: str | os.PathLike) -> Path:
    return Path(root) / "inventories" / f"{validate_env(env)}.vault-password"


# --- passwords ---------------------------------------------------------------------------

def _how_to_provide(env: str) -> str:
    return (f"set {PASSWORD_ENV}; or set {PASSWORD_FILE_ENV} to a file (mode 0600) that "
            f"holds it; or put it in inventories/{env}.vault-password (mode 0600, git-ignored)")


def _read_password_file(path: Path, display: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise VaultError(f"vault password file {display} does not exist") from None
    except OSError as e:
        raise VaultError(f"cannot read vault password file {display}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise VaultError(f"vault password file {display} is not a regular file")
        if st.st_mode & 0o077:
            raise VaultError(
                f"vault password file {display} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. "
                f"Run: chmod 600 {display}")
        raw = f.read(MAX_PASSWORD + 3)
    if len(raw) > MAX_PASSWORD + 2:                          # + a final CRLF
        raise VaultError(f"vault password file {display} holds more than {MAX_PASSWORD} bytes: "
                         "it is not a password file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VaultError(f"vault password file {display} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise VaultError(f"vault password file {display} is empty")
    return text


def _git_ignored(path: Path, root: Path) -> bool | None:
    """True if git ignores ``path``, False if not (or it is tracked), None if not in a repo."""
    try:
        rel = path.relative_to(root)
        proc = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--", str(rel)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, ValueError, subprocess.SubprocessError):
        # no git to ask: only a checkout we cannot check is a risk
        return False if (root / ".git").exists() else None
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        return False
    return None if not (root / ".git").exists() else False


def configured_password(env: str, root: str | os.PathLike) -> str | None:
    """The password from the environment or a password file, or None if none is configured."""
    root = Path(root)
    if PASSWORD_ENV in os.environ:
        value = os.environ[PASSWORD_ENV]
        if not value:
            raise VaultError(f"{PASSWORD_ENV} is set but empty")
        return value
    if os.environ.get(PASSWORD_FILE_ENV):
        file = Path(os.environ[PASSWORD_FILE_ENV]).expanduser()
        return _read_password_file(file, str(file))
    file = password_file_path(env, root)
    if file.exists():
        display = f"inventories/{file.name}"
        if _git_ignored(file, root) is False:
            raise VaultError(
                f"{display} is not git-ignored (or is tracked by git); refusing to use it. "
                f"Add 'inventories/*.vault-password' to .gitignore (and "
                f"`git rm --cached {display}` if it was committed; then change the password)")
        return _read_password_file(file, display)
    return None


def _tty_available() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def get_password(env: str, root: str | os.PathLike, interactive: bool) -> str:
    """The vault password for ``env``: env var, password file, then a no-echo prompt."""
    root = Path(root)
    validate_env(env)
    password = configured_password(env, root)
    if password is not None:
        return password
    if not interactive or not _tty_available():
        raise VaultError(f"no password for inventories/{env}.vault and no one to ask "
                         f"(non-interactive). Provide it: {_how_to_provide(env)}")
    try:
        password = getpass.getpass(f"Vault password for inventories/{env}.vault: ")
    except (EOFError, KeyboardInterrupt):
        raise VaultError("no vault password given") from None
    if not password:
        raise VaultError("the vault password must not be empty")
    return password


def get_new_password(env: str, interactive: bool, *, env_var: str = NEW_PASSWORD_ENV) -> str:
    """A new password: from ``env_var`` if set, else prompted for twice on the terminal."""
    if env_var in os.environ:
        value = os.environ[env_var]
        if not value:
            raise VaultError(f"{env_var} is set but empty")
        return value
    if not interactive or not _tty_available():
        raise VaultError(f"a new vault password is needed for inventories/{env}.vault and "
                         f"there is no terminal to ask on: set {env_var}")
    try:
        first = getpass.getpass(f"New vault password for inventories/{env}.vault: ")
        if not first:
            raise VaultError("the vault password must not be empty")
        second = getpass.getpass("Repeat the new vault password: ")
    except (EOFError, KeyboardInterrupt):
        raise VaultError("no vault password given") from None
    if first != second:
        raise VaultError("the two passwords differ; nothing changed")
    return first


def open_env_vault(env: str, root: str | os.PathLike, interactive: bool) -> dict[str, Secret]:
    """The secrets of ``env`` ({} if it has no vault). Asks for a password only if needed."""
    return open_env_vault_later(env, root, interactive)()


def open_env_vault_later(env: str, root: str | os.PathLike,
                         interactive: bool) -> Callable[[], dict[str, Secret]]:
    """open_env_vault in two halves (see _decrypt_later): the password is found (or asked
    for) and the file checked now, its key derived in a thread; the function returned waits
    for it and decrypts (a wrong password is its VaultError)."""
    path = vault_path(env, root)
    if not path.exists():
        return dict
    password = get_password(env, root, interactive)
    return _load_vault_later(path, password, f"inventories/{path.name}")

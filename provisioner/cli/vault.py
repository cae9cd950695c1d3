"""``invoke vault.*``: manage the encrypted secrets of an environment (inventories/<env>.vault).

    invoke vault.create --env prod               # a new, empty vault (asks for a password twice)
    invoke vault.view --env prod                 # names only
    invoke vault.view --env prod --reveal [--name db_password]   # values, with a warning
    printf %s "$VALUE" | invoke vault.set db_password --env prod  # or a no-echo prompt
    invoke vault.unset db_password --env prod
    invoke vault.edit --env prod                 # $VISUAL / $EDITOR on a private temp file
    invoke vault.rekey --env prod                # new password, asked twice
                                                 # (or PROVISIONER_NEW_VAULT_PASSWORD)

Values are never taken from the command line (shell history, ``ps``). Errors end the task
with a one-line message and exit code 2, never a traceback.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from invoke import Collection, task
from invoke.exceptions import Exit

import provisioner
from provisioner import vault
from provisioner.vault import VaultError

T = TypeVar("T")
ENV_HELP = "environment: uses inventories/<env>.vault (default: local)"


def repo_root() -> Path:
    """The checkout: the parent of the ``provisioner`` package."""
    return Path(provisioner.__file__).resolve().parent.parent


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except VaultError as e:
        raise Exit(f"error: {e}", code=getattr(e, "exit_code", 2)) from None
    except KeyboardInterrupt:
        raise Exit("interrupted; nothing saved", code=130) from None


def _interactive() -> bool:
    return vault._tty_available()


def _display(env: str) -> str:
    return f"inventories/{env}.vault"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _open(env: str) -> tuple[Path, str, dict[str, str], bytes]:
    """(path, password, plain values, file bytes) of an existing vault."""
    root = repo_root()
    path = vault.vault_path(env, root)
    if not path.exists():
        raise VaultError(f"there is no {_display(env)}; create it with "
                         f"`invoke vault.create --env {env}`")
    password = vault.get_password(env, root, _interactive())
    blob = vault.read_vault_bytes(path)
    values = vault.decrypt(blob, password, display=_display(env))
    return path, password, values, blob


def _password_for_new_vault(env: str) -> str:
    if vault.NEW_PASSWORD_ENV in os.environ:
        return vault.get_new_password(env, False)
    configured = vault.configured_password(env, repo_root())
    if configured is not None:
        return configured
    return vault.get_new_password(env, _interactive())


def _save(path: Path, env: str, values: dict[str, str], password: str, blob: bytes | None) -> None:
    """Save unless someone else changed the file since we read ``blob`` (for a whole-vault
    rewrite: edit, rekey). The check and the replace happen under the vault's lock."""
    with vault.locked(path):
        if _current(path) != blob:
            raise VaultError(f"{_display(env)} was changed by someone else meanwhile; nothing "
                             "saved, run the command again")
        vault.save_vault(path, values, password, display=_display(env))


def _current(path: Path) -> bytes | None:
    try:
        return vault.read_vault_bytes(path)
    except FileNotFoundError:
        return None


def _update(path: Path, env: str, password: str, change: Callable[[dict[str, str]], T]) -> T:
    """Apply ``change`` to the vault's values as they are now and save: read, change and
    replace under the vault's lock, so that a concurrent command's secret is never lost."""
    with vault.locked(path):
        blob = _current(path)
        values = {} if blob is None else vault.decrypt(blob, password, display=_display(env))
        result = change(values)
        vault.save_vault(path, values, password, display=_display(env))
        return result


@task(help={"env": ENV_HELP})
def create(c, env="local"):
    """Create an empty vault for an environment."""
    with _errors():
        vault.validate_env(env)
        path = vault.vault_path(env, repo_root())
        if path.exists():
            raise VaultError(f"{_display(env)} already exists")
        password = _password_for_new_vault(env)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, env, {}, password, None)          # refuses if one appeared meanwhile
        print(f"created {_display(env)}")


@task(help={"env": ENV_HELP,
            "reveal": "print the values too (JSON), not only the names",
            "name": "only this secret; with --reveal its raw value"})
def view(c, env="local", reveal=False, name=None):
    """List the secret names of an environment; values only with --reveal."""
    with _errors():
        _, _, values, _ = _open(env)
        if name is not None:
            vault.validate_name(name)
            if name not in values:
                raise VaultError(f"{_display(env)} has no secret named {name}")
            values = {name: values[name]}
        if not reveal:
            for key in sorted(values):
                print(key)
            if not values:
                _err(f"{_display(env)} holds no secrets")
            return
        _err(f"warning: printing secret values from {_display(env)}; "
             "keep them out of logs and scrollback")
        if name is not None:
            value = values[name]
            sys.stdout.write(value if value.endswith("\n") else value + "\n")
        else:
            print(json.dumps(values, indent=2, sort_keys=True, ensure_ascii=False))
        sys.stdout.flush()


def _read_value(name: str) -> str:
    if sys.stdin is None:
        raise VaultError(f"no value for {name}: pipe it on stdin")
    if sys.stdin.isatty():
        try:
            value = getpass.getpass(f"Value for {name} (not echoed): ")
            if value and getpass.getpass(f"Repeat the value for {name}: ") != value:
                raise VaultError("the two values differ; nothing changed")
        except EOFError:
            raise VaultError(f"no value for {name}") from None
    else:
        value = sys.stdin.read(vault.MAX_VALUE + 3)
        if len(value) > vault.MAX_VALUE + 2:                 # + a final CRLF
            raise VaultError(f"the value for {name} is longer than {vault.MAX_VALUE >> 20} MiB; "
                             "nothing changed (a vault holds passwords and keys, not files)")
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    if not value:
        raise VaultError(f"empty value for {name}; nothing changed "
                         "(remove a secret with vault.unset)")
    return value


@task(name="set", positional=["name"],
      help={"env": ENV_HELP, "name": "the secret's name (letters, digits, _ . -)"})
def set_(c, name, env="local"):
    """Set one secret; the value comes from stdin or a no-echo prompt, never the command line."""
    with _errors():
        vault.validate_env(env)
        vault.validate_name(name)
        path = vault.vault_path(env, repo_root())
        if path.exists():
            path, password, _, _ = _open(env)       # a wrong password fails before the prompt
        else:
            _err(f"{_display(env)} does not exist yet; creating it")
            password = _password_for_new_vault(env)
            path.parent.mkdir(parents=True, exist_ok=True)
        value = _read_value(name)

        def put(values: dict[str, str]) -> bool:
            existed = name in values
            values[name] = value
            return existed
        existed = _update(path, env, password, put)
        print(f"{'updated' if existed else 'added'} {name} in {_display(env)}")


@task(positional=["name"], help={"env": ENV_HELP, "name": "the secret to remove"})
def unset(c, name, env="local"):
    """Remove one secret."""
    with _errors():
        vault.validate_name(name)
        path, password, _, _ = _open(env)

        def remove(values: dict[str, str]) -> None:
            if name not in values:
                raise VaultError(f"{_display(env)} has no secret named {name}")
            del values[name]
        _update(path, env, password, remove)
        print(f"removed {name} from {_display(env)}")


def _private_dir() -> str:
    shm = "/dev/shm"                     # RAM-backed where available: nothing lands on disk
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    return tempfile.mkdtemp(prefix="provisioner-vault-", dir=base)     # mode 0700


def _shred_tree(top: str) -> None:
    """Overwrite every file under ``top`` with zeros, then remove it all. Best effort:
    journaling and copy-on-write filesystems may keep old blocks; hence /dev/shm first."""
    for dirpath, _, files in os.walk(top):
        for f in files:
            p = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):
                size = os.lstat(p).st_size
                fd = os.open(p, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    os.write(fd, b"\0" * size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
    import shutil
    shutil.rmtree(top, ignore_errors=True)


def _editor() -> list[str]:
    command = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    return shlex.split(command)


def _parse_edited(text: str) -> dict[str, str]:
    try:
        data = vault.load_json_object(text)
    except json.JSONDecodeError as e:
        # the message names a position, not the content
        raise VaultError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(data, dict):
        raise VaultError("the file must hold one JSON object of name: value")
    return vault._check_mapping(data, "edited vault")


def _ask_again(problem: VaultError) -> bool:
    _err(f"error: {problem}")
    if not (sys.stdin and sys.stdin.isatty()):
        return False
    try:
        answer = input("Edit again? [Y/n] ").strip().lower()
    except EOFError:
        return False
    return answer in ("", "y", "yes")


@task(help={"env": ENV_HELP})
def edit(c, env="local"):
    """Edit all secrets as JSON in $VISUAL / $EDITOR (a 0600 file, shredded afterwards)."""
    with _errors():
        path, password, values, blob = _open(env)
        tmpdir = _private_dir()
        try:
            file = os.path.join(tmpdir, f"{env}.vault.json")
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(values, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            while True:
                try:
                    rc = subprocess.call([*_editor(), file])
                except OSError as e:
                    raise VaultError(f"cannot run the editor {_editor()[0]!r}: {e.strerror}; "
                                     "set VISUAL or EDITOR") from None
                if rc != 0:
                    raise VaultError(f"the editor exited with status {rc}; nothing saved")
                with open(file, encoding="utf-8") as f:
                    text = f.read()
                try:
                    new = _parse_edited(text)
                    break
                except VaultError as problem:
                    if not _ask_again(problem):
                        raise VaultError("nothing saved") from None
        finally:
            _shred_tree(tmpdir)
        if new == values:
            print(f"no changes to {_display(env)}")
            return
        _save(path, env, new, password, blob)
        added = sorted(new.keys() - values.keys())
        removed = sorted(values.keys() - new.keys())
        changed = sorted(k for k in new.keys() & values.keys() if new[k] != values[k])
        parts = [f"{label}: {', '.join(names)}" for label, names in
                 (("added", added), ("changed", changed), ("removed", removed)) if names]
        print(f"saved {_display(env)} ({'; '.join(parts)})")


@task(help={"env": ENV_HELP})
def rekey(c, env="local"):
    """Re-encrypt with a new password (asked twice, or PROVISIONER_NEW_VAULT_PASSWORD).

    The file is rewritten with the current default KDF parameters too.
    """
    with _errors():
        path, _, values, blob = _open(env)
        new_password = vault.get_new_password(env, _interactive())
        _save(path, env, values, new_password, blob)
        print(f"rekeyed {_display(env)}; now update the password wherever it is kept "
              f"({vault.PASSWORD_ENV} in CI, inventories/{env}.vault-password, ...)")


ns = Collection("vault")
for _t in (create, view, set_, unset, edit, rekey):
    ns.add_task(_t)

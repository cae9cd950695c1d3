"""Secrets of the `local` environment, made per machine: the testbed is a throwaway environment,
so its vault (`inventories/local.vault`) and the vault's password file are generated here, kept
out of git, and hold a random value for every `!vault NAME` the local inventory refers to. Values
already there are kept, so changing a secret by hand (`invoke vault.set --env local ...`) sticks.
"""
from __future__ import annotations

import os
import secrets as random

from provisioner.errors import InputError
from provisioner.inventory import load_inventory
from provisioner.vault import load_vault, password_file_path, save_vault, vault_path

from .config import REPO, TestbedError

ENV = "local"


def ensure_local_vault(log) -> list[str]:
    """Create or top up the local vault; returns the names it added."""
    try:
        names = load_inventory(ENV, root=REPO).vault_refs()
    except InputError as e:
        raise TestbedError(f"inventories/{ENV}.yml is not valid:\n{e}") from None
    pw_file = password_file_path(ENV, REPO)
    path = vault_path(ENV, REPO)
    if not pw_file.exists():
        if path.exists():
            raise TestbedError(f"{path} exists but {pw_file} does not: remove the vault to have a "
                               "new one generated, or put its password in that file (mode 0600)")
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(random.token_urlsafe(32) + "\n")
    password = pw_file.read_text().strip()
    have = {k: v.reveal() for k, v in load_vault(path, password).items()} if path.exists() else {}
    missing = sorted(set(names) - set(have))
    if missing or not path.exists():
        have.update({name: random.token_urlsafe(24) for name in missing})
        save_vault(path, have, password)
        if missing:
            log(f"generated local secrets: {', '.join(missing)} (in {path.name})")
    return missing

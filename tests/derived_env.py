"""Envs made from inventories/local.yml for the duration of a `with`: the same servers and vault
under another env name, with a few edits of its text (each such env's files are in .gitignore).
Each edit is checked to apply, so a change to local.yml fails loudly instead of quietly making
an env like local."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
INVENTORIES = REPO / "inventories"

# env localnb: local without the pgbackrest role, so its deploys take a pg_dump before
# migrating (tests/test_deploy_live.py); nothing to provision: only the deploy reads it
NO_BACKUPS = "localnb"
NO_BACKUP_EDITS = (("env: local", f"env: {NO_BACKUPS}"),
                   ("roles: [base, harden, postgresql, redis, pgbackrest]",
                    "roles: [base, harden, postgresql, redis]"),
                   ("roles: [base, harden, pgbackrest, restic]", "roles: [base, harden, restic]"))


def derived_text(edits) -> str:
    text = (INVENTORIES / "local.yml").read_text()
    for old, new in edits:
        assert old in text, f"inventories/local.yml changed: {old!r} is not in it"
        text = text.replace(old, new, 1)
    return text


@contextmanager
def derived_env(env: str, edits) -> Iterator[str]:
    """inventories/<env>.yml from local.yml with `edits` ((old, new) pairs; the first names
    the env), and copies of local's vault and its password file; all removed afterwards."""
    made = [INVENTORIES / f"{env}.yml"]
    made[0].write_text(derived_text(edits))
    try:
        for suffix in (".vault", ".vault-password"):
            if (INVENTORIES / f"local{suffix}").exists():
                shutil.copy2(INVENTORIES / f"local{suffix}", INVENTORIES / f"{env}{suffix}")
                made.append(INVENTORIES / f"{env}{suffix}")
        yield env
    finally:
        for path in made:
            path.unlink(missing_ok=True)

"""The benchmark's own virtual environment for the peers: ansible-core and pyinfra, pinned,
installed with pip from its configured index, in bench/peers/.venv (git-ignored), never into
the product's environment. Made once; made again when the pins change.

ansible-core 2.19 is the newest line that runs on Python 3.11 (2.20 needs 3.12), the oldest
Python the product supports: one pin for every machine that runs the product.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

PINS = ("ansible-core==2.19.14", "pyinfra==3.10.0")
HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
STAMP = "provisioner-peers-pins.txt"      # what is installed, written after pip succeeded


def bin_path(name: str, root: Path = VENV) -> Path:
    return root / "bin" / name


def install_argv(root: Path = VENV) -> list[str]:
    return [str(bin_path("python", root)), "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check", *PINS]


def current(root: Path = VENV) -> bool:
    """Whether `root` holds exactly the pinned versions."""
    stamp = root / STAMP
    return stamp.is_file() and stamp.read_text().split() == list(PINS)


def ensure(root: Path = VENV, log=print) -> Path:
    """The venv with the pins installed (made or updated first when needed)."""
    if current(root):
        return root
    log(f"peers venv: installing {', '.join(PINS)} into {root} (once)")
    if not bin_path("python", root).exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
    subprocess.run(install_argv(root), check=True)
    (root / STAMP).write_text("\n".join(PINS) + "\n")
    return root


def versions(root: Path = VENV) -> dict[str, str]:
    """What the venv's tools say they are (for the benchmark's header)."""
    out = {}
    for tool, argv in (("pyinfra", [str(bin_path("pyinfra", root)), "--version"]),
                       ("ansible-core", [str(bin_path("ansible", root)), "--version"])):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        out[tool] = (r.stdout.strip().splitlines() or ["?"])[0]
    out["python"] = sys.version.split()[0]
    return out

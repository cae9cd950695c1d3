"""read_yaml parses with libyaml where PyYAML has it, and with PyYAML's Python parser where
libyaml refuses a file: the data and line numbers are the same either way, and errors keep the
Python parser's messages, which name the character or alias at fault."""
from __future__ import annotations

from pathlib import Path

import pytest

from provisioner import yamlfile

REPO = Path(__file__).resolve().parents[1]
YAML_FILES = sorted([*REPO.glob("inventories/*.yml"), *REPO.glob("roles/*/defaults.yml")])


def _read(path: Path, fast: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(yamlfile, "_FAST_LOADER", yamlfile._FAST_LOADER if fast else None)
    problems: list = []
    doc = yamlfile.read_yaml(path, problems)
    return (doc.data, doc.lines, doc.raw_bools, doc.broken) if doc else None, [str(p) for p in problems]


@pytest.mark.skipif(yamlfile._FAST_LOADER is None, reason="PyYAML built without libyaml")
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_both_parsers_read_the_repo_s_yaml_alike(path, monkeypatch):
    assert _read(path, True, monkeypatch) == _read(path, False, monkeypatch)


@pytest.mark.parametrize("text, says", [
    ("a: *nope\n", "found undefined alias 'nope'"),
    ("x: @foo\n", "found character '@' that cannot start any token"),
    ("a: 1\n\tb: 2\n", "found character '\\t' that cannot start any token"),
])
def test_a_broken_file_gets_the_python_parser_s_message(tmp_path, monkeypatch, text, says):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    fast = _read(path, True, monkeypatch)
    assert fast == _read(path, False, monkeypatch)
    assert fast[0] is None and says in fast[1][0]

"""Which server systems a run accepts: pure."""
from __future__ import annotations

import pytest

from provisioner import platforms


@pytest.mark.parametrize("version", ["12", "13"])
def test_debian_12_and_13_are_supported(version):
    assert platforms.unsupported({"id": "debian", "version_id": version}) is None


@pytest.mark.parametrize("facts, said", [
    ({"id": "debian", "version_id": "11"}, "Debian 11 is not supported"),
    ({"id": "ubuntu", "version_id": "24.04"}, "ubuntu 24.04 is not supported"),
    ({}, "an unknown system ? is not supported"),
])
def test_anything_else_is_refused_naming_what_is_supported(facts, said):
    why = platforms.unsupported(facts)
    assert why.startswith(said)
    assert "Debian 12 (bookworm), Debian 13 (trixie)" in why and "--limit" in why

"""Diffs of files that carry secrets show no secret text, not even one nobody knows any more
(removed from the inventory and the vault, still in the file on the server). Pure."""
from __future__ import annotations

from provisioner.facts import FileFact
from provisioner.ops import _base as b
from provisioner.secret import Secret
from provisioner.templating import Rendered, render

from engine_helpers import REPO

OLD = "module.exports = {\n  env: {\n    NODE_ENV: \"production\",\n    STRIPE_KEY: \"sk_live_51Hx8Qp\",\n  },\n};\n"


def _old(mode="0600", content=OLD):
    return FileFact("/srv/shop/ecosystem.config.js", True, "file", mode, "app", "app", "x", content)


def test_a_secret_removed_from_a_secret_bearing_file_is_not_shown(tmp_path):
    (tmp_path / "eco.j2").write_text(
        "module.exports = {\n  env: {\n    NODE_ENV: \"production\",\n    DB: \"{{ db }}\",\n  },\n};\n")
    new = render("eco.j2", {"db": Secret("pg-pass-8812", register=False)}, root=tmp_path)
    diff = b.file_diff("/srv/shop/ecosystem.config.js", _old(mode="0644"), new)
    assert "sk_live_51Hx8Qp" not in diff
    assert '-    STRIPE_KEY: ***' in diff and '+    DB: "***",' in diff
    assert "pg-pass-8812" not in diff


def test_a_private_file_hides_removed_values_even_with_no_secret_left():
    new = Rendered.plain("module.exports = {\n  env: {\n    NODE_ENV: \"production\",\n  },\n};\n")
    diff = b.file_diff("/srv/shop/ecosystem.config.js", _old(mode="0600"), new)
    assert "sk_live_51Hx8Qp" not in diff and "-    STRIPE_KEY: ***" in diff


def test_a_public_file_without_secrets_shows_its_whole_diff():
    new = Rendered.plain("Port 2222\n")
    diff = b.file_diff("/etc/ssh/sshd_config", _old(mode="0644", content="Port 22\n"), new)
    assert "-Port 22\n+Port 2222\n" in diff

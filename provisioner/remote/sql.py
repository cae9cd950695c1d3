"""SQL quoting for the PostgreSQL statements we build, on the controller (role postgresql) and on
servers (the deploy helper's restore point: provisioner/releases.py sends it ahead of that
script)."""


def sql_literal(text):
    """`text` as a standard SQL string literal."""
    return "'" + text.replace("'", "''") + "'"

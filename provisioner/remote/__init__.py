"""Code that runs on the server (stdlib only). See agent.py.

with_helpers() runs on the controller: it ships a helper shared by scripts that each run on a
server as one file (one copy of the helper in the repo, a copy in each script sent)."""


def with_helpers(source: str, *helpers) -> str:
    """`source` with the source of each of `helpers` ahead of its code, after its leading
    comment lines (a #! line must stay first). A helper is self-contained (its own imports).
    Line numbers in a traceback from the server are off by the helpers' lines."""
    import inspect
    lines = source.splitlines(keepends=True)
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    shared = "".join(inspect.getsource(fn) + "\n\n" for fn in helpers)
    return "".join(lines[:head]) + shared + "".join(lines[head:])

"""Files rendered from Jinja2 templates (templates/<src>, see provisioner/templating.py).

    templates.template(path, src, vars=None, mode="0644", owner="root", group="root",
                       validate=None, notify=(), after=())

Rendering happens when the resource is built, so a missing variable (StrictUndefined) or a
template error is bad input reported before any server is touched. The file gets the real
secret values; the diff shows them as ***.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from provisioner import templating
from provisioner.ops import files
from provisioner.ops.files import File  # noqa: F401  (the resource type)


def template(path: str, src: str, vars: Mapping[str, Any] | None = None, *,
             mode: str | int | None = "0644", owner: str | None = "root",
             group: str | None = "root", validate: str | Sequence[str] | None = None,
             notify: Sequence[str] | str = (), after: Sequence[Sequence[str]] = (),
             root: str | Path | None = None) -> File:
    rendered = templating.render(src, vars or {}, root=root)
    f = files.file(path, rendered, mode=mode, owner=owner, group=group, validate=validate,
                   notify=notify, after=after)
    return dataclasses.replace(f, kind="template", src=src)

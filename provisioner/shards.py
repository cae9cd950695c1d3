"""`--shard k/n`: a stable part of the hosts, for a CI matrix of n jobs.

A host's shard comes from a hash of its name alone, so it never moves when hosts are added,
removed or reordered (a CI job keeps its hosts from run to run), and the n shards together hold
every host exactly once. The parts are even on average, not exactly: 500 hosts in 10 shards
give about 50 each.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence, TypeVar

from provisioner.errors import InputError, Problem

T = TypeVar("T")
_FORM = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse(text: str) -> tuple[int, int]:
    """"3/10" -> (3, 10); InputError naming the flag and the fix otherwise."""
    m = _FORM.fullmatch(str(text))
    k, n = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not m or n < 1 or not 1 <= k <= n:
        raise InputError(Problem("command line", None, "--shard",
                                 f"expected k/n with 1 <= k <= n, got {text!r}",
                                 "pass e.g. --shard 1/10 (the first of 10 shards)"))
    return k, n


def shard_of(name: str, n: int) -> int:
    """The shard (1..n) that host `name` is in."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h % n + 1


def pick(hosts: Sequence[T], k: int, n: int, name=lambda h: h.name) -> list[T]:
    """The hosts of shard k of n, in their given order."""
    return [h for h in hosts if shard_of(name(h), n) == k]

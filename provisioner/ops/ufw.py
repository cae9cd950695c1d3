"""The ufw firewall as ONE resource: default policies, the whole ordered list of incoming rules,
and whether the firewall is on.

    ufw.firewall(rules, incoming="deny", outgoing="allow", routed="deny", enabled=True)
    ufw.rule(action, port=None, proto="any", src="any", comment=None)

A rule is a `ufw.rule(...)` or a mapping {action, port?, proto?, from?, comment?}:
  action   allow | deny | reject | limit (limit: ufw's rate limit, 6 new connections in 30 s
           per source address, then REJECT)
  port     22, "8000:8100" (a range needs proto tcp or udp), or None for every port
  proto    tcp | udp | any
  from     "any", an address or a network ("10.77.0.1", "10.0.0.0/8", "fd00::/8"); a network
           with host bits set is refused (write 10.0.0.0/8, not 10.1.2.3/8)
  comment  shown by `ufw status`
Order is meaning: ufw stops at the first rule that matches a packet, so e.g. "allow the
controller" must come before "limit everyone else" on the SSH port. A rule from "any" applies
to IPv4 and IPv6 (when /etc/default/ufw has IPV6=yes); a rule from an address only to its
family. Two rules for the same (proto, port, from) are refused: ufw keeps one rule per match,
so the second would overwrite the first.

Facts (no command output parsing, all from files ufw itself writes): /etc/ufw/user.rules and
user6.rules (one `### tuple ### action proto dport dst sport src in [comment=hex]` line per
rule, in order), /etc/default/ufw (DEFAULT_*_POLICY, IPV6), /etc/ufw/ufw.conf (ENABLED), and
the read-only check `iptables -n -L ufw-user-input` (the rules are loaded: exit 0).

Plan (pure): per address family, the rules that match the wanted list from the top are kept;
the ones after them are deleted (`ufw --force delete N`, highest number first, IPv6 ones
first since they are numbered after the IPv4 ones) and the wanted rest is appended in order
(`ufw <action> [proto P] from SRC to any [port N] [comment C]`). A rule the server already
has in one family is skipped by ufw itself ("Skipping adding existing rule"). Then default
policies (`ufw default deny incoming` ...) and `ufw --force enable` when the firewall is off
or its rules are not loaded. Established connections (the provisioner's own) survive all of
this: ufw's before.rules accept ESTABLISHED traffic ahead of the user rules.

Add before delete: with `keep_open=[22]` (role harden passes its SSH ports), a change that
deletes rules first appends `allow proto tcp from any port 1:65535 to any port 22` (a rule no
wanted rule can collide with: ufw tells rules apart by their source port too), and deletes it
last, by its spec. A failure in between leaves SSH open, never closed under default deny; the
next run removes the leftover like any unwanted rule.

Anything else in the user rule files (rules added by hand, `route`/`out` rules, app rules) is
not wanted and is deleted: the resource owns the whole rule set.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts, check_key
from provisioner.ops import _base as b
from provisioner.remote.agent import edit_lines

USER_RULES = "/etc/ufw/user.rules"
USER6_RULES = "/etc/ufw/user6.rules"
DEFAULTS = "/etc/default/ufw"
CONF = "/etc/ufw/ufw.conf"
LOADED_CHECK = ("iptables", "-n", "-L", "ufw-user-input")

ACTIONS = ("allow", "deny", "reject", "limit")
PROTOS = ("tcp", "udp", "any")
POLICY_WORDS = {"deny": "DROP", "allow": "ACCEPT", "reject": "REJECT"}
POLICY_KEYS = {"incoming": "DEFAULT_INPUT_POLICY", "outgoing": "DEFAULT_OUTPUT_POLICY",
               "routed": "DEFAULT_FORWARD_POLICY"}
COMMENT_RE = re.compile(r"^[A-Za-z0-9 _.,:/@()+=#-]{1,100}\Z")
TUPLE_RE = re.compile(r"^### tuple ###\s*(.*?)\s*$")


@dataclass(frozen=True)
class Rule:
    action: str
    port: str | None = None          # "22", "8000:8100"; None = every port
    proto: str = "any"
    src: str = "any"                 # "any" or a normalised address/network
    comment: str | None = None

    @property
    def families(self) -> tuple[str, ...]:
        if self.src == "any":
            return ("v4", "v6")
        return ("v6",) if ":" in self.src else ("v4",)

    def tuple_text(self, family: str) -> str:
        """The rule as ufw writes it in user.rules / user6.rules (after `### tuple ###`)."""
        anywhere = "0.0.0.0/0" if family == "v4" else "::/0"
        src = anywhere if self.src == "any" else self.src
        text = f"{self.action} {self.proto} {self.port or 'any'} {anywhere} any {src} in"
        if self.comment:
            text += " comment=" + self.comment.encode("utf-8").hex()
        return text

    def argv(self) -> list[str]:
        argv = ["ufw", self.action]
        if self.proto != "any":
            argv += ["proto", self.proto]
        argv += ["from", self.src, "to", "any"]
        if self.port:
            argv += ["port", self.port]
        if self.comment:
            argv += ["comment", self.comment]
        return argv

    def describe(self) -> str:
        what = f"{self.port}/{self.proto}" if self.port and self.proto != "any" else (
            self.port or (f"all {self.proto}" if self.proto != "any" else "everything"))
        text = f"{self.action} {what} from {self.src}"
        return text + (f"  # {self.comment}" if self.comment else "")


def _port(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"bad port {value!r}")
    text = str(value).strip()
    m = re.fullmatch(r"(\d{1,5})(?::(\d{1,5}))?", text)
    if not m:
        raise ValueError(f"bad port {value!r}: a number 1-65535 or a range like '8000:8100'")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535) or (m.group(2) and lo >= hi):
        raise ValueError(f"bad port {value!r}: a number 1-65535 or a range low:high, low < high")
    return f"{lo}:{hi}" if m.group(2) else str(lo)


def _source(value: Any) -> str:
    if value is None or value == "any":
        return "any"
    if not isinstance(value, str):
        raise ValueError(f"bad source {value!r}: an address, a network or 'any'")
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"bad source {value!r}: {e} (write the network address, e.g. "
                         "10.0.0.0/8)") from None
    if net.prefixlen == 0:
        return "any"
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def rule(action: str, port: Any = None, proto: str = "any", src: Any = "any",
         comment: str | None = None) -> Rule:
    if action not in ACTIONS:
        raise ValueError(f"bad ufw action {action!r}: one of {', '.join(ACTIONS)}")
    if proto not in PROTOS:
        raise ValueError(f"bad protocol {proto!r}: one of {', '.join(PROTOS)}")
    p = _port(port)
    if p and ":" in p and proto == "any":
        raise ValueError(f"port range {p} needs proto tcp or udp (ufw refuses it otherwise)")
    if comment is not None and (not isinstance(comment, str) or not COMMENT_RE.match(comment)):
        raise ValueError(f"bad comment {comment!r}: up to 100 letters, digits, spaces and "
                         "_.,:/@()+=#-")
    return Rule(action=action, port=p, proto=proto, src=_source(src), comment=comment)


def as_rule(value: Rule | Mapping) -> Rule:
    """A rule from ufw.rule(...) or a mapping {action, port?, proto?, from?, comment?}."""
    if isinstance(value, Rule):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"a ufw rule is ufw.rule(...) or a mapping, not {value!r}")
    unknown = set(value) - {"action", "port", "proto", "from", "comment"}
    if unknown:
        raise ValueError(f"unknown key(s) in ufw rule {dict(value)!r}: {', '.join(sorted(unknown))}"
                         " (use action, port, proto, from, comment)")
    if "action" not in value:
        raise ValueError(f"ufw rule {dict(value)!r} has no action")
    return rule(value["action"], value.get("port"), value.get("proto") or "any",
                value.get("from", "any"), value.get("comment"))


def parse_tuples(text: str | None) -> list[str]:
    """The rule tuples of a user.rules file, in order, whitespace normalised."""
    out = []
    for line in (text or "").splitlines():
        m = TUPLE_RE.match(line)
        if m:
            out.append(" ".join(m.group(1).split()))
    return out


def parse_shell_vars(text: str | None) -> dict[str, str]:
    """KEY=VALUE / KEY="VALUE" lines (ufw's /etc/default/ufw and ufw.conf)."""
    out = {}
    for line in (text or "").splitlines():
        s = line.strip()
        if not s or s.startswith("#") or "=" not in s:
            continue
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip().strip('"').strip("'")
    return out


def _common_prefix(have: Sequence[str], want: Sequence[str]) -> int:
    n = 0
    while n < len(have) and n < len(want) and have[n] == want[n]:
        n += 1
    return n


def _text_of(facts: Facts, path: str) -> str | None:
    f = facts.file(path)
    if not f.exists:
        return None
    if f.type != "file":
        raise b.PlanError(f"{path} is {f.describe()}, not a file")
    if f.content is None and not f.predicted:
        raise b.PlanError(f"{path} is binary or larger than 256 KiB: not a ufw file")
    return f.content


KEEP_SPORT = "1:65535"        # every real source port: the keep rule's distinct match


def _keep_argv(port: str) -> list[str]:
    return ["allow", "proto", "tcp", "from", "any", "port", KEEP_SPORT, "to", "any", "port", port]


def _keep_tuple(port: str, family: str) -> str:
    anywhere = "0.0.0.0/0" if family == "v4" else "::/0"
    return f"allow tcp {port} {anywhere} {KEEP_SPORT} {anywhere} in"


@dataclass(frozen=True)
class Firewall:
    rules: tuple[Rule, ...]
    incoming: str = "deny"
    outgoing: str = "allow"
    routed: str = "deny"
    enabled: bool = True
    keep_open: tuple[str, ...] = ()      # tcp ports never closed while the rules change

    @property
    def id(self) -> str:
        return "ufw"

    def facts(self) -> dict:
        return {"files": [USER_RULES, USER6_RULES, DEFAULTS, CONF], "checks": [list(LOADED_CHECK)]}

    # --- reading the facts --------------------------------------------------------------

    def _state(self, facts: Facts) -> dict:
        defaults = parse_shell_vars(_text_of(facts, DEFAULTS))
        conf = parse_shell_vars(_text_of(facts, CONF))
        ipv6 = defaults.get("IPV6", "yes").lower() == "yes"
        return {
            "installed": facts.file(CONF).exists,
            "ipv6": ipv6,
            "v4": parse_tuples(_text_of(facts, USER_RULES)),
            "v6": parse_tuples(_text_of(facts, USER6_RULES)) if ipv6 else [],
            "policy": {k: defaults.get(key) for k, key in POLICY_KEYS.items()},
            "enabled": conf.get("ENABLED", "no").lower() == "yes",
            "loaded": facts.check(LOADED_CHECK) == 0,
        }

    def _want(self, ipv6: bool) -> dict[str, list[str]]:
        want: dict[str, list[str]] = {"v4": [], "v6": []}
        for r in self.rules:
            for fam in r.families:
                if fam == "v6" and not ipv6:
                    continue
                want[fam].append(r.tuple_text(fam))
        return want

    # --- planning -----------------------------------------------------------------------

    def plan(self, facts: Facts) -> list[Change | Noop]:
        st = self._state(facts)
        want = self._want(st["ipv6"])
        out: list[Change | Noop] = []

        prefix = {fam: _common_prefix(st[fam], want[fam]) for fam in ("v4", "v6")}
        if st["v4"] != want["v4"] or st["v6"] != want["v6"]:
            steps, why = [], []
            fams = ("v4", "v6") if st["ipv6"] else ("v4",)
            deleting = any(len(st[fam]) > prefix[fam] for fam in fams)
            keep = self.keep_open if deleting else ()
            kept = {_keep_tuple(p, fam) for p in keep for fam in fams}
            for port in keep:                    # appended: after every rule there is now
                steps.append(b.run(["ufw", *_keep_argv(port)]))
            # IPv6 rules are numbered after all IPv4 ones (and the keep rules just appended,
            # unless a failed run left them): delete them first, from the end
            n4 = len(st["v4"]) + sum(_keep_tuple(p, "v4") not in st["v4"] for p in keep)
            for j in range(len(st["v6"]) - 1, prefix["v6"] - 1, -1):
                if st["v6"][j] not in kept:
                    steps.append(b.run(["ufw", "--force", "delete", str(n4 + j + 1)]))
            for i in range(len(st["v4"]) - 1, prefix["v4"] - 1, -1):
                if st["v4"][i] not in kept:
                    steps.append(b.run(["ufw", "--force", "delete", str(i + 1)]))
            index = {fam: 0 for fam in ("v4", "v6")}
            for r in self.rules:
                needed = False
                for fam in r.families:
                    if fam == "v6" and not st["ipv6"]:
                        continue
                    if index[fam] >= prefix[fam]:
                        needed = True
                    index[fam] += 1
                if needed:
                    steps.append(b.run(r.argv()))
            for port in keep:                    # last: the wanted rules are all in place
                steps.append(b.run(["ufw", "--force", "delete", *_keep_argv(port)]))
            for fam, label in (("v4", "IPv4"), ("v6", "IPv6")):
                extra = len(st[fam]) - prefix[fam]
                missing = len(want[fam]) - prefix[fam]
                if extra or missing:
                    parts = []
                    if prefix[fam]:
                        parts.append(f"first {prefix[fam]} match")
                    if extra:
                        parts.append(f"{extra} to delete")
                    if missing:
                        parts.append(f"{missing} to add")
                    why.append(f"{label} rules: " + ", ".join(parts))
            diff = self._diff(st, want)
            out.append(Change(self.id, "rules", "; ".join(why), tuple(steps), diff))

        why, steps = [], []
        for kind, key in POLICY_KEYS.items():
            wanted = getattr(self, kind)
            if st["policy"][kind] != POLICY_WORDS[wanted]:
                have = {v: k for k, v in POLICY_WORDS.items()}.get(st["policy"][kind] or "",
                                                                    st["policy"][kind] or "unset")
                why.append(f"{kind} {have} != {wanted}")
                steps.append(b.run(["ufw", "default", wanted, kind]))
        if steps:
            out.append(Change(self.id, "policy", "; ".join(why), tuple(steps)))

        if self.enabled and (not st["enabled"] or not st["loaded"]):
            why = ("not installed yet" if not st["installed"] else
                   "disabled" if not st["enabled"] else "enabled but its rules are not loaded")
            out.append(Change(self.id, "enable", why, (b.run(["ufw", "--force", "enable"]),)))
        elif not self.enabled and st["enabled"]:
            out.append(Change(self.id, "disable", "enabled", (b.run(["ufw", "--force", "disable"]),)))

        if out:
            return out
        n = len(want["v4"]) + len(want["v6"])
        state = "active" if self.enabled else "inactive"
        return [Noop(self.id, f"up to date: {state}, default {self.incoming} incoming / "
                              f"{self.outgoing} outgoing / {self.routed} routed, {n} rule(s)")]

    def _diff(self, st: dict, want: dict) -> str:
        def listing(rules: dict) -> list[str]:
            return [f"{'v6 ' if fam == 'v6' else ''}{t}" for fam in ("v4", "v6") for t in rules[fam]]
        lines = difflib.unified_diff(listing(st), listing(want), fromfile="ufw rules (now)",
                                     tofile="ufw rules (wanted)", lineterm="")
        return "\n".join(lines) + "\n"

    def expect(self, facts: Facts) -> dict:
        st = self._state(facts)
        want = self._want(st["ipv6"])

        def rules_file(tuples: list[str]) -> str:
            return "".join(f"### tuple ### {t}\n" for t in tuples)

        defaults = _text_of(facts, DEFAULTS) if facts.file(DEFAULTS).exists else "IPV6=yes\n"
        for kind, key in POLICY_KEYS.items():
            defaults = edit_lines(defaults, f'{key}="{POLICY_WORDS[getattr(self, kind)]}"',
                                  rf"^\s*{key}=")
        conf = _text_of(facts, CONF) if facts.file(CONF).exists else ""
        conf = edit_lines(conf, f"ENABLED={'yes' if self.enabled else 'no'}", r"^\s*ENABLED=")
        f = facts.file
        files = {
            USER_RULES: b.file_fact(USER_RULES, rules_file(want["v4"]), None, None, None, f(USER_RULES)),
            DEFAULTS: b.file_fact(DEFAULTS, defaults, None, None, None, f(DEFAULTS)),
            CONF: b.file_fact(CONF, conf, None, None, None, f(CONF)),
        }
        if st["ipv6"]:
            files[USER6_RULES] = b.file_fact(USER6_RULES, rules_file(want["v6"]), None, None,
                                             None, f(USER6_RULES))
        return {"files": files, "checks": {check_key(LOADED_CHECK): 0 if self.enabled else 1}}


def firewall(rules: Iterable[Rule | Mapping], *, incoming: str = "deny", outgoing: str = "allow",
             routed: str = "deny", enabled: bool = True, keep_open: Iterable = ()) -> Firewall:
    if isinstance(rules, (str, bytes, Mapping)):
        raise TypeError("rules must be a list of ufw.rule(...) or mappings")
    parsed = tuple(as_rule(r) for r in rules)
    seen: dict[tuple, Rule] = {}
    for r in parsed:
        key = (r.proto, r.port, r.src)
        if key in seen:
            raise ValueError(f"two ufw rules for {r.port or 'every port'}/{r.proto} from {r.src} "
                             f"({seen[key].describe()!r} and {r.describe()!r}): ufw keeps one "
                             "rule per match, drop one of them")
        seen[key] = r
    for name, value in (("incoming", incoming), ("outgoing", outgoing), ("routed", routed)):
        if value not in POLICY_WORDS:
            raise ValueError(f"bad {name} policy {value!r}: one of {', '.join(POLICY_WORDS)}")
    keep = tuple(dict.fromkeys(_port(p) for p in keep_open))
    if any(":" in p for p in keep):
        raise ValueError(f"keep_open takes single ports, not ranges: {keep_open!r}")
    return Firewall(rules=parsed, incoming=incoming, outgoing=outgoing, routed=routed,
                    enabled=bool(enabled), keep_open=keep)


__all__ = ["Firewall", "Rule", "firewall", "rule", "as_rule", "parse_tuples"]

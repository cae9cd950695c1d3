"""ops/ufw.py beyond its JSON fixtures (tests/fixtures/ops/ufw.firewall--*.json, run by
test_ops_fixtures.py): the tuple format against lines real ufw wrote, the plan's delete/append
numbering against a model of ufw for many rule sets, and the real ufw on a test server."""
import random

import pytest

import engine_helpers
from conftest import invoke
from engine_helpers import sh
from provisioner import agent, ops
from provisioner.change import Change, Noop
from provisioner.connection import Connection
from provisioner.facts import Facts, check_key
from provisioner.ops import ufw

# Written by ufw 0.36.2 (Debian 12) for these commands, copied from a test server:
#   ufw allow from 10.77.0.1 comment "trusted source"     ufw allow 60000:61000/udp
#   ufw allow from 10.77.0.1 to any port 22 proto tcp     ufw allow 3000
#   ufw limit 22/tcp                                      ufw allow from fd00::/8 to any port 443 proto tcp
#   ufw allow from 10.1.2.0/24 to any port 9000:9100 proto tcp comment "x y"
REAL_V4 = """*filter
:ufw-user-input - [0:0]
### RULES ###

### tuple ### allow any any 0.0.0.0/0 any 10.77.0.1 in comment=7472757374656420736f75726365
-A ufw-user-input -s 10.77.0.1 -j ACCEPT

### tuple ### allow tcp 22 0.0.0.0/0 any 10.77.0.1 in
-A ufw-user-input -p tcp --dport 22 -s 10.77.0.1 -j ACCEPT

### tuple ### limit tcp 22 0.0.0.0/0 any 0.0.0.0/0 in
-A ufw-user-input -p tcp --dport 22 -m conntrack --ctstate NEW -m recent --set

### tuple ### allow udp 60000:61000 0.0.0.0/0 any 0.0.0.0/0 in
### tuple ### allow any 3000 0.0.0.0/0 any 0.0.0.0/0 in
### tuple ### allow tcp 9000:9100 0.0.0.0/0 any 10.1.2.0/24 in comment=782079

### END RULES ###
"""
REAL_V6_TUPLES = ["limit tcp 22 ::/0 any ::/0 in", "allow udp 60000:61000 ::/0 any ::/0 in",
                  "allow any 3000 ::/0 any ::/0 in", "allow tcp 443 ::/0 any fd00::/8 in"]


def test_tuples_are_what_real_ufw_writes():
    rules = [ufw.rule("allow", None, "any", "10.77.0.1", "trusted source"),
             ufw.rule("allow", 22, "tcp", "10.77.0.1"),
             ufw.rule("limit", 22, "tcp"),
             ufw.rule("allow", "60000:61000", "udp"),
             ufw.rule("allow", 3000),
             ufw.rule("allow", "9000:9100", "tcp", "10.1.2.0/24", "x y"),
             ufw.rule("allow", 443, "tcp", "fd00::/8")]
    v4 = [r.tuple_text("v4") for r in rules if "v4" in r.families]
    v6 = [r.tuple_text("v6") for r in rules if "v6" in r.families]
    assert v4 == ufw.parse_tuples(REAL_V4)
    assert v6 == REAL_V6_TUPLES


def test_sources_are_normalised_like_ufw_and_bad_ones_refused():
    assert ufw.rule("allow", 22, "tcp", "10.77.0.1/32").src == "10.77.0.1"
    assert ufw.rule("allow", 22, "tcp", "0.0.0.0/0").src == "any"
    assert ufw.rule("allow", 22, "tcp", "FD00:0::/8").src == "fd00::/8"
    for bad in ("10.77.0.1/24", "example.com", "10.77.0.300"):
        with pytest.raises(ValueError, match="bad source"):
            ufw.rule("allow", 22, "tcp", bad)
    with pytest.raises(ValueError, match="bad port"):
        ufw.rule("allow", 0, "tcp")
    with pytest.raises(ValueError, match="bad comment"):
        ufw.rule("allow", 22, "tcp", comment="it's\nmine")


class FakeUfw:
    """What ufw does with the plan's commands: `delete N` numbers IPv4 rules first, then IPv6;
    a new rule is appended to each family it applies to, unless that family already has it."""

    def __init__(self, v4, v6):
        self.v4, self.v6 = list(v4), list(v6)

    def run(self, argv):
        assert argv[0] == "ufw"
        if argv[1:3] == ["--force", "delete"] and len(argv) > 4:      # by spec: the keep rule
            assert argv[3:] == ufw._keep_argv(argv[-1]), argv
            for fam, rules in (("v4", self.v4), ("v6", self.v6)):
                rules.remove(ufw._keep_tuple(argv[-1], fam)) if ufw._keep_tuple(argv[-1], fam) in rules else None
            return
        if argv[1:] == ufw._keep_argv(argv[-1]):
            for fam, rules in (("v4", self.v4), ("v6", self.v6)):
                if ufw._keep_tuple(argv[-1], fam) not in rules:
                    rules.append(ufw._keep_tuple(argv[-1], fam))
            return
        if argv[1:3] == ["--force", "delete"]:
            n = int(argv[3]) - 1
            if n < len(self.v4):
                del self.v4[n]
            else:
                del self.v6[n - len(self.v4)]
            return
        if argv[1] in ("default",) or argv[1:3] in (["--force", "enable"], ["--force", "disable"]):
            return
        r = parse_argv(argv)
        for fam in r.families:
            rules = self.v4 if fam == "v4" else self.v6
            if r.tuple_text(fam) not in rules:
                rules.append(r.tuple_text(fam))


def parse_argv(argv):
    args = dict(zip(argv[2::2], argv[3::2]))        # proto P, from S, to any, port N, comment C
    return ufw.rule(argv[1], args.get("port"), args.get("proto", "any"), args.get("from"), args.get("comment"))


POOL = [ufw.rule("allow", 22, "tcp", "10.77.0.1", "trusted source"), ufw.rule("limit", 22, "tcp", comment="ssh"),
        ufw.rule("allow", 443, "tcp"), ufw.rule("allow", 5432, "tcp", "10.77.0.0/24"),
        ufw.rule("allow", "60000:61000", "udp"), ufw.rule("deny", 25), ufw.rule("allow", 8080, "tcp", "fd00::/8"),
        ufw.rule("allow", None, "any", "192.0.2.7")]


def _facts(v4, v6, ipv6=True):
    text = lambda ts: "".join(f"### tuple ### {t}\n" for t in ts)
    f = lambda c: {"exists": True, "type": "file", "content": c, "sha256": "x"}
    return Facts({"files": {ufw.USER_RULES: f(text(v4)), ufw.USER6_RULES: f(text(v6)),
                            ufw.DEFAULTS: f(f"IPV6={'yes' if ipv6 else 'no'}\nDEFAULT_INPUT_POLICY=\"DROP\"\n"
                                            "DEFAULT_OUTPUT_POLICY=\"ACCEPT\"\nDEFAULT_FORWARD_POLICY=\"DROP\"\n"),
                            ufw.CONF: f("ENABLED=yes\n")},
                  "checks": {check_key(ufw.LOADED_CHECK): 0}})


def test_the_plan_turns_any_rule_set_into_any_other():
    rng = random.Random(5)
    cases = 0
    for _ in range(400):
        have = rng.sample(POOL, rng.randint(0, len(POOL)))
        want = rng.sample(POOL, rng.randint(0, len(POOL)))
        v4 = [r.tuple_text("v4") for r in have if "v4" in r.families]
        v6 = [r.tuple_text("v6") for r in have if "v6" in r.families]
        fw = ufw.firewall(want)
        model = FakeUfw(v4, v6)
        plan = fw.plan(_facts(v4, v6))
        for c in plan:
            if isinstance(c, Change):
                for step in c.steps:
                    model.run(step["run"])
        assert model.v4 == [r.tuple_text("v4") for r in want if "v4" in r.families], (have, want)
        assert model.v6 == [r.tuple_text("v6") for r in want if "v6" in r.families], (have, want)
        again = fw.plan(_facts(model.v4, model.v6))
        assert all(isinstance(c, Noop) for c in again)
        cases += 1
    assert cases == 400


def _ssh_open(v4):
    return any(t.split()[:3] in (["allow", "tcp", "22"], ["limit", "tcp", "22"]) and t.split()[5] == "0.0.0.0/0"
               for t in v4)


def test_ssh_stays_open_at_every_step_of_any_change():
    """Add before delete: with keep_open, no moment between two ufw commands has the SSH port
    closed (a failure there would leave it so, under default deny)."""
    rng = random.Random(7)
    ssh = POOL[1]                                      # limit 22/tcp from anywhere
    for _ in range(300):
        have = rng.sample(POOL, rng.randint(0, len(POOL)))
        want = rng.sample(POOL, rng.randint(0, len(POOL)))
        for rules in (have, want):
            if ssh not in rules:
                rules.insert(rng.randint(0, len(rules)), ssh)
        v4 = [r.tuple_text("v4") for r in have if "v4" in r.families]
        v6 = [r.tuple_text("v6") for r in have if "v6" in r.families]
        if rng.random() < 0.2:                         # a failed earlier run left its keep rule
            v4.insert(rng.randint(0, len(v4)), ufw._keep_tuple("22", "v4"))
            v6.insert(rng.randint(0, len(v6)), ufw._keep_tuple("22", "v6"))
        fw = ufw.firewall(want, keep_open=[22])
        model = FakeUfw(v4, v6)
        for c in fw.plan(_facts(v4, v6)):
            for step in getattr(c, "steps", ()):
                model.run(step["run"])
                assert _ssh_open(model.v4), (have, want, step["run"])
        assert model.v4 == [r.tuple_text("v4") for r in want if "v4" in r.families], (have, want)
        assert model.v6 == [r.tuple_text("v6") for r in want if "v6" in r.families], (have, want)


def test_only_what_differs_is_touched():
    keep = POOL[:3]
    v4 = [r.tuple_text("v4") for r in keep]
    v6 = [r.tuple_text("v6") for r in keep if "v6" in r.families]
    (change,) = ufw.firewall(keep + [POOL[4]]).plan(_facts(v4, v6))
    assert [s["run"] for s in change.steps] == [POOL[4].argv()]         # appended, nothing deleted
    assert change.why == "IPv4 rules: first 3 match, 1 to add; IPv6 rules: first 2 match, 1 to add"


# --- the real ufw on a test server --------------------------------------------------------------

SERVER = engine_helpers.test_server("web1")


def _apply(conn, fw):
    answer = agent.parse(*_run(conn, "facts", ops.request([fw])))
    planned = fw.plan(Facts(answer["facts"]))
    changes = [c for c in planned if isinstance(c, Change)]
    if changes:
        result = agent.parse(*_run(conn, "apply", agent.apply_request(changes, {})))
        assert result["ok"], result
    return planned


def _run(conn, op, request):
    r = conn.run(agent.command(), stdin=agent.payload(op, request))
    return r.stdout, r.stderr, r.rc


@pytest.mark.usefixtures("testbed")
def test_real_ufw_converges_from_a_hand_made_mess(tmp_path):
    invoke("testbed.reset", SERVER)
    inv = engine_helpers.inventory(tmp_path, [SERVER], ["base"])
    try:
        sh(SERVER, "apt-get install -y -q --no-install-recommends ufw >/dev/null 2>&1 || "
                   "(apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends ufw >/dev/null)")
        # someone's rules, in the middle and at the end, with ufw already on
        sh(SERVER, "ufw allow from 10.77.0.1 to any port 22 proto tcp && ufw allow 8080/tcp && "
                   "ufw allow from 192.0.2.7 && ufw limit 22/tcp && ufw --force enable")
        want = [ufw.rule("allow", 22, "tcp", "10.77.0.1", "trusted source"), ufw.rule("limit", 22, "tcp", comment="ssh"),
                ufw.rule("allow", 443, "tcp"), ufw.rule("allow", "60000:61000", "udp", comment="mosh")]
        with Connection(inv.hosts[SERVER], inv.known_hosts) as conn:
            first = _apply(conn, ufw.firewall(want))
            assert [c.action for c in first if isinstance(c, Change)] == ["rules"]
            again = _apply(conn, ufw.firewall(want))
            assert [type(c) for c in again] == [Noop], again
            # reorder: the rate limit first (nobody would, but the order must be what is asked)
            reordered = [want[1], want[0], want[3]]
            _apply(conn, ufw.firewall(reordered))
            assert [type(c) for c in _apply(conn, ufw.firewall(reordered))] == [Noop]
        v4 = ufw.parse_tuples(sh(SERVER, "cat /etc/ufw/user.rules").stdout)
        v6 = ufw.parse_tuples(sh(SERVER, "cat /etc/ufw/user6.rules").stdout)
        assert v4 == [r.tuple_text("v4") for r in reordered]
        assert v6 == [r.tuple_text("v6") for r in reordered if "v6" in r.families]
        status = sh(SERVER, "ufw status numbered").stdout
        assert "Status: active" in status and "8080" not in status and "192.0.2.7" not in status
        assert status.index("LIMIT IN") < status.index("10.77.0.1")
    finally:
        invoke("testbed.reset", SERVER)             # leave no firewall behind for the next test


@pytest.mark.usefixtures("testbed")
def test_a_change_cut_short_after_its_deletions_leaves_ssh_open(tmp_path):
    """Add before delete, on the real ufw: run a rules change only up to its last delete (as if
    the next command failed), under default deny; a brand-new SSH login must still get in."""
    invoke("testbed.reset", SERVER)
    inv = engine_helpers.inventory(tmp_path, [SERVER], ["base"])
    try:
        sh(SERVER, "apt-get install -y -q --no-install-recommends ufw >/dev/null 2>&1 || "
                   "(apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends ufw >/dev/null)")
        sh(SERVER, "ufw default deny incoming && ufw allow 8080/tcp && ufw limit 22/tcp && ufw --force enable")
        want = [ufw.rule("allow", 443, "tcp"), ufw.rule("limit", 22, "tcp", comment="ssh")]
        fw = ufw.firewall(want, keep_open=[22])
        with Connection(inv.hosts[SERVER], inv.known_hosts) as conn:
            answer = agent.parse(*_run(conn, "facts", ops.request([fw])))
            (rules,) = [c for c in fw.plan(Facts(answer["facts"])) if isinstance(c, Change) and c.action == "rules"]
            last_delete = max(i for i, s in enumerate(rules.steps) if s["run"][1:3] == ["--force", "delete"]
                              and s["run"][3].isdigit())
            cut = Change(rules.resource, rules.action, rules.why, rules.steps[:last_delete + 1])
            assert agent.parse(*_run(conn, "apply", agent.apply_request([cut], {})))["ok"]
        assert "22" not in " ".join(t.split()[2] for t in ufw.parse_tuples(sh(SERVER, "cat /etc/ufw/user.rules").stdout)
                                    if t.split()[4] == "any"), "the SSH rules were meant to be deleted here"
        with Connection(inv.hosts[SERVER], inv.known_hosts) as fresh:     # a new TCP connection
            assert fresh.run(["true"]).rc == 0
            _apply(fresh, fw)
            assert [type(c) for c in _apply(fresh, fw)] == [Noop]
        v4 = ufw.parse_tuples(sh(SERVER, "cat /etc/ufw/user.rules").stdout)
        assert v4 == [r.tuple_text("v4") for r in want]                # the keep rule is gone
    finally:
        invoke("testbed.reset", SERVER)

"""The package batch, planned without servers: where it takes place (right after the role that
brings the firewall up), which packages the roles after that install together, which stay in
their roles' own steps and why, and what the failure says."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from provisioner import apt_batch
from provisioner.change import Change, Noop
from provisioner.facts import Facts
from provisioner.ops import PlanError, apt, commands, files, merge_requests, request, templates, ufw

from fake_agent import DEBIAN_FOLDERS, fresh_server

KEY = "LS0tLS1CRUdJTiBQR1AgUFVCTElDIEtFWSBCTE9DSy0tLS0tCg=="     # "-----BEGIN PGP ..." base64


def facts(roles, installed=(), lists_age=60, files_=()):
    """The server's answer to the roles' facts request: these packages installed (name ->
    version), these files present (path -> fact), nothing else."""
    req = merge_requests([request(r for _role, rs in roles if rs for r in rs), apt_batch.request(roles)])
    have, on_disk = dict(installed), dict(files_)
    return Facts({"packages": {"installed": {n: have.get(n.split("=")[0]) for n in req.get("packages", [])},
                               "lists_age": lists_age},
                  "package_candidates": {n: "9.9" for n in req.get("package_candidates", [])},
                  "files": {p: on_disk.get(p, {"exists": False}) for p in req.get("files", [])}})


def batch(roles, on_server=None, **kw) -> apt_batch.Batch:
    """The batch of these roles, on `on_server` or else facts(roles, **kw)."""
    return apt_batch.plan(roles, on_server if on_server is not None else facts(roles, **kw))


PIN = "Package: nodejs\nPin: origin deb.example\nPin-Priority: 1001\n"


def nodesource():
    """Role node's NodeSource resources: the repository, the pin, then nodejs."""
    return [apt.repository("nodesource", "https://deb.example/node_22.x", "nodistro", key_b64=KEY),
            files.file("/etc/apt/preferences.d/nodesource.pref", PIN),
            apt.packages(["nodejs"])]


@dataclass(frozen=True)
class Refuses:
    """A role's first resource that refuses to plan (as postgresql's check for an older major)."""
    id: str = "postgresql cluster 17/main"

    def facts(self):
        return {}

    def plan(self, facts):
        raise PlanError("PostgreSQL 15 already holds this server's data")

    def expect(self, facts):
        return {}


@dataclass(frozen=True)
class Counted:
    """A resource that counts how often it is planned."""
    calls: list

    id = "counted"

    def facts(self):
        return {}

    def plan(self, facts):
        self.calls.append(1)
        return [Noop(self.id, "fine")]

    def expect(self, facts):
        return {}


WEB1 = [("base", [apt.packages(["curl"]), files.file("/etc/timezone", "UTC\n")]),
        ("harden", [apt.packages(["ufw", "fail2ban"]), files.file("/etc/sudoers.d/x", "x\n")]),
        ("node", [apt.packages(["nodejs", "npm"]), files.directory("/srv/app")]),
        ("pm2", [files.file("/etc/systemd/system/pm2-app.service", "[Unit]\n")])]


def test_a_fresh_host_installs_every_roles_packages_in_one_transaction():
    b = batch(WEB1)
    assert b.names == ("curl", "ufw", "fail2ban", "nodejs", "npm")
    assert b.roles == ("base", "harden", "node") and b.left == ()
    assert b.change.resource == "apt batch: curl ufw fail2ban nodejs npm"
    installs = [s["run"] for s in b.change.steps if "install" in s.get("run", [])]
    assert len(installs) == 1 and installs[0][-5:] == ["curl", "ufw", "fail2ban", "nodejs", "npm"]
    assert "for roles base, harden, node" in b.change.why
    # the roles then find them installed: their own package steps change nothing
    after = facts(WEB1).overlay(b.expect)
    for _role, resources in WEB1[:3]:
        assert isinstance(resources[0].plan(after)[0], Noop)


def test_a_converged_host_plans_no_role_for_it():
    calls = []
    roles = [("base", [apt.packages(["curl"]), Counted(calls)]), ("other", [Counted(calls)])]
    assert apt_batch.plan(roles, facts(roles, {"curl": "8.5"})) is apt_batch.NOTHING
    assert calls == []                    # a lookup per package, no role planned
    b = apt_batch.plan(roles, facts(roles))
    assert b.names == ("curl",) and calls == [1, 1]


def test_stale_lists_are_refreshed_first_once_and_the_strictest_age_wins():
    roles = [("a", [apt.packages(["x"], update_cache_max_age=None)]),
             ("b", [apt.packages(["y"], update_cache_max_age=600)])]
    b = apt_batch.plan(roles, facts(roles, lists_age=900))
    runs = [s["run"] for s in b.change.steps if "run" in s]
    assert sum("update" in r for r in runs) == 1 and "install" in runs[-1]
    assert b.expect["packages"]["lists_age"] == 0
    fresh = apt_batch.plan(roles, facts(roles, lists_age=300))
    assert not any("update" in s.get("run", []) for s in fresh.change.steps)
    never = apt_batch.plan(roles[:1], facts(roles, lists_age=10 ** 6))     # None: only if never fetched
    assert not any("update" in s.get("run", []) for s in never.change.steps)


def test_packages_behind_a_new_repository_keep_their_own_step_and_so_do_later_roles():
    roles = [("base", [apt.packages(["curl"])]), ("node", nodesource()),
             ("redis", [apt.packages(["redis-server"])])]
    b = batch(roles)
    assert b.names == ("curl",)
    assert [(x.role, x.resource) for x in b.left] == [("node", "apt nodejs"),
                                                       ("redis", "apt redis-server")]
    assert all("after apt repository nodesource, which changes where packages come from" == x.why
               for x in b.left)
    assert "left to their roles: apt nodejs (node: after apt repository nodesource" in b.change.why


def test_a_repository_already_configured_is_where_packages_come_from():
    repo, pin, _ = nodesource()
    on_server = facts([("node", nodesource())], files_=[
        (repo.keyring, {"exists": True, "type": "file", "mode": "0644", "owner": "root",
                        "group": "root", "sha256": _sha(repo.key_b64)}),
        (repo.sources_path, {"exists": True, "type": "file", "mode": "0644", "owner": "root",
                             "group": "root", "sha256": _sha_text(repo.sources())}),
        (apt.KEYRINGS, {"exists": True, "type": "dir", "mode": "0755", "owner": "root", "group": "root"}),
        (pin.path, {"exists": True, "type": "file", "mode": "0644", "owner": "root", "group": "root",
                    "sha256": _sha_text(PIN), "content": PIN})])
    assert isinstance(repo.plan(on_server)[0], Noop) and isinstance(pin.plan(on_server)[0], Noop)
    b = batch([("node", nodesource())], on_server)
    assert b.names == ("nodejs",) and b.left == ()


def test_an_apt_pin_written_earlier_keeps_later_packages_in_their_roles():
    pin = files.file("/etc/apt/preferences.d/hold.pref", "Package: nginx\nPin: version 1.22*\n")
    b = batch([("base", [apt.packages(["curl"]), pin]), ("nginx", [apt.packages(["nginx"])])])
    assert b.names == ("curl",)
    assert b.left == (apt_batch.Left("nginx", "apt nginx", "after file "
                                     "/etc/apt/preferences.d/hold.pref, which changes where "
                                     "packages come from"),)


def test_apt_settings_that_do_not_move_packages_do_not_hold_them_back():
    # harden writes unattended-upgrades' settings before node and postgresql install theirs
    conf = files.file("/etc/apt/apt.conf.d/20auto-upgrades", 'APT::Periodic::Update-Package-Lists "1";\n')
    b = batch([("harden", [apt.packages(["ufw"]), conf]), ("node", [apt.packages(["nodejs"])])])
    assert b.names == ("ufw", "nodejs")


def test_a_package_after_a_change_of_its_own_role_stays_there():
    # the role wrote a config file first on purpose: the package's install reads it
    role = [files.file("/etc/postgresql-common/createcluster.conf", "x\n"),
            apt.packages(["postgresql-17"])]
    b = batch([("base", [apt.packages(["curl"])]), ("postgresql", role)])
    assert b.names == ("curl",)
    assert b.left == (apt_batch.Left("postgresql", "apt postgresql-17", "after file "
                                     "/etc/postgresql-common/createcluster.conf of its role, "
                                     "which changes something first"),)
    # the same file already as wanted: nothing comes first, the package joins the batch
    done = facts([("postgresql", role)], files_=[("/etc/postgresql-common/createcluster.conf", {
        "exists": True, "type": "file", "mode": "0644", "owner": "root", "group": "root",
        "sha256": _sha_text("x\n"), "content": "x\n"})])
    assert batch([("postgresql", role)], done).names == ("postgresql-17",)


def test_a_role_that_refuses_to_plan_stops_the_batch_there():
    roles = [("base", [apt.packages(["curl"])]),
             ("postgresql", [Refuses(), apt.packages(["postgresql-17"])]),
             ("redis", [apt.packages(["redis-server"])])]
    b = batch(roles)
    assert b.names == ("curl",) and b.left == ()       # the run stops at postgresql
    unprepared = [("base", [apt.packages(["curl"])]), ("broken", None),
                  ("redis", [apt.packages(["redis-server"])])]
    assert batch(unprepared).names == ("curl",)
    assert batch([("broken", None), ("redis", [apt.packages(["x"])])]).change is None


@pytest.mark.parametrize("resource, why", [
    (apt.packages(["nginx"], state="latest"), "state latest: its own transaction"),
    (apt.packages(["nginx"], install_recommends=True), "installs recommended packages: its own transaction"),
])
def test_installs_of_another_kind_keep_their_own_step(resource, why):
    b = batch([("a", [apt.packages(["curl"])]), ("b", [resource, apt.packages(["jq"])])], lists_age=60)
    assert b.names == ("curl",)
    assert b.left == (apt_batch.Left("b", "apt nginx", why),
                      apt_batch.Left("b", "apt jq", "after apt nginx of its role, which changes "
                                                    "something first"))


def test_a_package_removed_by_a_role_is_left_to_it():
    b = batch([("a", [apt.packages(["telnet"], state="absent"), apt.packages(["curl"])])],
              installed={"telnet": "0.17"})
    assert b.change is None and [x.resource for x in b.left] == ["apt telnet", "apt curl"]


def test_two_versions_of_one_package_are_not_batched_together():
    b = batch([("a", [apt.packages(["nginx=1.22.1-9", "curl"])]), ("b", [apt.packages(["nginx"])]),
               ("c", [apt.packages(["curl"])])])
    assert b.names == ("nginx=1.22.1-9", "curl")
    assert b.left == (apt_batch.Left("b", "apt nginx", "another role asks for another version "
                                                       "(nginx=1.22.1-9 != nginx)"),)


def test_unreadable_package_facts_leave_it_to_the_roles():
    broken = Facts({"errors": {"packages": "dpkg-query: not found"}})
    assert batch(WEB1, broken) is apt_batch.NOTHING


def test_a_template_under_sources_list_d_counts_as_a_repository(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "s.j2").write_text("deb http://x/ {{ suite }} main\n")
    src = templates.template("/etc/apt/sources.list.d/x.list", "r/s.j2", {"suite": "stable"},
                             root=tmp_path)
    b = batch([("a", [src]), ("b", [apt.packages(["x-tool"])])])
    assert b.change is None and "changes where packages come from" in b.left[0].why


def test_a_failure_names_the_packages_and_apts_error():
    out = ("$ apt-get -q -y install --no-install-recommends curl nope\nReading package lists...\n"
           "Building dependency tree...\nE: Unable to locate package nope\n")
    assert apt_batch.failure(["curl", "nope"], out, "step 1 (run): exit 100", 100) == \
        "install of curl nope failed: E: Unable to locate package nope"
    dpkg = "Setting up x ...\ndpkg: error processing package x (--configure):\n" \
           "E: Sub-process /usr/bin/dpkg returned an error code (1)\n"
    assert apt_batch.failure(["x"], dpkg, None, 100) == (
        "install of x failed: dpkg: error processing package x (--configure):; "
        "E: Sub-process /usr/bin/dpkg returned an error code (1)")
    assert apt_batch.failure(["x"], "", "agent error: gone", None) == "install of x failed: agent error: gone"
    assert apt_batch.failure(["x"], None, None, 124) == "install of x failed: exit 124"
    assert apt_batch.failure(["x"], "some output\nlast words\n", None, 1) == "install of x failed: last words"


def _sha(b64):
    import base64
    import hashlib
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()


def _sha_text(text):
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_resource_whose_packages_are_partly_there_batches_only_the_missing_ones():
    b = batch([("node", [apt.packages(["nodejs", "npm"])])], installed={"nodejs": "20.19"})
    assert b.names == ("npm",) and b.change.resource == "apt batch: npm"
    assert b.change.steps[-1]["run"][-1] == "npm"


# --- where it takes place: never before the firewall is up ----------------------------------------

FIREWALL = ufw.firewall([ufw.rule("limit", 22, "tcp")])
WALLED = [("base", [apt.packages(["curl"])]), ("harden", [apt.packages(["ufw"]), FIREWALL]),
          ("nginx", [apt.packages(["nginx"])]), ("redis", [apt.packages(["redis-server"])])]


def test_it_takes_place_right_after_the_role_that_brings_the_firewall_up():
    assert apt_batch.start(WALLED) == 2
    # found by its resource, not by its name; the first such role counts
    moved = [("base", [apt.packages(["curl"]), FIREWALL])] + WALLED[1:]
    assert apt_batch.start(moved) == 1
    # a firewall left off brings nothing up; without one the batch takes place first
    off = ufw.firewall([], enabled=False)
    assert apt_batch.start([WALLED[0], ("harden", [off])] + WALLED[2:]) == 0
    assert apt_batch.start([WALLED[0]] + WALLED[2:]) == 0
    assert apt_batch.start([("broken", None)] + WALLED[1:]) == 2
    assert apt_batch.start(WALLED[:2]) == 2                # nothing after it: no batch


def test_check_mode_counts_what_the_roles_before_it_install_as_installed():
    # on a fresh server with never-fetched lists: harden refreshes them and installs ufw, which
    # a later role wants too; the batch then neither refreshes again nor installs ufw again
    roles = WALLED[:2] + [("nginx", [apt.packages(["nginx", "ufw"])])] + WALLED[3:]
    first = facts(roles, lists_age=None)
    b, after = apt_batch.foresee(roles, 2, first)
    assert b.names == ("nginx", "redis-server") and b.roles == ("nginx", "redis")
    assert not any("update" in s.get("run", []) for s in b.change.steps)
    assert after.package("ufw") and after.package("nginx") and after.package("curl")
    # the same as a run plans it there, from the facts the roles before it left
    then = facts(roles, installed={"curl": "8.5", "ufw": "0.36"}, lists_age=5)
    assert apt_batch.plan(roles[2:], then).change.steps == b.change.steps


def test_check_mode_has_no_batch_where_the_run_stops_first_or_nothing_comes_after():
    assert apt_batch.foresee([("base", None)] + WALLED[1:], 2, facts(WALLED))[0] is apt_batch.NOTHING
    assert apt_batch.foresee(WALLED[:2], 2, facts(WALLED))[0] is apt_batch.NOTHING
    only_files = WALLED[:2] + [("app", [files.directory("/srv/app")])]
    assert not apt_batch.wanted(only_files[2:])
    assert apt_batch.foresee(only_files, 2, facts(only_files))[0] is apt_batch.NOTHING


def test_the_change_is_a_plain_apt_install():
    c = batch(WEB1).change
    assert isinstance(c, Change) and c.action == "install" and c.notify == ()
    assert c.steps[-1]["run"][:3] == ["apt-get", "-q", "-y"]


# --- the local env's own roles ---------------------------------------------------------------

def test_on_fresh_servers_every_package_after_hardens_firewall_joins_the_batch(tmp_path, forget_secrets):
    import dataclasses
    from provisioner.api import RoleContext
    from provisioner.inventory import load_inventory
    from provisioner.roles import load_role
    from provisioner.runner import resource_list
    from provisioner.secret import Secret

    inv = load_inventory("local")
    inv = inv.resolve({n: Secret(f"pw-{n}-0123456789abcdefghij", register=False) for n in inv.vault_refs()})
    # peers' host keys (pgbackrest, restic) come from known_hosts, which the testbed writes
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"{h.address} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOFdR8qAnLr1vYdyU6hv5d9UXpqt6tFLpdBz4Ba0qmoh\n"
                             for h in inv.select(None)))
    inv = dataclasses.replace(inv, known_hosts=known)
    got, carried = {}, {}
    for host in inv.select(None):
        os_facts = {"id": "debian", "version_id": "13" if host.name in ("web1", "db1", "vault", "lb1") else "12",
                    "virt": "systemd-nspawn"}
        ctx = RoleContext(host, inv, os_facts, False)
        v = dict(inv.hostvars(host.name))      # the testbed's key is not there without a testbed
        v["harden_deploy_keys"] = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOFdR8qAnLr1vYdyU6hv5d9UXpqt6tFLpdBz4Ba0qmoh t"]
        codes = {r: load_role(inv.roles[r]) for r in inv.roles_for(host.name)}
        roles = [(r, resource_list(code, v, ctx)) for r, code in codes.items()]
        at = apt_batch.start(roles)
        # right after harden, found by its ufw resource
        assert roles[at - 1][0] == "harden" and any(map(apt_batch.brings_up_firewall, roles[at - 1][1]))
        server = fresh_server(merge_requests([request(x for _r, rs in roles for x in rs),
                                              apt_batch.request(roles)]), os_facts, DEBIAN_FOLDERS)
        b, _after = apt_batch.foresee(roles, at, server,
                                      {r: list(c.guards(v, ctx) or []) for r, c in codes.items()},
                                      {r: dict(c.handlers(v, ctx) or {}) for r, c in codes.items()})
        assert b.left == (), b.left
        got[host.name] = (b.roles, set(b.names))
        carried[host.name] = [(x.role, x.change.resource) for x in b.carried]
    agent = {"prometheus-node-exporter"}
    # node_npm: registry: npm comes from its tarball in role node's own step, not from apt
    app = (("node", "restic", "monitoring_agent"), {"nodejs", "restic", "openssh-client"} | agent)
    assert got["web1"] == got["web2"] == app
    assert got["db1"] == (("postgresql", "redis", "pgbackrest", "monitoring_agent"),
                          {"postgresql-17", "redis-server", "pgbackrest", "prometheus-postgres-exporter",
                           "prometheus-redis-exporter"} | agent)
    assert got["lb1"][0] == ("nginx", "letsencrypt", "monitoring_agent")
    assert {"nginx", "certbot", "prometheus-nginx-exporter"} <= got["lb1"][1]
    assert got["vault"] == (("pgbackrest", "monitoring_agent"), {"pgbackrest", "postgresql-17"} | agent)
    assert got["mon1"] == (("monitoring", "monitoring_agent"),
                           {"prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"} | agent)
    harden = {"ufw", "fail2ban", "unattended-upgrades"}
    assert not harden & set().union(*(names for _roles, names in got.values()))
    # written before the packages that read them: the exporters' settings, and on vault
    # postgresql-common's "no cluster" for the drill's server binaries
    exporters = {h: [f"file /etc/default/prometheus-{e}-exporter" for e in es] for h, es in {
        "web1": ["node"], "web2": ["node"], "mon1": ["node"], "vault": ["node"],
        "lb1": ["node", "nginx"], "db1": ["node", "postgres", "redis"]}.items()}
    exporters["db1"][-1] = exporters["db1"][-1].replace("file", "template")
    for host, resources in carried.items():
        assert [r for role, r in resources if role == "monitoring_agent"] == exporters[host]
    assert [r for role, r in carried["vault"] if role == "pgbackrest"] == [
        "directory /etc/postgresql-common", "directory /etc/postgresql-common/createcluster.d",
        "file /etc/postgresql-common/createcluster.d/50-provisioner-drill.conf"]
    # db1's cluster starts on its settings and archiving: no restart for either after it
    folders = ["directory /etc/postgresql-common", "directory /etc/postgresql-common/createcluster.d"]
    assert [(role, r) for role, r in carried["db1"] if role != "monitoring_agent"] == [
        *[("postgresql", f) for f in folders],
        ("postgresql", "file /etc/postgresql-common/createcluster.d/50-provisioner.conf"),
        *[("pgbackrest", f) for f in folders],
        ("pgbackrest", "file /etc/postgresql-common/createcluster.d/60-pgbackrest.conf")]
    assert {role for resources in carried.values() for role, _r in resources} == \
        {"monitoring_agent", "pgbackrest", "postgresql"}


# --- writes that come along -------------------------------------------------------------------

DEFAULTS = "/etc/default/prometheus-node-exporter"
THERE = {"exists": True, "type": "dir", "mode": "0755", "owner": "root", "group": "root"}


def along(role, *, guards=None, handlers=None, folders=("/etc", "/etc/default")):
    roles = [("base", [apt.packages(["curl"])]), ("agent", role)]
    return apt_batch.plan(roles, facts(roles, files_=[(f, THERE) for f in folders]),
                          {"agent": guards or []}, {"agent": handlers or {"restart x": []}})


def test_a_write_before_its_package_comes_along_and_is_made_first():
    b = along([files.file(DEFAULTS, "ARGS=x\n", notify="restart x"),
               apt.packages(["prometheus-node-exporter"])])
    assert b.names == ("curl", "prometheus-node-exporter") and b.left == ()
    assert [(c.role, c.change.resource) for c in b.carried] == [("agent", f"file {DEFAULTS}")]
    assert b.carried[0].change.notify == ("restart x",)     # its role's handler, run there
    assert [c.resource for c in b.changes] == [f"file {DEFAULTS}", b.change.resource]
    assert b.change.steps[0]["write"] == DEFAULTS and "install" in b.change.steps[-1]["run"]
    assert f"written first: file {DEFAULTS} (agent)" in b.change.why
    assert "+ARGS=x" in b.change.diff
    assert Facts(b.expect).file(DEFAULTS).exists            # check mode: not written twice


def test_a_folder_made_first_takes_the_files_in_it_along():
    b = along([files.directory("/etc/postgresql-common"),
               files.directory("/etc/postgresql-common/createcluster.d"),
               files.file("/etc/postgresql-common/createcluster.d/50-drill.conf", "x\n"),
               apt.packages(["postgresql-17"])], folders=("/etc",))
    assert [c.change.resource for c in b.carried] == [
        "directory /etc/postgresql-common", "directory /etc/postgresql-common/createcluster.d",
        "file /etc/postgresql-common/createcluster.d/50-drill.conf"]
    assert b.names == ("curl", "postgresql-17")


NOT_ALONG = [
    (files.file(DEFAULTS, "x\n", owner="prometheus"), "its owner comes with a package"),
    (files.file(DEFAULTS, "x\n", validate="true {path}"), "it is validated by a command"),
    (files.file(DEFAULTS, "x\n", after=[["systemctl", "daemon-reload"]]), "a command runs after it"),
    (files.file(DEFAULTS, "x\n", notify="restart y"), "it notifies a handler its role lacks"),
    (files.file("/etc/new/x.conf", "x\n"), "its folder is not there yet"),
    (commands.command(["true"], name="t"), "it is a command"),
]


@pytest.mark.parametrize("write, why", NOT_ALONG, ids=[w for _r, w in NOT_ALONG])
def test_a_write_that_needs_more_than_a_folder_stays_with_its_package_in_its_role(write, why):
    b = along([write, apt.packages(["prometheus-node-exporter"])])
    assert b.carried == () and b.names == ("curl",)
    assert b.left == (apt_batch.Left("agent", "apt prometheus-node-exporter",
                                     f"after {write.id} of its role, which changes something first"),)


def test_a_write_that_notifies_comes_along_only_when_its_packages_are_all_missing():
    """With one of them installed, its unit runs on the old file: its restart must not depend
    on the batch succeeding, so the write and the install stay in the role."""
    role = [files.file(DEFAULTS, "ARGS=x\n", notify="restart x"),
            apt.packages(["prometheus-node-exporter", "prometheus-redis-exporter"])]
    roles = [("base", [apt.packages(["curl"])]), ("agent", role)]
    on = facts(roles, {"prometheus-node-exporter": "1.9"}, files_=[(f, THERE) for f in ("/etc", "/etc/default")])
    b = apt_batch.plan(roles, on, {}, {"agent": {"restart x": []}})
    assert b.carried == () and b.names == ("curl",)
    assert b.left == (apt_batch.Left("agent", "apt prometheus-node-exporter prometheus-redis-exporter",
                                     f"after file {DEFAULTS} of its role, which changes something first"),)
    # a write that notifies nothing still comes along
    quiet = [files.file(DEFAULTS, "ARGS=x\n"), role[1]]
    assert len(apt_batch.plan([("agent", quiet)], on, {}, {}).carried) == 1


def test_a_guarded_write_stays_in_its_role():
    from provisioner.api import Guard
    guard = Guard("sshd", (DEFAULTS,), lambda host: None)
    b = along([files.file(DEFAULTS, "x\n"), apt.packages(["prometheus-node-exporter"])], guards=[guard])
    assert b.carried == () and b.names == ("curl",)


def test_only_writes_before_the_roles_first_package_and_first_other_change_come_along():
    later = along([apt.packages(["jq"]), files.file(DEFAULTS, "x\n"), apt.packages(["prometheus-node-exporter"])])
    assert later.carried == () and later.names == ("curl", "jq")
    after_other = along([files.file("/etc/default/a", "a\n"), commands.command(["true"], name="t"),
                         files.file(DEFAULTS, "x\n"), apt.packages(["prometheus-node-exporter"])])
    assert after_other.carried == () and after_other.left[0].why == \
        "after file /etc/default/a of its role, which changes something first"
    # two packages with nothing between them both join, as before
    both = along([files.file(DEFAULTS, "x\n"), apt.packages(["a"]), apt.packages(["b"])])
    assert both.names == ("curl", "a", "b") and len(both.carried) == 1

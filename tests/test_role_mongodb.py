"""Role `mongodb`.

No MongoDB server package can be had on the testbed (not in Debian; MongoDB's repository and
download site are unreachable: TESTBED-NOTES "What does not exist here"). So:

* live, on a real test server: the repository's .sources file and keyring from a key generated
  here with gpg (mongodb_install: false: no apt-get update, nothing installed), a key fetched by
  the server from a URL (the vendor's per-series URL pattern, served here) and pinned by sha256,
  a series change (7.0 -> 8.0) leaving one repository, a bad var failing the plan; and the two
  install paths with a stand-in package instead of MongoDB's (mongodb_server: false): from a
  signed apt repository served on the host side, and from a folder of .debs (upload, install,
  upgrade);
* live with mongod, only when PROVISIONER_MONGODB_DEBS points at a folder of MongoDB .debs
  (mongodb-org-server, mongodb-mongosh and their dependencies): otherwise skipped with that
  reason;
* pure: mongod.conf against a golden file and parsed with PyYAML, the mongosh scripts (text,
  secrets only on stdin, `node --check`, and run by a real mongosh against no server when one
  is on PATH), var validation, the plans of the role's own resources, the .deb reader.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import roles.mongodb
from conftest import invoke
from engine_helpers import ADDRESSES, REPO, Run, inventory, sh
from engine_helpers import test_server as server_for_tests
from provisioner.change import Noop
from provisioner.facts import Facts
from provisioner.roles import available_roles, load_role
from provisioner.secret import Secret
from provisioner.testbed import config as tb_config

# the secrets these tests resolve, and those role code derives from them, register with the
# process-wide redactor as in a run; forgotten after each test
pytestmark = pytest.mark.usefixtures("forget_secrets")

SERVER = server_for_tests("vault")
# the repository suite follows the server's release (vault is trixie; bench servers bookworm)
CODENAME = next((spec.release for spec in tb_config.inventory_servers() if spec.name == SERVER),
                "bookworm")
FIXTURES = REPO / "tests" / "fixtures" / "mongodb"
ADMIN_PW = "adm-Pw'7\"q</x>-never-print"
APP_PW = "app-Pw-93kd-never-print"
NO_MONGOD = ("no MongoDB server package is reachable from the test servers (not in Debian; "
             "MongoDB's repository and downloads are unreachable): set "
             "PROVISIONER_MONGODB_DEBS=/path/to/folder/of/debs to run this test")


# --- helpers ------------------------------------------------------------------------------------

ROLE_INFO = available_roles()["mongodb"]
ROLE = load_role(ROLE_INFO)
M = roles.mongodb


def role_vars(**over) -> dict:
    v = dict(ROLE_INFO.defaults)
    v["mongodb_admin_password"] = Secret(ADMIN_PW)
    v["mongodb_app_password"] = Secret(APP_PW)
    v.update(over)
    return v


def ctx(address="10.77.0.13", name="db1", codename="bookworm", inv_dir: Path = FIXTURES):
    return SimpleNamespace(host=SimpleNamespace(name=name, address=address),
                           inventory=SimpleNamespace(path=inv_dir / "inventory.yml"),
                           os={"codename": codename}, check=False)


def resources(**over):
    return list(ROLE.resources(role_vars(**over), ctx()))


def by_id(res, ident):
    return next(r for r in res if r.id == ident)


def init_entry():
    return [{"db": "shop",
             "collections": [
                 {"name": "users",
                  "options": {"validator": {"$jsonSchema": {"bsonType": "object",
                                                            "required": ["email"]}}},
                  "indexes": [{"keys": {"email": 1, "createdAt": -1}, "unique": True,
                               "name": "email_createdAt"},
                              {"keys": {"lastSeen": 1}, "expireAfterSeconds": 86400}]},
                 "orders"],
             "seed": ["seed/users.json", {"file": "seed/settings.ndjson",
                                          "collection": "settings"}]}]


def all_run_argv(changes):
    for c in changes:
        for step in c.steps:
            yield from [step.get("run") or []] + list(step.get("after") or [])


def th(name):
    import testinfra
    return testinfra.get_host(f"ssh://{name}", ssh_config=str(REPO / ".testbed" / "ssh_config"))


def live_inventory(tmp_path, vars, name="mongotest", secrets=None):
    inv = inventory(tmp_path, [SERVER], ["mongodb"], vars=vars, name=name)
    return inv.resolve({"mongodb_admin_password": Secret(ADMIN_PW),
                        "mongodb_app_password": Secret(APP_PW), **(secrets or {})})


# --- pure: mongod.conf --------------------------------------------------------------------------

def test_mongod_conf_matches_the_golden_file_and_is_the_yaml_mongod_reads():
    v = role_vars(mongodb_port=27018, mongodb_cache_size_gb=1.5)
    s = M.settings(v, ctx(address="10.0.0.5"))
    text = M.render_config(s)
    assert text == (FIXTURES / "mongod.conf.golden").read_text()
    doc = yaml.safe_load(text)
    assert doc["net"] == {"port": 27018, "bindIp": "127.0.0.1,10.0.0.5"}
    assert doc["security"] == {"authorization": "enabled"}
    assert doc["storage"] == {"dbPath": "/var/lib/mongodb",
                              "wiredTiger": {"engineConfig": {"cacheSizeGB": 1.5}}}
    assert doc["systemLog"] == {"destination": "file", "path": "/var/log/mongodb/mongod.log",
                                "logAppend": True}
    # the template resource of the role writes exactly this, and restarts a running mongod
    tpl = by_id(list(ROLE.resources(v, ctx(address="10.0.0.5"))), "template /etc/mongod.conf")
    assert tpl.content.text == text and tpl.after == (("systemctl", "try-restart", "mongod.service"),)


def test_mongod_conf_defaults_and_ipv6():
    doc = yaml.safe_load(M.render_config(M.settings(role_vars(), ctx())))
    assert doc["storage"] == {"dbPath": "/var/lib/mongodb"}        # mongod's own cache default
    assert doc["net"] == {"port": 27017, "bindIp": "127.0.0.1,10.77.0.13"}
    doc = yaml.safe_load(M.render_config(M.settings(
        role_vars(mongodb_bind_address="fd00::5", mongodb_cache_size_gb=2), ctx())))
    assert doc["net"] == {"port": 27017, "bindIp": "127.0.0.1,fd00::5", "ipv6": True}
    assert doc["storage"]["wiredTiger"]["engineConfig"]["cacheSizeGB"] == 2


@pytest.mark.parametrize("over, var, words", [
    ({"mongodb_version": "4.4"}, "mongodb_version", "older than 5.0"),
    ({"mongodb_version": "7"}, "mongodb_version", "major.minor"),
    ({"mongodb_port": 80}, "mongodb_port", "1024 to 65535"),
    ({"mongodb_cache_size_gb": 0.1}, "mongodb_cache_size_gb", "0.25 to 10000"),
    ({"mongodb_cache_size_gb": "1"}, "mongodb_cache_size_gb", "0.25 to 10000"),
    ({"mongodb_bind_address": "203.0.113.7"}, "mongodb_bind_address", "not a private address"),
    ({"mongodb_bind_address": "0.0.0.0"}, "mongodb_bind_address", "not a private address"),
    ({"mongodb_db_path": "/var/lib/../mongo"}, "mongodb_db_path", "normalised"),
    ({"mongodb_packages": []}, "mongodb_packages", "package names"),
    ({"mongodb_repo_key_b64": "not base64!"}, "mongodb_repo_key_b64", "base64"),
    ({"mongodb_repo_key_b64": base64.b64encode(b"hello").decode()}, "mongodb_repo_key_b64",
     "OpenPGP"),
    ({"mongodb_repo_key_sha256": "ABC"}, "mongodb_repo_key_sha256", "64 lowercase hex"),
    ({"mongodb_packages_dir": "no/such/folder"}, "mongodb_packages_dir", "not a folder"),
    ({"mongodb_app_database": "admin"}, "mongodb_app_database", "not admin"),
    ({"mongodb_app_roles": ["read write"]}, "mongodb_app_roles", "role names"),
    ({"mongodb_app_password": "plain text"}, "mongodb_app_password", "vault reference"),
    ({"mongodb_admin_password_previous": "plain"}, "mongodb_admin_password_previous",
     "vault reference"),
    ({"mongodb_init": [{"db": "shop", "seed": ["seed/no-id.json"]}]}, "mongodb_init",
     "has no _id"),
    ({"mongodb_init": [{"db": "shop", "seed": ["seed/missing.json"]}]}, "mongodb_init",
     "does not exist"),
    ({"mongodb_init": [{"db": "shop", "collections": [
        {"name": "u", "indexes": [{"keys": {"a": 1}, "uniq": True}]}]}]}, "mongodb_init",
     "unknown key(s) ['uniq']"),
    ({"mongodb_init": [{"db": "shop", "collections": [
        {"name": "u", "indexes": [{"keys": {"a": 2}}]}]}]}, "mongodb_init", "1, -1, text"),
    ({"mongodb_init": [{"db": "shop"}, {"db": "shop"}]}, "mongodb_init", "appears twice"),
    ({"mongodb_init": [{"db": "local"}]}, "mongodb_init", "not admin, local"),
    ({"mongodb_packages": ["mongodb-org-server"]}, "mongodb_packages", "provides mongosh"),
    ({"mongodb_packages": ["mongodb-mongosh"]}, "mongodb_packages", "provides mongod"),
])
def test_bad_vars_are_refused_naming_the_var_and_a_fix(over, var, words):
    with pytest.raises(ValueError) as e:
        resources(**over)
    assert str(e.value).startswith(var + ":") and words in str(e.value), str(e.value)


def test_a_host_whose_inventory_address_is_public_needs_mongodb_bind_address():
    with pytest.raises(ValueError, match="mongodb_bind_address: the host's inventory address"):
        list(ROLE.resources(role_vars(), ctx(address="203.0.113.9")))
    res = list(ROLE.resources(role_vars(mongodb_bind_address="10.1.2.3"), ctx(address="203.0.113.9")))
    assert '"127.0.0.1,10.1.2.3"' in by_id(res, "template /etc/mongod.conf").content.text


# --- pure: the plan of each var combination -----------------------------------------------------

def test_default_plan_uses_the_vendor_repository_and_its_per_series_key_url():
    res = resources()
    assert [r.id for r in res] == [
        "apt repository mongodb-org-7.0", "mongodb repositories of other series",
        "apt mongodb-org-server mongodb-mongosh", "template /etc/mongosh.conf",
        "directory /var/lib/mongodb", "directory /var/log/mongodb", "template /etc/mongod.conf",
        "service mongod.service", "mongodb users"]
    repo = res[0]
    assert repo.sources() == (
        "# managed by provisioner\nTypes: deb\nURIs: https://repo.mongodb.org/apt/debian\n"
        "Suites: bookworm/mongodb-org/7.0\nComponents: main\n"
        "Signed-By: /etc/apt/keyrings/mongodb-org-7.0.asc\n")
    assert repo.key_url == "https://www.mongodb.org/static/pgp/server-7.0.asc"
    assert repo.update is True
    assert res[2].update_cache_max_age == 0          # refresh first when installing
    assert "mongodb-org-7.0.sources" not in " ".join(res[1].paths)
    assert "/etc/apt/sources.list.d/mongodb-org-8.0.sources" in res[1].paths
    res = resources(mongodb_version="8.0")
    assert res[0].key_url.endswith("/server-8.0.asc") and "8.0" in res[0].sources()


def test_install_false_writes_the_repository_files_only_and_never_updates_apt():
    key = base64.b64encode(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEfake\n"
                           b"-----END PGP PUBLIC KEY BLOCK-----\n").decode()
    res = resources(mongodb_install=False, mongodb_repo_key_b64=key)
    assert [r.id for r in res] == ["apt repository mongodb-org-7.0",
                                   "mongodb repositories of other series"]
    facts = Facts({"files": {p: {"exists": False} for r in res for p in r.facts()["files"]}})
    (change,) = res[0].plan(facts)
    argv = [" ".join(s["run"]) for s in change.steps if "run" in s]
    assert not any("update" in a for a in argv), argv
    assert res[0].keyring == "/etc/apt/keyrings/mongodb-org-7.0.asc"
    assert res[1].plan(facts) == [Noop(res[1].id, "none: only 7.0 is configured")]


def test_server_false_installs_the_packages_only():
    res = resources(mongodb_server=False, mongodb_packages=["mongodb-mongosh"])
    assert [r.id for r in res] == ["apt repository mongodb-org-7.0",
                                   "mongodb repositories of other series", "apt mongodb-mongosh"]


def test_users_script_runs_when_its_marker_differs_and_passwords_change_the_digest():
    v = role_vars(mongodb_init=init_entry())
    res = list(ROLE.resources(v, ctx()))
    users = by_id(res, "mongodb users")
    assert users.marker == "/var/lib/mongodb/.provisioner-users"
    absent = Facts({"files": {users.marker: {"exists": False}}})
    (change,) = users.plan(absent)
    assert change.steps[0]["run"] == ["mongosh", "--quiet", "--nodb", "--norc", "--file",
                                      "/dev/stdin"]
    assert change.steps[0]["stdin"] == users.script and APP_PW in users.script
    assert change.steps[1]["write"] == users.marker and change.steps[1]["mode"] == "0600"
    assert "never run" in change.why
    # converged: the marker holds the digest
    done = absent.overlay(users.expect(absent))
    assert isinstance(users.plan(done)[0], Noop)
    # nothing secret where people or the process table can see it
    for text in [change.why, repr(users), *(" ".join(a) for a in all_run_argv([change]))]:
        assert ADMIN_PW not in text and APP_PW not in text
    # a new app password, a new app role: a new digest; an unrelated var: the same
    digest = users.digest
    rotated = Secret("rotated-app-pw-5k2", register=False)     # register=False: the process-wide
    assert M.users_script(role_vars(mongodb_app_password=rotated), ctx(),   # redactor stays as is
                          M.settings(v, ctx())).digest != digest
    assert M.users_script(role_vars(mongodb_app_roles=["readWrite", "dbAdmin"]), ctx(),
                          M.settings(v, ctx())).digest != digest
    assert M.users_script(role_vars(mongodb_cache_size_gb=3), ctx(),
                          M.settings(v, ctx())).digest == digest
    # the same passwords on another host: another digest (the salt is the host's name), so a
    # marker copied along with a data directory does not vouch for that host's users
    assert M.users_script(v, ctx(name="db2"), M.settings(v, ctx())).digest != digest
    assert digest not in users.script


def test_init_spec_hash_covers_the_seed_files_and_runs_once(tmp_path):
    shutil.copytree(FIXTURES / "seed", tmp_path / "seed")
    v = role_vars(mongodb_init=init_entry())
    first = by_id(list(ROLE.resources(v, ctx(inv_dir=tmp_path))), "mongodb init shop")
    assert first.marker == "/var/lib/mongodb/.provisioner-init-shop"
    facts = Facts({"files": {first.marker: {"exists": True, "type": "file", "mode": "0600",
                                            "owner": "root", "group": "root",
                                            "content": first.digest + "\n"}}})
    assert isinstance(first.plan(facts)[0], Noop)
    # a seed file edited on the controller: the spec changed, the init runs again
    seed = tmp_path / "seed" / "users.json"
    seed.write_text(seed.read_text().replace("ada@example.org", "ada@example.net"))
    again = by_id(list(ROLE.resources(v, ctx(inv_dir=tmp_path))), "mongodb init shop")
    (change,) = again.plan(facts)
    assert "changed since the last run" in change.why
    # mongodb_init_dir moves where relative seed paths start
    moved = role_vars(mongodb_init=init_entry(), mongodb_init_dir=str(FIXTURES))
    assert by_id(list(ROLE.resources(moved, ctx(inv_dir=tmp_path))),
                 "mongodb init shop").digest == first.digest


# --- pure: the mongosh scripts ------------------------------------------------------------------

def render_scripts(port=27017, wait=60):
    v = role_vars(mongodb_init=init_entry())
    spec = M.users_spec(v)
    users = M.render_users_js(spec, port, v["mongodb_admin_password"], v["mongodb_app_password"],
                              Secret("old-admin-pw", register=False), wait_seconds=wait)
    (init,) = M.init_specs(v, ctx())
    init_js = M.render_init_js(init, port, "admin", v["mongodb_admin_password"], wait_seconds=wait)
    return users, init_js, init


def test_users_script_text():
    users, _, _ = render_scripts()
    # the passwords are JS string literals, escaped, in the script that goes to stdin
    assert 'const ADMIN_PWD = "adm-Pw\\u00277\\"q\\u003c/x\\u003e-never-print";' in users
    assert f'const APP_PWD = "{APP_PW}";' in users
    assert 'const ADMIN_PREVIOUS_PWD = "old-admin-pw";' in users
    assert ('const SPEC = {"admin": {"user": "admin"}, "app": {"user": "app", "db": "app", '
            '"roles": ["readWrite"]}};') in users
    for needle in ('createUser({ user: SPEC.admin.user, pwd: ADMIN_PWD, roles: ADMIN_ROLES })',
                   'appDb.createUser({ user: SPEC.app.user, pwd: APP_PWD, roles: roles })',
                   'appDb.updateUser(SPEC.app.user, { pwd: APP_PWD, roles: roles })',
                   'old.getDB("admin").updateUser(SPEC.admin.user, { pwd: ADMIN_PWD })',
                   '"127.0.0.1:" + PORT', "const PORT = 27017;", "const WAIT_MS = 60000;"):
        assert needle in users, needle
    assert users.rstrip().endswith("main();")
    no_previous = M.render_users_js(M.users_spec(role_vars()), 27017, Secret("admin-pw-x9", register=False),
                                    Secret("app-pw-x9", register=False))
    assert "const ADMIN_PREVIOUS_PWD = null;" in no_previous


def test_init_script_text_keeps_index_key_order_and_seed_files_verbatim():
    _, init_js, init = render_scripts()
    spec_line = next(line for line in init_js.splitlines() if line.startswith("const SPEC = "))
    spec = json.loads(spec_line[len("const SPEC = "):-1])
    users = spec["collections"][0]
    assert list(users["indexes"][0]["keys"]) == ["email", "createdAt"]      # compound order
    assert users["indexes"][0]["options"] == {"unique": True, "name": "email_createdAt"}
    assert users["indexes"][1] == {"keys": {"lastSeen": 1}, "options": {"expireAfterSeconds": 86400}}
    assert spec["collections"][1] == {"name": "orders", "options": {}, "indexes": []}
    assert [(s["file"], s["collection"], s["format"]) for s in spec["seeds"]] == [
        ("users.json", "users", "json"), ("settings.ndjson", "settings", "ndjson")]
    assert spec["sha256"] == init["sha256"]
    texts_line = next(line for line in init_js.splitlines() if line.startswith("const SEED_TEXT = "))
    texts = json.loads(texts_line[len("const SEED_TEXT = "):-1])
    assert texts[0] == (FIXTURES / "seed" / "users.json").read_text()
    for needle in ('tracking.findOne({ _id: SPEC.db })', 'database.createCollection(c.name, c.options)',
                   'createIndex(ix.keys, ix.options)', 'EJSON.parse(text, { relaxed: false })',
                   'coll.insertMany(missing, { ordered: true })', '{ collMod: c.name }',
                   'tracking.replaceOne({ _id: SPEC.db }'):
        assert needle in init_js, needle


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed on this machine")
def test_scripts_are_valid_javascript(tmp_path):
    users, init_js, _ = render_scripts()
    for name, text in (("users.js", users), ("init.js", init_js)):
        (tmp_path / name).write_text(text)
        r = subprocess.run(["node", "--check", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


MONGOSH = shutil.which("mongosh")


@pytest.mark.skipif(not MONGOSH, reason="mongosh is not installed on this machine (the npm "
                    "package `mongosh` provides it): the scripts are only syntax-checked")
def test_a_real_mongosh_runs_the_scripts_from_stdin_and_fails_clearly_without_mongod():
    users, init_js, _ = render_scripts(port=9, wait=1)           # nothing listens on port 9
    for text in (users, init_js):
        r = subprocess.run(["mongosh", "--quiet", "--nodb", "--norc", "--file", "/dev/stdin"],
                           input=text, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert "mongod does not answer on 127.0.0.1:9 after 1 s" in out, out
        assert ADMIN_PW not in out and APP_PW not in out


@pytest.mark.skipif(not MONGOSH, reason="mongosh is not installed on this machine (the npm "
                    "package `mongosh` provides it)")
def test_a_real_mongosh_parses_the_seed_files_with_their_bson_types():
    _, init_js, _ = render_scripts()
    harness = init_js.rstrip()
    assert harness.endswith("main();")
    harness = harness[:-len("main();")] + """
const out = SPEC.seeds.map((seed, i) => parseSeed(seed, SEED_TEXT[i]).map((d) => ({
  id: EJSON.stringify(d._id, { relaxed: false }),
  types: Object.keys(d).map((k) => k + ":" + (d[k] === null ? "null" : d[k].constructor.name)),
})));
print(JSON.stringify(out));
"""
    r = subprocess.run(["mongosh", "--quiet", "--nodb", "--norc", "--file", "/dev/stdin"],
                       input=harness, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    users, settings = json.loads(r.stdout.strip().splitlines()[-1])
    assert users[0]["id"] == '{"$oid":"65a000000000000000000001"}'
    assert "visits:Long" in users[0]["types"] and "createdAt:Date" in users[0]["types"]
    assert users[1]["id"] == '{"$numberInt":"2"}'
    assert [d["id"] for d in settings] == ['"theme"', '"locale"']


# --- pure: .debs from a folder ------------------------------------------------------------------

def build_deb(folder: Path, package: str, version: str, compress: str = "xz") -> Path:
    stage = folder.parent / f"stage-{package}-{version}"
    (stage / "DEBIAN").mkdir(parents=True)
    (stage / "usr" / "share" / package).mkdir(parents=True)
    (stage / "usr" / "share" / package / "VERSION").write_text(version + "\n")
    (stage / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: provisioner tests <test@provisioner.invalid>\n"
        "Description: stand-in package for the mongodb role's tests\n"
        " Installs /usr/share/<package>/VERSION.\n")
    folder.mkdir(parents=True, exist_ok=True)
    deb = folder / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compress}", "--build", str(stage),
                    str(deb)], check=True, capture_output=True)
    shutil.rmtree(stage)
    return deb


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="dpkg-deb is not installed here")
def test_deb_reader_and_the_install_plan(tmp_path):
    folder = tmp_path / "debs"
    a = build_deb(folder, "provisioner-stand-in-a", "1:2.0-1", "xz")
    build_deb(folder, "provisioner-stand-in-b", "1.0", "gzip")
    d = M.read_deb(a)
    assert (d.package, d.version, d.architecture) == ("provisioner-stand-in-a", "1:2.0-1", "all")
    v = role_vars(mongodb_packages_dir=str(folder), mongodb_server=False,
                  mongodb_packages=["provisioner-stand-in-a"])
    (inst,) = list(ROLE.resources(v, ctx()))
    assert inst.id == "debs provisioner-stand-in-a provisioner-stand-in-b"
    facts = Facts({"packages": {"installed": {"provisioner-stand-in-a": "1:1.0-1",
                                              "provisioner-stand-in-b": "1.0"},
                                "lists_age": 10}})
    (change,) = inst.plan(facts)
    assert change.why.startswith("provisioner-stand-in-a 1:1.0-1 != 1:2.0-1 (uploading 1 .deb(s)")
    writes = [s for s in change.steps if "write" in s]
    assert [w["write"] for w in writes] == [f"{M.STAGING}/{a.name}"]        # only what is needed
    assert base64.b64decode(writes[0]["b64"]) == a.read_bytes()
    runs = [s["run"] for s in change.steps if "run" in s]
    assert runs[1][-2:] == ["--no-install-recommends", f"{M.STAGING}/{a.name}"]
    assert runs[-1] == ["rm", "-rf", "--", M.STAGING]
    assert not any("update" in r for r in runs)                               # lists are fresh
    stale = Facts({"packages": {"installed": {"provisioner-stand-in-a": None,
                                              "provisioner-stand-in-b": None},
                                "lists_age": None}})
    (change,) = inst.plan(stale)
    assert any("update" in s.get("run", []) for s in change.steps)
    noupdate = role_vars(mongodb_packages_dir=str(folder), mongodb_server=False,
                         mongodb_apt_update=False, mongodb_packages=["provisioner-stand-in-a"])
    (change,) = list(ROLE.resources(noupdate, ctx()))[0].plan(stale)
    assert not any("update" in s.get("run", []) for s in change.steps)
    assert isinstance(inst.plan(facts.overlay(inst.expect(facts)))[0], Noop)
    # packages the folder lacks, two versions of one package, and a folder without .debs
    with pytest.raises(ValueError, match="mongodb_packages: mongodb-org-server, mongodb-mongosh not among"):
        list(ROLE.resources(role_vars(mongodb_packages_dir=str(folder)), ctx()))
    build_deb(folder, "provisioner-stand-in-b", "1.1", "gzip")
    with pytest.raises(ValueError, match="both package provisioner-stand-in-b"):
        list(ROLE.resources(v, ctx()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .deb file"):
        list(ROLE.resources(role_vars(mongodb_packages_dir=str(tmp_path / "empty")), ctx()))


# --- live: repository and key on a real server, no MongoDB package needed -----------------------

@pytest.fixture
def fresh(testbed):
    invoke("testbed.reset", SERVER)
    return SERVER


SOURCES = "/etc/apt/sources.list.d/mongodb-org-{v}.sources"
KEYRING = "/etc/apt/keyrings/mongodb-org-{v}.asc"


def test_repository_and_key_are_set_up_without_installing(tmp_path, fresh):
    from aptrepo import build_repo
    repo = build_repo(tmp_path / "key")             # an ed25519 key made here with gpg
    stamp = "/var/lib/apt/periodic/provisioner-update-stamp"
    lists_before = sh(fresh, "ls /var/lib/apt/lists; stat -c %Y " + stamp + " 2>/dev/null || true").stdout
    inv = live_inventory(tmp_path, {"mongodb_install": False, "mongodb_repo_key_b64": repo.key_b64})
    first = Run(inv)
    assert first.exit_code == 0, first.report("failed")
    assert first.host(fresh)["changed"] == 1
    second = Run(inv)
    assert second.exit_code == 0 and second.host(fresh)["changed"] == 0, second.steps(status="changed")
    h = th(fresh)
    src = h.file(SOURCES.format(v="7.0"))
    assert src.mode == 0o644 and src.user == "root"
    assert src.content_string == (
        "# managed by provisioner\nTypes: deb\nURIs: https://repo.mongodb.org/apt/debian\n"
        f"Suites: {CODENAME}/mongodb-org/7.0\nComponents: main\n"
        f"Signed-By: {KEYRING.format(v='7.0')}\n")
    key = h.file(KEYRING.format(v="7.0"))
    assert key.mode == 0o644 and key.user == "root" and key.sha256sum == repo.key_sha256
    # apt reads the file: the index it would fetch, printed without fetching anything
    uris = h.check_output("apt-get update --print-uris")
    assert f"repo.mongodb.org/apt/debian/dists/{CODENAME}/mongodb-org/7.0/InRelease" in uris
    # and did not fetch: no apt-get update ran, nothing of MongoDB is installed
    assert sh(fresh, "ls /var/lib/apt/lists; stat -c %Y " + stamp + " 2>/dev/null || true").stdout == lists_before
    assert not h.package("mongodb-org-server").is_installed and not h.exists("mongosh")

    # a new series replaces the old one's files: one MongoDB repository is left
    inv8 = live_inventory(tmp_path, {"mongodb_install": False, "mongodb_version": "8.0",
                                     "mongodb_repo_key_b64": repo.key_b64}, name="mongo8")
    run = Run(inv8)
    assert run.exit_code == 0, run.report("failed")
    removed = [e for e in run.steps(status="changed") if e["resource"] == "mongodb repositories of other series"]
    assert removed and SOURCES.format(v="7.0") in removed[0]["reason"]
    assert not h.file(SOURCES.format(v="7.0")).exists and not h.file(KEYRING.format(v="7.0")).exists
    assert f"Suites: {CODENAME}/mongodb-org/8.0" in h.file(SOURCES.format(v="8.0")).content_string
    assert Run(inv8).host(fresh)["changed"] == 0

    # a bad var fails the plan, naming the var; the server is left as it was
    before = sh(fresh, "ls -l /etc/apt/sources.list.d /etc/apt/keyrings").stdout
    bad = Run(live_inventory(tmp_path, {"mongodb_install": False, "mongodb_version": "4.4",
                                        "mongodb_repo_key_b64": repo.key_b64}, name="mongobad"))
    assert bad.exit_code == 1
    (failed,) = bad.steps(status="failed")
    assert failed["resource"] == "plan" and "mongodb_version: 4.4 is older than 5.0" in failed["reason"]
    assert sh(fresh, "ls -l /etc/apt/sources.list.d /etc/apt/keyrings").stdout == before


def test_the_key_url_is_fetched_by_the_server_and_pinned_by_sha256(tmp_path, fresh):
    from aptrepo import build_repo, serve
    from provisioner.testbed import config
    repo = build_repo(tmp_path / "key")
    # the vendor's layout: one key per series at .../server-<series>.asc
    shutil.copy(repo.key_asc, repo.root / "server-7.0.asc")
    with serve(repo, config.layout().gateway) as url:
        wrong = live_inventory(tmp_path, {"mongodb_install": False,
                                          "mongodb_repo_key_url": url + "server-{version}.asc",
                                          "mongodb_repo_key_sha256": "0" * 64}, name="mongopin")
        run = Run(wrong)
        assert run.exit_code == 1
        assert any("sha256" in e["reason"] and "!= expected" in e["reason"]
                   for e in run.steps(status="failed")), run.steps(status="failed")
        h = th(fresh)
        assert not h.file(KEYRING.format(v="7.0")).exists
        inv = live_inventory(tmp_path, {"mongodb_install": False,
                                        "mongodb_repo_key_url": url + "server-{version}.asc",
                                        "mongodb_repo_key_sha256": repo.key_sha256})
        assert Run(inv).exit_code == 0
        assert h.file(KEYRING.format(v="7.0")).sha256sum == repo.key_sha256
        assert Run(inv).host(fresh)["changed"] == 0


# --- live: the two install paths, with a stand-in package -------------------------------------

def test_packages_from_a_signed_repository(tmp_path, fresh):
    """The repository path end to end (apt-get update --error-on=any, signed, install), with the
    test repository's package standing in for MongoDB's."""
    from aptrepo import build_repo, serve
    from provisioner.testbed import config
    repo = build_repo(tmp_path / "repo")
    with serve(repo, config.layout().gateway) as url:
        inv = live_inventory(tmp_path, {"mongodb_repo_uri": url, "mongodb_repo_suite": repo.suite,
                                        "mongodb_repo_key_b64": repo.key_b64,
                                        "mongodb_server": False,
                                        "mongodb_packages": [repo.package]})
        first = Run(inv)
        assert first.exit_code == 0, first.report("failed")
        h = th(fresh)
        assert h.package(repo.package).version == "1.0"
        assert f"Suites: {repo.suite}" in h.file(SOURCES.format(v="7.0")).content_string
        second = Run(inv)
        assert second.host(fresh)["changed"] == 0, second.steps(status="changed")


def test_packages_from_a_folder_of_debs_are_uploaded_installed_and_upgraded(tmp_path, fresh):
    folder = tmp_path / "debs"
    build_deb(folder, "provisioner-stand-in", "1.0")
    vars_ = {"mongodb_packages_dir": "debs",            # relative: to the inventory's folder
             "mongodb_server": False, "mongodb_packages": ["provisioner-stand-in"]}
    inv = live_inventory(tmp_path, vars_)
    first = Run(inv)
    assert first.exit_code == 0, first.report("failed")
    h = th(fresh)
    assert h.package("provisioner-stand-in").version == "1.0"
    assert h.file("/usr/share/provisioner-stand-in/VERSION").content_string == "1.0\n"
    assert not h.file("/var/lib/provisioner/mongodb-debs").exists        # uploads deleted
    second = Run(inv)
    assert second.host(fresh)["changed"] == 0 and second.host(fresh)["remote_commands"] <= 4
    (ok,) = [e for e in second.lines if e.get("resource") == "debs provisioner-stand-in"]
    assert ok["reason"].startswith("already installed from")
    # a newer .deb in the folder: uploaded and installed, the old one is not sent again
    (folder / "provisioner-stand-in_1.0_all.deb").unlink()
    build_deb(folder, "provisioner-stand-in", "1.1")
    third = Run(inv)
    assert third.exit_code == 0, third.report("failed")
    (ch,) = third.steps(status="changed")
    assert "provisioner-stand-in 1.0 != 1.1" in ch["reason"]
    assert h.package("provisioner-stand-in").version == "1.1"
    assert Run(inv).host(fresh)["changed"] == 0


# --- live with mongod: only with a folder of MongoDB .debs ----------------------------------------

MONGODB_DEBS = os.environ.get("PROVISIONER_MONGODB_DEBS")


def mongosh(server: str, js: str) -> subprocess.CompletedProcess:
    """Run JS on the server with mongosh reading it from stdin (no secret on a command line)."""
    from provisioner import testbed
    return subprocess.run(testbed.shell_argv(server, ["mongosh", "--quiet", "--nodb", "--norc",
                                                      "--file", "/dev/stdin"]),
                          input=js, capture_output=True, text=True, timeout=120)


def uri(user, pwd, db="admin") -> str:
    q = urllib.parse.quote
    return f"mongodb://{q(user, safe='')}:{q(pwd, safe='')}@127.0.0.1:27017/{db}?authSource={db}"


def can_login(server, user, pwd, db) -> bool:
    js = ("try { const c = new Mongo(%s); c.getDB(%s).runCommand({connectionStatus: 1}); "
          "print('LOGIN-OK') } catch (e) { print('LOGIN-FAILED ' + e.code) }") % (
        json.dumps(uri(user, pwd, db)), json.dumps(db))
    return "LOGIN-OK" in mongosh(server, js).stdout


@pytest.mark.skipif(not MONGODB_DEBS, reason=NO_MONGOD)
def test_mongod_users_and_init_live(tmp_path, fresh):
    shutil.copytree(FIXTURES / "seed", tmp_path / "seed")
    vars_ = {"mongodb_packages_dir": MONGODB_DEBS, "mongodb_cache_size_gb": 0.25,
             "mongodb_init": init_entry()}
    inv = live_inventory(tmp_path, vars_)
    first = Run(inv)
    assert first.exit_code == 0, first.report("failed")
    second = Run(inv)
    assert second.exit_code == 0 and second.host(fresh)["changed"] == 0, second.steps(status="changed")
    h = th(fresh)
    mongod = h.service("mongod")
    assert mongod.is_running and mongod.is_enabled
    ports = h.check_output("ss -Hltn 'sport = :27017'")
    assert "127.0.0.1:27017" in ports and f"{ADDRESSES[fresh]}:27017" in ports
    assert "0.0.0.0:27017" not in ports and "*:27017" not in ports
    doc = yaml.safe_load(h.file("/etc/mongod.conf").content_string)
    assert doc["security"]["authorization"] == "enabled"
    # authorization is on: an unauthenticated client may not list databases
    out = mongosh(fresh, "try { new Mongo('mongodb://127.0.0.1:27017').getDB('admin')"
                         ".adminCommand({listDatabases: 1}); print('OPEN') } catch (e) "
                         "{ print('REFUSED ' + e.code) }").stdout
    assert "REFUSED 13" in out, out
    assert can_login(fresh, "admin", ADMIN_PW, "admin") and can_login(fresh, "app", APP_PW, "app")
    assert not can_login(fresh, "app", "not-the-password", "app")
    # the init: collections, indexes, seed documents, tracking document
    admin_uri = json.dumps(uri("admin", ADMIN_PW))
    out = mongosh(fresh, f"""const c = new Mongo({admin_uri}); const d = c.getDB('shop');
print(JSON.stringify({{cols: d.getCollectionNames().sort(),
  idx: d.users.getIndexes().map((i) => i.name).sort(),
  users: d.users.countDocuments(), settings: d.settings.countDocuments(),
  track: c.getDB('provisioner').init.findOne({{_id: 'shop'}}).sha256}}));""").stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["cols"] == ["orders", "settings", "users"]
    assert got["idx"] == ["_id_", "email_createdAt", "lastSeen_1"]
    assert (got["users"], got["settings"]) == (2, 2)
    assert len(got["track"]) == 64
    # the app password rotated in the vault: the users script runs again and sets it
    rotated = live_inventory(tmp_path, vars_, name="mongorot",
                             secrets={"mongodb_app_password": Secret("app-rotated-pw")})
    run = Run(rotated)
    assert run.exit_code == 0 and [e["resource"] for e in run.steps(status="changed")] == ["mongodb users"]
    assert can_login(fresh, "app", "app-rotated-pw", "app") and not can_login(fresh, "app", APP_PW, "app")
    # a changed init spec runs the init again; seeds are not duplicated
    more = dict(vars_, mongodb_init=[dict(init_entry()[0], collections=init_entry()[0]["collections"] + ["audit"])])
    run = Run(live_inventory(tmp_path, more, name="mongoinit",
                             secrets={"mongodb_app_password": Secret("app-rotated-pw")}))
    assert run.exit_code == 0 and [e["resource"] for e in run.steps(status="changed")] == ["mongodb init shop"]
    got = json.loads(mongosh(fresh, f"""const d = new Mongo({admin_uri}).getDB('shop');
print(JSON.stringify({{cols: d.getCollectionNames().sort(), users: d.users.countDocuments()}}));""").stdout.strip().splitlines()[-1])
    assert got == {"cols": ["audit", "orders", "settings", "users"], "users": 2}

"""The peers benchmark (bench/peers/) without servers: argument parsing,
which servers each tool gets, the workloads as each tool's files, our role for them planned on a
fresh server's facts, and the parsers of each tool's output. Running them needs the testbed
(and, for the peers, their venv): the lead runs them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from peers import ansible_play, fabric_small, peer_venv, run, tools, workload  # noqa: E402

from fake_agent import fresh_server  # noqa: E402


@pytest.fixture
def specs(tmp_path):
    src = tmp_path / "copied.txt"
    src.write_text(workload.COPY_TEXT)
    return {"small": workload.small(src), "provision": workload.provision()}


# --- arguments and servers -------------------------------------------------------------------

def test_peers_arguments_and_their_errors(capsys):
    a = run.parse_args([])
    assert (a.hosts, a.first, a.rounds, a.workloads, a.no_real_roles) == (1, 1, 3, ["small", "provision"], False)
    assert run.parse_args(["--workloads", "small", "--hosts", "3"]).workloads == ["small"]
    for bad in (["--workloads", "big"], ["--workloads", ""], ["--rounds", "0"], ["--hosts", "0"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)
    assert "--workloads" in capsys.readouterr().err


def test_each_tool_gets_its_own_servers():
    assert tools.assign(["ours", "pyinfra", "ansible"], 2, 5) == {
        "ours": ["bench05", "bench06"], "pyinfra": ["bench07", "bench08"],
        "ansible": ["bench09", "bench10"]}
    assert run.tools_for(run.parse_args(["--no-real-roles"])) == ["ours", "pyinfra", "ansible", "fabric"]
    assert run.tools_for(run.parse_args([]))[-1] == "ours-roles"


def test_the_jobs_of_one_run(tmp_path):
    venv = tmp_path / "venv"
    jobs = run.jobs(run.parse_args([]), tmp_path, venv)
    assert [(j.tool, j.workload) for j in jobs] == [
        ("ours", "small"), ("pyinfra", "small"), ("ansible", "small"), ("fabric", "small"),
        ("ours", "provision"), ("pyinfra", "provision"), ("ansible", "provision"),
        ("ours-roles", "provision")]
    by = {(j.tool, j.workload): j for j in jobs}
    assert by[("ours", "small")].argv[-5:] == ["provision", "--env", "small", "--yes", "--json"]
    assert by[("pyinfra", "provision")].argv[0] == str(venv / "bin" / "pyinfra")
    assert json.loads(Path(by[("pyinfra", "provision")].env["PEERS_SPEC"]).read_text()) == workload.provision()
    assert by[("ansible", "small")].argv[0] == str(venv / "bin" / "ansible-playbook")
    assert "10.77.0." in (tmp_path / "pyinfra-small.py").read_text()
    # the throwaway checkout: our roles linked, a role per workload, an env per inventory
    root = tmp_path / "ours"
    assert (root / "roles" / "harden").resolve() == REPO / "roles" / "harden"
    assert {p.stem for p in (root / "inventories").glob("*.yml")} == {"small", "provision", "roles"}
    roles = json.loads((root / "inventories" / "roles.yml").read_text())
    assert roles["ssh"]["user"] == "deploy" and roles["ssh"]["bootstrap_user"] == "root"
    assert roles["groups"]["peers"]["roles"] == list(tools.ROLES)
    small = json.loads((root / "inventories" / "small.yml").read_text())
    assert small["ssh"]["user"] == "root" and small["groups"]["peers"]["roles"] == ["peers_small"]
    (tmp_path / "b").mkdir()
    no_roles = run.jobs(run.parse_args(["--no-real-roles", "--workloads", "small"]), tmp_path / "b", venv)
    assert [j.tool for j in no_roles] == ["ours", "pyinfra", "ansible", "fabric"]


def test_the_venv_is_the_benchmarks_own_and_pinned(tmp_path):
    assert peer_venv.VENV == REPO / "bench" / "peers" / ".venv"
    assert all("==" in p for p in peer_venv.PINS)
    argv = peer_venv.install_argv(tmp_path)
    assert argv[:4] == [str(tmp_path / "bin" / "python"), "-m", "pip", "install"]
    assert not any(a.startswith(("--index-url", "-i", "--extra-index-url")) for a in argv)
    assert not peer_venv.current(tmp_path)
    (tmp_path / peer_venv.STAMP).write_text("\n".join(peer_venv.PINS) + "\n")
    assert peer_venv.current(tmp_path)
    assert "/bench/peers/.venv/" in (REPO / ".gitignore").read_text().split()


# --- the workloads as each tool's files ------------------------------------------------------

def test_the_specs_are_complete(specs):
    for spec in specs.values():
        assert workload.check(spec) is spec
    assert [s["kind"] for s in specs["small"]["steps"]] == ["user", "touch", "copy", "owner"]
    with pytest.raises(ValueError, match="unknown step kind"):
        workload.check({"steps": [{"kind": "ufw"}], "handlers": {}})
    with pytest.raises(ValueError, match="not a handler"):
        workload.check({"steps": [{"kind": "file", "path": "/x", "notify": "nope"}], "handlers": {}})


def test_the_playbooks_use_builtin_modules_and_converge(specs):
    small = ansible_play.playbook(specs["small"])[0]
    assert small["gather_facts"] is False and "handlers" not in small
    touch = small["tasks"][1]["ansible.builtin.file"]
    assert touch["state"] == "touch" and touch["modification_time"] == "preserve"
    play = ansible_play.playbook(specs["provision"])[0]
    modules = ansible_play.arguments([play])
    assert all(m.startswith("ansible.builtin.") for m in modules)
    check, command = [t for t in play["tasks"] if t["name"].endswith(f"pm2 {workload.PM2_VERSION} from npm")]
    assert check["changed_when"] is False and check["failed_when"] is False
    assert command["when"] == f"{check['register']}.rc != 0"
    unit = next(i for i, t in enumerate(play["tasks"]) if t["name"] == "file /etc/systemd/system/pm2-app.service")
    assert play["tasks"][unit + 1]["when"] == f"{play['tasks'][unit]['register']} is changed"
    assert {h["name"] for h in play["handlers"]} == set(specs["provision"]["handlers"])
    inv = ansible_play.inventory({"bench01": "10.77.0.101"}, Path("/k"), Path("/kh"))
    assert "StrictHostKeyChecking=yes" in inv["all"]["vars"]["ansible_ssh_common_args"]


def test_the_pyinfra_inventory_is_python_with_strict_host_keys():
    text = tools.pyinfra_inventory({"bench01": "10.77.0.101", "bench02": "10.77.0.102"})
    hosts = {}
    exec(compile(text, "inventory.py", "exec"), hosts)
    assert [h for h, _ in hosts["hosts"]] == ["10.77.0.101", "10.77.0.102"]
    assert hosts["hosts"][0][1]["ssh_strict_host_key_checking"] == "yes"
    compile((tools.HERE / "pyinfra_deploy.py").read_text(), "pyinfra_deploy.py", "exec")


def test_plain_fabric_does_each_small_step_without_checking(specs):
    cmds = [c for s in specs["small"]["steps"] for c in fabric_small.commands(s)]
    assert cmds[0].startswith("id -u peers >/dev/null 2>&1 || useradd -m")
    assert cmds[1:] == ["touch /srv/peers-touched", "chown peers /srv/peers-copied.txt"]
    with pytest.raises(ValueError, match="small workload only"):
        fabric_small.commands({"kind": "service", "name": "x"})


@pytest.mark.parametrize("workload_name", ["small", "provision"])
def test_our_role_for_each_workload_plans_on_a_fresh_server(tmp_path, specs, workload_name):
    from provisioner import ops
    from provisioner.api import RoleContext
    from provisioner.inventory import load_inventory
    from provisioner.roles import load_role
    from provisioner.runner import resource_list

    env = workload_name
    inv_doc = tools.ours_inventory(env, {"bench01": "10.77.0.101"}, [tools.SPEC_ROLES[env]],
                                   real=False, gateway="10.77.0.1")
    tools.ours_root(tmp_path / "root", {env: specs[env]}, {env: inv_doc})
    inv = load_inventory(env, root=tmp_path / "root")
    host = inv.select(None)[0]
    os_facts = {"id": "debian", "version_id": "13"}
    code = load_role(inv.roles[tools.SPEC_ROLES[env]])
    resources = resource_list(code, inv.hostvars(host.name), RoleContext(host, inv, os_facts, False))
    planned = ops.plan_all(resources, fresh_server(ops.request(resources), os_facts))
    assert all(result for _r, result in planned)
    steps = [s for s in specs[env]["steps"] if s["kind"] != "owner"]   # ours: part of the copy
    assert len(resources) == len(steps)
    assert set(code.handlers(None, None)) == set(specs[env]["handlers"])
    if env == "small":
        copied = next(r for r in resources if getattr(r, "path", "") == "/srv/peers-copied.txt")
        assert copied.owner == "peers"


# --- what each tool's output says -------------------------------------------------------------

def test_our_recap_says_changed_failed_and_execs():
    out = "\n".join([json.dumps({"event": "start"}), json.dumps(
        {"event": "recap", "changed": 0, "failed": 0, "unreachable": 1,
         "hosts": {"a": {"remote_commands": 3}, "b": {"remote_commands": 4}}})])
    assert tools.ours_outcome(out) == tools.Outcome(0, 1, 4)
    with pytest.raises(ValueError, match="no recap"):
        tools.ours_outcome(json.dumps({"event": "start"}))


def test_pyinfras_results_table():
    out = ("--> Results:\n    Operation      Hosts   Success   Error   No Change   \n"
           "    packages       1       -         -       1           \n"
           "    \x1b[1mGrand total\x1b[0m    14      2         -       12          \n")
    assert tools.pyinfra_outcome(out) == tools.Outcome(changed=2, failed=0)
    assert tools.pyinfra_outcome(out.replace("2         -", "-         1")).failed == 1
    with pytest.raises(ValueError, match="Grand total"):
        tools.pyinfra_outcome("--> Starting operation: packages\n")


def test_ansibles_play_recap():
    out = ("TASK [packages] ***\nok: [bench03]\n\nPLAY RECAP *********\n"
           "bench03                    : ok=19   changed=0    unreachable=0    failed=0    "
           "skipped=2    rescued=0    ignored=0\n"
           "bench04                    : ok=18   changed=1    unreachable=1    failed=0    "
           "skipped=2    rescued=0    ignored=0\n")
    assert tools.ansible_outcome(out) == tools.Outcome(changed=1, failed=1)
    with pytest.raises(ValueError, match="PLAY RECAP"):
        tools.ansible_outcome("ERROR! the playbook could not be found\n")


def test_the_table_gives_medians_and_ratios_to_ours():
    done = [run.Job("ours", "small", [], None, walls=[0.8, 0.9, 0.7], execs=3),
            run.Job("pyinfra", "small", [], None, walls=[1.2, 1.0, 1.1]),
            run.Job("ours", "provision", [], None, walls=[1.0, 1.0, 1.0], execs=3),
            run.Job("ansible", "provision", [], None, walls=[14.0, 14.1, 15.0])]
    lines = run.table(done)
    assert lines[1].split()[:4] == ["small", "ours", "0.80", "1.00"]
    assert lines[2].split()[:4] == ["small", "pyinfra", "1.10", "1.38"]
    assert "(3 SSH execs per host)" in lines[1]
    assert lines[4].split()[:4] == ["provision", "ansible", "14.10", "14.10"]


def test_the_peers_are_never_imported_into_the_products_environment():
    # every module above is imported here, in the product's environment: none loads a peer
    assert "pyinfra" not in sys.modules and "ansible" not in sys.modules

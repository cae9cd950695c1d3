"""bench/all.py without servers: its arguments, the judging of each figure against its target,
the closing table (from results made by the benchmarks' own functions, through JSON as they
print them), how a benchmark's output is read, and the order of a whole run with its resets."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import all as bench_all  # noqa: E402
import fleet_cpu  # noqa: E402
import fresh_provision  # noqa: E402
import simulated_fleet  # noqa: E402
import startup  # noqa: E402
from peers import run as peers_run  # noqa: E402

Figure = bench_all.Figure


def test_arguments(capsys):
    a = bench_all.parse_args([])
    assert (a.rounds, a.skip) == (None, [])
    a = bench_all.parse_args(["--rounds", "1", "--skip", "fresh,peers"])
    assert (a.rounds, a.skip) == (1, ["fresh", "peers"])
    for bad in (["--skip", "fresh,backup"], ["--rounds", "0"], ["--rounds", "x"]):
        with pytest.raises(SystemExit) as e:
            bench_all.parse_args(bad)
        assert e.value.code == 2
    assert "--skip: backup: choose from startup,simulated,peers,fleet,fresh" in capsys.readouterr().err


@pytest.mark.parametrize("value, at_least, expected", [
    (0.49, False, "met"), (0.5, False, "met"), (0.51, False, "MISSED"),
    (501, True, "met"), (500, True, "met"), (499, True, "MISSED")])
def test_a_figure_against_its_target(value, at_least, expected):
    target = 500 if at_least else 0.5
    f = Figure("peers", "x", value, "{:.2f} s", target, at_least=at_least)
    assert bench_all.verdict(f, "ran") == expected


def test_a_figure_without_a_value_or_a_target():
    assert bench_all.verdict(Figure("peers", "x", 9.0, "{:.2f} s"), "ran") == "-"
    missing = Figure("fleet", "x", None, "{:.3f} CPU-s", 0.15)
    assert bench_all.verdict(missing, "ran") == "not measured"
    assert bench_all.verdict(missing, "skipped") == "skipped"
    assert bench_all.verdict(missing, "failed (exit 1)") == "failed (exit 1)"


def test_the_table_lays_out_each_figure_and_counts_the_verdicts():
    figs = [Figure("fleet", "server CPU per host, 50 servers", 0.21, "{:.3f} CPU-s", 0.15),
            Figure("peers", "small: pyinfra", 1.38, "{:.2f} s", note="1.31x ours"),
            Figure("simulated", "hosts converged", 500, "{:.0f} hosts", 500, at_least=True),
            Figure("fresh", "fresh web1", None, "{:.1f} s", 35.0),
            Figure("startup", "invoke --list", None, "{:.2f} s", 1.0)]
    status = {"fleet": "ran", "peers": "ran", "simulated": "ran", "fresh": "skipped",
              "startup": "failed (exit 1)"}
    assert bench_all.summary(figs, status) == [
        "benchmark  figure                           measured             target          verdict",
        "fleet      server CPU per host, 50 servers  0.210 CPU-s          <= 0.150 CPU-s  MISSED",
        "peers      small: pyinfra                   1.38 s (1.31x ours)  -               -",
        "simulated  hosts converged                  500 hosts            >= 500 hosts    met",
        "fresh      fresh web1                       -                    <= 35.0 s       skipped",
        "startup    invoke --list                    -                    <= 1.00 s       failed (exit 1)",
        "targets: 1 met, 1 missed, 2 not measured; skipped: fresh (fresh_provision.py); "
        "failed: startup (startup.py)"]


def _through_json(d: dict) -> dict:
    return json.loads(json.dumps(d))          # as bench/all.py reads it back


def _results() -> dict[str, dict]:
    """Each benchmark's JSON line, made by its own functions from measurements of a made-up run."""
    first = bench_all.STARTUP_FIRST_CONNECT
    st = {"rounds": 1, **startup.medians({"invoke --list": [0.3, 0.2, 0.25], first: [0.5]},
                                         {"invoke --list": [0.1], first: [0.1]})}
    hosts = {f"sim{i:03d}": {"changed": 0, "failed": 0, "unreachable": 0} for i in range(500)}
    hosts["sim007"]["changed"] = 1                               # one host not converged
    recap = {"changed": 1, "failed": 0, "unreachable": 0, "hosts": hosts}
    sim = simulated_fleet.results([(4.0, 3.0, recap, [3] * 500), (4.2, 4.0, recap, [3] * 500),
                                   (4.4, 8.0, recap, [3] * 500)], 500, 50, 0.1)
    jobs = [peers_run.Job("ours", "small", [], None, walls=[0.6, 0.4, 0.45], execs=3),
            peers_run.Job("pyinfra", "small", [], None, walls=[0.9]),
            peers_run.Job("ours", "provision", [], None, walls=[1.2], execs=3),
            peers_run.Job("ansible", "provision", [], None, walls=[12.0])]
    pe = {"rounds": 3, "results": peers_run.results(jobs)}
    runs = {n: [{"wall": 1.0, "controller": 0.0114 * n, "server": 0.21 * n, "execs": 3},
                {"wall": 1.0, "controller": 0.0200 * n, "server": 0.22 * n, "execs": 4},
                {"wall": 1.0, "controller": 0.0110 * n, "server": 0.10 * n, "execs": 3}]
            for n in (1, 10, 20, 50)}
    runs[20] = [dict(r, server=None) for r in runs[20]]          # no cgroup figure
    fl = {"rounds": 3, "hosts": fleet_cpu.medians(runs)}
    fr = {"rounds": 3, **fresh_provision.results(
        {("web1", True): [30.0, 40.0, 34.0], ("web1-all", True): [38.0, 41.0, 39.5],
         ("env", True): [70.0, 50.0, 61.0], ("web1", False): [90.0]},
        {"web1": (0.7, 0, [3]), "web1-all": (0.8, 0, [3]), "env": (1.4, 0, [3, 4])})}
    return {k: _through_json(v) for k, v in
            {"startup": st, "simulated": sim, "peers": pe, "fleet": fl, "fresh": fr}.items()}


def _rows(results: dict, status: dict | None = None) -> dict[str, list[str]]:
    """The table's rows by figure name: [benchmark, measured, target, verdict]."""
    status = status or dict.fromkeys(bench_all.PARTS, "ran")
    lines = bench_all.summary(bench_all.figures(results), status)
    out = {}
    for line in lines[1:-1]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        out[cells[1]] = [cells[0], *cells[2:]]
    return out


def test_every_figure_of_the_issue_against_its_target():
    rows = _rows(_results())
    assert rows["invoke --list, wall"] == ["startup", "0.25 s", "-", "-"]
    assert rows["provision web1 up to its first connect, wall"] == ["startup", "0.50 s", "-", "-"]
    # the median CPU of three runs: 4.0 s over 500 hosts
    assert rows["controller CPU per host, 500 simulated hosts"] == ["simulated", "8.0 ms", "<= 15.0 ms", "met"]
    assert rows["simulated hosts planned and reported converged, forks 50"] == [
        "simulated", "499 hosts", ">= 500 hosts", "MISSED"]
    assert rows["four-step workload, converged: ours"] == ["peers", "0.45 s", "<= 0.50 s", "met"]
    assert rows["four-step workload, converged: pyinfra"] == ["peers", "0.90 s (2.00x ours)", "-", "-"]
    assert rows["provision (harden, node, pm2, postgresql), converged: ours"] == [
        "peers", "1.20 s", "<= 1.00 s", "MISSED"]
    assert rows["provision (harden, node, pm2, postgresql), converged: ansible"] == [
        "peers", "12.00 s (10.00x ours)", "-", "-"]
    # tools the run had no row for: not measured, though the benchmark ran
    assert rows["four-step workload, converged: ansible"] == ["peers", "-", "-", "not measured"]
    assert rows["controller CPU per host, 1 server"] == ["fleet", "11.4 ms", "<= 15.0 ms", "met"]
    assert rows["controller CPU per host, 50 servers"] == ["fleet", "11.4 ms", "<= 15.0 ms", "met"]
    assert rows["server CPU per host, 10 servers"] == ["fleet", "0.210 CPU-s", "<= 0.150 CPU-s", "MISSED"]
    assert rows["server CPU per host, 20 servers"] == ["fleet", "-", "<= 0.150 CPU-s", "not measured"]
    assert rows["SSH execs per host, converged (most of any size)"] == ["fleet", "3", "<= 3", "met"]
    assert rows["fresh provision of web1 (base, harden, node, pm2), warm package cache"] == [
        "fresh", "34.0 s", "<= 35.0 s", "met"]
    assert rows["fresh provision of web1, all its roles, warm package cache"] == [
        "fresh", "39.5 s", "-", "-"]
    assert rows["fresh provision of the local env, warm package cache"] == [
        "fresh", "61.0 s", "<= 60.0 s", "MISSED"]
    assert rows["converged provision of web1, all its roles"] == ["fresh", "0.80 s", "<= 1.00 s", "met"]
    assert rows["SSH execs per host, converged web1-all"] == ["fresh", "3", "<= 3", "met"]
    assert rows["SSH execs per host, converged env"] == ["fresh", "4", "<= 3", "MISSED"]
    assert len(rows) == 2 + 2 + 8 + 9 + 6


def test_a_skipped_benchmark_keeps_its_rows_and_is_named():
    results = _results()
    del results["fleet"]
    status = {**dict.fromkeys(bench_all.PARTS, "ran"), "fleet": "skipped"}
    lines = bench_all.summary(bench_all.figures(results), status)
    rows = _rows(results, status)
    assert all(rows[f"server CPU per host, {n}"] == ["fleet", "-", "<= 0.150 CPU-s", "skipped"]
               for n in ("1 server", "10 servers", "20 servers", "50 servers"))
    assert lines[-1] == ("targets: 5 met, 4 missed, 9 not measured; "
                         "skipped: fleet (fleet_cpu.py)")


def test_a_benchmarks_output_passes_through_and_its_json_line_is_read(tmp_path, capsys):
    script = tmp_path / "b.py"
    script.write_text('print("first run: 3.0 s")\nprint("{not json")\n'
                      'print(\'{"hosts": {"1": {"wall": 1.5}}}\')\nprint("done")\n')
    got = bench_all.run_part([sys.executable, str(script)])
    assert got == {"hosts": {"1": {"wall": 1.5}}}
    assert capsys.readouterr().out == "first run: 3.0 s\n{not json\ndone\n"
    script.write_text('print("half way")\nraise SystemExit("servers gone")\n')
    with pytest.raises(bench_all.PartFailed, match="exit 1"):
        bench_all.run_part([sys.executable, str(script)])
    script.write_text('print("no figures")\n')
    with pytest.raises(bench_all.PartFailed, match="no JSON line"):
        bench_all.run_part([sys.executable, str(script)])


@pytest.fixture
def whole_run(monkeypatch):
    """bench/all.py's main with the benchmarks, the testbed's up and reset recorded, not run."""
    calls: list = []

    def make(*, failing=(), up_fails=False, bench_servers=0):
        results = _results()

        def run_part(argv):
            assert argv[:2] == [sys.executable, "-u"] and argv[-1] == "--json"
            part = next(p for p, (script, _) in bench_all.PARTS.items()
                        if argv[2] == str(bench_all.BENCH / script))
            calls.append((part, argv[3:-1]))
            if part in failing:
                raise bench_all.PartFailed("exit 1")
            return results[part]

        def testbed_up(count):
            calls.append(("up", count))
            if up_fails:
                import subprocess
                raise subprocess.CalledProcessError(3, ["invoke"])

        monkeypatch.setattr(bench_all, "run_part", run_part)
        monkeypatch.setattr(bench_all, "testbed_up", testbed_up)
        monkeypatch.setattr(bench_all, "reset", lambda names: calls.append(("reset", names)))
        monkeypatch.setattr(bench_all, "bench_servers_up", lambda: bench_servers)
        return calls
    return make


def test_a_whole_run_in_order_with_the_peers_servers_reset(whole_run, capsys):
    calls = whole_run()
    assert bench_all.main(["--rounds", "2"]) == 0
    assert calls == [
        ("startup", ["--rounds", "2"]),
        ("simulated", ["--hosts", "500", "--forks", "50", "--rounds", "2"]),
        ("up", 50),
        ("peers", ["--hosts", "1", "--first", "1", "--rounds", "2"]),
        ("reset", ["bench01", "bench02", "bench03", "bench04", "bench05"]),
        ("fleet", ["--sizes", "1,10,20,50", "--rounds", "2"]),
        ("fresh", ["--rounds", "2"])]
    out = capsys.readouterr().out
    assert "=== summary (--rounds 2; medians) ===" in out
    assert out.rstrip().splitlines()[-1] == "targets: 10 met, 7 missed, 1 not measured"


def test_a_failed_benchmark_still_resets_and_the_run_says_so(whole_run, capsys):
    calls = whole_run(failing={"peers"})
    assert bench_all.main([]) == 1
    assert [c[0] for c in calls] == ["startup", "simulated", "up", "peers", "reset", "fleet", "fresh"]
    assert calls[1][1] == ["--hosts", "500", "--forks", "50"]            # no --rounds given
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.endswith("; failed: peers (peers/run.py)")


def test_skipped_parts_and_the_servers_asked_for(whole_run, capsys):
    calls = whole_run(bench_servers=60)                   # more are up: none is taken down
    assert bench_all.main(["--skip", "fleet,startup"]) == 0
    assert [c[0] for c in calls] == ["simulated", "up", "peers", "reset", "fresh"]
    assert ("up", 60) in calls
    calls.clear()
    whole_run(bench_servers=0)
    bench_all.main(["--skip", "fleet,fresh"])
    assert ("up", 5) in calls
    calls.clear()
    bench_all.main(["--skip", "peers,fleet,fresh"])
    assert [c[0] for c in calls] == ["startup", "simulated"]          # no testbed at all
    assert "skipped: peers (peers/run.py), fleet (fleet_cpu.py), fresh (fresh_provision.py)" in \
        capsys.readouterr().out


def test_without_a_testbed_the_server_benchmarks_fail_and_none_runs(whole_run, capsys):
    calls = whole_run(up_fails=True)
    assert bench_all.main([]) == 1
    assert [c[0] for c in calls] == ["startup", "simulated", "up"]
    rows = _rows({}, {p: "failed (testbed.up exit 3)" for p in bench_all.PARTS})
    assert rows["converged provision of web1, all its roles"][-1] == "failed (testbed.up exit 3)"
    assert capsys.readouterr().out.rstrip().endswith(
        "failed: peers (peers/run.py), fleet (fleet_cpu.py), fresh (fresh_provision.py)")

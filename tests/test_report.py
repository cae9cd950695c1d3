"""`invoke report FILE`: a `--json` run's NDJSON as a Markdown job summary."""
from __future__ import annotations

import io

import pytest

from provisioner import report
from provisioner.errors import InputError
from provisioner.events import Events


def ndjson(tmp_path, build, name="run.ndjson", check=False, task="provision"):
    out = io.StringIO()
    ev = Events(task=task, env="staging", json_out=True, verbose=0, diff=False, check=check,
                stream_out=out, stream_err=io.StringIO())
    build(ev)
    path = tmp_path / name
    path.write_text(out.getvalue())
    return path


def a_failed_run(ev):
    ev.start(["web1", "web2"])
    ev.step(host="web1", role="nginx", resource="file /etc/nginx/nginx.conf", status="changed",
            reason="write: content differs", seconds=0.2)
    ev.step(host="web2", role="nginx", resource="apt nginx", status="failed",
            reason="install failed: exit 100", seconds=3.1,
            output="E: Unable to locate package nginx\n```\na | b")
    ev.host_done("web1", remote_commands=4, seconds=2.0)
    ev.host_done("web2", remote_commands=3, seconds=3.5)
    ev.recap()


def test_hosts_failed_steps_with_their_output_and_durations(tmp_path):
    text = report.markdown(report.read(ndjson(tmp_path, a_failed_run)))
    assert text.startswith("## provision on staging\n")
    assert "**failed**" in text and "1 changed, 1 failed, 0 unreachable, 7 remote commands" in text
    assert "| web1 | changed | 0 | 1 | 0 | 0 | 0 | 2.0 | 4 |" in text
    assert "| web2 | **FAILED** | 0 | 0 | 1 | 0 | 0 | 3.5 | 3 |" in text
    assert "- **web2** nginx `apt nginx`: install failed: exit 100 (3.1s)" in text
    # the output's own ``` cannot close the block early
    assert "  ````\n  E: Unable to locate package nginx\n  ```\n  a | b\n  ````" in text


def test_several_runs_in_one_file_each_get_a_section(tmp_path):
    first = ndjson(tmp_path, a_failed_run, "a")
    second = ndjson(tmp_path, lambda ev: (ev.start(["web1"]), ev.host_done("web1", remote_commands=3,
                                                                          seconds=1), ev.recap()),
                    "b", check=True)
    both = tmp_path / "both.ndjson"
    both.write_text(first.read_text() + second.read_text())
    text = report.markdown(report.read(both))
    assert text.count("## provision on staging") == 2 and "(check mode)" in text


def test_drift_verdicts_and_errors_are_shown(tmp_path):
    def run(ev):
        ev.start(["web1"])
        ev.step(host="web1", role="base", resource="file /etc/motd", status="changed",
                reason="would write", seconds=0.1)
        ev.host_done("web1", remote_commands=2, seconds=1.0)
        ev.drift("web1", ["file /etc/motd"], {"ts": "2026-11-30T10:00:00+00:00", "who": "ci"})
        ev.fail_run(4, "web1: run lock held by someone")
    text = report.markdown(report.read(ndjson(tmp_path, run, check=True, task="drift")))
    assert "- **web1** (last run 2026-11-30T10:00:00+00:00 by ci): `file /etc/motd`" in text
    assert "### Error\n\n```\nweb1: run lock held by someone\n```" in text


def test_a_run_cut_short_says_so(tmp_path):
    path = ndjson(tmp_path, lambda ev: ev.start(["web1"]))
    assert "without a recap" in report.markdown(report.read(path))


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("provision on staging: 2 hosts\n", "run.ndjson:1: not JSON"),
    ('{"a": 1}\n', "run.ndjson:1: not an event"),
])
def test_bad_input_names_the_file_and_line(tmp_path, content, problem):
    path = tmp_path / "run.ndjson"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as e:
        report.read(path)
    assert problem in str(e.value) and "fix:" in str(e.value)

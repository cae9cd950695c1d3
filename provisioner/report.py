"""`invoke report FILE`: the NDJSON of `--json` runs as a Markdown job summary.

Per run: a table of hosts (status, counts, seconds, remote commands), the failed steps with
their output, drift verdicts, and the run's errors. A CI job appends it to its summary page
(`$GITHUB_STEP_SUMMARY`, a GitLab artifact). Events are redacted when they are emitted, so the
report only ever sees what the run printed.
"""
from __future__ import annotations

import json
from pathlib import Path

from provisioner.errors import InputError, Problem
from provisioner.output import RECAP_COUNTS

ICON = {"ok": "ok", "changed": "changed", "failed": "**FAILED**", "unreachable": "**UNREACHABLE**",
        "skipped": "skipped"}


def read(path: Path) -> list[dict]:
    """The events of an NDJSON file; InputError naming the file and line of a bad one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(Problem(path, None, None, "no such file",
                                 "pass the file a `--json` run wrote, e.g. "
                                 "`invoke provision --json > run.ndjson`")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(Problem(path, None, None, f"cannot read it: {e}", "pass a readable file")) from None
    events = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(Problem(path, n, None, f"not JSON ({e.msg})",
                                     "pass only the stdout of a `--json` run (its human "
                                     "output goes to stderr)")) from None
        if not isinstance(ev, dict) or "event" not in ev or "run_id" not in ev:
            raise InputError(Problem(path, n, None, "not an event of a `--json` run",
                                     "pass only the stdout of a `--json` run"))
        events.append(ev)
    return events


def cell(value) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(str(value if value is not None else "-").split()).replace("|", "\\|")


def fenced(text: str) -> list[str]:
    """A code block that no line of `text` can close early."""
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence, *text.rstrip("\n").splitlines(), fence]


def markdown(events: list[dict]) -> str:
    runs: dict[str, list[dict]] = {}
    for ev in events:                                 # one section per run, in file order
        runs.setdefault(ev["run_id"], []).append(ev)
    return "\n".join(line for run in runs.values() for line in _run(run)) + "\n"


def _run(events: list[dict]) -> list[str]:
    start = next((e for e in events if e["event"] == "start"), {})
    recap = next((e for e in reversed(events) if e["event"] == "recap"), None)
    errors = [e for e in events if e["event"] == "error"]
    title = f"## {start.get('task', 'run')} on {start.get('env') or '-'}"
    if start.get("check"):
        title += " (check mode)"
    out = [title, ""]
    if recap is None:
        out += ["The run ended without a recap: it was killed, or the file is cut short.", ""]
    else:
        verdict = "failed" if recap["failed"] or errors else (
            "unreachable hosts" if recap["unreachable"] else
            ("changes pending" if recap["check"] else "changed") if recap["changed"] else "ok")
        out += [f"**{verdict}** in {recap['seconds']:.1f}s: {recap['changed']} changed, "
                f"{recap['failed']} failed, {recap['unreachable']} unreachable, "
                f"{recap['remote_commands']} remote commands", ""]
        status = {e["host"]: e.get("status") for e in events if e["event"] == "host"}
        if recap["hosts"]:
            out += ["| host | status | " + " | ".join(RECAP_COUNTS) + " | seconds | remote commands |",
                    "|---|---|" + "---:|" * (len(RECAP_COUNTS) + 2)]
            for host, c in recap["hosts"].items():
                out.append(f"| {cell(host)} | {ICON.get(status.get(host), '-')} | "
                           + " | ".join(str(c[k]) for k in RECAP_COUNTS)
                           + f" | {c['seconds']:.1f} | {c['remote_commands']} |")
            out.append("")
    drift = [e for e in events if e["event"] == "drift"]
    if drift:
        out += ["### Drift", ""]
        for e in drift:
            last = e.get("last_run")
            since = f"last run {last['ts']} by {last['who']}" if last else "no run on record"
            what = ", ".join(f"`{d}`" for d in e["drifted"]) or "nothing"
            out.append(f"- **{cell(e['host'])}** ({since}): {what}")
        out.append("")
    failed = [e for e in events if e["event"] == "step" and e["status"] in ("failed", "unreachable")]
    if failed:
        out += ["### Failed steps", ""]
        for e in failed:
            out.append(f"- **{cell(e['host'])}** {cell(e.get('role') or '')} `{e['resource']}`: "
                       f"{cell(e['reason'])} ({e['seconds']:.1f}s)")
            if e.get("output"):
                out += ["", *("  " + line for line in fenced(e["output"])), ""]
        out.append("")
    for e in errors:
        out += ["### Error", "", *fenced(e["message"]), ""]
    return out

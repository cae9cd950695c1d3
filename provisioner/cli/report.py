"""`invoke report FILE`: a `--json` run's NDJSON as a Markdown job summary on stdout."""
from __future__ import annotations

import sys
from pathlib import Path

from invoke import task

from provisioner import report as md
from provisioner.cli.common import fail_input
from provisioner.errors import InputError


@task(positional=["file"], help={"file": "the stdout of one or more `--json` runs (NDJSON)"})
def report(c, file):
    """Markdown of a --json run for a CI job summary: per host changed/failed, failed steps
    with their output, durations (`invoke report run.ndjson >> "$GITHUB_STEP_SUMMARY"`)."""
    try:
        events = md.read(Path(file))
    except InputError as e:
        raise fail_input(str(e)) from None
    sys.stdout.write(md.markdown(events))

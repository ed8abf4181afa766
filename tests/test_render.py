"""The host's progress display: what a person sees of the runner's events."""

import io

from rich.console import Console

from forge.contract.events import Progress, StageFinished, StageStarted
from forge.host.render import EventRenderer


def test_a_narrow_console_keeps_stage_names_and_counts_and_cuts_the_metrics():
    out = io.StringIO()
    with EventRenderer(Console(file=out, width=80, force_terminal=False)) as renderer:
        renderer.event(StageStarted(ts=0, stage="process", unit="rows"))
        renderer.event(Progress(ts=0, stage="process", done=12_000, total=64_000, metrics={
            "rows_per_s": 5437.0, "kept": 10_500.0, "rejected": 12.0, "duplicates": 1_400.0, "dropped": 88.0}))
        renderer.event(StageFinished(ts=0, stage="process", seconds=2.0, summary={
            "rows": 64_000, "workers": 2, "rows_per_s": 5437, "kept": 62_500, "rejected": 12, "duplicates": 1_400,
            "dropped": 88}))
        renderer.event(StageStarted(ts=0, stage="assemble", total=1, unit="dataset"))
        renderer.event(StageFinished(ts=0, stage="assemble", seconds=0.1))
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert lines[-2].startswith("process ") and "64000/64000" in lines[-2] and "workers=2" in lines[-2]
    assert lines[-1].startswith("assemble ") and "1/1" in lines[-1]
    assert all(len(line) <= 80 for line in lines)

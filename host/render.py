"""Everything the host prints: plan summaries, live progress bars from runner events, errors.

Progress and logs go to stderr so that stdout stays clean for `--json`.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from forge.contract.events import Backoff, Event, Failure, Log, Progress as ProgressEvent, Result, StageFinished, StageStarted
from forge.contract.plan import Plan

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


FIXED_COLUMNS_WIDTH = 44  # stage, counts up to 9999999/9999999, elapsed, eta and the gaps: all but bar and metrics


class EventRenderer:
    """One progress bar per runner stage, with the latest metrics beside it."""

    def __init__(self, console: Console = err_console) -> None:
        self.console = console
        bar = 24 if console.width >= 120 else 10
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<10}", table_column=Column(min_width=10, no_wrap=True)),
            BarColumn(bar_width=bar, table_column=Column(min_width=bar)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(min_width=7, no_wrap=True)),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True, table_column=Column(min_width=5, no_wrap=True)),
            # on a narrow console the metrics give way (ellipsis), never the stage name or the counts
            TextColumn("{task.fields[metrics]}", table_column=Column(
                no_wrap=True, overflow="ellipsis", max_width=max(12, console.width - FIXED_COLUMNS_WIDTH - bar))),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> EventRenderer:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def log(self, line: str) -> None:
        self.progress.console.print(line, style="dim", markup=False, highlight=False, soft_wrap=True)

    def note(self, line: str) -> None:
        """What the queue did (claims, retries, lost agents): between the runner's lines, in another colour."""
        self.progress.console.print(f"queue: {line}", style="cyan", markup=False, highlight=False, soft_wrap=True)

    def event(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self.tasks[event.stage] = self.progress.add_task(
                event.stage, total=event.total, stage=event.stage, metrics=""
            )
        elif isinstance(event, ProgressEvent):
            task = self.tasks.get(event.stage)
            if task is None:
                task = self.tasks[event.stage] = self.progress.add_task(event.stage, stage=event.stage, metrics="")
            self.progress.update(task, completed=event.done, total=event.total, metrics=_metrics(event.metrics))
        elif isinstance(event, StageFinished):
            task = self.tasks.get(event.stage)
            if task is not None:
                current = self.progress.tasks[task]
                metrics = _metrics(event.summary) if event.summary else current.fields["metrics"]
                self.progress.update(task, completed=current.total if current.total is not None else current.completed,
                                     metrics=metrics)
        elif isinstance(event, Log):
            style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
            self.progress.console.print(event.message, style=style, markup=False, highlight=False)
        elif isinstance(event, Backoff):
            self.progress.console.print(
                f"Out of memory at step {event.step}: micro-batch {event.micro_batch_from} -> "
                f"{event.micro_batch_size}, gradient accumulation -> {event.gradient_accumulation}",
                style="yellow", markup=False, highlight=False)
        elif isinstance(event, Failure):
            print_error(event.message, event.hint, console=self.progress.console)
        elif isinstance(event, Result):
            self.progress.console.print(f"[green]✓ {event.step} {event.status}[/green]")


def _metrics(values: dict) -> str:
    return " ".join(f"{key}={_number(value)}" for key, value in values.items())


def _number(value) -> str:
    if not isinstance(value, float):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


def print_error(message: str, hint: str = "", console: Console = err_console) -> None:
    console.print("Error: " + message, style="bold red", markup=False, highlight=False)
    if hint:
        console.print("To fix: " + hint, style="yellow", markup=False, highlight=False)


def plan_summary(plan: Plan, path: str) -> None:
    hw = plan.hardware
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    device = (
        ", ".join(f"{g.name} ({g.memory_total_mib // 1024} GiB, cc {g.compute_capability})" for g in hw.gpus)
        if hw.gpus
        else f"CPU × {hw.cpu_count}, {hw.ram_available_mib / 1024:.1f} GiB RAM free"
    )
    if hw.target:
        device += f" (planned for --target {hw.target}, not detected)"
    table.add_row("goal", plan.goal)
    table.add_row("hardware", device)
    table.add_row("image", f"{plan.image.name}")
    table.add_row("model", f"{plan.model.name} ({plan.model.source.kind}), chat template: {plan.model.chat_template}")
    table.add_row("data", ", ".join(i.path + (f" ({i.format})" if i.format != "auto" else "") for i in plan.data.inputs))
    t = plan.train
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch(s)"
    table.add_row("train", f"LoRA r={t.lora.r} on {','.join(t.lora.target_modules)}; {steps}; "
                           f"micro-batch {t.micro_batch_size} × {t.gradient_accumulation}; {t.dtype}; "
                           f"backend {t.backend}")
    table.add_row("output", plan.output.dir)
    out_console.print(f"[bold green]Wrote {path}[/bold green]")
    out_console.print(table)
    out_console.print("[bold]Why:[/bold]")
    for reason in plan.reasons:
        out_console.print(f"  • {reason}", markup=False, highlight=False)


def _maybe(value) -> str:
    return "—" if value is None else _number(value)


def runs_table(runs) -> None:
    table = Table(title="runs", title_justify="left")
    for name in ("run", "status", "steps", "final loss", "val loss", "perplexity"):
        table.add_column(name, no_wrap=name == "run")
    for run in runs:
        m = run.metrics
        if m is None:
            table.add_row(run.id, "incomplete", f"checkpoint at {run.last_checkpoint_step}", "—", "—", "—")
        else:
            table.add_row(run.id, "finished", f"{m['steps']}/{m['total_steps']}", _maybe(m.get("final_loss")),
                          _maybe(m.get("val_loss")), _maybe(m.get("perplexity")))
    out_console.print(table if runs else "No runs yet: `forge train` writes them.")


def run_details(run) -> None:
    m = run.metrics
    out_console.print(f"[bold]{run.id}[/bold]  {run.path}")
    if m is None:
        out_console.print(f"Not finished; newest checkpoint at step {run.last_checkpoint_step}. Rerun `forge train`.")
        return
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    for key in ("model", "steps", "total_steps", "resumed_from_step", "final_loss", "val_loss", "perplexity",
                "micro_batch_size", "gradient_accumulation", "reproducibility_hash"):
        summary.add_row(key, _maybe(m.get(key)))
    out_console.print(summary)
    for backoff in m.get("backoffs", []):
        out_console.print(f"OOM backoff at step {backoff['step']}: micro-batch {backoff['micro_batch_from']} -> "
                          f"{backoff['micro_batch_size']} × {backoff['gradient_accumulation']}", style="yellow")
    if m.get("slices"):
        table = Table(title="validation by tag", title_justify="left")
        for name in ("slice", "rows", "loss", "perplexity"):
            table.add_column(name)
        for name, s in m["slices"].items():
            table.add_row(name, str(s["rows"]), _maybe(s["loss"]), _maybe(s["perplexity"]))
        out_console.print(table)
    if m.get("gold"):
        table = Table(title="gold set", title_justify="left")
        for name in ("slice", "rows", "exact match", "format compliance"):
            table.add_column(name)
        for name, g in {"all": m["gold"], **m["gold"]["slices"]}.items():
            table.add_row(name, str(g["rows"]), _maybe(g["exact_match"]), _maybe(g["format_compliance"]))
        out_console.print(table)
    if m.get("hardest"):
        table = Table(title="hardest validation rows", title_justify="left")
        for name in ("id", "loss", "tags"):
            table.add_column(name)
        for row in m["hardest"]:
            table.add_row(row["id"], _maybe(row["loss"]), ", ".join(f"{k}:{v}" for k, v in row["tags"].items()))
        out_console.print(table)


def comparison(a, b, rows: list[dict], gold: list[dict], differences: list[tuple[str, str, str]], note: str) -> None:
    table = Table(title=f"B - A   (A = {a.id}, B = {b.id})", title_justify="left")
    for name in ("slice", "rows A/B", "loss A", "loss B", "Δ loss", "Δ perplexity"):
        table.add_column(name)
    for row in rows:
        delta = row["loss_delta"]
        style = "" if delta is None or abs(delta) < 1e-9 else ("green" if delta < 0 else "red")
        table.add_row(row["slice"], f"{_maybe(row['rows_a'])}/{_maybe(row['rows_b'])}", _maybe(row["loss_a"]),
                      _maybe(row["loss_b"]), f"[{style}]{_maybe(delta)}[/{style}]" if style else _maybe(delta),
                      _maybe(row["perplexity_delta"]))
    out_console.print(table)
    if gold:
        table = Table(title="gold set, B - A", title_justify="left")
        for name in ("slice", "exact A", "exact B", "Δ exact", "format A", "format B", "Δ format"):
            table.add_column(name)
        for row in gold:
            table.add_row(row["slice"], *(_maybe(row[f"{key}_{side}"]) for key in ("exact_match", "format_compliance")
                                          for side in ("a", "b", "delta")))
        out_console.print(table)
    if differences:
        settings = Table(title="settings that differ", title_justify="left")
        for name in ("setting", "A", "B"):
            settings.add_column(name)
        for key, left, right in differences:
            settings.add_row(key, left, right)
        out_console.print(settings)
    out_console.print(note, style="italic")


CALIBRATED, ESTIMATED, OFF = "✓", "~", "!"


def memory_breakdown(columns: list, budget: float, where: str) -> None:
    """The planner's estimate per component (GiB), the planned settings first, against the budget; each figure
    marked calibrated (✓: within tolerance of measured peaks), off (!: measured, and the estimate misses) or
    estimated (~: first principles), and for the planned column on which device and from which file."""
    from forge.host.calibration import TOLERANCE
    from forge.host.memory import GIB

    if not columns:
        out_console.print("No memory breakdown: the model's architecture is unknown (not in plans/models.yaml, "
                          "no readable config.json).")
        return
    table = Table(title=f"estimated peak memory (GiB) against {where}", title_justify="left")
    table.add_column("component")
    for column in columns:
        table.add_column(column.label, justify="right")
    table.add_column("basis of the planned figure")
    planned, sources = columns[0], []

    def mark(basis) -> str:
        return CALIBRATED if basis.calibrated else OFF if basis.off else ESTIMATED

    def basis_cell(basis) -> str:
        if not basis.measured:
            return "estimated (first principles)"
        for record in basis.records:
            if record not in sources:
                sources.append(record)
        on = ", ".join(f"{r.device} [{sources.index(r) + 1}]" for r in basis.records)
        return f"off on {on}: estimate {basis.spread()} measured" if basis.off else f"calibrated on {on}"

    for index, (term, _) in enumerate(planned.breakdown.terms()):
        cells = [f"{column.breakdown.terms()[index][1] / GIB:.2f} {mark(column.bases[term])}" for column in columns]
        table.add_row(planned.breakdown.rows()[index][0], *cells, basis_cell(planned.bases[term]),
                      style="bold" if term == "total" else "")
    table.add_row("fits?", *("yes" if column.breakdown.total <= budget else "no" for column in columns), "")
    out_console.print(table)
    for number, record in enumerate(sources, 1):
        out_console.print(f"[{number}] {record.describe()}", markup=False, highlight=False)
    out_console.print(f"{CALIBRATED} calibrated: measured peaks at settings that exercise the term are within "
                      f"±{TOLERANCE:.0%} of the estimate; {OFF} off: measured there, and the estimate misses "
                      f"(ratio shown); {ESTIMATED} estimated from first principles, not yet measured for these "
                      "settings. A measurement is of the total, so an off total marks each term it exercises.",
                      style="dim")


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "—"
    seconds = max(0, now - then)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 else \
        f"{seconds / 3600:.0f}h ago"


STATE_STYLES = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "dim"}


def jobs_table(jobs, now: float) -> None:
    table = Table(title="jobs", title_justify="left")
    for name in ("job", "name", "steps", "state", "needs", "agent", "attempts", "submitted"):
        table.add_column(name, no_wrap=name in ("job", "state"))
    for job in jobs:
        style = STATE_STYLES.get(job.state, "")
        table.add_row(job.id, job.name, "+".join(job.steps), f"[{style}]{job.state}[/{style}]",
                      job.requirements.describe(), job.agent or "—", str(job.attempts), _ago(now, job.submitted_at))
    out_console.print(table if jobs else "No jobs: `forge submit` puts one on the queue.")


def job_details(job, fits: list[tuple[str, str | None]], now: float) -> None:
    out_console.print(f"[bold]{job.id}[/bold]  {job.name}  [{STATE_STYLES.get(job.state, '')}]{job.state}[/]")
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    rows = {"plan": job.plan_path, "steps": "+".join(job.steps), "needs": job.requirements.describe(),
            "retry": f"up to {job.retry.max_restarts} restarts on exit codes {job.retry.retry_on}",
            "attempts": str(job.attempts), "agent": job.agent or "—", "submitted": f"{_ago(now, job.submitted_at)} "
            f"by {job.submitted_by}", "finished": _ago(now, job.finished_at), "exit code": _maybe(job.exit_code)}
    for key, value in rows.items():
        summary.add_row(key, value)
    out_console.print(summary, highlight=False)
    if job.error:
        out_console.print(f"error: {job.error}", style="red", markup=False, highlight=False)
    for step, outcome in job.result.items():
        for name, path in outcome.get("paths", {}).items():
            out_console.print(f"[bold]{step}.{name}[/bold]: {path}", highlight=False)
    if job.state == "queued":
        if not fits:
            out_console.print("No agent is online: start one with `forge agent` on a machine that fits.",
                              style="yellow")
        for agent, why in fits:
            out_console.print(f"agent {agent}: " + ("can run it" if why is None else f"cannot: {why}"),
                              style="green" if why is None else "yellow", markup=False, highlight=False)


def agents_table(agents: list[dict]) -> None:
    table = Table(title="agents", title_justify="left")
    for name in ("agent", "host", "state", "job", "seen", "labels"):
        table.add_column(name, no_wrap=name in ("agent", "state"))
    for agent in agents:
        labels = " ".join(f"{k.split('/')[-1]}={v}" for k, v in agent["labels"].items())
        table.add_row(agent["id"], agent["host"], agent["state"], agent["job_id"] or "—",
                      _ago(agent["now"], agent["last_seen"]), labels)
    out_console.print(table if agents else "No agents have registered: start one with `forge agent`.")

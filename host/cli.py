"""The `forge` command. Each command wires: parse options → do the work elsewhere → print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from forge import __version__
from forge.errors import EXIT_RESUMABLE, ForgeError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Forge: plan a fine-tuning job for this machine, then prepare data and train in the matching image.",
)
images_app = typer.Typer(no_args_is_help=True, help="Build, list and bootstrap the runner images.")
app.add_typer(images_app, name="images")
runs_app = typer.Typer(no_args_is_help=True, help="List, inspect and compare training runs.")
app.add_typer(runs_app, name="runs")
jobs_app = typer.Typer(no_args_is_help=True, help="Follow the jobs on the queue: list, show, logs -f, cancel.")
app.add_typer(jobs_app, name="jobs")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The plan to run (written by `forge plan`).")]
JsonOption = Annotated[bool, typer.Option("--json", help="End with one JSON object (status and output paths) on stdout, for CI.")]
MemoryOption = Annotated[Optional[str], typer.Option("--memory", help="Cap the runner container's memory, e.g. 1g (docker's --memory).")]
QueueOption = Annotated[Optional[str], typer.Option(
    "--queue", envvar="FORGE_QUEUE", help="postgresql://user@host/db (several machines) or sqlite:///path/queue.db "
    "(one machine); default ~/.local/share/forge/queue.db.")]
RetriesOption = Annotated[int, typer.Option(
    "--retries", min=0, help="Relaunch a runner that died (killed, out of memory, crashed, its container lost) up to "
    "N times, resuming each time; never after a config, data or model error, or a stop you asked for.")]
RetryDelayOption = Annotated[float, typer.Option(
    "--retry-delay", min=0, envvar="FORGE_RETRY_DELAY", help="Seconds before the first retry; doubles for each "
    "next one, at most 300.")]
ContextOption = Annotated[Optional[Path], typer.Option("--context", help="Forge checkout holding the Dockerfiles (default: found from the current directory).")]


@app.command()
def plan(
    goal: Annotated[str, typer.Argument(help="Plan preset from plans/presets.yaml: 'sft' (a full epoch) or 'smoke' (a few steps).")] = "sft",
    data: Annotated[list[str], typer.Option("--data", "-d", help="Training data: files or globs (JSONL, JSON arrays, CSV, Parquet; .gz/.zst). Repeat for several.")] = ...,
    fmt: Annotated[str, typer.Option("--format", help="Row format of these inputs: auto (detected per file), alpaca, sharegpt, messages or prompt_completion.")] = "auto",
    model: Annotated[str, typer.Option("--model", "-m", help="Catalog name (plans/models.yaml) or a local Hugging Face model directory.")] = "smollm2-135m-instruct",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plan.")] = Path("forge.yaml"),
    cpu: Annotated[bool, typer.Option("--cpu", help="Plan for the CPU image even when a GPU is present.")] = False,
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="GPU to use, by index or UUID (a MIG slice by its UUID). Repeat for several; default: every GPU of the first usable family.")] = None,
    quantization: Annotated[str, typer.Option("--quantization", "-q", help="auto (4-bit only when 16-bit weights do not fit), none, 8bit or 4bit (QLoRA).")] = "auto",
    explain_: Annotated[bool, typer.Option("--explain", help="Also print the memory breakdown behind the batch sizes, each term marked calibrated, off or estimated.")] = False,
    target: Annotated[Optional[str], typer.Option("--target", help="Plan for a GPU this machine does not have, from plans/gpus.yaml: NAME or NAME:COUNT (e.g. t4, h100:8).")] = None,
) -> None:
    """Detect this machine (or take --target's GPU), resolve the model, size batches to the memory found, and
    write forge.yaml."""
    from forge.contract.plan_io import write_plan
    from forge.host.detect import detect
    from forge.host.planner import build_plan, explain
    from forge.host.render import memory_breakdown, plan_summary

    if quantization not in ("auto", "none", "8bit", "4bit"):
        raise typer.BadParameter("use auto, none, 8bit or 4bit", param_hint="--quantization")
    if target and (cpu or gpu):
        raise typer.BadParameter("plans for a GPU that is not here: leave out --cpu and --gpu", param_hint="--target")
    hardware = detect(_gpu_provider(cpu, target), select=gpu)
    built = build_plan(goal, model, data, hardware, out.resolve().parent, fmt, quantization)
    write_plan(built, out)
    plan_summary(built, str(out))
    if explain_:
        memory_breakdown(*explain(built))


@app.command()
def schema() -> None:
    """Print the JSON Schema of forge.yaml (for editor completion and validation)."""
    from forge.contract.plan import Plan

    typer.echo(json.dumps(Plan.model_json_schema(), indent=2))


@app.command()
def prepare(
    config: ConfigOption = Path("forge.yaml"),
    as_json: JsonOption = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Ignore the cache and any partial run; redo everything.")] = False,
    memory: MemoryOption = None,
    retries: RetriesOption = 0,
    retry_delay: RetryDelayOption = 10.0,
) -> None:
    """Run the data pipeline in the runner image: ingest, clean, dedup, PII scrub, compliance checks, chat
    template, tokenize, split; Parquet shards, manifest, stats and audit log. Rerun to resume or reuse."""
    _run_step("prepare", config, as_json, ["--rebuild"] if rebuild else [], memory, retries, retry_delay)


@app.command()
def train(config: ConfigOption = Path("forge.yaml"), as_json: JsonOption = False, memory: MemoryOption = None,
          retries: RetriesOption = 0, retry_delay: RetryDelayOption = 10.0) -> None:
    """Train LoRA in the runner image; rerun to resume from the newest checkpoint."""
    _run_step("train", config, as_json, [], memory, retries, retry_delay)


@app.command()
def export(
    config: ConfigOption = Path("forge.yaml"),
    run: Annotated[Optional[str], typer.Option("--run", help="Run id or a unique prefix (`forge runs list`); default: the latest finished run.")] = None,
    as_json: JsonOption = False,
    memory: MemoryOption = None,
) -> None:
    """Merge a run's LoRA adapter into the base weights, saved as safetensors with the tokenizer in runs/<id>/merged."""
    _run_step("export", config, as_json, ["--run", run] if run else [], memory)


@runs_app.command("list")
def runs_list(config: ConfigOption = Path("forge.yaml"), as_json: JsonOption = False) -> None:
    """The runs of this plan's output directory: steps, losses, and whether they finished."""
    from forge.host import runs as runs_
    from forge.host.render import runs_table

    found = runs_.all_runs(_out_dir(config))
    if as_json:
        typer.echo(json.dumps([{"id": r.id, "finished": r.metrics is not None,
                                **{k: (r.metrics or {}).get(k) for k in ("steps", "val_loss", "perplexity")}}
                               for r in found]))
    else:
        runs_table(found)


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
              config: ConfigOption = Path("forge.yaml")) -> None:
    """One run: its metrics, evaluation per tag slice, hardest rows, OOM backoffs and reproducibility hash."""
    from forge.host import runs as runs_
    from forge.host.render import run_details

    run_details(runs_.find(_out_dir(config), run_id))


@runs_app.command("compare")
def runs_compare(a: Annotated[str, typer.Argument(help="Run A (id or prefix).")],
                 b: Annotated[str, typer.Argument(help="Run B (id or prefix).")],
                 config: ConfigOption = Path("forge.yaml"), as_json: JsonOption = False) -> None:
    """Evaluation deltas B - A per tag slice, and the settings that differ."""
    from forge.host import runs as runs_
    from forge.host.render import comparison

    out = _out_dir(config)
    run_a, run_b = runs_.find(out, a), runs_.find(out, b)
    rows, gold = runs_.compare(run_a, run_b), runs_.compare_gold(run_a, run_b)
    differences = runs_.config_differences(run_a, run_b)
    if as_json:
        typer.echo(json.dumps({"a": run_a.id, "b": run_b.id, "slices": rows, "gold": gold,
                               "note": runs_.CORRELATION_NOTE, "config_differences": [list(d) for d in differences]}))
    else:
        comparison(run_a, run_b, rows, gold, differences, runs_.CORRELATION_NOTE)


def _out_dir(config: Path) -> Path:
    from forge.contract.plan_io import load_plan
    from forge.host.mounts import output_dir

    return output_dir(load_plan(config), config.resolve().parent)


@app.command()
def doctor(workdir: Annotated[Path, typer.Option(help="Where outputs will be written (for the disk check).")] = Path(".")) -> None:
    """Check the engine, GPU and driver, images and disk space; each problem comes with its fix."""
    from forge.host.doctor import run_checks
    from forge.host.render import out_console

    checks = run_checks(workdir)
    marks = {"ok": "[green]✓[/green]", "warn": "[yellow]![/yellow]", "fail": "[red]✗[/red]"}
    for check in checks:
        out_console.print(f"{marks[check.status]} [bold]{check.name}[/bold]: ", end="")
        out_console.print(check.detail, markup=False, highlight=False)
        if check.fix and check.status != "ok":
            out_console.print("    To fix: " + check.fix, style="yellow", markup=False, highlight=False)
    if any(check.status == "fail" for check in checks):
        raise typer.Exit(1)


@images_app.command("build")
def images_build(
    arch: Annotated[str, typer.Argument(help="cpu, turing, ampere, ada, hopper or blackwell.")] = "cpu",
    base: Annotated[Optional[str], typer.Option("--base", help="Override the Dockerfile's BASE_IMAGE (e.g. forge-base:bookworm from `forge images bootstrap`).")] = None,
    context: ContextOption = None,
) -> None:
    """Build the runner image for an arch through the Docker engine, showing build progress."""
    from forge.host.images import build, find_context
    from forge.host.render import err_console, out_console

    recent: list[str] = []
    with err_console.status(f"Building {arch} image…") as status:
        def show(line: str) -> None:
            if not line.startswith("Step "):
                recent[:] = [*recent[-30:], line]
            else:
                status.update(line[:100])
                err_console.print(line[:160], style="dim", markup=False, highlight=False, soft_wrap=True)

        try:
            tag = build(arch, find_context(context), base, show)
        except ForgeError:
            err_console.print("\n".join(recent), style="dim", markup=False, highlight=False, soft_wrap=True)
            raise
    out_console.print(f"[green]Built {tag}[/green]")


@images_app.command("list")
def images_list() -> None:
    """List the Forge runner images present on the engine."""
    from rich.table import Table

    from forge.host.images import list_images
    from forge.host.render import out_console

    table = Table("image", "arch", "forge", "torch", "cuda", "size (MB)")
    for info in list_images():
        table.add_row(info.tag, info.arch, info.forge_version, info.torch, info.cuda, str(info.size_mb))
    out_console.print(table)


@images_app.command("bootstrap")
def images_bootstrap(
    tag: Annotated[str, typer.Option(help="Tag of the base image to create.")] = "forge-base:bookworm",
    context: ContextOption = None,
) -> None:
    """Create a local Debian base image (debootstrap + import) trusting this host's CA bundle, for hosts with no registry."""
    from forge.host.images import find_context

    script = find_context(context) / "images" / "bootstrap-base.sh"
    code = subprocess.call(["bash", str(script), tag])
    if code != 0:
        raise ForgeError(f"Bootstrapping {tag} failed (exit {code}).", "It needs root and debootstrap; read the output above.")


@app.command()
def submit(
    config: ConfigOption = Path("forge.yaml"),
    step: Annotated[str, typer.Option("--step", help="prepare, train, or both (prepare, then train).")] = "both",
    name: Annotated[Optional[str], typer.Option("--name", help="A name to find the job by (default: the model and goal).")] = None,
    priority: Annotated[int, typer.Option("--priority", help="Higher runs first; equal priorities run in submission order.")] = 0,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="Attempts after the first (a lost agent's included).")] = 3,
    retry_on: Annotated[Optional[list[int]], typer.Option("--retry-on", help="Exit code that puts the job back on the queue; repeat. Default: 75 (stopped, state saved).")] = None,
    queue: QueueOption = None,
    as_json: JsonOption = False,
) -> None:
    """Put a plan on the queue for `forge agent`s. Its requirements (image family, compute capability, free GPU
    memory, GPU count; or CPU) come from the plan. The plan, its data and its output directory must be at the
    same path on every agent (shared storage), so that any agent can resume the job from its checkpoints."""
    from forge.contract.plan_io import dump_plan, load_plan
    from forge.host.mounts import output_dir
    from forge.host.queue.jobs import RetryPolicy, requirements_of
    from forge.host.queue.store import open_store
    from forge.host.render import out_console

    steps = {"prepare": ["prepare"], "train": ["train"], "both": ["prepare", "train"]}.get(step)
    if steps is None:
        raise typer.BadParameter("use prepare, train or both", param_hint="--step")
    plan_ = load_plan(config)
    needs = requirements_of(plan_)
    job = open_store(queue).submit(
        name=name or f"{plan_.model.name} {plan_.goal}", steps=steps, plan_path=str(config.resolve()),
        plan_yaml=dump_plan(plan_), output_dir=str(output_dir(plan_, config.resolve().parent)), requirements=needs,
        priority=priority,
        retry=RetryPolicy(max_restarts=max_restarts, **({"retry_on": retry_on} if retry_on else {})))
    if as_json:
        typer.echo(json.dumps({"id": job.id, "state": job.state, "requirements": needs.model_dump()}))
    else:
        out_console.print(f"Submitted [bold]{job.id}[/bold] ({job.name}); needs {needs.describe()}.\n"
                          f"Follow it: forge jobs logs -f {job.id}", highlight=False)


@jobs_app.command("list")
def jobs_list(
    state: Annotated[Optional[list[str]], typer.Option("--state", help="Only jobs in this state (queued, running, succeeded, failed, cancelled); repeat.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest N jobs.")] = 50,
    queue: QueueOption = None,
    as_json: JsonOption = False,
) -> None:
    """The newest jobs: state, requirements, agent and attempts."""
    import time
    from typing import get_args

    from forge.host.queue.jobs import State
    from forge.host.queue.store import open_store
    from forge.host.render import jobs_table

    unknown = sorted(set(state or []) - set(get_args(State)))
    if unknown:
        raise typer.BadParameter(f"{', '.join(unknown)}: use {', '.join(get_args(State))}", param_hint="--state")

    found = open_store(queue).jobs(state, limit)
    if as_json:
        typer.echo(json.dumps([_job_json(job) for job in found]))
    else:
        jobs_table(found, time.time())


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="Job id or a unique prefix.")], queue: QueueOption = None,
              as_json: JsonOption = False) -> None:
    """One job: its plan, requirements, retry policy, attempts, outputs; when queued, which agents could take it."""
    import time

    from forge.contract.plan import Hardware
    from forge.host.queue.capacity import Capacity
    from forge.host.queue.store import open_store
    from forge.host.render import job_details

    store = open_store(queue)
    job = store.get(job_id)
    if as_json:
        typer.echo(json.dumps(_job_json(job)))
        return
    online = [a for a in store.agents() if a["state"] != "stopped" and a["now"] - a["last_seen"] < 300]
    fits = [(a["id"], Capacity(Hardware.model_validate(a["hardware"]),
                               cpu_jobs=a["labels"].get("forge.dev/cpu-jobs") != "false").misfit(job.requirements))
            for a in online]
    job_details(job, fits, time.time())


@jobs_app.command("logs")
def jobs_logs(job_id: Annotated[str, typer.Argument(help="Job id or a unique prefix.")],
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep following until the job ends; exit with its exit code.")] = False,
              queue: QueueOption = None) -> None:
    """The job's runner output and progress, every attempt, with what the queue did in between."""
    from forge.host.queue.follow import replay
    from forge.host.queue.store import open_store
    from forge.host.render import EventRenderer, out_console

    store = open_store(queue)
    with EventRenderer() as renderer:
        job = replay(store, store.get(job_id), renderer, follow)
    if follow:
        out_console.print(f"{job.id} {job.state}" + (f" (exit code {job.exit_code})" if job.exit_code else ""),
                          style="green" if job.state == "succeeded" else "red", highlight=False)
        if job.state != "succeeded":
            raise typer.Exit(job.exit_code or 1)


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="Job id or a unique prefix.")], queue: QueueOption = None) -> None:
    """Cancel a job: a queued one at once; a running one is stopped gracefully by its agent (state saved)."""
    from forge.host.queue.store import open_store
    from forge.host.render import out_console

    job = open_store(queue).cancel(job_id)
    out_console.print(f"{job.id}: " + ("cancelled." if job.state == "cancelled" else
                                       f"cancel requested; agent {job.agent} stops it within a heartbeat."))


@app.command()
def agent(
    queue: QueueOption = None,
    name: Annotated[Optional[str], typer.Option("--name", help="How this agent shows in `forge agents` (default: the host name).")] = None,
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="Use only this GPU (index or UUID); repeat. Run one agent per GPU set to share a box.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Advertise no GPU: take CPU jobs only.")] = False,
    gpu_jobs_only: Annotated[bool, typer.Option("--gpu-jobs-only", help="Leave CPU jobs to other agents.")] = False,
    once: Annotated[bool, typer.Option("--once", help="Run one job, then exit (ephemeral, autoscaled runners).")] = False,
    lease: Annotated[float, typer.Option("--lease", min=2, help="Seconds a claim lasts without a heartbeat; a dead agent's job is taken over after this.")] = 60.0,
    heartbeat: Annotated[float, typer.Option("--heartbeat", min=0.2, help="Seconds between lease renewals (well under --lease).")] = 10.0,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between looks at the queue when idle.")] = 2.0,
    memory: MemoryOption = None,
) -> None:
    """Run the queued jobs this machine can run: it advertises its hardware as labels (GPU family, compute
    capability, memory, product, count), claims only jobs whose requirements it meets, runs them in the
    matching image like `forge train`, and streams their events and logs back to the queue."""
    import socket

    from forge.host.agent import Agent, AgentSettings
    from forge.host.detect import NvmlProvider
    from forge.host.queue.store import open_store
    from forge.host.render import err_console

    if heartbeat * 3 > lease:
        raise typer.BadParameter("give at least three heartbeats per lease", param_hint="--heartbeat")
    settings = AgentSettings(name=name or socket.gethostname(), lease_seconds=lease, heartbeat_seconds=heartbeat,
                             poll_seconds=poll, cpu_jobs=not gpu_jobs_only, memory=memory)

    def say(line: str) -> None:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)

    runner = Agent(open_store(queue), _NoGpu() if cpu else NvmlProvider(), settings, gpu, say)
    code = runner.serve(once=once)
    if once and code:
        raise typer.Exit(code)


@app.command("agents")
def agents_list(queue: QueueOption = None, as_json: JsonOption = False) -> None:
    """The agents that have registered with the queue: their labels, state, job and when they were last seen."""
    from forge.host.queue.store import open_store
    from forge.host.render import agents_table

    found = open_store(queue).agents()
    if as_json:
        typer.echo(json.dumps(found))
    else:
        agents_table(found)


def _job_json(job) -> dict:
    from dataclasses import asdict

    data = asdict(job)
    data.pop("plan_yaml")
    return {**data, "requirements": job.requirements.model_dump(), "retry": job.retry.model_dump()}


def _run_step(step: str, config: Path, as_json: bool, args: list[str], memory: str | None, retries: int = 0,
              retry_delay: float = 0.0) -> None:
    try:
        outcome, attempts = _launch(step, config, args, memory, retries, retry_delay)
    except ForgeError as exc:
        if as_json:
            _print_json(step, "failed", exc.exit_code, error={"code": exc.code, "message": exc.message, "hint": exc.hint})
        raise
    result, failure = outcome.result, outcome.failure
    status = "ok" if outcome.exit_code == 0 and result else ("stopped" if outcome.exit_code == EXIT_RESUMABLE else "failed")
    paths = {name: outcome.mounts.host_path(path) for name, path in (result.paths if result else {}).items()}
    if as_json:
        error = {"code": failure.code, "message": failure.message, "hint": failure.hint} if failure else None
        _print_json(step, status, outcome.exit_code, paths, result.info if result else {}, error, attempts)
    else:
        from forge.host.render import out_console

        for name, path in paths.items():
            out_console.print(f"[bold]{name}[/bold]: {path}", highlight=False)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


def _launch(step: str, config: Path, args: list[str], memory: str | None, retries: int, retry_delay: float):
    from forge.contract.plan_io import load_plan
    from forge.host.launcher import run_step
    from forge.host.render import EventRenderer
    from forge.host.retries import run_with_retries

    plan_ = load_plan(config)
    resumes_from = {"train": "the newest valid checkpoint", "prepare": "the finished shards"}.get(step, "the start")
    with EventRenderer() as renderer:
        return run_with_retries(lambda step_args: run_step(step, plan_, config, renderer.event, renderer.log,
                                                           step_args, memory),
                                args, retries, retry_delay, renderer.log, resumes_from)


def _print_json(step: str, status: str, exit_code: int, paths: dict | None = None, info: dict | None = None,
                error: dict | None = None, attempts: int = 1) -> None:
    typer.echo(json.dumps({"step": step, "status": status, "exit_code": exit_code, "paths": paths or {},
                           "info": info or {}, "error": error, "attempts": attempts}))


class _NoGpu:
    def report(self):
        from forge.host.detect import GpuReport

        return GpuReport(problem="--cpu was given")


def _gpu_provider(cpu: bool, target: str | None):
    """Where `forge plan` finds its GPUs: none (--cpu), a known part (--target), or NVML."""
    if target:
        from forge.host.gpus import TargetProvider

        return TargetProvider(target)
    from forge.host.detect import NvmlProvider

    return _NoGpu() if cpu else NvmlProvider()


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"forge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")] = False) -> None:
    pass


def main() -> None:
    from forge.host.render import print_error

    try:
        app()
    except ForgeError as exc:
        print_error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("Interrupted.")
        sys.exit(130)

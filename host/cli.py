"""The `forge` command. Each command wires: parse options → do the work elsewhere → print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from forge import __version__
from forge.errors import ForgeError

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

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The plan to run (written by `forge plan`).")]
JsonOption = Annotated[bool, typer.Option("--json", help="End with one JSON object (status and output paths) on stdout, for CI.")]
MemoryOption = Annotated[Optional[str], typer.Option("--memory", help="Cap the runner container's memory, e.g. 1g (docker's --memory).")]
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
    explain_: Annotated[bool, typer.Option("--explain", help="Also print the memory breakdown behind the batch sizes.")] = False,
) -> None:
    """Detect this machine, resolve the model, size batches to the memory found, and write forge.yaml."""
    from forge.contract.plan_io import write_plan
    from forge.host.detect import NvmlProvider, detect
    from forge.host.planner import build_plan, explain
    from forge.host.render import memory_breakdown, plan_summary

    if quantization not in ("auto", "none", "8bit", "4bit"):
        raise typer.BadParameter("use auto, none, 8bit or 4bit", param_hint="--quantization")
    hardware = detect(_NoGpu() if cpu else NvmlProvider(), select=gpu)
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
) -> None:
    """Run the data pipeline in the runner image: ingest, clean, dedup, PII scrub, compliance checks, chat
    template, tokenize, split; Parquet shards, manifest, stats and audit log. Rerun to resume or reuse."""
    _run_step("prepare", config, as_json, ["--rebuild"] if rebuild else [], memory)


@app.command()
def train(config: ConfigOption = Path("forge.yaml"), as_json: JsonOption = False, memory: MemoryOption = None) -> None:
    """Train LoRA in the runner image; rerun to resume from the newest checkpoint."""
    _run_step("train", config, as_json, [], memory)


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
    arch: Annotated[str, typer.Argument(help="cpu, ampere, ada, hopper or blackwell.")] = "cpu",
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


def _run_step(step: str, config: Path, as_json: bool, args: list[str], memory: str | None) -> None:
    try:
        outcome = _launch(step, config, args, memory)
    except ForgeError as exc:
        if as_json:
            _print_json(step, "failed", exc.exit_code, error={"code": exc.code, "message": exc.message, "hint": exc.hint})
        raise
    result, failure = outcome.result, outcome.failure
    status = "ok" if outcome.exit_code == 0 and result else ("stopped" if outcome.exit_code == 75 else "failed")
    paths = {name: outcome.mounts.host_path(path) for name, path in (result.paths if result else {}).items()}
    if as_json:
        error = {"code": failure.code, "message": failure.message, "hint": failure.hint} if failure else None
        _print_json(step, status, outcome.exit_code, paths, result.info if result else {}, error)
    else:
        from forge.host.render import out_console

        for name, path in paths.items():
            out_console.print(f"[bold]{name}[/bold]: {path}", highlight=False)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


def _launch(step: str, config: Path, args: list[str], memory: str | None):
    from forge.contract.plan_io import load_plan
    from forge.host.launcher import run_step
    from forge.host.render import EventRenderer

    plan_ = load_plan(config)
    with EventRenderer() as renderer:
        return run_step(step, plan_, config, renderer.event, renderer.log, args, memory)


def _print_json(step: str, status: str, exit_code: int, paths: dict | None = None, info: dict | None = None,
                error: dict | None = None) -> None:
    typer.echo(json.dumps({"step": step, "status": status, "exit_code": exit_code, "paths": paths or {},
                           "info": info or {}, "error": error}))


class _NoGpu:
    def report(self):
        from forge.host.detect import GpuReport

        return GpuReport(problem="--cpu was given")


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

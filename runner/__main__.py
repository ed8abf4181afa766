"""Entry point inside the image. Errors become `error` events; exit codes tell the host what happened."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from forge.runner import threads

threads.configure()  # before anything loads torch, MKL or OpenMP: they read the sizes once, when they load

from forge.contract import paths  # noqa: E402
from forge.errors import DataError, ForgeError  # noqa: E402
from forge.runner import emit, stop  # noqa: E402

# Bitwise-reproducible CPU math (MKL's strict CNR mode). Otherwise MKL picks code paths by its inputs' memory
# alignment, which differs between a resumed process and the run it resumes; Adam amplifies those last-bit
# differences into loss differences of 1e-5 and more within a few steps. Read when torch first calls MKL;
# no measurable cost on the CPU image (225-232 tokens/s with and without).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge.runner")
    parser.add_argument("step", choices=["fetch", "prepare", "train", "export"])
    parser.add_argument("--config", type=Path, default=Path(paths.JOB_CONFIG))
    parser.add_argument("--rebuild", action="store_true", help="prepare: ignore the cache and any partial run")
    parser.add_argument("--run", help="export: the run id (or a unique prefix); default the latest finished run")
    args = parser.parse_args(argv)

    emit.claim_stdout()
    warnings.simplefilter("ignore", FutureWarning)  # library deprecation chatter is not the user's problem
    stop.install()
    stop.watch_lifeline()
    try:
        from forge.contract.plan_io import load_plan

        plan = load_plan(args.config)
        if args.step not in ("fetch", "prepare"):  # these run on the CPU in every image
            from forge.runner.selfcheck import check_gpu_image

            check_gpu_image()
        if args.step == "fetch":  # the one step with network: a hub model into the model cache, nothing else
            from forge.runner.models import resolve

            resolve(plan.model, Path(plan.output.model_cache))
        elif args.step == "prepare":
            from forge.runner.prepare.pipeline import prepare

            prepare(plan, rebuild=args.rebuild)
        elif args.step == "train":
            from forge.runner.train import train

            train(plan)
        else:
            from forge.runner.export import export

            export(plan, args.run)
        return 0
    except stop.Stopped:
        emit.log("Stopped on request; state saved. Rerun the same command to continue.", "warning")
        return stop.EXIT_RESUMABLE
    except PermissionError as exc:  # an input the runner's user may not read: a setup problem, not a bug
        emit.emit("error", code="data", message=f"Permission denied: {exc.filename}.",
                  hint="The runner runs as your user (uid 1000 when forge runs as root): make the file readable "
                       "to it and its directories searchable (e.g. chmod o+r FILE; chmod o+x DIR).")
        return DataError.exit_code
    except ForgeError as exc:
        emit.emit("error", code=exc.code, message=exc.message, hint=exc.hint)
        return exc.exit_code
    except Exception as exc:  # a bug, not bad input: keep the traceback for the log
        traceback.print_exc(file=sys.stderr)
        emit.emit("error", code="internal", message=f"{type(exc).__name__}: {exc}",
                  hint="This is a Forge bug; the traceback is in the log above. Please report it.")
        return 1


if __name__ == "__main__":
    sys.exit(main())

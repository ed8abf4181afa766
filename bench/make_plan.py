"""Write a forge.yaml for the runner's own code (outside a container) over a directory of data files."""

import os
import sys
from pathlib import Path

from forge.contract.plan_io import write_plan
from forge.host.detect import GpuReport, detect
from forge.host.planner import build_plan


class _NoGpu:
    def report(self):
        return GpuReport(problem="benchmark")


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    shard_rows = int(sys.argv[3]) if len(sys.argv) > 3 else None
    out.mkdir(parents=True, exist_ok=True)
    plan = build_plan("smoke", "smollm2-135m-instruct", sorted(str(p) for p in data.iterdir()), detect(_NoGpu()), out)
    cache = Path(os.environ.get("FORGE_MODEL_CACHE", Path.home() / ".cache" / "forge" / "models"))
    update = {
        "data": plan.data.model_copy(update={"inputs": [
            i.model_copy(update={"path": str((out / i.path).resolve())}) for i in plan.data.inputs]}),
        "output": plan.output.model_copy(update={"dir": str(out / "forge-out"), "model_cache": str(cache)}),
    }
    if shard_rows:
        update["prepare"] = plan.prepare.model_copy(update={"shard_rows": shard_rows})
    write_plan(plan.model_copy(update=update), out / "forge.yaml")


if __name__ == "__main__":
    main()

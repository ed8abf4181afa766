"""`train.report_to`: the same metrics the host's progress bar shows, also sent to TensorBoard, MLflow or
Weights & Biases when the image has them installed (none are by default: add them to your image)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from forge.contract.plan import Plan
from forge.errors import ConfigError

_NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Reporters:
    def __init__(self, names: list[str], run_dir: Path, plan: Plan) -> None:
        missing = [name for name in names if importlib.util.find_spec(_NEEDS[name]) is None]
        if missing:
            raise ConfigError(
                f"train.report_to names {', '.join(missing)}, which this image does not have.",
                f"Install it in the image (pip install {' '.join(_NEEDS[m] for m in missing)}) or remove it "
                "from train.report_to.",
            )
        self.names, self.run_dir, self.plan = names, run_dir, plan
        self._sinks: list = []

    def __enter__(self) -> Reporters:
        run_name = self.run_dir.name
        config = self.plan.model_dump(mode="json", exclude={"reasons"})
        for name in self.names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
                self._sinks.append((lambda m, s, w=writer: [w.add_scalar(k, v, s) for k, v in m.items()],
                                    writer.close))
            elif name == "mlflow":
                import mlflow

                mlflow.start_run(run_name=run_name)
                mlflow.log_params({"model": self.plan.model.name, **self.plan.train.model_dump(exclude={"lora"})})
                self._sinks.append((lambda m, s: mlflow.log_metrics(m, step=s), mlflow.end_run))
            elif name == "wandb":
                import wandb

                run = wandb.init(project="forge", name=run_name, config=config, dir=str(self.run_dir))
                self._sinks.append((lambda m, s, r=run: r.log(m, step=s), run.finish))
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        for send, _ in self._sinks:
            send(metrics, step)

    def __exit__(self, *exc) -> None:
        for _, close in self._sinks:
            close()

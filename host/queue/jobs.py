"""What a job is: a frozen plan, the steps to run, what hardware it needs and how often it may restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from forge.contract import compat
from forge.contract.plan import Arch, Plan, Strict
from forge.errors import EXIT_RESUMABLE, ForgeError

Step = Literal["prepare", "train"]
State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES = ("succeeded", "failed", "cancelled")


class Requirements(Strict):
    """Derived from the plan: the image family it was built for and the memory its batches were sized to."""

    accelerator: Literal["cpu", "cuda"]
    arch: Arch = Field(description="The plan's image family")
    min_compute_capability: str | None = Field(None, description="The lowest planned GPU's, e.g. 8.9")
    min_free_vram_mib: int = Field(0, ge=0, description="Per GPU: the planned peak estimate over the planner's headroom")
    gpu_count: int = Field(0, ge=0)

    def describe(self) -> str:
        if self.accelerator == "cpu":
            return "cpu"
        return (f"{self.gpu_count}× {self.arch} GPU (compute ≥ {self.min_compute_capability}, "
                f"≥ {self.min_free_vram_mib / 1024:.1f} GiB free)")


class RetryPolicy(Strict):
    max_restarts: int = Field(3, ge=0, description="Attempts after the first one, a lost agent's included")
    retry_on: list[int] = Field([EXIT_RESUMABLE], description="Exit codes that put the job back on the queue")


@dataclass(frozen=True)
class Job:
    """One row of the queue, as every command sees it."""

    id: str
    name: str
    state: State
    steps: list[str]
    plan_path: str
    plan_yaml: str
    requirements: Requirements
    retry: RetryPolicy
    priority: int
    submitted_at: float
    submitted_by: str
    attempts: int = 0
    agent: str | None = None
    lease_expires: float | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    result: dict = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def next_state(self, exit_code: int | None) -> State:
        """After an attempt ended with this code (None: its agent was lost, which is always worth a restart):
        done, back on the queue, or failed for good."""
        if self.cancel_requested:
            return "cancelled"
        if exit_code == 0:
            return "succeeded"
        retryable = exit_code is None or exit_code in self.retry.retry_on
        return "queued" if retryable and self.attempts <= self.retry.max_restarts else "failed"


def requirements_of(plan: Plan) -> Requirements:
    """What an agent needs to run this plan as planned: its image family, GPUs at least as capable as the
    planned ones, as many of them, each with room for the batches the planner sized."""
    hardware = plan.hardware
    if hardware.accelerator == "cpu":
        return Requirements(accelerator="cpu", arch="cpu")
    lowest = min((gpu.compute_capability for gpu in hardware.gpus), key=compat.parse_version)
    return Requirements(accelerator="cuda", arch=plan.image.arch, min_compute_capability=lowest,
                        min_free_vram_mib=_planned_peak_mib(plan), gpu_count=len(hardware.gpus))


def _planned_peak_mib(plan: Plan) -> int:
    """The planner's estimate for the planned batches, with its headroom; the planned free memory when the
    model's shape is unknown (e.g. a local model not visible from here)."""
    from forge.host.planner import HEADROOM, planned_peak

    try:
        peak = planned_peak(plan)
    except ForgeError:
        peak = None
    if peak is None:
        return min(gpu.memory_free_mib for gpu in plan.hardware.gpus)
    return int(peak.total / HEADROOM / 1024**2) + 1


def compute_key(capability: str) -> int:
    """8.9 -> 89, 10.0 -> 100: compute capabilities in an order SQL can compare."""
    major, minor = compat.parse_version(capability)
    return major * 10 + minor

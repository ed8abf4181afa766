"""The data in plans/: the model catalog and the plan presets, validated like any user-written file."""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forge.contract.plan import ModelSource
from forge.errors import ConfigError, ModelError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogModel(_Strict):
    source: ModelSource
    chat_template: str = "model"
    params_m: float = Field(gt=0, description="Parameters, in millions")
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int | None = Field(None, ge=1, description="When it is not hidden / heads")
    intermediate: int = Field(ge=1, description="MLP width")
    vocab: int = Field(ge=1)
    tied_embeddings: bool = True
    lora_targets: list[str] = Field(min_length=1)

    @property
    def attention_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


class ArchitectureLora(_Strict):
    modules: list[str] = Field(min_length=1)


class PresetPrepare(_Strict):
    max_length: int = Field(ge=16)
    val_fraction: float = Field(ge=0, lt=1)


class PresetTrain(_Strict):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    effective_batch: int = Field(ge=1, description="Sequences per optimizer step")
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    save_every: int = Field(ge=1)
    keep_last: int = Field(ge=1)


class PresetLora(_Strict):
    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)


class Preset(_Strict):
    description: str
    prepare: PresetPrepare
    train: PresetTrain
    lora: PresetLora


def _load(name: str, model: type[_Strict]) -> dict:
    text = resources.files("forge.plans").joinpath(name).read_text(encoding="utf-8")
    try:
        return {key: model.model_validate(value) for key, value in yaml.safe_load(text).items()}
    except ValidationError as exc:
        raise ConfigError(f"plans/{name} is invalid: {exc}", "Fix the entry named in the message.") from None


@cache
def models() -> dict[str, CatalogModel]:
    return _load("models.yaml", CatalogModel)


@cache
def presets() -> dict[str, Preset]:
    return _load("presets.yaml", Preset)


@cache
def lora_targets() -> dict[str, ArchitectureLora]:
    return _load("lora_targets.yaml", ArchitectureLora)


def lora_targets_for(model_dir: Path) -> tuple[list[str] | None, str]:
    """The default LoRA modules for a local model's architecture (config.json `model_type`), or None."""
    import json

    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "?")
    except (OSError, ValueError):
        model_type = "?"
    entry = lora_targets().get(model_type)
    return (list(entry.modules) if entry else None), model_type


def preset(name: str) -> Preset:
    try:
        return presets()[name]
    except KeyError:
        raise ConfigError(
            f"Unknown goal {name!r}.{_did_you_mean(name, list(presets()))}",
            f"Use one of: {', '.join(presets())} (defined in plans/presets.yaml), as the first argument: "
            "`forge plan smoke --data ...`.",
        ) from None


def _did_you_mean(name: str, known: list[str], aliases: dict[str, str] | None = None) -> str:
    """" Did you mean a or b?" for the known names nearest `name` (any case), or ""; `aliases` maps other
    names (lower-case Hub repo ids) to known ones, for a name nearer an alias ("HuggingFaceTB/SmolLM2-360M")."""
    wanted = name.strip().lower()
    close = difflib.get_close_matches(wanted, known, n=3, cutoff=0.6)
    for alias in difflib.get_close_matches(wanted, list(aliases or {}), n=3, cutoff=0.6):
        if aliases[alias] not in close:
            close.append(aliases[alias])
    return f" Did you mean {' or '.join(close[:3])}?" if close else ""


def resolve_model(name_or_path: str) -> tuple[str, CatalogModel | None, ModelSource]:
    """A catalog name, or a local Hugging Face model directory (which has a config.json)."""
    if name_or_path in models():
        entry = models()[name_or_path]
        return name_or_path, entry, entry.source
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json, so it is not a Hugging Face model directory.",
                "Point --model at a directory saved with save_pretrained, or use a catalog name.",
            )
        return path.name, None, ModelSource(kind="local", path=str(path.resolve()))
    repos = {entry.source.repo.lower(): key for key, entry in models().items() if entry.source.repo}
    if name_or_path.lower() in repos:
        raise ModelError(f"{name_or_path!r} is a Hugging Face Hub id; the catalog calls that model "
                         f"{repos[name_or_path.lower()]!r}.", f"Use --model {repos[name_or_path.lower()]}.")
    hub = "/" in name_or_path and not name_or_path.startswith((".", "/", "~"))
    raise ModelError(
        f"Unknown model {name_or_path!r}: not in the catalog and not a local directory."
        + (" Hugging Face Hub ids outside the catalog are not supported yet." if hub else "")
        + _did_you_mean(name_or_path, list(models()), repos),
        f"Use one of: {', '.join(models())} (plans/models.yaml), or a path to a local model directory"
        + (f" (e.g. `hf download {name_or_path} --local-dir DIR`, then --model DIR)." if hub else "."),
    )


def shape_of(entry: CatalogModel | None, source: ModelSource):
    """The architecture numbers the memory planner needs: from the catalog, else from a local config.json
    (parameters counted from the shapes), else None."""
    import json

    from forge.host.memory import Shape

    if entry is not None:
        return Shape.of(entry)
    if source.kind != "local":
        return None
    try:
        config = json.loads((Path(source.path) / "config.json").read_text())
        config = config.get("text_config", config)  # multimodal wrappers keep the language model's here
        hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        intermediate, vocab = config.get("intermediate_size") or 4 * hidden, config["vocab_size"]
        tied = bool(config.get("tie_word_embeddings", True))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    attention = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    params = vocab * hidden * (1 if tied else 2) + layers * (attention + 3 * hidden * intermediate)
    return Shape(params, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied)

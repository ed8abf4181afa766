"""Measure real training peaks for a grid of settings and store them beside the planner's estimates, so the
unit tests hold the planner to them (tests/test_calibration.py, ±15%).

    # CPU, the bundled model (peak RSS, VmHWM, of a fresh process per point):
    python bench/calibrate_memory.py --device cpu --model smollm2-135m-instruct \
        --seq 64 128 256 --micro 1 2 4 8 --out plans/calibration/cpu-smollm2-135m-instruct.json
    # A GPU (torch.cuda.max_memory_allocated; also searches the largest micro-batch that fits):
    python bench/calibrate_memory.py --device cuda --model qwen2.5-0.5b-instruct --quantization none 4bit \
        --checkpointing off on --seq 512 2048 --micro 1 4 --out plans/calibration/<gpu>-qwen2.5-0.5b.json

Each point runs in its own process: three optimizer steps of LoRA (the catalog's targets, r=16) on a
random batch of `micro x seq` tokens, then reports its peak. Models come from the model cache
(FORGE_MODEL_CACHE; the bundled SmolLM2 is converted there by the tests) or a local directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RANK = 16


def measure(model_dir: str, device: str, quantization: str, checkpointing: bool, seq: int, micro: int,
            targets: list[str]) -> float:
    """Peak MiB of three LoRA training steps (runs in a child process)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = {"none": None, "8bit": BitsAndBytesConfig(load_in_8bit=True),
             "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dtype)}[quantization]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant,
                                                 attn_implementation="sdpa", **({"device_map": {"": 0}} if cuda else {}))
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, model.config.vocab_size, (micro, seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(model.device)
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _child(args) -> None:
    point = json.loads(args.point)
    print(json.dumps({"measured_mb": measure(**point)}))


def _run_point(point: dict) -> float | None:
    done = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], capture_output=True, text=True)
    if done.returncode:
        if "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr:
            return None
        sys.exit(f"point {point} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["measured_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalog name")
    parser.add_argument("--model-dir", help="default: <model cache>/<model>")
    parser.add_argument("--quantization", nargs="+", default=["none"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--seq", nargs="+", type=int, default=[128])
    parser.add_argument("--micro", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--largest", action="store_true", help="cuda: also find the largest micro-batch that fits")
    parser.add_argument("--out", type=Path, required=False)
    args = parser.parse_args()
    if args.point:
        return _child(args)

    from forge.host import catalog

    entry = catalog.models()[args.model]
    cache = Path(os.environ.get("FORGE_MODEL_CACHE", Path.home() / ".cache" / "forge" / "models"))
    model_dir = args.model_dir or str(cache / args.model)
    device_name, memory_mib = "cpu", None
    if args.device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(0)
        memory_mib = torch.cuda.get_device_properties(0).total_memory // 2**20
    points = []
    for quantization in args.quantization:
        for checkpointing in args.checkpointing:
            for seq in args.seq:
                for micro in args.micro:
                    point = dict(model_dir=model_dir, device=args.device, quantization=quantization,
                                 checkpointing=checkpointing == "on", seq=seq, micro=micro,
                                 targets=entry.lora_targets)
                    measured = _run_point(point)
                    record = {"model": args.model, "quantization": quantization,
                              "checkpointing": checkpointing == "on", "seq": seq, "micro": micro,
                              "measured_mb": measured}
                    points.append(record)
                    print(json.dumps(record), flush=True)
                if args.largest and args.device == "cuda":
                    points.append(_largest(point, seq, model=args.model, quantization=quantization,
                                           checkpointing=checkpointing == "on"))
    result = {"device": device_name, "accelerator": args.device, "memory_total_mib": memory_mib, "rank": RANK,
              "command": " ".join(["python", *sys.argv]), "points": points}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _largest(point: dict, seq: int, **record) -> dict:
    """The largest power-of-two micro-batch that trains without running out of memory."""
    micro, fits = 1, 0
    while micro <= 256 and _run_point({**point, "micro": micro}) is not None:
        fits, micro = micro, micro * 2
    return {**record, "seq": seq, "largest_micro": fits}


if __name__ == "__main__":
    main()

"""forge train against a bare Hugging Face Trainer + PEFT script, side by side in one run, on the same model,
data, LoRA settings and batch (CPU).

    python bench/train_bench.py                 # 30 optimizer steps of 4 x 2 rows each

Printed:
- tokens/s of `forge train` (the CLI, in the CPU container; the training loop alone, model load excluded)
  ÷ tokens/s of `Trainer.train()` on the same prepared Parquet (target >= 0.95). Tokens are real tokens
  (padding excluded), counted on the rows each loop actually consumed.
- seconds from `forge train` to its first step event, split into container start (CLI start to the runner's
  first event), model load (the runner's load stage) and first step (train stage start to step 1).
Needs the CPU image (`bash scripts/setup.sh`) and the converted SmolLM2 in the model cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_pairs  # noqa: E402


def forge(*args: str, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "forge.host", *args, "--json"], cwd=cwd, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"forge {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_job(workdir: Path, rows: int, steps: int, micro: int, accumulation: int) -> Path:
    data = workdir / "data"
    data.mkdir(parents=True)
    (data / "chat.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n"
        for p, a in make_pairs(rows, seed=3)))
    subprocess.run([sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", f"--data={data / 'chat.jsonl'}"],
                   cwd=workdir, check=True, capture_output=True)
    config = yaml.safe_load((workdir / "forge.yaml").read_text())
    config["prepare"]["max_length"] = 256
    config["train"].update(max_steps=steps, save_every=steps, micro_batch_size=micro,
                           gradient_accumulation=accumulation)
    config["train"]["lora"]["dropout"] = 0.0
    (workdir / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def forge_train(job: Path) -> tuple[float, dict[str, float], dict]:
    """tokens/s of the training loop, the time-to-first-step split, and the result."""
    started = time.time()
    result = forge("train", cwd=job)
    run_dir = Path(result["paths"]["run_dir"])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    load_start = next(e["ts"] for e in events if e["kind"] == "stage" and e["stage"] == "load")
    load_end = next(e for e in events if e["kind"] == "stage_end" and e["stage"] == "load")
    train_start = next(e["ts"] for e in events if e["kind"] == "stage" and e["stage"] == "train")
    steps = [e for e in events if e["kind"] == "progress" and e["stage"] == "train"]
    first_event = min(e["ts"] for e in events)
    split = {"container start": first_event - started, "before load": load_start - first_event,
             "model load": load_end["seconds"], "first step": steps[0]["ts"] - train_start}
    return steps[-1]["metrics"]["tokens_per_s"], split, result


def bare_trainer(job: Path, model_dir: Path, steps: int, micro: int, accumulation: int) -> tuple[float, float]:
    """The usual script: Trainer + PEFT on the prepared train split, the same LoRA and batch; tokens/s of
    `trainer.train()` and its mean training loss."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    config = yaml.safe_load((job / "forge.yaml").read_text())["train"]
    dataset_dir = next((job / "forge-out" / "datasets").iterdir())
    train = datasets.load_dataset("parquet", data_files=str(dataset_dir / "train" / "*.parquet"), split="train")
    train = train.select_columns(["input_ids", "labels"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = config["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen = [0]

    def counting(features):
        seen[0] += sum(len(f["input_ids"]) for f in features)
        return collate(features)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=accumulation, learning_rate=config["learning_rate"],
                                 lr_scheduler_type="linear", warmup_steps=config["warmup_steps"], max_grad_norm=1.0,
                                 save_strategy="no", eval_strategy="no", logging_steps=steps, report_to=[],
                                 seed=config["seed"], use_cpu=True, dataloader_num_workers=0,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=counting)
        metrics = trainer.train().metrics
    return seen[0] / metrics["train_runtime"], metrics["train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    cache = Path(os.environ.get("FORGE_MODEL_CACHE", Path.home() / ".cache" / "forge" / "models"))
    with tempfile.TemporaryDirectory(prefix="forge-train-bench-") as tmp:
        job = make_job(Path(tmp), args.rows, args.steps, args.micro, args.accumulation)
        forge("prepare", cwd=job)
        forge_rate, split, result = forge_train(job)
        history = json.loads(Path(result["paths"]["metrics"]).read_text())["history"]
        forge_loss = sum(h["loss"] for h in history) / len(history)
        bare_rate, bare_loss = bare_trainer(job, cache / "smollm2-135m-instruct", args.steps, args.micro, args.accumulation)
    print(f"cpus: {len(os.sched_getaffinity(0))}  steps: {args.steps}  batch: {args.micro} x {args.accumulation}")
    print(f"forge train (CLI, CPU container)        : {forge_rate:10,.0f} tokens/s   mean loss {forge_loss:.3f}")
    print(f"bare Trainer + PEFT (this process)      : {bare_rate:10,.0f} tokens/s   mean loss {bare_loss:.3f}")
    print(f"ratio forge / bare                      : {forge_rate / bare_rate:.2f}   (target >= 0.95)")
    print("seconds to the first step event         : " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
          + f"  (total {sum(split.values()):.2f})")


if __name__ == "__main__":
    main()

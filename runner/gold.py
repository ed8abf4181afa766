"""Gold-set evaluation after training: the model answers each gold question greedily; exact match and
format compliance per row, overall and per row tag. Every prediction is kept in `gold_predictions.jsonl`
so a figure can be checked against the answers behind it.

A gold file is read like a prepare input (any format, tags included); its last assistant turn is the
expected answer and everything before it is the prompt. A row that cannot be read is an error naming
the file and line: a gold set with silently skipped rows would report a number about other data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from forge.contract.plan import EvalSpec
from forge.errors import DataError
from forge.runner.emit import stage
from forge.runner.prepare.rows import Invalid, detect_format, to_conversation
from forge.runner.prepare.sources import decode, read_records


@dataclass(frozen=True)
class GoldRow:
    id: str
    prompt: list[dict[str, str]]
    answer: str
    tags: dict[str, str]


def read_gold(path: Path) -> list[GoldRow]:
    rows = []
    for record in read_records(path):
        record = decode(record)
        where = f"{path.name} line {record.line}"
        if record.problem:
            raise DataError(f"Gold set {where}: {record.problem[1]}.", "Fix or remove that row of train.eval.gold.")
        fmt = detect_format(record.value)
        if fmt is None:
            raise DataError(f"Gold set {where}: not a conversation (messages, conversations, instruction or "
                            "prompt/completion).", "Use one of the prepare input formats for train.eval.gold.")
        try:
            conversation = to_conversation(record.value, fmt)
        except Invalid as exc:
            raise DataError(f"Gold set {where}: {exc} ({exc.reason}).", "Fix that row of train.eval.gold.") from None
        *prompt, answer = conversation.messages
        rows.append(GoldRow(f"{path.name}:{record.line}", prompt, answer["content"], conversation.tags))
    if not rows:
        raise DataError(f"Gold set {path} has no rows.", "Point train.eval.gold at a file with conversations.")
    return rows


def well_formed(output: str, answer: str, spec: EvalSpec, stopped: bool) -> bool:
    """Whether an output has the form the gold answer has (or the configured one)."""
    text = output.strip()
    if spec.format_regex is not None:
        return re.fullmatch(spec.format_regex, text, flags=re.DOTALL) is not None
    kind = spec.format if spec.format != "auto" else _kind(answer)
    if kind == "json":
        expected = _json(answer)
        found = _json(text)
        return found is not None and (expected is None or type(found) is type(expected))
    if kind == "number":
        return _number(text)
    return bool(text) and stopped  # plain text: something, and the model ended it rather than the budget


def exact(output: str, answer: str) -> bool:
    """Equal after collapsing whitespace (case and punctuation count)."""
    return " ".join(output.split()) == " ".join(answer.split())


def _kind(answer: str) -> str:
    if isinstance(_json(answer.strip()), (dict, list)):
        return "json"
    return "number" if _number(answer.strip()) else "text"


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def evaluate_gold(model, tokenizer, template: str, rows: list[GoldRow], spec: EvalSpec, out: Path) -> dict:
    """Greedy answers, scored; predictions written to `out` (JSON lines), the summary returned."""
    import torch

    model.eval()
    scored = []
    with stage("gold", total=len(rows), unit="questions") as progress, torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template(row.prompt, chat_template=template, tokenize=False,
                                                   add_generation_prompt=True)
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
            generated = model.generate(**inputs, max_new_tokens=spec.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1]:]
            stopped = len(generated) < spec.max_new_tokens or int(generated[-1]) == tokenizer.eos_token_id
            output = tokenizer.decode(generated, skip_special_tokens=True)
            scored.append({"id": row.id, "tags": row.tags, "answer": row.answer, "output": output,
                           "exact_match": exact(output, row.answer),
                           "well_formed": well_formed(output, row.answer, spec, stopped)})
            progress.advance(1)
        summary = summarise(scored)
        progress.summary = {"exact_match": summary["exact_match"], "format_compliance": summary["format_compliance"]}
    out.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in scored), encoding="utf-8")
    return summary


def summarise(scored: list[dict]) -> dict:
    def rates(items: list[dict]) -> dict:
        return {"rows": len(items), "exact_match": sum(i["exact_match"] for i in items) / len(items),
                "format_compliance": sum(i["well_formed"] for i in items) / len(items)}

    groups: dict[str, list[dict]] = {}
    for item in scored:
        for key, value in item["tags"].items():
            groups.setdefault(f"{key}:{value}", []).append(item)
    return {**rates(scored), "slices": {name: rates(items) for name, items in sorted(groups.items())}}

"""Evaluation: predictions for encoded rows and the task's metrics on them.

Classifiers predict the argmax of their logits (the value itself for regression); text-to-text
models generate a few tokens greedily, mapped back to a label word (an invalid word counts as wrong,
see `eptkit.metrics`). Under several processes each scores an interleaved shard and the predictions
are gathered, so every process returns the full list.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .metrics import compute_metrics
from .tasks.formatting import Collator


def _label_budget(spec, tokenizer) -> int:
    words = list(spec.label_words or ())
    if not words:
        return 8
    return max(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words) + 2


@torch.no_grad()
def predict_rows(model, tokenizer, spec, rows: list[dict], *, batch_size: int = 64, accelerator=None,
                 max_new_tokens: int | None = None) -> list:
    """Predictions for encoded rows, in order: class ids / floats, None where the output is not a label.

    Under several processes each scores an interleaved shard and the results are gathered, so every
    process returns the full list.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    n = len(rows)
    per_proc = math.ceil(n / world)
    mine = [(rank + world * i) % n for i in range(per_proc)]  # padded by wrapping: equal shards
    # Longest rows first, so each batch holds rows of similar length and pads little (the longest batch
    # also comes first, where running out of memory shows at once); predictions go back to row order.
    mine.sort(key=lambda i: -len(rows[i].get("source_input_ids", rows[i]["input_ids"])))
    collate = Collator(tokenizer, model.task_type)
    budget = max_new_tokens or _label_budget(spec, tokenizer)
    preds: list[float] = []
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with autocast:
        for start in range(0, len(mine), batch_size):
            chunk = [rows[i] for i in mine[start:start + batch_size]]
            preds.extend(batch_values(model, tokenizer, collate, chunk, [spec] * len(chunk), [budget] * len(chunk),
                                       device))
    idx = mine
    if accelerator is not None and world > 1:
        t = torch.tensor(preds, dtype=torch.float64, device=device)
        order = torch.tensor(mine, dtype=torch.long, device=device)
        preds, idx = accelerator.gather(t).cpu().tolist(), accelerator.gather(order).cpu().tolist()
    merged: dict[int, float] = {}
    for i, v in zip(idx, preds):
        merged.setdefault(i, v)
    preds = [merged[i] for i in range(n)]
    if was_training:
        model.train()
    return [_prediction(v, spec) for v in preds]


@torch.no_grad()
def predict_mixed(model, tokenizer, rows: list[dict], specs: list, adapter_names: list[str]) -> list:
    """Predictions for one batch of encoded rows, row i of task specs[i] through adapter adapter_names[i] (a
    mixed batch, `eptkit.forward`): what `predict_rows` gives each row with its own adapter alone. A text-to-text
    row's generated tokens are cut to its own task's budget, so a longer budget of another task changes nothing."""
    budgets = {spec: _label_budget(spec, tokenizer) for spec in set(specs)}
    device = next(model.parameters()).device
    collate = Collator(tokenizer, model.task_type)
    values = batch_values(model, tokenizer, collate, rows, specs, [budgets[s] for s in specs], device,
                           adapter_names)
    return [_prediction(v, spec) for v, spec in zip(values, specs)]


def batch_values(model, tokenizer, collate: Collator, rows: list[dict], specs: list, budgets: list[int], device,
                  adapter_names: list[str] | None = None) -> list[float]:
    """One batch of encoded rows -> a float per row (class id, score, or NaN where generated text is not a label)."""
    batch = collate(rows)
    mixed = {} if adapter_names is None else {"adapter_names": adapter_names}
    if model.task_type == "classification":
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs, **mixed).logits.float()
        first, best = logits[:, 0].cpu().tolist(), logits.argmax(-1).float().cpu().tolist()
        return [f if spec.is_regression else b for f, b, spec in zip(first, best, specs)]
    if model.task_type == "causal":
        ids, mask = batch["source_input_ids"], batch["source_attention_mask"]
    else:
        ids, mask = batch["input_ids"], batch["attention_mask"]
    new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(budgets),
                         do_sample=False, num_beams=1, pad_token_id=collate.pad_id, **mixed)
    texts = tokenizer.batch_decode([row[:budget] for row, budget in zip(new, budgets)], skip_special_tokens=True)
    values = []
    for text, spec in zip(texts, specs):
        value = spec.parse_label(text)
        values.append(float("nan") if value is None else float(value))
    return values


def _prediction(value: float, spec):
    if math.isnan(value):
        return None
    return value if spec.is_regression else int(value)


def references(spec, rows: list[dict]) -> list:
    """The gold labels of encoded rows (the label id / score, or the original label of text-to-text rows)."""
    key = "labels" if rows and "reference" not in rows[0] else "reference"
    return [r[key] for r in rows]


def score(spec, predictions: list, rows: list[dict]) -> dict[str, float]:
    """The task's metrics (0-100) of predictions against the encoded rows' references."""
    groups = [r[spec.group_field] for r in rows] if spec.group_field else None
    return compute_metrics(spec, predictions, references(spec, rows), groups=groups)


def evaluate_rows(model, tokenizer, spec, rows, *, batch_size=64, accelerator=None, max_new_tokens=None):
    """Predict and score encoded rows: the task's metrics (0-100)."""
    preds = predict_rows(model, tokenizer, spec, rows, batch_size=batch_size, accelerator=accelerator,
                         max_new_tokens=max_new_tokens)
    return score(spec, preds, rows)


def main_metric(spec, metrics: dict[str, float]) -> float:
    """The value checkpoint selection and early stopping compare (higher is better)."""
    return metrics[spec.main_metric]

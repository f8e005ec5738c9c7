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
    collate = Collator(tokenizer, model.task_type)
    budget = max_new_tokens or _label_budget(spec, tokenizer)
    pad_id = collate.pad_id
    preds: list[float] = []
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with autocast:
        for start in range(0, len(mine), batch_size):
            batch = collate([rows[i] for i in mine[start:start + batch_size]])
            if model.task_type == "classification":
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")
                          if k in batch}
                logits = model(**inputs).logits.float()
                values = logits[:, 0] if spec.is_regression else logits.argmax(-1).float()
                preds.extend(values.cpu().tolist())
                continue
            if model.task_type == "causal":
                ids, mask = batch["source_input_ids"], batch["source_attention_mask"]
            else:
                ids, mask = batch["input_ids"], batch["attention_mask"]
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                                 do_sample=False, num_beams=1, pad_token_id=pad_id)
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                value = spec.parse_label(text)
                preds.append(float("nan") if value is None else float(value))
    if accelerator is not None and world > 1:
        t = torch.tensor(preds, dtype=torch.float64, device=device)
        idx = torch.tensor(mine, dtype=torch.long, device=device)
        t, idx = accelerator.gather(t).cpu().tolist(), accelerator.gather(idx).cpu().tolist()
        merged: dict[int, float] = {}
        for i, v in zip(idx, t):
            merged.setdefault(i, v)
        preds = [merged[i] for i in range(n)]
    else:
        preds = preds[:n]
    if was_training:
        model.train()
    out = []
    for v in preds:
        if math.isnan(v):
            out.append(None)
        else:
            out.append(v if spec.is_regression else int(v))
    return out


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

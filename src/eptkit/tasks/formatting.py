"""Tokens for the three task types, and the collator that pads them into batches.

Task types (the strings `PromptedModel.task_type` reports):

* "classification": the text (pair) of `TaskSpec.segments` -> input_ids, attention_mask,
  token_type_ids (if the tokenizer makes them), labels (int class id; float for regression).
* "seq2seq": the `TaskSpec.template` source -> input_ids, attention_mask; labels = token ids of the
  label word as the tokenizer writes targets (T5: word + </s>); reference = the label (int or float).
* "causal": source = template + "\\nAnswer:", target = " " + label word + eos. input_ids = source +
  target, labels = -100 on source tokens and the target ids after; source_input_ids = the source alone
  (the prompt for generation at evaluation); reference = the label.

Tasks with a group field (MultiRC) keep it (`question_id`) for the metrics. Every other column of
the split is dropped.

Length: `max_length` is the limit on the *text* tokens (the model adds its virtual prompt tokens in
front on its own). An input over the limit is an error naming the task, split, row and length,
unless truncation=True, which truncates (classification: longest-first; seq2seq: the end of the
source; causal: the start of the source, after a BOS, so the answer cue and target survive) and
logs how many rows were cut.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..task_types import TASK_TYPES
from .errors import DataError
from .registry import TaskSpec, get_task

if TYPE_CHECKING:  # imported where used: eptkit imports without datasets (and its pyarrow)
    import datasets

logger = logging.getLogger("eptkit")

# Keys a model's forward() takes. Everything else in a batch (reference, source_input_ids,
# source_attention_mask, question_id) is evaluation metadata the training loop pops first.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
IGNORE_INDEX = -100  # label value the loss ignores (PyTorch / HF convention)


def encode(data: datasets.Dataset | datasets.DatasetDict, spec: str | TaskSpec, tokenizer, task_type: str,
           max_length: int, *, truncation: bool = False, split: str | None = None, stats: dict | None = None):
    """Tokenize a split (or every split of a DatasetDict) for `task_type`; see the module docstring.

    `split` only names the split in error messages (a DatasetDict passes its own names).
    `stats`, if given, receives {split: number of rows truncated to max_length}.
    Returns a datasets.Dataset (or DatasetDict) with only the model's columns plus metadata.
    """
    import datasets

    if isinstance(data, datasets.DatasetDict):
        return datasets.DatasetDict({name: encode(ds, spec, tokenizer, task_type, max_length, truncation=truncation,
                                                  split=name, stats=stats) for name, ds in data.items()})
    spec = get_task(spec)
    _check_encode_args(task_type, max_length)
    where = f"task {spec.name!r} split {split or getattr(data, 'split', None) or '?'!r}"
    if len(data) == 0:
        raise DataError(f"{where}: empty split")
    builder = _Builder(spec, tokenizer, task_type, max_length, truncation, where)
    keep = {spec.group_field} if spec.group_field else set()
    out = data.map(builder, batched=True, with_indices=True,
                   remove_columns=[c for c in data.column_names if c not in keep], desc=f"tokenizing {spec.name}")
    n_cut = sum(out["_truncated"])
    if stats is not None:
        stats[split or "?"] = int(n_cut)
    if n_cut:
        logger.warning("%s: truncated %d of %d rows to max_length=%d", where, n_cut, len(out), max_length)
    return out.remove_columns("_truncated")


def encode_rows(rows: list[dict], spec: str | TaskSpec, tokenizer, task_type: str, max_length: int, *,
                truncation: bool = False, split: str = "input") -> tuple[list[dict], int]:
    """`encode` for rows already in memory (each with the text fields and a `label`), without `datasets`:
    (encoded rows, number truncated). Same tokens as `encode`, at a fraction of the cost per call (no
    Arrow table, no map), which is what a server answering small requests needs."""
    spec = get_task(spec)
    _check_encode_args(task_type, max_length)
    where = f"task {spec.name!r} split {split!r}"
    if not rows:
        raise DataError(f"{where}: empty split")
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    out = _Builder(spec, tokenizer, task_type, max_length, truncation, where)(columns, list(range(len(rows))))
    n_cut = sum(out.pop("_truncated"))
    if n_cut:
        logger.warning("%s: truncated %d of %d rows to max_length=%d", where, n_cut, len(rows), max_length)
    if spec.group_field and spec.group_field in columns:
        out[spec.group_field] = columns[spec.group_field]
    return [dict(zip(out, values)) for values in zip(*out.values())], n_cut


def _check_encode_args(task_type: str, max_length: int) -> None:
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")


class RowTooLong(DataError):
    """A row over max_length where truncation is off; `row`, `length` and `max_length` say which and by how much."""

    def __init__(self, message: str, row: int, length: int, max_length: int):
        super().__init__(message)
        self.row, self.length, self.max_length = row, length, max_length


@dataclass
class _Builder:
    """The batched map function (a class, so datasets can hash it for its cache)."""

    spec: TaskSpec
    tokenizer: Any
    task_type: str
    max_length: int
    truncation: bool
    where: str

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return getattr(self, self.task_type)(rows, indices)

    def _too_long(self, index: int, length: int) -> DataError:
        return RowTooLong(f"{self.where} row {index}: {length} tokens exceed max_length={self.max_length}; "
                          f"raise max_length or pass truncation=True", index, length, self.max_length)

    def _check(self, lengths, indices) -> list[bool]:
        over = [n > self.max_length for n in lengths]
        if any(over) and not self.truncation:
            j = over.index(True)
            raise self._too_long(indices[j], lengths[j])
        return over

    def classification(self, rows, indices):
        segs = [self.spec.segments(r) for r in rows]
        args = [[s[0] for s in segs]] + ([[s[1] for s in segs]] if len(segs[0]) > 1 else [])
        enc = self.tokenizer(*args)
        over = self._check([len(x) for x in enc["input_ids"]], indices)
        if any(over):
            enc = self.tokenizer(*args, truncation=True, max_length=self.max_length)
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return {**out, "labels": [r["label"] for r in rows], "_truncated": over}

    def seq2seq(self, rows, indices):
        sources = [self.spec.source_text(r) for r in rows]
        enc = self.tokenizer(sources)
        over = self._check([len(x) for x in enc["input_ids"]], indices)
        if any(over):
            enc = self.tokenizer(sources, truncation=True, max_length=self.max_length)
        targets = self.tokenizer(text_target=[self.spec.render_label(r["label"]) for r in rows])["input_ids"]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": targets,
                "reference": [r["label"] for r in rows], "_truncated": over}

    def causal(self, rows, indices):
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError("causal task type needs a tokenizer with an eos token (it ends every target)")
        sources = tok([self.spec.causal_text(r) for r in rows])["input_ids"]
        words = [" " + self.spec.render_label(r["label"]) for r in rows]
        targets = [ids + [tok.eos_token_id] for ids in tok(words, add_special_tokens=False)["input_ids"]]
        over = self._check([len(s) + len(t) for s, t in zip(sources, targets)], indices)
        out = {"input_ids": [], "attention_mask": [], "labels": [], "source_input_ids": []}
        for src, tgt, cut, i in zip(sources, targets, over, indices):
            if cut:
                src = self._cut_left(src, self.max_length - len(tgt), i, len(src) + len(tgt))
            out["input_ids"].append(src + tgt)
            out["attention_mask"].append([1] * (len(src) + len(tgt)))
            out["labels"].append([IGNORE_INDEX] * len(src) + tgt)
            out["source_input_ids"].append(src)
        return {**out, "reference": [r["label"] for r in rows], "_truncated": over}

    def _cut_left(self, src: list[int], budget: int, index: int, length: int) -> list[int]:
        """Keep the last `budget` source tokens (a leading BOS stays first)."""
        bos = self.tokenizer.bos_token_id
        head = src[:1] if bos is not None and src and src[0] == bos else []
        if budget <= len(head):
            raise self._too_long(index, length)  # not even the target fits: truncation can't help
        return head + src[len(src) - (budget - len(head)):]


@dataclass
class Collator:
    """Pads a list of encoded rows into a batch of tensors (dynamic padding).

    classification / seq2seq: right padding. causal: LEFT padding (decoder-only generation continues
    from the last position), for input_ids/attention_mask/labels and, separately, for
    source_input_ids (+ a new source_attention_mask). Pads: input ids with the tokenizer's pad id
    (falling back to its eos id, then 0: masked anyway), attention_mask and token_type_ids with 0,
    label sequences with -100. pad_to_multiple_of rounds every padded length up.

    Per-row scalars (classification `labels`, `reference`, `question_id`) become tensors: float32
    if any value is a float (regression), else int64. Other values (strings) pass through as lists.
    Pop everything not in MODEL_INPUT_KEYS before calling the model.
    """

    tokenizer: Any
    task_type: str
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        tok = self.tokenizer
        self.pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    def _pad(self, seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = [[value] * (length - len(s)) + list(s) if left else list(s) + [value] * (length - len(s)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long)

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty list of rows")
        left = self.task_type == "causal"
        seq_pads = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0, "source_input_ids": self.pad_id}
        if self.task_type != "classification":
            seq_pads["labels"] = IGNORE_INDEX
        batch = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key in seq_pads:
                batch[key] = self._pad(values, seq_pads[key], left)
                if key == "source_input_ids":
                    batch["source_attention_mask"] = self._pad([[1] * len(v) for v in values], 0, left)
            elif all(isinstance(v, (bool, int, float)) for v in values):
                is_float = any(isinstance(v, float) for v in values)
                batch[key] = torch.tensor(values, dtype=torch.float32 if is_float else torch.long)
            else:
                batch[key] = values
        return batch


# ---------------------------------------------------------------------------- rows of a request or a file
def encode_input_rows(raw: list[dict], spec: TaskSpec, tokenizer, task_type: str, max_length: int, *,
                      truncation: bool, split: str = "input") -> tuple[list[dict], int]:
    """Unlabelled rows (the task's text fields, checked) as the model's encoded rows: (rows, number truncated).
    Shared by `eptkit.runs.predict_file` and the server (`eptkit.adapter_pool`), so both tokenize a row alike."""
    cols = [{f: r[f] for f in spec.text_fields} for r in raw]
    for i, (row, r) in enumerate(zip(cols, raw)):
        row["label"] = 0.0 if spec.is_regression else 0  # the encoder wants a label; predictions ignore it
        row["idx"] = i
        if spec.group_field:
            row[spec.group_field] = str(r.get(spec.group_field, f"row-{i}"))
    return encode_rows(cols, spec, tokenizer, task_type, max_length, truncation=truncation, split=split)


def prediction_label(spec: TaskSpec, prediction):
    """A prediction as `eptkit predict` writes it: the class name, the score (regression), or None."""
    return prediction if spec.is_regression or prediction is None else spec.label_names[prediction]

"""Several training runs in one process over one frozen backbone (docs/method.md, "Several runs in one process").

Each run is a named adapter of one `PromptedModel`. Every step takes each run's next micro-batch
(its own data order) and passes the rows of all runs as mixed batches (`model(..., adapter_names=...)`):
one pass on an accelerator, passes of rows of similar length on a CPU (`length_waste`). Each run's loss
is the mean over its own rows however the passes split them; the sum is back-propagated, and since a
run's adapter only sees its own rows, its gradient is the one it would get alone. Each run then steps its
own optimizer and schedule, and logs, evaluates, keeps its best adapter, checkpoints, resumes and
writes its output directory exactly as `eptkit.train` does for one run (one `Trainer` per run, whose
model is the shared model with that run's adapter active).

    from eptkit.multirun import RunSpec, train_runs
    results = train_runs(model, tokenizer, [RunSpec("seed-0", "cb", data, TrainConfig(seed=0, ...)), ...])

Equal to separate runs when the backbone draws no random numbers (no dropout): the adapters'
initial values must be those of the separate runs (`eptkit.sweep` builds them so), and the data
order of each run is a function of its seed alone. One process only (no DDP); runs may differ in
method, hyper-parameters, learning rates, task and number of steps, but share the backbone (and,
for classifiers, the number of labels), gradient_accumulation_steps, mixed_precision and
gradient_checkpointing (a switch of the one backbone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batching import length_groups
from .config import TrainConfig
from .heads import classification_loss
from .tasks.formatting import IGNORE_INDEX, MODEL_INPUT_KEYS
from .train import InterruptFlag, Trainer

__all__ = ["RunSpec", "MultiTrainer", "train_runs", "rows_loss_sum", "loss_items"]


@dataclass
class RunSpec:
    """One run: the adapter it trains (a name in `model.adapters`), its task, raw data and config."""

    name: str
    task: Any
    data: Any
    config: TrainConfig
    run_info: dict | None = field(default=None)


class _RunTrainer(Trainer):
    """A `Trainer` whose model is the shared model with this run's adapter active."""

    def __init__(self, model, tokenizer, run: RunSpec, accelerator):
        self.adapter_name = run.name
        model.set_adapter(run.name)
        super().__init__(model, tokenizer, run.task, run.data, run.config, run_info=run.run_info,
                         accelerator=accelerator)
        self.report.prefix = f"[{run.name}] "  # the runs' lines interleave

    @property
    def unwrapped(self):
        model = self.accelerator.unwrap_model(self.model)
        model.set_adapter(self.adapter_name)
        return model

    def own_modules(self, model) -> nn.Module:
        """This run's adapter and head: the regression bias looked for (and the loss scale) is its head's."""
        own = nn.ModuleDict({"adapter": model.adapters[self.adapter_name]})
        if self.adapter_name in model.heads:
            own["head"] = model.heads[self.adapter_name]
        return own

    def trainable_parameters(self):
        return self.own_modules(self.unwrapped).parameters()


def rows_loss_sum(task_type: str, config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed loss of these rows, from their logits in a (wider) mixed batch: divided by `loss_items` of
    a run's rows, it is the mean loss the model computes for that run's batch alone."""
    if task_type == "classification":
        return classification_loss(config, logits, labels) * labels.numel()
    if task_type == "causal":  # labels of [padding ; prompt ; text] are -100 up to the text; predict the next token
        labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def loss_items(task_type: str, row: dict) -> int:
    """How many terms an encoded row adds to its batch's mean loss: one per label value (classification),
    one per target token (text-to-text; a causal row's first token is never a target: a source or prompt
    token always precedes the answer)."""
    labels = row["labels"]
    if task_type == "classification":
        return len(labels) if isinstance(labels, (list, tuple)) else 1
    return sum(1 for v in labels if v != IGNORE_INDEX)


class MultiTrainer:
    """Several runs over one PromptedModel in one process; `run()` returns each run's results."""

    def __init__(self, model, tokenizer, runs: list[RunSpec], *, accelerator=None,
                 length_waste: float | str | None = "auto"):
        from accelerate import Accelerator

        if not runs:
            raise ValueError("runs: nothing to train")
        names = [r.name for r in runs]
        if len(set(names)) != len(names) or not hasattr(model, "adapters"):
            raise ValueError("runs: each run trains its own adapter of one PromptedModel (unique names)")
        missing = [n for n in names if n not in model.adapters]
        if missing:
            raise ValueError(f"runs: the model has no adapter named {missing[0]!r}; have {sorted(model.adapters)}")
        dirs = [str(r.config.output_dir) for r in runs]
        if len(set(dirs)) != len(dirs):
            raise ValueError("runs: each run needs its own output_dir")
        for key in ("gradient_accumulation_steps", "mixed_precision", "gradient_checkpointing"):
            if len({getattr(r.config, key) for r in runs}) > 1:
                raise ValueError(f"{key}: runs trained in one process must share it")
        if runs[0].config.mixed_precision == "fp16":
            raise ValueError("mixed_precision: 'fp16' needs one gradient scaler per run; use 'bf16' or 'no' "
                             "for several runs in one process")
        if any(r.config.fsdp for r in runs):
            raise ValueError("fsdp: several runs in one process share one unsharded backbone; train a sharded "
                             "run on its own (eptkit.train)")
        accelerator = accelerator or Accelerator(mixed_precision=runs[0].config.mixed_precision)
        if accelerator.num_processes > 1:
            raise ValueError("several runs in one process train in one process only (no accelerate launch)")
        self.accelerator = accelerator
        self.trainers = [_RunTrainer(model, tokenizer, run, accelerator) for run in runs]
        self.model = self.trainers[-1].model
        self.task_type = model.task_type
        self.collate = self.trainers[0].collate
        # On a CPU a pass costs what its padded tokens do: rows of similar text length share a pass (at most
        # 30% padding over their text; benchmarks/multirun.py and serve_load.py measured it against one pass
        # and against counting the prompt too, which merges more rows and pads more). On an accelerator one
        # pass is cheapest.
        if length_waste == "auto":
            length_waste = 0.3 if accelerator.device.type == "cpu" else None
        self.length_waste = length_waste

    def _groups(self, rows: list[dict]) -> list[list[int]]:
        if self.length_waste is None:
            return [list(range(len(rows)))]
        cost = [len(r["input_ids"]) + (len(r["labels"]) if self.task_type == "seq2seq" else 0) for r in rows]
        return length_groups(cost, self.length_waste)

    def _forward_backward(self, trainers, micro_batches: list[list[dict]], scale: float) -> list[float]:
        """One micro-batch of every run: forward and backward in passes of rows of similar length (each run's
        loss is its own rows' mean however they are split); returns each run's loss."""
        acc = self.accelerator
        owner = [k for k, rows in enumerate(micro_batches) for _ in rows]
        rows = [row for rows in micro_batches for row in rows]
        items = [0] * len(trainers)
        for k, row in zip(owner, rows):
            items[k] += loss_items(self.task_type, row)
        config = acc.unwrap_model(self.model).backbone.config
        losses = [0.0] * len(trainers)
        for group in self._groups(rows):
            batch = self.collate([rows[i] for i in group])
            inputs = {k: batch[k].to(acc.device) for k in MODEL_INPUT_KEYS if k in batch}
            owners = torch.tensor([owner[i] for i in group])
            total = 0.0
            with acc.autocast():
                logits = self.model(**inputs, adapter_names=[trainers[owner[i]].adapter_name for i in group]).logits
                for k in owners.unique().tolist():
                    mine = (owners == k).nonzero().squeeze(1).to(acc.device)
                    loss = rows_loss_sum(self.task_type, config, logits[mine], inputs["labels"][mine])
                    loss = loss / max(items[k], 1)  # this run's mean over its whole micro-batch
                    losses[k] += float(loss.detach())
                    total = total + loss * trainers[k].loss_scale
            acc.backward(total * scale)
        return losses

    def run(self) -> list[dict]:
        for t in self.trainers:
            t.begin()
        stopped = {t: False for t in self.trainers}
        active = [t for t in self.trainers if not t.done]
        n_micro = self.trainers[0].config.gradient_accumulation_steps
        self.model.train()
        try:
            with InterruptFlag() as stop:
                while active:
                    if stop.requested:
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    losses, tokens = {t: [] for t in active}, {t: 0 for t in active}
                    for _ in range(n_micro):
                        batches = [t.next_rows() for t in active]
                        for t, rows, loss in zip(active, batches, self._forward_backward(active, batches, 1.0 / n_micro)):
                            losses[t].append(loss)
                            tokens[t] += sum(len(r["input_ids"]) for r in rows)
                    updates = {t: t.update() for t in active}
                    step_time = time.perf_counter() - t0  # the joint step: every run records it as its own
                    for t in active:
                        stopped[t] = t.end_step(step_time, losses[t], tokens[t], *updates[t])
                    active = [t for t in active if not stopped[t] and not t.done]
        except KeyboardInterrupt:
            for t in active:
                t.interrupted()
            raise
        return [t.finish(stopped[t]) for t in self.trainers]


def train_runs(model, tokenizer, runs: list[RunSpec], *, accelerator=None,
               length_waste: float | str | None = "auto") -> list[dict]:
    """Train every run (an adapter of `model`) in one process; returns each run's results.json dict.
    `length_waste`: rows of similar text length share a pass, with at most this share of padding (None: one
    pass for all rows; "auto": 0.3 on a CPU, one pass on an accelerator)."""
    return MultiTrainer(model, tokenizer, runs, accelerator=accelerator, length_waste=length_waste).run()

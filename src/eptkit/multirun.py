"""Several training runs in one process over one frozen backbone (docs/method.md, "Several runs in one process").

Each run is a named adapter of one `PromptedModel`. Every step takes each run's next micro-batch
(its own data order), joins them into one mixed batch (`model(..., adapter_names=...)`), and
computes each run's loss on its own rows; the sum is back-propagated once, and since a run's
adapter only sees its own rows, its gradient is the one it would get alone. Each run then steps its
own optimizer and schedule, and logs, evaluates, keeps its best adapter, checkpoints, resumes and
writes its output directory exactly as `eptkit.train` does for one run (one `Trainer` per run, whose
model is the shared model with that run's adapter active).

    from eptkit.multirun import RunSpec, train_runs
    results = train_runs(model, tokenizer, [RunSpec("seed-0", "cb", data, TrainConfig(seed=0, ...)), ...])

Equal to separate runs when the backbone draws no random numbers (no dropout): the adapters'
initial values must be those of the separate runs (`eptkit.sweep` builds them so), and the data
order of each run is a function of its seed alone. One process only (no DDP); runs may differ in
method, hyper-parameters, learning rates, task and number of steps, but share the backbone (and,
for classifiers, the number of labels), gradient_accumulation_steps and mixed_precision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import rng_state
from .config import TrainConfig
from .heads import classification_loss
from .runs import prepare_output_dir
from .tasks.formatting import IGNORE_INDEX, MODEL_INPUT_KEYS
from .train import Trainer, _StopFlag

__all__ = ["RunSpec", "MultiTrainer", "train_runs", "merge_batches", "rows_loss"]


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

    @property
    def unwrapped(self):
        model = self.accelerator.unwrap_model(self.model)
        model.set_adapter(self.adapter_name)
        return model

    def _own_modules(self, model) -> nn.Module:
        own = nn.ModuleDict({"adapter": model.adapters[self.adapter_name]})
        if self.adapter_name in model.heads:
            own["head"] = model.heads[self.adapter_name]
        return own

    def _trainable_parameters(self):
        return self._own_modules(self.unwrapped).parameters()

    def _own(self, model) -> nn.Module:
        # The regression bias looked for (and the loss scale) is this run's head's only.
        return self._own_modules(model)

    def begin(self) -> None:
        """What `Trainer.run` does before its first step: output directory, resume, Ctrl-C bookkeeping."""
        resume_from = prepare_output_dir(self.output_dir, self.config, self.run_info, self.accelerator)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.report.print(f"{self.adapter_name}: resumed from {resume_from} (step {self.state.step})")
        self._rng_after_step, self._position_after_step = rng_state(), (self.state.epoch, self.state.batch)
        self._updating = False

    def next_batch(self) -> dict:
        s = self.state
        indices = self.plan.rows(s.epoch, s.batch)
        s.epoch, s.batch = self.plan.advance(s.epoch, s.batch)
        return self.collate([self.encoded["train"][i] for i in indices])


def merge_batches(batches: list[dict], task_type: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Collated batches of several runs as one batch: sequences padded to the widest (on the left for
    causal models, as the collator pads), rows in the order given."""
    left = task_type == "causal"
    pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
    merged = {}
    for key in MODEL_INPUT_KEYS:
        if key not in batches[0]:
            continue
        tensors = [b[key] for b in batches]
        if tensors[0].dim() == 2:
            width = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=pads[key])
                       for t in tensors]
        merged[key] = torch.cat(tensors)
    return merged


def rows_loss(task_type: str, config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the model computes for these rows alone, from their logits in a (wider) mixed batch."""
    if task_type == "classification":
        return classification_loss(config, logits, labels)
    if task_type == "causal":  # labels of [padding ; prompt ; text] are -100 up to the text; predict the next token
        labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class MultiTrainer:
    """Several runs over one PromptedModel in one process; `run()` returns each run's results."""

    def __init__(self, model, tokenizer, runs: list[RunSpec], *, accelerator=None):
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
        for key in ("gradient_accumulation_steps", "mixed_precision"):
            if len({getattr(r.config, key) for r in runs}) > 1:
                raise ValueError(f"{key}: runs trained in one process must share it")
        if runs[0].config.mixed_precision == "fp16":
            raise ValueError("mixed_precision: 'fp16' needs one gradient scaler per run; use 'bf16' or 'no' "
                             "for several runs in one process")
        accelerator = accelerator or Accelerator(mixed_precision=runs[0].config.mixed_precision)
        if accelerator.num_processes > 1:
            raise ValueError("several runs in one process train in one process only (no accelerate launch)")
        self.accelerator = accelerator
        self.trainers = [_RunTrainer(model, tokenizer, run, accelerator) for run in runs]
        self.model = self.trainers[-1].model
        self.task_type = model.task_type
        self.pad_id = self.trainers[0].collate.pad_id

    def _forward_backward(self, trainers, batches, scale: float) -> list[float]:
        acc = self.accelerator
        joint = merge_batches(batches, self.task_type, self.pad_id)
        inputs = {k: v.to(acc.device) for k, v in joint.items()}
        names = [t.adapter_name for t, b in zip(trainers, batches) for _ in range(len(b["input_ids"]))]
        config = acc.unwrap_model(self.model).backbone.config
        losses, start = [], 0
        with acc.autocast():
            logits = self.model(**inputs, adapter_names=names).logits
            for t, b in zip(trainers, batches):
                rows = slice(start, start + len(b["input_ids"]))
                start = rows.stop
                losses.append(rows_loss(self.task_type, config, logits[rows], inputs["labels"][rows]) * t.loss_scale)
        acc.backward(torch.stack(losses).sum() * scale)
        return [float(loss.detach()) for loss in losses]

    def run(self) -> list[dict]:
        for t in self.trainers:
            t.begin()
        stopped = {t: False for t in self.trainers}
        active = [t for t in self.trainers if t.state.step < t.config.max_steps]
        n_micro = self.trainers[0].config.gradient_accumulation_steps
        self.model.train()
        try:
            with _StopFlag() as stop:
                while active:
                    if stop.requested:
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    losses, tokens = {t: [] for t in active}, {t: 0 for t in active}
                    for _ in range(n_micro):
                        batches = [t.next_batch() for t in active]
                        for t, b, loss in zip(active, batches, self._forward_backward(active, batches, 1.0 / n_micro)):
                            losses[t].append(loss)
                            tokens[t] += int(b["attention_mask"].sum())
                    updates = {t: t._optimizer_step() for t in active}
                    step_time = time.perf_counter() - t0  # the joint step: every run records it as its own
                    for t in active:
                        grad_norm, lrs = updates[t]
                        stopped[t] = t._after_step(time.perf_counter() - step_time, losses[t], tokens[t], grad_norm, lrs)
                    active = [t for t in active if not stopped[t] and t.state.step < t.config.max_steps]
        except KeyboardInterrupt:
            for t in active:
                t._on_interrupt()
            raise
        return [t._finish(stopped[t]) for t in self.trainers]


def train_runs(model, tokenizer, runs: list[RunSpec], *, accelerator=None) -> list[dict]:
    """Train every run (an adapter of `model`) in one process; returns each run's results.json dict."""
    return MultiTrainer(model, tokenizer, runs, accelerator=accelerator).run()

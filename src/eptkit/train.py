"""The training loop (SPEC 5): one loop for PT, DePT, EPT and the comparison methods.

Built on accelerate, so the same code runs on one CPU, one GPU or many processes under
`accelerate launch` (DDP; FSDP and DeepSpeed through accelerate's own config files, see
recipes/README.md). Any model with the small interface of `PromptedModel` trains here:
`task_type`, `max_length`, `param_groups()`, `num_parameters()`, `adapter_state_dict()`,
`load_adapter_state_dict()`, `save_pretrained()` and, for text-to-text models, `generate()`
(`eptkit.baselines` wraps LoRA, full fine-tuning and a linear probe that way).

    from eptkit.train import TrainConfig, train
    from eptkit.tasks.loading import load_task
    results = train(prompted, tokenizer, "cb", load_task("cb", "../shared/data"),
                    TrainConfig(output_dir="runs/cb", max_steps=200))

What the loop does, in order:
- data: tokenizes every split once (`eptkit.tasks.formatting.encode`, truncated to the text length
  the model accepts). The training order is a deterministic function of (seed, epoch): epoch e is
  `randperm(n)` from a generator seeded with seed and e, cut into global batches of
  batch_size x num_processes (the last one wraps around), and process r takes the r-th slice.
  A data position is therefore just (epoch, batch index), which is what makes resume exact.
- optimisation: AdamW with one parameter group per `param_groups()` entry, each at its own learning
  rate (TrainConfig.lr, lr_low_rank, lr_ept, lr_head, lr_full, lr_lora), linear warm-up and decay,
  gradient clipping, gradient accumulation, mixed precision (accelerate's autocast).
- evaluation every `eval_steps` and at the last step on the validation split with the task's
  main metric: argmax of the classifier's logits (the value itself for regression), or greedy
  generation of a few tokens mapped back to a label word (an invalid word counts as wrong).
  Each process scores a shard; the predictions are gathered. The best adapter is kept (written to
  output_dir when it improves); optional early stopping after `early_stopping_patience` evaluations
  without improvement. At the end the best adapter is evaluated on the test split.
- files (main process only): output_dir/ gets the best adapter (adapter_config.json +
  adapter_model.safetensors for prompt methods), `eptkit_run.json` (what evaluate/predict need to
  rebuild the model), `log.jsonl` (one line per optimizer step; evaluations included),
  `results.json` and `checkpoints/step-NNNNNN/` (written to a temporary directory and renamed, so a
  checkpoint exists completely or not at all): trainable tensors (safetensors), the best tensors so
  far, optimizer and scheduler state (torch.save, loaded back with weights_only=True), RNG states of
  every process, data position, best metric and early-stopping counter.
- resume (`resume=True`): continues from the newest checkpoint; the result equals an uninterrupted
  run with the same seed. Ctrl-C (SIGINT) stops at the end of the current step, writes a checkpoint
  and raises KeyboardInterrupt; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import __version__
from .adapters import atomic_write_json

logger = logging.getLogger("eptkit")

RUN_INFO_NAME = "eptkit_run.json"
LOG_NAME = "log.jsonl"
RESULTS_NAME = "results.json"
CHECKPOINTS_DIR = "checkpoints"

# param_groups() name -> TrainConfig field holding its learning rate.
LR_FIELDS = {
    "prompt": "lr",
    "low_rank": "lr_low_rank",
    "ept": "lr_ept",
    "head": "lr_head",
    "full": "lr_full",
    "lora": "lr_lora",
}
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_UNITS = ("embedding_rms", "absolute")
OPTIMIZERS = ("adamw", "adafactor")
REGRESSION_TARGETS = ("standardize", "raw")
# Groups whose parameters live in the word-embedding space: lr_unit='embedding_rms' scales their rates.
EMBEDDING_SPACE_GROUPS = ("prompt", "low_rank")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Hyper-parameters of the training loop (the method's own live in its PromptTuningConfig)."""

    output_dir: str = _help("Directory for the best adapter, results.json, log.jsonl and checkpoints/.",
                            default="runs/eptkit")
    lr: float = _help("Learning rate of the prompt (PT prompt, DePT/EPT short prompt), in lr_unit.", default=2e-2)
    lr_low_rank: float = _help("Learning rate of DePT/EPT's low-rank offset A, B, in lr_unit.", default=2e-3)
    lr_unit: str = _help(
        "Unit of lr and lr_low_rank with AdamW: 'embedding_rms' multiplies them by the RMS of the backbone's "
        "word embeddings (0.056 for all-MiniLM-L6-v2), so a prompt moves by the same fraction of a word vector "
        "per step on any backbone; 'absolute' takes them as given (the literature's T5 rates, e.g. 0.3). "
        "Adafactor's rates are always relative to each parameter's own RMS.",
        default="embedding_rms")
    optimizer: str = _help(
        "'adamw', or 'adafactor' (transformers' Adafactor with parameter scaling and no relative step: each "
        "group's rate is then relative to the RMS of the parameter it updates).", default="adamw")
    lr_ept: float | None = _help("Learning rate of EPT's fusion/projection/gate weights (default: lr_low_rank).",
                                 default=None)
    lr_head: float = _help("Learning rate of the classification head (classifiers only).", default=1e-2)
    lr_full: float = _help("Learning rate of every weight in full fine-tuning (method 'full').", default=2e-5)
    lr_lora: float = _help("Learning rate of the LoRA matrices (method 'lora').", default=5e-4)
    weight_decay: float = _help("AdamW weight decay (all groups).", default=1e-5)
    warmup_ratio: float = _help("Linear warm-up over this fraction of max_steps (ignored if warmup_steps > 0).",
                                default=0.06)
    warmup_steps: int = _help("Linear warm-up steps (overrides warmup_ratio when > 0).", default=0)
    max_grad_norm: float = _help("Clip the gradient norm to this value (0: no clipping).", default=1.0)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    batch_size: int = _help("Training examples per micro-batch per process.", default=16)
    eval_batch_size: int = _help("Examples per evaluation batch per process.", default=64)
    max_steps: int = _help("Optimizer steps to train.", default=1000)
    eval_steps: int = _help("Evaluate on the validation split every this many steps (0: only at the end).",
                            default=100)
    save_steps: int = _help("Write a checkpoint every this many steps (0: only at the end and on Ctrl-C).",
                            default=100)
    save_total_limit: int = _help("Checkpoints to keep (the newest ones).", default=2)
    logging_steps: int = _help("Print a progress line every this many steps when not on a terminal "
                               "(0: about 20 lines per run). log.jsonl always gets every step.", default=0)
    early_stopping_patience: int = _help("Stop after this many evaluations without improvement (0: never).",
                                         default=0)
    seed: int = _help("Seed of initialisation, data order and dropout.", default=42)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (accelerate's autocast; fp16 is meant for GPUs).",
                                 default="no")
    max_length: int = _help("Maximum text length in tokens for methods without their own (PT, baselines); "
                            "DePT/EPT use their config's max_length.", default=256)
    max_new_tokens: int | None = _help("Tokens to generate at evaluation for text-to-text models "
                                       "(default: the longest label word plus 2).", default=None)
    max_train_samples: int | None = _help("Train on a seeded random subset of this many examples.", default=None)
    max_eval_samples: int | None = _help("Evaluate on a seeded random subset of this many validation/test "
                                         "examples (whole MultiRC questions are not kept together).", default=None)
    regression_targets: str = _help(
        "Regression tasks: 'standardize' starts the head's output at the training labels' mean and measures the "
        "loss in units of their variance (the first steps then learn the variation, not the mean; predictions "
        "stay in label units); 'raw' trains on the labels as they are.", default="standardize")
    resume: bool = _help("Continue from the newest checkpoint in output_dir/checkpoints.", default=False)
    overwrite: bool = _help("Start afresh even if output_dir holds checkpoints of an earlier run.", default=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("lr", "lr_low_rank", "lr_head", "lr_full", "lr_lora"):
            _check_number(self, name, positive=True)
        if self.lr_ept is not None:
            _check_number(self, "lr_ept", positive=True)
        _check_number(self, "weight_decay")
        _check_number(self, "max_grad_norm")
        _check_number(self, "warmup_ratio")
        if self.warmup_ratio > 1:
            raise ValueError(f"warmup_ratio: must be between 0 and 1, got {self.warmup_ratio}")
        for name in ("gradient_accumulation_steps", "batch_size", "eval_batch_size", "max_steps", "max_length",
                     "save_total_limit"):
            _check_int(self, name, minimum=1)
        for name in ("warmup_steps", "eval_steps", "save_steps", "logging_steps", "early_stopping_patience", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("max_new_tokens", "max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        for name, choices in (("lr_unit", LR_UNITS), ("optimizer", OPTIMIZERS),
                              ("regression_targets", REGRESSION_TARGETS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: must be one of {choices}, got {getattr(self, name)!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")

    def group_lr(self, group: str) -> float:
        if group == "ept" and self.lr_ept is None:
            return self.lr_low_rank
        if group not in LR_FIELDS:
            raise ValueError(f"parameter group {group!r} has no learning rate; known groups: {sorted(LR_FIELDS)}")
        return getattr(self, LR_FIELDS[group])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**data)


# Settings that change the trajectory: a resumed run must use the same ones.
_TRAJECTORY_FIELDS = ("lr", "lr_low_rank", "lr_unit", "optimizer", "regression_targets", "lr_ept", "lr_head",
                      "lr_full", "lr_lora", "weight_decay",
                      "warmup_ratio", "warmup_steps", "max_grad_norm", "gradient_accumulation_steps",
                      "batch_size", "seed", "mixed_precision", "max_length", "max_train_samples")


def _check_number(cfg, name, positive=False):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name}: must be a {'positive' if positive else 'non-negative'} number, got {v!r}")


def _check_int(cfg, name, minimum):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: must be a {kind} integer, got {v!r}")


# ============================================================================ data
def text_max_length(model, config: TrainConfig | None = None) -> int:
    """Longest text (in tokens) the model accepts: the method's max_length (DePT/EPT) or the training
    config's, and never more than the backbone's positions minus the prompt (encoders, decoders)."""
    limit = getattr(model, "max_length", None) or (config.max_length if config else 256)
    backbone = getattr(model, "backbone", None) or getattr(model, "inner", None)
    positions = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    if positions and getattr(model, "task_type", None) != "seq2seq":
        prompt = 0
        method_config = getattr(model, "config", None)
        if method_config is not None and hasattr(method_config, "prompt_length"):
            prompt = method_config.prompt_length
        if positions - prompt < 1:
            raise ValueError(f"prompt_length={prompt} leaves no room for text in a backbone with "
                             f"{positions} positions")
        limit = min(limit, positions - prompt)
    return int(limit)


def subsample(ds, n: int | None, seed: int):
    """A seeded random subset of n rows (file order kept); the whole split when n is None or larger."""
    if n is None or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return ds.select(sorted(perm[:n]))


def encode_splits(data, spec, tokenizer, model, config: TrainConfig) -> dict[str, list[dict]]:
    """Tokenize every split for the model's task type; rows as lists of dicts ready for the collator."""
    from .tasks.formatting import encode

    max_len = text_max_length(model, config)
    out = {}
    for split in data:
        ds = data[split]
        if split == "train":
            ds = subsample(ds, config.max_train_samples, config.seed)
        else:
            ds = subsample(ds, config.max_eval_samples, config.seed)
        out[split] = encode(ds, spec, tokenizer, model.task_type, max_len, truncation=True, split=split).to_list()
    return out


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class BatchPlan:
    """The deterministic training order: position (epoch, batch) -> this process's row indices."""

    def __init__(self, n: int, batch_size: int, num_processes: int, rank: int, seed: int):
        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.bs, self.world, self.rank, self.seed = n, batch_size, num_processes, rank, seed
        self.global_bs = batch_size * num_processes
        self.batches_per_epoch = max(1, math.ceil(n / self.global_bs))
        self._cache: tuple[int, list[int]] | None = None

    def rows(self, epoch: int, batch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, _epoch_order(self.n, self.seed, epoch))
        order = self._cache[1]
        start = batch * self.global_bs + self.rank * self.bs
        return [order[(start + i) % self.n] for i in range(self.bs)]

    def advance(self, epoch: int, batch: int) -> tuple[int, int]:
        batch += 1
        return (epoch + 1, 0) if batch >= self.batches_per_epoch else (epoch, batch)


# ============================================================================ evaluation
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
    from .tasks.formatting import Collator

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
    autocast = accelerator.autocast() if accelerator is not None else _nullcontext()
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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def references(spec, rows: list[dict]) -> list:
    key = "labels" if rows and "reference" not in rows[0] else "reference"
    return [r[key] for r in rows]


def score(spec, predictions: list, rows: list[dict]) -> dict[str, float]:
    """The task's metrics (0-100) of predictions against the encoded rows' references."""
    from .metrics import compute_metrics

    groups = [r[spec.group_field] for r in rows] if spec.group_field else None
    return compute_metrics(spec, predictions, references(spec, rows), groups=groups)


def evaluate_rows(model, tokenizer, spec, rows, *, batch_size=64, accelerator=None, max_new_tokens=None):
    preds = predict_rows(model, tokenizer, spec, rows, batch_size=batch_size, accelerator=accelerator,
                         max_new_tokens=max_new_tokens)
    return score(spec, preds, rows)


def main_metric(spec, metrics: dict[str, float]) -> float:
    return metrics[spec.main_metric]


# ============================================================================ optimisation
def embedding_rms(model) -> float:
    """Root mean square of the backbone's input word embeddings: the scale of a word vector."""
    weight = _backbone_of(model).get_input_embeddings().weight.detach()
    return float(weight.float().pow(2).mean().sqrt())


def group_lrs(model, config: TrainConfig) -> dict[str, float]:
    """The absolute learning rate of each of the model's parameter groups.

    With lr_unit='embedding_rms' the prompt and low-rank rates are fractions of a word vector's scale:
    AdamW moves every coordinate by about lr per step whatever the parameter's size, so an absolute rate
    tuned on T5 (embedding RMS in the tens) throws a prompt far off the vocabulary of a backbone whose
    embeddings are 0.05 in size (MiniLM).
    """
    # Adafactor's parameter scaling already makes every rate relative to its parameter's RMS.
    relative = config.lr_unit == "embedding_rms" and config.optimizer == "adamw"
    scale = embedding_rms(model) if relative else 1.0
    return {name: config.group_lr(name) * (scale if name in EMBEDDING_SPACE_GROUPS else 1.0)
            for name in model.param_groups()}


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    groups = []
    lrs = group_lrs(model, config)
    for name, params in model.param_groups().items():
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lrs[name], "name": name, "weight_decay": config.weight_decay})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Parameter scaling without relative steps: each group keeps its own (scheduled) rate, which
        # Adafactor multiplies by the RMS of the parameter it updates (Lester et al.'s setting).
        return Adafactor(groups, scale_parameter=True, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups)


def regression_head_bias(model) -> nn.Parameter | None:
    """The one trainable scalar bias of a regression head (num_labels = 1), or None if there is not exactly one."""
    found = [p for name, p in model.named_parameters()
             if p.requires_grad and name.endswith("bias") and p.numel() == 1]
    return found[0] if len(found) == 1 else None


def make_scheduler(optimizer, config: TrainConfig):
    from transformers import get_linear_schedule_with_warmup

    warmup = config.warmup_steps or int(round(config.warmup_ratio * config.max_steps))
    return get_linear_schedule_with_warmup(optimizer, warmup, config.max_steps)


# ============================================================================ checkpoints
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    s = state["numpy"]
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_dirs(output_dir) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_checkpoint_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "trainable.safetensors"))


# ============================================================================ the loop
class _StopFlag:
    """First SIGINT: stop cleanly at the end of the step. Second: KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step and writing a checkpoint (Ctrl-C again aborts)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _versions() -> dict:
    import accelerate
    import transformers

    versions = {"eptkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "python": sys.version.split()[0]}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _backbone_of(model):
    for name in ("backbone", "inner"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def _method_name(model) -> str:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "method") and isinstance(getattr(config, "method"), str):
        return config.method
    return getattr(model, "method", type(model).__name__)


def _method_config(model) -> dict | None:
    config = getattr(model, "configs", {}).get(getattr(model, "active_adapter", None))
    return config.to_dict() if config is not None else None


class Trainer:
    """One training run. `train()` is the functional entry point; this class holds the state."""

    def __init__(self, model, tokenizer, task, data, config: TrainConfig, *, run_info: dict | None = None,
                 callbacks: list[Callable[[dict], None]] | None = None, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .tasks.registry import get_task

        self.config = config
        self.spec = get_task(task)
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks or [])
        if accelerator is None:
            # Several processes on a machine without a GPU (torchrun / `accelerate launch --multi_gpu`):
            # accelerate only picks its multi-CPU (gloo) mode when told cpu=True.
            cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
            accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.accelerator = accelerator
        acc = self.accelerator
        self.is_main = acc.is_main_process
        if not self.is_main:  # one copy of the data warnings, not one per process
            logger.setLevel(logging.ERROR)
        self.output_dir = Path(config.output_dir)
        self.ckpt_root = self.output_dir / CHECKPOINTS_DIR
        set_seed(config.seed)

        for split in ("train", "validation"):
            if split not in data:
                raise ValueError(f"the data has no {split!r} split (found {list(data)})")
        self.rows = encode_splits(data, self.spec, tokenizer, model, config)
        self.raw_model = model
        self.run_info = {
            "task": self.spec.name,
            "task_spec": dataclasses.asdict(self.spec) if self.spec.benchmark == "custom" else None,
            "method": _method_name(model),
            "task_type": model.task_type,
            "backbone": getattr(_backbone_of(model).config, "_name_or_path", None),
            "max_length": text_max_length(model, config),
            **(run_info or {}),
        }
        self.loss_scale = self._standardize_regression(model)
        self.run_info["lr_absolute"] = {k: float(f"{v:.4g}") for k, v in group_lrs(model, config).items()}
        self.optimizer = make_optimizer(model, config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.plan = BatchPlan(len(self.rows["train"]), config.batch_size, acc.num_processes, acc.process_index,
                              config.seed)
        from .tasks.formatting import MODEL_INPUT_KEYS, Collator

        self.collate = Collator(tokenizer, model.task_type)
        self.input_keys = MODEL_INPUT_KEYS
        # Run state (everything a checkpoint holds besides tensors).
        self.step = 0
        self.epoch, self.batch = 0, 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict | None = None
        self.bad_evals = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.train_time = 0.0
        self.tokens_seen = 0
        self.step_times: list[float] = []
        self.bar = None

    def _standardize_regression(self, model) -> float:
        """Regression with regression_targets='standardize': put the head's bias at the training mean
        and return 1 / variance, the factor that measures the loss in units of the label spread."""
        if (not self.spec.is_regression or model.task_type != "classification"
                or self.config.regression_targets != "standardize"):
            return 1.0
        labels = torch.tensor([float(r["labels"]) for r in self.rows["train"]])
        bias = regression_head_bias(model)
        if bias is None or len(labels) < 2:
            logger.warning("regression_targets='standardize': no single regression-head bias found; training on raw labels")
            return 1.0
        with torch.no_grad():
            bias.fill_(float(labels.mean()))
        return 1.0 / max(float(labels.var()), 1e-12)

    # -------------------------------------------------------------- helpers
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _cpu_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.unwrapped.adapter_state_dict().items()}

    def _lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.output_dir / LOG_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _print(self, text: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, rng_state: dict | None = None) -> Path:
        """checkpoints/step-N/, complete or absent: written under a temporary name, then renamed."""
        acc = self.accelerator
        final = self.ckpt_root / f"step-{self.step:06d}"
        tmp = self.ckpt_root / f".tmp-step-{self.step:06d}"
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        # Every process writes its own RNG state (dropout differs per process).
        _torch_save(rng_state or _rng_state(), tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if self.is_main:
            _save_tensors(self._cpu_state(), tmp / "trainable.safetensors")
            if self.best_state is not None:
                _save_tensors(self.best_state, tmp / "best.safetensors")
            opt = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if getattr(acc, "scaler", None) is not None:
                opt["scaler"] = acc.scaler.state_dict()
            _torch_save(opt, tmp / "optimizer.pt")
            state = {
                "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "best_metric": self.best_metric, "best_step": self.best_step, "best_metrics": self.best_metrics,
                "bad_evals": self.bad_evals, "train_time": self.train_time, "step_times": self.step_times,
                "tokens_seen": self.tokens_seen,
                "num_processes": acc.num_processes, "config": self.config.to_dict(),
                "method_config": _method_config(self.unwrapped), "method": self.run_info["method"],
            }
            atomic_write_json(tmp / "trainer_state.json", state)
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step after a resume: replace it
                trash = self.ckpt_root / f".old-{final.name}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.ckpt_root)
            for old in checkpoint_dirs(self.output_dir)[: -self.config.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        acc = self.accelerator
        state = json.loads((directory / "trainer_state.json").read_text())
        if state.get("num_processes", 1) != acc.num_processes:
            raise ValueError(f"{directory}: checkpoint was written by {state['num_processes']} process(es); "
                             f"resume with the same number (now {acc.num_processes})")
        saved = state.get("config", {})
        changed = [k for k in _TRAJECTORY_FIELDS if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            diffs = ", ".join(f"{k}={saved[k]!r} (now {getattr(self.config, k)!r})" for k in changed)
            raise ValueError(f"{directory}: cannot resume with different settings: {diffs}")
        if state.get("method_config") != _method_config(self.unwrapped) or state.get("method") != self.run_info["method"]:
            raise ValueError(f"{directory}: checkpoint is of method {state.get('method')!r} with "
                             f"{state.get('method_config')}; the model now is {self.run_info['method']!r} with "
                             f"{_method_config(self.unwrapped)}")
        tensors = load_file(str(directory / "trainable.safetensors"))
        self.unwrapped.load_adapter_state_dict(tensors)
        best = directory / "best.safetensors"
        self.best_state = load_file(str(best)) if best.is_file() else None
        opt = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if "scaler" in opt and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(opt["scaler"])
        rng = torch.load(directory / f"rng-{acc.process_index}.pt", map_location="cpu", weights_only=True)
        _set_rng_state(rng)
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.best_metrics, self.bad_evals = state["best_metrics"], state["bad_evals"]
        self.train_time, self.step_times = state["train_time"], list(state["step_times"])
        self.tokens_seen = state.get("tokens_seen", 0)
        if self.is_main:  # drop log lines of steps after the checkpoint (they will be redone)
            log = self.output_dir / LOG_NAME
            if log.is_file():
                kept = [ln for ln in log.read_text().splitlines() if ln.strip() and
                        json.loads(ln).get("step", 0) <= self.step]
                atomic_write_json_lines(log, kept)

    # -------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "validation") -> dict[str, float]:
        return evaluate_rows(self.unwrapped, self.tokenizer, self.spec, self.rows[split],
                             batch_size=self.config.eval_batch_size, accelerator=self.accelerator,
                             max_new_tokens=self.config.max_new_tokens)

    def _maybe_improve(self, metrics: dict) -> bool:
        value = main_metric(self.spec, metrics)
        if self.best_metric is None or value > self.best_metric:
            self.best_metric, self.best_step, self.best_metrics = value, self.step, metrics
            self.best_state = self._cpu_state()
            self.bad_evals = 0
            if self.is_main:
                self.unwrapped.save_pretrained(self.output_dir)
            return True
        self.bad_evals += 1
        return False

    # -------------------------------------------------------------- main
    def _prepare_output(self) -> Path | None:
        cfg = self.config
        resume_from = None
        existing = checkpoint_dirs(self.output_dir)
        if cfg.resume and existing:
            resume_from = existing[-1]
        elif existing and not cfg.overwrite and not cfg.resume:
            raise ValueError(f"{self.output_dir}: holds checkpoints of an earlier run; pass resume=True "
                             "(--resume) to continue it or overwrite=True (--overwrite) to start again")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None:
                if self.ckpt_root.exists():
                    shutil.rmtree(self.ckpt_root)
                for name in (LOG_NAME, RESULTS_NAME):
                    (self.output_dir / name).unlink(missing_ok=True)
            atomic_write_json(self.output_dir / RUN_INFO_NAME, self.run_info)
        self.accelerator.wait_for_everyone()
        return resume_from

    def _forward_backward(self, rows: list[int], scale: float, sync: bool) -> tuple[float, int]:
        batch = self.collate([self.rows["train"][i] for i in rows])
        inputs = {k: v.to(self.accelerator.device) for k, v in batch.items() if k in self.input_keys}
        ctx = _nullcontext() if sync else self.accelerator.no_sync(self.model)
        with ctx:
            with self.accelerator.autocast():
                loss = self.model(**inputs).loss * self.loss_scale
            self.accelerator.backward(loss * scale)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def run(self) -> dict:
        cfg, acc = self.config, self.accelerator
        resume_from = self._prepare_output()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self._print(f"resumed from {resume_from} (step {self.step})")
        has_validation = len(self.rows.get("validation", [])) > 0
        log_every = cfg.logging_steps or max(1, cfg.max_steps // 20)
        use_bar = self.is_main and sys.stderr.isatty()
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        rng_after_step = _rng_state()
        position_after_step = (self.epoch, self.batch)
        updating = False  # True between optimizer.step() and the end of the step's bookkeeping
        stopped_early = False
        self.model.train()
        try:
            with _StopFlag() as stop:
                while self.step < cfg.max_steps:
                    if self._stop_requested(stop):
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    losses, tokens = [], 0
                    for micro in range(cfg.gradient_accumulation_steps):
                        last = micro == cfg.gradient_accumulation_steps - 1
                        loss, n_tok = self._forward_backward(self.plan.rows(self.epoch, self.batch),
                                                             1.0 / cfg.gradient_accumulation_steps, last)
                        losses.append(loss)
                        tokens += n_tok
                        self.epoch, self.batch = self.plan.advance(self.epoch, self.batch)
                    grad_norm = None
                    if cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        grad_norm = float(grad_norm) if grad_norm is not None else None
                    lrs = self._lrs()
                    updating = True
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    updating = False
                    position_after_step = (self.epoch, self.batch)
                    rng_after_step = _rng_state()  # evaluation below draws no random numbers
                    loss = sum(losses) / len(losses)
                    if acc.num_processes > 1:
                        stats = acc.reduce(torch.tensor([loss, float(tokens)], device=acc.device), "sum")
                        loss, tokens = float(stats[0]) / acc.num_processes, int(stats[1])
                    self.tokens_seen += tokens
                    dt = time.perf_counter() - t0
                    self.train_time += dt
                    self.step_times.append(dt)
                    record = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lrs,
                              "grad_norm": grad_norm, "step_time_s": dt, "tokens_per_s": tokens / dt if dt else None,
                              "peak_memory_mb": _peak_memory_mb(acc.device)}
                    if self.bar is not None:
                        self.bar.update(1)
                        self.bar.set_postfix(loss=f"{loss:.4f}")
                    elif self.step % log_every == 0 or self.step == cfg.max_steps:
                        self._print(f"step {self.step}/{cfg.max_steps}  loss {loss:.4f}  "
                                    f"lr {' '.join(f'{k}={v:.2e}' for k, v in lrs.items())}  {dt:.3f} s/step")
                    evaluate_now = has_validation and (
                        self.step == cfg.max_steps or (cfg.eval_steps and self.step % cfg.eval_steps == 0))
                    if evaluate_now:
                        metrics = self.evaluate("validation")
                        improved = self._maybe_improve(metrics)
                        record["eval"] = {"validation": metrics, "improved": improved}
                        self.model.train()
                        self._print(f"eval step {self.step}: {self.spec.main_metric} "
                                    f"{main_metric(self.spec, metrics):.2f} (best {self.best_metric:.2f} at step "
                                    f"{self.best_step})")
                        if cfg.early_stopping_patience and self.bad_evals >= cfg.early_stopping_patience:
                            stopped_early = True
                    self._log(record)
                    if stopped_early or self.step == cfg.max_steps or (
                            cfg.save_steps and self.step % cfg.save_steps == 0):
                        self.save_checkpoint(rng_after_step)
                    for callback in self.callbacks:
                        callback({"step": self.step, "loss": loss, "record": record, "trainer": self})
                    if stopped_early:
                        self._print(f"early stopping at step {self.step}: no improvement in "
                                    f"{cfg.early_stopping_patience} evaluations")
                        break
        except KeyboardInterrupt:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if updating:  # a hard interrupt inside the weight update: the weights may be half-updated
                self._print(f"interrupted during the update of step {self.step + 1}; no checkpoint written, "
                            "--resume continues from the last periodic one")
                raise
            # A hard interrupt between micro-batches: forget their data position and gradients.
            self.epoch, self.batch = position_after_step
            self.optimizer.zero_grad(set_to_none=True)
            path = self.save_checkpoint(rng_after_step)
            self._print(f"interrupted at step {self.step}; checkpoint written to {path}; "
                        "continue with --resume (resume=True)")
            raise
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return self._finish(stopped_early)

    def _stop_requested(self, stop: _StopFlag) -> bool:
        flag = stop.requested
        if self.accelerator.num_processes > 1:  # every process must stop at the same step
            t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
            flag = bool(self.accelerator.reduce(t, "sum").item() > 0)
        return flag

    def _finish(self, stopped_early: bool) -> dict:
        acc = self.accelerator
        model = self.unwrapped
        if self.best_state is not None:
            model.load_adapter_state_dict({k: v.to(acc.device) for k, v in self.best_state.items()})
        if self.is_main:
            model.save_pretrained(self.output_dir)
        acc.wait_for_everyone()
        test_metrics = None
        if len(self.rows.get("test", [])) > 0:
            test_metrics = self.evaluate("test")
            self._print(f"test ({self.spec.name}, best step {self.best_step}): "
                        + ", ".join(f"{k} {v:.2f}" for k, v in test_metrics.items()))
        n_steps = len(self.step_times)
        results = {
            "task": self.spec.name,
            "method": self.run_info["method"],
            "task_type": model.task_type,
            "steps": self.step,
            "stopped_early": stopped_early,
            "best_step": self.best_step,
            "validation": self.best_metrics,
            "test": test_metrics,
            "main_metric": self.spec.main_metric,
            "trainable_params": int(model.num_parameters(trainable_only=True)),
            "total_params": int(model.num_parameters(trainable_only=False)),
            "train_time_s": self.train_time,
            "mean_step_time_s": (sum(self.step_times) / n_steps) if n_steps else None,
            "tokens_per_s": self.tokens_seen / self.train_time if self.train_time else None,
            "peak_memory_mb": _peak_memory_mb(acc.device),
            "num_processes": acc.num_processes,
            "device": str(acc.device),
            "num_examples": {k: len(v) for k, v in self.rows.items()},
            "config": {"train": self.config.to_dict(), "method": _method_config(model), "run": self.run_info},
            "versions": _versions(),
        }
        results["trainable_percent"] = 100.0 * results["trainable_params"] / max(1, results["total_params"])
        if self.is_main:
            atomic_write_json(self.output_dir / RESULTS_NAME, results)
        acc.wait_for_everyone()
        return results


def atomic_write_json_lines(path: Path, lines: list[str]) -> None:
    from .adapters import atomic_write_bytes

    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


def train(model, tokenizer, task, data, config: TrainConfig | None = None, *, run_info: dict | None = None,
          callbacks: list[Callable[[dict], None]] | None = None, accelerator=None) -> dict:
    """Train `model` (a PromptedModel or an `eptkit.baselines` wrapper) on `task` and return the results.

    task: a task name ('cb') or a TaskSpec (e.g. from `load_files`).
    data: a DatasetDict (or dict of Datasets) with raw `train`, `validation` and optionally `test`
        splits, as `eptkit.tasks.loading.load_task` / `load_files` return them.
    run_info: extra facts recorded in output_dir/eptkit_run.json (the CLI records the backbone path).
    callbacks: functions called after every optimizer step with {"step", "loss", "record", "trainer"}.
    Returns the dict also written to output_dir/results.json.
    """
    config = config or TrainConfig()
    return Trainer(model, tokenizer, task, data, config, run_info=run_info, callbacks=callbacks,
                   accelerator=accelerator).run()

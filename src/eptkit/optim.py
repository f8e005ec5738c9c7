"""Optimisation: one parameter group per `param_groups()` entry, each at its own learning rate.

AdamW (or Adafactor) with linear warm-up and decay. The rates of the groups that live in the
word-embedding space (the prompt and DePT/EPT's offset) are by default fractions of the embedding
scale (`TrainConfig.lr_unit`), so one recipe transfers between backbones.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import TrainConfig
from .embeddings import read_embeddings

logger = logging.getLogger("eptkit")

# Groups whose parameters live in the word-embedding space: lr_unit='embedding_rms' scales their rates.
EMBEDDING_SPACE_GROUPS = ("prompt", "low_rank")


def embedding_rms(model) -> float:
    """Root mean square of the backbone's input word embeddings: the scale of a word vector (the whole
    matrix's, also when it is sharded: `eptkit.embeddings`)."""
    return read_embeddings(model.backbone.get_input_embeddings()).rms


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


def make_optimizer(model, config: TrainConfig, lrs: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """One group per `param_groups()` entry at its absolute rate (`lrs`, computed by `group_lrs` if not given)."""
    groups = []
    lrs = lrs if lrs is not None else group_lrs(model, config)
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


def standardize_regression(model, labels: list[float]) -> float:
    """Start a regression head at the mean of the training labels and return 1 / their variance, the
    factor that measures the loss in units of the label spread (the first steps then learn the
    variation, not the mean). Without a single regression-head bias: 1, raw labels."""
    labels = torch.tensor(labels)
    bias = regression_head_bias(model)
    if bias is None or len(labels) < 2:
        logger.warning("regression_targets='standardize': no single regression-head bias found; training on raw labels")
        return 1.0
    with torch.no_grad():
        bias.fill_(float(labels.mean()))
    return 1.0 / max(float(labels.var()), 1e-12)


def make_scheduler(optimizer, config: TrainConfig):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = config.warmup_steps or int(round(config.warmup_ratio * config.max_steps))
    if config.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_linear_schedule_with_warmup(optimizer, warmup, config.max_steps)

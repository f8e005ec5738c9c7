"""Training data: tokenize every split once, then a deterministic order of batches.

The order is a function of (seed, epoch) alone: epoch e is `randperm(n)` from a generator seeded with
seed and e, cut into global batches of batch_size x num_processes (the last one wraps around), and
process r takes the r-th slice of each. A data position is therefore just (epoch, batch index),
which is what makes a resumed run continue exactly where the interrupted one stopped.
"""

from __future__ import annotations

import logging
import math

import torch

from .backbones import usable_positions
from .config import TrainConfig
from .tasks.formatting import encode

logger = logging.getLogger("eptkit")


def text_max_length(model, config: TrainConfig | None = None) -> int:
    """Longest text (in tokens) the model accepts: the method's max_length (DePT/EPT) or the training
    config's, and never more than the backbone's positions minus those the method puts before the text
    (`prompt_positions`: the prompt, PEFT's virtual tokens; encoders and decoders)."""
    limit = model.max_length or (config.max_length if config else 256)
    positions = usable_positions(model.backbone)
    if positions and model.task_type != "seq2seq":
        prompt = model.prompt_positions
        if positions - prompt < 1:
            raise ValueError(f"prompt_length={prompt} leaves no room for text in a backbone with "
                             f"{positions} positions")
        if config is not None and prompt + limit > positions:
            # Never silently: the CLI refuses an explicit --max-length that does not fit (check_prompt_fits).
            logger.warning("max_length: prompt_length + max_length = %d + %d = %d exceeds the backbone's "
                           "%d positions; texts are truncated to %d tokens", prompt, limit,
                           prompt + limit, positions, positions - prompt)
        limit = min(limit, positions - prompt)
    return int(limit)


def subsample(ds, n: int | None, seed: int):
    """A seeded random subset of n rows (file order kept); the whole split when n is None or larger."""
    if n is None or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return ds.select(sorted(perm[:n]))


def encode_splits(data, spec, tokenizer, model, config: TrainConfig, stats: dict | None = None) -> dict[str, list[dict]]:
    """Tokenize every split for the model's task type; rows as lists of dicts ready for the collator.
    Longer texts are truncated to the text length; `stats` receives {split: rows truncated}."""
    max_len = text_max_length(model, config)
    out = {}
    for split in data:
        n = config.max_train_samples if split == "train" else config.max_eval_samples
        ds = subsample(data[split], n, config.seed)
        out[split] = encode(ds, spec, tokenizer, model.task_type, max_len, truncation=True, split=split,
                            stats=stats).to_list()
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


def length_groups(lengths: list[int], waste: float = 0.3) -> list[list[int]]:
    """Row indices in groups of similar length, shortest first: a group grows while padding every row to
    its longest costs at most `waste` more tokens than the rows hold. On a CPU a pass costs about
    what its padded tokens do, so one long row would otherwise make every short row beside it as slow."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * n <= (1 + waste) * (total + n):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups

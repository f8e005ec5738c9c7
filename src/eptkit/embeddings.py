"""The backbone's word-embedding matrix, read whole even when no process holds it whole.

eptkit reads the frozen vocabulary in a few places: the prompt's start (an instruction's rows or sampled
rows), the embedding RMS that `--lr-unit embedding_rms` scales rates by, and the hidden and vocabulary
sizes (adapter facts, parameter counts). On one device the weight is a plain tensor. Sharded, it is not:

- FSDP2 (`torch.distributed.fsdp.fully_shard`) makes it a DTensor: `shape` is the global one, the
  local tensor a slice of rows; `full_tensor()` all-gathers it.
- DeepSpeed ZeRO-3 leaves a shape-[0] placeholder outside a gather, the real shape in `ds_shape`
  (PEFT's prompt init read the placeholder: huggingface/peft issue 206, fixed by gathering);
  `deepspeed.zero.GatheredParameters` fills it in for the length of a `with`.

So sizes come from the global shape (`embedding_shape`, no communication), and everything read from the
values goes through one gather (`read_embeddings`): the statistics and the requested rows are taken
inside it and the full matrix is dropped at once. Both gathers are collectives: every process must call
them, in the same order (eptkit builds the same adapters in the same order on every process).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class EmbeddingFacts:
    """What eptkit needs of the word-embedding matrix, read once (`read_embeddings`)."""

    vocab_size: int
    hidden_size: int
    rms: float  # root mean square of all entries: the scale of a word vector per coordinate
    std: float  # their standard deviation (init='random' draws prompt rows at this scale)
    rows: torch.Tensor  # the requested rows (len(ids) x hidden_size, float32, on the weight's device)


def _weight(embeddings) -> torch.Tensor:
    """The weight of an embedding module (or the weight itself)."""
    return embeddings.weight if isinstance(embeddings, nn.Module) else embeddings


def global_numel(param: torch.Tensor) -> int:
    """The number of entries of the whole parameter (ZeRO-3: `ds_numel`; a DTensor's numel is global)."""
    numel = getattr(param, "ds_numel", None)
    return int(numel) if numel is not None else param.numel()


def embedding_shape(embeddings) -> tuple[int, int]:
    """(vocab size, hidden size) of the whole matrix, whatever part of it this process holds."""
    weight = _weight(embeddings)
    shape = getattr(weight, "ds_shape", None)  # ZeRO-3; a DTensor's `shape` is already the global one
    shape = tuple(shape if shape is not None else weight.shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"word embeddings: expected a vocab x hidden matrix, found shape {shape} (a sharded "
                         "placeholder that is neither a DTensor nor a DeepSpeed ZeRO-3 parameter?)")
    return int(shape[0]), int(shape[1])


@contextlib.contextmanager
def gathered(weight: torch.Tensor):
    """The whole matrix as a plain tensor for the length of the `with` (a collective when sharded)."""
    if _zero3(weight):
        import deepspeed  # a ZeRO-3 parameter exists only where deepspeed does

        # modifier_rank=None: read-only, nothing is scattered back afterwards.
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight.data
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        DTensor = ()
    yield weight.full_tensor() if isinstance(weight, DTensor) else weight.data


def _zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_shape") and hasattr(param, "ds_numel")


def _zero3_parameters(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if _zero3(p)]


def partitioned(module: nn.Module) -> bool:
    """Some parameter of `module` is a ZeRO-3 partition: reading it whole is a collective."""
    return any(_zero3(p) for p in module.parameters())


def partition_share(module: nn.Module) -> tuple[int, int]:
    """(weights this process holds, weights in all) of the ZeRO-3 parameters of `module`."""
    zero3 = _zero3_parameters(module)
    return sum(p.ds_tensor.numel() for p in zero3), sum(p.ds_numel for p in zero3)


def whole_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` (a classifier head a new adapter trains) whose parameters are whole, plain
    tensors. A plain deepcopy of a sharded module copies shards that nothing manages: ZeRO-3's empty
    placeholders (without ds_shape: an empty head), FSDP2's DTensors (which a later fully_shard of the
    root refuses). The copy is gathered once; accelerate's prepare then shards it with the rest."""
    zero3 = _zero3_parameters(module)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            return copy.deepcopy(module)  # a Parameter's deepcopy clones its (gathered) data, not ds_* fields
    copied = copy.deepcopy(module)
    for sub in copied.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if hasattr(param, "full_tensor"):  # a DTensor
                setattr(sub, name, nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad))
    return copied


@contextlib.contextmanager
def whole_parameters(module: nn.Module, modify: bool = False):
    """Every ZeRO-3 parameter of `module` whole for the length of the `with` (nothing to do otherwise):
    the trainable tensors read for a checkpoint or the saved adapter, or written back (`modify`: the
    first process's values are scattered back to every process on leaving)."""
    zero3 = _zero3_parameters(module)
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


def read_embeddings(embeddings, ids: Sequence[int] | torch.Tensor = ()) -> EmbeddingFacts:
    """Sizes, RMS and standard deviation of the word-embedding matrix and its rows `ids`, in one gather."""
    vocab, hidden = embedding_shape(embeddings)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids: must lie in [0, {vocab}) for this vocabulary, got {ids.tolist()}")
    with torch.no_grad(), gathered(_weight(embeddings)) as full:
        if tuple(full.shape) != (vocab, hidden):
            raise ValueError(f"word embeddings: gathered shape {tuple(full.shape)}, expected {(vocab, hidden)}")
        values = full.float()
        rms, std = float(values.pow(2).mean().sqrt()), float(values.std())
        rows = full[ids.to(full.device)].float().clone()
    return EmbeddingFacts(vocab, hidden, rms, std, rows)

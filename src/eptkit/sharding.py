"""Sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`): the backbone split across processes.

Under `--fsdp` (CPU, gloo; or GPUs without accelerate's FSDP plugin) eptkit shards the model itself with
`shard_model`; under `accelerate launch --config_file recipes/accelerate/fsdp.yaml` accelerate's
`fsdp2_prepare_model` does. Both give the same layout, so what runs on GPUs is what the CPU tests run:

- one FSDP unit per transformer block (the classes the backbone names in `_no_split_modules`, found
  by `block_classes`; models expose them to accelerate through `no_split_modules`), each block's
  weights gathered just before it runs and freed after;
- one root unit over the whole trainable model: embeddings, final norm, and the adapter and head.

The adapter is sharded with the root rather than kept replicated outside FSDP. A parameter outside
every unit would get no gradient reduction (each process would step on its own rows' gradient) and
would mix plain tensors with DTensors in gradient clipping; inside the root unit FSDP reduce-scatters
its gradient (the mean over processes, as DDP's all-reduce) and every trainable tensor is a DTensor on
one mesh. LoRA's matrices and full fine-tuning's weights live in the blocks and are sharded with them.

The rest of eptkit reads and writes trainable tensors through this module: `full_state` gathers them
(a collective: every process calls it), `copy_into` writes a full tensor into its shard, and
`local_optimizer_state` / `load_local_optimizer_state` turn the optimizer's sharded state (FSDP's, or
DeepSpeed ZeRO's partitions) into plain tensors for a per-process checkpoint file and back.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .embeddings import partitioned, whole_parameters

# Methods refused under sharding: PEFT's P-tuning and prefix tuning (their prompt encoders run inside PEFT's
# own forward, on modules FSDP1 needed as separate units; not verified under FSDP2).
UNSHARDABLE_METHODS = ("ptuning", "prefix")


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def block_classes(model: nn.Module) -> list[str]:
    """Class names of the backbone's transformer blocks: what transformers declares in `_no_split_modules`
    on any of its pretrained (sub)models, less any class that holds the input embeddings (eptkit looks
    the prompt's neighbours up in the embedding matrix outside the block's forward, so the embeddings
    must stay in the root unit, gathered for the whole forward). Without such names: the class of the
    longest ModuleList of identical modules (the layer stack)."""
    backbone = getattr(model, "backbone", model)
    names: list[str] = []
    for m in backbone.modules():
        for name in getattr(m, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    present = {type(m).__name__: m for m in backbone.modules()}
    holds_embeddings = {n for n, m in present.items()
                        if embeddings is not None and any(s is embeddings for s in m.modules())}
    names = [n for n in names if n in present and n not in holds_embeddings]
    if names:
        return names
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(c) for c in m}) == 1]
    return [type(max(lists, key=len)[0]).__name__] if lists else []


def shard_model(model: nn.Module, device: torch.device, num_processes: int) -> nn.Module:
    """Shard `model` in place over `num_processes` processes (torch.distributed already initialised):
    `fully_shard` on each transformer block, then on the whole model (the layout of accelerate's FSDP2
    path). `generate` is registered as a forward method, so its calls gather the root's weights too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    classes = set(block_classes(model))
    if not classes:
        raise ValueError(f"--fsdp: found no transformer blocks to shard in {type(model.backbone).__name__}")
    mesh = init_device_mesh(device.type, (num_processes,))
    model.to(device)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in reversed(blocks):  # innermost first, as fully_shard expects nested units
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if hasattr(type(model), "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


def reshard(model: nn.Module) -> None:
    """Every unit back to its shards. The root keeps its gathered weights after a forward without a
    backward (an evaluation); reads and writes of trainable tensors must see the shards, which the
    optimizer updates (a write into a gathered copy would be lost at the next gather)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.adapter_state_dict()` with every sharded tensor gathered whole, on every process (a
    collective: all processes must call it, in the same order)."""
    DTensor = _dtensor()
    if is_sharded(model):
        reshard(model)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.adapter_state_dict().items()}


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, as CPU copies: gathered from FSDP2's shards or ZeRO-3's partitions
    (then a collective: every process calls it)."""
    with whole_parameters(model):
        return {k: v.detach().cpu().clone() for k, v in full_state(model).items()}


def save_whole(model: nn.Module, output_dir, state: dict[str, torch.Tensor] | None, *, is_main: bool) -> None:
    """The model's own files in output_dir, written by the main process, whole: when sharded, of `state`
    (whole tensors from `cpu_state`). Every process calls it: under ZeRO-3 the gather is a collective."""
    with whole_parameters(model):
        if is_main:
            with state_view(model, state) if state is not None and is_sharded(model) else contextlib.nullcontext():
                model.save_pretrained(output_dir)


def load_whole(model: nn.Module, state: dict[str, torch.Tensor], device) -> None:
    """Whole tensors `state` into the model's trainable tensors (each process into its shard or partition)."""
    with whole_parameters(model, modify=True):
        model.load_adapter_state_dict({k: v.to(device) for k, v in state.items()})


@contextlib.contextmanager
def state_view(model: nn.Module, state: dict[str, torch.Tensor]):
    """Within: `model.adapter_state_dict()` returns `state` (full tensors), so that the model's own
    `save_pretrained` writes the whole adapter in its usual files from one process."""
    model.adapter_state_dict = lambda: state
    try:
        yield model
    finally:
        del model.adapter_state_dict


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """target <- source (a full tensor), into this process's shard when target is sharded. Every process
    holds the full source, so each cuts its own shard without communication (src_data_rank=None)."""
    DTensor = _dtensor()
    if isinstance(target, DTensor):
        from torch.distributed.tensor import distribute_tensor

        source = distribute_tensor(source.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                   target.placements, src_data_rank=None)
    target.copy_(source.to(target.dtype))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a prepared model's trainable tensors and its optimizer's state live: facts of the launch,
    read once when the Trainer prepares the model (`placement`), used at every checkpoint and at the end."""

    sharded: bool  # FSDP: trainable tensors are DTensors, each process holding a shard
    collective_reads: bool  # reading a trainable tensor whole is a collective (FSDP shards, ZeRO-3 partitions)
    per_process_optimizer: bool  # each process keeps its own part of the optimizer's state (optimizer-R.pt)


def placement(model: nn.Module, optimizer) -> Placement:
    """The `Placement` of a model and optimizer after `accelerator.prepare`. DeepSpeed ZeRO partitions the
    optimizer's state (moments, fp32 master weights) at every stage, the weights themselves only at 3."""
    sharded = is_sharded(model)
    return Placement(sharded=sharded, collective_reads=sharded or partitioned(model),
                     per_process_optimizer=sharded or _zero_optimizer(optimizer) is not None)


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer (stage 1, 2 or 3) behind accelerate's wrapper, or None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    partitions = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")  # stage 3, stages 1-2
    return inner if hasattr(inner, "loss_scaler") and any(hasattr(inner, a) for a in partitions) else None


def local_optimizer_state(optimizer) -> dict:
    """This process's part of the optimizer's state as plain tensors and numbers, which
    torch.load(weights_only=True) reads back: a sharded tensor as its shard; DeepSpeed ZeRO's state with its
    loss scaler (an object) as the scaler's numbers and its stage (an enum) as an int."""
    zero = _zero_optimizer(optimizer)
    if zero is not None:
        state = dict(zero.state_dict())
        state["loss_scaler"] = {k: v for k, v in vars(state["loss_scaler"]).items()
                                if isinstance(v, (bool, int, float, torch.Tensor))}
        state["zero_stage"] = int(state["zero_stage"])
        # Stages 1-2: where each parameter's slice lies in the flat groups (objects), for DeepSpeed's
        # "universal" checkpoints that change the process count; a same-launch reload does not read it.
        state.pop("param_slice_mappings", None)
        return state
    DTensor = _dtensor()
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_local_optimizer_state(optimizer, state: dict) -> None:
    """The inverse of `local_optimizer_state`, in the same processes: each loads its own part."""
    zero = _zero_optimizer(optimizer)
    if zero is not None:
        vars(zero.loss_scaler).update(state["loss_scaler"])
        state = {**state, "loss_scaler": zero.loss_scaler}
        # DeepSpeed takes every process's state and picks this process's by its rank; each has only its own.
        # ZeRO-3's load also sets the trainable weights from the fp32 master weights it restores; stages 1-2
        # restore their fp32 master weights only when told to (else they would copy them from the weights,
        # which under bf16 are rounded), and the weights already hold the checkpoint's values.
        copies = [state] * torch.distributed.get_world_size(group=zero.dp_process_group)
        if hasattr(zero, "fp32_partitioned_groups_flat"):
            zero.load_state_dict(copies)
        else:
            zero.load_state_dict(copies, load_from_fp32_weights=True)
        return
    optimizer.load_state_dict(state)
    _restore_dtensors(optimizer)


def _restore_dtensors(optimizer) -> None:
    """After `optimizer.load_state_dict` of a sharded `local_optimizer_state`: the moments of sharded
    parameters made DTensors again (shards of the parameter's layout), as the optimizer keeps them."""
    DTensor = _dtensor()
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    for p, s in inner.state.items():
        if not isinstance(p, DTensor):
            continue
        for k, v in s.items():
            if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape and v.dim():
                s[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())


@contextlib.contextmanager
def no_sync(model: nn.Module, accelerator):
    """No gradient reduction between processes within (the micro-batches before a step's last): DDP's
    no_sync through accelerate; for a model eptkit sharded, which accelerate does not know as FSDP,
    what accelerate does for its own: gradients accumulate unreduced until the last micro-batch."""
    from accelerate.utils import DistributedType

    if not (is_sharded(model) and accelerator.distributed_type != DistributedType.FSDP):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def plain(value):
    """A gradient norm or other result that may be a DTensor, as a plain tensor (gathered)."""
    DTensor = _dtensor()
    return value.full_tensor() if isinstance(value, DTensor) else value


def check_sharding(config, model: nn.Module, accelerator) -> bool:
    """Whether eptkit shards `model` itself (`--fsdp` where accelerate does not); a one-line ValueError
    for a combination that cannot work. Under accelerate's FSDP the same limits apply and accelerate shards."""
    from accelerate.utils import DistributedType

    by_accelerate = accelerator.distributed_type == DistributedType.FSDP
    if not (config.fsdp or by_accelerate):
        return False
    if not by_accelerate and accelerator.num_processes < 2:
        raise ValueError("fsdp: a single process has nothing to shard across; launch 2 or more "
                         "(torchrun --nproc_per_node N -m eptkit.cli train --fsdp ...) or drop --fsdp")
    if model.method_name in UNSHARDABLE_METHODS:
        raise ValueError(f"fsdp: method {model.method_name!r} is not supported sharded; use pt, dept, ept, "
                         "lora, full or head")
    if model.task_type != "classification":
        # Each process generates until its own rows end, so the processes would run different numbers
        # of forward passes, and every sharded forward is a collective.
        raise ValueError(f"fsdp: {model.task_type} (generation) tasks are not supported sharded; use "
                         "--task-type classification (a sequence-classification backbone)")
    return not by_accelerate

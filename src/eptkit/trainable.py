"""The contract between the training loop and the models it trains, written down once.

`eptkit.train` trains anything that satisfies `TrainableModel`: a `PromptedModel` (PT, DePT, EPT) or
one of the comparison wrappers of `eptkit.baselines` (LoRA, P-tuning, prefix tuning, full
fine-tuning, linear probe). The loop, evaluation and checkpointing use these members and nothing
else, so a new kind of model trains by providing them.

`AdapterStateMixin` holds the two implementations the models share: counting parameters and loading
the trainable tensors back (checkpoints, the best adapter of a run).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .config import PromptTuningConfig
from .embeddings import global_numel


@runtime_checkable
class TrainableModel(Protocol):
    task_type: str
    """'classification', 'seq2seq' or 'causal' (`eptkit.task_types.TASK_TYPES`)."""

    @property
    def backbone(self) -> nn.Module:
        """The Hugging Face model underneath (a PEFT model for PEFT's methods): its config names the
        checkpoint and its input embeddings set the scale of the prompt's learning rate."""

    @property
    def method_name(self) -> str:
        """The method's name, a name in `eptkit.registry.METHODS` ('ept', 'lora', ...)."""

    @property
    def method_config(self) -> PromptTuningConfig | None:
        """The prompt method's config (it sets the text length and occupies positions); None for baselines."""

    @property
    def prompt_positions(self) -> int:
        """Positions the method takes before the text (the prompt; PEFT's virtual tokens, 0 for LoRA):
        the text's room is the backbone's positions less these (`eptkit.batching.text_max_length`)."""

    @property
    def max_length(self) -> int | None:
        """The longest text in tokens the model accepts on its own (DePT/EPT's offset rows), or None."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group; keys are `eptkit.registry.lr_fields()` groups."""

    def num_parameters(self, trainable_only: bool = True, exclude_embeddings: bool = False) -> int: ...

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, by name (what a checkpoint stores)."""

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_pretrained(self, directory) -> None:
        """Write the trained model in its own format (the best adapter of a run)."""

    def __call__(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        """An output with `.loss` (given labels) and `.logits`, like a transformers model."""

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """New tokens only (seq2seq and causal models); a classifier raises TypeError."""


class AdapterStateMixin:
    """`num_parameters` and `load_adapter_state_dict` for nn.Modules that define `param_groups`,
    `adapter_state_dict` and `backbone`."""

    def num_parameters(self, trainable_only: bool = True, exclude_embeddings: bool = False) -> int:
        """Trainable parameters, or with trainable_only=False every parameter including the backbone.
        `exclude_embeddings` (asked by transformers.Trainer) leaves out the frozen word embeddings."""
        # global_numel: a sharded parameter counts whole (ZeRO-3 leaves a shape-[0] placeholder).
        if trainable_only:
            return sum(global_numel(p) for ps in self.param_groups().values() for p in ps)
        total = sum(global_numel(p) for p in {id(p): p for p in self.parameters()}.values())
        if exclude_embeddings:
            total -= self._frozen_embedding_count()
        return total

    def _frozen_embedding_count(self) -> int:
        return 0

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's transformer-block classes (`eptkit.sharding.block_classes`): accelerate's FSDP
        wraps each block of these classes as its own unit, as `--fsdp` does."""
        from .sharding import block_classes

        return block_classes(self)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors named as in `adapter_state_dict`; missing, extra or misshapen tensors are an error.
        Under sharded training (`eptkit.sharding`) each process writes its own shard of each full tensor."""
        from .sharding import copy_into, is_sharded, reshard

        if is_sharded(self):
            reshard(self)
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match the model: missing {missing}, unexpected {unexpected}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[name].shape)} (different backbone or hyper-parameters?)"
                )
        with torch.no_grad():
            for name, target in expected.items():
                copy_into(target, state[name])


def set_gradient_checkpointing(model: TrainableModel, enabled: bool) -> None:
    """Switch activation checkpointing of `model`'s backbone on or off (`TrainConfig.gradient_checkpointing`;
    the training loops call this, `eptkit.train` and `eptkit.multirun` alike).

    transformers' own mechanism, so every architecture that supports it works: each layer's forward runs
    under `torch.utils.checkpoint` and is recomputed in the backward pass. It acts only while the layer is
    in training mode with gradients on, so evaluation (model.eval()) and serving are unaffected even with
    the switch on. Non-reentrant (use_reentrant=False): the reentrant form gives gradients only through
    inputs that require one, so with a frozen backbone whose trainable weights sit inside the layers (LoRA)
    it would need PEFT's `enable_input_require_grads` hook, and only positional inputs carry gradients;
    the non-reentrant form has neither limit. Both preserve the RNG state, so dropout masks match too.
    """
    backbone = model.backbone
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone  # a PEFT model
    if not enabled:
        if any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
        return
    if model.method_name == "prefix":
        # PEFT hands prefix tuning's keys and values to the backbone as a cache, and a checkpointed
        # layer drops its cache (transformers cannot replay a cache update): the prefix would vanish.
        raise ValueError("gradient_checkpointing: PEFT's prefix tuning passes its prefix as a key/value cache, "
                         "which checkpointed layers drop; train prefix tuning without it")
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(base).__name__} does not support activation checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

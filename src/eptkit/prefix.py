"""Decoder-only models: the prompt's keys and values computed once per batch (docs/method.md,
"The prompt as a shared key/value prefix").

Under a causal mask the virtual tokens come first and attend only to each other, at positions
0..l-1 whatever the row's padding; DePT's and EPT's offset touches text tokens only. So their hidden
states, keys and values are the same for every row of a batch. We run the first l-1 virtual tokens
through the decoder once (batch 1), expand the resulting key/value cache over the batch (a view, no
copy) and run each row's [last virtual token ; text] against it. The last virtual token rides with
the text so that the backbone's own loss sees the logit that predicts the first text token, exactly
as in the plain path; it costs one token per row.

This is the plain path's computation, reordered: logits, loss and gradients (the expanded cache
sums every row's gradient back into the one prefix) agree to float rounding. The output's logits
cover the text tokens only (the plain path's also cover the virtual tokens, which nothing reads).
A folded adapter's prefix does not change between calls: `FoldedPrefix` keeps it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from .backbones import positions_from_mask

# Options that need every position's outputs, or a cache eptkit does not build: the plain path then.
_PLAIN_ONLY = ("output_hidden_states", "output_attentions", "cache_implementation", "assistant_model")


def cache_argument(backbone: nn.Module) -> str:
    """The forward/generate argument that takes a cache: 'cache' since transformers 5.24 (which
    deprecates the older 'past_key_values')."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _checkpointing(backbone: nn.Module) -> bool:
    """Whether a forward of `backbone` now runs checkpointed layers: switched on, in training mode, with
    gradients (the condition transformers' layers check). Evaluation of a checkpointed run keeps the prefix."""
    name = "is_activation_checkpointing" if hasattr(type(backbone), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(backbone, name, False)) and backbone.training and torch.is_grad_enabled()


def has_active_dropout(backbone: nn.Module) -> bool:
    """Whether a forward of `backbone` now draws dropout masks: then rows sharing one prefix would
    share the prompt's masks too, which the plain path does not, so the prefix is not exact."""
    if not backbone.training:
        return False
    for module in backbone.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        # Attention dropout passed functionally (Llama-style `self.attention_dropout = config...`).
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            return True
    return False


def prefix_applies(model, adapter_config, kwargs: dict) -> bool:
    """Whether the shared prefix gives exactly the plain path's result for this call of `model`
    (a PromptedModel on a causal backbone, one adapter, configured by `adapter_config`, for the whole batch)."""
    backbone = model.backbone
    config = backbone.config
    return (
        model.task_type == "causal"
        and getattr(adapter_config, "shared_prefix", True)
        and adapter_config.prompt_length >= 2
        and getattr(config, "sliding_window", None) is None  # a sliding cache drops old keys differently
        and not _checkpointing(backbone)  # which turns the cache off
        and not any(kwargs.get(name) for name in _PLAIN_ONLY)
        and not has_active_dropout(backbone)
    )


def compute_prefix(backbone: nn.Module, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (per layer, batch 1) of the prompt's first l-1 rows at positions 0..l-2."""
    cache = DynamicCache(config=backbone.config)
    base = backbone.base_model
    base(inputs_embeds=prompt[:-1].unsqueeze(0), use_cache=True, **{cache_argument(base): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def expanded_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """A cache holding `prefix` for every row of the batch: expanded views of the batch-1 tensors.
    Its first update concatenates the text's keys onto them, which copies once, as attention needs."""
    cache = DynamicCache(ddp_cache_data=prefix)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    return cache


class FoldedPrefix:
    """The prefix of a folded (constant) prompt, computed once per device and dtype and reused:
    a folded adapter over a frozen backbone is a ready-made key/value prefix."""

    def __init__(self):
        self._stored: dict[tuple, list] = {}

    def get(self, backbone: nn.Module, prompt: torch.Tensor, dtype: torch.dtype):
        """The prefix of `prompt` (the folded buffer) cast to `dtype`; recomputed when the buffer
        was written to since (its version counter moves), or device, dtype or autocast changed."""
        device = prompt.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (prompt.device, dtype, autocast, prompt.data_ptr(), prompt._version)
        if key not in self._stored:
            self._stored.clear()  # one entry: the prompt as it is now
            with torch.no_grad():
                self._stored[key] = compute_prefix(backbone, prompt.to(dtype))
        return self._stored[key]


def causal_forward(model, prompt: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                   labels: torch.Tensor | None, prefix=None, **kwargs):
    """The backbone's output for [prompt ; embeds] (embeds: the text's E + D, batch x n x d; mask:
    the text's attention mask), with the prompt as a shared key/value prefix; logits of the text only.
    `prefix` is a precomputed `compute_prefix` result (a folded adapter's)."""
    batch, length = embeds.shape[0], prompt.shape[0]
    prompt = prompt.to(embeds.dtype)
    if prefix is None:
        prefix = compute_prefix(model.backbone, prompt)
    full_mask = torch.cat([mask.new_ones(batch, length), mask], dim=1)
    # Positions as in the plain path (from the whole mask), so the prefix holds 0..l-2 and every
    # row's last virtual token sits at l-1, its text after it whatever the padding.
    positions = positions_from_mask(full_mask)[:, length - 1:]
    inputs = torch.cat([prompt[-1:].unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch, 1), -100), labels], dim=1)
    out = model.backbone(inputs_embeds=inputs, attention_mask=full_mask, position_ids=positions,
                         labels=labels, **{cache_argument(model.backbone): expanded_cache(prefix, batch)}, **kwargs)
    if out.logits.shape[1] == inputs.shape[1]:  # all positions (not a `logits_to_keep` tail)
        out.logits = out.logits[:, 1:]  # a view: the text's logits
    return out


def generate_with_prefix(model, prompt: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, prefix=None,
                         **kwargs):
    """`generate` with the prompt as a shared key/value prefix (greedy or sampled, one sequence per row)."""
    batch, length = embeds.shape[0], prompt.shape[0]
    prompt = prompt.to(embeds.dtype)
    if prefix is None:
        prefix = compute_prefix(model.backbone, prompt)
    # generate takes the whole input and skips the part the cache holds already.
    inputs = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    full_mask = torch.cat([mask.new_ones(batch, length), mask], dim=1)
    cache = {cache_argument(model.backbone): expanded_cache(prefix, batch)}
    return model.backbone.generate(inputs_embeds=inputs, attention_mask=full_mask, **cache, **kwargs)


def generation_applies(model, adapter_config, kwargs: dict) -> bool:
    """The prefix for generate: also one sequence per row (beams and several return sequences grow
    the batch inside generate, past a cache built for the input batch)."""
    config = kwargs.get("generation_config") or model.backbone.generation_config
    widened = any((kwargs.get(name) or getattr(config, name, 1) or 1) > 1
                  for name in ("num_beams", "num_return_sequences"))
    return not widened and prefix_applies(model, adapter_config, kwargs)

"""Mixed-adapter batches: each row of one batch through its own adapter on the shared frozen backbone
(docs/method.md, "Mixed batches").

`PromptedModel(..., adapter_names=[...])` and `generate(..., adapter_names=[...])` come here. Rows
are grouped by adapter; each group's prompt side (prompt, offset) is computed once. Prompts of
different lengths are padded to the longest (M) and the padded slots masked, laid out so that every
real token keeps the position it has when its row runs alone:

- classification and seq2seq ("right" layout): [P_a ; row ; M - m_a masked slots]. The text follows
  its own prompt directly, so absolute positions (BERT, RoBERTa, BART) and relative ones (T5) are
  unchanged, as is position 0 (the first virtual token, read by encoder poolers).
- causal ("left" layout): [M - m_a masked slots ; P_a ; row]. Decoders get position ids from the
  attention mask (as `generate` computes them), so left padding changes nothing and generated tokens
  follow every row's last token.

Each classification row goes through its own adapter's head (and its adapter's pooling).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .heads import apply_head, classification_loss, pool
from .backbones import first_position, own_text_positions, positions_from_mask, usable_positions


def add_offset(embeds, attention_mask, offset, offset_mask=None):
    """E + D: row i of the offset D added to the i-th real token of each text (counted with the
    attention mask, so any padding gives the same result); `offset_mask` limits it to some tokens."""
    real = attention_mask.bool() if offset_mask is None else attention_mask.bool() & offset_mask
    positions = attention_mask.long().cumsum(dim=1) - 1
    # Only a padded width beyond max_length can hold a too-late token; checking the width
    # first spares the GPU a host sync on every step.
    too_long = real & (positions >= offset.shape[0]) if embeds.shape[1] > offset.shape[0] else None
    if too_long is not None and too_long.any():
        row = int(too_long.any(dim=1).nonzero()[0])
        length = int(real[row].sum())
        raise ValueError(
            f"input row {row} has {length} tokens, more than max_length={offset.shape[0]} that this "
            "adapter's offset covers; truncate the text or use an adapter with a larger max_length"
        )
    # F.embedding, not offset[positions]: the backward of advanced indexing is index_put_ with
    # accumulate=True, which on CPU adds rows with parallel atomic float adds (the sum's order, and so
    # its last bits, varied from run to run with 2+ threads). Embedding's backward sums each offset
    # row's gradient in token order, whatever the threads (docs/reproducibility.md).
    rows = nn.functional.embedding(positions.clamp(0, offset.shape[0] - 1), offset)  # batch x n x d
    return embeds + (rows * real.unsqueeze(-1)).to(embeds.dtype)


def check_text_inputs(input_ids, attention_mask):
    """A clear error for malformed token ids or mask; the mask (all ones when None)."""
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("input_ids: expected a 2-D tensor of token ids (batch x length)")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    return attention_mask


def check_adapter_names(model, adapter_names, batch: int) -> list[str]:
    """One loaded adapter name per row, or a clear error."""
    if isinstance(adapter_names, str):
        raise ValueError("adapter_names: expected one name per row (a list), got a single string; "
                         "use set_adapter(name) to run a whole batch through one adapter")
    names = list(adapter_names)
    if len(names) != batch:
        raise ValueError(f"adapter_names: {len(names)} name(s) for a batch of {batch} row(s); pass one name per row")
    unknown = [n for n in dict.fromkeys(names) if n not in model.adapters]
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {unknown[0]!r} is loaded; have {sorted(model.adapters)}")
    return names


@dataclass
class MixedInputs:
    """The backbone inputs of a mixed batch (batch x (M + n) [x d])."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    text_mask: torch.Tensor  # 1 on the text's real tokens only (for pooling)
    token_type_ids: torch.Tensor | None
    groups: list[tuple[str, torch.Tensor]]  # (adapter name, its row indices), in order of first use
    inverse: torch.Tensor  # rows of the grouped order -> the batch's order
    text_attention_mask: torch.Tensor  # the text's own mask (batch x n; all ones when none was given)

    def ungroup(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return _ungroup(parts, self.inverse)


def _ungroup(parts: list[torch.Tensor], inverse: torch.Tensor) -> torch.Tensor:
    """Per-group results (each group's rows in turn) back in the batch's row order."""
    return torch.cat(parts)[inverse]


def embed_rows(model, input_ids, attention_mask, adapter_names, *, offset_mask=None, token_type_ids=None,
               left: bool = False) -> MixedInputs:
    """[prompt_a ; E + D_a] for every row with its adapter a, padded as the module docstring describes."""
    attention_mask = check_text_inputs(input_ids, attention_mask)
    names = check_adapter_names(model, adapter_names, input_ids.shape[0])
    device = input_ids.device
    groups = [(name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
              for name in dict.fromkeys(names)]
    sides = {name: model.adapters[name]() for name, _ in groups}
    longest = max(prompt.shape[0] for prompt, _ in sides.values())
    if not left and not hasattr(model.backbone, "score"):
        _check_padded_width(model, sides, input_ids.shape[1])
    embeds_all = model.word_embeddings(input_ids)
    parts, masks, text_masks, types = [], [], [], []
    for name, idx in groups:
        prompt, offset = sides[name]
        mask = attention_mask[idx]
        embeds = embeds_all[idx]
        if offset is not None:
            embeds = add_offset(embeds, mask, offset, None if offset_mask is None else offset_mask[idx])
        rows, m, d = len(idx), prompt.shape[0], embeds.shape[-1]
        pad = longest - m
        prompts = prompt.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        slots, ones = embeds.new_zeros(rows, pad, d), mask.new_ones(rows, m)
        zeros_pad, zeros_m = mask.new_zeros(rows, pad), mask.new_zeros(rows, m)
        if left:
            parts.append(torch.cat([slots, prompts, embeds], dim=1))
            masks.append(torch.cat([zeros_pad, ones, mask], dim=1))
            text_masks.append(torch.cat([zeros_pad, zeros_m, mask], dim=1))
        else:
            parts.append(torch.cat([prompts, embeds, slots], dim=1))
            masks.append(torch.cat([ones, mask, zeros_pad], dim=1))
            text_masks.append(torch.cat([zeros_m, mask, zeros_pad], dim=1))
        if token_type_ids is not None:
            tt = token_type_ids[idx]
            z_m, z_pad = tt.new_zeros(rows, m), tt.new_zeros(rows, pad)
            types.append(torch.cat([z_pad, z_m, tt] if left else [z_m, tt, z_pad], dim=1))
    order = torch.cat([idx for _, idx in groups])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)
    return MixedInputs(_ungroup(parts, inverse), _ungroup(masks, inverse), _ungroup(text_masks, inverse),
                       _ungroup(types, inverse) if types else None, groups, inverse, attention_mask)


def _check_padded_width(model, sides: dict, n: int) -> None:
    """In the right layout the backbone numbers every slot by its place, the padded ones after the
    text included: each row then takes the widest prompt's positions plus the batch's text width,
    which can exceed the backbone's positions although every adapter fits alone. Say so, by name."""
    limit = usable_positions(model.backbone)
    widest = max(sides, key=lambda name: sides[name][0].shape[0])
    m = sides[widest][0].shape[0]
    if limit is not None and m + n > limit:
        raise ValueError(
            f"adapter_names: a mixed batch pads every prompt to the widest, adapter {widest!r}'s {m} virtual "
            f"tokens; with the batch's {n} text positions that makes {m + n}, more than the backbone's {limit} "
            f"positions; truncate the texts to {limit - m} tokens or run the longer rows in a batch without {widest!r}"
        )


def mixed_forward(model, adapter_names, input_ids, attention_mask, labels, token_type_ids, **kwargs):
    """PromptedModel.forward with one adapter per row (the same outputs, row by row, as each adapter alone)."""
    if model.task_type == "classification":
        return _classify(model, adapter_names, input_ids, attention_mask, labels, token_type_ids, **kwargs)
    if model.task_type == "seq2seq":
        x = embed_rows(model, input_ids, attention_mask, adapter_names)
        labels = None if labels is None else labels.contiguous()
        return model.backbone(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=labels, **kwargs)
    offset_mask = None if labels is None else labels.eq(-100)
    x = embed_rows(model, input_ids, attention_mask, adapter_names, offset_mask=offset_mask, left=True)
    if labels is not None:
        labels = torch.cat([labels.new_full((labels.shape[0], x.inputs_embeds.shape[1] - labels.shape[1]), -100),
                            labels], dim=1)
    return model.backbone(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                          position_ids=positions_from_mask(x.attention_mask), labels=labels, **kwargs)


def mixed_generate_inputs(model, adapter_names, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    x = embed_rows(model, input_ids, attention_mask, adapter_names, left=model.task_type == "causal")
    return x.inputs_embeds, x.attention_mask


class _RowHeads(nn.Module):
    """Stands in for the backbone's head during a mixed forward: each group of rows through its own head."""

    def __init__(self, heads, x: MixedInputs):
        super().__init__()
        object.__setattr__(self, "_heads", [(heads[name], idx) for name, idx in x.groups])
        object.__setattr__(self, "_x", x)

    def forward(self, hidden, *args, **kwargs):
        return self._x.ungroup([head(hidden[idx], *args, **kwargs) for head, idx in self._heads])


@contextlib.contextmanager
def _heads_per_row(model, x: MixedInputs):
    setattr(model.backbone, model.head_name, _RowHeads(model.heads, x))
    try:
        yield
    finally:
        setattr(model.backbone, model.head_name, model.heads[model.active_adapter])


def _classify(model, adapter_names, input_ids, attention_mask, labels, token_type_ids, **kwargs):
    backbone = model.backbone
    decoder = hasattr(backbone, "score")
    x = embed_rows(model, input_ids, attention_mask, adapter_names, token_type_ids=token_type_ids)
    model_kwargs = dict(kwargs)
    if x.token_type_ids is not None:
        model_kwargs["token_type_ids"] = x.token_type_ids
    if decoder:
        model_kwargs["position_ids"] = positions_from_mask(x.attention_mask)
    own = [(name, idx) for name, idx in x.groups if model.configs[name].text_positions == "own"]
    if own:  # those rows' text at the positions it has without a prompt, as PromptedModel does alone
        width, n = x.inputs_embeds.shape[1], input_ids.shape[1]
        positions = model_kwargs.get("position_ids")
        if positions is None:  # what the backbone would number the other rows
            start = first_position(backbone)
            positions = torch.arange(start, start + width, device=input_ids.device).expand(input_ids.shape[0], -1)
        positions = positions.clone()
        for name, idx in own:
            m = model.configs[name].prompt_length
            positions[idx, :m + n] = own_text_positions(backbone, x.text_attention_mask[idx], m)
        model_kwargs["position_ids"] = positions
    poolings = {name: model.configs[name].pooling for name, _ in x.groups}
    # Encoder heads with 'backbone' pooling read position 0 (the first virtual token) through the
    # backbone's own pooler: run the whole backbone with a head that sends each row to its adapter's.
    through_backbone = {n for n, p in poolings.items() if p == "backbone" and not decoder}
    backbone_logits = None
    if through_backbone:
        others = len(through_backbone) < len(poolings)
        with _heads_per_row(model, x):
            out = backbone(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                           output_hidden_states=others, **model_kwargs)
        backbone_logits, hidden = out.logits, (out.hidden_states[-1] if others else None)
    else:
        hidden = backbone.base_model(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                                     **model_kwargs).last_hidden_state
    parts = []
    for name, idx in x.groups:
        if name in through_backbone:
            parts.append(backbone_logits[idx])
            continue
        pooling = poolings[name]
        mask = (x.attention_mask if pooling == "backbone" else x.text_mask)[idx]
        parts.append(apply_head(backbone, model.heads[name], pool(hidden[idx], mask, 0, pooling)))
    logits = x.ungroup(parts)
    loss = None if labels is None else classification_loss(backbone.config, logits, labels)
    return SequenceClassifierOutput(loss=loss, logits=logits)

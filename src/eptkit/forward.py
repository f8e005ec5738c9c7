"""The forward pass of a PromptedModel: prompt assembly, positions, pooling and heads (docs/method.md,
"Mixed batches").

Every call is a batch whose rows are grouped by adapter: a plain call (the active adapter) is one group,
`model(..., adapter_names=[...])` may have several. Each group's prompt side (prompt, offset) is computed
once. With one group the rows are used as they are (no gathering or reordering), so a single-adapter
call costs what it did before mixed batches existed. With several, prompts of different lengths are
padded to the longest (M) and the padded slots masked, laid out so that every real token keeps the
position it has when its row runs alone:

- classification and seq2seq ("right" layout): [P_a ; row ; M - m_a masked slots]. The text follows
  its own prompt directly, so absolute positions (BERT, RoBERTa, BART) and relative ones (T5) are
  unchanged, as is position 0 (the first virtual token, read by encoder poolers).
- causal ("left" layout): [M - m_a masked slots ; P_a ; row]. Decoders get position ids from the
  attention mask (as `generate` computes them), so left padding changes nothing and generated tokens
  follow every row's last token.

Each classification row goes through its own adapter's head (and its adapter's pooling). A causal batch
of one group uses the shared key/value prefix where it is exact (`eptkit.prefix`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .backbones import first_position, own_text_positions, positions_from_mask, usable_positions
from .heads import apply_head, classification_loss, pool
from .methods.offset import add_offset
from .prefix import causal_forward, generate_with_prefix, generation_applies, prefix_applies

Group = tuple[str, "torch.Tensor | None"]  # (adapter name, its row indices; None: every row of the batch)


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


def _groups(model, adapter_names, input_ids) -> list[Group]:
    if adapter_names is None:
        return [(model.active_adapter, None)]
    names = check_adapter_names(model, adapter_names, input_ids.shape[0])
    if len(set(names)) == 1:
        return [(names[0], None)]
    return [(name, torch.tensor([i for i, n in enumerate(names) if n == name], device=input_ids.device))
            for name in dict.fromkeys(names)]


def _rows(tensor, idx):
    return tensor if idx is None or tensor is None else tensor[idx]


@dataclass
class PromptedInputs:
    """The backbone inputs of a batch (batch x (M + n) [x d]) and how its rows are grouped."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    groups: list[Group]  # in order of first use
    inverse: torch.Tensor | None  # rows of the grouped order -> the batch's order (None: one group)
    text_attention_mask: torch.Tensor  # the text's own mask (batch x n; all ones when none was given)
    prompt_lengths: dict[str, int]  # adapter name -> its number of virtual tokens

    def ungroup(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-group results (each group's rows in turn) back in the batch's row order."""
        return parts[0] if self.inverse is None else torch.cat(parts)[self.inverse]


def _sides(model, groups: list[Group]) -> dict:
    return {name: model.adapters[name]() for name, _ in groups}


def _text_embeds(model, input_ids, mask, groups, sides, offset_mask=None) -> list[torch.Tensor]:
    """E + D_a for each group's rows (D_a: the offset of its adapter, if it has one)."""
    embeds_all = model.word_embeddings(input_ids)
    out = []
    for name, idx in groups:
        embeds, offset = _rows(embeds_all, idx), sides[name][1]
        if offset is not None:
            embeds = add_offset(embeds, _rows(mask, idx), offset, _rows(offset_mask, idx))
        out.append(embeds)
    return out


def embed(model, input_ids, attention_mask=None, adapter_names=None, *, offset_mask=None, token_type_ids=None,
          left: bool = False, groups=None, sides=None) -> PromptedInputs:
    """[prompt_a ; E + D_a] for every row with its adapter a, padded as the module docstring describes."""
    attention_mask = check_text_inputs(input_ids, attention_mask)
    groups = groups or _groups(model, adapter_names, input_ids)
    sides = sides or _sides(model, groups)
    lengths = {name: side[0].shape[0] for name, side in sides.items()}
    longest = max(lengths.values())
    if len(groups) > 1 and not left and not hasattr(model.backbone, "score"):
        _check_padded_width(model, lengths, input_ids.shape[1])
    parts, masks, types = [], [], []
    for (name, idx), embeds in zip(groups, _text_embeds(model, input_ids, attention_mask, groups, sides, offset_mask)):
        prompt, mask = sides[name][0], _rows(attention_mask, idx)
        rows, m, d = embeds.shape[0], prompt.shape[0], embeds.shape[-1]
        prompts = prompt.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        ones, pad = mask.new_ones(rows, m), longest - m
        if pad == 0:  # no padded slots (always so with one group)
            parts.append(torch.cat([prompts, embeds], dim=1))
            masks.append(torch.cat([ones, mask], dim=1))
        elif left:
            parts.append(torch.cat([embeds.new_zeros(rows, pad, d), prompts, embeds], dim=1))
            masks.append(torch.cat([mask.new_zeros(rows, pad), ones, mask], dim=1))
        else:
            parts.append(torch.cat([prompts, embeds, embeds.new_zeros(rows, pad, d)], dim=1))
            masks.append(torch.cat([ones, mask, mask.new_zeros(rows, pad)], dim=1))
        if token_type_ids is not None:
            tt = _rows(token_type_ids, idx)
            before, after = (pad + m, 0) if left else (m, pad)
            types.append(torch.cat([tt.new_zeros(rows, before), tt, tt.new_zeros(rows, after)], dim=1))
    inverse = None
    if len(groups) > 1:
        order = torch.cat([idx for _, idx in groups])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
    x = PromptedInputs(parts[0], masks[0], types[0] if types else None, groups, inverse, attention_mask, lengths)
    if inverse is not None:
        x.inputs_embeds, x.attention_mask = x.ungroup(parts), x.ungroup(masks)
        x.token_type_ids = x.ungroup(types) if types else None
    return x


def _check_padded_width(model, lengths: dict[str, int], n: int) -> None:
    """In the right layout the backbone numbers every slot by its place, the padded ones after the
    text included: each row then takes the widest prompt's positions plus the batch's text width,
    which can exceed the backbone's positions although every adapter fits alone. Say so, by name."""
    limit = usable_positions(model.backbone)
    widest = max(lengths, key=lengths.get)
    m = lengths[widest]
    if limit is not None and m + n > limit:
        raise ValueError(
            f"adapter_names: a mixed batch pads every prompt to the widest, adapter {widest!r}'s {m} virtual "
            f"tokens; with the batch's {n} text positions that makes {m + n}, more than the backbone's {limit} "
            f"positions; truncate the texts to {limit - m} tokens or run the longer rows in a batch without {widest!r}"
        )


def _prefix_side(model, input_ids, attention_mask, groups, sides, offset_mask=None):
    """(prompt, E + D, mask, the folded adapter's stored prefix or None) for the shared-prefix path."""
    name = groups[0][0]
    mask = check_text_inputs(input_ids, attention_mask)
    (embeds,) = _text_embeds(model, input_ids, mask, groups, sides, offset_mask)
    method, prompt = model.adapters[name], sides[name][0]
    stored = getattr(method, "prefix", None)  # a folded adapter keeps its (constant) prompt's prefix
    return prompt, embeds, mask, None if stored is None else stored.get(model.backbone, prompt, embeds.dtype)


def prompted_forward(model, adapter_names, input_ids, attention_mask=None, labels=None, token_type_ids=None,
                     **kwargs):
    """PromptedModel.forward: each row through its adapter (`adapter_names`; None: the active adapter)."""
    if model.task_type == "classification":
        x = embed(model, input_ids, attention_mask, adapter_names, token_type_ids=token_type_ids)
        return _classify(model, x, labels, **kwargs)
    if model.task_type == "seq2seq":
        x = embed(model, input_ids, attention_mask, adapter_names)
        labels = None if labels is None else labels.contiguous()  # T5 views labels
        return model.backbone(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=labels, **kwargs)
    # causal: the offset goes to source tokens only (label -100), as in generation
    offset_mask = None if labels is None else labels.eq(-100)
    check_text_inputs(input_ids, attention_mask)
    groups = _groups(model, adapter_names, input_ids)
    sides = _sides(model, groups)
    if len(groups) == 1 and prefix_applies(model, model.configs[groups[0][0]], kwargs):
        prompt, embeds, mask, prefix = _prefix_side(model, input_ids, attention_mask, groups, sides, offset_mask)
        return causal_forward(model, prompt, embeds, mask, labels, prefix, **kwargs)
    x = embed(model, input_ids, attention_mask, offset_mask=offset_mask, left=True, groups=groups, sides=sides)
    if labels is not None:
        labels = torch.cat([labels.new_full((labels.shape[0], x.inputs_embeds.shape[1] - labels.shape[1]), -100),
                            labels], dim=1)
    # Positions from the mask, as `generate` computes them, so a left-padded row scores exactly as alone.
    return model.backbone(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                          position_ids=positions_from_mask(x.attention_mask), labels=labels, **kwargs)


def prompted_generate(model, adapter_names, input_ids, attention_mask=None, **kwargs):
    """PromptedModel.generate: the new tokens of each row, generated with its adapter's prompt in front."""
    check_text_inputs(input_ids, attention_mask)
    groups = _groups(model, adapter_names, input_ids)
    sides = _sides(model, groups)
    if len(groups) == 1 and generation_applies(model, model.configs[groups[0][0]], kwargs):
        prompt, embeds, mask, prefix = _prefix_side(model, input_ids, attention_mask, groups, sides)
        return generate_with_prefix(model, prompt, embeds, mask, prefix, **kwargs)
    x = embed(model, input_ids, attention_mask, left=model.task_type == "causal", groups=groups, sides=sides)
    return model.backbone.generate(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, **kwargs)


class _RowHeads(nn.Module):
    """Stands in for the backbone's head during a mixed forward: each group of rows through its own head."""

    def __init__(self, heads, x: PromptedInputs):
        super().__init__()
        object.__setattr__(self, "_heads", [(heads[name], idx) for name, idx in x.groups])
        object.__setattr__(self, "_x", x)

    def forward(self, hidden, *args, **kwargs):
        return self._x.ungroup([head(_rows(hidden, idx), *args, **kwargs) for head, idx in self._heads])


@contextlib.contextmanager
def _backbone_heads(model, x: PromptedInputs):
    """The backbone's own head slot holding each row's adapter head for the call (the active adapter's
    head sits there already, so a plain call changes nothing)."""
    if len(x.groups) == 1 and x.groups[0][0] == model.active_adapter:
        yield
        return
    name = x.groups[0][0]
    setattr(model.backbone, model.head_name, model.heads[name] if len(x.groups) == 1 else _RowHeads(model.heads, x))
    try:
        yield
    finally:
        setattr(model.backbone, model.head_name, model.heads[model.active_adapter])


def _positions(model, x: PromptedInputs):
    """Position ids where the backbone's own numbering is not the one wanted: decoders count real tokens,
    and text_positions='own' puts the text where it is without a prompt (the prompt keeps the first m)."""
    backbone = model.backbone
    positions = positions_from_mask(x.attention_mask) if hasattr(backbone, "score") else None
    own = [(name, idx) for name, idx in x.groups if model.configs[name].text_positions == "own"]
    if len(x.groups) == 1 and own:  # a fresh prompt then disturbs the frozen features far less
        return own_text_positions(backbone, x.text_attention_mask, x.prompt_lengths[own[0][0]])
    if own:
        batch, width, n = x.attention_mask.shape[0], x.inputs_embeds.shape[1], x.text_attention_mask.shape[1]
        if positions is None:  # what the backbone would number the other rows
            start = first_position(backbone)
            positions = torch.arange(start, start + width, device=x.attention_mask.device).expand(batch, -1)
        positions = positions.clone()
        for name, idx in own:
            m = x.prompt_lengths[name]
            positions[idx, :m + n] = own_text_positions(backbone, x.text_attention_mask[idx], m)
    return positions


def _classify(model, x: PromptedInputs, labels, **kwargs):
    backbone = model.backbone
    decoder = hasattr(backbone, "score")
    model_kwargs = dict(kwargs)
    if x.token_type_ids is not None:
        model_kwargs["token_type_ids"] = x.token_type_ids
    positions = _positions(model, x)
    if positions is not None:
        model_kwargs["position_ids"] = positions
    poolings = {name: model.configs[name].pooling for name, _ in x.groups}
    # Encoder heads with 'backbone' pooling read position 0 (the first virtual token) through the
    # backbone's own pooler, exactly as PEFT does: run the whole backbone with each row's head in place.
    through_backbone = {n for n, p in poolings.items() if p == "backbone" and not decoder}
    if len(through_backbone) == len(poolings) == 1:
        with _backbone_heads(model, x):
            return backbone(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=labels,
                            **model_kwargs)
    backbone_logits = None
    if through_backbone:
        others = len(through_backbone) < len(poolings)
        with _backbone_heads(model, x):
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
        pooled = pool(_rows(hidden, idx), _rows(x.attention_mask, idx), x.prompt_lengths[name], poolings[name])
        parts.append(apply_head(backbone, model.heads[name], pooled))
    logits = x.ungroup(parts)
    loss = None if labels is None else classification_loss(backbone.config, logits, labels)
    return SequenceClassifierOutput(loss=loss, logits=logits)

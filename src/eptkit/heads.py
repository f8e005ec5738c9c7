"""Classification heads on pooled hidden states, shared by `PromptedModel` and the linear probe.

A sequence classifier's head is trained beside the prompt (a copy of the backbone's own head, as
PEFT's `modules_to_save` does). When eptkit pools the hidden states itself (pooling 'mean' or
'text_first'), these helpers feed the pooled vectors to that head and compute the loss the way
transformers' classifiers do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_NAMES = ("classifier", "score")  # PEFT's default modules_to_save for sequence classification


def find_head_name(model: nn.Module) -> str:
    """The attribute holding a sequence classifier's head ('classifier' or 'score')."""
    name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    if name is None:
        raise TypeError(f"{type(model).__name__}: no classification head named one of {HEAD_NAMES}")
    return name


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states (batch x n x d) over the positions where mask (batch x n) is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, n_prompt: int, pooling: str) -> torch.Tensor:
    """The vector per row (batch x d) that reaches the head, from the hidden states of [prompt ; text]
    (batch x (n_prompt + n) x d) and their attention mask. pooling: 'mean' or 'text_first' (of the
    text's own tokens, prompt excluded) or 'backbone' (a decoder classifier's last real token)."""
    text_hidden, text_mask = hidden[:, n_prompt:], mask[:, n_prompt:]
    if pooling == "mean":
        return mean_pool(text_hidden, text_mask)
    if pooling == "text_first":
        first = text_mask.long().argmax(dim=1)  # first real token: left or right padding alike
        return text_hidden[torch.arange(len(first)), first]
    # backbone pooling of a decoder classifier: the last real token, as HF's head does
    last = mask.shape[1] - 1 - mask.long().flip(1).argmax(dim=1)
    return hidden[torch.arange(len(last)), last]


def apply_head(backbone: nn.Module, head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Logits of a classification head on pooled vectors (batch x d), for the poolings we compute."""
    if isinstance(head, nn.Linear):
        dropout = getattr(backbone, "dropout", None)
        return head(dropout(pooled) if isinstance(dropout, nn.Dropout) else pooled)
    # Heads that read a sequence's first position (RoBERTa's, DeBERTa's pooler + classifier).
    sequence = pooled.unsqueeze(1)
    pooler = getattr(backbone, "pooler", None)
    if pooler is not None and backbone.base_model is not backbone and pooler is not getattr(
        backbone.base_model, "pooler", None
    ):
        sequence = pooler(sequence).unsqueeze(1)
    return head(sequence)


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss transformers' classifiers use, chosen the same way from `config.problem_type`."""
    num_labels = logits.shape[-1]
    problem = getattr(config, "problem_type", None)
    if problem == "regression" or (problem is None and num_labels == 1):
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())

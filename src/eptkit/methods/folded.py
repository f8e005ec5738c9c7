"""A trained adapter's prompt side folded into constants (docs/method.md, "Folding"): what
`PromptedModel.fold_prompt` returns and a folded adapter file holds. Inference only."""

from __future__ import annotations

import torch
from torch import nn

from ..prefix import FoldedPrefix


class FoldedPrompt(nn.Module):
    """(P_out, D) as buffers: EPT's fusion and projection, DePT's A @ B cost nothing per step."""

    def __init__(self, prompt: torch.Tensor, offset: torch.Tensor | None):
        super().__init__()
        self.register_buffer("prompt_embeddings", prompt.detach().clone())
        self.register_buffer("offset", None if offset is None else offset.detach().clone())
        self.prefix = FoldedPrefix()  # decoder-only: the prompt's keys/values, kept between calls

    def forward(self):
        return self.prompt_embeddings, self.offset

    def param_groups(self):
        return {}


CompiledPrompt = FoldedPrompt  # the name before "fold" was the one word (eptkit <= 0.x code imports it)

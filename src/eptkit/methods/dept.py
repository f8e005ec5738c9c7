"""DePT (Shi & Lipani, 2024; docs/method.md, "DePT"): a short prompt plus a low-rank offset to the word embeddings.

The offset D = (alpha / sqrt(r)) * A @ B has one row per source position (offset_length rows); the
model adds row i to the embedding of the i-th real token of each text.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import DePTConfig
from ..embeddings import embedding_shape
from .prompt_tuning import init_prompt


class DePT(nn.Module):
    def __init__(self, config: DePTConfig, word_embeddings: nn.Embedding, init_token_ids=None):
        super().__init__()
        self.config = config
        d = embedding_shape(word_embeddings)[1]
        self.prompt_embeddings = nn.Parameter(init_prompt(config, word_embeddings, init_token_ids))
        # Names and initialisation as in DePT's code, so its checkpoints load unchanged: A is
        # kaiming-uniform and B zero, so the offset starts at exactly zero.
        self.lora_embedding_A = nn.Parameter(torch.empty(config.offset_length, config.rank))
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.rank, d))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))
        self.scaling = config.alpha / math.sqrt(config.rank)

    def offset(self) -> torch.Tensor:
        """D (offset_length x d)."""
        return self.scaling * (self.lora_embedding_A @ self.lora_embedding_B)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prompt_embeddings, self.offset()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.prompt_embeddings], "low_rank": [self.lora_embedding_A, self.lora_embedding_B]}

"""Prompt tuning (Lester et al., 2021; docs/method.md, "Prompt tuning"): a trainable prompt P (l x d) before the text."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import PromptTuningConfig
from ..embeddings import embedding_shape, read_embeddings


def init_prompt(config: PromptTuningConfig, word_embeddings: nn.Embedding, init_token_ids=None) -> torch.Tensor:
    """Initial prompt (prompt_length x d) in float32, built from the frozen vocabulary.

    `init_token_ids` are the token ids of `config.init_text` (only for init='text'); the caller
    tokenizes because only it knows the tokenizer. The vocabulary is read through
    `eptkit.embeddings.read_embeddings`, so a sharded matrix (FSDP2, DeepSpeed ZeRO-3) gives the
    prompt an unsharded one would.
    """
    vocab, _ = embedding_shape(word_embeddings)
    length = config.prompt_length
    if config.init in ("sample_vocab", None):  # None: decided without a tokenizer (PromptedModel decides)
        # Random rows of the vocabulary: prompt vectors start in the region of embedding space the
        # backbone was trained on, which is what makes high prompt learning rates stable.
        return read_embeddings(word_embeddings, torch.randint(0, vocab, (length,))).rows
    if config.init == "text":
        ids = list(init_token_ids or [])
        if not ids:
            raise ValueError("init_text: tokenized to no tokens; pass a tokenizer and a non-empty text")
        return read_embeddings(word_embeddings, (ids * math.ceil(length / len(ids)))[:length]).rows
    # "random"
    facts = read_embeddings(word_embeddings)
    return (torch.randn(length, facts.hidden_size) * facts.std).to(facts.rows.device)


class PromptTuning(nn.Module):
    """Holds P; `forward()` returns (prompt, offset=None) like every method."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding, init_token_ids=None):
        super().__init__()
        self.config = config
        self.prompt_embeddings = nn.Parameter(init_prompt(config, word_embeddings, init_token_ids))

    def forward(self) -> tuple[torch.Tensor, None]:
        return self.prompt_embeddings, None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.prompt_embeddings]}

"""EPT (Lan et al., AAAI 2025; docs/method.md, "EPT"): DePT's decomposition, prompt fusion, multi-space projection.

    P_s, D           = DePT's short prompt and offset               (decomposition)
    P_f              = P_s + g_f * softmax(P_s K^T / sqrt(d)) K     (fusion, K = [P_s ; D])
    P_out            = P_f + sum_k w[:, k] * P_f U_k V_k            (projection, w = softmax(gate(P_f)))

Every weight that touches the prompt starts at zero (g_f, V_k), so at initialisation EPT computes
exactly what DePT computes (EPTConfig(module_init="random") starts V_k non-zero instead). Nothing
here depends on the input text: the prompt side of a trained
adapter folds into two constant tensors (`PromptedModel.fold_prompt`; docs/method.md, "Folding").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EPTConfig
from ..embeddings import embedding_shape
from .dept import DePT


class PromptFusion(nn.Module):
    """The short prompt attends to the knowledge sources K = [P_s ; D] and adds what it reads through a gate."""

    def __init__(self, dim: int, rank: int = 0):
        super().__init__()
        # Per-channel gate, zero at start: the fused prompt begins as the plain short prompt.
        self.gate = nn.Parameter(torch.zeros(dim))
        self.query = nn.Linear(dim, rank, bias=False) if rank else None
        self.key = nn.Linear(dim, rank, bias=False) if rank else None

    def forward(self, prompt: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        knowledge = torch.cat([prompt, offset], dim=0)  # (m + s) x d
        query, key = (prompt, knowledge) if self.query is None else (self.query(prompt), self.key(knowledge))
        # softmax(Q K^T / sqrt(dim Q)) K in one fused kernel (its default scale is that sqrt).
        fused = F.scaled_dot_product_attention(query, key, knowledge)
        return prompt + self.gate * fused


class MultiSpaceProjection(nn.Module):
    """N low-rank maps X U_k V_k, mixed per prompt token by a softmax gate."""

    def __init__(self, dim: int, num_subspaces: int, rank: int, init: str = "zero"):
        super().__init__()
        self.U = nn.Parameter(torch.empty(num_subspaces, dim, rank))
        self.V = nn.Parameter(torch.zeros(num_subspaces, rank, dim))  # zero: no change at start
        # LoRA's A initialisation, one subspace at a time (fan-in = dim).
        nn.init.uniform_(self.U, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        if init == "random":  # active from the first step (and no longer DePT at initialisation)
            nn.init.uniform_(self.V, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        self.gate = nn.Linear(dim, num_subspaces)
        # A zero gate starts every token at uniform weights 1/N, so `eptkit info` can show what it learned.
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def gate_weights(self, prompt: torch.Tensor) -> torch.Tensor:
        """w (m x N): each prompt token's weights over the subspaces."""
        return torch.softmax(self.gate(prompt), dim=-1)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        # sum_k w[:, k] * (P U_k) V_k as two matmuls over the N subspaces side by side: the gate
        # weights scale each subspace's p columns of P [U_1 .. U_N] before [V_1 ; .. ; V_N], so no
        # m x N x d tensor is built and the step runs a handful of kernels.
        num, dim, rank = self.U.shape
        low = prompt @ self.U.permute(1, 0, 2).reshape(dim, num * rank)  # m x (N p)
        weights = self.gate_weights(prompt).repeat_interleave(rank, dim=1)  # m x (N p)
        return prompt + (low * weights) @ self.V.reshape(num * rank, dim)


class EPT(DePT):
    def __init__(self, config: EPTConfig, word_embeddings: nn.Embedding, init_token_ids=None):
        super().__init__(config, word_embeddings, init_token_ids)
        d = embedding_shape(word_embeddings)[1]
        self.fusion = PromptFusion(d, config.fusion_rank) if config.fusion else None
        self.projection = (
            MultiSpaceProjection(d, config.num_subspaces, config.subspace_rank, config.module_init)
            if config.num_subspaces else None
        )

    def fused_prompt(self, offset: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embeddings
        return self.fusion(prompt, offset) if self.fusion is not None else prompt

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        offset = self.offset()
        prompt = self.fused_prompt(offset)
        if self.projection is not None:
            prompt = self.projection(prompt)
        return prompt, offset

    @torch.no_grad()
    def gate_weights(self) -> torch.Tensor | None:
        """The subspace weights (m x N) each prompt token uses now; None without projection."""
        if self.projection is None:
            return None
        return self.projection.gate_weights(self.fused_prompt(self.offset()))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        modules = [m for m in (self.fusion, self.projection) if m is not None]
        groups["ept"] = [p for m in modules for p in m.parameters()]
        return groups

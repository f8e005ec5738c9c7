"""DePT's and EPT's offset applied to a text: row i of D added to the embedding of its i-th real token
(docs/method.md, "DePT"). A folded adapter of either applies its constant D the same way."""

from __future__ import annotations

from torch import nn


def add_offset(embeds, attention_mask, offset, offset_mask=None):
    """E + D: row i of the offset D added to the i-th real token of each text (counted with the
    attention mask, so any padding gives the same result); `offset_mask` limits it to some tokens."""
    real = attention_mask.bool() if offset_mask is None else attention_mask.bool() & offset_mask
    positions = attention_mask.long().cumsum(dim=1) - 1
    # Only a padded width beyond the offset's length can hold a too-late token; checking the width
    # first spares the GPU a host sync on every step.
    too_long = real & (positions >= offset.shape[0]) if embeds.shape[1] > offset.shape[0] else None
    if too_long is not None and too_long.any():
        row = int(too_long.any(dim=1).nonzero()[0])
        length = int(real[row].sum())
        raise ValueError(
            f"input row {row} has {length} tokens, more than offset_length={offset.shape[0]} that this "
            "adapter's offset covers; truncate the text or use an adapter with a larger offset_length"
        )
    # F.embedding, not offset[positions]: the backward of advanced indexing is index_put_ with
    # accumulate=True, which on CPU adds rows with parallel atomic float adds (the sum's order, and so
    # its last bits, varied from run to run with 2+ threads). Embedding's backward sums each offset
    # row's gradient in token order, whatever the threads (docs/reproducibility.md).
    rows = nn.functional.embedding(positions.clamp(0, offset.shape[0] - 1), offset)  # batch x n x d
    return embeds + (rows * real.unsqueeze(-1)).to(embeds.dtype)

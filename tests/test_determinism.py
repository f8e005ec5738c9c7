"""Same seed, same thread count: the same gradients, bit for bit (docs/reproducibility.md)."""

import torch
from transformers import BertConfig, BertForSequenceClassification

from eptkit import DePTConfig, get_prompted_model


HIDDEN = 384  # wide rows: enough parallel work for the atomic adds to race


def _offset_grad(model, ids, mask, upstream):
    model.adapters["default"].zero_grad(set_to_none=True)
    embeds, _ = model._embed(ids, mask)
    (embeds * upstream).sum().backward()
    return model.adapters["default"].lora_embedding_B.grad.clone(), model.adapters["default"].lora_embedding_A


def test_offset_gradient_is_bitwise_repeatable_and_summed_in_token_order():
    # The offset rows were gathered with offset[positions], whose backward (index_put_ with
    # accumulate=True) adds on CPU with parallel atomic float adds: with 2 threads the gradient's last
    # bits changed from call to call, and Adam turned that into diverging runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        torch.manual_seed(0)
        backbone = BertForSequenceClassification(BertConfig(
            vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=128, num_labels=2))
        model = get_prompted_model(backbone, DePTConfig(prompt_length=4, offset_length=100, rank=4))
        with torch.no_grad():
            model.adapters["default"].lora_embedding_B.normal_()
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(3, 100, (32, 100), generator=g)
        mask = torch.ones_like(ids)
        mask[16:, 70:] = 0  # right padding: rows 16.. have 70 real tokens
        upstream = torch.randn(32, 104, HIDDEN, generator=g)
        first, A = _offset_grad(model, ids, mask, upstream)
        for _ in range(20):
            again, _ = _offset_grad(model, ids, mask, upstream)
            assert torch.equal(first, again)
        # Independent computation: the offset's gradient, summed row by row in token order.
        text_grad = upstream[:, 4:]
        positions = (mask.cumsum(1) - 1).clamp(0, 99)
        grad_offset = torch.zeros(100, HIDDEN)
        for b in range(32):
            for t in range(100):
                if mask[b, t]:
                    grad_offset[positions[b, t]] += text_grad[b, t]
        scaling = model.adapters["default"].scaling
        expected = scaling * (A.detach().T @ grad_offset)
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)

"""The three methods against their formulas, written out here independently of the library."""

import math

import pytest
import torch
from torch import nn

from eptkit import DePTConfig, EPTConfig, PromptTuningConfig
from eptkit.methods import DePT, EPT, PromptTuning

D = 16


def embeddings(seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(50, D)


def test_prompt_init_sample_vocab_takes_vocabulary_rows():
    emb = embeddings()
    prompt, offset = PromptTuning(PromptTuningConfig(prompt_length=6), emb)()
    assert offset is None and prompt.shape == (6, D)
    for row in prompt:
        assert (emb.weight == row).all(dim=1).any()


def test_prompt_init_text_repeats_token_embeddings():
    emb = embeddings()
    prompt, _ = PromptTuning(PromptTuningConfig(prompt_length=5, init="text", init_text="x"), emb, [3, 7])()
    expected = emb.weight[[3, 7, 3, 7, 3]]
    assert torch.equal(prompt, expected)


def test_prompt_init_random_matches_vocabulary_scale():
    emb = embeddings()
    torch.manual_seed(1)
    prompt, _ = PromptTuning(PromptTuningConfig(prompt_length=2000, init="random"), emb)()
    assert abs(prompt.std().item() - emb.weight.std().item()) < 0.05


def test_dept_offset_formula():
    method = DePT(DePTConfig(prompt_length=4, rank=3, offset_length=10, alpha=8.0), embeddings())
    with torch.no_grad():
        method.lora_embedding_B.normal_()
    A, B = method.lora_embedding_A, method.lora_embedding_B
    expected = torch.zeros(10, D)
    for i in range(10):
        for j in range(D):
            expected[i, j] = 8.0 / math.sqrt(3) * sum(A[i, k] * B[k, j] for k in range(3))
    prompt, offset = method()
    assert torch.allclose(offset, expected, atol=1e-5)
    assert prompt.shape == (4, D)


def test_dept_starts_with_zero_offset_and_kaiming_A():
    method = DePT(DePTConfig(prompt_length=4, rank=3, offset_length=10), embeddings())
    assert torch.count_nonzero(method.offset()) == 0
    bound = 1 / math.sqrt(3)  # kaiming_uniform(a=sqrt(5)) on a (10 x 3) tensor: fan_in = 3
    assert method.lora_embedding_A.abs().max() <= bound and method.lora_embedding_A.std() > 0.1 * bound


def _ept_and_dept(**kwargs):
    config = EPTConfig(prompt_length=4, rank=3, offset_length=10, **kwargs)
    ept = EPT(config, embeddings())
    dept = DePT(DePTConfig(prompt_length=4, rank=3, offset_length=10), embeddings())
    dept.load_state_dict({k: v for k, v in ept.state_dict().items() if k in dept.state_dict()})
    return ept, dept


def test_ept_at_init_equals_dept():
    for kwargs in ({}, {"fusion_rank": 4}, {"fusion": False}, {"num_subspaces": 0}):
        ept, dept = _ept_and_dept(**kwargs)
        with torch.no_grad():  # a trained B: the offset is non-zero, EPT must still match at init
            ept.lora_embedding_B.normal_()
            dept.lora_embedding_B.copy_(ept.lora_embedding_B)
        for a, b in zip(ept(), dept()):
            assert torch.equal(a, b)


def test_ept_formula_with_nonzero_weights():
    ept, _ = _ept_and_dept(num_subspaces=3, subspace_rank=2)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ept.parameters():
            p.normal_(std=0.3)
    prompt_s, A, B = ept.prompt_embeddings, ept.lora_embedding_A, ept.lora_embedding_B
    offset = 8.0 / math.sqrt(3) * A @ B
    knowledge = torch.cat([prompt_s, offset])
    attn = torch.softmax(prompt_s @ knowledge.T / math.sqrt(D), dim=-1)
    fused = prompt_s + ept.fusion.gate * (attn @ knowledge)
    w = torch.softmax(fused @ ept.projection.gate.weight.T + ept.projection.gate.bias, dim=-1)
    out = fused.clone()
    for k in range(3):
        out = out + w[:, k : k + 1] * (fused @ ept.projection.U[k] @ ept.projection.V[k])
    prompt, got_offset = ept()
    assert torch.allclose(got_offset, offset, atol=1e-5)
    assert torch.allclose(prompt, out, atol=1e-5)
    assert torch.allclose(ept.gate_weights(), w, atol=1e-6)


def test_ept_fusion_with_query_and_key_maps_formula():
    ept, _ = _ept_and_dept(num_subspaces=0, fusion_rank=3)
    torch.manual_seed(6)
    with torch.no_grad():
        for p in ept.parameters():
            p.normal_(std=0.3)
    prompt_s, offset = ept.prompt_embeddings, ept.offset()
    knowledge = torch.cat([prompt_s, offset])
    q, k = prompt_s @ ept.fusion.query.weight.T, knowledge @ ept.fusion.key.weight.T
    expected = prompt_s + ept.fusion.gate * (torch.softmax(q @ k.T / math.sqrt(3), dim=-1) @ knowledge)
    assert torch.allclose(ept()[0], expected, atol=1e-5)


def test_gradients_reach_every_ept_part():
    ept, _ = _ept_and_dept(fusion_rank=4)
    # At initialisation the zero-initialised gates receive gradient (so training can open them)...
    prompt, offset = ept()
    (prompt.pow(2).sum() + offset.pow(2).sum()).backward()
    assert ept.fusion.gate.grad.abs().sum() > 0
    assert ept.projection.V.grad.abs().sum() > 0
    # ...and once they are open, every parameter does.
    ept.zero_grad()
    with torch.no_grad():
        ept.fusion.gate.fill_(0.5)
        ept.projection.V.normal_()
        ept.lora_embedding_B.normal_()
        ept.projection.gate.weight.normal_()
    prompt, offset = ept()
    (prompt.pow(2).sum() + offset.pow(2).sum()).backward()
    for name, p in ept.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_random_module_init_makes_every_projection_weight_learn_from_the_first_step():
    ept, dept = _ept_and_dept(module_init="random")
    bound = 1 / math.sqrt(D)
    assert ept.projection.V.abs().max() <= bound and ept.projection.V.abs().min() < bound / 10
    assert float(ept.projection.V.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.15)  # uniform(-b, b): std b/sqrt(3)
    prompt, _ = ept()
    assert not torch.equal(prompt, dept()[0])  # no longer DePT at initialisation
    (prompt.pow(2).sum()).backward()
    assert ept.projection.U.grad.abs().sum() > 0  # with V = 0, U's first gradient is exactly zero
    zero, _ = _ept_and_dept()
    zero()[0].pow(2).sum().backward()
    assert zero.projection.U.grad.abs().sum() == 0


def test_gate_weights_start_uniform():
    ept, _ = _ept_and_dept(num_subspaces=4)
    assert torch.allclose(ept.gate_weights(), torch.full((4, 4), 0.25))


def test_param_groups_cover_all_parameters_once():
    ept, _ = _ept_and_dept()
    groups = ept.param_groups()
    assert set(groups) == {"prompt", "low_rank", "ept"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in ept.parameters())

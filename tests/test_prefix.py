"""The shared key/value prefix of decoder-only models (eptkit.prefix) against the plain path, which
runs [prompt ; text] through the backbone for every row: equal logits, losses, gradients and tokens."""

import dataclasses

import pytest
import torch

from eptkit import DePTConfig, EPTConfig, PromptTuningConfig, get_prompted_model
from conftest import tiny_gpt2, tiny_llama

CONFIGS = {
    "pt": PromptTuningConfig(prompt_length=4),
    "dept": DePTConfig(prompt_length=4, rank=2, offset_length=16),
    "ept": EPTConfig(prompt_length=4, rank=2, offset_length=16, num_subspaces=2, subspace_rank=2, fusion_rank=2,
                     module_init="random"),
}


def _model(make_model, method):
    model = get_prompted_model(make_model(), CONFIGS[method])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every adapter weight away from its (partly zero) start
        for p in model.method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(random_ids, side):
    ids = random_ids(4, 9)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5]):
        if pad:
            mask[row, :pad] = 0 if side == "left" else 1
            if side == "right":
                mask[row, 9 - pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # source then target: the offset goes to source tokens only
    return ids, mask, labels


def _run(model, shared, **inputs):
    model.configs[model.active_adapter].shared_prefix = shared
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.method.named_parameters()}
    return out, grads


def _block_inputs(model):
    """Shapes (batch, length) the first decoder block receives, recorded by a hook."""
    shapes = []
    layers = model.backbone.base_model.layers if hasattr(model.backbone.base_model, "layers") \
        else model.backbone.base_model.h
    hook = layers[0].register_forward_pre_hook(lambda mod, args, kwargs: shapes.append(
        tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])), with_kwargs=True)
    return shapes, hook


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("method", ["pt", "dept", "ept"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_loss_and_gradients_equal_the_plain_path(make_model, method, side, random_ids):
    model = _model(make_model, method)
    ids, mask, labels = _batch(random_ids, side)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    shapes, hook = _block_inputs(model)
    shared, shared_grads = _run(model, True, **inputs)
    hook.remove()
    plain, plain_grads = _run(model, False, **inputs)
    # The prefix went through the decoder once (batch 1, l - 1 tokens), then every row's last
    # virtual token and text.
    assert shapes == [(1, 3), (4, 1 + 9)]
    assert shared.logits.shape == (4, 9, model.backbone.config.vocab_size)
    real = mask.bool()  # padded positions' logits are not defined by either path
    assert torch.allclose(shared.logits[real], plain.logits[:, 4:][real], atol=1e-5)
    assert torch.allclose(shared.loss, plain.loss, atol=1e-6)
    assert set(shared_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(shared_grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("method", ["pt", "dept", "ept"])
def test_greedy_generation_equals_the_plain_path(make_model, method, random_ids):
    model = _model(make_model, method).eval()
    ids, mask, _ = _batch(random_ids, "left")
    model.configs["default"].shared_prefix = False
    plain = model.generate(ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.configs["default"].shared_prefix = True
    shapes, hook = _block_inputs(model)
    shared = model.generate(ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    hook.remove()
    assert shapes[:2] == [(1, 3), (4, 1 + 9)]  # prefix once, then the rest of the input: the prefix was used
    assert shared.tolist() == plain.tolist()


def test_compiled_adapter_keeps_its_prefix_and_recomputes_it_when_written(random_ids):
    model = _model(tiny_llama, "ept").eval()
    compiled = model.fold_prompt()
    ids, mask, labels = _batch(random_ids, "left")
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    real = mask.bool()
    with torch.no_grad():
        expected = model(**inputs)
        shapes, hook = _block_inputs(compiled)
        first, second = compiled(**inputs), compiled(**inputs)
        hook.remove()
        assert shapes == [(1, 3), (4, 10), (4, 10)]  # the prefix computed for the first call only
        assert torch.allclose(first.logits[real], expected.logits[real], atol=1e-5)
        assert torch.equal(second.logits, first.logits)
        compiled.method.prompt_embeddings.mul_(2)  # a new prompt: the stored prefix is stale
        got = compiled(**inputs)
        compiled.configs["default"] = dataclasses.replace(compiled.config, shared_prefix=False)
        plain = compiled(**inputs)
    assert torch.allclose(got.logits[real], plain.logits[:, 4:][real], atol=1e-5)
    assert not torch.allclose(got.logits[real], first.logits[real], atol=1e-3)


def test_falls_back_to_the_plain_path_while_dropout_is_active(random_ids):
    model = get_prompted_model(tiny_gpt2(), CONFIGS["pt"])  # GPT-2's default dropout is 0.1
    ids, mask, labels = _batch(random_ids, "left")
    shapes, hook = _block_inputs(model)
    model.train()(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    hook.remove()
    assert shapes == [(4, 4 + 9), (1, 3), (4, 1 + 9)]


def test_mixed_batches_take_the_plain_path(random_ids):
    model = _model(tiny_llama, "pt").eval()
    model.add_adapter("other", CONFIGS["dept"])
    ids, mask, _ = _batch(random_ids, "left")
    shapes, hook = _block_inputs(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "other", "other", "default"])
    hook.remove()
    assert shapes == [(4, 4 + 9)]  # rows of different adapters share no prefix (tests/test_mixed.py: rows
    # equal their adapter alone, which takes the shared prefix)


def test_logits_to_keep_returns_the_plain_paths_last_logits(random_ids):
    model = _model(tiny_llama, "ept").eval()
    ids, mask, _ = _batch(random_ids, "left")
    with torch.no_grad():
        shared = model(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits
        model.configs["default"].shared_prefix = False
        plain = model(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits
    assert shared.shape == plain.shape == (4, 2, model.backbone.config.vocab_size)
    assert torch.allclose(shared, plain, atol=1e-5)

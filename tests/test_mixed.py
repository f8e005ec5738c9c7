"""Mixed-adapter batches: every row's output equals what its adapter gives for that row alone (<= 1e-5)."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from eptkit import DePTConfig, EPTConfig, PromptTuningConfig, get_prompted_model, load_adapter, save_adapter
from eptkit.model import CompiledPrompt
from conftest import (minilm_path, tiny_bert, tiny_gpt2, tiny_llama, tiny_llama_classifier, tiny_roberta,
                      tiny_t5)

TOL = 1e-5


def _randomize(prompted, name, seed):
    """Non-trivial adapter weights (offsets, EPT modules and heads all away from their zero starts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompted.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if prompted.heads:
            for p in prompted.heads[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _four_adapters(backbone, pooling=None, second_pooling=None, dept_positions="after_prompt"):
    """PT, DePT and EPT with different prompt lengths and ranks, and EPT compiled, on one backbone."""
    model = get_prompted_model(backbone, PromptTuningConfig(prompt_length=3, pooling=pooling), adapter_name="pt")
    model.add_adapter("dept", DePTConfig(prompt_length=5, rank=2, offset_length=16, pooling=second_pooling or pooling,
                                         text_positions=dept_positions))
    model.add_adapter("ept", EPTConfig(prompt_length=2, rank=3, offset_length=16, num_subspaces=2, subspace_rank=2,
                                       fusion_rank=2, module_init="random", pooling=pooling))
    for seed, name in enumerate(("pt", "dept", "ept")):
        _randomize(model, name, seed)
    model.set_adapter("ept")
    prompt, offset = model.prompt_and_offset()
    model.add_adapter("compiled", model.config, method=CompiledPrompt(prompt, offset))
    if model.heads:
        model.heads["compiled"].load_state_dict(model.heads["ept"].state_dict())
    model.set_adapter("pt")
    return model.eval()


NAMES = ["dept", "pt", "compiled", "ept", "pt", "dept"]


def _batch(random_ids, left=False, batch=6, length=9):
    ids = random_ids(batch, length)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 2, 4, 1, 3, 0][:batch]):
        if n_pad:
            if left:
                mask[row, :n_pad] = 0
            else:
                mask[row, length - n_pad:] = 0
    return ids, mask


def _alone(model, name, **row_inputs):
    model.set_adapter(name)
    try:
        return model(**row_inputs)
    finally:
        model.set_adapter("pt")


def _rows(inputs, row):
    return {k: v[row:row + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("make_model,pooling,second", [
    (tiny_bert, None, None), (tiny_bert, "backbone", None), (tiny_bert, "text_first", "backbone"),
    (tiny_roberta, "backbone", "mean"), (tiny_llama_classifier, None, None),
])
def test_classification_rows_match_their_adapter_alone(make_model, pooling, second, random_ids):
    # DePT's text keeps its own positions (text_positions='own') while the others follow their prompts.
    model = _four_adapters(make_model(), pooling, second, dept_positions="own")
    ids, mask = _batch(random_ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if make_model is tiny_bert:
        inputs["token_type_ids"] = (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids).contiguous()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    mixed = model(**inputs, labels=labels, adapter_names=NAMES)
    losses = []
    for row, name in enumerate(NAMES):
        alone = _alone(model, name, **_rows(inputs, row), labels=labels[row:row + 1])
        assert torch.allclose(mixed.logits[row], alone.logits[0], atol=TOL), (row, name)
        losses.append(alone.loss)
    assert torch.allclose(mixed.loss, torch.stack(losses).mean(), atol=TOL)
    # The compiled EPT adapter answers exactly as EPT on the same row.
    ept = model(**inputs, adapter_names=["ept"] * 6).logits
    assert torch.allclose(mixed.logits[2], ept[2], atol=TOL)


def test_mixed_batch_gradients_reach_each_rows_adapter_only(random_ids):
    model = _four_adapters(tiny_bert())
    ids, mask = _batch(random_ids, batch=2)
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]), adapter_names=["dept", "dept"]).loss.backward()
    assert model.adapters["dept"].lora_embedding_B.grad is not None and model.heads["dept"].weight.grad is not None
    assert model.adapters["pt"].prompt_embeddings.grad is None and model.heads["pt"].weight.grad is None


def test_t5_rows_match_their_adapter_alone_forward_and_generate(random_ids):
    model = _four_adapters(tiny_t5())
    ids, mask = _batch(random_ids)
    labels = random_ids(6, 3)
    labels[1, 2:] = -100
    inputs = {"input_ids": ids, "attention_mask": mask}
    mixed = model(**inputs, labels=labels, adapter_names=NAMES)
    generated = model.generate(ids, mask, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
    for row, name in enumerate(NAMES):
        alone = _alone(model, name, **_rows(inputs, row), labels=labels[row:row + 1])
        assert torch.allclose(mixed.logits[row], alone.logits[0], atol=TOL), (row, name)
        model.set_adapter(name)
        one = model.generate(ids[row:row + 1], mask[row:row + 1], max_new_tokens=4, do_sample=False)
        assert generated[row, :one.shape[1]].tolist() == one[0].tolist(), (row, name)
    model.set_adapter("pt")


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
def test_causal_rows_match_their_adapter_alone_forward_and_generate(make_model, random_ids):
    model = _four_adapters(make_model())
    ids, mask = _batch(random_ids, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a source of 5 tokens, then the target (source tokens get the offset)
    inputs = {"input_ids": ids, "attention_mask": mask}
    mixed = model(**inputs, labels=labels, adapter_names=NAMES)
    generated = model.generate(ids, mask, adapter_names=NAMES, max_new_tokens=5, do_sample=False)
    for row, name in enumerate(NAMES):
        alone = _alone(model, name, **_rows(inputs, row), labels=labels[row:row + 1])
        n = alone.logits.shape[1]  # [prompt ; text] of this adapter; the mixed row is left-padded wider
        assert torch.allclose(mixed.logits[row, -n:], alone.logits[0], atol=TOL), (row, name)
        model.set_adapter(name)
        one = model.generate(ids[row:row + 1], mask[row:row + 1], max_new_tokens=5, do_sample=False)
        assert generated[row].tolist() == one[0].tolist(), (row, name)
    model.set_adapter("pt")


def test_without_adapter_names_the_active_adapter_is_used(random_ids):
    model = _four_adapters(tiny_bert())
    ids, mask = _batch(random_ids)
    model.set_adapter("dept")
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(plain, model(input_ids=ids, attention_mask=mask, adapter_names=["dept"] * 6).logits, atol=TOL)
    assert model.active_adapter == "dept"


def test_unknown_or_miscounted_adapter_names_are_clear_errors(random_ids):
    model = _four_adapters(tiny_bert())
    ids, mask = _batch(random_ids, batch=2)
    with pytest.raises(ValueError, match="no adapter named 'nope' is loaded"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["pt", "nope"])
    with pytest.raises(ValueError, match="1 name.* for a batch of 2"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["pt"])
    with pytest.raises(ValueError, match="one name per row"):
        model(input_ids=ids, attention_mask=mask, adapter_names="pt")
    t5 = _four_adapters(tiny_t5())
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        t5.generate(ids, mask, adapter_names=["x", "pt"], max_new_tokens=2)


def test_bundled_minilm_two_saved_adapters_answer_one_mixed_batch(tmp_path):
    from transformers import AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sources = {}
    for seed, (name, config) in enumerate([("sentiment", EPTConfig(prompt_length=4, rank=2, offset_length=32)),
                                           ("topic", PromptTuningConfig(prompt_length=8))]):
        torch.manual_seed(seed)
        prompted = get_prompted_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), config)
        _randomize(prompted, "default", seed)
        save_adapter(prompted, tmp_path / name, compiled=name == "sentiment")
        sources[name] = prompted.eval()
    backbone = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = load_adapter(backbone, tmp_path / "sentiment", adapter_name="sentiment")
    load_adapter(model, tmp_path / "topic", adapter_name="topic")
    assert model.active_adapter == "sentiment" and sorted(model.adapters) == ["sentiment", "topic"]
    texts = ["a great film", "stocks fell sharply on monday", "dull and far too long"]
    names = ["sentiment", "topic", "sentiment"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch, adapter_names=names).logits
        for row, name in enumerate(names):
            one = tokenizer(texts[row], return_tensors="pt")
            assert torch.allclose(logits[row], sources[name](**one).logits[0], atol=TOL), (row, name)


def test_a_mixed_batch_wider_than_the_positions_names_the_widest_adapter(random_ids):
    # tiny BERT: 128 positions. "short" (4 virtual tokens) has a 100-token row, "wide" (40) a 10-token
    # one: alone they take 104 and 50 positions, but the batch pads "wide"'s prompt over 100 text slots.
    model = get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=4), adapter_name="short")
    model.add_adapter("wide", PromptTuningConfig(prompt_length=40))
    model.eval()
    for n, fits in ((100, False), (88, True)):
        ids = random_ids(2, n)
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        if fits:  # 40 + 88 = 128: the batch runs, each row as its adapter gives it alone
            logits = model(input_ids=ids, attention_mask=mask, adapter_names=["short", "wide"]).logits
            for row, name in enumerate(("short", "wide")):
                model.set_adapter(name)
                alone = model(input_ids=ids[row:row + 1, :mask[row].sum()]).logits
                torch.testing.assert_close(logits[row:row + 1], alone, atol=TOL, rtol=0)
            continue
        with pytest.raises(ValueError, match=r"adapter 'wide''s 40 virtual tokens; with the batch's 100 text "
                                             r"positions that makes 140, more than the backbone's 128 positions"):
            model(input_ids=ids, attention_mask=mask, adapter_names=["short", "wide"])

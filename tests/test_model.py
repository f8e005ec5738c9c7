"""PromptedModel on every task type, against PEFT's own prompt tuning and hand computations."""

import pytest
import torch
from peft import PromptTuningConfig as PeftPromptTuningConfig
from peft import TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from eptkit import DePTConfig, EPTConfig, PromptTuningConfig, get_prompted_model
from conftest import (minilm_path, tiny_bert, tiny_gpt2, tiny_llama, tiny_llama_classifier,
                      tiny_roberta, tiny_t5)

L = 5


def _peft_and_ours(make_model, task_type, pooling=None):
    """PEFT's prompt tuning and ours on two identical backbones, with the same prompt weights."""
    peft_model = get_peft_model(make_model(), PeftPromptTuningConfig(task_type=task_type, num_virtual_tokens=L))
    # PEFT's layout: the text after the prompt (eptkit's default for encoder classifiers keeps its own positions).
    ours = get_prompted_model(make_model(), PromptTuningConfig(prompt_length=L, pooling=pooling,
                                                               text_positions="after_prompt"))
    with torch.no_grad():
        ours.method.prompt_embeddings.copy_(peft_model.prompt_encoder["default"].embedding.weight[:L])
    return peft_model.eval(), ours.eval()


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_roberta, tiny_llama_classifier])
def test_classification_matches_peft(make_model, random_ids):
    peft_model, ours = _peft_and_ours(make_model, TaskType.SEQ_CLS, pooling="backbone")
    ids = random_ids(3, 9)
    labels = torch.tensor([0, 1, 1])
    ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    got = ours(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert torch.allclose(got.logits, ref.logits, atol=1e-5)
    assert torch.allclose(got.loss, ref.loss, atol=1e-5)


def test_seq2seq_matches_peft(random_ids):
    peft_model, ours = _peft_and_ours(tiny_t5, TaskType.SEQ_2_SEQ_LM)
    ids, labels = random_ids(2, 8), random_ids(2, 3)
    ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    got = ours(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert torch.allclose(got.logits, ref.logits, atol=1e-5)
    assert torch.allclose(got.loss, ref.loss, atol=1e-5)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_causal_matches_peft(make_model, shared_prefix, random_ids):
    peft_model, ours = _peft_and_ours(make_model, TaskType.CAUSAL_LM)
    ours.configs["default"].shared_prefix = shared_prefix
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[:, :4] = -100
    ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    got = ours(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    # The shared prefix returns the text's logits only; the plain path, PEFT's [prompt ; text].
    assert got.logits.shape[1] == (8 if shared_prefix else L + 8)
    assert torch.allclose(got.logits, ref.logits[:, -got.logits.shape[1]:], atol=1e-5)
    assert torch.allclose(got.loss, ref.loss, atol=1e-5)


def _trained_dept(model, config_cls=DePTConfig, **kw):
    prompted = get_prompted_model(model, config_cls(prompt_length=3, rank=2, offset_length=12, **kw))
    with torch.no_grad():
        prompted.method.lora_embedding_B.normal_()
    return prompted.eval()


def test_dept_input_is_prompt_then_embeddings_plus_offset_rows(random_ids):
    prompted = _trained_dept(tiny_t5())
    ids = random_ids(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    inputs_embeds, full_mask = prompted._embed(ids, mask)
    m = prompted.method
    P, D = m.prompt_embeddings, m.scaling * m.lora_embedding_A @ m.lora_embedding_B
    E = prompted.word_embeddings(ids)
    for b in range(2):
        assert torch.allclose(inputs_embeds[b, :3], P)
        for i in range(6):
            expected = E[b, i] + (D[i] if mask[b, i] else 0)
            assert torch.allclose(inputs_embeds[b, 3 + i], expected, atol=1e-6)
    assert full_mask.tolist() == [[1] * 9, [1] * 7 + [0, 0]]
    # The seq2seq forward is the backbone on exactly these encoder inputs.
    labels = random_ids(2, 2)
    ref = prompted.backbone(inputs_embeds=inputs_embeds, attention_mask=full_mask, labels=labels)
    assert torch.allclose(prompted(input_ids=ids, attention_mask=mask, labels=labels).loss, ref.loss)


def test_offset_rows_count_from_first_real_token_left_or_right_padded(random_ids):
    prompted = _trained_dept(tiny_gpt2())
    ids = random_ids(1, 4)
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    r_emb, _ = prompted._embed(right, torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    l_emb, _ = prompted._embed(left, torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    assert torch.allclose(r_emb[:, 3:7], l_emb[:, 6:10])
    alone, _ = prompted._embed(ids, None)
    assert torch.allclose(alone[:, 3:], r_emb[:, 3:7])


def test_input_longer_than_the_offset_is_a_clear_error(random_ids):
    prompted = _trained_dept(tiny_bert())
    with pytest.raises(ValueError, match="offset_length=12"):
        prompted(input_ids=random_ids(1, 13))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 12:] = 0  # padded beyond offset_length is fine: only real tokens count
    prompted(input_ids=random_ids(1, 16), attention_mask=mask)


def test_causal_offset_goes_to_source_tokens_only(random_ids):
    prompted = _trained_dept(tiny_gpt2())
    ids = random_ids(1, 6)
    labels = ids.clone()
    labels[:, :4] = -100
    captured = {}
    hook = prompted.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.update(kwargs), with_kwargs=True)
    prompted(input_ids=ids, labels=labels)
    hook.remove()
    E = prompted.word_embeddings(ids)[0]
    D = prompted.method.offset()
    got = captured["inputs_embeds"][0, -6:]  # the text follows the (whole or last) virtual token(s)
    assert torch.allclose(got[:4], E[:4] + D[:4], atol=1e-6)
    assert torch.allclose(got[4:], E[4:])
    assert set(captured["labels"][0, :-6].tolist()) == {-100}


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("config_cls", [PromptTuningConfig, EPTConfig])
def test_left_padded_batch_generates_what_each_row_generates_alone(make_model, config_cls):
    kw = {"prompt_length": 3} if config_cls is PromptTuningConfig else {"prompt_length": 3, "rank": 2, "offset_length": 12}
    prompted = get_prompted_model(make_model(), config_cls(**kw)).eval()
    if config_cls is EPTConfig:
        with torch.no_grad():
            prompted.method.lora_embedding_B.normal_()
            prompted.method.fusion.gate.fill_(0.5)
    rows = [torch.tensor([5, 17, 33, 9, 41]), torch.tensor([7, 8]), torch.tensor([60, 61, 62])]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones_like(r)]) for r in rows])
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    batch = prompted.generate(ids, attention_mask=mask, **gen)
    for b, row in enumerate(rows):
        alone = prompted.generate(row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **gen)
        assert batch.sequences[b].tolist() == alone.sequences[0].tolist()
        for s_batch, s_alone in zip(batch.scores, alone.scores):
            assert torch.allclose(s_batch[b], s_alone[0], atol=1e-4)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_generate_uses_the_cache_and_matches_forward(shared_prefix, random_ids):
    prompted = _trained_dept(tiny_gpt2(), EPTConfig, shared_prefix=shared_prefix)
    ids = random_ids(1, 5)
    lengths = []
    block = prompted.backbone.transformer.h[0]
    hook = block.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    out = prompted.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True, output_scores=True, use_cache=True)
    hook.remove()
    # With the key/value cache, only the first step sees the whole input; later steps see one token. The
    # shared prefix runs the first 2 of the 3 virtual tokens once, then the last one with the text.
    assert lengths == ([2, 1 + 5, 1, 1] if shared_prefix else [3 + 5, 1, 1])
    # The greedy tokens must be the argmax of a full (cache-free) forward over source + generated tokens,
    # where generated tokens get no offset (they are not source text).
    full = torch.cat([ids, out.sequences], 1)
    labels = torch.full_like(full, -100)
    labels[:, 5:] = full[:, 5:]
    prompted.configs["default"].shared_prefix = False
    logits = prompted(input_ids=full, labels=labels).logits
    n_prompt = 3
    for t in range(3):
        assert logits[0, n_prompt + 4 + t].argmax().item() == out.sequences[0, t].item()
        assert torch.allclose(logits[0, n_prompt + 4 + t], out.scores[t][0], atol=1e-4)


def test_t5_generate_uses_encoder_prompt(random_ids):
    prompted = _trained_dept(tiny_t5(), EPTConfig)
    ids = random_ids(2, 6)
    got = prompted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    embeds, mask = prompted._embed(ids, torch.ones_like(ids))
    ref = prompted.backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("config", [PromptTuningConfig(prompt_length=4),
                                    DePTConfig(prompt_length=3, rank=2, offset_length=16),
                                    EPTConfig(prompt_length=3, rank=2, offset_length=16)])
def test_only_adapter_and_head_train_and_backbone_is_bit_identical(config, random_ids):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompted = get_prompted_model(model, config).train()
    trainable = {id(p) for p in prompted.parameters() if p.requires_grad}
    adapter = {id(p) for p in list(prompted.method.parameters()) + list(prompted.heads["default"].parameters())}
    assert trainable == adapter
    opt = torch.optim.AdamW([p for ps in prompted.param_groups().values() for p in ps], lr=0.1)
    for _ in range(3):
        loss = prompted(input_ids=random_ids(4, 6), labels=torch.tensor([0, 1, 2, 0])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    # The backbone's own weights (its pretrained head included) never change.
    pretrained_head = model._eptkit_pretrained_head[0]
    for k, v in before.items():
        if k.startswith("classifier."):
            assert torch.equal(getattr(pretrained_head, k.split(".")[1]), v)
        else:
            assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(prompted.heads["default"].weight, pretrained_head.weight)
    n_head = sum(p.numel() for p in pretrained_head.parameters())
    n_method = sum(p.numel() for p in prompted.method.parameters())
    assert prompted.num_parameters() == n_method + n_head


def test_bf16_backbone(random_ids):
    for make, cfg in [(tiny_bert, EPTConfig(prompt_length=3, rank=2, offset_length=16)),
                      (tiny_gpt2, EPTConfig(prompt_length=3, rank=2, offset_length=16))]:
        prompted = get_prompted_model(make().to(torch.bfloat16), cfg)
        ids = random_ids(2, 6)
        labels = torch.tensor([0, 1]) if prompted.task_type == "classification" else ids
        out = prompted(input_ids=ids, labels=labels)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert prompted.method.prompt_embeddings.dtype == torch.float32  # adapter weights stay fp32
        assert prompted.method.prompt_embeddings.grad is not None


def test_pooling_options_on_encoder(random_ids):
    model = tiny_bert()
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    for pooling in ("mean", "text_first"):
        prompted = get_prompted_model(model, PromptTuningConfig(prompt_length=3, pooling=pooling,
                                                                text_positions="after_prompt")).eval()
        hidden = model.bert(inputs_embeds=prompted._embed(ids, mask)[0],
                            attention_mask=prompted._embed(ids, mask)[1]).last_hidden_state[:, 3:]
        if pooling == "mean":
            pooled = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
        else:
            pooled = hidden[:, 0]
        expected = prompted.heads["default"](pooled)
        assert torch.allclose(prompted(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)


def test_text_keeps_its_own_positions(random_ids):
    model = tiny_bert()
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    prompted = get_prompted_model(model, PromptTuningConfig(prompt_length=3, text_positions="own")).eval()
    prompt = prompted.adapters["default"].prompt_embeddings.detach()
    # By hand: the prompt at positions 0, 1, 2 and the text at 0..5, as BERT numbers a text without a prompt.
    embeds = torch.cat([prompt.expand(2, -1, -1), model.bert.embeddings.word_embeddings(ids)], dim=1)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]).expand(2, -1)
    hidden = model.bert(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1),
                        position_ids=positions).last_hidden_state[:, 3:]
    pooled = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
    expected = prompted.heads["default"](pooled)
    assert torch.allclose(prompted(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)
    shifted = get_prompted_model(model, PromptTuningConfig(prompt_length=3, text_positions="after_prompt")).eval()
    shifted.load_adapter_state_dict(prompted.adapter_state_dict())
    assert not torch.allclose(shifted(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-3)


def test_own_text_positions_follow_the_backbones_numbering():
    from eptkit.backbones import own_text_positions

    mask = torch.tensor([[1, 1, 1, 0]])
    # RoBERTa numbers a text from padding_idx + 1 = 2; BERT from 0; a decoder-only classifier counts real tokens.
    assert own_text_positions(tiny_roberta(), mask, 2).tolist() == [[2, 3, 2, 3, 4, 5]]
    assert own_text_positions(tiny_bert(), mask, 2).tolist() == [[0, 1, 0, 1, 2, 3]]
    left = torch.tensor([[0, 1, 1, 1]])
    assert own_text_positions(tiny_llama_classifier(), left, 2).tolist() == [[0, 1, 0, 0, 1, 2]]


def test_own_text_positions_are_for_classifiers_only():
    with pytest.raises(ValueError, match="text_positions"):
        get_prompted_model(tiny_gpt2(), PromptTuningConfig(prompt_length=2, text_positions="own"))
    with pytest.raises(ValueError, match="text_positions: must be one of"):
        PromptTuningConfig(text_positions="middle")


def test_defaults_are_decided_for_the_backbone():
    from eptkit.config import DEFAULT_INIT_TEXT

    def tokenizer(text, add_special_tokens):
        assert text == DEFAULT_INIT_TEXT and not add_special_tokens
        return {"input_ids": [5, 9, 4]}

    bert = get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=7), tokenizer=tokenizer)
    assert (bert.config.init, bert.config.text_positions, bert.config.pooling) == ("text", "own", "mean")
    words = bert.backbone.get_input_embeddings().weight  # the instruction's tokens, repeated to l rows
    assert torch.equal(bert.method.prompt_embeddings.detach(), words[[5, 9, 4, 5, 9, 4, 5]])
    assert get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=7)).config.init == "sample_vocab"
    for make in (tiny_t5, tiny_gpt2, tiny_llama_classifier):  # decoders and T5 keep PEFT's layout
        prompted = get_prompted_model(make(), PromptTuningConfig(prompt_length=2), tokenizer=tokenizer)
        assert (prompted.config.init, prompted.config.text_positions) == ("text", "after_prompt")


def test_default_pooling():
    assert get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=2)).pooling == "mean"
    assert get_prompted_model(tiny_llama_classifier(), PromptTuningConfig(prompt_length=2)).pooling == "backbone"


def test_token_type_ids_extended_with_zeros(random_ids):
    prompted = get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=3, pooling="backbone",
                                                                  text_positions="after_prompt")).eval()
    ids = random_ids(1, 6)
    tt = torch.tensor([[0, 0, 0, 1, 1, 1]])
    got = prompted(input_ids=ids, token_type_ids=tt).logits
    embeds, mask = prompted._embed(ids, None)
    ref = prompted.backbone(inputs_embeds=embeds, attention_mask=mask,
                            token_type_ids=torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1]])).logits
    assert torch.allclose(got, ref)


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TypeError, match="unsupported model class"):
        get_prompted_model(BertModel(tiny_bert().config), PromptTuningConfig(prompt_length=2))
    with pytest.raises(TypeError, match="not a Hugging Face"):
        get_prompted_model(torch.nn.Linear(2, 2), PromptTuningConfig(prompt_length=2))


def test_text_init_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=2, init="text", init_text="hi"))


def test_bundled_minilm_runs_all_methods():
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    batch = tok(["a fine film", "dull and far too long"], ["it is", "no"], padding=True, return_tensors="pt")
    for config in (PromptTuningConfig(prompt_length=10, init="text", init_text="Classify the sentiment"),
                   DePTConfig(prompt_length=6, rank=4, offset_length=32),
                   EPTConfig(prompt_length=6, rank=4, offset_length=32)):
        prompted = get_prompted_model(model, config, tokenizer=tok)
        out = prompted(**batch, labels=torch.tensor([1, 0]))
        out.loss.backward()
        assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


def test_prompt_plus_offset_length_must_fit_the_positions():
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        get_prompted_model(tiny_bert(), DePTConfig(prompt_length=60, rank=2, offset_length=100))


def test_roberta_positions_are_counted_from_padding_idx_plus_one():
    # RoBERTa numbers its tokens from padding_idx + 1 = 2: of its 130 position embeddings 128 are usable.
    fits = get_prompted_model(tiny_roberta(), DePTConfig(prompt_length=6, rank=2, offset_length=122))
    fits(input_ids=torch.randint(3, 100, (1, 122)))
    with pytest.raises(ValueError, match=r"6 \+ 123 = 129 exceeds the backbone's max_position_embeddings=130 "
                                         r"\(128 usable: its positions are numbered from 2\)"):
        get_prompted_model(tiny_roberta(), DePTConfig(prompt_length=6, rank=2, offset_length=123))


def test_named_adapters_share_one_frozen_backbone(random_ids):
    model = tiny_bert()
    prompted = get_prompted_model(model, EPTConfig(prompt_length=3, rank=2, offset_length=16))
    prompted.add_adapter("other", PromptTuningConfig(prompt_length=5))
    ids = random_ids(2, 6)
    with torch.no_grad():
        prompted.heads["other"].weight.normal_()
    first = prompted.eval()(input_ids=ids).logits
    prompted.set_adapter("other")
    assert prompted.config.method == "pt" and prompted.param_groups()["head"][0] is prompted.heads["other"].weight
    second = prompted(input_ids=ids).logits
    alone = get_prompted_model(tiny_bert(), PromptTuningConfig(prompt_length=5)).eval()
    alone.load_adapter_state_dict(prompted.adapter_state_dict())
    assert torch.allclose(second, alone(input_ids=ids).logits, atol=1e-6)
    prompted.set_adapter("default")
    assert torch.equal(prompted(input_ids=ids).logits, first)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        prompted.set_adapter("x")

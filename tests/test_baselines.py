"""PEFT's P-tuning and prefix tuning behind eptkit's wrapper (eptkit.baselines.PeftPromptModel).

Parameter counts are checked against the methods' definitions written out by hand; the saved
adapters are reloaded with PEFT's own `PeftModel.from_pretrained`, so eptkit's files are PEFT's.
"""

import pytest
import torch
from peft import PeftModel

from conftest import HIDDEN, tiny_bert, tiny_gpt2, tiny_t5
from eptkit import TrainConfig
from eptkit.baselines import PeftPromptModel, build_model, load_baseline
from eptkit.batching import text_max_length


def test_ptuning_parameter_count_and_groups():
    # P-tuning: n virtual-token embeddings (n x d), then an MLP d -> h -> h -> d with biases; the
    # classifier copy (d x labels + labels) trains too.
    n, h, d, labels = 5, 16, HIDDEN, 3
    model = PeftPromptModel(tiny_bert(num_labels=labels), "ptuning", num_virtual_tokens=n, encoder_hidden_size=h)
    groups = model.param_groups()
    assert sum(p.numel() for p in groups["prompt"]) == n * d + (d * h + h) + (h * h + h) + (h * d + d)
    assert sum(p.numel() for p in groups["head"]) == d * labels + labels
    assert model.num_parameters() == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("factory,layers", [(tiny_gpt2, 2), (tiny_t5, 2)])
def test_prefix_parameter_count(factory, layers):
    # Prefix tuning (no reparametrisation): a key and a value vector of width d per virtual token and
    # layer; PEFT sizes it by the config's number of layers (for T5: num_layers, not the decoder's too).
    n = 4
    model = PeftPromptModel(factory(), "prefix", num_virtual_tokens=n)
    assert model.num_parameters() == n * layers * 2 * HIDDEN
    assert set(model.param_groups()) == {"prompt"}


def test_prefix_on_an_encoder_classifier_is_a_clear_error():
    with pytest.raises(TypeError, match="BertForSequenceClassification does not accept past_key_values"):
        build_model(tiny_bert(), "prefix")


def test_prefix_on_a_t5_whose_heads_do_not_span_d_model_is_a_clear_error():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1,
                                                decoder_start_token_id=0))
    with pytest.raises(TypeError, match=r"num_heads \* d_kv == d_model, got 2 \* 8 != 32"):
        build_model(model, "prefix")


def test_prefix_trains_a_t5():
    model = PeftPromptModel(tiny_t5(), "prefix", num_virtual_tokens=3).train()
    ids = torch.randint(3, 100, (2, 6))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(3, 100, (2, 4))).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.param_groups()["prompt"])


def test_bad_virtual_token_count_names_the_option():
    with pytest.raises(ValueError, match="prompt_length: must be a positive integer"):
        PeftPromptModel(tiny_bert(), "ptuning", num_virtual_tokens=0)


@pytest.mark.parametrize("method,factory", [("ptuning", tiny_bert), ("prefix", tiny_gpt2)])
def test_saved_adapter_reloads_with_peft(tmp_path, method, factory):
    model = PeftPromptModel(factory(), method, num_virtual_tokens=3)
    with torch.no_grad():  # move the adapter away from its initialisation so a reload is visible
        for p in model.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert torch.allclose(reloaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)


def test_training_steps_change_only_the_adapter():
    model = PeftPromptModel(tiny_bert(), "ptuning", num_virtual_tokens=3)
    frozen = {n: p.clone() for n, p in model.inner.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for ps in model.param_groups().values() for p in ps], lr=1e-2)
    ids = torch.randint(3, 100, (4, 6))
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2, 0])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.inner.named_parameters() if n in frozen)


@pytest.mark.parametrize("method,factory", [("ptuning", tiny_bert), ("ptuning", tiny_gpt2), ("prefix", tiny_gpt2)])
def test_virtual_tokens_count_against_the_positions(method, factory):
    # Both tiny backbones number 128 positions. P-tuning puts its n virtual tokens before the text;
    # prefix tuning passes n keys/values as a cache, after which GPT-2 numbers the text. So a text of
    # 128 - n tokens runs and one more token fails deep inside torch: the room text_max_length gives.
    n = 10
    model = PeftPromptModel(factory(), method, num_virtual_tokens=n, encoder_hidden_size=8).eval()
    assert model.prompt_positions == n
    assert text_max_length(model, TrainConfig(max_length=500)) == 128 - n
    ids = torch.randint(3, 100, (1, 128 - n))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        longer = torch.randint(3, 100, (1, 128 - n + 1))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=longer, attention_mask=torch.ones_like(longer))


def test_a_reloaded_ptuning_adapter_counts_its_virtual_tokens(tmp_path):
    PeftPromptModel(tiny_bert(), "ptuning", num_virtual_tokens=7, encoder_hidden_size=8).save_pretrained(tmp_path)
    assert load_baseline(tiny_bert(), tmp_path).prompt_positions == 7

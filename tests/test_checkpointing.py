"""Activation checkpointing (`TrainConfig.gradient_checkpointing`): the same loss and gradients, less kept.

Each comparison builds the same model twice (same seed), switches checkpointing on in one, and runs one
forward and backward in training mode (checkpointed layers act only there). Dropout is set to 0 in the
tiny configs, so both runs are deterministic and the comparison says nothing about random masks; one
test with dropout left on (and the same seed) checks that the recomputation draws the masks of the
first forward. That checkpointing really happened is checked independently: the tensors autograd keeps
for the backward pass (counted with saved-tensor hooks) must shrink.
"""

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from conftest import HIDDEN, VOCAB, tiny_gpt2
from eptkit import DePTConfig, EPTConfig, PromptTuningConfig
from eptkit.baselines import build_model
from eptkit.config import TrainConfig
from eptkit.multirun import MultiTrainer, RunSpec
from eptkit.trainable import set_gradient_checkpointing


def bert(dropout=0.0):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                               dropout_rate=0.0))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0))


BACKBONES = {"bert": bert, "t5": t5, "llama": llama}
METHOD_CONFIGS = {
    "pt": lambda: PromptTuningConfig(prompt_length=4, init="sample_vocab"),
    "dept": lambda: DePTConfig(prompt_length=4, rank=2, max_length=16, init="sample_vocab"),
    # module_init='random': EPT's modules start non-zero, so every one of them gets a non-zero gradient.
    "ept": lambda: EPTConfig(prompt_length=4, rank=2, max_length=16, init="sample_vocab", num_subspaces=2,
                             subspace_rank=2, module_init="random"),
    "lora": lambda: None,
    "full": lambda: None,
    "ptuning": lambda: None,
}


def batch(kind):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # one padded row
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}
    if kind == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, VOCAB, (3, 4), generator=g)}
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a source of 5 tokens, then the target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(kind, method, checkpointing, **kw):
    backbone = BACKBONES[kind](**kw)
    torch.manual_seed(1)  # the adapter's initial values
    model = build_model(backbone, method, METHOD_CONFIGS[method]())
    set_gradient_checkpointing(model, checkpointing)
    return model.train()


def loss_grads_and_kept(model, inputs, seed=3):
    """(loss, {name: gradient} of every trainable parameter, elements autograd keeps for the backward)."""
    kept = [0]

    def pack(t):
        kept[0] += t.numel()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, kept[0]


def assert_same(plain, checkpointed):
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = plain, checkpointed
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    assert kept_b < kept_a  # the layers' activations were not kept: checkpointing happened


@pytest.mark.parametrize("kind", ["bert", "t5", "llama"])
@pytest.mark.parametrize("method", ["pt", "dept", "ept", "lora", "full", "ptuning"])
def test_same_loss_and_gradients_with_checkpointing(kind, method):
    inputs = batch(kind)
    plain = loss_grads_and_kept(build(kind, method, False), inputs)
    assert_same(plain, loss_grads_and_kept(build(kind, method, True), inputs))


def test_recomputation_draws_the_same_dropout_masks():
    inputs = batch("bert")
    plain = loss_grads_and_kept(build("bert", "ept", False, dropout=0.3), inputs)
    again = loss_grads_and_kept(build("bert", "ept", False, dropout=0.3), inputs, seed=4)
    assert not torch.allclose(again[0], plain[0])  # dropout is live: another seed, another loss
    assert_same(plain, loss_grads_and_kept(build("bert", "ept", True, dropout=0.3), inputs))


def test_evaluation_is_unaffected_and_the_switch_goes_off():
    model = build("llama", "ept", True)
    inputs = batch("llama")
    with torch.no_grad():
        checkpointed = model.eval()(**inputs).logits
    set_gradient_checkpointing(model, False)
    assert not model.backbone.is_activation_checkpointing
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, checkpointed, rtol=0, atol=0)


def test_prefix_tuning_refuses_checkpointing_by_name():
    model = build_model(tiny_gpt2(), "prefix", None, num_virtual_tokens=3)
    with pytest.raises(ValueError, match="^gradient_checkpointing: PEFT's prefix tuning"):
        set_gradient_checkpointing(model, True)
    set_gradient_checkpointing(model, False)  # off is always fine


def test_train_config_field_and_runs_in_one_process_must_agree(tmp_path):
    with pytest.raises(ValueError, match="^gradient_checkpointing: must be true or false"):
        TrainConfig(gradient_checkpointing="yes")
    from eptkit.model import PromptedModel

    model = PromptedModel(bert(), PromptTuningConfig(prompt_length=2, init="sample_vocab"), adapter_name="a")
    model.add_adapter("b", PromptTuningConfig(prompt_length=2, init="sample_vocab"))
    runs = [RunSpec(name, "cb", {}, TrainConfig(output_dir=str(tmp_path / name), gradient_checkpointing=on))
            for name, on in (("a", True), ("b", False))]
    with pytest.raises(ValueError, match="^gradient_checkpointing: runs trained in one process must share it"):
        MultiTrainer(model, None, runs)


def test_recipes_and_sweep_files_take_the_switch(tmp_path):
    import json

    from eptkit.options import build_configs, read_sweep, resolve

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"task": "cb", "method": "pt", "gradient-checkpointing": True}))
    assert build_configs(resolve({"config": str(recipe)}))[1].gradient_checkpointing is True
    assert build_configs(resolve({"config": str(recipe), "gradient_checkpointing": False}))[1].gradient_checkpointing \
        is False  # the command line wins
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"runs": [{"name": "a", "gradient_checkpointing": True}]}))
    assert read_sweep(sweep) == [("a", {"gradient_checkpointing": True})]
    recipe.write_text(json.dumps({"task": "cb", "gradient-checkpointing": "yes"}))
    with pytest.raises(ValueError, match="^gradient_checkpointing: must be true or false"):
        build_configs(resolve({"config": str(recipe)}))

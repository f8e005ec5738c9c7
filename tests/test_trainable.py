"""Every model the training loop trains satisfies the written contract (eptkit.trainable.TrainableModel)."""

import pytest

from conftest import tiny_bert, tiny_gpt2
from eptkit import EPTConfig, get_prompted_model
from eptkit.baselines import build_model
from eptkit.trainable import TrainableModel


@pytest.mark.parametrize("method", ["ept", "lora", "ptuning", "full", "head"])
def test_models_satisfy_the_training_contract(method):
    config = EPTConfig(prompt_length=2, rank=2, offset_length=8) if method == "ept" else None
    model = build_model(tiny_bert(), method, config)
    assert isinstance(model, TrainableModel)
    assert model.method_name == method and model.backbone.config.hidden_size == 32
    assert (model.method_config is not None) == (method == "ept")
    assert model.num_parameters() == sum(p.numel() for ps in model.param_groups().values() for p in ps)


def test_a_folded_model_satisfies_it_too():
    prompted = get_prompted_model(tiny_gpt2(), EPTConfig(prompt_length=2, rank=2, offset_length=8))
    folded = prompted.fold_prompt()
    assert isinstance(folded, TrainableModel) and folded.is_compiled and not prompted.is_compiled
    assert folded.max_length == 8 and folded.param_groups() == {}

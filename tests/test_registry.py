"""The method registry (eptkit.registry): a new prompt method is one module plus one registry entry."""

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from eptkit import PromptTuningConfig, load_adapter
from eptkit.backbones import load_backbone
from eptkit.baselines import build_model
from eptkit.config import TrainConfig
from eptkit.methods.prompt_tuning import init_prompt
from eptkit.options import build_configs, normalize, resolve, valid_keys
from eptkit.registry import METHODS, MethodSpec, lr_fields, register_method
from eptkit.tasks.registry import get_task
from eptkit.train import train
from test_train import synthetic_cb, tiny_models  # noqa: F401 (the fixture)


# ------------------------------------------------------------------ the toy method: its whole module
@dataclass
class ToyConfig(PromptTuningConfig):
    """A prompt scaled by one trained gain."""

    method: ClassVar[str] = "toy"
    start_gain: float = field(default=0.5, metadata={"help": "The gain's initial value."})


class Toy(nn.Module):
    def __init__(self, config: ToyConfig, word_embeddings, init_token_ids=None):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init_prompt(config, word_embeddings, init_token_ids))
        self.gain = nn.Parameter(torch.tensor([config.start_gain]))

    def forward(self):
        return self.prompt_embeddings * self.gain, None

    def param_groups(self):
        return {"prompt": [self.prompt_embeddings], "gain": [self.gain]}


TOY = MethodSpec("toy", {"prompt": "lr", "gain": "lr_head"}, config=ToyConfig, module=Toy)


# ------------------------------------------------------------------ tests
def test_built_in_entries_name_real_classes_and_rate_fields():
    rates = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(lr_fields().values()) <= rates
    for spec in METHODS.values():
        if spec.is_prompt_method:
            assert spec.config_class().method == spec.name and callable(spec.module_class())
        else:
            assert callable(spec.builder())


def test_every_on_switch_is_accepted_as_no_name():
    assert normalize("no-shared-prefix", True) == ("shared_prefix", False)
    assert normalize("--no-fusion", True) == ("fusion", False)
    assert normalize("prompt-length", 3) == ("prompt_length", 3)


def test_a_toy_method_registered_in_one_place_trains_saves_and_reloads(tiny_models, tmp_path):  # noqa: F811
    register_method(TOY)
    try:
        assert "start_gain" in valid_keys()
        options = resolve({"method": "toy", "prompt_length": 3, "start_gain": 0.25, "output_dir": str(tmp_path),
                           "max_steps": 3, "eval_steps": 3, "batch_size": 4, "lr_head": 0.5, "warmup_steps": 0})
        method_config, train_config = build_configs(options)
        assert isinstance(method_config, ToyConfig) and method_config.start_gain == 0.25
        torch.manual_seed(0)
        backbone, tokenizer = load_backbone(tiny_models["bert"], "classification", get_task("cb"))
        model = build_model(backbone, "toy", method_config, tokenizer=tokenizer)
        results = train(model, tokenizer, "cb", synthetic_cb(16, 8), train_config)
        assert results["method"] == "toy" and results["steps"] == 3
        # the gain trained at its own group's rate, from its own start
        assert float(model.method.gain.detach()) != 0.25
        assert results["config"]["run"]["lr_absolute"]["gain"] == 0.5
        # the saved adapter reloads through the registry (config class and module) with the same outputs
        reloaded = load_adapter(load_backbone(tiny_models["bert"], "classification", get_task("cb"))[0], tmp_path)
        assert isinstance(reloaded.config, ToyConfig)
        ids = torch.tensor([[101, 2000, 2001, 102]])
        model.eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    finally:
        METHODS.pop("toy", None)


def test_max_length_gives_dept_and_ept_their_offset_unless_offset_length_is_given():
    """--max-length is the text length of every method; DePT/EPT's offset covers it unless --offset-length says
    otherwise, and then the offset's rows are the text length they read."""
    import pytest

    from eptkit.console import UsageError

    for method in ("dept", "ept"):
        assert build_configs(resolve({"method": method}))[0].offset_length == 256
        method_config, train_config = build_configs(resolve({"method": method, "max_length": 64}))
        assert (method_config.offset_length, train_config.max_length) == (64, 64)
        method_config, train_config = build_configs(resolve({"method": method, "max_length": 64, "offset_length": 32}))
        assert (method_config.offset_length, train_config.max_length) == (32, 32)
    for method in ("pt", "lora"):
        method_config, train_config = build_configs(resolve({"method": method, "max_length": 64}))
        assert not hasattr(method_config, "offset_length") and train_config.max_length == 64
        with pytest.raises(UsageError, match="--offset-length"):
            build_configs(resolve({"method": method, "offset_length": 32}))

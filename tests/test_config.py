import dataclasses

import pytest

from eptkit import DePTConfig, EPTConfig, PromptTuningConfig


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (PromptTuningConfig, {"prompt_length": 0}, "prompt_length"),
        (PromptTuningConfig, {"init": "zeros"}, "init"),
        (PromptTuningConfig, {"init": "text", "init_text": "  "}, "init_text"),
        (PromptTuningConfig, {"pooling": "max"}, "pooling"),
        (DePTConfig, {"rank": -1}, "rank"),
        (DePTConfig, {"max_length": 0}, "max_length"),
        (DePTConfig, {"alpha": 0}, "alpha"),
        (EPTConfig, {"num_subspaces": -2}, "num_subspaces"),
        (EPTConfig, {"subspace_rank": 0}, "subspace_rank"),
        (EPTConfig, {"fusion": "yes"}, "fusion"),
        (EPTConfig, {"prompt_length": 2.5}, "prompt_length"),
    ],
)
def test_invalid_values_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        cls(**kwargs)


def test_subspace_rank_is_free_when_projection_is_off():
    assert EPTConfig(num_subspaces=0, subspace_rank=0).num_subspaces == 0


@pytest.mark.parametrize("config", [
    PromptTuningConfig(prompt_length=7, init="text", init_text="hello"),
    DePTConfig(prompt_length=5, rank=3, max_length=64, alpha=4.0),
    EPTConfig(fusion=False, num_subspaces=8, subspace_rank=2, pooling="text_first"),
])
def test_json_round_trip(config):
    back = PromptTuningConfig.from_json(config.to_json())
    assert type(back) is type(config) and back == config


def test_from_dict_rejects_unknown_fields_and_methods():
    with pytest.raises(ValueError, match="unknown field"):
        PromptTuningConfig.from_dict({"method": "ept", "num_subspace": 3})
    with pytest.raises(ValueError, match="method"):
        PromptTuningConfig.from_dict({"method": "prefix"})


def test_defaults_match_the_spec():
    assert PromptTuningConfig().prompt_length == 100
    d = DePTConfig()
    assert (d.prompt_length, d.rank, d.max_length, d.alpha) == (60, 30, 256, 8.0)
    e = EPTConfig()
    assert (e.fusion, e.num_subspaces, e.subspace_rank) == (True, 4, 4)


def test_every_field_has_help_text():
    for cls in (PromptTuningConfig, DePTConfig, EPTConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"

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
        (DePTConfig, {"offset_length": 0}, "offset_length"),
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
    DePTConfig(prompt_length=5, rank=3, offset_length=64, alpha=4.0),
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
    assert (d.prompt_length, d.rank, d.offset_length, d.alpha) == (60, 30, 256, 8.0)
    e = EPTConfig()
    assert (e.fusion, e.num_subspaces, e.subspace_rank) == (True, 4, 4)


def test_every_field_has_help_text():
    for cls in (PromptTuningConfig, DePTConfig, EPTConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_max_length_is_the_deprecated_spelling_of_offset_length(caplog):
    """Issue 21: DePT/EPT's offset rows are offset_length (TrainConfig.max_length is the text length);
    the old spelling still builds the same config, with a one-line warning naming the new one."""
    import logging
    import warnings

    new = EPTConfig(prompt_length=5, rank=3, offset_length=64)
    with caplog.at_level(logging.WARNING, logger="eptkit"):
        assert EPTConfig(prompt_length=5, rank=3, max_length=64) == new
        assert DePTConfig(max_length=64).offset_length == 64
        assert PromptTuningConfig.from_dict({"method": "ept", "prompt_length": 5, "rank": 3, "max_length": 64}) == new
        assert PromptTuningConfig.from_json('{"method": "dept", "max_length": 48}').offset_length == 48
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("'max_length' is deprecated, use 'offset_length'" in line and "\n" not in line
                                   for line in lines)
    assert lines[0].startswith("EPTConfig:") and lines[1].startswith("DePTConfig:")
    assert "max_length" not in new.to_dict() and new.to_dict()["offset_length"] == 64
    with pytest.raises(ValueError, match="give only offset_length"):
        DePTConfig(max_length=64, offset_length=32)
    with pytest.raises(ValueError, match=r"^offset_length:"):  # the old spelling is checked as the new one
        DePTConfig(max_length=0)
    with pytest.raises(ValueError, match="unknown field"):  # PT never had it
        PromptTuningConfig.from_dict({"method": "pt", "max_length": 64})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert new.max_length == 64  # code reading the old attribute
    assert [w.category for w in caught] == [DeprecationWarning]

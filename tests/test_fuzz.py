"""Property-based tests (hypothesis): whatever bytes a user's CSV/TSV/JSONL file or an adapter directory
holds, the loaders return a correct result or raise one clear error (DataError / AdapterError), never
another exception."""

import csv
import io
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_bert
from eptkit import AdapterError, DataError, DePTConfig, PromptTuningConfig, get_prompted_model, load_adapter, load_files
from eptkit.adapter_files import CONFIG_NAME, WEIGHTS_NAME

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUFFIXES = (".csv", ".tsv", ".jsonl")


# ---------------------------------------------------------------------------- users' files
@FAST
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_any_bytes_in_a_users_file_load_or_raise_data_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("f") / f"train{suffix}"
    path.write_bytes(data)
    try:
        dsd, spec = load_files(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert len(dsd["train"]) >= 1 and len(dsd["validation"]) >= 1


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=5), v,
                                                                                             max_size=3), max_leaves=8)


@FAST
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "label", "other"]), JSON_VALUES, max_size=3),
                     min_size=1, max_size=12))
def test_any_json_rows_load_or_raise_data_error(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("j") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        load_files(path)
    except DataError:
        pass


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(lambda t: t.strip())


@FAST
@given(texts=st.lists(TEXT, min_size=4, max_size=12), labels=st.lists(st.sampled_from(["pos", "neg"]), min_size=12,
                                                                       max_size=12), suffix=st.sampled_from(SUFFIXES))
def test_well_formed_rows_load_exactly(tmp_path_factory, texts, labels, suffix):
    labels = labels[:len(texts)]
    if len(set(labels)) < 2:
        labels[0], labels[1] = "pos", "neg"
    if suffix == ".tsv":  # TSV has no quoting: a field holds no tab or line break
        texts = [" ".join(t.replace("\t", " ").replace("\r", " ").splitlines()) or "x" for t in texts]
        texts = [t if t.strip() else "x" for t in texts]
    path = tmp_path_factory.mktemp("w") / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    elif suffix == ".csv":
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
        path.write_text(buf.getvalue(), newline="")
    else:
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    validation = path.with_name(f"val{suffix}")
    validation.write_bytes(path.read_bytes())
    dsd, spec = load_files(path, validation, validation)
    assert spec.label_names == ("neg", "pos")
    assert dsd["train"]["text"] == texts  # exactly the text written, line breaks and quotes included
    assert [spec.label_names[y] for y in dsd["train"]["label"]] == labels


# ---------------------------------------------------------------------------- adapter files
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    torch.manual_seed(0)
    model = get_prompted_model(tiny_bert(), DePTConfig(prompt_length=3, offset_length=8, rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    root = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(root)
    return root, {k: v.clone() for k, v in model.adapter_state_dict().items()}


def _load(directory):
    return load_adapter(tiny_bert(), directory)


@FAST
@given(which=st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]), data=st.binary(max_size=300))
def test_any_bytes_in_an_adapter_file_raise_adapter_error(tmp_path_factory, saved_adapter, which, data):
    root, _ = saved_adapter
    d = tmp_path_factory.mktemp("a")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (d / name).write_bytes((root / name).read_bytes())
    (d / which).write_bytes(data)
    with pytest.raises(AdapterError) as e:
        _load(d)
    assert which in str(e.value) or str(d) in str(e.value)


@FAST
@given(position=st.integers(min_value=0), byte=st.integers(0, 255), which=st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]))
def test_a_corrupted_byte_is_an_error_or_loads_the_same_adapter(tmp_path_factory, saved_adapter, position, byte, which):
    root, tensors = saved_adapter
    d = tmp_path_factory.mktemp("c")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (d / name).write_bytes((root / name).read_bytes())
    data = bytearray((d / which).read_bytes())
    data[position % len(data)] = byte
    (d / which).write_bytes(bytes(data))
    try:
        model = _load(d)
    except ValueError:  # AdapterError, or an invalid hyper-parameter named by its field
        return
    if which == WEIGHTS_NAME:  # the checksum guards every tensor byte: only a no-op change loads
        assert bytes(data) == (root / which).read_bytes()
    state = model.adapter_state_dict()
    assert set(state) == set(tensors) and all(torch.equal(state[k], tensors[k]) for k in tensors)


CONFIG_KEYS = ["method", "prompt_length", "offset_length", "max_length", "rank", "alpha", "compiled", "task_type", "hidden_size",
               "peft_type", "num_virtual_tokens", "pooling", "init", "r", "token_dim", "weights_sha256"]


@FAST
@given(config=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES | st.sampled_from(
    ["pt", "dept", "ept", "PROMPT_TUNING", "PROMPT_TUNING_LORA", "classification", "mean"]), max_size=8))
def test_any_adapter_config_is_an_adapter_error_or_a_valid_model(tmp_path_factory, saved_adapter, config):
    root, _ = saved_adapter
    d = tmp_path_factory.mktemp("j")
    (d / WEIGHTS_NAME).write_bytes((root / WEIGHTS_NAME).read_bytes())
    (d / CONFIG_NAME).write_text(json.dumps(config))
    try:
        model = _load(d)
    except ValueError:
        return
    assert isinstance(model.config, PromptTuningConfig)
    ids = torch.tensor([[5, 6, 7]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # a loaded adapter runs

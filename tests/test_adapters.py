"""Adapters on disk: round trips, PEFT and DePT interoperability, and every way a file can be bad."""

import json
import math

import pytest
import torch
from peft import PeftModel
from peft import PromptTuningConfig as PeftPromptTuningConfig
from peft import TaskType, get_peft_model
from safetensors.torch import load_file

from eptkit import AdapterError, DePTConfig, EPTConfig, PromptedModel, PromptTuningConfig, export_peft, get_prompted_model
from conftest import tiny_bert, tiny_gpt2, tiny_t5


def _trained(model, config):
    prompted = get_prompted_model(model, config)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: every adapter tensor non-trivial
        for p in prompted.param_groups().values():
            for t in p:
                t.add_(torch.randn_like(t) * 0.1)
    return prompted.eval()


CONFIGS = [PromptTuningConfig(prompt_length=4), DePTConfig(prompt_length=3, rank=2, offset_length=16),
           EPTConfig(prompt_length=3, rank=2, offset_length=16, fusion_rank=2)]


def _outputs(prompted, ids):
    if prompted.task_type == "classification":
        return prompted(input_ids=ids).logits
    if prompted.task_type == "seq2seq":
        return prompted(input_ids=ids, labels=ids[:, :2]).logits
    return prompted(input_ids=ids).logits


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_t5, tiny_gpt2])
@pytest.mark.parametrize("config", CONFIGS, ids=["pt", "dept", "ept"])
def test_save_load_and_compile_give_identical_outputs(make_model, config, tmp_path, random_ids):
    prompted = _trained(make_model(), config)
    ids = random_ids(2, 6)
    expected = _outputs(prompted, ids)
    prompted.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["method"] == config.method and saved["hidden_size"] == 32 and saved["eptkit_version"]
    names = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "prompt_embeddings" in names
    if config.method != "pt":
        assert {"lora_embedding_A", "lora_embedding_B"} <= names
    if config.method == "ept":
        assert any(n.startswith("fusion.") for n in names) and any(n.startswith("projection.") for n in names)
    if prompted.task_type == "classification":
        assert {"classifier.weight", "classifier.bias"} <= names

    loaded = PromptedModel.from_pretrained(make_model(), tmp_path / "a").eval()
    assert loaded.config == prompted.config
    assert torch.equal(_outputs(loaded, ids), expected)

    compiled = prompted.compile()
    assert torch.allclose(_outputs(compiled, ids), expected, atol=1e-6)
    assert sum(p.numel() for p in compiled.adapters.parameters()) == 0
    compiled.save_pretrained(tmp_path / "c")
    reloaded = PromptedModel.from_pretrained(make_model(), tmp_path / "c")
    assert reloaded.is_compiled
    assert torch.allclose(_outputs(reloaded, ids), expected, atol=1e-6)


@pytest.mark.parametrize("make_model, task_type", [(tiny_bert, TaskType.SEQ_CLS), (tiny_t5, TaskType.SEQ_2_SEQ_LM),
                                                   (tiny_gpt2, TaskType.CAUSAL_LM)])
def test_peft_adapter_loads_with_identical_outputs(make_model, task_type, tmp_path, random_ids):
    peft_model = get_peft_model(make_model(), PeftPromptTuningConfig(task_type=task_type, num_virtual_tokens=4))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
        if task_type == TaskType.SEQ_CLS:
            peft_model.base_model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path)
    ids = random_ids(2, 6)
    peft_model.eval()
    kwargs = {"labels": ids[:, :2].contiguous()} if task_type == TaskType.SEQ_2_SEQ_LM else {}
    ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits

    ours = PromptedModel.from_pretrained(make_model(), tmp_path).eval()
    assert ours.config.method == "pt" and ours.config.prompt_length == 4
    got = ours(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
    if task_type == TaskType.CAUSAL_LM:  # the shared prefix returns the text's logits; PEFT's cover the prompt too
        ref = ref[:, -got.shape[1]:]
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_t5, tiny_gpt2])
def test_pt_exports_to_peft(make_model, tmp_path, random_ids):
    prompted = _trained(make_model(), PromptTuningConfig(prompt_length=4, pooling="backbone",
                                                         text_positions="after_prompt"))
    export_peft(prompted, tmp_path)
    peft_model = PeftModel.from_pretrained(make_model(), tmp_path).eval()
    ids = random_ids(2, 6)
    kwargs = {"labels": ids[:, :2].contiguous()} if prompted.task_type == "seq2seq" else {}
    ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
    got = prompted(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
    assert torch.allclose(got, ref[:, -got.shape[1]:], atol=1e-6)  # causal: the text's logits (shared prefix)


def test_adapter_saved_before_text_positions_loads_in_its_layout(tmp_path, random_ids):
    """Adapter files written before `text_positions` existed put the text after the prompt."""
    old_layout = _trained(tiny_bert(), PromptTuningConfig(prompt_length=4, text_positions="after_prompt"))
    old_layout.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["text_positions"]
    path.write_text(json.dumps(saved))
    loaded = PromptedModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.config.text_positions == "after_prompt"
    ids = random_ids(2, 6)
    assert torch.equal(_outputs(loaded, ids), _outputs(old_layout, ids))


def test_adapter_saved_with_max_length_loads_without_a_warning(tmp_path, random_ids, caplog):
    """Adapter files written before DePT/EPT's offset rows were called offset_length hold max_length."""
    old = _trained(tiny_bert(), CONFIGS[2])
    old.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["max_length"] = saved.pop("offset_length")
    path.write_text(json.dumps(saved))
    loaded = PromptedModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.config == old.config and loaded.config.offset_length == 16
    ids = random_ids(2, 6)
    assert torch.equal(_outputs(loaded, ids), _outputs(old, ids))
    assert "deprecated" not in caplog.text  # the user has nothing to change: the file is as it was written


def test_export_refuses_what_peft_cannot_reproduce(tmp_path):
    with pytest.raises(ValueError, match="only prompt tuning"):
        export_peft(_trained(tiny_t5(), CONFIGS[1]), tmp_path)
    with pytest.raises(ValueError, match="text_positions='own'"):  # an encoder classifier's default
        export_peft(_trained(tiny_bert(), PromptTuningConfig(prompt_length=2, pooling="backbone")), tmp_path)
    with pytest.raises(ValueError, match="pooling='mean'"):
        export_peft(_trained(tiny_bert(), PromptTuningConfig(prompt_length=2, text_positions="after_prompt")),
                    tmp_path)


def test_dept_checkpoint_loads_with_weights_only(tmp_path, random_ids):
    """A checkpoint laid out as DePT's code writes it (its PEFT fork): PROMPT_TUNING_LORA config and
    adapter_model.bin with prompt_embeddings and prompt_encoder.lora_embedding_{A,B}."""
    torch.manual_seed(0)
    P, A, B = torch.randn(3, 32), torch.randn(16, 2), torch.randn(2, 32)
    torch.save({"prompt_embeddings": P, "prompt_encoder.lora_embedding_A": A,
                "prompt_encoder.lora_embedding_B": B}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING_LORA", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3, "r": 2,
        "lora_alpha": 8, "max_length": 16, "token_dim": 32, "num_transformer_submodules": 1}))
    model = tiny_t5()
    ours = PromptedModel.from_pretrained(model, tmp_path).eval()
    assert ours.config.method == "dept" and ours.config.offset_length == 16  # DePT's file calls it max_length
    ids = random_ids(2, 6)
    # DePT's forward, by hand: inputs_embeds + (alpha/sqrt(r)) A B on the (unpadded) positions.
    embeds = model.get_input_embeddings()(ids) + 8 / math.sqrt(2) * (A @ B)[:6]
    labels = ids[:, :2].contiguous()
    ref = model(inputs_embeds=torch.cat([P.expand(2, -1, -1), embeds], 1), labels=labels).logits
    assert torch.allclose(ours(input_ids=ids, labels=labels).logits, ref, atol=1e-5)


def test_dept_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"prompt_embeddings": Evil()}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": 3, "r": 2, "max_length": 16}))
    with pytest.raises(AdapterError, match="weights-only"):
        PromptedModel.from_pretrained(tiny_t5(), tmp_path)


@pytest.fixture
def saved_ept(tmp_path):
    _trained(tiny_bert(), CONFIGS[2]).save_pretrained(tmp_path)
    return tmp_path


def test_wrong_backbone_is_refused(saved_ept):
    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(AdapterError, match="hidden_size=32.*hidden_size=48"):
        PromptedModel.from_pretrained(wider, saved_ept)
    bigger_vocab = BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(AdapterError, match="vocab_size=120"):
        PromptedModel.from_pretrained(bigger_vocab, saved_ept)
    with pytest.raises(AdapterError, match="num_labels=3.*num_labels=2"):
        PromptedModel.from_pretrained(tiny_bert(num_labels=2), saved_ept)
    with pytest.raises(AdapterError, match="adapter is for a classification model"):
        PromptedModel.from_pretrained(tiny_gpt2(), saved_ept)


def test_truncated_and_corrupted_files_are_detected(saved_ept):
    weights = saved_ept / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupted"):
        PromptedModel.from_pretrained(tiny_bert(), saved_ept)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # inside tensor data: safetensors itself cannot notice
    weights.write_bytes(bytes(flipped))
    with pytest.raises(AdapterError, match="checksum"):
        PromptedModel.from_pretrained(tiny_bert(), saved_ept)
    (saved_ept / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        PromptedModel.from_pretrained(tiny_bert(), saved_ept)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        PromptedModel.from_pretrained(tiny_bert(), tmp_path / "nope")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        PromptedModel.from_pretrained(tiny_bert(), tmp_path)


def test_save_is_atomic_and_leaves_no_temporary_files(saved_ept):
    assert sorted(p.name for p in saved_ept.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_failed_save_keeps_the_previous_adapter(saved_ept, monkeypatch):
    before = (saved_ept / "adapter_model.safetensors").read_bytes()
    import eptkit.files as files

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(OSError):
        _trained(tiny_bert(), CONFIGS[2]).save_pretrained(saved_ept)
    assert (saved_ept / "adapter_model.safetensors").read_bytes() == before
    assert PromptedModel.from_pretrained(tiny_bert(), saved_ept) is not None

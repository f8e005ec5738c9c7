"""The training loop (eptkit.train) and the comparison wrappers (eptkit.baselines) on tiny models.

Backbones are random and tiny (hidden 32, one layer) but use the bundled MiniLM's real tokenizer,
so tokenization, generation and metrics run exactly as on a real model; data are small synthetic
CB-shaped splits, so nothing here needs the data folder.
"""

import json
import math
import os
import random
import signal

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config,
                          T5ForConditionalGeneration)

from conftest import minilm_path
from eptkit import DePTConfig, EPTConfig, PromptedModel, PromptTuningConfig, get_prompted_model
from eptkit.baselines import build_model
from eptkit.backbones import load_backbone
from eptkit.tasks.registry import get_task
from eptkit.batching import BatchPlan
from eptkit.evaluation import evaluate_rows
from eptkit.tasks.formatting import encode
from eptkit.checkpoint import checkpoint_dirs
from eptkit.config import TrainConfig
from eptkit.train import train

WORDS = ("the cat dog sat ran on a mat red blue big small house tree river quickly slowly happy sad "
         "man woman child saw ate old new").split()


# ---------------------------------------------------------------------------------------------- fixtures
def save_tiny_backbones(root):
    """Tiny random BERT / T5 / GPT-2 saved with MiniLM's tokenizer; returns {kind: path}."""
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    paths = {}
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                                             decoder_start_token_id=tok.pad_token_id))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                      pad_token_id=tok.pad_token_id))
    bert_wide = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    for name, model in (("bert", bert), ("t5", t5), ("gpt2", gpt2), ("bert48", bert_wide)):
        path = root / name
        model.save_pretrained(path)
        if name == "gpt2":
            tok_c = AutoTokenizer.from_pretrained(str(minilm_path()))
            tok_c.eos_token, tok_c.bos_token = "[SEP]", "[CLS]"
            tok_c.save_pretrained(path)
        else:
            tok.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return save_tiny_backbones(tmp_path_factory.mktemp("tiny_models"))


def synthetic_cb(n_train=48, n_eval=12, seed=0):
    """CB-shaped splits whose label is learnable (it depends on a word in the hypothesis)."""
    rng = random.Random(seed)

    def split(n):
        rows = {"premise": [], "hypothesis": [], "label": [], "idx": []}
        for i in range(n):
            label = rng.randrange(3)
            cue = ("happy", "sad", "old")[label]
            rows["premise"].append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))))
            rows["hypothesis"].append(" ".join([cue] + [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]))
            rows["label"].append(label)
            rows["idx"].append(i)
        return datasets.Dataset.from_dict(rows)

    return datasets.DatasetDict({"train": split(n_train), "validation": split(n_eval), "test": split(n_eval)})


def make_model(path, method="ept", task_type="classification", config=None):
    torch.manual_seed(0)
    backbone, tok = load_backbone(path, task_type, get_task("cb"))
    if config is None and method in ("pt", "dept", "ept"):
        config = {"pt": PromptTuningConfig(prompt_length=4),
                  "dept": DePTConfig(prompt_length=4, rank=2, offset_length=48),
                  "ept": EPTConfig(prompt_length=4, rank=2, offset_length=48, num_subspaces=2, subspace_rank=2)}[method]
    return build_model(backbone, method, config), tok


def quick_config(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, eval_steps=2, save_steps=2, batch_size=4, eval_batch_size=8,
                lr=3e-2, lr_low_rank=1e-2, lr_head=1e-2, lr_lora=1e-2, lr_full=1e-3, warmup_steps=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- config and plan
@pytest.mark.parametrize("field,value", [("batch_size", 0), ("lr", -1.0), ("max_steps", 0),
                                         ("mixed_precision", "fp8"), ("warmup_ratio", 2.0),
                                         ("gradient_accumulation_steps", 1.5)])
def test_train_config_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_group_learning_rates():
    cfg = TrainConfig(lr=0.3, lr_low_rank=1e-3, lr_head=2e-3)
    assert cfg.group_lr("prompt") == 0.3 and cfg.group_lr("ept") == 1e-3 and cfg.group_lr("head") == 2e-3
    assert TrainConfig(lr_ept=5e-3).group_lr("ept") == 5e-3


def test_batch_plan_is_deterministic_and_sharded():
    a0, a1 = BatchPlan(10, 3, 2, 0, seed=1), BatchPlan(10, 3, 2, 1, seed=1)
    assert a0.batches_per_epoch == 2
    first = a0.rows(0, 0) + a1.rows(0, 0)
    assert len(set(first)) == 6  # the two processes see disjoint rows of a global batch
    assert BatchPlan(10, 3, 2, 0, seed=1).rows(0, 0) == a0.rows(0, 0)
    assert a0.rows(1, 0) != a0.rows(0, 0)  # a new order each epoch
    assert a0.advance(0, 1) == (1, 0)
    covered = set(a0.rows(0, 0) + a1.rows(0, 0) + a0.rows(0, 1) + a1.rows(0, 1))
    assert covered == set(range(10))  # the last global batch wraps around


# ---------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", ["pt", "dept", "ept", "lora", "ptuning", "full", "head"])
def test_train_every_method_on_a_classifier(tiny_models, tmp_path, method):
    model, tok = make_model(tiny_models["bert"], method)
    trainable_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    results = train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path))
    assert results["steps"] == 4 and results["method"] == method
    assert set(results["test"]) == {"accuracy", "macro_f1", "average"}
    assert results["best_step"] in (2, 4)
    assert 0 < results["trainable_params"] <= results["total_params"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["config"]["train"]["seed"] == 7
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "lr", "step_time_s", "tokens_per_s", "peak_memory_mb"} <= set(log[0])
    assert "eval" in log[1] and "eval" not in log[0]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000002", "step-000004"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())
    changed = [k for k, v in model.adapter_state_dict().items() if not torch.equal(v, trainable_before[k])]
    assert changed
    if method in ("pt", "dept", "ept"):
        assert set(model.param_groups()) >= {"prompt", "head"}
        assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
        # The adapter on disk is the best one, and it reloads onto a fresh backbone.
        backbone, _ = load_backbone(tiny_models["bert"], "classification", get_task("cb"))
        reloaded = PromptedModel.from_pretrained(backbone, tmp_path)
        best = load_file(str(checkpoint_dirs(tmp_path)[-1] / "best.safetensors"))
        for k, v in reloaded.adapter_state_dict().items():
            assert torch.equal(v, best[k])
    elif method == "lora":
        assert (tmp_path / "adapter_model.safetensors").is_file() and set(model.param_groups()) == {"lora", "head"}
    elif method == "ptuning":
        assert (tmp_path / "adapter_model.safetensors").is_file() and set(model.param_groups()) == {"prompt", "head"}
    else:
        assert (tmp_path / "model.safetensors").is_file()


def test_lr_groups_follow_the_schedule(tiny_models, tmp_path):
    model, tok = make_model(tiny_models["bert"], "ept")
    train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, warmup_steps=2, lr=0.2, lr_low_rank=0.01,
                                                          lr_ept=0.02, lr_head=0.03, eval_steps=0,
                                                          lr_unit="absolute"))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == {"prompt": 0.0, "low_rank": 0.0, "ept": 0.0, "head": 0.0}
    assert log[1]["lr"] == pytest.approx({"prompt": 0.1, "low_rank": 0.005, "ept": 0.01, "head": 0.015})
    assert log[2]["lr"] == pytest.approx({"prompt": 0.2, "low_rank": 0.01, "ept": 0.02, "head": 0.03})
    assert log[3]["lr"]["prompt"] == pytest.approx(0.1)  # linear decay to 0 at max_steps


def test_constant_schedule_makes_a_long_run_start_as_the_short_run(tiny_models, tmp_path):
    """With lr_schedule='constant' the first N steps of a longer run are the N-step run, step for step, and
    test_at_best logs the test score of every new best validation step."""
    logs = {}
    models = {}
    for steps in (3, 6):
        model, tok = models[steps] = make_model(tiny_models["bert"], "ept")
        out = tmp_path / str(steps)
        train(model, tok, "cb", synthetic_cb(), quick_config(out, max_steps=steps, warmup_steps=2, eval_steps=1,
                                                              lr_schedule="constant", test_at_best=True,
                                                              lr_unit="absolute", lr=0.2))
        logs[steps] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["lr"]["prompt"] for r in logs[6]] == pytest.approx([0.0, 0.1, 0.2, 0.2, 0.2, 0.2])
    assert [r["loss"] for r in logs[6][:3]] == [r["loss"] for r in logs[3]]
    for record in logs[6]:
        evaluation = record["eval"]
        assert ("test" in evaluation) == evaluation["improved"]
    best = [r for r in logs[3] if r["eval"]["improved"]][-1]
    results = json.loads((tmp_path / "3" / "results.json").read_text())
    assert results["best_step"] == best["step"] and results["test"] == pytest.approx(best["eval"]["test"])
    # finish() reuses the scores taken at the best step instead of a second test pass: they are what the
    # model (holding the best adapter after train) scores on the test split afresh.
    model, tok = models[3]
    rows = encode(synthetic_cb()["test"], get_task("cb"), tok, model.task_type, 256, truncation=True).to_list()
    assert evaluate_rows(model.eval(), tok, get_task("cb"), rows) == pytest.approx(results["test"])


def test_relative_rates_scale_the_embedding_space_groups_by_the_word_embedding_rms(tiny_models, tmp_path):
    model, tok = make_model(tiny_models["bert"], "ept")
    weight = model.backbone.get_input_embeddings().weight.detach().double()
    rms = math.sqrt(sum(float(x) ** 2 for x in weight.flatten()) / weight.numel())  # by hand, not torch's norm
    train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, warmup_steps=0, lr=0.2, lr_low_rank=0.01,
                                                          lr_ept=0.02, lr_head=0.03, eval_steps=0, max_steps=2))
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["lr"]
    # Prompt and low-rank rates are fractions of a word vector's scale; EPT's modules and the head are not.
    assert first == pytest.approx({"prompt": 0.2 * rms, "low_rank": 0.01 * rms, "ept": 0.02, "head": 0.03})
    saved = json.loads((tmp_path / "results.json").read_text())["config"]["run"]["lr_absolute"]
    assert saved["prompt"] == pytest.approx(0.2 * rms, rel=1e-3)


def test_adafactor_keeps_each_group_rate_relative_to_its_parameter(tiny_models):
    from transformers.optimization import Adafactor

    from eptkit.optim import make_optimizer

    model, _ = make_model(tiny_models["bert"], "dept")
    optimizer = make_optimizer(model, TrainConfig(optimizer="adafactor", lr=0.3, lr_low_rank=0.01))
    assert isinstance(optimizer, Adafactor)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["prompt"] == 0.3 and rates["low_rank"] == 0.01  # not multiplied by the embedding RMS again
    assert all(g["scale_parameter"] and not g["relative_step"] for g in optimizer.param_groups)


def synthetic_stsb(n=40, seed=0):
    rng = random.Random(seed)

    def split(count):
        rows = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
        for i in range(count):
            rows["sentence1"].append(" ".join(rng.choice(WORDS) for _ in range(5)))
            rows["sentence2"].append(" ".join(rng.choice(WORDS) for _ in range(5)))
            rows["label"].append(round(rng.uniform(0, 5), 2))
            rows["idx"].append(i)
        return datasets.Dataset.from_dict(rows)

    return datasets.DatasetDict({"train": split(n), "validation": split(8), "test": split(8)})


@pytest.mark.parametrize("method", ["pt", "head", "lora"])
def test_standardized_regression_starts_the_head_at_the_label_mean(tiny_models, tmp_path, method):
    import statistics

    from eptkit.optim import regression_head_bias
    from eptkit.train import Trainer

    data = synthetic_stsb()
    labels = list(data["train"]["label"])
    torch.manual_seed(0)
    backbone, tok = load_backbone(tiny_models["bert"], "classification", get_task("stsb"))
    model = build_model(backbone, method, PromptTuningConfig(prompt_length=4) if method == "pt" else None)
    trainer = Trainer(model, tok, "stsb", data, quick_config(tmp_path))
    assert float(regression_head_bias(model).detach()) == pytest.approx(statistics.mean(labels), rel=1e-6)
    assert trainer.loss_scale == pytest.approx(1 / statistics.variance(labels), rel=1e-5)
    # 'raw' leaves the head as it was built and the loss in label units.
    torch.manual_seed(0)
    backbone, tok = load_backbone(tiny_models["bert"], "classification", get_task("stsb"))
    model = build_model(backbone, method, PromptTuningConfig(prompt_length=4) if method == "pt" else None)
    before = float(regression_head_bias(model).detach())
    raw = Trainer(model, tok, "stsb", data, quick_config(tmp_path, regression_targets="raw"))
    assert raw.loss_scale == 1.0 and float(regression_head_bias(model).detach()) == before


@pytest.mark.parametrize("field,value", [("lr_unit", "relative"), ("optimizer", "sgd"),
                                         ("regression_targets", "scaled")])
def test_recipe_choices_are_validated(field, value):
    with pytest.raises(ValueError, match=f"{field}: must be one of"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("kind,method", [("t5", "ept"), ("gpt2", "pt"), ("t5", "lora"), ("gpt2", "prefix"),
                                         ("gpt2", "ptuning")])
def test_train_text_to_text_evaluates_by_generation(tiny_models, tmp_path, kind, method):
    task_type = "seq2seq" if kind == "t5" else "causal"
    model, tok = make_model(tiny_models[kind], method, task_type)
    results = train(model, tok, "cb", synthetic_cb(n_train=16, n_eval=6), quick_config(tmp_path, max_steps=2))
    assert results["task_type"] == task_type
    # Random tiny models generate junk: invalid words count as wrong, the run still scores.
    assert 0 <= results["test"]["accuracy"] <= 100


# ---------------------------------------------------------------------------------------------- resume
def _run(tiny_models, out, callbacks=None, **kw):
    model, tok = make_model(tiny_models["bert"], "ept")
    cfg = quick_config(out, max_steps=8, eval_steps=2, save_steps=3, gradient_accumulation_steps=2, **kw)
    return train(model, tok, "cb", synthetic_cb(), cfg, callbacks=callbacks)


def _final_state(out):
    return load_file(str(checkpoint_dirs(out)[-1] / "trainable.safetensors"))


def _assert_same_run(a, b):
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5, rtol=0), k
    la = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, 9))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert (ra["best_step"], ra["validation"], ra["test"]) == (rb["best_step"], rb["validation"], rb["test"])
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), k


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(tiny_models, out)
    return out


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_models, tmp_path, uninterrupted):
    def crash(state):  # like kill -9: no cleanup, the last periodic checkpoint (step 3) survives
        if state["step"] == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_models, tmp_path, callbacks=[crash])
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000003"]
    assert not (tmp_path / "results.json").exists()
    # as a checkpoint written when EPT's offset_length was called max_length holds it: the same settings
    state_file = checkpoint_dirs(tmp_path)[0] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["method_config"]["max_length"] = state["method_config"].pop("offset_length")
    state_file.write_text(json.dumps(state))
    _run(tiny_models, tmp_path, resume=True)
    _assert_same_run(uninterrupted, tmp_path)


def test_ctrl_c_writes_a_checkpoint_and_resumes(tiny_models, tmp_path, uninterrupted):
    def interrupt(state):
        if state["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_models, tmp_path, callbacks=[interrupt])
    assert checkpoint_dirs(tmp_path)[-1].name == "step-000004"
    state = json.loads((checkpoint_dirs(tmp_path)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 4 and (state["epoch"], state["batch"]) == (0, 8)  # 4 steps x 2 micro-batches
    # Optimizer, scheduler and RNG files load without unpickling code.
    torch.load(checkpoint_dirs(tmp_path)[-1] / "optimizer.pt", weights_only=True)
    torch.load(checkpoint_dirs(tmp_path)[-1] / "rng-0.pt", weights_only=True)
    _run(tiny_models, tmp_path, resume=True)
    _assert_same_run(uninterrupted, tmp_path)


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_checkpoints(tiny_models, tmp_path):
    model, tok = make_model(tiny_models["bert"], "pt")
    train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=2))
    model, tok = make_model(tiny_models["bert"], "pt")
    with pytest.raises(ValueError, match="--resume"):
        train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="seed=7"):
        train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=3, seed=8, resume=True))
    # optimizer state kept per process (as FSDP and DeepSpeed ZeRO launches write it) is not this launch's
    ckpt = checkpoint_dirs(tmp_path)[-1]
    (ckpt / "optimizer.pt").rename(ckpt / "optimizer-0.pt")
    with pytest.raises(ValueError, match=r"per process \(optimizer-R.pt.*this launch keeps it in one file"):
        train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=3, resume=True))
    (ckpt / "optimizer-0.pt").rename(ckpt / "optimizer.pt")
    model, tok = make_model(tiny_models["bert"], "dept")
    with pytest.raises(ValueError, match="method"):
        train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=3, resume=True))
    # overwrite starts afresh
    results = train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=2, overwrite=True))
    assert results["method"] == "dept"


def test_early_stopping(tiny_models, tmp_path):
    model, tok = make_model(tiny_models["bert"], "pt")
    # lr so small that nothing changes: no evaluation after the first improves
    results = train(model, tok, "cb", synthetic_cb(), quick_config(
        tmp_path, max_steps=50, eval_steps=1, early_stopping_patience=2, lr=1e-12, lr_head=1e-12))
    assert results["stopped_early"] and results["steps"] == 3 and results["best_step"] == 1


def test_max_train_samples_subsamples_with_the_seed(tiny_models, tmp_path):
    model, tok = make_model(tiny_models["bert"], "pt")
    results = train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path, max_steps=1, max_train_samples=10,
                                                                    max_eval_samples=5))
    assert results["num_examples"] == {"train": 10, "validation": 5, "test": 5}


# ---------------------------------------------------------------------------------------------- transformers.Trainer
def test_transformers_trainer_changes_only_adapter_weights(tiny_models, tmp_path):
    from transformers import Trainer, TrainingArguments

    from eptkit.tasks.formatting import MODEL_INPUT_KEYS, Collator, encode

    backbone, tok = load_backbone(tiny_models["bert"], "classification", get_task("cb"))
    prompted = get_prompted_model(backbone, EPTConfig(prompt_length=4, rank=2, offset_length=48, subspace_rank=2))
    rows = encode(synthetic_cb()["train"], "cb", tok, "classification", 48).to_list()
    collate = Collator(tok, "classification")

    def collator(features):
        return {k: v for k, v in collate(features).items() if k in MODEL_INPUT_KEYS}

    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    adapter = {k: v.clone() for k, v in prompted.adapter_state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=prompted, args=args, train_dataset=rows, data_collator=collator).train()
    assert frozen, "the backbone has frozen weights"
    for n, p in backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"backbone weight {n} changed"
    after = prompted.adapter_state_dict()
    assert {k for k in adapter if not torch.equal(adapter[k], after[k])} >= {"prompt_embeddings", "lora_embedding_B"}

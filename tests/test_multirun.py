"""Several runs in one process (eptkit.multirun, eptkit.sweep, `eptkit train --seeds/--sweep`).

Each run must equal a separate run of the same seed. Backbones here have no dropout (dropout draws
from one random stream for the joint batch, so with dropout the runs differ from separate ones in
their dropout masks only). Tolerances: per-step losses 1e-6 relative, adapter tensors 1e-5 absolute (measured:
losses equal or 2e-7 relative, tensors about 4e-8 apart after 4 AdamW steps; the only difference is the masked padding of the joint batch).
"""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from conftest import data_dir, minilm_path
from eptkit import EPTConfig, PromptTuningConfig, get_prompted_model
from eptkit.cli import main
from eptkit.config import TrainConfig
from eptkit.multirun import RunSpec, train_runs
from eptkit.train import train
from test_train import synthetic_cb

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "superglue" / "CB" / "train.jsonl").is_file(),
                                reason=f"data folder {DATA} not found (set EPTKIT_DATA_DIR)")
LOSS_TOL, TENSOR_TOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def bert_no_dropout(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert0")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _args(model, out, task="cb", steps=4, rank=True):
    return ["train", "--task", task, "--model", model, "--data-dir", str(DATA), "--output-dir", str(out),
            "--max-steps", str(steps), "--eval-steps", "2", "--save-steps", "2", "--batch-size", "4",
            "--max-length", "64", "--max-train-samples", "32", "--max-eval-samples", "16", "--lr", "3e-2",
            "--lr-low-rank", "1e-2", "--prompt-length", "4"] + (["--rank", "2"] if rank else [])


def _assert_same_run(joint, alone, step=4):
    assert sorted(p.name for p in joint.iterdir()) == sorted(p.name for p in alone.iterdir())
    log_j = [json.loads(line) for line in (joint / "log.jsonl").read_text().splitlines()]
    log_a = [json.loads(line) for line in (alone / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_j] == [r["step"] for r in log_a]
    for rj, ra in zip(log_j, log_a):
        assert abs(rj["loss"] - ra["loss"]) <= LOSS_TOL * max(1.0, abs(ra["loss"])), (rj["step"], rj["loss"], ra["loss"])
    ckpt = f"checkpoints/step-{step:06d}/trainable.safetensors"
    tj, ta = load_file(str(joint / ckpt)), load_file(str(alone / ckpt))
    assert sorted(tj) == sorted(ta)
    for name in tj:
        assert torch.allclose(tj[name], ta[name], atol=TENSOR_TOL), name
    rj, ra = (json.loads((d / "results.json").read_text()) for d in (joint, alone))
    assert (rj["best_step"], rj["validation"], rj["test"]) == (ra["best_step"], ra["validation"], ra["test"])


@pytest.fixture(scope="module")
def seeds_run(bert_no_dropout, tmp_path_factory):
    if not (DATA / "superglue" / "CB" / "train.jsonl").is_file():
        pytest.skip("data folder not found")
    root = tmp_path_factory.mktemp("seeds")
    assert main(_args(bert_no_dropout, root / "joint") + ["--seeds", "0,1"]) == 0
    for seed in (0, 1):
        assert main(_args(bert_no_dropout, root / f"alone-{seed}") + ["--seed", str(seed)]) == 0
    return root


@needs_data
def test_seeds_in_one_process_equal_separate_runs(seeds_run):
    for seed in (0, 1):
        _assert_same_run(seeds_run / "joint" / f"seed-{seed}", seeds_run / f"alone-{seed}")
    # the two seeds really are different runs
    a, b = (load_file(str(seeds_run / "joint" / f"seed-{s}" / "adapter_model.safetensors")) for s in (0, 1))
    assert not torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])


@needs_data
def test_seeds_resume_equals_the_uninterrupted_runs(seeds_run, bert_no_dropout, tmp_path):
    joint = tmp_path / "joint"
    shutil.copytree(seeds_run / "joint", joint)
    for seed in (0, 1):  # as if stopped after step 2
        shutil.rmtree(joint / f"seed-{seed}" / "checkpoints" / "step-000004")
        (joint / f"seed-{seed}" / "results.json").unlink()
    assert main(_args(bert_no_dropout, joint) + ["--seeds", "0,1", "--resume"]) == 0
    for seed in (0, 1):
        _assert_same_run(joint / f"seed-{seed}", seeds_run / f"alone-{seed}")


@needs_data
def test_sweep_of_methods_rates_and_tasks(bert_no_dropout, tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"description": "three runs", "runs": [
        {"name": "ept"},
        {"name": "pt-fast", "method": "pt", "lr": 0.1, "seed": 3},
        {"name": "rte-dept", "task": "rte", "method": "dept", "lr-low-rank": 3e-2},
    ]}))
    assert main(_args(bert_no_dropout, tmp_path / "sweep") + ["--sweep", str(sweep)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted((p["task"], p["method"]) for p in printed) == [("cb", "ept"), ("cb", "pt"), ("rte", "dept")]
    for name in ("ept", "pt-fast", "rte-dept"):
        assert (tmp_path / "sweep" / name / "results.json").is_file()
    alone = tmp_path / "alone"
    # the shared --rank does not apply to the PT run; a separate PT run cannot take it
    assert main(_args(bert_no_dropout, alone, rank=False) + ["--method", "pt", "--lr", "0.1", "--seed", "3"]) == 0
    _assert_same_run(tmp_path / "sweep" / "pt-fast", alone)


@needs_data
@pytest.mark.parametrize("extra,message", [
    (["--seeds", "0,1", "--method", "lora"], "not 'lora'"),
    (["--seeds", "a,b"], "seeds: expected"),
])
def test_several_runs_bad_input(bert_no_dropout, tmp_path, capsys, extra, message):
    assert main(_args(bert_no_dropout, tmp_path / "x") + extra) == 2
    assert message in capsys.readouterr().err


def _backbone(kind):
    """A backbone without dropout and its tokenizer (MiniLM's)."""
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    if kind in ("causal", "llama"):
        tok.eos_token, tok.bos_token = "[SEP]", "[CLS]"
    torch.manual_seed(0)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if kind == "seq2seq":
        return T5ForConditionalGeneration(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=2, decoder_start_token_id=tok.pad_token_id,
                                                   dropout_rate=0.0, **ids)), tok
    if kind == "causal":
        return GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)), tok
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, **ids)), tok
    return AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=3, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0), tok


@pytest.mark.parametrize("kind,length_waste", [("seq2seq", "auto"), ("causal", "auto"), ("llama", "auto"),
                                               ("minilm", "auto"), ("seq2seq", 0.0), ("causal", None), ("minilm", 0.0)])
def test_runs_of_different_methods_equal_separate_runs(kind, length_waste, tmp_path):
    """T5, GPT-2, Llama and the bundled MiniLM (dropout off); PT and EPT of different prompt lengths. The joint
    step's rows go through passes by length: the CPU default ("auto": 30% padding at most), every length its own
    pass (0.0: each run's rows split over several passes), or one pass for all (None)."""
    backbone, tok = _backbone(kind)
    configs = {"pt": PromptTuningConfig(prompt_length=3),
               "ept": EPTConfig(prompt_length=5, rank=2, offset_length=48, num_subspaces=2, subspace_rank=2,
                                module_init="random")}
    pristine = copy.deepcopy(backbone)
    shared = get_prompted_model(backbone, configs["pt"], adapter_name="pt")
    shared.add_adapter("ept", configs["ept"])
    data = synthetic_cb(n_train=24, n_eval=6)

    def config(name, seed, root):
        return TrainConfig(output_dir=str(root / name), max_steps=3, eval_steps=0, save_steps=3, batch_size=4,
                           eval_batch_size=8, lr=3e-2, lr_low_rank=1e-2, warmup_steps=1, seed=seed,
                           max_new_tokens=3)

    separate = {}
    for seed, name in enumerate(configs):
        shared.set_adapter(name)
        alone = get_prompted_model(copy.deepcopy(pristine), configs[name])
        alone.load_adapter_state_dict(shared.adapter_state_dict())
        train(alone, tok, "cb", data, config(name, seed, tmp_path / "alone"))
    train_runs(shared, tok, [RunSpec(name, "cb", data, config(name, seed, tmp_path / "joint"))
                             for seed, name in enumerate(configs)], length_waste=length_waste)
    for name in configs:
        _assert_same_run(tmp_path / "joint" / name, tmp_path / "alone" / name, step=3)


@needs_data
def test_multirun_benchmark_runs(tmp_path):
    from conftest import load_benchmark

    out = tmp_path / "multirun.md"
    summary = load_benchmark("multirun").main(["--k", "2", "--steps", "2", "--batch-size", "2", "--repeats", "1",
                                               "--prompt-length", "4", "--max-length", "32", "--data-dir", str(DATA),
                                               "--output", str(out)])
    assert summary["ratio"] > 0 and "Speed-up" in out.read_text()
    assert summary["rows"][0]["state_bytes_per_run"] > 0

"""Sharded training (eptkit.sharding, `--fsdp`): 2 CPU processes over gloo against 1 process.

A sharded run of 2 processes x batch 4 sees the rows a 1-process run of batch 8 sees (`BatchPlan`), and
the tasks here are classifications (the loss a mean over rows) on backbones without dropout, so its
per-step losses and its final adapter must equal the 1-process run's up to float summation order.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from conftest import minilm_path, tiny_bert, tiny_llama_classifier, tiny_t5
from eptkit.checkpoint import checkpoint_dirs
from eptkit.cli import main
from eptkit.config import EPTConfig, TrainConfig
from eptkit.sharding import block_classes, check_sharding

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
WEIGHTS = {"pt": "adapter_model.safetensors", "ept": "adapter_model.safetensors",
           "lora": "adapter_model.safetensors", "full": "model.safetensors", "head": "model.safetensors"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama and the bundled MiniLM (dropout off: each process draws its own dropout masks),
    both with MiniLM's tokenizer, and a small 3-class training file."""
    root = tmp_path_factory.mktemp("fsdp")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                           eos_token_id=tok.sep_token_id)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    minilm = root / "minilm"
    minilm.mkdir()
    for f in minilm_path().iterdir():
        if f.is_file() and f.name != "config.json":
            (minilm / f.name).symlink_to(f)
    config = json.loads((minilm_path() / "config.json").read_text())
    (minilm / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                    "attention_probs_dropout_prob": 0.0}))
    words = ["good", "bad", "fine"]
    rows = [{"text": f"the {w} movie number {i} was {w} " + "really " * (i % 5), "label": w}
            for i, w in enumerate(words * 16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:36]))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[36:]))
    return root


def _args(setup, model: str, method: str, steps: int = 6) -> list[str]:
    args = ["train", "--train-file", setup / "train.jsonl", "--validation-file", setup / "val.jsonl",
            "--text-columns", "text", "--task-type", "classification", "--model", setup / model,
            "--method", method, "--max-steps", steps, "--eval-steps", 3, "--save-steps", 2, "--max-length", 32,
            "--lr", 3e-2, "--lr-low-rank", 1e-2, "--lr-full", 1e-3]
    if method in ("pt", "ept"):
        args += ["--prompt-length", 4]
    if method == "ept":
        args += ["--rank", 2]
    return [str(a) for a in args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], out: Path, batch: int = 4, **popen) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m eptkit.cli train --fsdp ...`: 2 CPU processes over gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "eptkit.cli", *args, "--batch-size", str(batch), "--fsdp", "--output-dir",
           str(out)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _sharded(args, out: Path) -> None:
    proc = _torchrun(args, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _log(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def _assert_close_runs(a: Path, b: Path, weights: str, rtol: float) -> None:
    la, lb = _log(a), _log(b)
    assert [s for s, _ in la] == [s for s, _ in lb] and len(la) == 6
    for (_, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= rtol * abs(x), (la, lb)
    ta, tb = load_file(str(a / weights)), load_file(str(b / weights))
    assert set(ta) == set(tb) and ta
    for k in ta:
        # Relative in the tensor's norm. Element by element, a component whose gradient is ~0 (EPT's U
        # while V is near 0) may differ more: Adam divides each gradient by its own running size, so two
        # summation orders of a rounding-level gradient step by a whole rate apart (MiniLM EPT: 1.9e-6
        # on elements of 0.06 after 6 steps, 3e-7 of U's norm).
        assert tuple(ta[k].shape) == tuple(tb[k].shape), k
        assert (ta[k] - tb[k]).norm() <= rtol * ta[k].norm(), (k, float((ta[k] - tb[k]).norm() / ta[k].norm()))
    assert not torch.equal(ta[next(iter(ta))], torch.zeros_like(ta[next(iter(ta))]))


@pytest.mark.parametrize("model,method,accumulate", [
    ("llama", "pt", 1), ("llama", "ept", 1), ("minilm", "pt", 1), ("minilm", "ept", 1), ("llama", "lora", 1),
    ("llama", "full", 1), ("llama", "head", 1), ("llama", "ept", 2)])
def test_two_sharded_processes_match_one_process(setup, tmp_path, capsys, model, method, accumulate):
    # accumulate 2: micro-batches of 2 rows per process against 4 in one process; the sharded gradients
    # are reduced on the last micro-batch only (`eptkit.sharding.no_sync`)
    args = [*_args(setup, model, method), "--gradient-accumulation-steps", str(accumulate)]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _torchrun(args, two, batch=4 // accumulate)  # meanwhile, the 1-process run here, same global batch
    assert main([*args, "--batch-size", str(8 // accumulate), "--output-dir", str(one)]) == 0
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    _assert_close_runs(one, two, WEIGHTS[method], rtol=1e-5)
    # sharded: each process saved its own shard of the optimizer state; the adapter files are whole
    ckpt = checkpoint_dirs(two)[-1]
    assert {p.name for p in ckpt.glob("optimizer*")} == {"optimizer-0.pt", "optimizer-1.pt"}
    results = json.loads((two / "results.json").read_text())
    assert results["num_processes"] == 2
    if method == "ept":  # the sharded run's adapter, loaded and scored in one plain process
        capsys.readouterr()
        assert main(["evaluate", "--adapter", str(two), "--split", "validation"]) == 0
        scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scored["accuracy"] == pytest.approx(results["validation"]["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("model,method", [("llama", "ept"), ("minilm", "pt")])
def test_resume_after_kill_ends_where_the_uninterrupted_sharded_run_ends(setup, tmp_path, model, method):
    args = _args(setup, model, method)
    a, b = tmp_path / "a", tmp_path / "b"
    killed = _torchrun(args, b, start_new_session=True)
    uninterrupted = _torchrun(args, a)
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None and not checkpoint_dirs(b):
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # torchrun and both workers, at once
    killed.wait(timeout=60)
    assert not (b / "results.json").exists(), "the run ended before it could be killed"
    assert checkpoint_dirs(b)[-1].name != "step-000006"
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    _sharded([*args, "--resume"], b)
    # the same processes and the same shards: the resumed run is the uninterrupted one
    _assert_close_runs(a, b, WEIGHTS[method], rtol=1e-6)
    for name in ("trainable.safetensors", "best.safetensors"):
        ta, tb = (load_file(str(d / "checkpoints" / "step-000006" / name)) for d in (a, b))
        assert all(torch.allclose(ta[k], tb[k], rtol=1e-6, atol=0) for k in ta)


def test_sharded_layout_and_gathered_adapter(setup, tmp_path):
    """The blocks are FSDP units holding half of each weight per process; the adapter gathered whole."""
    script = tmp_path / "layout.py"
    script.write_text(f"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from eptkit.config import EPTConfig
from eptkit.backbones import load_backbone
from eptkit.model import get_prompted_model
from eptkit.sharding import full_state, shard_model
dist.init_process_group("gloo")
torch.manual_seed(0)
backbone, tok = load_backbone({str(setup / "llama")!r}, "classification", num_labels=3)
model = get_prompted_model(backbone, EPTConfig(prompt_length=3, rank=2, max_length=16), tokenizer=tok)
before = {{k: v.clone() for k, v in model.adapter_state_dict().items()}}
layer = model.backbone.model.layers[0]
whole = layer.mlp.up_proj.weight.shape
shard_model(model, torch.device("cpu"), 2)
after = full_state(model)
out = {{"units": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
        "local": list(layer.mlp.up_proj.weight.to_local().shape), "whole": list(whole),
        "same": all(torch.equal(before[k], after[k]) for k in before)}}
if dist.get_rank() == 0:
    print(json.dumps(out))
dist.destroy_process_group()
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["units"] == ["FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer", "FSDPPromptedModel"]
    assert out["local"] == [out["whole"][0] // 2, out["whole"][1]]
    assert out["same"]


# ---------------------------------------------------------------------------------------------- no processes
def test_block_classes_are_the_transformer_blocks():
    cfg = EPTConfig(prompt_length=2, rank=2, max_length=16)
    from eptkit.model import get_prompted_model

    # BERT declares BertEmbeddings too; eptkit reads the word embeddings outside its forward, so it stays
    # with the root unit
    assert block_classes(get_prompted_model(tiny_bert(), cfg)) == ["BertLayer"]
    assert block_classes(get_prompted_model(tiny_llama_classifier(), cfg)) == ["LlamaDecoderLayer"]
    assert block_classes(tiny_t5()) == ["T5Block"]
    backbone = tiny_bert()
    for m in backbone.modules():  # no declaration: the longest stack of identical modules
        if hasattr(m, "_no_split_modules"):
            m._no_split_modules = None
    assert block_classes(backbone) == ["BertLayer"]


def _acc(n: int):
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=n)


def test_bad_combinations_are_one_line_errors(tmp_path, capsys):
    from eptkit.model import get_prompted_model

    model = get_prompted_model(tiny_bert(), EPTConfig(prompt_length=2, rank=2, max_length=16))
    with pytest.raises(ValueError, match="fsdp: must be true or false"):
        TrainConfig(fsdp="yes")
    with pytest.raises(ValueError, match="^fsdp: a single process has nothing to shard"):
        check_sharding(TrainConfig(fsdp=True), model, _acc(1))
    assert check_sharding(TrainConfig(fsdp=True), model, _acc(2)) is True
    assert check_sharding(TrainConfig(), model, _acc(2)) is False  # DDP
    for method in ("ptuning", "prefix"):
        refused = types.SimpleNamespace(method_name=method, task_type="classification")
        with pytest.raises(ValueError, match=f"^fsdp: method '{method}' is not supported"):
            check_sharding(TrainConfig(fsdp=True), refused, _acc(2))
    t5 = get_prompted_model(tiny_t5(), EPTConfig(prompt_length=2, rank=2, max_length=16))
    with pytest.raises(ValueError, match="^fsdp: seq2seq .generation. tasks are not supported"):
        check_sharding(TrainConfig(fsdp=True), t5, _acc(2))
    from eptkit.multirun import MultiTrainer, RunSpec

    with pytest.raises(ValueError, match="^fsdp: several runs in one process"):
        MultiTrainer(model, None, [RunSpec("default", "cb", {}, TrainConfig(fsdp=True, output_dir=str(tmp_path)))])
    # through the command line: one line each, naming the flag
    rows = "".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8))
    (tmp_path / "d.jsonl").write_text(rows)
    base = ["train", "--train-file", str(tmp_path / "d.jsonl"), "--text-columns", "text", "--model",
            str(minilm_path()), "--output-dir", str(tmp_path / "x"), "--max-steps", "1"]
    for extra, text in ((["--fsdp", "--seeds", "0,1"], "--fsdp trains one run per launch"),
                        (["--fsdp"], "fsdp: a single process has nothing to shard"),
                        (["--mixed-precision", "fp16"], "mixed_precision: 'fp16' needs a GPU")):
        assert main([*base, *extra]) != 0
        err = [line for line in capsys.readouterr().err.strip().splitlines() if text in line]
        assert len(err) == 1, extra


def test_fsdp_config_loads_in_accelerate_and_wraps_the_blocks(monkeypatch):
    """recipes/accelerate/fsdp.yaml through accelerate's own loader and launcher environment: FSDP2,
    transformer-block wrapping, and the blocks it wraps in an eptkit model are the ones --fsdp shards."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from eptkit.model import get_prompted_model

    path = ROOT / "recipes" / "accelerate" / "fsdp.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config  # taken from the model
    assert load_config_from_file(str(ROOT / "recipes" / "accelerate" / "ddp.yaml")).distributed_type == \
        DistributedType.MULTI_GPU
    args, *_ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    for backbone, block in ((tiny_llama_classifier(), "LlamaDecoderLayer"), (tiny_bert(), "BertLayer")):
        model = get_prompted_model(backbone, EPTConfig(prompt_length=2, rank=2, max_length=16))
        plugin = FullyShardedDataParallelPlugin()
        plugin.set_auto_wrap_policy(model)
        wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [m for m in model.modules() if wraps(m)]
        assert wrapped and {type(m).__name__ for m in wrapped} == {block}
        assert len(wrapped) == len(backbone.base_model.layers if block.startswith("Llama")
                                   else backbone.bert.encoder.layer)


def test_gpu_recipe_builds_on_a_tiny_llama_of_its_architecture(setup, tmp_path):
    """recipes/llama7b/rte.json with its 7B model swapped for a tiny Llama of the same architecture
    (LlamaForSequenceClassification, grouped-query attention, positions for prompt + text): the options
    resolve, the configs validate, the sharding checks pass under accelerate's FSDP, the blocks are the
    decoder layers, and a bf16 forward and backward runs."""
    from accelerate.utils import DistributedType

    from eptkit.backbones import load_backbone
    from eptkit.baselines import build_model
    from eptkit.options import build_configs, resolve
    from eptkit.tasks.registry import get_task

    recipe = ROOT / "recipes" / "llama7b" / "rte.json"
    tiny = tmp_path / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    LlamaModel(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           pad_token_id=tok.pad_token_id)).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    options = resolve({"config": str(recipe), "model": str(tiny)})
    assert json.loads(recipe.read_text())["model"] != str(tiny)  # the recipe names the real one
    method_config, config = build_configs(options)
    assert (config.mixed_precision, config.fsdp, method_config.method) == ("bf16", True, "ept")
    spec = get_task(options["task"])
    backbone, tokenizer = load_backbone(str(tiny), options["task_type"], spec)
    assert type(backbone).__name__ == "LlamaForSequenceClassification"
    model = build_model(backbone, "ept", method_config, tokenizer=tokenizer)
    fsdp_acc = types.SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=8)
    assert check_sharding(config, model, fsdp_acc) is False  # accelerate shards; the checks passed
    assert check_sharding(config, model, _acc(2)) is True  # the same recipe under torchrun --fsdp
    assert block_classes(model) == ["LlamaDecoderLayer"]
    batch = tokenizer(["a premise . a hypothesis", "another one"], padding=True, return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss) and model.method.prompt_embeddings.grad is not None


def test_gpu_script_fsdp_smoke_parses():
    """benchmarks/gpu.sh's FSDP smoke run: accelerate's FSDP config and train options eptkit accepts."""
    import re
    import shlex

    from eptkit.cli import build_parser, resolve_train_options
    from eptkit.options import build_configs

    script = (ROOT / "benchmarks" / "gpu.sh").read_text().replace("\\\n", " ")
    lines = [line for line in script.splitlines() if "-m eptkit.cli train" in line and "fsdp.yaml" in line]
    assert len(lines) == 1
    call = re.sub(r"\"?\$\{?\w+\}?[^\" ]*\"?", "x", lines[0].split("-m eptkit.cli", 1)[1].split("2>&1")[0])
    options = resolve_train_options(build_parser().parse_args(shlex.split(call)))
    _, config = build_configs(options)
    assert (config.mixed_precision, config.max_steps, config.save_steps) == ("bf16", 20, 10)

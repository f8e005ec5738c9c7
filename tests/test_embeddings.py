"""Reading the word-embedding matrix when no process holds it whole (`eptkit.embeddings`).

Every reader (the prompt's start, the embedding RMS of lr_unit='embedding_rms', hidden and vocabulary
sizes, parameter counts, adapter files) must give on a sharded backbone what it gives on the same
backbone unsharded. Two kinds of sharding:

- DeepSpeed ZeRO-3: the weight is a shape-[0] placeholder with `ds_shape` / `ds_numel`, filled in only
  inside `deepspeed.zero.GatheredParameters`. A fake `deepspeed` module stands in (its gather puts the
  real matrix back for the length of the `with` and counts its calls), so this runs without DeepSpeed;
  a test with the real one runs where it is installed.
- FSDP2: `fully_shard` in a one-process gloo group makes the weight a DTensor sharded over rows.
"""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import HIDDEN, VOCAB, tiny_bert, tiny_llama, tiny_t5
from eptkit import DePTConfig, EPTConfig, PromptTuningConfig
from eptkit.backbones import backbone_facts
from eptkit.embeddings import embedding_shape, read_embeddings
from eptkit.model import PromptedModel, load_adapter
from eptkit.optim import embedding_rms

CONFIGS = [
    PromptTuningConfig(prompt_length=5, init="sample_vocab"),
    PromptTuningConfig(prompt_length=7, init="text", init_text="x"),
    PromptTuningConfig(prompt_length=5, init="random"),
    DePTConfig(prompt_length=4, rank=2, max_length=16, init="sample_vocab"),
    EPTConfig(prompt_length=4, rank=2, max_length=16, init="text", init_text="x"),
]
TEXT_IDS = [5, 17, 3]  # the tokenized init text (no tokenizer needed: passed as ids)


def build(backbone, config):
    torch.manual_seed(11)
    if config.init == "text":
        return PromptedModel(backbone, config, method=_method(config, backbone))
    return PromptedModel(backbone, config)


def _method(config, backbone):
    from eptkit.methods import build_method

    return build_method(config, backbone.get_input_embeddings(), TEXT_IDS)


def facts(model: PromptedModel) -> dict:
    """Everything eptkit reads of the vocabulary, from an independent computation where it can be."""
    return {"prompt": model.method.prompt_embeddings.detach().clone(), "hidden": model.hidden_size,
            "rms": embedding_rms(model), "backbone": backbone_facts(model.backbone),
            "total": model.num_parameters(trainable_only=False),
            "no_embeddings": model.num_parameters(trainable_only=False, exclude_embeddings=True),
            "trainable": model.num_parameters()}


def assert_same_facts(sharded: dict, reference: dict):
    torch.testing.assert_close(sharded.pop("prompt"), reference.pop("prompt"), rtol=0, atol=0)
    assert sharded == reference


# ---------------------------------------------------------------------------------------------- ZeRO-3
class FakeZero3:
    """Stands in for deepspeed: `zero.GatheredParameters` fills the placeholders in, then empties them."""

    def __init__(self):
        self.full: dict[int, torch.Tensor] = {}
        self.calls = 0
        self.module = types.ModuleType("deepspeed")
        self.module.zero = types.SimpleNamespace(GatheredParameters=self.gathered)

    def partition(self, param: nn.Parameter) -> None:
        """Make `param` a ZeRO-3 placeholder as DeepSpeed does: data of shape [0], ds_shape, ds_numel."""
        self.full[id(param)] = param.data
        param.ds_shape, param.ds_numel = param.data.shape, param.data.numel()
        param.data = torch.empty(0, dtype=param.dtype)

    @contextlib.contextmanager
    def gathered(self, params, modifier_rank=None):
        assert modifier_rank is None  # read-only: nothing to scatter back
        self.calls += 1
        for p in params:
            p.data = self.full[id(p)]
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)


@pytest.fixture
def zero3(monkeypatch):
    fake = FakeZero3()
    monkeypatch.setitem(sys.modules, "deepspeed", fake.module)
    return fake


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.init}")
@pytest.mark.parametrize("make", [tiny_bert, tiny_t5, tiny_llama], ids=["bert", "t5", "llama"])
def test_zero3_placeholder_reads_as_the_whole_matrix(zero3, make, config):
    reference = facts(build(make(), config))
    backbone = make()
    for param in backbone.parameters():  # ZeRO-3 partitions every parameter, the head's too
        zero3.partition(param)
    weight = backbone.get_input_embeddings().weight
    assert weight.shape == (0,)  # what a reader that does not gather would see
    assert embedding_shape(weight) == (VOCAB, HIDDEN)
    calls = zero3.calls
    sharded = facts(build(backbone, config))
    assert zero3.calls > calls  # the values were read inside the gather...
    assert weight.shape == (0,)  # ...which was left again
    assert_same_facts(sharded, reference)


def test_read_embeddings_gathers_once_and_matches_the_plain_matrix(zero3):
    backbone = tiny_bert()
    weight = backbone.get_input_embeddings().weight.detach().clone()
    zero3.partition(backbone.get_input_embeddings().weight)
    got = read_embeddings(backbone.get_input_embeddings(), [3, 0, 119, 3])
    assert zero3.calls == 1
    assert (got.vocab_size, got.hidden_size) == tuple(weight.shape)
    assert got.rms == pytest.approx(float(weight.pow(2).mean().sqrt()), rel=1e-6)
    assert got.std == pytest.approx(float(weight.std()), rel=1e-6)
    torch.testing.assert_close(got.rows, weight[[3, 0, 119, 3]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^token ids: must lie in \[0, 120\)"):
        read_embeddings(backbone.get_input_embeddings(), [VOCAB])


def test_an_adapter_loads_onto_a_zero3_backbone(zero3, tmp_path):
    config = EPTConfig(prompt_length=4, rank=2, max_length=16, init="sample_vocab")
    trained = build(tiny_bert(), config)
    with torch.no_grad():
        trained.method.prompt_embeddings.add_(1.0)  # not the initial values
    trained.save_pretrained(tmp_path)
    backbone = tiny_bert()
    zero3.partition(backbone.get_input_embeddings().weight)
    loaded = load_adapter(backbone, tmp_path)  # checks hidden and vocabulary sizes against the backbone
    for name, tensor in trained.adapter_state_dict().items():
        torch.testing.assert_close(loaded.adapter_state_dict()[name], tensor, rtol=0, atol=0)


def test_an_unknown_placeholder_is_a_clear_error():
    with pytest.raises(ValueError, match="^word embeddings: expected a vocab x hidden matrix, found shape"):
        embedding_shape(torch.empty(0))


# ---------------------------------------------------------------------------------------------- FSDP2
@pytest.fixture
def one_process_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def shard(module, layers, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


def test_fsdp2_sharded_weights_read_as_the_whole_matrix(one_process_group):
    from torch.distributed.tensor import DTensor

    for config in CONFIGS:  # a PromptedModel built on a sharded backbone
        reference = facts(build(tiny_bert(), config))
        backbone = tiny_bert()
        shard(backbone, backbone.bert.encoder.layer, one_process_group)
        assert isinstance(backbone.get_input_embeddings().weight, DTensor)
        assert_same_facts(facts(build(backbone, config)), reference)


def test_fsdp2_sharded_prompted_model_reads_and_runs_as_unsharded(one_process_group):
    """The order `accelerator.prepare` follows: the PromptedModel is built, then sharded as the root. The
    offset and the text's embeddings are a forward through the embedding module, which the root gathers."""
    from torch.distributed.tensor import DTensor

    config = CONFIGS[-1]
    reference_model = build(tiny_bert(), config).eval()
    reference = facts(reference_model)
    model = build(tiny_bert(), config).eval()
    shard(model, model.backbone.bert.encoder.layer, one_process_group)
    assert isinstance(model.word_embeddings.weight, DTensor)
    sharded = facts(model)
    sharded["prompt"] = sharded["prompt"].full_tensor()
    assert_same_facts(sharded, reference)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference_model(input_ids=ids).logits,
                                   rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- real DeepSpeed
ZERO3_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import deepspeed
from conftest import tiny_bert
from test_embeddings import CONFIGS, build, facts

deepspeed.init_distributed(dist_backend="gloo")
out = {}
for i, config in enumerate(CONFIGS):
    reference = facts(build(tiny_bert(), config))
    backbone = tiny_bert()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    deepspeed.initialize(model=backbone, config=ds_config, model_parameters=backbone.parameters())
    weight = backbone.get_input_embeddings().weight
    placeholder = list(weight.shape)
    sharded = facts(build(backbone, config))
    out[i] = {"placeholder": placeholder, "after": list(weight.shape),
              "prompt_equal": bool(torch.equal(sharded.pop("prompt"), reference.pop("prompt"))),
              "sharded": sharded, "reference": reference}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_real_deepspeed_zero3_partitioned_backbone(tmp_path):
    """DeepSpeed's own ZeRO-3 partitioning (CPU accelerator, gloo, one process) of a tiny BERT: eptkit's
    reads equal the unsharded model's. Runs in its own process: DeepSpeed patches torch globally."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(Path(__file__).parent)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    for i, run in json.loads(lines[0][len("RESULT "):]).items():
        assert run["placeholder"] == [0] and run["after"] == [0], i  # partitioned, and left partitioned
        assert run["prompt_equal"], i
        assert run["sharded"] == run["reference"], i


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""kill -9 at random points of adapter and checkpoint writing never leaves a directory that loads as a
wrong adapter: what loads is one of the adapters written, whole, or the load fails with AdapterError
(eptkit's format and PEFT's). A run killed after a checkpoint and continued with --resume writes what
an uninterrupted run writes, bit for bit, at 1 and at 2 threads, for EPT and the PEFT-format baselines."""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

from conftest import minilm_path, tiny_bert
from eptkit import AdapterError, DePTConfig, get_prompted_model, load_adapter, save_adapter
from eptkit.baselines import LoRAModel, PeftPromptModel, load_baseline
from eptkit.checkpoint import RunState, checkpoint_dirs, save_checkpoint
from eptkit.cli import main
from test_cli import ENV, needs_data, small_train_args


class _Acc:  # one process, no accelerate
    is_main_process, process_index, num_processes, scaler = True, 0, 1, None

    def wait_for_everyone(self):
        pass


def _filled(model, value: float):
    """`model` with every trainable weight set to `value`."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(value)
    return model


def _models():
    """Two different adapters, of different shapes; every trainable weight of adapter i is i + 1."""
    models = []
    for i in range(2):
        torch.manual_seed(i)
        models.append(_filled(get_prompted_model(tiny_bert(), DePTConfig(prompt_length=3 + i, offset_length=8, rank=2)),
                              float(i + 1)))
    return models


def _write_forever(models, adapter, run):
    """The child: alternate the two adapters, as save_pretrained and as checkpoints, until killed."""
    torch.set_num_threads(1)  # no OpenMP team in a forked child
    opt = torch.optim.AdamW([p for p in models[0].parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = 0
    while True:
        m = models[step % 2]
        step += 1
        save_adapter(m, adapter)
        save_checkpoint(run, RunState(step=step), accelerator=_Acc(), trainable=m.adapter_state_dict(), best=None,
                        optimizer=opt, scheduler=sched, rng=None, meta={}, keep=2)


def test_kill_9_while_writing_never_loads_a_wrong_adapter(tmp_path):
    adapter, run = tmp_path / "adapter", tmp_path / "run"
    models = _models()
    expected = [{k: v.clone() for k, v in m.adapter_state_dict().items()} for m in models]
    rng = random.Random(0)
    loaded_ok = 0
    for _ in range(12):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _write_forever(models, adapter, run)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            loaded = load_adapter(tiny_bert(), adapter)
        except AdapterError:
            pass
        else:
            loaded_ok += 1
            state = loaded.adapter_state_dict()
            want = expected[loaded.config.prompt_length - 3]  # the config says which adapter; the tensors agree
            assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
        for ckpt in checkpoint_dirs(run):  # complete checkpoints only, each of the adapter of its step
            assert {p.name for p in ckpt.iterdir()} >= {"trainable.safetensors", "optimizer.pt", "trainer_state.json",
                                                         "rng-0.pt"}
            trainable = load_file(str(ckpt / "trainable.safetensors"))
            want = expected[(int(ckpt.name[5:]) - 1) % 2]
            assert set(trainable) == set(want) and all(torch.equal(trainable[k], want[k]) for k in want)
    assert loaded_ok > 0


def _baselines(method):
    """Two PEFT-format baselines of different shapes; every trainable weight of baseline i is i + 1."""
    models = []
    for i in range(2):
        m = LoRAModel(tiny_bert(), r=2 + 2 * i) if method == "lora" else PeftPromptModel(
            tiny_bert(), "ptuning", num_virtual_tokens=3 + i, encoder_hidden_size=8)
        models.append(_filled(m, float(i + 1)))
    return models


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_kill_9_while_saving_a_peft_baseline_never_loads_a_wrong_one(tmp_path, method):
    models = _baselines(method)
    adapter = tmp_path / "adapter"

    def loaded_tensors(directory) -> dict:
        return {k: v.detach() for k, v in load_baseline(tiny_bert(), directory).inner.named_parameters()}

    expected = []  # each baseline saved alone and loaded back (P-tuning saves its encoder's output)
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"alone-{i}")
        expected.append(loaded_tensors(tmp_path / f"alone-{i}"))

    def loads_whole_or_refuses() -> bool:
        try:
            state = loaded_tensors(adapter)
        except AdapterError:
            return False
        # the shapes say which baseline it should be; every tensor must then be that one's
        (want,) = [w for w in expected if all(k in state and state[k].shape == w[k].shape for k in w)]
        assert all(torch.equal(state[k], want[k]) for k in want)
        return True

    rng = random.Random(1)
    loaded_ok = 0
    for _ in range(10):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                torch.set_num_threads(1)
                for step in itertools.count():
                    models[step % 2].save_pretrained(adapter)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded_ok += loads_whole_or_refuses()
    assert loaded_ok > 0
    models[1].save_pretrained(adapter)  # what a resumed run does: save again, whole
    assert loads_whole_or_refuses() and not list(adapter.glob(".peft-*"))


# ---------------------------------------------------------------------------------------------- kill -9 a run
@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    """A 1-layer BERT of width 128 with MiniLM's tokenizer: wide enough (8 rows x 64 tokens x 128) that
    a gather whose backward adds atomically splits across 2 threads, and the runs drift apart."""
    path = tmp_path_factory.mktemp("wide_bert")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _killed_after_a_checkpoint(args, threads: int, out: Path) -> subprocess.Popen:
    """`eptkit train` in its own process at `threads` intra-op threads, killed (SIGKILL) once its
    first checkpoint exists."""
    env = {**ENV, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "eptkit.cli", *args, "--output-dir", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoint_dirs(out):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        proc.kill()
    return proc


def _train_here(args, threads: int, out: Path) -> None:
    """`eptkit train` in this process at `threads` threads (eptkit pins the count it starts with)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert main([*args, "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(before)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("method,threads", [("ept", 1), ("ept", 2), ("lora", 2), ("ptuning", 2)])
def test_kill_9_then_resume_matches_an_uninterrupted_run(wide_bert, tmp_path, method, threads):
    # 2 threads: with EPT's offset gathered as offset[positions] two uninterrupted runs of this size
    # already differed in their last bits; F.embedding's backward does not depend on thread timing.
    args = small_train_args(wide_bert, tmp_path / "unused", method, steps=12)
    args = args[:args.index("--output-dir")] + args[args.index("--output-dir") + 2:]
    for key, value in (("--save-steps", "4"), ("--eval-steps", "6"), ("--batch-size", "8")):
        args[args.index(key) + 1] = value
    a, b = tmp_path / "a", tmp_path / "b"
    _train_here(args, threads, a)
    killed = _killed_after_a_checkpoint(args, threads, b)
    assert killed.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {killed.stderr.read()}"
    assert not (b / "results.json").exists()
    _train_here(args + ["--resume"], threads, b)
    # bit for bit: the last checkpoint's tensors and the best adapter written in the method's format
    for name in ("checkpoints/step-000012/trainable.safetensors", "adapter_model.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), name
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["num_threads"] == rb["num_threads"] == threads
    assert ra["test"] == rb["test"] and ra["best_step"] == rb["best_step"]

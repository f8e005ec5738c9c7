"""kill -9 at random points of adapter and checkpoint writing never leaves a directory that loads as a
wrong adapter: what loads is one of the adapters written, whole, or the load fails with AdapterError."""

import os
import random
import signal
import time

import torch
from safetensors.torch import load_file

from conftest import tiny_bert
from eptkit import AdapterError, DePTConfig, get_prompted_model, load_adapter, save_adapter
from eptkit.checkpoint import RunState, checkpoint_dirs, save_checkpoint


class _Acc:  # one process, no accelerate
    is_main_process, process_index, num_processes, scaler = True, 0, 1, None

    def wait_for_everyone(self):
        pass


def _models():
    """Two different adapters, of different shapes; every trainable weight of adapter i is i + 1."""
    models = []
    for i in range(2):
        torch.manual_seed(i)
        m = get_prompted_model(tiny_bert(), DePTConfig(prompt_length=3 + i, max_length=8, rank=2))
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.fill_(float(i + 1))
        models.append(m)
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

"""Checkpoints: everything needed to continue a run exactly where it stopped.

checkpoints/step-NNNNNN/ holds
  trainable.safetensors   the trainable tensors now          best.safetensors   the best ones so far
  optimizer.pt            optimizer, scheduler (and fp16 grad-scaler) state, read back weights_only=True
  optimizer-R.pt          instead, where each process keeps its own part of the optimizer's state (FSDP,
                          DeepSpeed ZeRO; `eptkit.sharding.Placement`): process R's part
  rng-R.pt                the RNG states of process R (dropout differs per process)
  trainer_state.json      `RunState` (data position, best metric, timings), the configs and method
A checkpoint is written into a temporary directory and renamed, so it exists completely or not at
all; only the newest `save_total_limit` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .config import TRAJECTORY_FIELDS, TrainConfig, saved_under_new_names
from .files import atomic_save_safetensors, atomic_torch_save, atomic_write_json, fsync_dir
from .sharding import load_local_optimizer_state, load_whole, local_optimizer_state

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class RunState:
    """Where a run is and the best it has seen: what a checkpoint saves besides tensors and RNG."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data position of the next micro-batch (`BatchPlan`)
    batch: int = 0
    best_metric: float | None = None  # validation main metric of the best evaluation so far
    best_step: int | None = None
    best_metrics: dict | None = None
    best_test_metrics: dict | None = None  # test scores of the best step, when test_at_best scored them then
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    train_time: float = 0.0
    step_times: list[float] = field(default_factory=list)
    tokens_seen: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> "RunState":
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.step_times = list(state.step_times)
        return state


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    s = state["numpy"]
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save / load
def checkpoint_dirs(output_dir) -> list[Path]:
    """The run's checkpoint directories, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _remove(directory: Path) -> None:
    """Rename, then delete: a kill -9 during the deletion leaves a hidden .old-* folder, never a
    half-deleted step-N that looks like a checkpoint."""
    trash = directory.parent / f".old-{directory.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(directory, trash)
    fsync_dir(directory.parent)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(output_dir: Path, state: RunState, *, accelerator, trainable, best, optimizer, scheduler,
                    rng: dict | None, meta: dict, keep: int, per_process_optimizer: bool = False) -> Path:
    """Write checkpoints/step-N/ (every process calls this; only the main one writes the shared files).

    trainable, best: tensors (main process; best may be None). meta: what trainer_state.json records
    besides `state` (configs, method). keep: how many checkpoints to keep. per_process_optimizer: each
    process holds its own part of the optimizer's state (FSDP, DeepSpeed ZeRO; `eptkit.sharding.Placement`)
    and writes it (optimizer-R.pt), never gathered in one place.
    """
    acc = accelerator
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*-step-*"):  # left by a killed save or removal
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    atomic_torch_save(rng or rng_state(), tmp / f"rng-{acc.process_index}.pt")
    if per_process_optimizer:
        atomic_torch_save(_optimizer_files(acc, optimizer, scheduler, local_optimizer_state(optimizer)),
                          tmp / f"optimizer-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_save_safetensors(tmp / "trainable.safetensors", trainable)
        if best is not None:
            atomic_save_safetensors(tmp / "best.safetensors", best)
        if not per_process_optimizer:
            atomic_torch_save(_optimizer_files(acc, optimizer, scheduler, optimizer.state_dict()),
                              tmp / "optimizer.pt")
        atomic_write_json(tmp / "trainer_state.json",
                          {**dataclasses.asdict(state), "num_processes": acc.num_processes, **meta})
        fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: replace it
            trash = root / f".old-{final.name}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            _remove(old)
    acc.wait_for_everyone()
    return final


def _optimizer_files(acc, optimizer, scheduler, optimizer_state: dict) -> dict:
    opt = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    if getattr(acc, "scaler", None) is not None:
        opt["scaler"] = acc.scaler.state_dict()
    return opt


def _max_steps_change(saved_config: dict, config: TrainConfig, step: int) -> list[str]:
    """["max_steps"] when a new max_steps would change the resumed run's trajectory, else [].

    With a linear schedule the rates decay to 0 at max_steps, so every step after the checkpoint would
    differ; with a constant schedule and a warm-up counted in steps (or none) a longer run is the same
    run continued, which is what extending a finished run means."""
    fixed_warmup = config.warmup_steps > 0 or config.warmup_ratio == 0
    if config.lr_schedule == "constant" and fixed_warmup and config.max_steps >= step:
        return []
    return ["max_steps"]


def load_checkpoint(directory: Path, *, accelerator, config: TrainConfig, meta: dict, model, optimizer,
                    scheduler, per_process_optimizer: bool = False) -> tuple[RunState, dict | None]:
    """Restore model tensors, optimizer, scheduler and this process's RNG from `directory`; return the
    run state and the best tensors. A checkpoint of other settings (`meta`: method and its config), of
    another number of processes or of another optimizer layout (`per_process_optimizer`, as in
    `save_checkpoint`) is refused: the resumed run could not equal an uninterrupted one."""
    acc = accelerator
    saved = json.loads((directory / "trainer_state.json").read_text())
    if saved.get("num_processes", 1) != acc.num_processes:
        raise ValueError(f"{directory}: checkpoint was written by {saved['num_processes']} process(es); "
                         f"resume with the same number (now {acc.num_processes})")
    own = directory / f"optimizer-{acc.process_index}.pt"
    if per_process_optimizer != own.is_file():
        kept = {False: "in one file (optimizer.pt: one process, DDP)",
                True: "per process (optimizer-R.pt: FSDP, DeepSpeed ZeRO)"}
        raise ValueError(f"{directory}: the checkpoint keeps the optimizer's state {kept[own.is_file()]}, this "
                         f"launch keeps it {kept[per_process_optimizer]}: resume under the launch settings that "
                         "wrote it (accelerate config, --fsdp)")
    if isinstance(saved.get("method_config"), dict):  # written when offset_length was called max_length
        saved["method_config"] = saved_under_new_names(saved["method_config"])
    if saved.get("method_config") != meta["method_config"] or saved.get("method") != meta["method"]:
        raise ValueError(f"{directory}: checkpoint is of method {saved.get('method')!r} with "
                         f"{saved.get('method_config')}; the model now is {meta['method']!r} with "
                         f"{meta['method_config']}")
    saved_config = saved.get("config", {})
    changed = [k for k in TRAJECTORY_FIELDS if k in saved_config and saved_config[k] != getattr(config, k)]
    if "max_steps" in saved_config and saved_config["max_steps"] != config.max_steps:
        changed += _max_steps_change(saved_config, config, saved.get("step", 0))
    if changed:
        diffs = ", ".join(f"{k}={saved_config[k]!r} in the checkpoint's run, --{k.replace('_', '-')} "
                          f"{getattr(config, k)!r} now" for k in changed)
        hint = ("; a run extends to more steps only with --lr-schedule constant and --warmup-steps N (or no "
                "warm-up), under which the longer run is the same run continued" if "max_steps" in changed else "")
        raise ValueError(f"{directory}: cannot resume with different settings: {diffs}{hint}")
    # Each process into its shard or ZeRO-3 partition (a collective there: every process loads).
    load_whole(model, load_file(str(directory / "trainable.safetensors")), acc.device)
    best_path = directory / "best.safetensors"
    best = load_file(str(best_path)) if best_path.is_file() else None
    opt = torch.load(own if per_process_optimizer else directory / "optimizer.pt", map_location="cpu",
                     weights_only=True)
    # After the weights: ZeRO-3's optimizer load sets them again, from the fp32 master weights it restores.
    if per_process_optimizer:
        load_local_optimizer_state(optimizer, opt["optimizer"])
    else:
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if "scaler" in opt and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(opt["scaler"])
    set_rng_state(torch.load(directory / f"rng-{acc.process_index}.pt", map_location="cpu", weights_only=True))
    return RunState.from_dict(saved), best

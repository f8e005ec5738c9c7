"""What a training run tells: progress for people (a bar or printed lines), log.jsonl (one record per
step) and the results.json summary, with the versions and peak memory it records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .files import round_floats
from .version import __version__


class Report:
    """Progress for people (a bar on a terminal, else printed lines) and log.jsonl, main process only."""

    def __init__(self, log_path: Path, is_main: bool):
        self.log_path, self.is_main, self.bar = log_path, is_main, None
        self.prefix = ""  # several runs in one process: "[name] ", so that each line says whose it is

    def open_bar(self, total: int, initial: int) -> None:
        if self.is_main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def progress(self, step: int, config, loss: float, lrs: dict, dt: float, step_times: list[float]) -> None:
        """The bar moves every step; without a terminal, a line every logging_steps (about 20 a run), and
        one after the first step at once: a long run says how long it will take."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step % (config.logging_steps or max(1, config.max_steps // 20)) == 0 or step == config.max_steps \
                or len(step_times) == 1:
            self.print(f"step {step}/{config.max_steps}  loss {loss:.4f}  "
                       f"lr {' '.join(f'{k}={v:.2e}' for k, v in lrs.items())}  {dt:.3f} s/step"
                       + time_left(config.max_steps - step, step_times))

    def print(self, text: str) -> None:
        text = self.prefix + text
        if self.is_main:
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def time_left(steps_left: int, step_times: list[float]) -> str:
    """'  (about 12 min of training left)' at the mean step time so far; '' after the last step."""
    if steps_left <= 0 or not step_times:
        return ""
    seconds = steps_left * sum(step_times) / len(step_times)
    text = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
    return f"  (about {text} of training left)"


def run_results(trainer, stopped_early: bool, test_metrics: dict | None) -> dict:
    """The summary of a finished run (results.json)."""
    acc, s, model, spec = trainer.accelerator, trainer.state, trainer.unwrapped, trainer.spec
    n_steps = len(s.step_times)
    results = {
        "task": spec.name,
        "method": trainer.run_info["method"],
        "task_type": model.task_type,
        "steps": s.step,
        "stopped_early": stopped_early,
        "best_step": s.best_step,
        "validation": s.best_metrics,
        "test": test_metrics,
        "main_metric": spec.main_metric,
        "trainable_params": int(model.num_parameters(trainable_only=True)),
        "total_params": int(model.num_parameters(trainable_only=False)),
        "train_time_s": s.train_time,
        "mean_step_time_s": (sum(s.step_times) / n_steps) if n_steps else None,
        "tokens_per_s": s.tokens_seen / s.train_time if s.train_time else None,
        "peak_memory_mb": peak_memory_mb(acc.device),
        "num_processes": acc.num_processes,
        "num_threads": trainer.num_threads,
        "device": str(acc.device),
        "num_examples": {k: len(v) for k, v in trainer.encoded.items()},
        "truncated": dict(trainer.truncated),
        "config": {"train": trainer.config.to_dict(), "method": trainer.checkpoint_meta()["method_config"],
                   "run": trainer.run_info},
        "versions": versions(),
    }
    results["trainable_percent"] = 100.0 * results["trainable_params"] / max(1, results["total_params"])
    return round_floats(results)  # 6 decimals


def versions() -> dict:
    import accelerate
    import transformers

    versions = {"eptkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "python": sys.version.split()[0]}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

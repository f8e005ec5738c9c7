"""A training run's output directory: the names of its files, creating it, and reading what it records.

`eptkit.train` writes into output_dir/
  adapter_config.json, adapter_model.safetensors   the best adapter (baselines: their own files)
  eptkit_run.json    RUN_INFO_NAME: what evaluate/predict need to rebuild the model (backbone, task...)
  log.jsonl          LOG_NAME: one line per optimizer step, evaluations included
  results.json       RESULTS_NAME: the final summary
  checkpoints/       `eptkit.checkpoint`
Using what a run trained (load, evaluate, predict) is `eptkit.runs`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .adapter_files import read_json
from .checkpoint import CHECKPOINTS_DIR, checkpoint_dirs
from .files import atomic_write_json, atomic_write_lines

RUN_INFO_NAME = "eptkit_run.json"
LOG_NAME = "log.jsonl"
RESULTS_NAME = "results.json"


def prepare_output_dir(output_dir: Path, config, run_info: dict, accelerator) -> Path | None:
    """Create output_dir for a run and record `run_info` in it; return the checkpoint to resume from.

    Without `config.resume` an earlier run's checkpoints, log and results are removed, but only when
    `config.overwrite` allows it: a run is never thrown away by accident."""
    output_dir = Path(output_dir)
    resume_from = None
    existing = checkpoint_dirs(output_dir)
    if config.resume and existing:
        resume_from = existing[-1]
    elif existing and not config.overwrite and not config.resume:
        raise ValueError(f"{output_dir}: holds checkpoints of an earlier run; set resume=True to continue it "
                         "or overwrite=True to start again (eptkit train: --resume, --overwrite)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            if (output_dir / CHECKPOINTS_DIR).exists():
                shutil.rmtree(output_dir / CHECKPOINTS_DIR)
            for name in (LOG_NAME, RESULTS_NAME):
                (output_dir / name).unlink(missing_ok=True)
        atomic_write_json(output_dir / RUN_INFO_NAME, run_info)
    accelerator.wait_for_everyone()
    return resume_from


def read_run_info(directory) -> dict:
    """The run facts recorded beside an adapter ({} when there are none: a bare adapter directory)."""
    path = Path(directory) / RUN_INFO_NAME
    if not path.is_file():
        return {}
    return read_json(path)


def trim_log(output_dir, step: int) -> None:
    """Drop log.jsonl's lines of steps after `step` (a resumed run redoes them)."""
    log = Path(output_dir) / LOG_NAME
    if log.is_file():
        kept = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_lines(log, kept)

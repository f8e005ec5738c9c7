"""A training run's output directory, and using a trained adapter: load, evaluate, predict.

`eptkit.train` writes into output_dir/
  adapter_config.json, adapter_model.safetensors   the best adapter (baselines: their own files)
  eptkit_run.json    RUN_INFO_NAME: what evaluate/predict need to rebuild the model (backbone, task...)
  log.jsonl          LOG_NAME: one line per optimizer step, evaluations included
  results.json       RESULTS_NAME: the final summary
  checkpoints/       `eptkit.checkpoint`
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .adapter_files import CONFIG_NAME, AdapterError
from .backbones import load_backbone, resolve_model_path
from .batching import subsample, text_max_length
from .checkpoint import CHECKPOINTS_DIR, checkpoint_dirs
from .files import atomic_write_json
from .evaluation import evaluate_rows, predict_rows
from .model import load_adapter
from .task_types import checkpoint_task_type
from .tasks.errors import DataError
from .tasks.formatting import encode
from .tasks.loading import load_task, read_rows
from .tasks.registry import TaskSpec, get_task

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
        raise ValueError(f"{output_dir}: holds checkpoints of an earlier run; pass resume=True "
                         "(--resume) to continue it or overwrite=True (--overwrite) to start again")
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
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise AdapterError(f"{path}: not valid JSON") from None


def task_spec_for(run: dict, task: str | None) -> TaskSpec:
    """The task to use: `task` if given, else the one the run recorded (a user's files keep their spec)."""
    if task:
        return get_task(task)
    if run.get("task_spec"):
        return TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["task_spec"].items()})
    if run.get("task"):
        return get_task(run["task"])
    raise DataError("the adapter does not record its task; pass --task")


def load_trained(adapter_dir, *, model: str | None = None, task: str | None = None):
    """(model, tokenizer, spec, run info) for a trained output dir or adapter dir (prompt methods).

    model: backbone path or Hub id (default: the one the run recorded); task: likewise."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    run = read_run_info(adapter_dir)
    spec = task_spec_for(run, task)
    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: not found; evaluate/predict/export/info need a pt/dept/ept adapter")
    saved = json.loads(config_path.read_text())
    if "method" not in saved and "peft_type" not in saved:
        raise AdapterError(f"{config_path}: not an eptkit adapter (no 'method')")
    model_path = resolve_model_path(model or run.get("backbone"))
    task_type = run.get("task_type") or saved.get("task_type") or checkpoint_task_type(model_path)
    num_labels = saved.get("num_labels") if task_type == "classification" else None
    if task_type == "classification" and num_labels is not None and num_labels != spec.num_labels:
        raise DataError(f"{adapter_dir}: adapter has {num_labels} classes, task {spec.name!r} has {spec.num_labels}")
    backbone, tokenizer = load_backbone(model_path, task_type, spec, num_labels=num_labels)
    # load_adapter restores the saved config, pooling included.
    return load_adapter(backbone, adapter_dir).eval(), tokenizer, spec, run


def run_text_max_length(model, run: dict) -> int:
    """The text length the run trained with (recorded), else what the model accepts."""
    return run.get("max_length") or text_max_length(model)


def evaluate_trained(model, tokenizer, spec, run: dict, split: str, *, data_dir=None, max_samples: int | None = None,
                     batch_size: int = 64) -> dict:
    """Score a loaded adapter on a split of a named task: {"task", "split", "n", metrics...}."""
    if spec.benchmark == "custom":
        raise DataError("evaluate works on the named tasks; for your own files use predict")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    ds = subsample(load_task(spec, data_dir)[split], max_samples, 42)
    rows = encode(ds, spec, tokenizer, model.task_type, run_text_max_length(model, run), truncation=True,
                  split=split).to_list()
    metrics = evaluate_rows(model, tokenizer, spec, rows, batch_size=batch_size)
    return {"task": spec.name, "split": split, "n": len(rows), **metrics}


def predict_file(model, tokenizer, spec, run: dict, path, *, batch_size: int = 64) -> list[dict]:
    """Label the rows of a .jsonl/.csv/.tsv file: each row plus "prediction" (label name, score, or None)."""
    import datasets

    path = Path(path)
    raw = [row for _, row in read_rows(path)]
    needed = [f for f in spec.text_fields if f not in raw[0]]
    if needed:
        raise DataError(f"{path}: rows lack the column(s) {needed} that task {spec.name!r} reads "
                        f"(it needs {list(spec.text_fields)})")
    cols = {f: [r.get(f) for r in raw] for f in spec.text_fields}
    for f, values in cols.items():
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"{path}: row {bad + 1}: column {f!r} should be text, found {values[bad]!r}")
    cols["label"] = [0.0 if spec.is_regression else 0] * len(raw)  # the encoder wants a label; predictions ignore it
    cols["idx"] = list(range(len(raw)))
    if spec.group_field:
        cols[spec.group_field] = [r.get(spec.group_field, i) for i, r in enumerate(raw)]
    rows = encode(datasets.Dataset.from_dict(cols), spec, tokenizer, model.task_type,
                  run_text_max_length(model, run), truncation=True, split="input").to_list()
    preds = predict_rows(model, tokenizer, spec, rows, batch_size=batch_size)
    labelled = []
    for row, p in zip(raw, preds):
        label = p if spec.is_regression or p is None else spec.label_names[p]
        labelled.append({**row, "prediction": label})
    return labelled


__all__ = ["RUN_INFO_NAME", "LOG_NAME", "RESULTS_NAME", "prepare_output_dir", "read_run_info", "task_spec_for", "load_trained",
           "run_text_max_length", "evaluate_trained", "predict_file"]

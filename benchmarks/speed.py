"""Speed benchmark: training-step time, inference time and memory of PT, DePT, EPT and baselines.

Every method runs in ONE process on the same inputs, interleaved round-robin (one step of each
method per round, the starting method rotating each round), so that slow drift of a shared machine
hits every method alike. The first `warmup` rounds are discarded; we report medians of the timed
rounds and ratios of medians (plus the median of the per-round paired ratios and a paired bootstrap
95% interval of the ratio of medians, to show how much noise there is).

Training step = forward + backward + AdamW step (over the trainable parameters) + zero_grad.
Inference step = forward only, eval mode, under torch.no_grad().

Methods (keys in the JSON):
  train:      pt (eptkit PT, l)      dept (m, r)     ept (m, r)     peft_pt (PEFT PT, l)
              lora (PEFT LoRA r=8 on attention query/value, via eptkit.baselines.LoRAModel)
              full (full fine-tuning)
  inference:  ept_compiled (PromptedModel.fold_prompt() of the trained EPT)   pt_short (eptkit PT, l=m)
              ept (uncompiled EPT)   pt (eptkit PT, l)

Memory:
  * every device: bytes of the distinct tensors autograd saves for backward during one training
    forward (`torch.autograd.graph.saved_tensors_hooks`, storages de-duplicated, model parameters
    and buffers excluded) = the activation memory a step holds at its peak; plus the persistent
    training state (trainable parameters + their gradients + AdamW state), counted exactly.
  * CUDA only, in addition: `torch.cuda.max_memory_allocated()` during one step minus the memory
    allocated just before it (`reset_peak_memory_stats` first), for training and inference.

Use `run_speed_benchmark(...)` from code (returns the result dict) or `python benchmarks/speed.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

SCHEMA = "eptkit-bench-speed/1"
MODELS = ("minilm", "t5-base-shaped", "tiny-bert", "tiny-t5")
TRAIN_METHODS = ("pt", "dept", "ept", "peft_pt", "lora", "full")
INFER_METHODS = ("ept_compiled", "pt_short", "ept", "pt")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Per-model defaults: (batch size, source length, target length); the paper's T5 setting is 32 x 256.
DEFAULTS = {
    "minilm": dict(batch_size=16, source_length=128, target_length=3),
    "t5-base-shaped": dict(batch_size=32, source_length=256, target_length=3),
    "tiny-bert": dict(batch_size=4, source_length=16, target_length=3),
    "tiny-t5": dict(batch_size=4, source_length=16, target_length=3),
}

# (name, numerator, denominator, phase, target upper bound or None for context only)
RATIOS = (
    ("ept_vs_pt", "ept", "pt", "train", 0.85),
    ("ept_vs_dept", "ept", "dept", "train", 1.01),
    ("pt_vs_peft_pt", "pt", "peft_pt", "train", 1.00),
    ("compiled_ept_vs_pt_short_inference", "ept_compiled", "pt_short", "inference", 1.01),
    ("dept_vs_pt", "dept", "pt", "train", None),
    ("lora_vs_pt", "lora", "pt", "train", None),
    ("full_vs_pt", "full", "pt", "train", None),
    ("ept_vs_pt_short_inference", "ept", "pt_short", "inference", None),
    ("compiled_ept_vs_ept_inference", "ept_compiled", "ept", "inference", None),
    ("compiled_ept_vs_pt_inference", "ept_compiled", "pt", "inference", None),
)


# ---------------------------------------------------------------------------------------- backbones
def minilm_path() -> Path:
    from eptkit.backbones import bundled_model_path

    return Path(bundled_model_path())


def _t5_config(**kw):
    from transformers import T5Config

    return T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)


def build_backbone(model: str) -> tuple[nn.Module, Any]:
    """(pristine backbone in fp32, tokenizer or None). Random weights except for MiniLM."""
    if model == "minilm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = minilm_path()
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)
    if model == "t5-base-shaped":
        from transformers import T5ForConditionalGeneration

        cfg = _t5_config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                         num_heads=12, feed_forward_proj="relu")
        return T5ForConditionalGeneration(cfg), None
    if model == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, num_labels=2)
        return BertForSequenceClassification(cfg), None
    if model == "tiny-t5":
        from transformers import T5ForConditionalGeneration

        cfg = _t5_config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return T5ForConditionalGeneration(cfg), None
    raise ValueError(f"model: expected one of {MODELS}, got {model!r}")


def _default_data_dir() -> Path:
    env = os.environ.get("EPTKIT_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rte_pairs(data_dir: Path | None, count: int, seed: int) -> list[tuple[str, str]] | None:
    path = (data_dir or _default_data_dir()) / "glue" / "RTE" / "train.tsv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if len(r) >= 3]
    if len(rows) < count:
        return None
    rng = random.Random(seed)
    return [(r[1], r[2]) for r in rng.sample(rows, count)]


def make_batch(model: str, backbone: nn.Module, tokenizer, batch_size: int, source_length: int, target_length: int,
               seed: int, data_dir: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """One fixed batch (CPU tensors) and a sentence saying what it is."""
    g = torch.Generator().manual_seed(seed)
    vocab = backbone.config.vocab_size
    is_seq2seq = bool(getattr(backbone.config, "is_encoder_decoder", False))
    batch: dict[str, torch.Tensor]
    pairs = _rte_pairs(data_dir, batch_size, seed) if tokenizer is not None else None
    if pairs is not None:
        enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                        max_length=source_length, padding="max_length", return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        real = batch["attention_mask"].sum(1).float()
        what = (f"{batch_size} RTE train sentence pairs (seeded sample), tokenized with the backbone's tokenizer, "
                f"padded/truncated to {source_length} tokens (real tokens per row: mean {real.mean():.0f}, "
                f"max {real.max():.0f}; padding costs the same compute as text)")
    else:
        ids = torch.randint(3, vocab, (batch_size, source_length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        what = f"random token ids, {batch_size} x {source_length}, no padding"
    if is_seq2seq:
        batch["labels"] = torch.randint(2, vocab, (batch_size, target_length), generator=g)
        what += f"; random target ids of length {target_length}"
    else:
        batch["labels"] = torch.randint(0, backbone.config.num_labels, (batch_size,), generator=g)
    return batch, what


# ------------------------------------------------------------------------------------------ methods
def build_method_model(key: str, base: nn.Module, *, pt_length: int, short_length: int, rank: int,
                       source_length: int, pooling: str | None) -> nn.Module:
    """A fresh copy of `base` wrapped for method `key` (eptkit PT/DePT/EPT, PEFT PT, LoRA, full FT)."""
    from eptkit import DePTConfig, EPTConfig, PromptTuningConfig, get_prompted_model
    from eptkit.baselines import FullFineTuneModel, LoRAModel
    from eptkit.task_types import detect_task_type

    model = copy.deepcopy(base)
    task = detect_task_type(model)
    pool = {"pooling": pooling} if task == "classification" else {}
    if key == "pt":
        return get_prompted_model(model, PromptTuningConfig(prompt_length=pt_length, **pool))
    if key == "pt_short":
        return get_prompted_model(model, PromptTuningConfig(prompt_length=short_length, **pool))
    if key == "dept":
        return get_prompted_model(model, DePTConfig(prompt_length=short_length, rank=rank, max_length=source_length, **pool))
    if key == "ept":
        return get_prompted_model(model, EPTConfig(prompt_length=short_length, rank=rank, max_length=source_length, **pool))
    if key == "peft_pt":
        import peft

        peft_task = {"classification": peft.TaskType.SEQ_CLS, "seq2seq": peft.TaskType.SEQ_2_SEQ_LM,
                     "causal": peft.TaskType.CAUSAL_LM}[task]
        # Encoder-only prompt for seq2seq (PEFT's default also prepends a prompt to the decoder), so
        # that PEFT's PT runs the computation eptkit's PT runs (SPEC 2: prompt to the encoder only).
        extra = {"num_transformer_submodules": 1} if task == "seq2seq" else {}
        return peft.get_peft_model(
            model, peft.PromptTuningConfig(task_type=peft_task, num_virtual_tokens=pt_length, **extra)
        )
    if key == "lora":
        return LoRAModel(model, r=8)
    if key == "full":
        return FullFineTuneModel(model)
    raise ValueError(f"unknown method {key!r}")


def method_labels(pt_length: int, short_length: int, rank: int) -> dict[str, str]:
    return {
        "pt": f"eptkit PT (l={pt_length})",
        "dept": f"eptkit DePT (m={short_length}, r={rank})",
        "ept": f"eptkit EPT (m={short_length}, r={rank})",
        "peft_pt": f"PEFT PT (l={pt_length})",
        "lora": "PEFT LoRA (r=8, query/value)",
        "full": "full fine-tuning",
        "ept_compiled": f"eptkit EPT (m={short_length}), compiled",
        "pt_short": f"eptkit PT (l={short_length})",
    }


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


def compute_ratios(train: dict[str, Any], inference: dict[str, Any], seed: int = 0) -> tuple[dict, dict]:
    """The RATIOS that both their methods were measured for, from the raw per-round times:
    ({name: stats, target and pass}, {target name: pass})."""
    phases = {"train": train, "inference": inference}
    ratios: dict[str, Any] = {}
    for name, num, den, phase, target in RATIOS:
        table = phases[phase]
        if num not in table or den not in table:
            continue
        stats = ratio_stats(table[num]["times_s"], table[den]["times_s"], seed=seed)
        entry = {"numerator": num, "denominator": den, "phase": phase, **stats, "target_max": target}
        if target is not None:
            entry["pass"] = stats["ratio_of_medians"] <= target
            if stats["ci95"] is not None:
                lo, hi = stats["ci95"]
                entry["verdict_robust"] = hi <= target or lo > target  # the 95% interval is on one side
        ratios[name] = entry
    targets = {n: r["pass"] for n, r in ratios.items() if "pass" in r}
    return ratios, targets


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


# ------------------------------------------------------------------------------------------- runner
def run_speed_benchmark(
    model: str = "minilm",
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int | None = None,
    source_length: int | None = None,
    target_length: int | None = None,
    pt_length: int = 100,
    short_length: int = 60,
    rank: int = 30,
    pooling: str | None = "backbone",
    train_methods: Sequence[str] = TRAIN_METHODS,
    infer_methods: Sequence[str] = INFER_METHODS,
    warmup: int = 5,
    repeats: int = 20,
    infer_warmup: int | None = None,
    infer_repeats: int | None = None,
    threads: int | None = None,
    measure_memory: bool = True,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the interleaved speed benchmark and return the result dict (see module docstring).

    `pooling` applies to eptkit's prompt methods on sequence classifiers; the default 'backbone'
    makes eptkit's PT run exactly the computation PEFT's PT runs (the backbone's head on position 0).
    `threads` calls torch.set_num_threads. `log` receives progress lines (default: silent).
    """
    log = log or (lambda s: None)
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype: expected 'fp32' or 'bf16', got {dtype!r}")
    unknown = sorted(set(train_methods) - set(TRAIN_METHODS)) + sorted(set(infer_methods) - set(INFER_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; train: {TRAIN_METHODS}, inference: {INFER_METHODS}")
    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be >= 0 and repeats >= 1")
    infer_warmup = warmup if infer_warmup is None else infer_warmup
    infer_repeats = repeats if infer_repeats is None else infer_repeats
    defaults = DEFAULTS[model]
    batch_size = batch_size or defaults["batch_size"]
    source_length = source_length or defaults["source_length"]
    target_length = target_length or defaults["target_length"]
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: CUDA requested but torch.cuda.is_available() is False")
    started = time.perf_counter()

    torch.manual_seed(seed)
    base, tokenizer = build_backbone(model)
    base.eval()
    batch_cpu, inputs_desc = make_batch(model, base, tokenizer, batch_size, source_length, target_length, seed,
                                        Path(data_dir) if data_dir else None)
    batch = {k: v.to(dev) for k, v in batch_cpu.items()}
    infer_batch = dict(batch)
    if not getattr(base.config, "is_encoder_decoder", False):
        infer_batch.pop("labels")  # classification inference: logits only; seq2seq needs decoder inputs
    labels = method_labels(pt_length, short_length, rank)
    kw = dict(pt_length=pt_length, short_length=short_length, rank=rank, source_length=source_length, pooling=pooling)

    # ---------------------------------------------------------------- training
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for i, key in enumerate(train_methods):
        torch.manual_seed(seed + 1 + i)
        m = build_method_model(key, base, **kw).to(dev)
        m.train()
        models[key] = m
        optimizers[key] = torch.optim.AdamW(trainable_parameters(m), lr=1e-5)
    rounds = warmup + repeats
    raw: dict[str, list[dict[str, float]]] = {k: [] for k in train_methods}
    order = list(train_methods)
    for r in range(rounds):
        rot = order[r % len(order):] + order[: r % len(order)] if order else []
        for key in rot:
            raw[key].append(train_step(models[key], optimizers[key], batch, dev, dtype, Clock(dev)))
        if order:
            log(f"train round {r + 1}/{rounds}" + (" (warm-up)" if r < warmup else "") + ": "
                + ", ".join(f"{k} {raw[k][-1]['total'] * 1e3:.0f} ms" for k in order))
    train: dict[str, Any] = {}
    for key in train_methods:
        timed = raw[key][warmup:]
        times = [x["total"] for x in timed]
        train[key] = {
            "label": labels[key],
            "trainable_params": sum(p.numel() for p in trainable_parameters(models[key])),
            "times_s": times,
            "warmup_times_s": [x["total"] for x in raw[key][:warmup]],
            **summarize(times),
            "parts_median_s": {part: statistics.median(x[part] for x in timed)
                               for part in ("forward", "backward", "optimizer")},
        }
    if measure_memory:
        for key in train_methods:
            train[key]["memory"] = measure_train_memory(models[key], optimizers[key], batch, dev, dtype)
            log(f"memory {key}: saved activations {train[key]['memory']['saved_activation_bytes'] / 2**20:.1f} MiB")
    optimizers.clear()

    # ---------------------------------------------------------------- inference
    inference: dict[str, Any] = {}
    infer_models: dict[str, nn.Module] = {}
    if infer_methods:
        need_ept = any(k in ("ept", "ept_compiled") for k in infer_methods)
        ept = models.get("ept")
        if need_ept and ept is None:
            torch.manual_seed(seed + 100)
            ept = build_method_model("ept", base, **kw).to(dev)
        if need_ept:
            # A "trained" adapter: perturb the zero-initialised weights so fusion/projection are not no-ops.
            with torch.no_grad():
                for name, p in ept.method.named_parameters():
                    if torch.count_nonzero(p) == 0:
                        p.add_(torch.randn_like(p) * 1e-2)
        for key in infer_methods:
            if key == "ept":
                infer_models[key] = ept
            elif key == "ept_compiled":
                infer_models[key] = ept.fold_prompt()
            elif key == "pt" and "pt" in models:
                infer_models[key] = models["pt"]
            else:
                torch.manual_seed(seed + 200)
                infer_models[key] = build_method_model(key, base, **kw).to(dev)
        for m in infer_models.values():
            m.eval()
        iraw: dict[str, list[float]] = {k: [] for k in infer_methods}
        order = list(infer_methods)
        irounds = infer_warmup + infer_repeats
        for r in range(irounds):
            rot = order[r % len(order):] + order[: r % len(order)]
            for key in rot:
                iraw[key].append(infer_step(infer_models[key], infer_batch, dev, dtype))
            log(f"inference round {r + 1}/{irounds}" + (" (warm-up)" if r < infer_warmup else "") + ": "
                + ", ".join(f"{k} {iraw[k][-1] * 1e3:.0f} ms" for k in order))
        for key in infer_methods:
            times = iraw[key][infer_warmup:]
            inference[key] = {"label": labels[key], "times_s": times, "warmup_times_s": iraw[key][:infer_warmup],
                              **summarize(times)}
            if measure_memory and dev.type == "cuda":
                inference[key]["memory"] = measure_infer_memory(infer_models[key], infer_batch, dev, dtype)

    ratios, targets = compute_ratios(train, inference, seed=seed)

    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv else None,
        "setting": {
            "model": model,
            "device": str(dev),
            "dtype": dtype + (" (torch.autocast bf16, fp32 weights)" if dtype == "bf16" else ""),
            "batch_size": batch_size,
            "source_length": source_length,
            "target_length": target_length if getattr(base.config, "is_encoder_decoder", False) else None,
            "pt_length": pt_length,
            "short_length": short_length,
            "rank": rank,
            "pooling": pooling if not getattr(base.config, "is_encoder_decoder", False) else None,
            "warmup": warmup,
            "repeats": repeats,
            "infer_warmup": infer_warmup,
            "infer_repeats": infer_repeats,
            "optimizer": "torch.optim.AdamW(trainable params, lr=1e-5), zero_grad(set_to_none=True)",
            "inputs": inputs_desc,
            "schedule": "round-robin over methods, one step each per round, start rotating each round; "
                        "warm-up rounds discarded",
            "memory_measure": (
                "saved_activation_bytes: distinct storages saved for backward during one training forward "
                "(torch.autograd.graph.saved_tensors_hooks; parameters/buffers excluded); step_memory_bytes = "
                "saved activations + trainable params + grads + AdamW state"
                + ("; cuda_peak_step_bytes: max_memory_allocated during one step minus allocated before it"
                   if dev.type == "cuda" else "")
            ),
            "seed": seed,
        },
        "machine": machine_info(dev),
        "train": train,
        "inference": inference,
        "ratios": ratios,
        "targets": targets,
        "all_targets_pass": all(targets.values()) if targets else None,
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------ output
def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    s, m = result["setting"], result["machine"]
    lines = [
        f"# Speed: {s['model']} on {s['device']} ({m.get('device_name')})",
        "",
        f"{result['date']}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
        f"torch threads {m['torch_threads']}; dtype {s['dtype']}.",
        f"Batch {s['batch_size']} x source length {s['source_length']}"
        + (f", target length {s['target_length']}" if s.get("target_length") else "")
        + (f", pooling `{s['pooling']}`" if s.get("pooling") else "")
        + f". Inputs: {s['inputs']}.",
        f"Timing: {s['schedule']}; {s['warmup']} warm-up + {s['repeats']} timed training rounds, "
        f"{s['infer_warmup']} + {s['infer_repeats']} inference rounds. Optimizer: {s['optimizer']}.",
        f"Command: `{result['command']}`",
        "",
    ]
    if result["train"]:
        pt = result["train"].get("pt")
        lines += ["## Training step (forward + backward + AdamW)", "",
                  "| method | trainable params | median ms | IQR ms | x PT | fwd / bwd / opt ms | saved activations MiB | "
                  "state MiB (params+grads+AdamW) |" + (" CUDA peak MiB |" if s["device"].startswith("cuda") else ""),
                  "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if s["device"].startswith("cuda") else "")]
        for key, t in result["train"].items():
            parts = t["parts_median_s"]
            mem = t.get("memory", {})
            state = None if not mem else 2 * mem["trainable_param_bytes"] + mem["optimizer_state_bytes"]
            rel = f"{t['median_s'] / pt['median_s']:.3f}" if pt else ""
            row = (f"| {t['label']} | {t['trainable_params']:,} | {t['median_s'] * 1e3:.1f} | "
                   f"{t['q25_s'] * 1e3:.1f}-{t['q75_s'] * 1e3:.1f} | {rel} | "
                   f"{parts['forward'] * 1e3:.1f} / {parts['backward'] * 1e3:.1f} / {parts['optimizer'] * 1e3:.1f} | "
                   f"{_mib(mem.get('saved_activation_bytes'))} | {_mib(state)} |")
            if s["device"].startswith("cuda"):
                row += f" {_mib(mem.get('cuda_peak_step_bytes'))} |"
            lines.append(row)
        lines.append("")
    if result["inference"]:
        lines += ["## Inference (forward only, eval, no_grad)", "",
                  "| method | median ms | IQR ms |" + (" CUDA peak MiB |" if s["device"].startswith("cuda") else ""),
                  "|---|---:|---:|" + ("---:|" if s["device"].startswith("cuda") else "")]
        for key, t in result["inference"].items():
            row = f"| {t['label']} | {t['median_s'] * 1e3:.1f} | {t['q25_s'] * 1e3:.1f}-{t['q75_s'] * 1e3:.1f} |"
            if s["device"].startswith("cuda"):
                row += f" {_mib(t.get('memory', {}).get('cuda_peak_step_bytes'))} |"
            lines.append(row)
        lines.append("")
    lines += ["## Ratios (of medians)", "",
              "| ratio | value | median paired ratio | bootstrap 95% CI | ratio of minimums | target | result |",
              "|---|---:|---:|---|---:|---:|---|"]
    labels = {**{k: v["label"] for k, v in result["train"].items()}, **{k: v["label"] for k, v in result["inference"].items()}}
    for name, r in result["ratios"].items():
        phase = "training" if r["phase"] == "train" else "inference"
        title = f"{labels[r['numerator']]} / {labels[r['denominator']]} ({phase})"
        ci = f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if r["ci95"] else ""
        if r["target_max"] is None:
            target, verdict = "", "context"
        else:
            target = f"<= {r['target_max']:.2f}"
            verdict = "PASS" if r["pass"] else "FAIL"
            if r.get("verdict_robust") is False:
                verdict += " (within noise)"
        lines.append(f"| {title} | {r['ratio_of_medians']:.3f} | {r['median_paired_ratio']:.3f} | {ci} | "
                     f"{r['ratio_of_minimums']:.3f} | {target} | {verdict} |")
    lines += ["", f"Memory: {s['memory_measure']}.", ""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """`text` to `path` atomically (eptkit's own writer), its folder created."""
    from eptkit.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_results(result: dict[str, Any], out_dir: str | os.PathLike | None = None, name: str | None = None) -> tuple[Path, Path]:
    """Write `speed_<model>_<device>[_<suffix>].json` and `.md` atomically; returns both paths."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    s = result["setting"]
    name = name or f"speed_{s['model']}_{torch.device(s['device']).type}"
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    write_text(jpath, json.dumps(result, indent=1) + "\n")
    write_text(mpath, to_markdown(result))
    return jpath, mpath


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults: minilm = batch 16 x 128 on CPU; t5-base-shaped = batch 32 x 256, target 3.")
    p.add_argument("--model", choices=MODELS, default="minilm", help="backbone (t5-base-shaped: random weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast, fp32 weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--source-length", type=int, default=None, help="source length s (also DePT/EPT max_length)")
    p.add_argument("--target-length", type=int, default=None, help="seq2seq target length")
    p.add_argument("--pt-length", type=int, default=100, help="PT prompt length l")
    p.add_argument("--short-length", type=int, default=60, help="DePT/EPT prompt length m")
    p.add_argument("--rank", type=int, default=30, help="DePT/EPT offset rank r")
    p.add_argument("--pooling", default="backbone", choices=("backbone", "mean", "text_first"),
                   help="eptkit pooling on classifiers (backbone = the same computation as PEFT's PT)")
    p.add_argument("--train-methods", default=",".join(TRAIN_METHODS), help="comma list; empty for none")
    p.add_argument("--infer-methods", default=",".join(INFER_METHODS), help="comma list; empty for none")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--infer-warmup", type=int, default=None)
    p.add_argument("--infer-repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 2 on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="directory holding glue/RTE/train.tsv (for real token ids)")
    p.add_argument("--out-dir", default=None, help=f"where results go (default {RESULTS_DIR})")
    p.add_argument("--name", default=None, help="file name stem (default speed_<model>_<device type>)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    threads = a.threads if a.threads is not None else (2 if torch.device(a.device).type == "cpu" else None)
    split = lambda s: [x for x in s.split(",") if x.strip()]  # noqa: E731
    log = None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    result = run_speed_benchmark(
        a.model, device=a.device, dtype=a.dtype, batch_size=a.batch_size, source_length=a.source_length,
        target_length=a.target_length, pt_length=a.pt_length, short_length=a.short_length, rank=a.rank,
        pooling=a.pooling, train_methods=split(a.train_methods), infer_methods=split(a.infer_methods),
        warmup=a.warmup, repeats=a.repeats, infer_warmup=a.infer_warmup, infer_repeats=a.infer_repeats,
        threads=threads, measure_memory=not a.no_memory, seed=a.seed, data_dir=a.data_dir, log=log,
    )
    result["command"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jpath, mpath = write_results(result, a.out_dir, a.name)
    if not a.quiet:
        print(to_markdown(result))
        print(f"wrote {jpath} and {mpath}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

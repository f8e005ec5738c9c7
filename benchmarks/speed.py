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
The inputs (backbones, batches, method models) are in speed_inputs.py, the measurement primitives (shared
with decoder_speed.py and ept_overhead.py) in timing.py, the markdown/JSON output in speed_report.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from speed_inputs import MODELS, build_backbone, build_method_model, make_batch, method_labels
from speed_report import to_markdown, write_results
from timing import (RESULTS_DIR, Clock, infer_step, machine_info, measure_infer_memory, measure_train_memory, ratio_stats, summarize,
                    train_step, trainable_parameters)

SCHEMA = "eptkit-bench-speed/1"
TRAIN_METHODS = ("pt", "dept", "ept", "peft_pt", "lora", "full")
INFER_METHODS = ("ept_compiled", "pt_short", "ept", "pt")

OPTIMIZER = "torch.optim.AdamW(trainable params, lr=1e-5), zero_grad(set_to_none=True)"
SCHEDULE = "round-robin over methods, one step each per round, start rotating each round; warm-up rounds discarded"

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
    check_arguments(model, dtype, train_methods, infer_methods, warmup, repeats)
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
    base, batch, infer_batch, inputs_desc = build_inputs(model, batch_size, source_length, target_length, seed,
                                                         data_dir, dev)
    labels = method_labels(pt_length, short_length, rank)
    build = MethodBuilder(base, dev, dict(pt_length=pt_length, short_length=short_length, rank=rank,
                                          source_length=source_length, pooling=pooling))
    train, models = time_training(train_methods, build, batch, dtype, labels, warmup, repeats, measure_memory, seed,
                                  log)
    inference = time_inference(infer_methods, build, models, infer_batch, dtype, labels, infer_warmup, infer_repeats,
                               measure_memory, seed, log) if infer_methods else {}
    ratios, targets = compute_ratios(train, inference, seed=seed)
    seq2seq = getattr(base.config, "is_encoder_decoder", False)
    setting = {
        "model": model,
        "device": str(dev),
        "dtype": dtype + (" (torch.autocast bf16, fp32 weights)" if dtype == "bf16" else ""),
        "batch_size": batch_size,
        "source_length": source_length,
        "target_length": target_length if seq2seq else None,
        "pt_length": pt_length,
        "short_length": short_length,
        "rank": rank,
        "pooling": pooling if not seq2seq else None,
        "warmup": warmup,
        "repeats": repeats,
        "infer_warmup": infer_warmup,
        "infer_repeats": infer_repeats,
        "optimizer": OPTIMIZER,
        "inputs": inputs_desc,
        "schedule": SCHEDULE,
        "memory_measure": memory_measure(dev),
        "seed": seed,
    }
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv else None,
        "setting": setting,
        "machine": machine_info(dev),
        "train": train,
        "inference": inference,
        "ratios": ratios,
        "targets": targets,
        "all_targets_pass": all(targets.values()) if targets else None,
        "wall_s": time.perf_counter() - started,
    }


def check_arguments(model: str, dtype: str, train_methods: Sequence[str], infer_methods: Sequence[str], warmup: int,
                    repeats: int) -> None:
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype: expected 'fp32' or 'bf16', got {dtype!r}")
    unknown = sorted(set(train_methods) - set(TRAIN_METHODS)) + sorted(set(infer_methods) - set(INFER_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; train: {TRAIN_METHODS}, inference: {INFER_METHODS}")
    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be >= 0 and repeats >= 1")


def memory_measure(dev: torch.device) -> str:
    """The setting's description of what the memory numbers are."""
    return ("saved_activation_bytes: distinct storages saved for backward during one training forward "
            "(torch.autograd.graph.saved_tensors_hooks; parameters/buffers excluded); step_memory_bytes = "
            "saved activations + trainable params + grads + AdamW state"
            + ("; cuda_peak_step_bytes: max_memory_allocated during one step minus allocated before it"
               if dev.type == "cuda" else ""))


# ------------------------------------------------------------------------------------------- inputs
def build_inputs(model: str, batch_size: int, source_length: int, target_length: int, seed: int,
                 data_dir: str | os.PathLike | None, dev: torch.device):
    """(backbone in eval mode, training batch, inference batch, description of the inputs), batches on `dev`."""
    base, tokenizer = build_backbone(model)
    base.eval()
    batch_cpu, inputs_desc = make_batch(model, base, tokenizer, batch_size, source_length, target_length, seed,
                                        Path(data_dir) if data_dir else None)
    batch = {k: v.to(dev) for k, v in batch_cpu.items()}
    infer_batch = dict(batch)
    if not getattr(base.config, "is_encoder_decoder", False):
        infer_batch.pop("labels")  # classification inference: logits only; seq2seq needs decoder inputs
    return base, batch, infer_batch, inputs_desc


class MethodBuilder:
    """Builds a method's model over the one shared backbone, on the device, from a fixed seed."""

    def __init__(self, base: nn.Module, dev: torch.device, settings: dict[str, Any]):
        self.base, self.dev, self.settings = base, dev, settings

    def __call__(self, key: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_method_model(key, self.base, **self.settings).to(self.dev)


def inference_models(infer_methods: Sequence[str], build: MethodBuilder, trained: dict[str, nn.Module],
                     seed: int) -> dict[str, nn.Module]:
    """The models timed for inference, in eval mode: the trained EPT and PT where they were built for training."""
    models: dict[str, nn.Module] = {}
    need_ept = any(k in ("ept", "ept_compiled") for k in infer_methods)
    ept = trained.get("ept")
    if need_ept and ept is None:
        ept = build("ept", seed + 100)
    if need_ept:
        # A "trained" adapter: perturb the zero-initialised weights so fusion/projection are not no-ops.
        with torch.no_grad():
            for name, p in ept.method.named_parameters():
                if torch.count_nonzero(p) == 0:
                    p.add_(torch.randn_like(p) * 1e-2)
    for key in infer_methods:
        if key == "ept":
            models[key] = ept
        elif key == "ept_compiled":
            models[key] = ept.fold_prompt()
        elif key == "pt" and "pt" in trained:
            models[key] = trained["pt"]
        else:
            models[key] = build(key, seed + 200)
    for m in models.values():
        m.eval()
    return models


# ------------------------------------------------------------------------------------------- timing
def interleaved(methods: Sequence[str], warmup: int, repeats: int, step: Callable[[str], Any],
                seconds: Callable[[Any], float], phase: str, log: Callable[[str], None]) -> dict[str, list]:
    """Per method, what `step(method)` returned in each of warmup + repeats rounds: one step of every
    method per round, the first method rotating each round (slow drift of the machine hits all alike)."""
    raw: dict[str, list] = {k: [] for k in methods}
    order = list(methods)
    rounds = warmup + repeats
    for r in range(rounds if order else 0):
        for key in order[r % len(order):] + order[: r % len(order)]:
            raw[key].append(step(key))
        log(f"{phase} round {r + 1}/{rounds}" + (" (warm-up)" if r < warmup else "") + ": "
            + ", ".join(f"{k} {seconds(raw[k][-1]) * 1e3:.0f} ms" for k in order))
    return raw


def time_training(train_methods: Sequence[str], build: MethodBuilder, batch: dict, dtype: str, labels: dict,
                  warmup: int, repeats: int, measure_memory: bool, seed: int, log: Callable[[str], None]):
    """({method: times, parts and memory of a training step}, {method: its model, trained that many steps})."""
    dev = build.dev
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for i, key in enumerate(train_methods):
        m = build(key, seed + 1 + i)
        m.train()
        models[key] = m
        optimizers[key] = torch.optim.AdamW(trainable_parameters(m), lr=1e-5)
    raw = interleaved(train_methods, warmup, repeats,
                      lambda key: train_step(models[key], optimizers[key], batch, dev, dtype, Clock(dev)),
                      lambda x: x["total"], "train", log)
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
    return train, models


def time_inference(infer_methods: Sequence[str], build: MethodBuilder, trained: dict[str, nn.Module],
                   infer_batch: dict, dtype: str, labels: dict, warmup: int, repeats: int, measure_memory: bool,
                   seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """{method: times (and on CUDA memory) of a forward pass under no_grad}."""
    dev = build.dev
    models = inference_models(infer_methods, build, trained, seed)
    raw = interleaved(infer_methods, warmup, repeats, lambda key: infer_step(models[key], infer_batch, dev, dtype),
                      float, "inference", log)
    inference: dict[str, Any] = {}
    for key in infer_methods:
        times = raw[key][warmup:]
        inference[key] = {"label": labels[key], "times_s": times, "warmup_times_s": raw[key][:warmup],
                          **summarize(times)}
        if measure_memory and dev.type == "cuda":
            inference[key]["memory"] = measure_infer_memory(models[key], infer_batch, dev, dtype)
    return inference


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults: minilm = batch 16 x 128 on CPU; t5-base-shaped = batch 32 x 256, target 3.")
    p.add_argument("--model", choices=MODELS, default="minilm", help="backbone (t5-base-shaped: random weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast, fp32 weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--source-length", type=int, default=None, help="source length s (also DePT/EPT offset_length)")
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

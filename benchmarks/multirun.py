"""Several runs in one process against the same runs one after another (issue 12; eptkit.multirun).

    python benchmarks/multirun.py [--k 6] [--steps 30] [--batch-size 16] [--task sst2] [--data-dir DIR]
                                  [--method ept] [--repeats 2] [--output benchmarks/results/multirun_cpu.md]

K runs (seeds 0..K-1, the bundled MiniLM by default) train for --steps steps: together (one process,
one frozen backbone, each step taking batch_size rows of every run), in passes of rows of similar
length ("joint", the CPU default) and in one pass ("joint, one pass"), and one after another (K
separate `eptkit.train` runs, same process). The modes alternate --repeats times, so a busy machine
slows all alike. Throughput is training steps (summed over runs) per second of training
time (results.json `train_time_s`: step time only; loading, evaluation and the test score are not
counted); the ratio of the two is the speed-up. Memory: the bytes each extra run adds (adapter,
gradient and AdamW's two moments, counted from the tensors) and, on a GPU, the device memory that
the K runs' training state still holds after training (allocated after minus before). Targets: >= 1.3x on CPU, >= 4x on a GPU.
On a GPU the same command runs there (accelerate picks the device); add --mixed-precision bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eptkit.backbones import bundled_model_path
from eptkit.config import DePTConfig, EPTConfig, PromptTuningConfig, TrainConfig
from eptkit.multirun import RunSpec, train_runs
from eptkit.sweep import shared_prompted_model
from eptkit.tasks.loading import load_task
from eptkit.tasks.registry import get_task
from eptkit.train import train

ROOT = Path(__file__).resolve().parents[1]


def method_config(method: str, prompt_length: int, max_length: int):
    if method == "pt":
        return PromptTuningConfig(prompt_length=prompt_length)
    cls = EPTConfig if method == "ept" else DePTConfig
    return cls(prompt_length=prompt_length, rank=8, offset_length=max_length)


def train_config(args, out: Path, seed: int) -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_steps=args.steps, eval_steps=0, save_steps=0, batch_size=args.batch_size,
                       eval_batch_size=64, max_eval_samples=32, max_length=args.max_length, seed=seed,
                       mixed_precision=args.mixed_precision, overwrite=True)


def _device_memory() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def joint(args, spec, data, root: Path, k: int, length_waste: float | str | None = "auto") -> dict:
    config = method_config(args.method, args.prompt_length, args.max_length)
    runs = [(f"seed-{s}", config, spec, s) for s in range(k)]
    model, tok = shared_prompted_model(args.model, "classification", runs)
    before = _device_memory()
    results = train_runs(model, tok, [RunSpec(name, spec, data, train_config(args, root / name, seed))
                                      for name, _, _, seed in runs], length_waste=length_waste)
    after = _device_memory()
    per_run = sum(p.numel() * p.element_size() for p in model.adapters["seed-0"].parameters())
    per_run += sum(p.numel() * p.element_size() for p in model.heads["seed-0"].parameters())
    del model
    gc.collect()
    return {"train_time_s": results[0]["train_time_s"], "steps": sum(r["steps"] for r in results),
            "state_bytes_per_run": 4 * per_run,  # weights, gradient, AdamW exp_avg and exp_avg_sq
            "persistent_device_bytes": None if before is None else after - before}


def sequential(args, spec, data, root: Path, k: int) -> dict:
    config = method_config(args.method, args.prompt_length, args.max_length)
    total_time, steps = 0.0, 0
    for seed in range(k):
        model, tok = shared_prompted_model(args.model, "classification", [("default", config, spec, seed)])
        result = train(model, tok, spec, data, train_config(args, root / f"seed-{seed}", seed))
        total_time, steps = total_time + result["train_time_s"], steps + result["steps"]
        del model
        gc.collect()
    return {"train_time_s": total_time, "steps": steps}


MODES = {"joint": joint, "joint, one pass": lambda *a: joint(*a, length_waste=None), "sequential": sequential}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--model", default=bundled_model_path())
    p.add_argument("--method", default="ept", choices=("pt", "dept", "ept"))
    p.add_argument("--prompt-length", type=int, default=20)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--output", help="Write a markdown report here (and the numbers beside it as .json).")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_task(args.task)
    data = load_task(spec, args.data_dir)
    data = {"train": data["train"].select(range(min(2000, len(data["train"])))),
            "validation": data["validation"], "test": data["test"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode, fn in MODES.items():
                t0 = time.perf_counter()
                out = fn(args, spec, data, Path(tmp) / f"{mode}-{repeat}", args.k)
                out.update(mode=mode, repeat=repeat, wall_s=time.perf_counter() - t0,
                           steps_per_s=out["steps"] / out["train_time_s"])
                rows.append(out)
                print(json.dumps(out), flush=True)
    speed = {m: statistics.median(r["steps_per_s"] for r in rows if r["mode"] == m) for m in MODES}
    ratio = speed["joint"] / speed["sequential"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    summary = {"k": args.k, "device": device, "ratio": ratio, "steps_per_s": speed, "rows": rows, "args": vars(args)}
    print(json.dumps({"ratio": ratio, "steps_per_s": speed}))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        joint_rows = [r for r in rows if r["mode"] == "joint"]
        one_pass = speed["joint, one pass"] / speed["sequential"]
        lines = [f"# {args.k} runs in one process against {args.k} runs one after another ({device})", "",
                 f"MiniLM ({Path(args.model).name}), {args.method}, prompt {args.prompt_length}, task {args.task}, "
                 f"batch {args.batch_size} per run, {args.steps} steps per run, max_length {args.max_length}, "
                 f"mixed precision {args.mixed_precision}, {args.threads or torch.get_num_threads()} thread(s); "
                 f"{args.repeats} alternating repeats, medians.", "",
                 "| mode | training steps/s (all runs) | repeats (steps/s) |", "| --- | --- | --- |"]
        for m in MODES:
            each = ", ".join(f"{r['steps_per_s']:.2f}" for r in rows if r["mode"] == m)
            lines.append(f"| {m} | {speed[m]:.2f} | {each} |")
        lines += ["", f"Speed-up: **{ratio:.2f}x** (target: >= 1.3x on CPU, >= 4x on a GPU); in one pass: {one_pass:.2f}x.", "",
                  f"Memory per extra run: {joint_rows[0]['state_bytes_per_run'] / 1024:.1f} KiB of adapter, gradient "
                  "and AdamW state (counted); activations grow with the joint batch."]
        if joint_rows[0]["persistent_device_bytes"] is not None:
            lines.append(f"Persistent device memory after training {args.k} runs: "
                         f"{joint_rows[0]['persistent_device_bytes'] / 2**20:.2f} MiB.")
        out.write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    main()

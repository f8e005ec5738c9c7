"""Memory of sharded and checkpointed training (issue 23): per-process parameter memory, activation
memory, peak memory and step time of PT and EPT on a Llama-shaped decoder classifier with random
weights, in one process, DDP x 2 and FSDP x 2, each with and without gradient checkpointing.

    python benchmarks/memory.py                      # llama-1536x16 (0.45 B parameters), s = 512
    python benchmarks/memory.py --shape tiny         # seconds: what tests/test_bench_memory.py runs
    python benchmarks/memory.py --layers 8           # fewer blocks of the same width (a slow machine)

Every configuration runs in its own `torch.distributed.run` (torchrun) launch, one after another, so
the memory one leaves behind cannot show up in the next one's peak, and each worker builds the model
the way `eptkit train` does on its processes: the same seeded backbone, frozen, wrapped in
PromptedModel, then plain (1 process), torch DDP (what accelerate's `prepare` wraps a model in) or
`eptkit.sharding.shard_model` (`--fsdp`); checkpointing through `set_gradient_checkpointing`
(`--gradient-checkpointing`). gloo and the CPU without a GPU, nccl and one GPU per process with one:
the same script runs unchanged on a lent GPU (benchmarks/gpu.sh). The global batch is the same in all
three layouts (2 rows: 2 in one process, 1 per process in two), so step times compare like for like.

Measured per process (workers write JSON; the parent reads it back and writes the tables):
- parameters: bytes of the parameter tensors this process holds at rest, i.e. its shards under FSDP
  (`DTensor.to_local()`); the whole model otherwise;
- activations: bytes of the distinct storages autograd saves for backward in one training forward
  (`saved_tensors_hooks`; parameters and buffers excluded, including FSDP's gathered copies), plus the
  inputs each transformer block receives: a checkpointed block keeps its inputs (not through a saved-
  tensor hook) to recompute from them, so without counting them checkpointing would look free;
- peak RSS during the measured steps (Linux VmHWM after resetting it through /proc/self/clear_refs
  once the model is built: every process first builds the whole backbone, which FSDP then shards, as
  `eptkit train --fsdp` does; `rss_peak_all` is the process's peak including that build), and on CUDA
  `torch.cuda.max_memory_allocated` over the same steps;
- step time: forward + backward + AdamW step, the slowest process's, median of the timed steps.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

import timing  # sibling scripts: their folder is on the path when a script of benchmarks/ runs
from decoder_speed import SHAPES as DECODER_SHAPES

HERE = Path(__file__).resolve().parent
SCHEMA = "eptkit-bench-memory/1"
# Llama-shaped classifiers: (hidden, blocks, heads, key/value heads (GQA), MLP width, vocabulary).
SHAPES = {
    "llama-1536x16": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                          intermediate_size=4096, vocab_size=32000),
    "small": DECODER_SHAPES["small"],  # the decoder speed benchmark's CPU shape
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=257),  # odd vocabulary: a row FSDP cannot split evenly
}
LAYOUTS = {"single": 1, "ddp": 2, "fsdp": 2}
METHODS = ("pt", "ept")
MiB = 2 ** 20


# --------------------------------------------------------------------------------- the model
def build_model(shape: str, method: str, seq_length: int, *, layers: int | None = None, seed: int = 0,
                pt_length: int = 100, short_length: int = 60, rank: int = 30):
    """The frozen, seeded Llama classifier (2 labels) wrapped for `method` (identical on every process)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from eptkit.config import EPTConfig, PromptTuningConfig
    from eptkit.model import PromptedModel

    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(max_position_embeddings=max(2048, seq_length + pt_length), num_labels=2, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(seed)
    backbone = LlamaForSequenceClassification(cfg)
    if method == "pt":
        config = PromptTuningConfig(prompt_length=pt_length, init="sample_vocab")
    elif method == "ept":
        config = EPTConfig(prompt_length=short_length, rank=rank, offset_length=seq_length, init="sample_vocab")
    else:
        raise ValueError(f"--methods: expected some of {METHODS}, got {method!r}")
    return PromptedModel(backbone, config)


def make_batch(vocab: int, rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random text ids (no padding) and random labels; each process its own rows (seed per rank)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (rows,), generator=g)}


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors`: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


class SavedBytes:
    """Counts the activation storages one forward keeps for backward (see the module docstring)."""

    def __init__(self, model, blocks):
        self.model, self.seen, self.on = model, {}, False
        for block in blocks:
            block.register_forward_pre_hook(self._block_inputs, with_kwargs=True)

    def _owned(self) -> set[int]:
        # Scanned afresh: under FSDP the parameters registered on a block during its forward are the
        # gathered (unsharded) copies, which autograd saves for the backward like any weight.
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return {t.untyped_storage().data_ptr() for t in tensors if not hasattr(t, "to_local")}

    def add(self, t) -> None:
        if not (self.on and torch.is_tensor(t)) or hasattr(t, "to_local"):
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.seen and ptr not in self._owned():
            self.seen[ptr] = storage.nbytes()  # alive until backward, so no other storage reuses the address

    def _block_inputs(self, module, args, kwargs):
        for value in list(args) + list(kwargs.values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                self.add(t)

    def hooks(self):
        def pack(t):
            self.add(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    @property
    def total(self) -> int:
        return int(sum(self.seen.values()))


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------- one worker
def worker(cfg: dict[str, Any]) -> None:
    """One process of a torchrun launch: build, wrap, measure, write rank-R.json into cfg['result_dir']."""
    import resource

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from eptkit.sharding import block_classes, shard_model
    from eptkit.trainable import set_gradient_checkpointing

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg["threads"])
    dist.init_process_group("nccl" if cuda else "gloo")
    model = build_model(cfg["shape"], cfg["method"], cfg["seq_length"], layers=cfg["layers"], seed=cfg["seed"])
    counter = SavedBytes(model, [m for m in model.modules() if type(m).__name__ in set(block_classes(model))])
    set_gradient_checkpointing(model, cfg["checkpointing"])
    if cfg["layout"] == "fsdp":
        run = shard_model(model, device, world)
    elif cfg["layout"] == "ddp":
        run = DistributedDataParallel(model.to(device), device_ids=[local] if cuda else None)
    else:
        run = model.to(device)
    run.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = cfg["global_batch"] // world
    batch = {k: v.to(device) for k, v in make_batch(model.backbone.config.vocab_size, rows, cfg["seq_length"],
                                                     cfg["seed"] + 1 + rank).items()}
    backbone_params = sum(p.numel() for p in model.backbone.parameters())  # a DTensor's numel is global
    params = local_bytes(model.parameters())
    trainable = local_bytes(p for p in model.parameters() if p.requires_grad)
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step(measure: bool = False) -> float:
        dist.barrier()
        start = time.perf_counter()
        counter.on = measure
        with counter.hooks() if measure else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = run(**batch).loss
        counter.on = False
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        took = torch.tensor([time.perf_counter() - start], device=device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest process
        return float(took.item())

    warmup = [step(measure=(i == 0)) for i in range(cfg["warmup"])]  # the first, untimed, is the measured one
    times = [step() for _ in range(cfg["steps"])]
    out = {"rank": rank, "world": world, "backbone_params": backbone_params, "rows": rows, "params_bytes": params, "trainable_bytes": trainable,
           "activation_bytes": counter.total, "warmup_s": warmup, "times_s": times,
           "rss_peak_steps_mib": _rss_mib("VmHWM") if reset else None,
           "rss_peak_all_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / MiB if cuda else None,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "threads": torch.get_num_threads()}
    Path(cfg["result_dir"], f"rank-{rank}.json").write_text(json.dumps(out))
    dist.barrier()  # no process tears gloo down while its peer still talks to it
    dist.destroy_process_group()


# --------------------------------------------------------------------------------- the parent
def run_config(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    """One configuration in its own torchrun launch; its per-rank results joined into one row."""
    with tempfile.TemporaryDirectory() as tmp:
        n = LAYOUTS[cfg["layout"]]
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), HF_HUB_OFFLINE="1")
        src = str(HERE.parent / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               str(Path(__file__).resolve()), "--worker", json.dumps({**cfg, "result_dir": tmp})]
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            Path(tmp).joinpath("stderr.log").write_text(done.stderr)
            keep = Path(tempfile.gettempdir()) / f"eptkit-memory-{cfg['method']}-{cfg['layout']}.log"
            keep.write_text(done.stderr)
            raise RuntimeError(f"{cfg['method']} {cfg['layout']} ckpt={cfg['checkpointing']}: workers failed "
                               f"(exit {done.returncode}; whole log in {keep}):\n{done.stderr[-4000:]}")
        ranks = [json.loads(Path(tmp, f"rank-{r}.json").read_text()) for r in range(n)]
    worst = lambda key: max(r[key] for r in ranks) if ranks[0][key] is not None else None  # noqa: E731
    row = {"method": cfg["method"], "layout": cfg["layout"], "processes": n, "checkpointing": cfg["checkpointing"],
           "rows_per_process": ranks[0]["rows"], "params_mib": worst("params_bytes") / MiB,
           "params_bytes": [r["params_bytes"] for r in ranks], "trainable_bytes": ranks[0]["trainable_bytes"],
           "activations_mib": worst("activation_bytes") / MiB,
           "activation_bytes": [r["activation_bytes"] for r in ranks],
           "rss_peak_steps_mib": worst("rss_peak_steps_mib"), "rss_peak_all_mib": worst("rss_peak_all_mib"),
           "cuda_peak_mib": worst("cuda_peak_mib"), "step_s": statistics.median(ranks[0]["times_s"]),
           "times_s": ranks[0]["times_s"], "warmup_s": ranks[0]["warmup_s"], "device": ranks[0]["device"],
           "threads": ranks[0]["threads"], "backbone_params": ranks[0]["backbone_params"], "wall_s": time.perf_counter() - started}
    log(f"{row['method']:4s} {row['layout']:6s} ckpt={int(row['checkpointing'])}: params {row['params_mib']:.1f} MiB, "
        f"activations {row['activations_mib']:.1f} MiB, step {row['step_s']:.2f} s ({row['wall_s']:.0f} s wall)")
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's ratios per method: FSDP/DDP parameters (target <= 0.6) and step time; checkpointed /
    plain activations (target <= 0.5) and step time, per layout."""
    at = {(r["method"], r["layout"], r["checkpointing"]): r for r in rows}
    out = []

    def add(method, what, num, den, key, target=None):
        if num in at and den in at:
            value = at[num][key] / at[den][key]
            out.append({"method": method, "ratio": what, "value": value, "target_max": target,
                        "pass": None if target is None else value <= target})

    for method in dict.fromkeys(r["method"] for r in rows):
        for ck in (False, True):
            tag = " (checkpointed)" if ck else ""
            add(method, f"parameters FSDP/DDP{tag}", (method, "fsdp", ck), (method, "ddp", ck), "params_mib", 0.6)
            add(method, f"step time FSDP/DDP{tag}", (method, "fsdp", ck), (method, "ddp", ck), "step_s")
        for layout in LAYOUTS:
            add(method, f"activations ckpt/plain, {layout}", (method, layout, True), (method, layout, False),
                "activations_mib", 0.5)
            add(method, f"step time ckpt/plain, {layout}", (method, layout, True), (method, layout, False), "step_s")
    return out


COLUMNS = ("method", "layout", "processes", "checkpointing", "rows_per_process", "params_mib", "activations_mib",
           "rss_peak_steps_mib", "rss_peak_all_mib", "cuda_peak_mib", "step_s")


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in COLUMNS])
    return buf.getvalue()


def _f(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def to_markdown(res: dict[str, Any]) -> str:
    s = res["setting"]
    cuda = any(r["cuda_peak_mib"] is not None for r in res["rows"])
    lines = [f"# Memory: sharded and checkpointed training, Llama-shaped `{s['shape']}` "
             f"with {s['backbone']['num_hidden_layers']} blocks on {res['device']}", "",
             f"Backbone: LlamaForSequenceClassification, random weights, {s['backbone']}; "
             f"{s['backbone_params'] / 1e9:.3f} B parameters, fp32. PT l = {s['pt_length']}; EPT m = "
             f"{s['short_length']}, r = {s['rank']}, offset_length = s. s = {s['seq_length']} text tokens, "
             f"global batch {s['global_batch']} (rows per process below); {s['warmup']} warm-up step "
             f"(the measured one) + {s['steps']} timed; {s['threads']} torch thread(s) per process. "
             f"Date {res['date']}, commit {res.get('git_commit', '?')}.", "",
             f"Command: `{res['command']}`", "",
             "| method | layout | ckpt | rows/proc | params MiB/proc | activations MiB/proc | peak RSS MiB (steps) "
             "| peak RSS MiB (incl. build) |" + (" CUDA peak MiB |" if cuda else "") + " step s |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|"]
    for r in res["rows"]:
        layout = {"single": "1 process", "ddp": "DDP x 2", "fsdp": "FSDP x 2"}[r["layout"]]
        lines.append(f"| {r['method']} | {layout} | {'yes' if r['checkpointing'] else 'no'} | {r['rows_per_process']} "
                     f"| {_f(r['params_mib'])} | {_f(r['activations_mib'])} | {_f(r['rss_peak_steps_mib'], 0)} "
                     f"| {_f(r['rss_peak_all_mib'], 0)} |" + (f" {_f(r['cuda_peak_mib'], 0)} |" if cuda else "")
                     + f" {_f(r['step_s'], 2)} |")
    lines += ["", "| method | ratio | value | target |", "|---|---|---|---|"]
    for q in res["ratios"]:
        target = "" if q["target_max"] is None else f"<= {q['target_max']} ({'pass' if q['pass'] else 'FAIL'})"
        lines.append(f"| {q['method']} | {q['ratio']} | {q['value']:.3f} | {target} |")
    lines += ["", "Parameters: bytes of the parameter tensors a process holds at rest (FSDP: its shards). "
              "Activations: distinct storages saved for backward in one training forward plus the inputs of "
              "each transformer block (what a checkpointed block keeps), parameters excluded. Peak RSS "
              "(steps): VmHWM reset after the model is built, which restarts it from the resident size at that "
              "moment; on a CPU that still holds the pages the allocator kept from building the whole backbone "
              "(every process builds it before FSDP shards it, as `eptkit train --fsdp` does), so the two RSS "
              "columns are close. (incl. build): ru_maxrss. Step: the slowest process's "
              "forward + backward + AdamW, median.", ""]
    return "\n".join(lines)


def run(shape: str = "llama-1536x16", *, methods: Sequence[str] = METHODS, layouts: Sequence[str] = tuple(LAYOUTS),
        checkpointing: Sequence[bool] = (False, True), layers: int | None = None, seq_length: int = 512,
        global_batch: int = 2, warmup: int = 1, steps: int = 2, threads: int = 1, seed: int = 0,
        log=print) -> dict[str, Any]:
    if shape not in SHAPES:
        raise ValueError(f"--shape: expected one of {sorted(SHAPES)}, got {shape!r}")
    for name, given, known in (("--methods", methods, METHODS), ("--layouts", layouts, LAYOUTS)):
        if set(given) - set(known):
            raise ValueError(f"{name}: expected some of {sorted(known)}, got {sorted(set(given) - set(known))}")
    if warmup < 1 or steps < 1:
        raise ValueError("--warmup and --steps: at least 1 (the first warm-up step is the measured one)")
    if global_batch % 2:
        raise ValueError("--global-batch: must be even (split over 2 processes)")
    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    rows = []
    for method in methods:
        for layout in layouts:
            for ck in checkpointing:
                rows.append(run_config(dict(shape=shape, method=method, layout=layout, checkpointing=ck,
                                            layers=layers, seq_length=seq_length, global_batch=global_batch,
                                            warmup=warmup, steps=steps, threads=threads, seed=seed), log=log))
    res = {"schema": SCHEMA, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": rows[0]["device"] if rows else "?",
            "setting": {"shape": shape, "backbone": dims, "pt_length": 100,
                        "short_length": 60, "rank": 30, "seq_length": seq_length, "global_batch": global_batch,
                        "warmup": warmup, "steps": steps, "threads": threads, "seed": seed},
            "rows": rows, "ratios": ratios(rows)}
    res["setting"]["backbone_params"] = rows[0]["backbone_params"] if rows else None
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1536x16")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the shape's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--seq-length", type=int, default=512, help="text tokens per row")
    p.add_argument("--global-batch", type=int, default=2, help="rows per step over all processes")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None, help="file stem (default memory_cpu or memory_cuda)")
    a = p.parse_args(argv)
    res = run(a.shape, methods=a.methods.split(","), layouts=a.layouts.split(","), layers=a.layers,
              seq_length=a.seq_length, global_batch=a.global_batch, warmup=a.warmup, steps=a.steps,
              threads=a.threads, log=lambda s: print(s, file=sys.stderr, flush=True))
    res["command"] = "python benchmarks/memory.py " + " ".join(argv)
    try:
        res["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        pass
    name = a.name or ("memory_cuda" if torch.cuda.is_available() else "memory_cpu")
    timing.write_text(a.out_dir / f"{name}.json", json.dumps(res, indent=1) + "\n")
    timing.write_text(a.out_dir / f"{name}.csv", to_csv(res["rows"]))
    timing.write_text(a.out_dir / f"{name}.md", to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

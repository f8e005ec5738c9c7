"""What EPT's prompt side costs per training step beyond DePT's, measured where it happens.

EPT and DePT differ only in the prompt side (fusion, multi-space projection, gate), computed once
per step from the adapter's parameters. On a loaded machine the end-to-end step ratio EPT/DePT
(benchmarks/speed.py) is dominated by noise a hundred times larger than that difference, so this
script times the difference itself: forward + backward of the method module alone (EPT vs DePT,
interleaved rounds), which is exactly what EPT adds to a step, and states it as a fraction of a
step time given on the command line (e.g. DePT's median from speed.py's table).

    python benchmarks/ept_overhead.py --hidden 384 --offset-length 128 --step-ms 8933
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import timing  # a sibling script: its folder is on the path when a script of benchmarks/ runs


def time_method(module: nn.Module, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        prompt, offset = module()
        (prompt.sum() + offset.sum()).backward()
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    from eptkit import DePTConfig, EPTConfig
    from eptkit.methods import DePT, EPT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--offset-length", type=int, default=128)
    p.add_argument("--short-length", type=int, default=60)
    p.add_argument("--rank", type=int, default=30)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=20, help="forward+backward calls per timed round")
    p.add_argument("--step-ms", type=float, required=True, help="a DePT training step's median (ms), for the fraction")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=timing.RESULTS_DIR / "ept_overhead_cpu.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    emb = nn.Embedding(a.vocab, a.hidden)
    kw = dict(prompt_length=a.short_length, rank=a.rank, offset_length=a.offset_length)
    torch.manual_seed(0)
    # module_init="random": every EPT weight non-zero, the fusion and projection fully active.
    methods = {"dept": DePT(DePTConfig(**kw), emb), "ept": EPT(EPTConfig(module_init="random", **kw), emb)}
    times = {k: [] for k in methods}
    for r in range(a.rounds + 2):  # two warm-up rounds
        for key in (("dept", "ept") if r % 2 else ("ept", "dept")):
            t = time_method(methods[key], a.calls)
            if r >= 2:
                times[key].append(t)
    extra = [e - d for e, d in zip(times["ept"], times["dept"])]
    result = {"setting": vars(a) | {"out": str(a.out)}, "machine": timing.machine_info(torch.device("cpu")),
              "dept_ms": statistics.median(times["dept"]) * 1e3, "ept_ms": statistics.median(times["ept"]) * 1e3,
              "extra_ms_median": statistics.median(extra) * 1e3,
              "extra_ms_iqr": [timing.quantile(extra, 0.25) * 1e3, timing.quantile(extra, 0.75) * 1e3]}
    result["extra_fraction_of_step"] = result["extra_ms_median"] / a.step_ms
    timing.write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"prompt side per step: DePT {result['dept_ms']:.2f} ms, EPT {result['ept_ms']:.2f} ms; EPT adds "
          f"{result['extra_ms_median']:.2f} ms (IQR {result['extra_ms_iqr'][0]:.2f}-{result['extra_ms_iqr'][1]:.2f}) "
          f"= {100 * result['extra_fraction_of_step']:.3f}% of a {a.step_ms:.0f} ms step -> EPT/DePT "
          f"{1 + result['extra_fraction_of_step']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

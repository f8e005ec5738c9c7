"""Does torch.compile pay for EPT training on CPU? (issue 20: cut per-step cost only where it pays)

    python benchmarks/compile_cpu.py                    # 1 thread, EPT m=60 r=30 on the bundled MiniLM, batch 16
    python benchmarks/compile_cpu.py --rounds 20 --threads 2

One process, one fixed batch of real SST-2 sentences (dynamic padding to the batch's longest row), two
copies of the same EPT model: eager and `torch.compile`d. Each round runs one training step (forward,
backward, AdamW) of each, the order alternating, so a loaded machine's slow spells hit both. The first
compiled step (the compilation) is timed apart and left out of the ratio, as are the warm-up rounds.
The fixed batch is the compiler's best case: real training batches change length, and each new length
may recompile. Writes results/compile_cpu.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import random
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sst2_batch(tokenizer, data_dir: Path, n: int, seed: int = 0) -> dict:
    path = data_dir / "glue" / "SST-2" / "train.tsv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    picked = random.Random(seed).sample(rows, n)
    batch = tokenizer([r["sentence"] for r in picked], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([int(r["label"]) for r in picked])
    return dict(batch)


def step(model, optimizer, batch) -> float:
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "compile_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from eptkit import EPTConfig, get_prompted_model
    from eptkit.backbones import bundled_model_path, load_backbone

    backbone, tokenizer = load_backbone(str(bundled_model_path()), "classification", num_labels=2)
    eager = get_prompted_model(backbone, EPTConfig(prompt_length=60, rank=30, offset_length=128), tokenizer=tokenizer)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    batch = sst2_batch(tokenizer, args.data_dir, args.batch_size)
    opt = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
           for name, m in (("eager", eager), ("compiled", compiled_model))}
    eager.train()
    compiled.train()
    t0 = time.perf_counter()
    first_compiled = step(compiled, opt["compiled"], batch)
    compile_seconds = time.perf_counter() - t0
    times = {"eager": [], "compiled": []}
    for i in range(args.warmup + args.rounds):
        order = [("eager", eager), ("compiled", compiled)][:: 1 if i % 2 == 0 else -1]
        for name, model in order:
            dt = step(model, opt[name], batch)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
    text = (f"# torch.compile for EPT training on CPU\n\n`python benchmarks/compile_cpu.py --rounds {args.rounds} "
            f"--threads {args.threads} --batch-size {args.batch_size}` ({time.strftime('%Y-%m-%d')}, torch "
            f"{torch.__version__}, batch {args.batch_size} x {batch['input_ids'].shape[1]} SST-2 tokens + 60 prompt "
            f"tokens, {args.threads} thread(s)).\n\n"
            f"| | median step (s) |\n|---|---:|\n| eager | {med['eager']:.3f} |\n| compiled | {med['compiled']:.3f} |\n\n"
            f"compiled / eager: **{med['compiled'] / med['eager']:.3f}** of medians, {paired:.3f} median paired ratio "
            f"({args.rounds} rounds). The first compiled step (compilation) took {first_compiled:.1f} s "
            f"({compile_seconds:.1f} s with the call), {first_compiled / med['eager']:.0f} eager steps.\n")
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

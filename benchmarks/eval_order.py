"""Evaluation in length order against file order (eptkit.evaluation.predict_rows sorts rows by length).

    python benchmarks/eval_order.py [--task rte] [--rows 500] [--repeats 2] [--data-dir ../shared/data]

An untrained EPT adapter (m=60, r=30, the suite's shape) on the bundled MiniLM scores --rows validation
rows in batches of 64, once in file order and once longest first, alternating --repeats times, one
torch thread. Reports each median time, their ratio, and whether the predictions are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from eptkit import EPTConfig, get_prompted_model
from eptkit.backbones import bundled_model_path, load_backbone
from eptkit.batching import subsample
from eptkit.evaluation import batch_values
from eptkit.tasks.formatting import Collator, encode
from eptkit.tasks.loading import load_task
from eptkit.tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="rte")
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = get_task(args.task)
    data = load_task(spec, args.data_dir)
    backbone, tok = load_backbone(bundled_model_path(), "classification", spec, num_labels=spec.num_labels)
    model = get_prompted_model(backbone, EPTConfig(prompt_length=60, rank=30, offset_length=128)).eval()
    rows = encode(subsample(data["validation"], args.rows, 0), spec, tok, "classification", 128,
                  truncation=True).to_list()
    collate = Collator(tok, "classification")

    def scored(order: list[int]) -> tuple[float, list[float]]:
        t0, out = time.perf_counter(), {}
        with torch.no_grad():
            for start in range(0, len(order), 64):
                idx = order[start:start + 64]
                values = batch_values(model, tok, collate, [rows[i] for i in idx], [spec] * len(idx),
                                       [8] * len(idx), "cpu")
                out.update(zip(idx, values))
        return time.perf_counter() - t0, [out[i] for i in range(len(rows))]

    file_order = list(range(len(rows)))
    longest_first = sorted(file_order, key=lambda i: -len(rows[i]["input_ids"]))
    times = {"file order": [], "longest first": []}
    same = True
    for _ in range(args.repeats):
        (a, pa), (b, pb) = scored(file_order), scored(longest_first)
        times["file order"].append(a)
        times["longest first"].append(b)
        same &= pa == pb
    median = {k: statistics.median(v) for k, v in times.items()}
    summary = {"task": args.task, "rows": len(rows), "seconds": median, "identical_predictions": same,
               "speed_up": median["file order"] / median["longest first"]}
    print(f"{args.task}, {len(rows)} rows: file order {median['file order']:.1f} s, longest first "
          f"{median['longest first']:.1f} s, {summary['speed_up']:.2f}x; identical predictions: {same}")
    return summary


if __name__ == "__main__":
    main()

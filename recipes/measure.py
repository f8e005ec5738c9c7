"""Measure the `cpu/` recipes: train each as printed, then print the table recipes/README.md shows.

    OMP_NUM_THREADS=1 python recipes/measure.py --data-dir ../shared/data cb rte mrpc

Each task runs `eptkit train --config recipes/cpu/TASK.json --data-dir DIR --output-dir OUT/TASK` in a
process of its own (the command a user types); a task whose OUT/TASK/results.json exists is not run
again, so an interrupted measurement continues where it stopped. The table's scores are the best
validation checkpoint's (at most 500 validation / 500 test examples, the recipes' max-eval-samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "cpu"


def train(task: str, data_dir: str, out: Path) -> dict:
    results = out / task / "results.json"
    if not results.is_file():
        cmd = [sys.executable, "-m", "eptkit.cli", "train", "--config", str(RECIPES / f"{task}.json"),
               "--data-dir", data_dir, "--output-dir", str(out / task), "--overwrite"]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(results.read_text())


def row(task: str, results: dict) -> str:
    metric = results["main_metric"]
    recipe = json.loads((RECIPES / f"{task}.json").read_text())
    return (f"| `cpu/{task}.json` | {metric} | {results['validation'][metric]:.1f} | {results['test'][metric]:.1f} "
            f"| {recipe['max-steps']} | {results['train_time_s'] / 60:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", help="Recipe names (cpu/NAME.json).")
    parser.add_argument("--data-dir", required=True, help="Folder laid out like shared/data.")
    parser.add_argument("--out", default="runs/recipes", help="Where the runs go (default: runs/recipes).")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = ["| recipe | metric | validation | test | steps | training minutes |", "|---|---|---:|---:|---:|---:|"]
    for task in args.tasks:
        lines.append(row(task, train(task, args.data_dir, Path(args.out))))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

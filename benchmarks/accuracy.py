"""Accuracy suite: every method on real GLUE/SuperGLUE tasks, equal step budgets, several seeds.

    python benchmarks/accuracy.py run     [--phase select|final|ablation|all] [--tasks ...] [--seeds 0,1,2]
    python benchmarks/accuracy.py report  # markdown table + plots from the CSVs

Protocol (see benchmarks/README.md, "Accuracy"):
1. select: each method's learning rate(s) are chosen on the *validation* split of the selection
   tasks (seed 0), from a small grid per method; the choice is written to lr_selection.csv.
2. final: every task x method x seed runs with the selected learning rates; the best checkpoint
   on validation is scored on the test split (the literature's split protocol, SPEC 4).
3. ablation: EPT without fusion, without projection, and with 1/2/4/8 subspaces.
4. tune (optional): EPT's module learning rate, on the selection task's validation split only
   (ept_tuning.csv; compared with the final EPT rows' validation scores at the default rate).
Every run is one `eptkit train ...` command (recorded in the CSV's `command` column) in a fresh
process. Finished cells are skipped, so the suite resumes across sessions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("rte", "mrpc", "cb", "cola", "stsb", "wic", "sst2")
# Learning rates are selected on SST-2 only: it is the one task on which every method learns within
# the CPU budget (on RTE and CoLA most runs stay at the majority class), so it is the only one whose
# validation scores can rank the candidates.
SELECT_TASKS = ("sst2",)
MAIN_METHODS = ("head", "pt", "dept", "ept", "lora", "full")
# PEFT's P-tuning, an extra row toward the paper's comparison methods. PEFT's prefix tuning does not
# apply to the bundled BERT-style classifier (transformers 5 encoders take no past_key_values), so it
# has no row here; `eptkit train --method prefix` runs it on T5 and decoder-only backbones.
EXTRA_METHODS = ("ptuning",)
ABLATIONS = ("ept_no_fusion", "ept_no_projection", "ept_n1", "ept_n2", "ept_n8")
SEEDS = (0, 1, 2)
COLUMNS = ("task", "method", "seed", "steps", "trainable_params", "train_seconds", "metric", "validation", "test",
           "lr", "command")

# Shared budget: the same steps, batch, text length and evaluation schedule for every method.
# PT (l=100) and DePT/EPT (m=60, r=30) have the same prompt budget at max_length=128 on a 384-wide
# backbone: 100*384 = 60*384 + 30*(128+384).
# Padding is dynamic, so max_length only bounds the offset's rows: short-text tasks do not pay for it.
COMMON = ["--max-length", "128", "--batch-size", "16", "--save-steps", "0", "--max-eval-samples", "500",
          "--early-stopping-patience", "0"]
METHOD_ARGS = {
    "head": ["--method", "head"],
    "pt": ["--method", "pt", "--prompt-length", "100"],
    "dept": ["--method", "dept", "--prompt-length", "60", "--rank", "30"],
    "ept": ["--method", "ept", "--prompt-length", "60", "--rank", "30"],
    "lora": ["--method", "lora", "--lora-r", "8"],
    "full": ["--method", "full"],
    "ptuning": ["--method", "ptuning", "--prompt-length", "20"],
    "ept_no_fusion": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--no-fusion"],
    "ept_no_projection": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "0"],
    "ept_n1": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "1"],
    "ept_n2": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "2"],
    "ept_n8": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "8"],
}
# Learning-rate grids (AdamW). Each entry is one candidate: option -> value. Every method that trains
# the classification head trains it at the rate the linear probe selects (1e-2 beat 1e-3 on SST-2):
# with the default 1e-3 the head, not the prompt, limited the prompt methods within 150 steps.
HEAD_LR = {"--lr-head": 1e-2}
LR_GRID = {
    "head": [{"--lr-head": 1e-3}, {"--lr-head": 1e-2}],
    "pt": [{"--lr": 1e-2, **HEAD_LR}, {"--lr": 1e-1, **HEAD_LR}],
    "dept": [{"--lr": 1e-2, "--lr-low-rank": 1e-3, **HEAD_LR}, {"--lr": 1e-1, "--lr-low-rank": 1e-3, **HEAD_LR}],
    "ept": [{"--lr": 1e-2, "--lr-low-rank": 1e-3, **HEAD_LR}, {"--lr": 1e-1, "--lr-low-rank": 1e-3, **HEAD_LR}],
    "lora": [{"--lr-lora": 5e-4, **HEAD_LR}, {"--lr-lora": 2e-3, **HEAD_LR}],
    "full": [{"--lr-full": 2e-5}, {"--lr-full": 1e-4}],
    "ptuning": [{"--lr": 1e-3, **HEAD_LR}, {"--lr": 1e-2, **HEAD_LR}],
}


# EPT's own modules (fusion, projection, gate) train at --lr-ept (default: the low-rank rate, 1e-3).
# At that rate they add about 1% to the prompt in 150 steps (benchmarks/ept_modules.py), so the
# "tune" phase asks, on validation only, whether a higher rate for them helps. 1e-1 (seed 0, kept in
# ept_tuning.csv as history) blew the projection up to 200x the prompt's norm, so it left the grid.
EPT_TUNING = [{**LR_GRID["ept"][0], "--lr-ept": 3e-3}, {**LR_GRID["ept"][0], "--lr-ept": 1e-2}]


def lr_key(lr: dict) -> str:
    return " ".join(f"{k} {v:g}" for k, v in sorted(lr.items()))


def parse_lr_key(key: str) -> dict:
    parts = key.split()
    return {parts[i]: float(parts[i + 1]) for i in range(0, len(parts), 2)}


def base_method(method: str) -> str:
    return "ept" if method.startswith("ept") else method


# ---------------------------------------------------------------------------- CSV
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append one finished cell; the row is flushed to disk before the next run starts."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- one run
def command_for(task, method, seed, lr: dict, steps, eval_steps, data_dir, out_dir) -> list[str]:
    rel = lambda p: os.path.relpath(p, ROOT)  # commands run from the repository root  # noqa: E731
    args = ["eptkit", "train", "--task", task, "--data-dir", rel(data_dir), "--output-dir", rel(out_dir),
            "--seed", str(seed), "--max-steps", str(steps), "--eval-steps", str(eval_steps), *COMMON,
            *METHOD_ARGS[method]]
    for k, v in sorted(lr.items()):
        args += [k, f"{v:g}"]
    return args


def run_cell(task, method, seed, lr, opts) -> dict:
    steps, data_dir, runs_dir, threads = opts.steps, opts.data_dir, opts.runs_dir, opts.threads
    out_dir = runs_dir / f"{task}-{method}-s{seed}-{lr_key(lr).replace(' ', '').replace('--', '_')}"
    cmd = command_for(task, method, seed, lr, steps, opts.eval_steps, data_dir, out_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    exe = [sys.executable, "-m", "eptkit.cli", *cmd[1:], "--overwrite"]
    print(f"[accuracy] {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(exe, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"run failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    results = json.loads((out_dir / "results.json").read_text())
    metric = results["main_metric"]
    row = {
        "task": task, "method": method, "seed": seed, "steps": results.get("steps", steps),
        "trainable_params": results["trainable_params"], "train_seconds": round(results["train_time_s"], 1),
        "metric": metric, "validation": round(results["validation"][metric], 2),
        "test": round(results["test"][metric], 2), "lr": lr_key(lr), "command": shlex.join(cmd),
    }
    print(f"[accuracy]   -> val {row['validation']} test {row['test']} ({time.time() - t0:.0f}s)", flush=True)
    return row


# ---------------------------------------------------------------------------- phases
def selected_lrs(select_csv: Path) -> dict[str, dict]:
    """Per method, the grid entry with the best mean validation score over the selection tasks."""
    rows = read_rows(select_csv)
    best = {}
    for method, grid in LR_GRID.items():
        candidates = {lr_key(lr) for lr in grid}  # rows of earlier grids stay in the CSV as history
        scores = {}
        for r in rows:
            if r["method"] == method and r["lr"] in candidates:
                scores.setdefault(r["lr"], []).append(float(r["validation"]))
        complete = {k: v for k, v in scores.items() if len(v) == len({r["task"] for r in rows if r["method"] == method})}
        if complete:
            best[method] = parse_lr_key(max(complete, key=lambda k: statistics.mean(complete[k])))
    return best


def run_cells(cells, csv_path: Path, args) -> None:
    """Run (task, method, seed, lr) cells, `args.jobs` at a time (each its own `eptkit train` process);
    every finished row is appended at once, so an interrupted suite keeps what it finished."""
    if args.jobs <= 1:
        for cell in cells:
            append_row(csv_path, run_cell(*cell, args))
        return
    lock = threading.Lock()

    def one(cell):
        row = run_cell(*cell, args)
        with lock:
            append_row(csv_path, row)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one, cell) for cell in cells]:
            future.result()  # re-raise the first failure (the other cells still finish and are kept)


def run_phase(phase, args) -> None:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    select_csv, final_csv = args.results_dir / "lr_selection.csv", args.results_dir / "accuracy.csv"
    methods = args.methods or (MAIN_METHODS + EXTRA_METHODS if phase != "ablation" else ABLATIONS)
    if phase == "select":
        done = {(r["task"], r["method"], r["lr"]) for r in read_rows(select_csv)}
        cells = [(task, method, 0, lr) for method in methods for lr in LR_GRID[method] for task in args.select_tasks
                 if (task, method, lr_key(lr)) not in done]
        return run_cells(cells, select_csv, args)
    if phase == "tune":
        tune_csv = args.results_dir / "ept_tuning.csv"
        done = {(r["task"], r["seed"], r["lr"]) for r in read_rows(tune_csv)}
        cells = [(task, "ept", seed, lr) for seed in args.seeds for lr in EPT_TUNING for task in args.select_tasks
                 if (task, str(seed), lr_key(lr)) not in done]
        return run_cells(cells, tune_csv, args)
    chosen = selected_lrs(select_csv)
    done = {(r["task"], r["method"], r["seed"]) for r in read_rows(final_csv)}
    # A selection run is the same command as the final run of its seed: reuse it instead of rerunning.
    reusable = {(r["task"], r["method"], r["seed"], r["lr"]): r for r in read_rows(select_csv)}
    # Seed-major order: a partial run gives every task and method one seed before any gets a second.
    cells = []
    for seed in args.seeds:
        for task in args.tasks:
            for method in methods:
                if (task, method, str(seed)) in done:
                    continue
                lr = chosen.get(base_method(method))
                if lr is None:
                    print(f"[accuracy] skip {method}: no learning rate selected yet (run --phase select)")
                    continue
                previous = reusable.get((task, method, str(seed), lr_key(lr)))
                if previous:
                    append_row(final_csv, previous)
                else:
                    cells.append((task, method, seed, lr))
    run_cells(cells, final_csv, args)


# ---------------------------------------------------------------------------- report
def majority_scores(task: str, seeds, data_dir: Path) -> list[float]:
    """The task's main metric for a constant prediction: the most frequent training label (the
    training mean for regression), on the same test subset each seed's runs were scored on."""
    from eptkit.metrics import compute_metrics
    from eptkit.tasks import load_task
    from eptkit.tasks.registry import get_task
    from eptkit.train import subsample

    spec, data = get_task(task), load_task(task, data_dir)
    labels = data["train"]["label"]
    constant = statistics.mean(labels) if spec.is_regression else max(set(labels), key=labels.count)
    max_eval = int(COMMON[COMMON.index("--max-eval-samples") + 1])
    scores = []
    for seed in seeds:
        test = subsample(data["test"], max_eval, seed)
        scores.append(compute_metrics(spec, [constant] * len(test), test["label"])[spec.main_metric])
    return scores


def report(args) -> None:
    results_dir = args.results_dir
    rows = read_rows(results_dir / "accuracy.csv")
    if not rows:
        sys.exit("no results yet: run `python benchmarks/accuracy.py run` first")
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    methods = [m for m in MAIN_METHODS + EXTRA_METHODS + ABLATIONS if any(r["method"] == m for r in rows)]
    cell = {}
    for r in rows:
        cell.setdefault((r["method"], r["task"]), []).append(r)
    if args.data_dir.is_dir():  # a reference row: what predicting one constant scores
        methods = ["majority", *methods]
        for t in tasks:
            seeds = sorted({int(r["seed"]) for r in rows if r["task"] == t})
            cell[("majority", t)] = [{"test": v, "train_seconds": 0, "trainable_params": 0}
                                     for v in majority_scores(t, seeds, args.data_dir)]
    lines = ["| method | params | " + " | ".join(tasks) + " | average | train s/run |",
             "|---|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    summary = {}
    for m in methods:
        scores, means, times, params = [], [], [], None
        for t in tasks:
            rs = cell.get((m, t), [])
            vals = [float(r["test"]) for r in rs]
            times += [float(r["train_seconds"]) for r in rs]
            params = params or (rs[0]["trainable_params"] if rs else None)
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                scores.append(f"{statistics.mean(vals):.1f} ± {sd:.1f} ({len(vals)})")
                means.append(statistics.mean(vals))
            else:
                scores.append("–")
        complete = len(means) == len(tasks)
        avg = statistics.mean(means) if complete else None
        mean_time = statistics.mean(times) if times else None
        summary[m] = {"average": avg, "params": int(params) if params else None, "seconds": mean_time}
        cells = [f"{int(params):,}" if params else "–", *scores, f"{avg:.1f}" if complete else "–",
                 f"{mean_time:.0f}" if mean_time else "–"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    selection = read_rows(results_dir / "lr_selection.csv")
    sel_lines = ["| method | task | learning rates | validation |", "|---|---|---|---:|"]
    sel_lines += [f"| {r['method']} | {r['task']} | `{r['lr']}` | {float(r['validation']):.1f} |" for r in selection]
    chosen = selected_lrs(results_dir / "lr_selection.csv")
    text = (f"Test scores (task's main metric, 0-100): mean ± std over seeds (number of seeds). `majority`: a "
            f"constant prediction (the most frequent training label; STS-B: the training mean), scored on the "
            f"same test subsets.\n\n{table}\n\n"
            f"Selected learning rates: " + "; ".join(f"{m}: `{lr_key(v)}`" for m, v in chosen.items())
            + "\n\nLearning-rate selection (seed 0, validation split; rows of earlier grids are history, "
            "not selected from):\n\n" + "\n".join(sel_lines) + "\n" + _tuning_table(rows, results_dir))
    (results_dir / "accuracy.md").write_text(text)
    print(text)
    _plots(summary, results_dir)


def _tuning_table(final_rows: list[dict], results_dir: Path) -> str:
    """EPT's module learning rate on validation: the tune runs against the final EPT runs (default rate)."""
    tuning = read_rows(results_dir / "ept_tuning.csv")
    if not tuning:
        return ""
    by_rate: dict[str, dict[str, list[float]]] = {}
    for r in tuning:
        by_rate.setdefault(f"{parse_lr_key(r['lr']).get('--lr-ept'):g}", {}).setdefault(r["task"], []).append(
            float(r["validation"]))
    tasks = sorted({t for v in by_rate.values() for t in v})
    default = {t: [float(r["validation"]) for r in final_rows if r["method"] == "ept" and r["task"] == t] for t in tasks}
    lines = ["| `--lr-ept` | " + " | ".join(f"{t} validation" for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]

    def fmt(v):
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f} ({len(v)})" if v else "–"

    lines.append("| default (the low-rank rate) | " + " | ".join(fmt(default[t]) for t in tasks) + " |")
    for rate, per_task in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
        lines.append(f"| {rate} | " + " | ".join(fmt(per_task.get(t, [])) for t in tasks) + " |")
    return ("\nEPT module learning rate (`tune` phase; validation split only, mean ± std over seeds):\n\n"
            + "\n".join(lines) + "\n")


def _plots(summary: dict, results_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {m: s for m, s in summary.items() if s["average"] is not None and m != "majority"}
    if not points:
        return
    majority = summary.get("majority", {}).get("average")
    for key, label, name in (("params", "trainable parameters", "accuracy_vs_params.png"),
                             ("seconds", "training time per run (s, CPU)", "accuracy_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, s in points.items():
            ax.scatter(s[key], s["average"])
            ax.annotate(m, (s[key], s["average"]), textcoords="offset points", xytext=(4, 4))
        if majority is not None:
            ax.axhline(majority, color="gray", linestyle="--", linewidth=1, label="majority class")
            ax.legend(loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("average test score")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(results_dir / name, dpi=120)
        plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the CSVs, table and plots live")
    sub = parser.add_subparsers(dest="command", required=True)
    default_data_dir = Path(os.environ.get("EPTKIT_DATA_DIR", ROOT.parent / "shared" / "data"))
    run = sub.add_parser("run", help="run (or resume) the suite")
    run.add_argument("--phase", choices=("select", "final", "ablation", "tune", "all"), default="all",
                     help="tune: EPT's module learning rate on the selection tasks' validation split (--seeds)")
    run.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    run.add_argument("--select-tasks", type=lambda s: s.split(","), default=list(SELECT_TASKS))
    run.add_argument("--methods", type=lambda s: s.split(","), default=None)
    run.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(SEEDS))
    run.add_argument("--steps", type=int, default=150, help="optimizer steps per run (equal for every method)")
    run.add_argument("--eval-steps", type=int, default=50, help="validate (and keep the best adapter) this often")
    run.add_argument("--data-dir", type=Path, default=default_data_dir)
    run.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "accuracy")
    run.add_argument("--threads", type=int, default=2, help="torch threads per run")
    run.add_argument("--jobs", type=int, default=1,
                     help="runs at a time (separate processes; e.g. --jobs 2 --threads 1 on 2 cores, or 8 on one GPU)")
    rep = sub.add_parser("report", help="write accuracy.md and the plots from the CSVs")
    rep.add_argument("--data-dir", type=Path, default=default_data_dir,
                     help="task data, for the majority-class reference row (left out if absent)")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report(args)
    phases = ("select", "final", "ablation") if args.phase == "all" else (args.phase,)
    for phase in phases:
        run_phase(phase, args)
    report(args)


if __name__ == "__main__":
    main()

"""Accuracy suite: every method on real GLUE/SuperGLUE tasks, equal step budgets, several seeds.

    python benchmarks/accuracy.py run     [--phase select|final|ablation|tune|recipe|all] [--tasks ...] [--seeds 0,1,2]
    python benchmarks/accuracy.py report  # markdown tables + plots from the CSVs

Protocol (see benchmarks/README.md, "Accuracy"):
1. select: each method's learning rate(s) are chosen on the *validation* split of the selection
   tasks (SST-2, MRPC, STS-B; seed 0) from a grid per method, by the mean validation score over the
   tasks; the rows are in lr_selection.csv. For PT, DePT and EPT the grid is a sweep of the prompt's
   rate, drawn as validation score against that rate (lr_sweep.png).
2. final: every task x method x seed runs with the selected learning rates; the best checkpoint
   on validation is scored on the test split (the literature's split protocol, docs in README).
3. ablation: EPT without fusion, without projection, and with 1/2/8 subspaces, on the ablation tasks
   and seeds; the report gives each variant's paired difference from EPT (same task and seed).
4. tune: EPT's module learning rate and initialisation, on the selection tasks' validation split.
5. recipe: the recipe choices other than the rate (optimiser, prompt initialisation, warm-up, head
   rate, regression targets), each changed alone from the selected EPT/PT recipe, on validation.
Every run is one `eptkit train ...` command (recorded in the CSV's `command` column) in a fresh
process; with --together K, up to K PT/DePT/EPT runs of one task share one `eptkit train --sweep`
process (eptkit.multirun: one frozen backbone; the sweep file is kept in results/sweeps/). Finished
cells are skipped, so the suite resumes across sessions; a row counts as finished (or reusable, or a
selection candidate) only at the budget (steps, eval steps, batch) it was run with.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eptkit.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("rte", "mrpc", "cb", "cola", "stsb", "wic", "sst2")
# Learning rates are selected on three tasks' validation splits: SST-2 (single sentences), MRPC
# (paraphrase pairs) and STS-B (regression), so no one task's quirks pick the recipe for all.
SELECT_TASKS = ("sst2", "mrpc", "stsb")
MAIN_METHODS = ("head", "pt", "dept", "ept", "lora", "full")
# PEFT's P-tuning, an extra row toward the paper's comparison methods. PEFT's prefix tuning does not
# apply to the bundled BERT-style classifier (transformers 5 encoders take no past_key_values), so it
# has no row here; `eptkit train --method prefix` runs it on T5 and decoder-only backbones.
EXTRA_METHODS = ("ptuning",)
ABLATIONS = ("ept_no_fusion", "ept_no_projection", "ept_n1", "ept_n2", "ept_n8")
ABLATION_TASKS = SELECT_TASKS
SEEDS = (0, 1, 2)
# steps, eval_steps and batch_size are the run's budget: a row is only ever reused, resumed or selected
# from at the budget it was trained with.
COLUMNS = ("task", "method", "seed", "steps", "eval_steps", "batch_size", "trainable_params", "train_seconds",
           "metric", "validation", "test", "lr", "command")
BUDGET = ("steps", "eval_steps", "batch_size")

# Shared budget: the same steps, batch, text length and evaluation schedule for every method.
# PT (l=100) and DePT/EPT (m=60, r=30) have the same prompt budget at max_length=128 on a 384-wide
# backbone: 100*384 = 60*384 + 30*(128+384).
# Padding is dynamic, so max_length only bounds the offset's rows: short-text tasks do not pay for it.
COMMON = ["--max-length", "128", "--save-steps", "0", "--max-eval-samples", "500", "--early-stopping-patience", "0"]
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
# Learning-rate grids. Each entry is one candidate: option -> value. The prompt and low-rank rates are
# in eptkit's default unit, fractions of the backbone's word-embedding RMS (0.056 on MiniLM, so 0.02 is
# an absolute 1.1e-3): the grids of an earlier session (absolute 1e-2 and 1e-1, kept as history in
# results/history/) threw the prompt far off the vocabulary and the prompt methods learned nothing on
# STS-B. For PT, DePT and EPT the grid sweeps the prompt's rate over 16x (the lr_sweep.png plot);
# DePT and EPT keep the low-rank rate at a tenth of it. The head, LoRA and full fine-tuning keep the
# rates an earlier SST-2 selection chose (head 1e-2, LoRA 2e-3, full 1e-4), run once per selection task.
HEAD_LR = {"--lr-head": 1e-2}
PROMPT_RATES = (5e-3, 2e-2, 8e-2)
# A generic instruction (not tuned per task) for text initialisation.
INIT_TEXT = "Read the text and decide the answer."
TEXT_INIT = {"--init": "text", "--init-text": INIT_TEXT}
# The start that benchmarks/fresh_prompt.py found to leave the frozen features intact (an instruction,
# with the text at the positions it has without a prompt), swept over its own rates: a recipe enters
# the selection as a whole, so the rate it is chosen at is the one it is best at. Its rates go up from
# the best of the first grid (0.08, its upper edge; 0.02 and 0.005 trailed it for all three methods).
INSTRUCTION = {**TEXT_INIT, "--text-positions": "own"}
INSTRUCTION_RATES = (8e-2, 3e-1)
# The first grid's start, PEFT's: sampled vocabulary rows with the text after the prompt (eptkit's
# defaults until the selection below chose the instruction; named, so its commands still re-run).
SAMPLED = {"--init": "sample_vocab", "--text-positions": "after_prompt"}
LR_GRID = {
    "head": [dict(HEAD_LR)],
    "pt": [{"--lr": r, **HEAD_LR, **SAMPLED} for r in PROMPT_RATES]
    + [{"--lr": r, **HEAD_LR, **INSTRUCTION} for r in INSTRUCTION_RATES],
    "dept": [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **SAMPLED} for r in PROMPT_RATES]
    + [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **INSTRUCTION} for r in INSTRUCTION_RATES],
    "ept": [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **SAMPLED} for r in PROMPT_RATES]
    + [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **INSTRUCTION} for r in INSTRUCTION_RATES],
    "lora": [{"--lr-lora": 2e-3, **HEAD_LR}],
    "full": [{"--lr-full": 1e-4}],
    "ptuning": [{"--lr": 2e-2, **HEAD_LR}, {"--lr": 2e-1, **HEAD_LR}],
}
# tune: EPT's own modules (fusion, projection, gate), changed from the selected EPT recipe. By default
# they train at the low-rank rate's number (an absolute rate) and start so that EPT computes exactly
# DePT; the variants: a faster and a slower module rate, and a projection active from the first step.
# Each variant: (method, options changed from its selected recipe, tasks or None for SELECT_TASKS).
EPT_TUNING = [
    ("ept", {"--module-init": "random"}, None),
    ("ept", {"--lr-ept": 1e-3}, None),
    ("ept", {"--lr-ept": 3e-2}, None),
]
# recipe: the choices other than the rate, each changed alone from the selected recipe.
RECIPE_VARIANTS = [
    # Each half of the instruction start alone (benchmarks/fresh_prompt.py measured both halves on
    # untrained prompts), then the optimiser and the regression targets.
    ("ept", {"--text-positions": "after_prompt"}, None),
    ("ept", {"--init": "sample_vocab"}, None),
    ("ept", {"--optimizer": "adafactor", "--lr": 0.3, "--lr-low-rank": 0.03}, None),
    ("ept", {"--regression-targets": "raw"}, ("stsb",)),
]


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _quoted(value) -> str:
    return shlex.quote(_fmt(value))


def _parse(text: str):
    """An option's value as written on a command line: an int, a float, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def lr_key(lr: dict) -> str:
    """A candidate's options as one string ("--lr 0.02 --lr-head 0.01"): the CSV's `lr` column."""
    return " ".join(f"{k} {_quoted(v)}" for k, v in sorted(lr.items()))


def parse_lr_key(key: str) -> dict:
    parts = shlex.split(key)
    return {parts[i]: _parse(parts[i + 1]) for i in range(0, len(parts), 2)}


def budget_of(row: dict) -> tuple[str, str, str]:
    """(steps, eval_steps, batch_size) of a CSV row, as strings ('' where an old row lacks one)."""
    return tuple(str(row.get(k, "") or "") for k in BUDGET)


def budget_args(args) -> tuple[str, str, str]:
    return (str(args.steps), str(args.eval_steps), str(args.batch_size))


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
def _rel(path) -> str:
    return os.path.relpath(path, ROOT)  # commands run from the repository root


def _train_command(task, data_dir, out_dir, steps, eval_steps, batch_size, seed=None) -> list[str]:
    """`eptkit train` with the options every run of the suite shares."""
    return ["eptkit", "train", "--task", task, "--data-dir", _rel(data_dir), "--output-dir", _rel(out_dir),
            *([] if seed is None else ["--seed", str(seed)]), "--max-steps", str(steps), "--eval-steps",
            str(eval_steps), "--batch-size", str(batch_size), *COMMON]


def _method_words(method, lr: dict) -> list[str]:
    """The options of one cell after the shared ones: its method's, then its rates (and start)."""
    return [*METHOD_ARGS[method], *(x for k, v in sorted(lr.items()) for x in (k, _fmt(v)))]


def command_for(task, method, seed, lr: dict, steps, eval_steps, data_dir, out_dir, batch_size=16) -> list[str]:
    return [*_train_command(task, data_dir, out_dir, steps, eval_steps, batch_size, seed), *_method_words(method, lr)]


def run_dir_name(task, method, seed, lr, opts) -> str:
    tag = "".join(c for c in lr_key(lr).replace("--", "_") if c.isalnum() or c in "._-")
    return f"{task}-{method}-s{seed}-b{opts.steps}x{opts.batch_size}e{opts.eval_steps}-{tag}"


def _launch(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    print(f"[accuracy] {shlex.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "eptkit.cli", *cmd[1:], "--overwrite"], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"run failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))


def _row(task, method, seed, lr, opts, out_dir: Path, cmd: list[str]) -> dict:
    results = json.loads((out_dir / "results.json").read_text())
    metric = results["main_metric"]
    row = {
        "task": task, "method": method, "seed": seed, "steps": opts.steps, "eval_steps": opts.eval_steps,
        "batch_size": opts.batch_size,
        "trainable_params": results["trainable_params"], "train_seconds": round(results["train_time_s"], 1),
        "metric": metric, "validation": round(results["validation"][metric], 2),
        "test": round(results["test"][metric], 2), "lr": lr_key(lr),
        "command": f"OMP_NUM_THREADS={opts.threads} " + shlex.join(cmd),
    }
    print(f"[accuracy]   -> {task} {method} s{seed}: val {row['validation']} test {row['test']}", flush=True)
    return row


def run_cell(task, method, seed, lr, opts) -> dict:
    out_dir = opts.runs_dir / run_dir_name(task, method, seed, lr, opts)
    cmd = command_for(task, method, seed, lr, opts.steps, opts.eval_steps, opts.data_dir, out_dir, opts.batch_size)
    _launch(cmd, opts.threads)
    return _row(task, method, seed, lr, opts, out_dir, cmd)


def sweep_run_name(task, method, seed, lr, opts) -> str:
    return run_dir_name(task, method, seed, lr, opts).replace(".", "_")  # a sweep's run names hold no dots


def _sweep_entry(method, seed, lr) -> dict:
    """One run of a sweep file: the options a separate run's command gives after the shared ones."""
    words, entry = _method_words(method, lr), {"seed": seed}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            entry[word[2:]] = _parse(value) if isinstance(value, str) else value
    return entry


def run_together(cells, opts) -> list[dict]:
    """Cells of one task (PT, DePT, EPT and its ablations) as one `eptkit train --sweep` process: one
    frozen backbone, each step holding rows of every run (eptkit.multirun). The sweep file is kept with
    the results (results/sweeps/), so the recorded command re-runs as it ran."""
    names = [sweep_run_name(*cell, opts) for cell in cells]
    tag = hashlib.sha1("\n".join(names).encode()).hexdigest()[:10]
    task = cells[0][0]
    sweep = opts.results_dir / "sweeps" / f"{task}-{tag}.json"
    sweep.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep, {"runs": [{"name": name, **_sweep_entry(method, seed, lr)}
                                       for name, (_, method, seed, lr) in zip(names, cells)]})
    out_dir = opts.runs_dir / f"together-{task}-{tag}"
    cmd = [*_train_command(task, opts.data_dir, out_dir, opts.steps, opts.eval_steps, opts.batch_size),
           "--sweep", _rel(sweep)]
    _launch(cmd, opts.threads)
    return [_row(*cell, opts, out_dir / name, cmd) for name, cell in zip(names, cells)]


# ---------------------------------------------------------------------------- phases
def selected_lrs(select_csv: Path, budget: tuple[str, str, str] | None = None) -> dict[str, dict]:
    """Per method, the grid entry with the best mean validation score over the selection tasks, among
    rows run at `budget` (every budget when None); a candidate must have run on every task its method has."""
    rows = [r for r in read_rows(select_csv) if budget is None or budget_of(r) == budget]
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


def _jobs(cells, together: int) -> list[list[tuple]]:
    """Cells as processes: one cell each, or with --together K up to K prompt-method cells of one task in one
    process (in the cells' order; the head, LoRA and full fine-tuning change the backbone and run alone)."""
    if together <= 1:
        return [[cell] for cell in cells]
    jobs, open_jobs = [], {}
    for cell in cells:
        if base_method(cell[1]) not in ("pt", "dept", "ept"):
            jobs.append([cell])
            continue
        job = open_jobs.get(cell[0])
        if job is None or len(job) == together:
            job = open_jobs[cell[0]] = []
            jobs.append(job)
        job.append(cell)
    return jobs


def run_cells(cells, csv_path: Path, args) -> None:
    """Run (task, method, seed, lr) cells, `args.jobs` processes at a time (`_jobs`); every finished row is
    appended at once, so an interrupted suite keeps what it finished."""
    lock = threading.Lock()

    def one(job):
        rows = [run_cell(*job[0], args)] if len(job) == 1 else run_together(job, args)
        with lock:
            for row in rows:
                append_row(csv_path, row)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, job) for job in _jobs(cells, args.together)]:
            future.result()  # re-raise the first failure (the other jobs still finish and are kept)


def _variant_cells(csv_path: Path, variants, seeds, budget) -> list[tuple]:
    """Cells (task, method, seed, options) of `variants` [(method, options, tasks)] not yet in `csv_path`
    at `budget`."""
    done = {(r["task"], r["method"], r["seed"], r["lr"]) for r in read_rows(csv_path) if budget_of(r) == budget}
    return [(task, method, seed, lr) for seed in seeds for method, lr, tasks in variants for task in tasks
            if (task, method, str(seed), lr_key(lr)) not in done]


def run_phase(phase, args) -> None:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    select_csv, final_csv = args.results_dir / "lr_selection.csv", args.results_dir / "accuracy.csv"
    budget = budget_args(args)
    methods = args.methods or (MAIN_METHODS + EXTRA_METHODS if phase != "ablation" else ABLATIONS)
    if phase == "select":
        cells = _variant_cells(select_csv, [(m, lr, args.select_tasks) for m in methods for lr in LR_GRID[m]],
                               [0], budget)
        return run_cells(cells, select_csv, args)
    chosen = selected_lrs(select_csv, budget)
    if phase in ("tune", "recipe"):
        variants = []
        for method, changes, tasks in (EPT_TUNING if phase == "tune" else RECIPE_VARIANTS):
            if args.only and not any(args.only in option for option in changes):
                continue
            if method not in chosen:
                print(f"[accuracy] skip {method}: no learning rate selected yet at this budget (run --phase select)")
                continue
            tasks = [t for t in args.select_tasks if tasks is None or t in tasks]
            variants.append((method, {**chosen[method], **changes}, tasks))
        path = args.results_dir / ("ept_tuning.csv" if phase == "tune" else "recipe.csv")
        return run_cells(_variant_cells(path, variants, args.seeds, budget), path, args)
    done = {(r["task"], r["method"], r["seed"]) for r in read_rows(final_csv) if budget_of(r) == budget}
    # A selection run is the same command as the final run of its seed: reuse it instead of rerunning,
    # but only one run at this very budget (steps, eval steps, batch).
    reusable = {(r["task"], r["method"], r["seed"], r["lr"]): r for r in read_rows(select_csv)
                if budget_of(r) == budget}
    tasks = args.tasks if phase == "final" or args.tasks_given else list(ABLATION_TASKS)
    # Seed-major order: a partial run gives every task and method one seed before any gets a second.
    cells = []
    for seed in args.seeds:
        for task in tasks:
            for method in methods:
                if (task, method, str(seed)) in done:
                    continue
                lr = chosen.get(base_method(method))
                if lr is None:
                    print(f"[accuracy] skip {method}: no learning rate selected yet at this budget (run --phase select)")
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
    from eptkit.batching import subsample

    spec, data = get_task(task), load_task(task, data_dir)
    labels = data["train"]["label"]
    constant = statistics.mean(labels) if spec.is_regression else max(set(labels), key=labels.count)
    max_eval = int(COMMON[COMMON.index("--max-eval-samples") + 1])
    scores = []
    for seed in seeds:
        test = subsample(data["test"], max_eval, seed)
        scores.append(compute_metrics(spec, [constant] * len(test), test["label"])[spec.main_metric])
    return scores


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f} ({len(values)})"


def report(args) -> None:
    results_dir, budget = args.results_dir, budget_args(args)
    rows = [r for r in read_rows(results_dir / "accuracy.csv") if budget_of(r) == budget]
    if not rows:
        sys.exit(f"no results at budget steps/eval_steps/batch = {'/'.join(budget)} yet: "
                 "run `python benchmarks/accuracy.py run` first")
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    methods = [m for m in MAIN_METHODS + EXTRA_METHODS + ABLATIONS if any(r["method"] == m for r in rows)]
    paired = _paired_seeds(rows)
    cell = {}
    for r in rows:
        if r["seed"] in paired[r["task"]]:
            cell.setdefault((r["method"], r["task"]), []).append(r)
    if args.data_dir.is_dir():  # a reference row: what predicting one constant scores
        methods = ["majority", *methods]
        for t in tasks:
            seeds = sorted(int(seed) for seed in paired[t])
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
            # A run trained with others in one process (--together) records the whole process's time.
            times += [float(r["train_seconds"]) for r in rs if "--sweep" not in r.get("command", "")]
            params = params or (rs[0]["trainable_params"] if rs else None)
            scores.append(_mean_sd(vals))
            if vals:
                means.append(statistics.mean(vals))
        complete = len(means) == len(tasks)
        avg = statistics.mean(means) if complete else None
        mean_time = statistics.mean(times) if times else None
        summary[m] = {"average": avg, "params": int(params) if params else None, "seconds": mean_time}
        cells = [f"{int(params):,}" if params else "–", *scores, f"{avg:.1f}" if complete else "–",
                 f"{mean_time:.0f}" if mean_time else "–"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    chosen = selected_lrs(results_dir / "lr_selection.csv", budget)
    text = (f"Budget: {budget[0]} steps of batch {budget[2]}, validation every {budget[1]} steps.\n\n"
            f"Test scores (task's main metric, 0-100): mean ± std over the seeds that every main method has run "
            f"on the task (number of seeds). `majority`: a "
            f"constant prediction (the most frequent training label; STS-B: the training mean), scored on the "
            f"same test subsets. `train s/run`: the mean over the runs trained in a process of their own.\n\n"
            + "\n".join(lines) + "\n\n"
            "Selected learning rates: " + "; ".join(f"{m}: `{lr_key(v)}`" for m, v in chosen.items()) + "\n\n"
            + _selection_table(results_dir, budget)
            + _variant_table(results_dir / "recipe.csv", "Recipe study", results_dir, budget, chosen)
            + _variant_table(results_dir / "ept_tuning.csv", "EPT modules", results_dir, budget, chosen)
            + _ablation_table(rows) + _targets_table(cell, tasks, summary))
    (results_dir / "accuracy.md").write_text(text)
    print(text)
    _plots(summary, results_dir)
    _sweep_plot(results_dir, budget)
    _learning_curves(rows, results_dir)


def _paired_seeds(rows: list[dict]) -> dict[str, set[str]]:
    """Per task, the seeds that every main method run on the task has: the table compares methods on
    the same seeds, so a seed still running for some methods changes no mean."""
    out = {}
    for t in {r["task"] for r in rows}:
        have = {}
        for r in rows:
            if r["task"] == t and r["method"] in MAIN_METHODS:
                have.setdefault(r["method"], set()).add(r["seed"])
        out[t] = set.intersection(*have.values()) if have else set()
    return out


def _targets_table(cell: dict, tasks: list[str], summary: dict) -> str:
    """Issue 9's targets, per task, on mean test scores: a prompt method never more than 1 point below
    the linear probe, and more than 1 above it wherever LoRA leads the probe by 3 or more."""
    prompt_methods = [m for m in ("pt", "dept", "ept") if any((m, t) in cell for t in tasks)]
    if ("head", tasks[0]) not in cell or not prompt_methods:
        return ""
    mean = {k: statistics.mean(float(r["test"]) for r in v) for k, v in cell.items() if v}
    lines = ["| task | LoRA - probe | " + " | ".join(f"{m} - probe" for m in prompt_methods) + " | target | met |",
             "|---|---:|" + "---:|" * len(prompt_methods) + "---|---|"]
    for t in tasks:
        if ("head", t) not in mean or any((m, t) not in mean for m in prompt_methods):
            continue
        lora = mean.get(("lora", t), mean[("head", t)]) - mean[("head", t)]
        gaps = [mean[(m, t)] - mean[("head", t)] for m in prompt_methods]
        need = 1.0 if lora >= 3 else -1.0
        target = "each > +1 (LoRA leads by 3+)" if lora >= 3 else "each >= -1"
        missed = [m for m, g in zip(prompt_methods, gaps) if not (g > need if need > 0 else g >= need)]
        # Two decimals: a gap of -1.04 must not read as a met -1.0.
        lines.append(f"| {t} | {lora:+.2f} | " + " | ".join(f"{g:+.2f}" for g in gaps)
                     + f" | {target} | {'**no** (' + ', '.join(missed) + ')' if missed else 'yes'} |")
    averages = ", ".join(f"{m} {summary[m]['average']:.2f}" for m in ("head", *prompt_methods, "lora")
                         if summary.get(m, {}).get("average") is not None)
    return ("\nIssue 9's targets (mean test scores; a prompt method's gap to the linear probe, `head`):\n\n"
            + "\n".join(lines) + f"\n\nAverages over the tasks above: {averages}.\n")


def _selection_rows(results_dir: Path, budget) -> list[dict]:
    return [r for r in read_rows(results_dir / "lr_selection.csv") if budget_of(r) == budget]


def _selection_table(results_dir: Path, budget) -> str:
    """Validation score of every candidate of the current grids, per selection task and on average."""
    rows = _selection_rows(results_dir, budget)
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lines = ["| method | options | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---:|" * (len(tasks) + 1)]
    for method, grid in LR_GRID.items():
        for lr in grid:
            vals = {r["task"]: float(r["validation"]) for r in rows if r["method"] == method and r["lr"] == lr_key(lr)}
            if not vals:
                continue
            mean = f"{statistics.mean(vals.values()):.1f}" if len(vals) == len(tasks) else "–"
            lines.append(f"| {method} | `{lr_key(lr)}` | " + " | ".join(
                f"{vals[t]:.1f}" if t in vals else "–" for t in tasks) + f" | {mean} |")
    return ("Learning-rate selection (seed 0, validation split, the current grids):\n\n" + "\n".join(lines) + "\n")


def _base_validation(results_dir: Path, budget, chosen) -> dict[tuple[str, str, str], float]:
    """(task, method, seed) -> validation score of the selected recipe (selection or final rows)."""
    out = {}
    for path in (results_dir / "lr_selection.csv", results_dir / "accuracy.csv"):
        for r in read_rows(path):
            if budget_of(r) == budget and r["method"] in chosen and r["lr"] == lr_key(chosen[r["method"]]):
                out[(r["task"], r["method"], r["seed"])] = float(r["validation"])
    return out


def _variant_table(path: Path, title: str, results_dir: Path, budget, chosen) -> str:
    """Each variant's validation score minus the selected recipe's, paired by task and seed."""
    rows = [r for r in read_rows(path) if budget_of(r) == budget]
    if not rows:
        return ""
    base = _base_validation(results_dir, budget, chosen)
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    variants = {}
    for r in rows:
        if r["method"] not in chosen:
            continue
        changed = {k: v for k, v in parse_lr_key(r["lr"]).items() if chosen[r["method"]].get(k) != v}
        key = (r["method"], lr_key(changed))
        ref = base.get((r["task"], r["method"], r["seed"]))
        if ref is not None:
            variants.setdefault(key, {}).setdefault(r["task"], []).append(float(r["validation"]) - ref)
    lines = ["| method | change | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---:|" * (len(tasks) + 1)]
    for (method, change), per_task in variants.items():
        diffs = [d for t in tasks for d in per_task.get(t, [])]
        lines.append(f"| {method} | `{change}` | " + " | ".join(_signed(per_task.get(t, [])) for t in tasks)
                     + f" | {_signed(diffs)} |")
    return (f"\n{title} (validation only): the change's score minus the selected recipe's, same task and seed; "
            "mean ± std of the paired differences (pairs):\n\n" + "\n".join(lines) + "\n")


def _signed(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.1f} ± {sd:.1f} ({len(values)})"


def _ablation_table(rows: list[dict]) -> str:
    """Each ablation's test score minus full EPT's, paired by task and seed."""
    ept = {(r["task"], r["seed"]): float(r["test"]) for r in rows if r["method"] == "ept"}
    ablated = [r for r in rows if r["method"] in ABLATIONS and (r["task"], r["seed"]) in ept]
    if not ablated:
        return ""
    tasks = [t for t in TASKS if any(r["task"] == t for r in ablated)]
    lines = ["| variant | " + " | ".join(tasks) + " | all |", "|---|" + "---:|" * (len(tasks) + 1)]
    for m in ABLATIONS:
        diffs = {t: [float(r["test"]) - ept[(t, r["seed"])] for r in ablated if r["method"] == m and r["task"] == t]
                 for t in tasks}
        if any(diffs.values()):
            lines.append(f"| {m} | " + " | ".join(_signed(diffs[t]) for t in tasks)
                         + f" | {_signed([d for v in diffs.values() for d in v])} |")
    return ("\nAblations (test): the variant's score minus full EPT's, same task and seed; mean ± std of the "
            "paired differences (pairs):\n\n" + "\n".join(lines) + "\n")


def _sweep_plot(results_dir: Path, budget) -> None:
    """Validation score against the prompt's learning rate for PT, DePT and EPT (mean over the selection tasks)."""
    rows = _selection_rows(results_dir, budget)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for colour, method in zip(("C0", "C1", "C2"), ("pt", "dept", "ept")):
        # One line per start: sampled vocabulary in PEFT's layout (dashed), the instruction (solid).
        for instruction, style in ((False, "--"), (True, "-")):
            points = []
            for lr in LR_GRID[method]:
                if (lr.get("--text-positions") == "own") != instruction:
                    continue
                vals = [float(r["validation"]) for r in rows if r["method"] == method and r["lr"] == lr_key(lr)]
                if len(vals) == len(SELECT_TASKS):
                    points.append((lr["--lr"], statistics.mean(vals)))
            if points:
                label = f"{method}, {'instruction, own positions' if instruction else 'sampled vocabulary'}"
                ax.plot(*zip(*sorted(points)), style, color=colour, marker="o", label=label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return
    ax.set_xscale("log")
    ax.set_xlabel("prompt learning rate (x word-embedding RMS)")
    ax.set_ylabel(f"mean validation score ({', '.join(SELECT_TASKS)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / "lr_sweep.png", dpi=120)
    plt.close(fig)


def _learning_curves(rows: list[dict], results_dir: Path) -> None:
    """Validation score against step, seed 0, from the runs' log.jsonl (where the run folders are here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in SELECT_TASKS if any(r["task"] == t for r in rows)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    drawn = False
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            if r["task"] != task or r["seed"] != "0" or r["method"] not in MAIN_METHODS:
                continue
            cmd = shlex.split(r["command"])
            if "--output-dir" not in cmd:
                continue
            log = ROOT / cmd[cmd.index("--output-dir") + 1] / "log.jsonl"
            if not log.is_file():
                continue
            points = [(rec["step"], rec["eval"]["validation"][r["metric"]])
                      for rec in map(json.loads, log.read_text().splitlines()) if "eval" in rec]
            if points:
                ax.plot(*zip(*points), marker=".", label=r["method"])
                drawn = True
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if drawn:
        axes[0][0].set_ylabel("validation score")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results_dir / "learning_curves.png", dpi=120)
    plt.close(fig)


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
        # A method with no time has only runs trained together (their time is the whole process's).
        drawn = {m: s for m, s in points.items() if s[key]}
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, s in drawn.items():
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


def rerun(args) -> None:
    """Re-run one recorded row from its own command and compare its scores with the recorded ones."""
    rows = [r for r in read_rows(args.results_dir / args.csv)
            if (r["task"], r["method"], r["seed"]) == (args.task, args.method, str(args.seed))
            and (args.options is None or r["lr"] == args.options)]
    if not rows:
        sys.exit(f"no row for task={args.task} method={args.method} seed={args.seed} in {args.csv}")
    row = rows[-1]
    words = shlex.split(row["command"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    while words and "=" in words[0]:  # leading VAR=value assignments, as a shell would read them
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    out_dir = args.runs_dir / "rerun" / f"{args.task}-{args.method}-s{args.seed}"
    words[words.index("--output-dir") + 1] = _rel(out_dir)
    if "--sweep" in words:  # trained beside other runs in one process (--together): they all run again
        budget = argparse.Namespace(steps=row["steps"], batch_size=row["batch_size"], eval_steps=row["eval_steps"])
        out_dir = out_dir / sweep_run_name(row["task"], row["method"], row["seed"], parse_lr_key(row["lr"]), budget)
    print(f"[accuracy] re-running: {row['command']}", flush=True)
    subprocess.run([sys.executable, "-m", "eptkit.cli", *words[1:], "--overwrite"], env=env, check=True, cwd=ROOT,
                   capture_output=True)
    results = json.loads((out_dir / "results.json").read_text())
    worst = 0.0
    for split in ("validation", "test"):
        new = results[split][row["metric"]]
        worst = max(worst, abs(new - float(row[split])))
        print(f"[accuracy] {split}: recorded {float(row[split]):.2f}, re-run {new:.2f}, difference {new - float(row[split]):+.2f}")
    if worst > args.tolerance:
        sys.exit(f"re-run differs by {worst:.2f} > {args.tolerance} points")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the CSVs, table and plots live")
    sub = parser.add_subparsers(dest="command", required=True)
    default_data_dir = Path(os.environ.get("EPTKIT_DATA_DIR", ROOT.parent / "shared" / "data"))
    run = sub.add_parser("run", help="run (or resume) the suite")
    run.add_argument("--phase", choices=("select", "final", "ablation", "tune", "recipe", "all"), default="all",
                     help="tune: EPT's module learning rate on the selection tasks' validation split (--seeds)")
    run.add_argument("--tasks", type=lambda s: s.split(","), default=None,
                     help=f"default: all seven for final, {','.join(ABLATION_TASKS)} for ablation")
    run.add_argument("--select-tasks", type=lambda s: s.split(","), default=list(SELECT_TASKS))
    run.add_argument("--methods", type=lambda s: s.split(","), default=None)
    run.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(SEEDS))
    run.add_argument("--data-dir", type=Path, default=default_data_dir)
    run.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "accuracy")
    run.add_argument("--threads", type=int, default=2, help="torch threads per run")
    run.add_argument("--only", default=None,
                     help="recipe/tune phases: only the variants that change an option whose name contains this")
    run.add_argument("--jobs", type=int, default=1,
                     help="processes at a time (e.g. --jobs 2 --threads 1 on 2 cores, or 8 on one GPU)")
    run.add_argument("--together", type=int, default=1,
                     help="train up to this many PT/DePT/EPT runs of one task in one process over one frozen backbone "
                          "(eptkit.multirun; for GPUs, where one small run cannot fill the device)")
    again = sub.add_parser("rerun", help="re-run one recorded row from its command and compare the scores")
    again.add_argument("--task", required=True)
    again.add_argument("--method", required=True)
    again.add_argument("--seed", type=int, default=0)
    again.add_argument("--options", default=None, help="the row's `lr` column, where several rows match")
    again.add_argument("--csv", default="accuracy.csv", help="which results file holds the row")
    again.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "accuracy")
    again.add_argument("--tolerance", type=float, default=0.5, help="largest accepted difference, in points")
    rep = sub.add_parser("report", help="write accuracy.md and the plots from the CSVs")
    rep.add_argument("--data-dir", type=Path, default=default_data_dir,
                     help="task data, for the majority-class reference row (left out if absent)")
    for p in (run, rep):
        p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (equal for every method)")
        p.add_argument("--eval-steps", type=int, default=50, help="validate (and keep the best adapter) this often")
        p.add_argument("--batch-size", type=int, default=16, help="training examples per step (equal for every method)")
    args = parser.parse_args(argv)
    if args.command == "rerun":
        return rerun(args)
    if args.command == "report":
        return report(args)
    args.tasks_given = args.tasks is not None
    args.tasks = args.tasks or list(TASKS)
    phases = ("select", "final", "ablation") if args.phase == "all" else (args.phase,)
    for phase in phases:
        run_phase(phase, args)
    if any(budget_of(r) == budget_args(args) for r in read_rows(args.results_dir / "accuracy.csv")):
        report(args)


if __name__ == "__main__":
    main()

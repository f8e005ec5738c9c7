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
The suite is three files: accuracy_grid.py (what runs: methods, options, rate grids, CSV rows),
this runner, and accuracy_report.py (tables and plots).
Every run is one `eptkit train ...` command (recorded in the CSV's `command` column) in a fresh
process; with --together K, up to K PT/DePT/EPT runs of one task share one `eptkit train --sweep`
process (eptkit.multirun: one frozen backbone; the sweep file is kept in results/sweeps/). Finished
cells are skipped, so the suite resumes across sessions; a row counts as finished (or reusable, or a
selection candidate) only at the budget (steps, eval steps, batch) it was run with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eptkit.files import atomic_write_json


from accuracy_grid import (ABLATION_TASKS, ABLATIONS, COMMON, EPT_TUNING, EXTRA_METHODS, LR_GRID, MAIN_METHODS,
                           METHOD_ARGS, RECIPE_VARIANTS, RESULTS, ROOT, SEEDS, SELECT_TASKS, TASKS, append_row,
                           base_method, budget_args, budget_of, fmt_value, lr_key, parse_lr_key, parse_value,
                           read_rows, selected_lrs)
from accuracy_report import majority_scores, report  # noqa: F401 (majority_scores: the tests read it here)


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
    return [*METHOD_ARGS[method], *(x for k, v in sorted(lr.items()) for x in (k, fmt_value(v)))]


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
            entry[word[2:]] = parse_value(value) if isinstance(value, str) else value
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

"""Plateau study (issue 20): one budget per task at which every method has stopped climbing, and paired
seeds at that budget to tell EPT from DePT and PT.

    python benchmarks/plateau.py run --phase pilot      # seed 0, long budget: PT, DePT, EPT, LoRA on STS-B, SST-2
    python benchmarks/plateau.py run --phase paired --steps B   # EPT, DePT at seeds 0-4; PT, LoRA at 0-2
    python benchmarks/plateau.py run --phase ablation --steps B # no fusion / no projection (3 seeds), 1/2/8 subspaces
    python benchmarks/plateau.py run --phase schedule --tasks sst2 --steps B  # linear decay to B against constant
    python benchmarks/plateau.py run --phase readings --steps B  # EPT's alternative readings (3 seeds)
    python benchmarks/plateau.py run --phase all --tasks rte,mrpc,cb,cola,stsb,wic,sst2 --steps 2000  # GPU
    python benchmarks/plateau.py collect                # CSVs from the run folders (also partly trained ones)
    python benchmarks/plateau.py report                 # plateau.md, plateau_curves.png, plateau_vs_time.png

Why one long run gives every budget: each run trains at a constant rate after a fixed warm-up
(`--lr-schedule constant --warmup-steps 10`), so its first B steps are exactly a B-step run. It is
validated on the whole validation split every `--eval-steps`, and the test split is scored each time
validation improves (`--test-at-best`). Its result at budget B is the test score of its best validation
step up to B: selection on validation only. A run cut short (the session ended) still gives every
budget up to its last evaluation, so `collect` reads unfinished runs too; the command recorded for such
a row re-runs exactly the steps it reached.

The learning rates and starts are those the 150-step suite selected on validation (benchmarks/accuracy.py,
results/lr_selection.csv); the budgets (PT l=100; DePT and EPT m=60, r=30, max_length 128; LoRA r=8) are
the suite's.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from accuracy_grid import METHOD_ARGS, base_method, selected_lrs
from plateau_report import TASKS, read_csv, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SELECTION_BUDGET = ("150", "50", "16")  # the suite budget whose selected rates the study uses
WARMUP_STEPS = 10  # the selected recipe's warm-up (0.06 x 150 steps), fixed so every prefix is a run
PHASES = {
    # phase: [(methods, seeds)]
    "pilot": [(("ept", "dept", "pt", "lora"), (0,))],
    "paired": [(("ept", "dept"), (0, 1, 2, 3, 4)), (("pt", "lora"), (0, 1, 2))],
    "ablation": [(("ept_no_fusion", "ept_no_projection"), (0, 1, 2)), (("ept_n1", "ept_n2", "ept_n8"), (0,))],
    "schedule": [(("ept_linear", "dept_linear"), (0,))],
    "readings": [(("ept_qk", "ept_random", "ept_slow"), (0, 1, 2))],
}
GPU_PHASES = ("pilot", "paired", "ablation")  # `--phase all`; the schedule check and the readings run on their own
# The study's own variants: (base method, options changed from the base method's command); rates are the base's.
VARIANTS = {
    # The schedule check: linear decay to zero over exactly --steps (its prefixes are no shorter runs, so
    # only its last budget counts), against the constant rate whose prefixes give every budget.
    "ept_linear": ("ept", {"--lr-schedule": "linear"}),
    "dept_linear": ("dept", {"--lr-schedule": "linear"}),
    # Three alternative readings of what the EPT paper leaves open (docs/method.md, "EPT"), tried because
    # EPT did not beat DePT: learned query/key maps in the fusion's attention scores; every subspace active
    # from the first step; the modules at an eighth of their default rate (0.001 against 0.008, absolute:
    # the projection adds 36-217 % of the prompt's norm at the default, RESULTS.md "EPT's modules").
    "ept_qk": ("ept", {"--fusion-rank": "8"}),
    "ept_random": ("ept", {"--module-init": "random"}),
    "ept_slow": ("ept", {"--lr-ept": "0.001"}),
}
RUN_COLUMNS = ("task", "method", "seed", "steps", "batch_size", "eval_steps", "validation", "test", "best_step",
               "train_seconds", "wall_seconds", "finished", "command")
CURVE_COLUMNS = ("task", "method", "seed", "step", "validation", "test", "train_seconds")


# ---------------------------------------------------------------------------- commands
def run_name(task, method, seed, opts) -> str:
    return f"{task}-{method}-s{seed}-b{opts.batch_size}e{opts.eval_steps}"


def base_of(method: str) -> str:
    """The method whose selected rates a run uses (EPT's ablations and every variant take their base's)."""
    return VARIANTS[method][0] if method in VARIANTS else base_method(method)


def command_for(task, method, seed, steps, opts, rates: dict) -> list[str]:
    out_dir = os.path.relpath(opts.runs_dir / run_name(task, method, seed, opts), ROOT)
    data_dir = os.path.relpath(opts.data_dir, ROOT)
    rate_words = [x for k, v in sorted(rates.items()) for x in (k, f"{v:g}" if isinstance(v, float) else str(v))]
    base, changes = VARIANTS.get(method, (method, {}))
    words = ["eptkit", "train", "--task", task, "--data-dir", data_dir, "--output-dir", out_dir, "--seed", str(seed),
             "--max-steps", str(steps), "--eval-steps", str(opts.eval_steps), "--batch-size", str(opts.batch_size),
             "--max-length", "128", "--save-steps", "0", "--early-stopping-patience", "0",
             "--lr-schedule", "constant", "--warmup-steps", str(WARMUP_STEPS), "--test-at-best",
             *METHOD_ARGS[base], *rate_words]
    for flag, value in changes.items():
        if flag in words:
            words[words.index(flag) + 1] = value  # one value per option in the recorded command
        else:
            words += [flag, value]
    return words


def _with_steps(command: str, steps: int) -> str:
    words = shlex.split(command)
    words[words.index("--max-steps") + 1] = str(steps)
    return shlex.join(words)


def launch(cmd: list[str], threads: int, resume: bool = False) -> float:
    """Run one `eptkit train` in a fresh process of this checkout's code (continuing its checkpoint with
    `resume`, else from scratch); return its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"[plateau] {time.strftime('%H:%M:%S')} {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "eptkit.cli", *cmd[1:], "--resume" if resume else "--overwrite"],
                          env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"run failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return wall


# ---------------------------------------------------------------------------- run folders -> CSV rows
def write_csv(path: Path, columns, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)  # never a half-written table


def read_run(run_dir: Path) -> tuple[dict, list[dict]] | None:
    """(run row, curve rows) of one run folder, finished or not; None before its first evaluation."""
    info_path, log_path = run_dir / "eptkit_run.json", run_dir / "log.jsonl"
    if not info_path.is_file() or not log_path.is_file():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    meta = json.loads((run_dir / "plateau_run.json").read_text())
    metric = meta["metric"]
    curve, seconds, best = [], 0.0, None
    for record in records:
        seconds += record["step_time_s"]
        if "eval" not in record:
            continue
        point = {"task": meta["task"], "method": meta["method"], "seed": meta["seed"], "step": record["step"],
                 "validation": round(record["eval"]["validation"][metric], 4), "test": "",
                 "train_seconds": round(seconds, 1)}
        if "test" in record["eval"]:
            point["test"] = round(record["eval"]["test"][metric], 4)
        if record["eval"]["improved"]:
            best = point
        curve.append(point)
    if not curve:
        return None
    finished = (run_dir / "results.json").is_file()
    steps = curve[-1]["step"]
    row = {"task": meta["task"], "method": meta["method"], "seed": meta["seed"], "steps": steps,
           "batch_size": meta["batch_size"], "eval_steps": meta["eval_steps"], "validation": best["validation"],
           "test": best["test"], "best_step": best["step"], "train_seconds": curve[-1]["train_seconds"],
           "wall_seconds": meta.get("wall_seconds", ""), "finished": int(finished),
           "command": _with_steps(meta["command"], steps)}
    return row, curve


def collect(opts) -> None:
    """plateau.csv and plateau_curves.csv from the run folders here, keeping rows of runs whose folders
    are gone (an earlier session's); a run's row is replaced only by one that reached more steps."""
    runs_path, curves_path = opts.results_dir / "plateau.csv", opts.results_dir / "plateau_curves.csv"
    key = lambda r: (r["task"], r["method"], str(r["seed"]))  # noqa: E731
    runs = {key(r): r for r in read_csv(runs_path)}
    curves: dict[tuple, list[dict]] = {}
    for point in read_csv(curves_path):
        curves.setdefault(key(point), []).append(point)
    if opts.runs_dir.is_dir():
        for run_dir in sorted(opts.runs_dir.iterdir()):
            found = read_run(run_dir) if (run_dir / "plateau_run.json").is_file() else None
            if found is None:
                continue
            row, curve = found
            old = runs.get(key(row))
            if old is None or int(old["steps"]) <= int(row["steps"]):
                runs[key(row)], curves[key(row)] = row, curve
    write_csv(runs_path, RUN_COLUMNS, sorted(runs.values(), key=lambda r: (r["task"], r["method"], int(r["seed"]))))
    write_csv(curves_path, CURVE_COLUMNS, [p for k in sorted(curves) for p in curves[k]])


# ---------------------------------------------------------------------------- running
def cells_for(phase: str, opts) -> list[tuple]:
    done = {(r["task"], r["method"], r["seed"]) for r in read_csv(opts.results_dir / "plateau.csv")
            if int(r["steps"]) >= opts.steps and r["eval_steps"] == str(opts.eval_steps)
            and r["batch_size"] == str(opts.batch_size)}
    cells = []
    for methods, seeds in (PHASES[phase] if phase != "all" else [x for p in GPU_PHASES for x in PHASES[p]]):
        for seed in opts.seeds or seeds:
            for task in opts.tasks:
                for method in opts.methods or methods:
                    if (task, method, str(seed)) not in done and (task, method, seed) not in cells:
                        cells.append((task, method, seed))
    return cells


def run_cell(task, method, seed, opts, rates) -> None:
    from eptkit.tasks.registry import get_task

    cmd = command_for(task, method, seed, opts.steps, opts, rates[base_of(method)])
    run_dir = ROOT / cmd[cmd.index("--output-dir") + 1]
    meta = {"task": task, "method": method, "seed": seed, "batch_size": opts.batch_size,
            "eval_steps": opts.eval_steps, "metric": get_task(task).main_metric,
            "command": f"OMP_NUM_THREADS={opts.threads} " + shlex.join(cmd)}

    def write_meta(**extra):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plateau_run.json").write_text(json.dumps({**meta, **extra}))

    # --extend: a run stopped at fewer steps continues from its last checkpoint (written at its end); under
    # the constant schedule that equals a run trained to the new budget at once.
    earlier = run_dir / "plateau_run.json"
    resume = opts.extend and earlier.is_file() and (run_dir / "checkpoints").is_dir()
    spent = json.loads(earlier.read_text()).get("wall_seconds", 0) if resume else 0
    write_meta(wall_seconds=spent)  # what an earlier part took stays recorded if this part is cut short
    wall = launch(cmd, opts.threads, resume=resume)
    write_meta(wall_seconds=round(spent + wall, 1))


def run(opts) -> None:
    rates = selected_lrs(ROOT / "benchmarks" / "results" / "lr_selection.csv", SELECTION_BUDGET)
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    cells = cells_for(opts.phase, opts)
    print(f"[plateau] {len(cells)} runs of {opts.steps} steps, {opts.jobs} at a time: "
          + ", ".join("-".join(map(str, c)) for c in cells), flush=True)

    lock = threading.Lock()

    def one(cell):
        run_cell(*cell, opts, rates)
        with lock:  # one thread at a time rewrites the CSVs
            collect(opts)

    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for future in [pool.submit(one, cell) for cell in cells]:
            future.result()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "collect", "report"))
    parser.add_argument("--phase", choices=(*PHASES, "all"), default="pilot",
                        help="'all': the pilot's, paired and ablation runs at --steps (the GPU study: every budget is read off "
                             "them). 'schedule' trains linear decay to exactly --steps; 'readings' EPT's alternatives.")
    parser.add_argument("--steps", type=int, default=800, help="Steps per run (the longest budget read off it).")
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time.")
    parser.add_argument("--extend", action="store_true",
                        help="Continue runs that stopped short of --steps from their last checkpoint (in --runs-dir).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run.")
    parser.add_argument("--budget", default="", help="Report at these budgets instead of the criterion's "
                                                     "(task=steps,...); methods that did not reach one are left out.")
    parser.add_argument("--name", default="plateau", help="Report file names: NAME.md, NAME_curves.png, NAME_vs_time.png.")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EPTKIT_DATA_DIR", ROOT.parent / "shared" / "data")))
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "plateau")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser


def main(argv=None) -> None:
    opts = build_parser().parse_args(argv)
    if opts.action == "run":
        run(opts)
    elif opts.action == "collect":
        collect(opts)
    else:
        collect(opts)
        report(opts)


if __name__ == "__main__":
    main()

"""The accuracy suite's report (`python benchmarks/accuracy.py report`): the tables of accuracy.md and the
plots, from the CSVs benchmarks/accuracy.py writes."""

from __future__ import annotations

import json
import shlex
import statistics
import sys
from pathlib import Path

from accuracy_grid import (ABLATIONS, COMMON, EXTRA_METHODS, LR_GRID, MAIN_METHODS, ROOT, SELECT_TASKS, TASKS,
                           budget_args, budget_of, lr_key, parse_lr_key, read_rows, selected_lrs)


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

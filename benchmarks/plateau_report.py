"""The plateau study's analysis (benchmarks/plateau.py runs it): each run as a run of any shorter budget, the
budget per task by the written criterion, paired differences with t-intervals, plateau.md and the plots."""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

TASKS = ("stsb", "sst2")  # the two tasks where LoRA beats the linear probe by 3+ points at 150 steps
# The plateau criterion: at budget B a curve has flattened when the mean of its last three evaluations
# up to B is less than PLATEAU_GAIN points above the same mean at 0.75 B (the last quarter adds < 0.5).
PLATEAU_GAIN = 0.5
PAIRS = (("ept", "dept"), ("ept", "pt"), ("ept", "ept_no_fusion"), ("ept", "ept_no_projection"),
         ("ept", "ept_n1"), ("ept", "ept_n2"), ("ept", "ept_n8"),
         ("ept", "ept_linear"), ("dept", "dept_linear"),  # constant rate minus linear decay, same budget
         ("ept_qk", "ept"), ("ept_random", "ept"), ("ept_slow", "ept"),  # each alternative reading minus ours
         ("ept_qk", "dept"), ("ept_random", "dept"), ("ept_slow", "dept"))


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))




def curves_by_run(points: list[dict]) -> dict[tuple, list[dict]]:
    """(task, method, seed) -> the run's evaluations in step order, numbers parsed."""
    runs: dict[tuple, list[dict]] = {}
    for p in points:
        runs.setdefault((p["task"], p["method"], int(p["seed"])), []).append(
            {"step": int(p["step"]), "validation": float(p["validation"]),
             "test": float(p["test"]) if p["test"] != "" else None, "train_seconds": float(p["train_seconds"])})
    for curve in runs.values():
        curve.sort(key=lambda q: q["step"])
    return runs


def at_budget(curve: list[dict], budget: int) -> dict | None:
    """The run as a `budget`-step run: its best validation evaluation up to `budget` (the first of equals,
    as the trainer keeps it) with that step's test score, and the training seconds to `budget`."""
    upto = [p for p in curve if p["step"] <= budget]
    if not upto or upto[-1]["step"] < budget:
        return None  # the run did not reach this budget
    best = upto[0]
    for p in upto[1:]:
        if p["validation"] > best["validation"]:
            best = p
    return {"validation": best["validation"], "test": best["test"], "best_step": best["step"],
            "train_seconds": upto[-1]["train_seconds"]}


def _method_order(method: str) -> tuple[int, str]:
    order = ("pt", "dept", "ept", "lora", "ept_no_fusion", "ept_no_projection", "ept_n1", "ept_n2", "ept_n8",
             "ept_linear", "dept_linear", "ept_qk", "ept_random", "ept_slow")
    return (order.index(method) if method in order else len(order), method)


def mean_curve(curves: list[list[dict]]) -> list[tuple[int, float]]:
    """Mean validation per step over the runs that reached it."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for p in curve:
            by_step.setdefault(p["step"], []).append(p["validation"])
    return sorted((step, statistics.mean(v)) for step, v in by_step.items())


def last_quarter_gain(curve: list[tuple[int, float]], budget: int) -> float | None:
    """Mean of the last three evaluations up to `budget` minus the same mean up to 0.75 x budget."""
    def last3(limit):
        values = [v for step, v in curve if step <= limit]
        return statistics.mean(values[-3:]) if len(values) >= 3 else None

    now, before = last3(budget), last3(0.75 * budget)
    return None if now is None or before is None else now - before


def plateau_budget(curves: dict[str, list[tuple[int, float]]]) -> tuple[int | None, dict[str, float | None]]:
    """The smallest evaluated budget at which every method's mean curve meets the criterion; else the
    largest budget every method reached. Returns (budget, each method's gain there)."""
    reached = min((c[-1][0] for c in curves.values() if c), default=None)
    if reached is None:
        return None, {}
    steps = sorted({s for c in curves.values() for s, _ in c if s <= reached})
    for budget in steps:
        gains = {m: last_quarter_gain(c, budget) for m, c in curves.items()}
        if all(g is not None and g < PLATEAU_GAIN for g in gains.values()):
            return budget, gains
    return reached, {m: last_quarter_gain(c, reached) for m, c in curves.items()}


def paired_interval(diffs: list[float]) -> tuple[float, float | None]:
    """Mean and 95% t-interval half-width of paired differences (None with fewer than two)."""
    from scipy import stats

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, None
    return mean, float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def _fmt_interval(mean: float, half: float | None, n: int) -> str:
    return f"{mean:+.2f} (n={n})" if half is None else f"{mean:+.2f} ± {half:.2f} (n={n})"


def analyse(points: list[dict], budgets: dict[str, int] | None = None) -> dict:
    """Per task: the budget (criterion or given), each method's runs at it, and the paired differences."""
    runs = curves_by_run(points)
    tasks = [t for t in TASKS if any(k[0] == t for k in runs)] + sorted({k[0] for k in runs} - set(TASKS))
    out = {"tasks": {}}
    for task in tasks:
        methods = sorted({k[1] for k in runs if k[0] == task}, key=_method_order)
        curves = {m: mean_curve([c for k, c in runs.items() if k[:2] == (task, m)]) for m in methods}
        main = {m: c for m, c in curves.items() if m in ("pt", "dept", "ept", "lora")} or curves
        budget, gains = plateau_budget(main)
        if budgets and task in budgets:
            budget, gains = budgets[task], {m: last_quarter_gain(c, budgets[task]) for m, c in main.items()}
        results = {m: {k[2]: at_budget(c, budget) for k, c in runs.items() if k[:2] == (task, m)} for m in methods}
        results = {m: {s: r for s, r in rs.items() if r is not None} for m, rs in results.items()}
        out["tasks"][task] = {"budget": budget, "gains": gains, "results": results, "curves": curves,
                              "runs": {m: [c for k, c in runs.items() if k[:2] == (task, m)] for m in methods}}
    out["pairs"] = paired(out["tasks"], "test")
    out["validation_pairs"] = paired(out["tasks"], "validation")  # what chooses between readings
    return out


def paired(tasks: dict, score: str) -> dict:
    """Each pair's paired differences of `score` per task, and overall: the mean over the tasks per seed,
    for the seeds that every task with this pair has."""
    pairs = {}
    for a, b in PAIRS:
        per_task, per_seed = {}, {}
        for task, t in tasks.items():
            ra, rb = t["results"].get(a, {}), t["results"].get(b, {})
            seeds = sorted(set(ra) & set(rb))
            if seeds:
                diffs = [ra[s][score] - rb[s][score] for s in seeds]
                per_task[task] = (*paired_interval(diffs), len(diffs))
                for s, d in zip(seeds, diffs):
                    per_seed.setdefault(s, {})[task] = d
        if per_task:
            full = [statistics.mean(d.values()) for d in per_seed.values() if set(d) == set(per_task)]
            pairs[(a, b)] = {"tasks": per_task, "overall": (*paired_interval(full), len(full)) if full else None}
    return pairs


# ---------------------------------------------------------------------------- report
def report(opts) -> str:
    points = read_csv(opts.results_dir / "plateau_curves.csv")
    if not points:
        sys.exit("no plateau runs yet: run `python benchmarks/plateau.py run --phase pilot` first")
    budgets = dict(item.split("=") for item in opts.budget.split(",")) if opts.budget else None
    analysis = analyse(points, {k: int(v) for k, v in budgets.items()} if budgets else None)
    rows = read_csv(opts.results_dir / "plateau.csv")
    lines = [f"Runs: `results/plateau.csv` (one row per run), `results/plateau_curves.csv` (every evaluation). "
             f"Criterion: at budget B a method's mean validation curve has flattened when the mean of its last "
             f"three evaluations up to B is less than {PLATEAU_GAIN} point above the same mean at 0.75 B. "
             f"Each run's result at B is the test score of its best validation step up to B.", ""]
    for task, t in analysis["tasks"].items():
        climbing = [m for m, g in t["gains"].items() if g is not None and g >= PLATEAU_GAIN]
        unjudged = [m for m, g in t["gains"].items() if g is None]
        verdict = "; ".join([f"not flat: {', '.join(climbing)}"] * bool(climbing)
                            + [f"too short to judge (< 3 evaluations up to 0.75 B): {', '.join(unjudged)}"] * bool(unjudged))
        verdict = f" ({verdict or 'every method flat'})"
        lines += [f"### {task}: budget {t['budget']} steps{verdict}", ""]
        lines += ["| method | seeds | validation at B | test at B | last-quarter gain | train s to B |",
                  "|---|---:|---:|---:|---:|---:|"]
        for method, res in t["results"].items():
            if not res:
                continue
            val = [r["validation"] for r in res.values()]
            test = [r["test"] for r in res.values()]
            secs = [r["train_seconds"] for r in res.values()]
            gain = t["gains"].get(method)
            if gain is None:
                gain = last_quarter_gain(t["curves"][method], t["budget"])
            lines.append(f"| {method} | {len(res)} | {_mean_sd(val)} | {_mean_sd(test)} | "
                         f"{'–' if gain is None else f'{gain:+.2f}'} | {statistics.mean(secs):.0f} |")
        lines.append("")
    for title, pairs in (("### Paired differences at each task's budget (test, same seeds; mean ± 95% t half-width)",
                          analysis["pairs"]),
                         ("### The same on validation (what selects between EPT's readings; test never selects)",
                          analysis["validation_pairs"])):
        lines += [title, "", "| pair | " + " | ".join(analysis["tasks"]) + " | overall (mean over tasks per seed) |",
                  "|---|" + "---:|" * (len(analysis["tasks"]) + 1)]
        for (a, b), p in pairs.items():
            cells = [_fmt_interval(*p["tasks"][t]) if t in p["tasks"] else "–" for t in analysis["tasks"]]
            cells.append(_fmt_interval(*p["overall"]) if p["overall"] else "–")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
        lines.append("")
    walls = [float(r["wall_seconds"]) for r in rows if r.get("wall_seconds")]
    lines += [f"CPU time: {len(rows)} runs, {sum(walls) / 3600:.2f} process-hours of wall time recorded "
                  f"({len(walls)} runs with a recorded wall time; 1 torch thread each)."]
    text = "\n".join(lines) + "\n"
    (opts.results_dir / f"{opts.name}.md").write_text(text)
    _plots(analysis, opts.results_dir, opts.name)
    print(text)
    return text


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _plots(analysis: dict, out_dir: Path, name: str = "plateau") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(analysis["tasks"])

    def figure(draw, ylabel: str, name: str) -> None:
        """One panel per task, `draw(ax, task)` filling each; the main methods only (ablations: tables)."""
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            draw(ax, analysis["tasks"][task], task)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)

    def curves(ax, t, task):  # validation against step: mean and min-max band over seeds, the budget marked
        for method, curve in t["curves"].items():
            if method.startswith("ept_"):
                continue
            line, = ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=method)
            if len(t["runs"][method]) > 1:
                ax.fill_between(*_band(t["runs"][method]), color=line.get_color(), alpha=0.15)
        ax.axvline(t["budget"], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{task}: budget {t['budget']} (flat: last quarter adds < {PLATEAU_GAIN})", fontsize=9)
        ax.set_xlabel("step")

    def against_time(ax, t, task):  # each budget's test score (best validation step so far), mean over seeds
        for method, runs in t["runs"].items():
            if not method.startswith("ept_"):
                ax.plot(*_time_curve(runs), marker=".", label=method)
        ax.set_title(task)
        ax.set_xscale("log")
        ax.set_xlabel("training seconds (1 thread, CPU)")

    figure(curves, "validation score", f"{name}_curves.png")
    figure(against_time, "test score at the best validation step so far", f"{name}_vs_time.png")


def _band(runs: list[list[dict]]) -> tuple[list[int], list[float], list[float]]:
    """Steps every run reached, with the lowest and highest validation score over the runs there."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in runs)))
    values = [[next(p["validation"] for p in c if p["step"] == step) for c in runs] for step in steps]
    return steps, [min(v) for v in values], [max(v) for v in values]


def _time_curve(runs: list[list[dict]]) -> tuple[list[float], list[float]]:
    """Each budget every run reached: mean training seconds to it, and the mean test score a run of that
    budget reports (its best validation step's)."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in runs)))
    results = [[at_budget(c, step) for c in runs] for step in steps]
    return ([statistics.mean(r["train_seconds"] for r in rs) for rs in results],
            [statistics.mean(r["test"] for r in rs) for rs in results])

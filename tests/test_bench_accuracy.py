"""The accuracy harness's bookkeeping: learning-rate selection, resumable CSV, report. No training here."""

import csv
import runpy
import sys
from pathlib import Path

import pytest

from conftest import data_dir
from eptkit.cli import build_parser

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "superglue" / "CB" / "train.jsonl").is_file(), reason="no data folder")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # accuracy.py imports its neighbours (accuracy_grid, accuracy_report), as when run
HARNESS = runpy.run_path(str(BENCH / "accuracy.py"))


def _write(path, rows):
    for row in rows:
        HARNESS["append_row"](path, row)


def test_every_command_the_suite_records_parses_as_eptkit_train(tmp_path):
    for method in HARNESS["METHOD_ARGS"]:
        for lr in HARNESS["LR_GRID"][HARNESS["base_method"](method)]:
            cmd = HARNESS["command_for"]("rte", method, 1, lr, 150, 50, tmp_path / "data", tmp_path / "out")
            args = build_parser().parse_args(cmd[1:])
            assert args.command == "train" and args.seed == 1 and args.max_steps == 150


def test_selection_picks_best_mean_validation_over_complete_grids(tmp_path):
    path = tmp_path / "lr_selection.csv"
    key = HARNESS["lr_key"]
    pt_low, pt_high = (key(lr) for lr in HARNESS["LR_GRID"]["pt"][:2])
    dept_a, dept_b = (key(lr) for lr in HARNESS["LR_GRID"]["dept"][:2])
    budget = {"steps": 150, "eval_steps": 50, "batch_size": 16}
    rows = [
        {"task": "sst2", "method": "pt", "lr": pt_low, "validation": 80},
        {"task": "cola", "method": "pt", "lr": pt_low, "validation": 20},    # mean 50
        {"task": "sst2", "method": "pt", "lr": pt_high, "validation": 85},
        {"task": "cola", "method": "pt", "lr": pt_high, "validation": 10},   # mean 47.5
        {"task": "sst2", "method": "pt", "lr": "--lr 0.5", "validation": 99},  # not in the grid: history only
        {"task": "cola", "method": "pt", "lr": "--lr 0.5", "validation": 99},
        {"task": "sst2", "method": "dept", "lr": dept_b, "validation": 99},   # incomplete: one task only
        {"task": "sst2", "method": "dept", "lr": dept_a, "validation": 70},
        {"task": "cola", "method": "dept", "lr": dept_a, "validation": 30},
    ]
    _write(path, [{**r, **budget} for r in rows])
    # Another budget's rows are not candidates at this one.
    _write(path, [{"task": t, "method": "pt", "lr": pt_high, "validation": 100, **budget, "steps": 2000}
                  for t in ("sst2", "cola")])
    chosen = HARNESS["selected_lrs"](path, ("150", "50", "16"))
    assert key(chosen["pt"]) == pt_low
    assert key(chosen["dept"]) == dept_a
    assert "ept" not in chosen
    assert key(HARNESS["selected_lrs"](path, ("2000", "50", "16"))["pt"]) == pt_high


def test_report_averages_over_seeds_and_tasks_and_pairs_variants_with_the_selected_recipe(tmp_path):
    key = HARNESS["lr_key"]
    budget = {"steps": 150, "eval_steps": 50, "batch_size": 16}
    ept_lr = HARNESS["LR_GRID"]["ept"][0]
    rows = []
    for method, scores in {"ept": {"rte": [60, 64], "cb": [70, 80]}, "pt": {"rte": [50, 50], "cb": [70]},
                           "ept_no_fusion": {"rte": [61, 60], "cb": [75]}}.items():
        for task, values in scores.items():
            for seed, v in enumerate(values):
                rows.append({"task": task, "method": method, "seed": seed, **budget, "trainable_params": 1000,
                             "train_seconds": 5, "metric": "accuracy", "validation": v, "test": v,
                             "lr": key(ept_lr), "command": "eptkit train"})
    rows.append({**rows[0], "steps": 2000, "test": 0})  # another budget: not in this report
    # Trained with other runs in one process: its time is the whole process's, so the time column skips it.
    rows[1].update(train_seconds=99, command="eptkit train --sweep sweep.json")
    _write(tmp_path / "accuracy.csv", rows)
    _write(tmp_path / "lr_selection.csv", [{"task": "rte", "method": "ept", "seed": 0, "validation": 60,
                                            "lr": key(ept_lr), **budget}])
    _write(tmp_path / "ept_tuning.csv", [{"task": "rte", "method": "ept", "seed": s, "validation": v, **budget,
                                          "lr": key({**ept_lr, "--lr-ept": 0.01})} for s, v in ((0, 70), (1, 74))])
    HARNESS["main"](["--results-dir", str(tmp_path), "report"])
    table = (tmp_path / "accuracy.md").read_text()
    ept_line = next(line for line in table.splitlines() if line.startswith("| ept |"))
    # rte mean 62 (std 2.83); cb: seed 1 has no pt row, so the table keeps seed 0 only (70), for every
    # method alike (paired seeds); average over tasks 66
    assert "62.0 ± 2.8 (2)" in ept_line and "70.0 ± 0.0 (1)" in ept_line and "| 66.0 | 5 |" in ept_line
    pt_line = next(line for line in table.splitlines() if line.startswith("| pt |"))
    assert "70.0 ± 0.0 (1)" in pt_line and "| 60.0 |" in pt_line
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 0
    # Module-rate variant against the selected EPT recipe on the same task and seed: 70-60 and 74-64.
    tuning_line = next(line for line in table.splitlines() if "`--lr-ept 0.01`" in line)
    assert "+10.0 ± 0.0 (2)" in tuning_line
    # Ablation paired with EPT by task and seed: rte 61-60, 60-64 -> -1.5 ± 3.5; cb 75-70 -> +5.0.
    ablation_line = next(line for line in table.splitlines() if line.startswith("| ept_no_fusion | -"))
    assert "-1.5 ± 3.5 (2)" in ablation_line and "+5.0 ± 0.0 (1)" in ablation_line


def test_rows_are_appended_not_rewritten(tmp_path):
    path = tmp_path / "a.csv"
    _write(path, [{"task": "rte", "method": "pt", "seed": 0}])
    _write(path, [{"task": "rte", "method": "pt", "seed": 1}])
    with open(path) as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]


def test_final_phase_runs_each_missing_cell_once_in_parallel_and_reuses_selection_runs(tmp_path, monkeypatch):
    key = HARNESS["lr_key"]
    chosen = {m: grid[0] for m, grid in HARNESS["LR_GRID"].items()}

    def row(task, method, seed, lr, steps=150):
        return {"task": task, "method": method, "seed": seed, "steps": steps, "eval_steps": 50, "batch_size": 16,
                "trainable_params": 1, "train_seconds": 1, "metric": "accuracy", "validation": 1, "test": 1,
                "lr": key(lr), "command": "eptkit train"}

    _write(tmp_path / "lr_selection.csv", [row("sst2", m, 0, lr) for m, lr in chosen.items()])
    _write(tmp_path / "accuracy.csv", [row("rte", "pt", 1, chosen["pt"])])  # finished in an earlier session
    # Rows at another budget are neither finished cells nor reusable selection runs at this one.
    _write(tmp_path / "accuracy.csv", [row("rte", "ept", 1, chosen["ept"], steps=2000)])
    _write(tmp_path / "lr_selection.csv", [row("sst2", "pt", 1, chosen["pt"], steps=2000)])
    calls = []

    def fake_run_cell(task, method, seed, lr, opts):
        calls.append((task, method, seed))
        return row(task, method, seed, lr)

    monkeypatch.setitem(HARNESS["run_phase"].__globals__, "run_cell", fake_run_cell)
    HARNESS["main"](["--results-dir", str(tmp_path), "run", "--phase", "final", "--tasks", "sst2,rte",
                     "--methods", "pt,ept", "--seeds", "0,1", "--jobs", "3"])
    with open(tmp_path / "accuracy.csv") as f:
        cells = sorted((r["task"], r["method"], r["seed"]) for r in csv.DictReader(f) if r["steps"] == "150")
    expected = sorted((t, m, str(s)) for t in ("sst2", "rte") for m in ("pt", "ept") for s in (0, 1))
    assert cells == expected  # every cell exactly once
    # sst2 seed 0 comes from the selection runs and rte/pt/1 was done: 8 cells - 2 reused - 1 done are run.
    ran = sorted((t, m, str(s)) for t, m, s in calls)
    assert ran == sorted(set(expected) - {("sst2", "pt", "0"), ("sst2", "ept", "0"), ("rte", "pt", "1")})


@needs_data
def test_majority_row_scores_a_constant_prediction(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    from eptkit.tasks import load_task
    from eptkit.batching import subsample

    data = load_task("cb", DATA)
    train_labels = list(data["train"]["label"])
    majority = max(set(train_labels), key=train_labels.count)
    expected = []
    for seed in (0, 1):
        y = list(subsample(data["test"], 500, seed)["label"])  # CB's test split is smaller than 500: all of it
        pred = [majority] * len(y)
        expected.append(100 * (accuracy_score(y, pred) + f1_score(y, pred, average="macro", labels=[0, 1, 2])) / 2)
    assert HARNESS["majority_scores"]("cb", [0, 1], DATA) == pytest.approx(expected)


@needs_data
def test_rerun_repeats_a_recorded_row_and_reports_the_difference(tmp_path, capsys):
    out = tmp_path / "runs"
    command = (f"OMP_NUM_THREADS=1 eptkit train --task cb --data-dir {DATA} --output-dir {out / 'first'} --seed 3 "
               "--max-steps 2 --eval-steps 0 --batch-size 4 --max-eval-samples 8 --max-train-samples 16 "
               "--save-steps 0 --method head --lr-head 0.01")
    base = {"task": "cb", "method": "head", "seed": 3, "metric": "average", "lr": "--lr-head 0.01",
            "command": command}
    _write(tmp_path / "accuracy.csv", [{**base, "validation": 0.0, "test": 0.0}])
    argv = ["--results-dir", str(tmp_path), "rerun", "--task", "cb", "--method", "head", "--seed", "3",
            "--runs-dir", str(out)]
    with pytest.raises(SystemExit, match="re-run differs"):  # the recorded zeros are not what the command gives
        HARNESS["main"](argv)
    import json

    results = json.loads((out / "rerun" / "cb-head-s3" / "results.json").read_text())
    (tmp_path / "accuracy.csv").unlink()
    _write(tmp_path / "accuracy.csv", [{**base, "validation": results["validation"]["average"],
                                        "test": results["test"]["average"]}])
    HARNESS["main"](argv)  # the same command, single-threaded, gives the same scores
    assert "difference +0.00" in capsys.readouterr().out


def test_together_puts_prompt_runs_of_one_task_in_shared_processes():
    cells = [("cb", "pt", 0, {}), ("cb", "head", 0, {}), ("rte", "ept", 0, {}), ("cb", "ept_no_fusion", 0, {}),
             ("cb", "dept", 1, {}), ("cb", "lora", 1, {})]
    assert HARNESS["_jobs"](cells, 1) == [[c] for c in cells]
    assert HARNESS["_jobs"](cells, 2) == [[cells[0], cells[3]], [cells[1]], [cells[2]], [cells[4]], [cells[5]]]
    assert HARNESS["_sweep_entry"]("ept_no_fusion", 2, {"--lr": 0.08, "--init-text": "Read it."}) == {
        "seed": 2, "method": "ept", "prompt-length": 60, "rank": 30, "no-fusion": True, "init-text": "Read it.",
        "lr": 0.08}


@needs_data
def test_runs_trained_together_are_recorded_and_rerun_from_their_command(tmp_path, capsys):
    """Two prompt runs of CB in one `eptkit train --sweep` process (the bundled MiniLM, 2 steps): a row each,
    and `rerun` repeats one from the recorded command (the whole sweep again) to the same scores."""
    key = HARNESS["lr_key"]
    chosen = {m: HARNESS["LR_GRID"][m][-1] for m in ("pt", "ept")}
    _write(tmp_path / "lr_selection.csv", [
        {"task": t, "method": m, "seed": 0, "steps": 2, "eval_steps": 0, "batch_size": 4, "validation": 1,
         "lr": key(lr)} for m, lr in chosen.items() for t in HARNESS["SELECT_TASKS"]])
    budget = ["--steps", "2", "--eval-steps", "0", "--batch-size", "4"]
    HARNESS["main"](["--results-dir", str(tmp_path), "run", "--phase", "final", "--tasks", "cb", "--methods", "pt,ept",
                     "--seeds", "0", "--together", "2", "--threads", "1", "--data-dir", str(DATA),
                     "--runs-dir", str(tmp_path / "runs"), *budget])
    with open(tmp_path / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["method"] for r in rows) == ["ept", "pt"]
    assert len({r["command"] for r in rows}) == 1 and "--sweep" in rows[0]["command"]
    assert (tmp_path / "sweeps").is_dir()
    capsys.readouterr()
    HARNESS["main"](["--results-dir", str(tmp_path), "rerun", "--task", "cb", "--method", "ept", "--runs-dir",
                     str(tmp_path / "runs"), "--tolerance", "0.01"])  # rows keep 2 decimals
    out = capsys.readouterr().out
    assert out.count("difference +0.00") + out.count("difference -0.00") == 2


def test_targets_table_names_each_method_that_misses_a_target(tmp_path):
    budget = {"steps": 150, "eval_steps": 50, "batch_size": 16}
    scores = {"head": {"rte": 60.0, "sst2": 80.0}, "lora": {"rte": 61.0, "sst2": 84.0},
              "pt": {"rte": 58.96, "sst2": 81.5}, "dept": {"rte": 59.0, "sst2": 80.9},
              "ept": {"rte": 60.0, "sst2": 82.0}}
    _write(tmp_path / "accuracy.csv", [
        {"task": t, "method": m, "seed": 0, **budget, "trainable_params": 1, "train_seconds": 1,
         "metric": "accuracy", "validation": v, "test": v, "lr": "", "command": "eptkit train"}
        for m, per_task in scores.items() for t, v in per_task.items()])
    HARNESS["main"](["--results-dir", str(tmp_path), "report", "--data-dir", str(tmp_path / "absent")])
    lines = (tmp_path / "accuracy.md").read_text().splitlines()
    # rte: LoRA leads by 1 (< 3), so each prompt method must be >= -1: pt's -1.04 misses, dept's -1.00 meets.
    assert next(l for l in lines if l.startswith("| rte |")).endswith("| each >= -1 | **no** (pt) |")
    # sst2: LoRA leads by 4, so each must beat the probe by more than 1: dept's +0.9 misses.
    assert next(l for l in lines if l.startswith("| sst2 |")).endswith("**no** (dept) |")

"""The plateau study's bookkeeping (benchmarks/plateau.py, plateau_report.py): budgets read off curves, results at a budget,
paired intervals, and CSVs from run folders. No training here (the constant schedule's prefix property
is tested in test_train.py)."""

import json
import runpy
import statistics
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from scipy import stats

from eptkit.cli import build_parser

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # plateau.py imports accuracy.py, its neighbour
PLATEAU = runpy.run_path(str(BENCH / "plateau.py"))  # the runner
REPORT = runpy.run_path(str(BENCH / "plateau_report.py"))  # the analysis


def _curve(values, tests=None, every=100, seconds_per_step=1.0):
    tests = tests or [None] * len(values)
    return [{"step": every * (i + 1), "validation": v, "test": t, "train_seconds": every * (i + 1) * seconds_per_step}
            for i, (v, t) in enumerate(zip(values, tests))]


def test_a_run_at_a_budget_is_its_best_validation_step_up_to_it():
    curve = _curve([50, 60, 60, 70, 65], tests=[40, 55, None, 66, None])
    at = REPORT["at_budget"]
    assert at(curve, 300) == {"validation": 60, "test": 55, "best_step": 200, "train_seconds": 300}  # first of equals
    assert at(curve, 500)["test"] == 66 and at(curve, 500)["best_step"] == 400
    assert at(curve, 600) is None  # never reached


def test_the_budget_is_the_first_where_every_method_gains_less_than_half_a_point_in_the_last_quarter():
    # By hand, at budget B the gain is mean(last 3 evaluations <= B) - mean(last 3 <= 0.75 B).
    fast = [(100 * (i + 1), v) for i, v in enumerate([70, 80, 80, 80, 80, 80, 80, 80])]
    slow = [(100 * (i + 1), v) for i, v in enumerate([10, 20, 30, 40, 50, 55, 56, 56.2])]
    budget, gains = REPORT["plateau_budget"]({"fast": fast, "slow": slow})
    # slow at 800: (55 + 56 + 56.2)/3 - (40 + 50 + 55)/3 (0.75 x 800 = 600) = 7.4: never flat, so the longest
    assert budget == 800 and gains["slow"] == pytest.approx((55 + 56 + 56.2) / 3 - (40 + 50 + 55) / 3)
    flat = [(s, min(v, 50)) for s, v in slow]
    budget, gains = REPORT["plateau_budget"]({"fast": fast, "slow": flat})
    # flat: 50 from step 500; at 700 the windows are 500-700 and 300-500 (0.75 x 700 = 525): 50 - 40 = 10;
    # at 800: 600-800 against 400-600: 50 - (40 + 50 + 50)/3 = 3.33; no budget meets it -> 800 again
    assert budget == 800 and gains["slow"] == pytest.approx(50 - 140 / 3)
    long_flat = flat + [(900, 50), (1000, 50), (1100, 50)]
    fast_long = fast + [(900, 80), (1000, 80), (1100, 80)]
    budget, _ = REPORT["plateau_budget"]({"fast": fast_long, "slow": long_flat})
    assert budget == 1000  # 0.75 x 1000 = 750: windows 800-1000 and 500-700, all 50


def test_paired_interval_matches_scipy_t_interval():
    diffs = [1.5, -0.5, 2.0, 0.25, 1.0]
    mean, half = REPORT["paired_interval"](diffs)
    low, high = stats.ttest_1samp(diffs, 0).confidence_interval(0.95)
    assert mean == pytest.approx(statistics.mean(diffs))
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert REPORT["paired_interval"]([3.0]) == (3.0, None)


def test_analysis_pairs_seeds_and_averages_tasks_per_seed():
    points = []
    for task, base in (("stsb", 60), ("sst2", 80)):
        for method, shift in (("ept", 2.0), ("dept", 0.0)):
            for seed in (0, 1, 2):
                values = [base + shift + seed, base + shift + seed + 1, base + shift + seed + 1]
                for i, v in enumerate(values):
                    points.append({"task": task, "method": method, "seed": str(seed), "step": str(100 * (i + 1)),
                                   "validation": str(v), "test": str(v - 1 - shift / 2) if i < 2 else "",
                                   "train_seconds": str(i)})
    out = REPORT["analyse"](points, {"stsb": 300, "sst2": 300})
    pair = out["pairs"][("ept", "dept")]  # test: EPT's shift 2 less its half
    assert pair["tasks"]["stsb"][0] == pytest.approx(1.0) and pair["tasks"]["stsb"][2] == 3
    assert pair["overall"][0] == pytest.approx(1.0) and pair["overall"][1] == pytest.approx(0.0)
    on_validation = out["validation_pairs"][("ept", "dept")]
    assert on_validation["tasks"]["sst2"][0] == pytest.approx(2.0) and on_validation["overall"][0] == pytest.approx(2.0)
    # the best validation step up to 300 is 200 (300 only ties it): its test, base + shift + seed + 1 - 1 - shift/2
    assert out["tasks"]["sst2"]["results"]["ept"][1]["test"] == 80 + 2 + 1 + 1 - 1 - 1


def _options(tmp_path):
    return Namespace(runs_dir=tmp_path / "runs", results_dir=tmp_path / "results", data_dir=tmp_path / "data",
                     batch_size=16, eval_steps=2, steps=6, threads=1)


def test_commands_parse_as_eptkit_train_with_a_constant_schedule(tmp_path):
    opts = _options(tmp_path)
    for method in ("pt", "dept", "ept", "lora", "ept_no_fusion"):
        cmd = PLATEAU["command_for"]("stsb", method, 3, 800, opts, {"--lr": 0.08})
        args = build_parser().parse_args(cmd[1:])
        assert args.lr_schedule == "constant" and args.test_at_best and args.seed == 3 and args.max_steps == 800


def test_variants_change_only_their_own_option_and_keep_their_base_rates(tmp_path):
    opts = _options(tmp_path)
    rates = {"--lr": 0.08, "--lr-low-rank": 0.008}
    ept = PLATEAU["command_for"]("sst2", "ept", 0, 400, opts, rates)
    expected = {"ept_linear": ("lr_schedule", "linear"), "dept_linear": ("lr_schedule", "linear"),
                "ept_qk": ("fusion_rank", 8), "ept_random": ("module_init", "random"), "ept_slow": ("lr_ept", 0.001)}
    for method, (field, value) in expected.items():
        cmd = PLATEAU["command_for"]("sst2", method, 0, 400, opts, rates)
        assert cmd.count("--lr-schedule") == 1  # the recorded command names each option once
        args, base = build_parser().parse_args(cmd[1:]), build_parser().parse_args(ept[1:])
        assert getattr(args, field) == value and args.lr == 0.08 and args.lr_low_rank == 0.008
        assert args.method == method.split("_")[0]
        if args.method == "ept":  # everything else is EPT's command
            given, ept_given = vars(args), vars(base)  # the parser keeps only the options a command names
            changed = {k for k in given.keys() | ept_given.keys() if given.get(k) != ept_given.get(k)}
            assert changed == {field, "output_dir"}
    assert PLATEAU["base_of"]("dept_linear") == "dept" and PLATEAU["base_of"]("ept_no_fusion") == "ept"
    # the GPU study's 'all' leaves the schedule check and the readings to their own calls
    opts.tasks, opts.seeds, opts.methods, opts.steps = ["sst2"], None, None, 400
    assert not {c[1] for c in PLATEAU["cells_for"]("all", opts)} & set(PLATEAU["VARIANTS"])
    assert {c[1] for c in PLATEAU["cells_for"]("readings", opts)} == {"ept_qk", "ept_random", "ept_slow"}


def test_collect_reads_finished_and_cut_short_runs(tmp_path):
    opts = _options(tmp_path)
    opts.results_dir.mkdir()
    for name, steps, finished in (("done", 6, True), ("cut", 4, False)):
        run = opts.runs_dir / name
        run.mkdir(parents=True)
        (run / "eptkit_run.json").write_text("{}")
        cmd = "OMP_NUM_THREADS=1 eptkit train --task sst2 --max-steps 6 --seed 0"
        (run / "plateau_run.json").write_text(json.dumps({"task": "sst2", "method": name, "seed": 0,
                                                          "batch_size": 16, "eval_steps": 2, "metric": "accuracy",
                                                          "command": cmd, "wall_seconds": 9.0}))
        records = []
        for step in range(1, steps + 1):
            record = {"step": step, "step_time_s": 0.5}
            if step % 2 == 0:
                improved = step != 4
                record["eval"] = {"validation": {"accuracy": 50.0 + step}, "improved": improved}
                if improved:
                    record["eval"]["test"] = {"accuracy": 40.0 + step}
            records.append(record)
        (run / "log.jsonl").write_text("\n".join(map(json.dumps, records)))
        if finished:
            (run / "results.json").write_text("{}")
    PLATEAU["collect"](opts)
    rows = {r["method"]: r for r in REPORT["read_csv"](opts.results_dir / "plateau.csv")}
    assert rows["done"]["steps"] == "6" and rows["done"]["test"] == "46.0" and rows["done"]["finished"] == "1"
    assert rows["cut"]["steps"] == "4" and rows["cut"]["best_step"] == "2" and rows["cut"]["finished"] == "0"
    assert "--max-steps 4" in rows["cut"]["command"]  # re-runs exactly the steps it reached
    curves = REPORT["read_csv"](opts.results_dir / "plateau_curves.csv")
    assert [(c["method"], c["step"], c["train_seconds"]) for c in curves] == [
        ("cut", "2", "1.0"), ("cut", "4", "2.0"), ("done", "2", "1.0"), ("done", "4", "2.0"), ("done", "6", "3.0")]
    # a later collect without the folders keeps the rows (an earlier session's runs)
    import shutil
    shutil.rmtree(opts.runs_dir)
    PLATEAU["collect"](opts)
    assert len(REPORT["read_csv"](opts.results_dir / "plateau.csv")) == 2


def test_report_writes_tables_and_plots(tmp_path):
    opts = _options(tmp_path)
    opts.results_dir.mkdir()
    opts.budget, opts.name = "", "plateau"
    points = []
    for method, top in (("ept", 80.0), ("dept", 79.0), ("pt", 70.0)):
        for seed in (0, 1):
            for i in range(8):
                v = min(top, 40 + 10 * i) + seed
                points.append({"task": "stsb", "method": method, "seed": seed, "step": 100 * (i + 1),
                               "validation": v, "test": v - 1, "train_seconds": 100 * (i + 1)})
    PLATEAU["write_csv"](opts.results_dir / "plateau_curves.csv", PLATEAU["CURVE_COLUMNS"], points)
    text = REPORT["report"](opts)
    # ept reaches its top at step 500: at 800 the windows 600-800 and 400-600 give 80 - (70 + 80 + 80) / 3 =
    # +3.33, so no budget meets the criterion and the report compares at the longest one, saying so
    assert "### stsb: budget 800 steps (not flat: dept, ept)" in text and "| ept | 2 |" in text and "+3.33 |" in text
    assert "| ept − dept | +1.00 ± 0.00 (n=2) |" in text
    assert (opts.results_dir / "plateau_curves.png").is_file() and (opts.results_dir / "plateau_vs_time.png").is_file()


def test_gpu_script_runs_the_study_with_valid_options(tmp_path):
    """benchmarks/gpu.sh's plateau lines parse, and the 'all' phase gives EPT and DePT five seeds on every task."""
    import re
    import shlex

    script = (BENCH / "gpu.sh").read_text().replace("\\\n", " ")
    calls = [line.split("benchmarks/plateau.py", 1)[1].split("2>&1")[0] for line in script.splitlines()
             if "benchmarks/plateau.py" in line and not line.lstrip().startswith("#")]
    assert len(calls) == 2  # run, then report
    values = {"PLATEAU_STEPS:-2000": "2000", "JOBS:-4": "4", "THREADS:-2": "2"}
    for call in calls:
        call = re.sub(r"\$\{([^}]+)\}", lambda m: values.get(m.group(1), "x"), call).replace("$DATA_DIR", "d")
        opts = PLATEAU["build_parser"]().parse_args(shlex.split(call.replace("$OUT_DIR", str(tmp_path))))
        if opts.action == "run":
            assert opts.phase == "all" and opts.steps == 2000 and len(opts.tasks) == 7
            opts.seeds, opts.methods = None, None
            cells = PLATEAU["cells_for"]("all", opts)
            assert sorted({c[2] for c in cells if c[1] == "dept" and c[0] == "rte"}) == [0, 1, 2, 3, 4]
            assert len(cells) == 7 * (2 * 5 + 2 * 3 + 2 * 3 + 3)

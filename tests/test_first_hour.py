"""What a new user meets first: a CLI that starts at once, recipes that follow the accuracy study, help
text that says what flags do, and output that survives a closed pipe (issue 22)."""

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ENV.pop("EPTKIT_DEBUG", None)

# What each command leaves in sys.modules: a command that needs no model must not import these.
HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft")
PROBE = """
import sys
from eptkit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def _modules_after(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          env=ENV, timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("info", "--task", "cb"), ("train", "--help"),
                                  ("serve", "--help"), ("evaluate", "--help"), ("train", "--method", "magic"),
                                  ("info", "--task", "nosuch")], ids=" ".join)
def test_commands_that_need_no_model_import_neither_torch_nor_transformers(args):
    assert _modules_after(*args) == []


def test_help_takes_at_most_half_the_time_of_importing_torch_and_transformers():
    def best_of(cmd, n=2):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=ENV, timeout=300, check=True)
            times.append(time.perf_counter() - t0)
        return min(times)

    libraries = best_of([sys.executable, "-c", "import torch, transformers"])
    help_time = best_of([sys.executable, "-m", "eptkit.cli", "--help"])
    print(f"eptkit --help {help_time:.2f} s, import torch, transformers {libraries:.2f} s")
    assert help_time <= 0.5 * libraries


def test_the_package_still_exports_its_api():
    import eptkit

    assert eptkit.EPTConfig(prompt_length=4).prompt_length == 4
    assert callable(eptkit.get_prompted_model) and "PromptedModel" in dir(eptkit)
    from eptkit import DataError, load_task  # noqa: F401  (lazy names import like eager ones)

    with pytest.raises(AttributeError):
        eptkit.no_such_name  # noqa: B018


def test_a_closed_pipe_is_no_error():
    # The reader goes away before eptkit writes (`eptkit info ... | head` when head has what it wants).
    proc = subprocess.Popen([sys.executable, "-m", "eptkit.cli", "info", "--task", "multirc"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_help_names_choices_and_defaults_once(capsys):
    from eptkit.cli import main

    for cmd in (["train", "--help"], ["evaluate", "--help"], ["serve", "--help"], ["predict", "--help"]):
        with pytest.raises(SystemExit):
            main(cmd)
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: lr_low_rank). (default: None)" not in out and "(default: lr_low_rank)" in out
    for flag, choices in (("--init", "{sample_vocab,text,random}"), ("--pooling", "{mean,backbone,text_first}"),
                          ("--text-positions", "{after_prompt,own}")):
        assert f"{flag} {choices}" in out, flag
    assert "Evaluation batch size (default: 64)" in out
    assert "--no-fold Serve the adapters as trained" in out
    assert "'-' writes the rows to standard output" in out


# ---------------------------------------------------------------------------------------------- recipes
RESULTS = ROOT / "benchmarks" / "results"
# What an option is when a recipe leaves it out: eptkit train's default on the bundled encoder classifier.
DEFAULTS = {"init": "text", "init-text": "Read the text and decide the answer.", "text-positions": "own",
            "lr": 0.08, "lr-low-rank": 0.008, "lr-head": 0.01, "optimizer": "adamw", "lr-unit": "embedding_rms",
            "regression-targets": "standardize"}
STUDIED = tuple(DEFAULTS)


def _study_rows() -> list[tuple[str, dict, float]]:
    """(task, EPT options, validation score) of every seed-0 EPT row of the rate selection and the recipe study."""
    rows = []
    for name in ("lr_selection.csv", "recipe.csv"):
        with open(RESULTS / name, newline="") as f:
            for r in csv.DictReader(f):
                if r["method"] != "ept" or r["seed"] != "0":
                    continue
                words = shlex.split(r["lr"])
                options = dict(DEFAULTS)
                options.update({words[i][2:]: words[i + 1] for i in range(0, len(words), 2)})
                rows.append((r["task"], {k: _value(v) for k, v in options.items()}, float(r["validation"])))
    return rows


def _value(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def measured_worse() -> tuple[dict, set]:
    """(the selected options, {(option, value)}): the configuration with the best mean validation over the
    tasks it ran, and every option value by which a configuration that scored lower on the same tasks
    differed from it."""
    configs: dict[tuple, dict[str, float]] = {}
    for task, options, score in _study_rows():
        configs.setdefault(tuple(sorted(options.items())), {})[task] = score
    full = {k: v for k, v in configs.items() if len(v) == 3}
    selected = max(full, key=lambda k: sum(full[k].values()))
    worse = set()
    for config, scores in configs.items():
        common = set(scores) & set(configs[selected])
        if config != selected and sum(scores[t] for t in common) < sum(configs[selected][t] for t in common):
            worse |= set(config) - set(selected)
    return dict(selected), worse


def test_the_study_selected_the_documented_defaults():
    selected, worse = measured_worse()
    assert selected == {k: _value(v) for k, v in DEFAULTS.items()}
    assert {("init", "sample_vocab"), ("text-positions", "after_prompt"), ("optimizer", "adafactor"),
            ("regression-targets", "raw"), ("lr", 0.3)} <= worse


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes" / "cpu").glob("*.json")), ids=lambda p: p.stem)
def test_cpu_recipes_use_the_selected_settings_or_say_why(recipe):
    data = json.loads(recipe.read_text())
    options = {k.lstrip("-").replace("_", "-"): _value(v) for k, v in data.items()}
    values = {k: options.get(k, DEFAULTS[k]) for k in STUDIED}
    _, worse = measured_worse()
    why = data.get("description", "")
    for key, value in values.items():
        if (key, value) in worse:
            assert key in why, f"{recipe.name}: {key}={value!r} measured worse (benchmarks/RESULTS.md); say why"
    # A rate in another unit is another rate: the study measured its rates in units of the embedding RMS.
    if values["lr-unit"] != "embedding_rms" or values["lr"] != 0.08 or values["lr-low-rank"] != 0.008:
        assert "lr" in why, f"{recipe.name}: rates other than the study's selected ones; say why"


def test_recipes_readme_gives_a_score_for_every_measured_recipe():
    text = (ROOT / "recipes" / "README.md").read_text()
    assert "python recipes/measure.py" in text  # the one command that produced the numbers
    for recipe in sorted((ROOT / "recipes" / "cpu").glob("*.json")):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `cpu/{recipe.name}`")), None)
        assert line is not None, f"{recipe.name}: neither measured nor listed as unmeasured in recipes/README.md"


# ---------------------------------------------------------------------------------------------- runs
from conftest import data_dir  # noqa: E402
from test_train import make_model, synthetic_cb, tiny_models  # noqa: E402,F401  (fixture)

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "superglue" / "CB" / "train.jsonl").is_file(),
                                reason=f"data folder {DATA} not found (set EPTKIT_DATA_DIR)")


def cli(capsys, *args):
    from eptkit.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_run(model, out, *extra, steps=4, method="ept"):
    prompt = ("--prompt-length", 4, "--rank", 2) if method == "ept" else ()
    return ["train", "--task", "cb", "--method", method, "--model", model, "--data-dir", DATA, "--output-dir", out,
            "--max-steps", steps, "--eval-steps", 2, "--save-steps", 2, "--batch-size", 4, "--max-length", 64,
            "--max-train-samples", 32, "--max-eval-samples", 16, *prompt, *extra]


@needs_data
def test_a_run_says_what_it_does_from_the_start(tiny_models, tmp_path, capsys):  # noqa: F811
    code, _, err = cli(capsys, *tiny_run(tiny_models["bert"], tmp_path / "r"))
    lines = err.splitlines()
    assert code == 0
    first = [i for i, ln in enumerate(lines) if ln.startswith(("eptkit train: reading", "eptkit train: loading",
                                                               "training 4 steps", "step 1/4"))]
    assert len(first) == 4 and first == sorted(first), err
    assert "of training left" in next(ln for ln in lines if ln.startswith("step 1/4"))


@needs_data
def test_earlier_checkpoints_are_refused_before_the_data_is_read(tiny_models, tmp_path, capsys):  # noqa: F811
    assert cli(capsys, *tiny_run(tiny_models["bert"], tmp_path / "r"))[0] == 0
    code, _, err = cli(capsys, *tiny_run(tiny_models["bert"], tmp_path / "r"))
    assert code == 2 and err.splitlines() == [
        f"eptkit train: error: {tmp_path / 'r'}: holds checkpoints of an earlier run; add --resume to continue it "
        "or --overwrite to start again"]


@needs_data
def test_resume_extends_max_steps_only_under_a_constant_schedule(tiny_models, tmp_path, capsys):  # noqa: F811
    model = tiny_models["bert"]
    assert cli(capsys, *tiny_run(model, tmp_path / "linear"))[0] == 0
    code, _, err = cli(capsys, *tiny_run(model, tmp_path / "linear", "--resume", steps=6))
    assert code == 2 and "max_steps=4 in the checkpoint's run, --max-steps 6 now" in err and "--lr-schedule constant" in err

    constant = ("--lr-schedule", "constant", "--warmup-steps", 1)
    assert cli(capsys, *tiny_run(model, tmp_path / "constant", *constant))[0] == 0
    code, out, err = cli(capsys, *tiny_run(model, tmp_path / "constant", *constant, "--resume", steps=6))
    assert code == 0, err
    assert json.loads((tmp_path / "constant" / "results.json").read_text())["steps"] == 6
    # the same 6 steps in one go: the extended run is that run continued (the loss of every step)
    assert cli(capsys, *tiny_run(model, tmp_path / "once", *constant, steps=6))[0] == 0

    def losses(run):
        return [json.loads(ln)["loss"] for ln in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert losses("constant") == losses("once")


@needs_data
def test_several_runs_say_whose_line_it_is(tiny_models, tmp_path, capsys):  # noqa: F811
    code, _, err = cli(capsys, *tiny_run(tiny_models["bert"], tmp_path / "s", "--seeds", "0,1", steps=2))
    assert code == 0, err
    steps = [ln for ln in err.splitlines() if " step 1/2" in ln]
    assert sorted(ln.split()[0] for ln in steps) == ["[seed-0]", "[seed-1]"]


@needs_data
def test_a_model_whose_head_has_another_label_count_trains(tiny_models, tmp_path, capsys, caplog):  # noqa: F811
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(two)
    for method in ("ept", "head"):
        code, out, err = cli(capsys, *tiny_run(str(two), tmp_path / method, steps=2, method=method))
        assert code == 0, err
        assert "its classification head has 2 labels and the task has 3" in err + caplog.text  # (pytest takes logs)
        assert cli(capsys, "evaluate", "--adapter", tmp_path / method)[0] == 0


def test_loading_a_backbone_prints_no_transformers_bars_or_report(tiny_models, tmp_path, capfd, caplog):  # noqa: F811
    """Issue 22: the bundled backbone loads without transformers' "Loading weights" bar and its LOAD REPORT
    (the MISSING block of the head eptkit asks for); a head of another size still gets eptkit's warning;
    transformers' switches are as they were afterwards."""
    from transformers.utils import logging as hf_logging

    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    filters = list(report_logger.filters)
    bars_were_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()  # as a library user has them (the CLI's commands switch both off)
    hf_logging.set_verbosity_warning()
    try:
        _load_quietly(tiny_models, tmp_path, capfd, caplog)
        # Restored: the filter is gone, and transformers' own bar shows again outside the load.
        assert report_logger.filters == filters
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
        assert "Loading weights" in capfd.readouterr().err
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_on:
            hf_logging.disable_progress_bar()


def _load_quietly(tiny_models, tmp_path, capfd, caplog):  # noqa: F811
    import logging

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eptkit.backbones import bundled_model_path, load_backbone

    model, _ = load_backbone(bundled_model_path(), "classification", num_labels=3)
    out, err = capfd.readouterr()
    assert model.config.num_labels == 3 and not out and "Loading weights" not in err and "LOAD REPORT" not in err
    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(two)
    capfd.readouterr()
    caplog.clear()  # the setup's own from_pretrained reports its missing head
    with caplog.at_level(logging.WARNING):
        load_backbone(str(two), "classification", num_labels=3)
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    assert "Loading weights" not in text and "LOAD REPORT" not in text and "MISSING" not in text
    assert "its classification head has 2 labels and the task has 3" in text


def test_an_adapter_saved_from_python_loads_into_a_server_given_its_task(tiny_models, tmp_path):  # noqa: F811
    from eptkit.serve import RunningServer, ServeConfig, load_pool
    from eptkit.tasks.errors import MissingTask

    model, _ = make_model(tiny_models["bert"], "ept")
    model.save_pretrained(tmp_path / "python-adapter")  # no eptkit_run.json: no task recorded
    config = ServeConfig(port=0, log_level="warning", model=tiny_models["bert"])
    with pytest.raises(MissingTask, match='POST /adapters field "task"'):
        load_pool({"a": str(tmp_path / "python-adapter")}, config)
    pool = load_pool({"a": str(tmp_path / "python-adapter")}, config, tasks={"a": "cb"})
    with RunningServer(pool, config) as server:
        body = json.dumps({"name": "b", "path": str(tmp_path / "python-adapter"), "task": "cb"}).encode()
        import urllib.request

        request = urllib.request.Request(server.url + "/adapters", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 201 and json.loads(response.read())["task"] == "cb"


def test_the_gate_report_says_when_rows_repeat_the_instruction_start():
    import random

    from eptkit.inspection import _period, repeat_note

    random.seed(0)
    pattern = [[random.random() for _ in range(4)] for _ in range(8)]  # an 8-token instruction, repeated
    rows = [[x + random.gauss(0, 0.01) for x in pattern[i % 8]] for i in range(60)]
    assert _period(rows) == 8
    assert _period([[random.random() for _ in range(4)] for _ in range(60)]) is None
    assert "every 8 tokens" in repeat_note({"repeats_every": 8, "init": "text"})
    assert repeat_note({"repeats_every": None}) is None

"""The `eptkit` command line: train / evaluate / predict / export / info, recipes, bad input, 2 processes.

End-to-end runs use the real data folder (skipped if absent) with a tiny random BERT that carries the
bundled MiniLM tokenizer, so each run takes seconds.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import data_dir
from eptkit.cli import main
from test_train import save_tiny_backbones  # noqa: F401  (tiny_models fixture below)

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "superglue" / "CB" / "train.jsonl").is_file(),
                                reason=f"data folder {DATA} not found (set EPTKIT_DATA_DIR)")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ENV.pop("EPTKIT_DEBUG", None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_backbones(tmp_path_factory.mktemp("tiny_cli"))


def small_train_args(model, out, method="ept", steps=4):
    args = ["train", "--task", "cb", "--method", method, "--model", model, "--data-dir", str(DATA),
            "--output-dir", str(out), "--max-steps", str(steps), "--eval-steps", "2", "--save-steps", "2",
            "--batch-size", "4", "--max-length", "64", "--max-train-samples", "32", "--max-eval-samples", "16",
            "--lr", "3e-2", "--lr-low-rank", "1e-2"]
    if method in ("pt", "dept", "ept"):
        args += ["--prompt-length", "4"]
    if method in ("dept", "ept"):
        args += ["--rank", "2"]
    return args


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One CLI training run (EPT, tiny BERT, real CB) shared by the evaluate/predict/export/info tests."""
    if not (DATA / "superglue" / "CB" / "train.jsonl").is_file():
        pytest.skip("data folder not found")
    out = tmp_path_factory.mktemp("cli_run") / "cb-ept"
    assert main(small_train_args(tiny["bert"], out)) == 0
    return out


# ---------------------------------------------------------------------------------------------- train
@needs_data
def test_train_writes_the_output_directory(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "results.json", "log.jsonl", "checkpoints",
            "eptkit_run.json"} <= names
    results = json.loads((trained / "results.json").read_text())
    assert results["task"] == "cb" and results["method"] == "ept" and results["steps"] == 4
    assert results["num_examples"] == {"train": 32, "validation": 16, "test": 16}
    assert set(results["test"]) == {"accuracy", "macro_f1", "average"}
    assert results["config"]["method"]["prompt_length"] == 4 and results["config"]["method"]["offset_length"] == 64
    assert {"eptkit", "torch", "transformers", "accelerate"} <= set(results["versions"])
    run = json.loads((trained / "eptkit_run.json").read_text())
    assert run["task"] == "cb" and Path(run["backbone"]).is_dir()


@needs_data
def test_train_prints_a_json_summary_and_recipes_are_overridden(tiny, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"description": "test", "task": "cb", "method": "dept", "prompt-length": 3,
                                  "rank": 2, "max_steps": 2, "eval-steps": 1, "batch-size": 4, "max-length": 48,
                                  "max-train-samples": 16, "max-eval-samples": 8, "lr": 0.05}))
    code, out, _ = run_cli(["train", "--config", recipe, "--model", tiny["bert"], "--data-dir", DATA,
                            "--output-dir", tmp_path / "run", "--lr", "0.01"], capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["method"] == "dept" and summary["test"] is not None
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["method"]["prompt_length"] == 3  # from the recipe
    assert results["config"]["train"]["lr"] == 0.01  # the command line wins
    assert results["config"]["train"]["max_steps"] == 2


@needs_data
@pytest.mark.parametrize("method", ["pt", "lora", "ptuning", "head"])
def test_train_other_methods(tiny, tmp_path, capsys, method):
    code, out, err = run_cli(small_train_args(tiny["bert"], tmp_path, method, steps=2), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "results.json").read_text())["method"] == method


@needs_data
def test_train_with_gradient_checkpointing(tiny, tmp_path, capsys):
    """Two steps with --gradient-checkpointing: recorded in eptkit_run.json, and the adapter is the one a run
    without it trains (recomputing the layers changes no number; the tiny BERT's dropout is on, and the
    recomputation replays its masks)."""
    runs = {}
    for on in (True, False):
        out = tmp_path / str(on)
        code, _, err = run_cli(small_train_args(tiny["bert"], out, "ept", steps=2)
                               + (["--gradient-checkpointing"] if on else []), capsys)
        assert code == 0, err
        assert json.loads((out / "eptkit_run.json").read_text())["gradient_checkpointing"] is on
        runs[on] = load_file(str(out / "adapter_model.safetensors"))
    assert runs[True].keys() == runs[False].keys()
    for name, tensor in runs[False].items():
        torch.testing.assert_close(runs[True][name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_users_own_files(tiny, tmp_path, capsys):
    rows = [{"text": f"{w} movie {i}", "sentiment": w} for i, w in enumerate(["good", "bad"] * 12)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(["train", "--train-file", path, "--label-column", "sentiment", "--text-columns", "text",
                              "--method", "pt", "--prompt-length", "2", "--model", tiny["bert"], "--output-dir",
                              tmp_path / "run", "--max-steps", "2", "--batch-size", "4"], capsys)
    assert code == 0, err
    inp = tmp_path / "in.csv"
    inp.write_text("text\nnice good film\n\"bad, bad\"\n")
    code, out, err = run_cli(["predict", "--adapter", tmp_path / "run", "--input", inp, "--output",
                              tmp_path / "pred.jsonl"], capsys)
    assert code == 0, err
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["text"] for p in preds] == ["nice good film", "bad, bad"]
    assert all(p["prediction"] in ("bad", "good") for p in preds)


# ---------------------------------------------------------------------------------------------- evaluate, predict, export, info
@needs_data
def test_evaluate_reproduces_the_test_score(trained, capsys):
    code, out, err = run_cli(["evaluate", "--adapter", trained, "--max-eval-samples", "16"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    results = json.loads((trained / "results.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 16
    assert metrics["accuracy"] == pytest.approx(results["test"]["accuracy"])


@needs_data
def test_predict_writes_label_names(trained, tmp_path, capsys):
    src = DATA / "superglue" / "CB" / "test.jsonl"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(src.read_text().splitlines(keepends=True)[:5]))
    code, out, err = run_cli(["predict", "--adapter", trained, "--input", inp, "--output", tmp_path / "o.jsonl"], capsys)
    assert code == 0, err
    preds = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and all(p["prediction"] in ("entailment", "contradiction", "neutral") for p in preds)
    assert "premise" in preds[0]


@needs_data
def test_export_compiled_scores_the_same(trained, tmp_path, capsys):
    code, _, err = run_cli(["export", "--adapter", trained, "--format", "compiled", "--output", tmp_path / "c"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["compiled"] is True
    _, a, _ = run_cli(["evaluate", "--adapter", trained, "--max-eval-samples", "16"], capsys)
    _, b, _ = run_cli(["evaluate", "--adapter", tmp_path / "c", "--max-eval-samples", "16"], capsys)
    assert json.loads(a)["accuracy"] == json.loads(b)["accuracy"]
    # EPT has no PEFT equivalent: one clear line
    code, _, err = run_cli(["export", "--adapter", trained, "--format", "peft", "--output", tmp_path / "p"], capsys)
    assert code == 2 and "only prompt tuning" in err and len(err.strip().splitlines()) == 1


@needs_data
def test_info_shows_gate_weights_and_plots(trained, tmp_path, capsys):
    png = tmp_path / "gates.png"
    code, out, err = run_cli(["info", "--adapter", trained, "--plot", png], capsys)
    assert code == 0, err
    assert "gate weights per prompt token over 4 subspaces (initial value 0.2500 each)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(["info", "--adapter", trained, "--json"], capsys)
    info = json.loads(out)
    weights = torch.tensor(info["gate_weights"]["weights"])
    assert weights.shape == (4, 4) and torch.allclose(weights.sum(1), torch.ones(4), atol=1e-4)
    assert info["gate_weights"]["max_abs_change"] > 0  # trained away from uniform


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--prompt-length", "--rank", "--max-length", "--offset-length", "--num-subspaces", "--subspace-rank", "--no-fusion",
                "--lr", "--lr-low-rank", "--batch-size", "--max-steps", "--eval-steps", "--save-steps", "--seed",
                "--k-shot", "--resume", "--config", "--train-file", "--text-columns", "--label-column",
                "--mixed-precision", "--gradient-accumulation-steps", "--early-stopping-patience",
                "--max-train-samples", "--gradient-checkpointing"):
        assert opt in out, opt
    for cmd in ("evaluate", "predict", "export", "info"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--adapter" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input
def _bad_cases(tiny, tmp, trained_dir):
    corrupt = tmp / "corrupt"
    if trained_dir is not None:
        shutil.copytree(trained_dir, corrupt, ignore=shutil.ignore_patterns("checkpoints"))
        data = (corrupt / "adapter_model.safetensors").read_bytes()
        (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_recipe = tmp / "bad.json"
    bad_recipe.write_text('{"task": "cb", "promt-length": 3}')
    out = str(tmp / "o")
    cases = {
        "unknown task": (["train", "--task", "nosuch", "--output-dir", out], "unknown task 'nosuch'"),
        "unknown method": (["train", "--task", "cb", "--method", "magic"], "invalid choice: 'magic'"),
        "missing data dir": (["train", "--task", "cb", "--data-dir", tmp / "nodata", "--output-dir", out],
                             "data directory not found"),
        "prompt length 0": (["train", "--task", "cb", "--prompt-length", "0", "--output-dir", out],
                            "prompt_length: must be a positive integer"),
        "negative lr": (["train", "--task", "cb", "--lr", "-1", "--output-dir", out], "lr: must be a positive"),
        "missing adapter": (["evaluate", "--adapter", tmp / "noadapter"], "adapter directory not found"),
        "bad recipe key": (["train", "--config", bad_recipe], "unknown option 'promt-length'"),
        "missing recipe": (["train", "--config", tmp / "none.json"], "recipe file not found"),
        "missing model": (["train", "--task", "cb", "--model", tmp / "nomodel", "--data-dir", DATA,
                           "--output-dir", out], "model path not found"),
        "missing train file": (["train", "--train-file", tmp / "none.csv", "--output-dir", out], "file not found"),
    }
    if trained_dir is not None:
        cases["other backbone"] = (["evaluate", "--adapter", trained_dir, "--model", tiny["bert48"]],
                                   "hidden_size=32")
        cases["corrupted adapter"] = (["evaluate", "--adapter", corrupt], "truncated or corrupted")
        cases["missing input"] = (["predict", "--adapter", trained_dir, "--input", tmp / "none.jsonl",
                                   "--output", tmp / "p.jsonl"], "input file not found")
    return cases


@needs_data
def test_bad_input_exits_2_with_one_line(tiny, trained, tmp_path, capsys):
    for name, (args, message) in _bad_cases(tiny, tmp_path, trained).items():
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code
        out, err = capsys.readouterr()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1, (name, err)
        assert message in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eptkit.cli", "train", "--task", "cb", "--prompt-length", "0",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["eptkit train: error: prompt_length: must be a positive integer, got 0"]


# ---------------------------------------------------------------------------------------------- processes
@needs_data
def test_two_processes_with_accelerate_launch(tiny, tmp_path):
    """DDP over 2 CPU processes (gloo). `accelerate launch --cpu` starts ONE process in accelerate 1.x
    unless mpirun is configured, so the 2 processes come from its torchrun-based launcher."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "eptkit.cli", *small_train_args(tiny["bert"], out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 4 and results["test"] is not None
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert {"rng-0.pt", "rng-1.pt", "trainable.safetensors", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}


ZERO3_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "zero3.yaml"


def test_the_zero3_recipe_is_an_accelerate_deepspeed_config():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ZERO3_RECIPE))
    assert config.distributed_type == "DEEPSPEED" and config.mixed_precision == "bf16"
    ds = config.deepspeed_config
    assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] is True
    assert ds["offload_param_device"] == ds["offload_optimizer_device"] == "none"


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


def _zero_launch(tmp_path, num_processes: int, *args, stage: int = 3) -> list[str]:
    """`accelerate launch` with the zero3 recipe's settings on the CPU (DeepSpeed's CPU accelerator, gloo;
    run with ZERO3_ENV) at ZeRO `stage`, fp32 (bf16 is for GPUs); at stage 3 every parameter partitioned
    (persistence threshold 0: in a tiny model the prompt and head would otherwise stay whole, as small
    tensors do)."""
    import yaml

    recipe = yaml.safe_load(ZERO3_RECIPE.read_text())
    ds = recipe["deepspeed_config"]
    zero = {"stage": stage, "offload_optimizer": {"device": ds["offload_optimizer_device"]}}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, offload_param={"device": ds["offload_param_device"]})
    (tmp_path / f"ds{stage}.json").write_text(json.dumps({
        "zero_optimization": zero, "gradient_clipping": ds["gradient_clipping"], "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": False}}))
    recipe.update(deepspeed_config={"deepspeed_config_file": str(tmp_path / f"ds{stage}.json"),
                                    "zero3_init_flag": stage == 3 and ds["zero3_init_flag"]},
                  num_processes=num_processes)
    recipe.pop("mixed_precision")  # the DeepSpeed file decides it
    config = tmp_path / f"zero{stage}-{num_processes}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", "0", *map(str, args)]


ZERO3_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


@needs_data
@needs_deepspeed
def test_zero3_with_accelerate_launch_trains_what_one_process_trains(tiny, tmp_path):
    """DeepSpeed ZeRO-3 in one process through `accelerate launch`: the word embeddings, prompt and head
    are placeholders, and the saved adapter must still equal the one of a plain run."""
    args = small_train_args(tiny["bert"], tmp_path / "zero3", "pt", steps=3) + ["--gradient-checkpointing"]
    proc = subprocess.run(_zero_launch(tmp_path, 1, "-m", "eptkit.cli", *args), capture_output=True, text=True,
                          timeout=600, env=ZERO3_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([str(a) for a in small_train_args(tiny["bert"], tmp_path / "plain", "pt", steps=3)]) == 0
    zero3 = load_file(str(tmp_path / "zero3" / "adapter_model.safetensors"))
    for name, tensor in load_file(str(tmp_path / "plain" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(zero3[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


ZERO3_LAYOUT = r"""
import json, sys
from eptkit.backbones import load_backbone
from eptkit.config import TrainConfig
from eptkit.train import make_accelerator

accelerator = make_accelerator(TrainConfig())  # what `eptkit train` does before it loads the backbone
backbone, _ = load_backbone(sys.argv[1], "classification", num_labels=3)
layout = {name: [list(p.shape), list(getattr(p, "ds_shape", [])), getattr(p, "ds_tensor", p).numel()]
          for name, p in backbone.named_parameters()}
print("RESULT " + json.dumps({"rank": accelerator.process_index, "n": accelerator.num_processes, "layout": layout}))
"""


@needs_deepspeed
def test_zero3_loads_the_backbone_partitioned(tiny, tmp_path):
    """zero3_init_flag: with the Accelerator made first, from_pretrained loads every weight as a ZeRO-3
    partition, in both of 2 processes: a placeholder of no elements, the whole shape in ds_shape, half of
    the elements (padded up) held locally. Nothing is ever whole in a process."""
    import math

    from eptkit.backbones import load_backbone

    script = tmp_path / "layout.py"
    script.write_text(ZERO3_LAYOUT)
    proc = subprocess.run(_zero_launch(tmp_path, 2, script, tiny["bert"]), capture_output=True, text=True,
                          timeout=600, env=ZERO3_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert sorted((r["rank"], r["n"]) for r in reports) == [(0, 2), (1, 2)]
    plain, _ = load_backbone(tiny["bert"], "classification", num_labels=3)  # loaded whole, in this process
    for report in reports:
        assert set(report["layout"]) == {name for name, _ in plain.named_parameters()}
        for name, p in plain.named_parameters():
            placeholder, whole, held = report["layout"][name]
            assert placeholder == [0] and whole == list(p.shape), name
            assert held == math.ceil(p.numel() / 2), name


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_two(tiny, tmp_path_factory, request):
    """An uninterrupted 2-process ZeRO run (stage 2: optimizer state and gradients partitioned; stage 3: the
    weights too) of PT, 4 steps, checkpoints at 2 and 4, on the tiny BERT without dropout (each process
    draws its own dropout masks, so only then does it equal a one-process run)."""
    if importlib.util.find_spec("deepspeed") is None or not (DATA / "superglue" / "CB" / "train.jsonl").is_file():
        pytest.skip("needs deepspeed and the data folder")
    stage = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}_two")
    model = root / "bert"
    shutil.copytree(tiny["bert"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                    "attention_probs_dropout_prob": 0.0}))
    args = small_train_args(str(model), root / "a", "pt", steps=4) + ["--gradient-checkpointing"]
    proc = subprocess.run(_zero_launch(root, 2, "-m", "eptkit.cli", *args, stage=stage), capture_output=True,
                          text=True, timeout=600, env=ZERO3_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"stage": stage, "root": root, "model": str(model), "out": root / "a", "args": args,
            "stderr": proc.stderr}


def test_zero_two_processes_train_what_one_process_trains(zero_two, tmp_path):
    """2 processes of 4 rows train the adapter of one process of 8. Under ZeRO-3 `eptkit train` loads the
    backbone partitioned (it says so: half of the weights in the main process); under ZeRO-2 whole."""
    import re

    said = re.search(r"partitioned over 2 processes \(DeepSpeed ZeRO-3\): this process holds ([\d,]+) of its "
                     r"([\d,]+) weights", zero_two["stderr"])
    if zero_two["stage"] == 3:
        assert said, zero_two["stderr"][-3000:]
        held, total = (int(g.replace(",", "")) for g in said.groups())
        assert total / 2 <= held <= total / 2 + 100  # each weight's half, padded up to whole elements
    else:
        assert not said
    plain = small_train_args(zero_two["model"], tmp_path / "plain", "pt", steps=4)
    plain[plain.index("--batch-size") + 1] = "8"
    assert main([str(a) for a in plain]) == 0
    zero = load_file(str(zero_two["out"] / "adapter_model.safetensors"))
    for name, tensor in load_file(str(tmp_path / "plain" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(zero[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_zero_resume_ends_where_the_uninterrupted_run_ends(zero_two, tmp_path):
    """A 2-process ZeRO run stopped after its step-2 checkpoint (the uninterrupted run's folder as it was
    then) and resumed: every process reloads its part of the optimizer (moments and fp32 master weights,
    optimizer-R.pt), so steps 3 and 4 are the uninterrupted run's."""
    a, b = zero_two["out"], tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-000004")
    (b / "results.json").unlink()
    args = zero_two["args"]
    args = [*args[:args.index("--output-dir") + 1], str(b), *args[args.index("--output-dir") + 2:], "--resume"]
    proc = subprocess.run(_zero_launch(tmp_path, 2, "-m", "eptkit.cli", *args, stage=zero_two["stage"]),
                          capture_output=True, text=True, timeout=600, env=ZERO3_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert {"optimizer-0.pt", "optimizer-1.pt"} <= {p.name for p in (a / "checkpoints" / "step-000002").iterdir()}
    for name in ("checkpoints/step-000004/trainable.safetensors", "adapter_model.safetensors"):
        ta, tb = (load_file(str(d / name)) for d in (a, b))
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(tb[key], ta[key], rtol=1e-6, atol=0, msg=f"{name} {key}")
    losses = [[json.loads(ln)["loss"] for ln in (d / "log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-6)


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.json")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_builds_valid_configs(recipe):
    from argparse import Namespace

    from eptkit.cli import build_configs, resolve_train_options
    from eptkit.tasks.registry import get_task

    options = resolve_train_options(Namespace(config=str(recipe)))
    method_config, train_config = build_configs(options)
    assert get_task(options["task"]).name == recipe.stem
    assert method_config.method == options["method"] and train_config.max_steps > 0

"""Every run reloads: evaluate, predict, info and export on the output directory of every method, with the
scores the run reported; evaluate on a user's labelled file; the rough edges a new user met (issue 10)."""

import json
import os
import stat

import pytest

from conftest import data_dir
from eptkit.cli import main
from test_cli import run_cli, small_train_args, tiny  # noqa: F401  (the tiny fixture)
from test_train import save_tiny_backbones  # noqa: F401

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "superglue" / "CB" / "train.jsonl").is_file(),
                                reason=f"data folder {DATA} not found (set EPTKIT_DATA_DIR)")
CB_ROWS = [{"premise": "It rained all day.", "hypothesis": "The ground is wet.", "label": "entailment"},
           {"premise": "The shop is closed.", "hypothesis": "The shop is open.", "label": 1},
           {"premise": "She may come.", "hypothesis": "She will sing.", "label": "neutral"}]


@needs_data
@pytest.mark.parametrize("method,backbone", [("pt", "bert"), ("dept", "bert"), ("lora", "bert"), ("ptuning", "bert"),
                                             ("full", "bert"), ("head", "bert"), ("prefix", "gpt2")])
def test_every_method_reloads_with_the_scores_it_reported(tiny, tmp_path, capsys, method, backbone):
    run = tmp_path / "run"
    code, out, err = run_cli(small_train_args(tiny[backbone], run, method, steps=2), capsys)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    code, out, err = run_cli(["evaluate", "--adapter", run], capsys)  # the run's own test subset by default
    assert code == 0, err
    scored = json.loads(out)
    assert scored["n"] == results["num_examples"]["test"]
    assert {k: scored[k] for k in results["test"]} == results["test"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in CB_ROWS))
    code, out, err = run_cli(["predict", "--adapter", run, "--input", rows, "--output", tmp_path / "p.jsonl"], capsys)
    assert code == 0, err
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(p in ("entailment", "contradiction", "neutral", None) for p in preds)
    # evaluate --test-file: the accuracy of those same predictions, counted here
    code, out, err = run_cli(["evaluate", "--adapter", run, "--test-file", rows], capsys)
    assert code == 0, err
    truth = ["entailment", "contradiction", "neutral"]
    expected = 100.0 * sum(p == t for p, t in zip(preds, truth)) / 3
    assert json.loads(out)["accuracy"] == pytest.approx(expected) and json.loads(out)["n"] == 3
    code, out, err = run_cli(["info", "--adapter", run, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["method"] == method
    code, out, err = run_cli(["export", "--adapter", run, "--format", "peft", "--output", tmp_path / "x"], capsys)
    if method in ("lora", "ptuning", "prefix"):  # PEFT's files already: copied, and they load again
        assert code == 0, err
        code, out, err = run_cli(["evaluate", "--adapter", tmp_path / "x"], capsys)
        assert code == 0, err
        assert {k: json.loads(out)[k] for k in results["test"]} == results["test"]
    else:
        assert code == 2 and "--pooling backbone" in err if method == "pt" else code == 2


@needs_data
def test_results_are_rounded_count_truncation_and_files_are_world_readable(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(small_train_args(tiny["bert"], run, "pt", steps=2) + ["--max-length", "16"], capsys)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())

    def floats(x):
        if isinstance(x, float):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from floats(v)
        elif isinstance(x, list):
            for v in x:
                yield from floats(v)

    assert all(round(x, 6) == x for x in floats(results))
    assert all(round(x, 6) == x for x in floats(json.loads(out.strip().splitlines()[-1])))
    # CB premises are long: with 16 tokens nearly every row is cut, and every split is counted
    assert set(results["truncated"]) == {"train", "validation", "test"}
    assert 0 < results["truncated"]["train"] <= results["num_examples"]["train"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_model.safetensors", "adapter_config.json", "results.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name


@needs_data
@pytest.mark.parametrize("method", ["pt", "ptuning"])
def test_pt_positions_count_max_length(tiny, tmp_path, capsys, method):
    # the tiny BERT has 256 positions; P-tuning's virtual tokens (--prompt-length) take them as PT's prompt does
    args = small_train_args(tiny["bert"], tmp_path / "r", method, steps=1) + ["--prompt-length", "230"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and "230 + 64 = 294" in err and "max_position_embeddings=256" in err


@needs_data
def test_resume_without_a_checkpoint_says_so(tiny, tmp_path, capsys):
    code, out, err = run_cli(small_train_args(tiny["bert"], tmp_path / "r", "pt", steps=1) + ["--resume"], capsys)
    assert code == 0 and "no checkpoint" in err and "fresh run" in err


def test_garbage_adapter_config_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_bytes(b"\x00{garbage")
    for cmd in (["evaluate", "--adapter", run, "--task", "cb"],
                ["predict", "--adapter", run, "--task", "cb", "--input", __file__, "--output", tmp_path / "o"],
                ["export", "--adapter", run, "--format", "compiled", "--output", tmp_path / "e"],
                ["info", "--adapter", run]):
        code, out, err = run_cli(cmd, capsys)
        assert code == 2 and "adapter_config.json" in err and "Traceback" not in err, (cmd, err)


def test_wrong_text_columns_name_the_columns_the_file_has(tiny, tmp_path, capsys):
    path = tmp_path / "mine.csv"
    path.write_text("review,stars\ngood film,5\nbad film,1\n" * 5)
    code, out, err = run_cli(["train", "--train-file", path, "--text-columns", "text", "--label-column", "stars",
                              "--model", tiny["bert"], "--output-dir", tmp_path / "r", "--method", "pt"], capsys)
    assert code == 2 and "'review'" in err and "'stars'" in err, err


def test_no_data_dir_offline_suggests_data_dir(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EPTKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    code, out, err = run_cli(["train", "--task", "cb", "--model", tiny["bert"], "--output-dir", tmp_path / "r"], capsys)
    assert code == 2 and "--data-dir" in err, err


def test_help_shows_defaults_and_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.08)" in out and "(default: 100 for pt, 60 for dept, 60 for ept)" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(m in out for m in ("ptuning", "prefix", "lora", "full", "head"))


def test_info_task_names_the_fields(capsys):
    code, out, err = run_cli(["info", "--task", "wic", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["text_fields"] == ["word", "sentence1", "sentence2"] and info["labels"] == ["False", "True"]

"""Smoke test of the speed harness (benchmarks/speed.py): structure of its output, never timing values."""

import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("speed")


def test_run_speed_benchmark_structure(speed):
    result = speed.run_speed_benchmark("tiny-bert", warmup=1, repeats=1, infer_warmup=0, infer_repeats=1, threads=1)
    assert result["schema"] == speed.SCHEMA
    assert set(result["train"]) == set(speed.TRAIN_METHODS)
    assert set(result["inference"]) == set(speed.INFER_METHODS)
    for entry in result["train"].values():
        assert len(entry["times_s"]) == 1 and len(entry["warmup_times_s"]) == 1
        assert set(entry["parts_median_s"]) == {"forward", "backward", "optimizer"}
        assert entry["trainable_params"] > 0
        assert entry["memory"]["saved_activation_bytes"] > 0
    # Prompt methods train a prompt and the head only; full fine-tuning trains everything.
    assert result["train"]["pt"]["trainable_params"] == result["train"]["peft_pt"]["trainable_params"]
    assert result["train"]["full"]["trainable_params"] > result["train"]["ept"]["trainable_params"]
    for entry in result["inference"].values():
        assert len(entry["times_s"]) == 1 and entry["median_s"] > 0
    targets = {"ept_vs_pt", "ept_vs_dept", "pt_vs_peft_pt", "compiled_ept_vs_pt_short_inference"}
    assert set(result["targets"]) == targets
    for name in targets:
        ratio = result["ratios"][name]
        assert ratio["ratio_of_medians"] > 0 and isinstance(ratio["pass"], bool)
    assert result["ratios"]["lora_vs_pt"]["target_max"] is None
    assert result["machine"]["torch_threads"] == 1
    assert result["setting"]["batch_size"] == speed.DEFAULTS["tiny-bert"]["batch_size"]


def test_main_writes_json_and_markdown(speed, tmp_path):
    argv = ["--model", "tiny-t5", "--warmup", "0", "--repeats", "1", "--threads", "1", "--quiet",
            "--train-methods", "pt,dept,ept,peft_pt", "--infer-methods", "ept_compiled,pt_short", "--no-memory",
            "--out-dir", str(tmp_path)]
    assert speed.main(argv) == 0
    data = json.loads((tmp_path / "speed_tiny-t5_cpu.json").read_text())
    assert set(data["train"]) == {"pt", "dept", "ept", "peft_pt"}
    assert "memory" not in data["train"]["pt"]
    # Same trainable parameters as eptkit's PT: PEFT's prompt goes to the encoder only here.
    assert data["train"]["pt"]["trainable_params"] == data["train"]["peft_pt"]["trainable_params"]
    assert set(data["ratios"]) >= {"ept_vs_pt", "ept_vs_dept", "pt_vs_peft_pt", "compiled_ept_vs_pt_short_inference"}
    assert "lora_vs_pt" not in data["ratios"]  # methods left out leave their ratios out
    assert data["command"].startswith("python benchmarks/speed.py")
    markdown = (tmp_path / "speed_tiny-t5_cpu.md").read_text()
    assert "## Ratios" in markdown and "PEFT PT (l=100)" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_rejects_unknown_method(speed):
    with pytest.raises(ValueError, match="unknown method"):
        speed.run_speed_benchmark("tiny-bert", train_methods=["pt", "nope"], repeats=1)

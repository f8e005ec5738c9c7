"""benchmarks/memory.py on its tiny preset: real torchrun launches (DDP and FSDP over 2 gloo processes,
with and without checkpointing), checked against sizes computed by hand from the model's parameters."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory  # noqa: E402


@pytest.fixture(scope="module")
def result():
    # PT only and 2 layouts: 4 launches of 2 processes keep this near a minute on a loaded 2-core machine.
    return memory.run("tiny", methods=("pt",), layouts=("ddp", "fsdp"), seq_length=64, steps=1, log=lambda s: None)


def test_every_row_and_ratio(result):
    got = [(r["method"], r["layout"], r["checkpointing"]) for r in result["rows"]]
    assert got == [("pt", l, c) for l in ("ddp", "fsdp") for c in (False, True)]
    assert all(r["processes"] == 2 and r["rows_per_process"] == 1 and r["step_s"] > 0 for r in result["rows"])
    names = {q["ratio"] for q in result["ratios"]}
    assert {"parameters FSDP/DDP", "step time FSDP/DDP", "activations ckpt/plain, ddp",
            "activations ckpt/plain, fsdp", "step time ckpt/plain, fsdp"} <= names
    text = memory.to_markdown({**result, "command": "x"})
    assert text.count("| pt | DDP x 2 |") == 2 and text.count("| pt | FSDP x 2 |") == 2
    assert memory.to_csv(result["rows"]).count("\n") == 5


def test_fsdp_holds_half_of_the_parameters(result):
    # Hand computation: FSDP2 cuts every parameter along dim 0 like torch.chunk (rank 0 gets
    # ceil(n0 / 2) rows, rank 1 the rest); the tiny vocabulary (257) and the 2-label head do not split evenly.
    params = list(memory.build_model("tiny", "pt", 64).parameters())
    whole = sum(p.numel() * 4 for p in params)
    rank0 = sum(math.ceil(p.shape[0] / 2) * (p.numel() // p.shape[0]) * 4 for p in params)
    remainder = rank0 - whole / 2
    assert 0 < remainder < 0.01 * whole
    rows = {(r["layout"], r["checkpointing"]): r for r in result["rows"]}
    for ck in (False, True):
        assert rows["ddp", ck]["params_bytes"] == [whole, whole]
        assert rows["fsdp", ck]["params_bytes"] == [rank0, whole - rank0]
    ratio = next(q for q in result["ratios"] if q["ratio"] == "parameters FSDP/DDP")
    assert ratio["value"] == pytest.approx(rank0 / whole) and ratio["pass"]


def test_checkpointing_keeps_fewer_activations(result):
    rows = {(r["layout"], r["checkpointing"]): r for r in result["rows"]}
    for layout in ("ddp", "fsdp"):
        plain, ckpt = rows[layout, False]["activation_bytes"], rows[layout, True]["activation_bytes"]
        assert 0 < ckpt[0] < 0.5 * plain[0]
    # FSDP's gathered weights are not counted as activations: the same rows keep the same activations.
    assert rows["fsdp", False]["activation_bytes"] == rows["ddp", False]["activation_bytes"]


def test_bad_arguments_name_the_flag():
    with pytest.raises(ValueError, match="--shape"):
        memory.run("huge")
    with pytest.raises(ValueError, match="--layouts"):
        memory.run("tiny", layouts=("zero3",))

"""Smoke test of benchmarks/decoder_speed.py: the structure of its output, never timing values."""

import json

from conftest import load_benchmark


def test_decoder_speed_writes_every_method_and_ratio(tmp_path):
    bench = load_benchmark("decoder_speed")
    argv = ["--shape", "tiny", "--batch-size", "2", "--source-length", "12", "--target-length", "4",
            "--pt-length", "5", "--short-length", "3", "--rank", "2", "--warmup", "0", "--repeats", "1",
            "--threads", "1", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "decoder_speed_tiny_cpu.json").read_text())
    assert set(data["train"]) == set(data["forward"]) == set(bench.METHODS)
    # eptkit's PT trains exactly PEFT's parameters (the prompt); the shared prefix changes no parameter.
    assert data["train"]["pt"]["trainable_params"] == data["train"]["peft_pt"]["trainable_params"] == 5 * 32
    assert set(data["ratios"]) == {r[0] for r in bench.RATIOS}
    assert isinstance(data["ratios"]["pt_vs_peft_pt"]["pass"], bool)
    assert "## Ratios" in (tmp_path / "decoder_speed_tiny_cpu.md").read_text()

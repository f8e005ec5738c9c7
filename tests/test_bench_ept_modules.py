"""The EPT module diagnostic (benchmarks/ept_modules.py) on real `eptkit train` runs of a tiny BERT.

Its claim to rebuild a run's initial adapter is checked against the CLI itself: after a run whose
learning rates are ~0 the measured drift must be ~0, and a run with a high module rate must show
fusion, projection and gate moving.
"""

import pytest

from conftest import load_benchmark
from eptkit.cli import main
from test_cli import needs_data, small_train_args
from test_train import save_tiny_backbones


@pytest.fixture(scope="module")
def diagnostic():
    return load_benchmark("ept_modules")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_backbones(tmp_path_factory.mktemp("tiny_diag"))["bert"]


def _train(bert, out, *rates):
    args = small_train_args(bert, out, "ept", steps=3) + ["--num-subspaces", "2", "--subspace-rank", "2", *rates]
    assert main(args) == 0


@needs_data
def test_a_run_that_did_not_move_measures_zero(diagnostic, bert, tmp_path):
    _train(bert, tmp_path, "--lr", "1e-12", "--lr-low-rank", "1e-12", "--lr-ept", "1e-12")
    shares = diagnostic.module_shares(tmp_path)
    assert shares["prompt_drift"] < 1e-8  # the rebuilt initial prompt is the run's own
    assert shares["fusion"] < 1e-8 and shares["projection"] < 1e-8 and shares["gate_spread"] < 1e-8


@needs_data
def test_a_high_module_rate_moves_every_module(diagnostic, bert, tmp_path):
    _train(bert, tmp_path, "--lr", "1e-1", "--lr-ept", "1e-1")
    shares = diagnostic.module_shares(tmp_path)
    assert shares["prompt_drift"] > 1e-3
    assert shares["fusion"] > 1e-4 and shares["projection"] > 1e-4 and shares["gate_spread"] > 1e-4


def test_a_run_of_another_method_is_refused(diagnostic, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"method": "dept"}')
    with pytest.raises(SystemExit, match="not an EPT run"):
        diagnostic.module_shares(tmp_path)

"""What the accuracy suite runs (benchmarks/accuracy.py): tasks, methods and their options, the learning-rate
grids and variants, the budget a row was run at, and the CSV rows themselves; the selection of rates from
those rows is here too, since the runner and the report both read it."""

from __future__ import annotations

import csv
import os
import shlex
import statistics
from pathlib import Path

from eptkit.config import DEFAULT_INIT_TEXT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("rte", "mrpc", "cb", "cola", "stsb", "wic", "sst2")
# Learning rates are selected on three tasks' validation splits: SST-2 (single sentences), MRPC
# (paraphrase pairs) and STS-B (regression), so no one task's quirks pick the recipe for all.
SELECT_TASKS = ("sst2", "mrpc", "stsb")
MAIN_METHODS = ("head", "pt", "dept", "ept", "lora", "full")
# PEFT's P-tuning, an extra row toward the paper's comparison methods. PEFT's prefix tuning does not
# apply to the bundled BERT-style classifier (transformers 5 encoders take no past_key_values), so it
# has no row here; `eptkit train --method prefix` runs it on T5 and decoder-only backbones.
EXTRA_METHODS = ("ptuning",)
ABLATIONS = ("ept_no_fusion", "ept_no_projection", "ept_n1", "ept_n2", "ept_n8")
ABLATION_TASKS = SELECT_TASKS
SEEDS = (0, 1, 2)
# steps, eval_steps and batch_size are the run's budget: a row is only ever reused, resumed or selected
# from at the budget it was trained with.
COLUMNS = ("task", "method", "seed", "steps", "eval_steps", "batch_size", "trainable_params", "train_seconds",
           "metric", "validation", "test", "lr", "command")
BUDGET = ("steps", "eval_steps", "batch_size")

# Shared budget: the same steps, batch, text length and evaluation schedule for every method.
# PT (l=100) and DePT/EPT (m=60, r=30) have the same prompt budget at max_length=128 on a 384-wide
# backbone: 100*384 = 60*384 + 30*(128+384).
# Padding is dynamic, so --max-length (for DePT/EPT also their offset_length) only bounds the offset's
# rows: short-text tasks do not pay for it.
COMMON = ["--max-length", "128", "--save-steps", "0", "--max-eval-samples", "500", "--early-stopping-patience", "0"]
METHOD_ARGS = {
    "head": ["--method", "head"],
    "pt": ["--method", "pt", "--prompt-length", "100"],
    "dept": ["--method", "dept", "--prompt-length", "60", "--rank", "30"],
    "ept": ["--method", "ept", "--prompt-length", "60", "--rank", "30"],
    "lora": ["--method", "lora", "--lora-r", "8"],
    "full": ["--method", "full"],
    "ptuning": ["--method", "ptuning", "--prompt-length", "20"],
    "ept_no_fusion": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--no-fusion"],
    "ept_no_projection": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "0"],
    "ept_n1": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "1"],
    "ept_n2": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "2"],
    "ept_n8": ["--method", "ept", "--prompt-length", "60", "--rank", "30", "--num-subspaces", "8"],
}
# Learning-rate grids. Each entry is one candidate: option -> value. The prompt and low-rank rates are
# in eptkit's default unit, fractions of the backbone's word-embedding RMS (0.056 on MiniLM, so 0.02 is
# an absolute 1.1e-3): the grids of an earlier session (absolute 1e-2 and 1e-1, kept as history in
# results/history/) threw the prompt far off the vocabulary and the prompt methods learned nothing on
# STS-B. For PT, DePT and EPT the grid sweeps the prompt's rate over 16x (the lr_sweep.png plot);
# DePT and EPT keep the low-rank rate at a tenth of it. The head, LoRA and full fine-tuning keep the
# rates an earlier SST-2 selection chose (head 1e-2, LoRA 2e-3, full 1e-4), run once per selection task.
HEAD_LR = {"--lr-head": 1e-2}
PROMPT_RATES = (5e-3, 2e-2, 8e-2)
# A generic instruction (not tuned per task) for text initialisation.
INIT_TEXT = DEFAULT_INIT_TEXT  # eptkit's default start: the suite selected it
TEXT_INIT = {"--init": "text", "--init-text": INIT_TEXT}
# The start that benchmarks/fresh_prompt.py found to leave the frozen features intact (an instruction,
# with the text at the positions it has without a prompt), swept over its own rates: a recipe enters
# the selection as a whole, so the rate it is chosen at is the one it is best at. Its rates go up from
# the best of the first grid (0.08, its upper edge; 0.02 and 0.005 trailed it for all three methods).
INSTRUCTION = {**TEXT_INIT, "--text-positions": "own"}
INSTRUCTION_RATES = (8e-2, 3e-1)
# The first grid's start, PEFT's: sampled vocabulary rows with the text after the prompt (eptkit's
# defaults until the selection below chose the instruction; named, so its commands still re-run).
SAMPLED = {"--init": "sample_vocab", "--text-positions": "after_prompt"}
LR_GRID = {
    "head": [dict(HEAD_LR)],
    "pt": [{"--lr": r, **HEAD_LR, **SAMPLED} for r in PROMPT_RATES]
    + [{"--lr": r, **HEAD_LR, **INSTRUCTION} for r in INSTRUCTION_RATES],
    "dept": [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **SAMPLED} for r in PROMPT_RATES]
    + [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **INSTRUCTION} for r in INSTRUCTION_RATES],
    "ept": [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **SAMPLED} for r in PROMPT_RATES]
    + [{"--lr": r, "--lr-low-rank": r / 10, **HEAD_LR, **INSTRUCTION} for r in INSTRUCTION_RATES],
    "lora": [{"--lr-lora": 2e-3, **HEAD_LR}],
    "full": [{"--lr-full": 1e-4}],
    "ptuning": [{"--lr": 2e-2, **HEAD_LR}, {"--lr": 2e-1, **HEAD_LR}],
}
# tune: EPT's own modules (fusion, projection, gate), changed from the selected EPT recipe. By default
# they train at the low-rank rate's number (an absolute rate) and start so that EPT computes exactly
# DePT; the variants: a faster and a slower module rate, and a projection active from the first step.
# Each variant: (method, options changed from its selected recipe, tasks or None for SELECT_TASKS).
EPT_TUNING = [
    ("ept", {"--module-init": "random"}, None),
    ("ept", {"--lr-ept": 1e-3}, None),
    ("ept", {"--lr-ept": 3e-2}, None),
]
# recipe: the choices other than the rate, each changed alone from the selected recipe.
RECIPE_VARIANTS = [
    # Each half of the instruction start alone (benchmarks/fresh_prompt.py measured both halves on
    # untrained prompts), then the optimiser and the regression targets.
    ("ept", {"--text-positions": "after_prompt"}, None),
    ("ept", {"--init": "sample_vocab"}, None),
    ("ept", {"--optimizer": "adafactor", "--lr": 0.3, "--lr-low-rank": 0.03}, None),
    ("ept", {"--regression-targets": "raw"}, ("stsb",)),
]


def fmt_value(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def quoted_value(value) -> str:
    return shlex.quote(fmt_value(value))


def parse_value(text: str):
    """An option's value as written on a command line: an int, a float, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def lr_key(lr: dict) -> str:
    """A candidate's options as one string ("--lr 0.02 --lr-head 0.01"): the CSV's `lr` column."""
    return " ".join(f"{k} {quoted_value(v)}" for k, v in sorted(lr.items()))


def parse_lr_key(key: str) -> dict:
    parts = shlex.split(key)
    return {parts[i]: parse_value(parts[i + 1]) for i in range(0, len(parts), 2)}


def budget_of(row: dict) -> tuple[str, str, str]:
    """(steps, eval_steps, batch_size) of a CSV row, as strings ('' where an old row lacks one)."""
    return tuple(str(row.get(k, "") or "") for k in BUDGET)


def budget_args(args) -> tuple[str, str, str]:
    return (str(args.steps), str(args.eval_steps), str(args.batch_size))


def base_method(method: str) -> str:
    return "ept" if method.startswith("ept") else method


# ---------------------------------------------------------------------------- CSV
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append one finished cell; the row is flushed to disk before the next run starts."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def selected_lrs(select_csv: Path, budget: tuple[str, str, str] | None = None) -> dict[str, dict]:
    """Per method, the grid entry with the best mean validation score over the selection tasks, among
    rows run at `budget` (every budget when None); a candidate must have run on every task its method has."""
    rows = [r for r in read_rows(select_csv) if budget is None or budget_of(r) == budget]
    best = {}
    for method, grid in LR_GRID.items():
        candidates = {lr_key(lr) for lr in grid}  # rows of earlier grids stay in the CSV as history
        scores = {}
        for r in rows:
            if r["method"] == method and r["lr"] in candidates:
                scores.setdefault(r["lr"], []).append(float(r["validation"]))
        complete = {k: v for k, v in scores.items() if len(v) == len({r["task"] for r in rows if r["method"] == method})}
        if complete:
            best[method] = parse_lr_key(max(complete, key=lambda k: statistics.mean(complete[k])))
    return best

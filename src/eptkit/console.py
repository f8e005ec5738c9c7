"""What the command line prints and how it fails: progress lines, one-line errors, a closed pipe.

Kept apart from `eptkit.cli` (its table of commands) and free of torch/transformers imports at the top,
like the CLI itself: `eptkit --help` imports neither.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROG = "eptkit"


class UsageError(ValueError):
    """Bad command-line input; printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def say(text: str) -> None:
    """A progress line on stderr (stdout carries the JSON summary), from the main process only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG} train: {text}", file=sys.stderr, flush=True)


def check_output_dir(config) -> None:
    """An earlier run's checkpoints in output_dir need --resume or --overwrite: said before any data is
    read (the library says the same, in its own terms, when the run starts)."""
    from .checkpoint import checkpoint_dirs

    if checkpoint_dirs(Path(config.output_dir)) and not (config.resume or config.overwrite):
        raise UsageError(f"{config.output_dir}: holds checkpoints of an earlier run; add --resume to continue it "
                         "or --overwrite to start again")


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def summary(results: dict) -> dict:
    """The line `eptkit train` prints on stdout for each run."""
    return {"task": results["task"], "method": results["method"], "best_step": results["best_step"],
            "validation": results["validation"], "test": results["test"],
            "trainable_params": results["trainable_params"], "train_time_s": round(results["train_time_s"], 2),
            "output_dir": str(results["config"]["train"]["output_dir"])}

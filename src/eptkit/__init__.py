"""eptkit: Efficient Prompt Tuning (EPT), DePT and prompt tuning for Hugging Face transformers.

The method is documented in docs/method.md of the repository.

The names below are imported on first use (PEP 562), so that `import eptkit.cli` and commands that
need no model (`eptkit --help`, `eptkit info --task`) do not pay for importing torch and transformers.
"""

from importlib import import_module

from .version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    "PromptTuningConfig": "config", "DePTConfig": "config", "EPTConfig": "config", "TrainConfig": "config",
    "PromptedModel": "model", "get_prompted_model": "model", "save_adapter": "model", "load_adapter": "model",
    "export_peft": "model",
    "AdapterError": "adapter_files",
    "TASKS": "tasks", "TaskSpec": "tasks", "DataError": "tasks", "load_task": "tasks", "load_files": "tasks",
    "compute_metrics": "metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eptkit' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

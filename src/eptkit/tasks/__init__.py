"""Tasks, data and splits (docs/method.md, "Tasks, splits and metrics"): the 13 GLUE/SuperGLUE tasks, users' files, tokenization.

    registry.py    TaskSpec and TASKS: fields, label names/words, templates, metrics per task
    sources.py     the original splits from local files (strict parsing) or the Hub
    loading.py     the split protocol, k-shot sampling, load_task, load_files
    formatting.py  encode (tokens for classification / seq2seq / causal) and Collator (padding)
"""

from importlib import import_module

# public name -> submodule; imported on first use (PEP 562), so that reading the task registry
# (`eptkit info --task`) does not import torch and datasets.
_EXPORTS = {
    "DataError": "errors",
    "IGNORE_INDEX": "formatting", "MODEL_INPUT_KEYS": "formatting", "TASK_TYPES": "formatting", "Collator": "formatting",
    "encode": "formatting",
    "LARGE_TASKS": "loading", "SMALL_TASKS": "loading", "k_shot_indices": "loading", "load_files": "loading",
    "load_task": "loading", "permutation": "loading", "sample_k_shot": "loading", "split_protocol": "loading",
    "ANSWER_CUE": "registry", "TASKS": "registry", "TaskSpec": "registry", "get_task": "registry",
}

__all__ = ["DataError", "TaskSpec", "TASKS", "get_task", "ANSWER_CUE", "load_task", "load_files", "split_protocol",
           "sample_k_shot", "k_shot_indices", "permutation", "SMALL_TASKS", "LARGE_TASKS", "encode", "Collator", "TASK_TYPES",
           "MODEL_INPUT_KEYS", "IGNORE_INDEX"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

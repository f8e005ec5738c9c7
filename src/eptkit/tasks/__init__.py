"""Tasks, data and splits (docs/method.md, "Tasks, splits and metrics"): the 13 GLUE/SuperGLUE tasks, users' files, tokenization.

    registry.py    TaskSpec and TASKS: fields, label names/words, templates, metrics per task
    sources.py     the original splits from local files (strict parsing) or the Hub
    loading.py     the split protocol, k-shot sampling, load_task, load_files
    formatting.py  encode (tokens for classification / seq2seq / causal) and Collator (padding)
"""

from .errors import DataError
from .formatting import IGNORE_INDEX, MODEL_INPUT_KEYS, TASK_TYPES, Collator, encode
from .loading import (LARGE_TASKS, SMALL_TASKS, k_shot_indices, load_files, load_task, permutation, sample_k_shot,
                      split_protocol)
from .registry import ANSWER_CUE, TASKS, TaskSpec, get_task

__all__ = ["DataError", "TaskSpec", "TASKS", "get_task", "ANSWER_CUE", "load_task", "load_files", "split_protocol",
           "sample_k_shot", "k_shot_indices", "permutation", "SMALL_TASKS", "LARGE_TASKS", "encode", "Collator", "TASK_TYPES",
           "MODEL_INPUT_KEYS", "IGNORE_INDEX"]

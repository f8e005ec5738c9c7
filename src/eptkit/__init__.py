"""eptkit: Efficient Prompt Tuning (EPT), DePT and prompt tuning for Hugging Face transformers.

The method is documented in docs/method.md of the repository.
"""

from .adapter_files import AdapterError
from .config import DePTConfig, EPTConfig, PromptTuningConfig, TrainConfig
from .metrics import compute_metrics
from .model import PromptedModel, export_peft, get_prompted_model, load_adapter, save_adapter
from .tasks import TASKS, DataError, TaskSpec, load_files, load_task
from .version import __version__

__all__ = [
    "__version__",
    "PromptTuningConfig",
    "DePTConfig",
    "EPTConfig",
    "TrainConfig",
    "PromptedModel",
    "get_prompted_model",
    "AdapterError",
    "save_adapter",
    "load_adapter",
    "export_peft",
    "TASKS",
    "TaskSpec",
    "DataError",
    "load_task",
    "load_files",
    "compute_metrics",
]

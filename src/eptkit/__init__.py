"""eptkit: Efficient Prompt Tuning (EPT), DePT and prompt tuning for Hugging Face transformers."""

__version__ = "0.1.0"

from .config import DePTConfig, EPTConfig, PromptTuningConfig  # noqa: E402
from .model import PromptedModel, get_prompted_model  # noqa: E402
from .adapters import AdapterError, export_peft, load_adapter, save_adapter  # noqa: E402
from .metrics import compute_metrics  # noqa: E402
from .tasks import TASKS, DataError, TaskSpec, load_files, load_task  # noqa: E402

__all__ = [
    "__version__",
    "PromptTuningConfig",
    "DePTConfig",
    "EPTConfig",
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

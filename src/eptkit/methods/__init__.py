"""One module per prompt method. Each is an nn.Module whose forward() returns
(prompt [m x d], offset [offset_length x d] or None); `build_method` picks it from the method registry
(`eptkit.registry`), where a new method is one entry."""

from torch import nn

from ..config import DePTConfig, EPTConfig, PromptTuningConfig
from ..registry import get_method
from .dept import DePT
from .ept import EPT
from .prompt_tuning import PromptTuning


def build_method(config: PromptTuningConfig, word_embeddings: nn.Embedding, init_token_ids=None) -> nn.Module:
    return get_method(config.method).module_class()(config, word_embeddings, init_token_ids)


__all__ = ["build_method", "PromptTuning", "DePT", "EPT", "DePTConfig", "EPTConfig", "PromptTuningConfig"]

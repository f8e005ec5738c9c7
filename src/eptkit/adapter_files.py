"""Adapters on disk: the file formats, read and written as (config, tensors). See docs/method.md.

An eptkit adapter is a directory with
  adapter_config.json        method and hyper-parameters, backbone facts, library version, checksum
  adapter_model.safetensors  the tensors of `PromptedModel.adapter_state_dict()`
Both are written atomically (`eptkit.files`), so a crash never leaves a half-written adapter; the
config records the tensor file's SHA-256, so truncation or corruption is detected on load.
Nothing is ever unpickled: DePT's `adapter_model.bin` is read with `torch.load(weights_only=True)`.

This module knows the formats and nothing about the model: `read_adapter` turns any supported
directory (eptkit, PEFT prompt tuning, a DePT checkpoint) into an eptkit config and tensors under
eptkit's names, and `write_adapter` / `write_peft_prompt_tuning` write them. `eptkit.model` builds
and saves `PromptedModel`s on top of it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .backbones import backbone_facts, check_positions
from .config import DePTConfig, PromptTuningConfig, saved_under_new_names
from .embeddings import embedding_shape
from .registry import config_classes
from .files import atomic_save_safetensors, atomic_write_json, sha256_file
from .task_types import PEFT_TASK_TYPES, detect_task_type
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEPT_WEIGHTS_NAME = "adapter_model.bin"


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded; the message names the file and the problem."""


@dataclass
class AdapterFiles:
    """An adapter directory as read: what to build and what to load into it."""

    config: PromptTuningConfig  # the method and its hyper-parameters
    tensors: dict[str, torch.Tensor]  # under eptkit's names (`adapter_state_dict`)
    folded: bool  # tensors are the constant (prompt_embeddings, offset) of a folded adapter
    weights_path: Path  # the tensor file, for error messages


# ---------------------------------------------------------------------------- eptkit format
def write_adapter(directory, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an eptkit adapter: `config` (method config, backbone facts, task type...) and `tensors`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, {"format": "pt", "eptkit": __version__})
    atomic_write_json(directory / CONFIG_NAME, {**config, "eptkit_version": __version__, "weights_sha256": digest})
    return directory


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterError(f"{path}: checksum mismatch, the file is truncated or corrupted")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterError(f"{path}: cannot read tensors, the file is truncated or corrupted ({first})") from None


def _check_backbone(saved: dict, model: nn.Module, where: Path) -> None:
    actual = backbone_facts(model)
    keys = ["hidden_size", "vocab_size"]
    if saved.get("task_type") == "classification":
        keys.append("num_labels")
    for key in keys:
        if key in saved and saved[key] != actual[key]:
            raise AdapterError(
                f"{where}: adapter was trained on a backbone with {key}={saved[key]} "
                f"({saved.get('backbone')}), this model has {key}={actual[key]} ({actual['backbone']})"
            )


def read_adapter(directory, backbone: nn.Module) -> AdapterFiles:
    """Read an eptkit adapter, a PEFT prompt-tuning adapter or a DePT checkpoint meant for `backbone`
    (a Hugging Face model), checking that it fits that backbone."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    saved = read_json(directory / CONFIG_NAME)
    if "peft_type" in saved:
        if saved["peft_type"] == "PROMPT_TUNING":
            return _read_peft_prompt_tuning(directory, saved, backbone)
        if saved["peft_type"] == "PROMPT_TUNING_LORA":
            return _read_dept_checkpoint(directory, saved)
        raise AdapterError(f"{directory / CONFIG_NAME}: PEFT type {saved['peft_type']!r} is not a prompt-tuning adapter")
    if "method" not in saved:
        raise AdapterError(f"{directory / CONFIG_NAME}: no 'method' field; not an eptkit adapter")

    task_type = detect_task_type(backbone)
    if saved.get("task_type", task_type) != task_type:
        raise AdapterError(
            f"{directory / CONFIG_NAME}: adapter is for a {saved['task_type']} model, "
            f"{type(backbone).__name__} is a {task_type} model"
        )
    _check_backbone(saved, backbone, directory / CONFIG_NAME)
    cls = config_classes().get(saved["method"]) if isinstance(saved["method"], str) else None
    if cls is None:
        raise AdapterError(f"{directory / CONFIG_NAME}: unknown method {saved['method']!r}")
    saved = saved_under_new_names(saved)  # adapters saved when offset_length was called max_length
    fields = {f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved}
    # Adapters saved before text_positions existed put the text after the prompt.
    fields.setdefault("text_positions", "after_prompt")
    try:
        config = cls(**fields)
        check_positions(backbone, config)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{directory / CONFIG_NAME}: {e}") from None
    tensors = read_safetensors(directory / WEIGHTS_NAME, saved.get("weights_sha256"))
    folded = saved.get("compiled") is True  # the format's key for a folded adapter
    if folded:  # (prompt, offset) constants: their shapes are all that the model can check
        _check_folded(tensors, config, backbone, directory / WEIGHTS_NAME)
    return AdapterFiles(config, tensors, folded, directory / WEIGHTS_NAME)


def _check_folded(tensors: dict, config, backbone: nn.Module, where: Path) -> None:
    hidden = embedding_shape(backbone.get_input_embeddings())[1]
    expected = {"prompt_embeddings": (config.prompt_length, hidden)}
    if isinstance(config, DePTConfig):
        expected["offset"] = (config.offset_length, hidden)
    if "offset" in tensors and "offset" not in expected:
        raise AdapterError(f"{where}: a folded {config.method} adapter has no offset, but the file holds one")
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "nothing"
            raise AdapterError(f"{where}: a folded {config.method} adapter needs {name!r} of shape {shape}, "
                               f"found {found}")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected floating point")


# ---------------------------------------------------------------------------- PEFT interop
def _read_peft_prompt_tuning(directory: Path, saved: dict, backbone: nn.Module) -> AdapterFiles:
    where = directory / CONFIG_NAME
    length = saved.get("num_virtual_tokens")
    if not isinstance(length, int) or length < 1:
        raise AdapterError(f"{where}: num_virtual_tokens missing or invalid")
    hidden = embedding_shape(backbone.get_input_embeddings())[1]
    if saved.get("token_dim") not in (None, hidden):
        raise AdapterError(f"{where}: token_dim={saved['token_dim']} but this model's hidden size is {hidden}")
    state = read_safetensors(directory / WEIGHTS_NAME)
    if "prompt_embeddings" not in state:
        raise AdapterError(f"{directory / WEIGHTS_NAME}: no 'prompt_embeddings' tensor")
    # A seq2seq adapter stores prompts for encoder and decoder (num_transformer_submodules=2);
    # PEFT prepends only the first half (the encoder's), so that is what we load.
    tensors = {"prompt_embeddings": state.pop("prompt_embeddings")[:length]}
    for key, value in state.items():
        tensors[key.removeprefix("base_model.model.").removeprefix("base_model.")] = value
    # PEFT trains (sequence classification) the head pooled at the first virtual token: 'backbone'.
    config = PromptTuningConfig(prompt_length=length, pooling="backbone", text_positions="after_prompt")
    return AdapterFiles(config, tensors, False, directory / WEIGHTS_NAME)


def write_peft_prompt_tuning(directory, prompt: torch.Tensor, head: dict[str, torch.Tensor], *, task_type: str,
                             backbone: nn.Module, head_name: str | None) -> Path:
    """Write a PT prompt (l x d) and a classifier's head tensors in PEFT's prompt-tuning format
    (loadable by `PeftModel.from_pretrained`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    length, hidden = prompt.shape
    submodules = 2 if task_type == "seq2seq" else 1
    if submodules == 2:
        # PEFT's seq2seq layout holds a decoder half it never prepends; fill it with a copy.
        prompt = torch.cat([prompt, prompt], dim=0)
    tensors = {"prompt_embeddings": prompt, **{f"base_model.{k}": v for k, v in head.items()}}
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": PEFT_TASK_TYPES[task_type],
        "num_virtual_tokens": int(length),
        "token_dim": int(hidden),
        "num_transformer_submodules": submodules,
        "num_attention_heads": getattr(backbone.config, "num_attention_heads", None),
        "num_layers": getattr(backbone.config, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": backbone_facts(backbone)["backbone"],
        "inference_mode": True,
        "modules_to_save": [head_name] if head_name else None,
        "revision": None,
        "auto_mapping": None,
    }
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


# ---------------------------------------------------------------------------- DePT interop
def _read_dept_checkpoint(directory: Path, saved: dict) -> AdapterFiles:
    """A checkpoint of DePT's code: its PEFT fork's PROMPT_TUNING_LORA config and adapter_model.bin."""
    where = directory / CONFIG_NAME
    try:
        config = DePTConfig(
            prompt_length=int(saved["num_virtual_tokens"]),
            rank=int(saved["r"]),
            offset_length=int(saved["max_length"]),  # DePT's PromptTuningLoRAConfig calls it max_length
            alpha=float(saved.get("lora_alpha", 8)),
            pooling="backbone",  # DePT's own classifiers, like PEFT's, read the first virtual token
            text_positions="after_prompt",  # and put the text after the prompt
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise AdapterError(f"{where}: not a valid DePT config ({e})") from None
    path = directory / DEPT_WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)  # never runs code
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise AdapterError(f"{path}: cannot read the checkpoint weights-only ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a dict of tensors")
    tensors = {}
    for key, value in raw.items():
        name = key.split(".")[-1] if "lora_embedding_" in key else key
        tensors[name.removeprefix("base_model.")] = value
    return AdapterFiles(config, tensors, False, path)

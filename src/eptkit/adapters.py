"""Adapters on disk (SPEC 3): save, load, check; PEFT and DePT import; PEFT and compiled export.

An eptkit adapter is a directory with
  adapter_config.json        method and hyper-parameters, backbone facts, library version, checksum
  adapter_model.safetensors  the tensors of `PromptedModel.adapter_state_dict()`
Both are written to a temporary file and renamed, so a crash never leaves a half-written adapter;
the config records the tensor file's SHA-256, so truncation or corruption is detected on load.
Nothing is ever unpickled: DePT's `adapter_model.bin` is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import CONFIG_CLASSES, DePTConfig, PromptTuningConfig
from .model import CompiledPrompt, PromptedModel, _check_positions, detect_task_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEPT_WEIGHTS_NAME = "adapter_model.bin"


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded; the message names the file and the problem."""


# ---------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors atomically; return the file's SHA-256. Tensors that share storage (tied
    weights) are cloned, since safetensors refuses shared storage."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        digest = _sha256(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- backbone facts
def backbone_facts(model: nn.Module) -> dict:
    config = model.config
    emb = model.get_input_embeddings().weight
    facts = {
        "backbone": getattr(config, "_name_or_path", None) or type(model).__name__,
        "backbone_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
    }
    if hasattr(config, "num_labels"):
        facts["num_labels"] = int(config.num_labels)
    return facts


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


# ---------------------------------------------------------------------------- eptkit format
def save_adapter(model: PromptedModel, directory, *, compiled: bool | None = None) -> Path:
    """Save the active adapter of `model` to `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    compiled = model.is_compiled if compiled is None else compiled
    state = model.adapter_state_dict()
    if compiled and not model.is_compiled:
        state = model.compile().adapter_state_dict()
    digest = atomic_save_safetensors(directory / WEIGHTS_NAME, state, {"format": "pt", "eptkit": __version__})
    config = {
        **model.config.to_dict(),
        **backbone_facts(model.backbone),
        "task_type": model.task_type,
        "head_name": model.head_name,
        "compiled": bool(compiled),
        "eptkit_version": __version__,
        "weights_sha256": digest,
    }
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise AdapterError(f"{path}: checksum mismatch, the file is truncated or corrupted")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read tensors, the file is truncated or corrupted ({e})") from None


def load_adapter(model: nn.Module, directory, *, adapter_name: str = "default") -> PromptedModel:
    """Load an eptkit adapter, a PEFT prompt-tuning adapter, or a DePT checkpoint onto `model`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    saved = _read_json(directory / CONFIG_NAME)
    if "peft_type" in saved:
        if saved["peft_type"] == "PROMPT_TUNING":
            return _load_peft_prompt_tuning(model, directory, saved, adapter_name)
        if saved["peft_type"] == "PROMPT_TUNING_LORA":
            return _load_dept_checkpoint(model, directory, saved, adapter_name)
        raise AdapterError(f"{directory / CONFIG_NAME}: PEFT type {saved['peft_type']!r} is not a prompt-tuning adapter")
    if "method" not in saved:
        raise AdapterError(f"{directory / CONFIG_NAME}: no 'method' field; not an eptkit adapter")

    task_type = detect_task_type(model)
    if saved.get("task_type", task_type) != task_type:
        raise AdapterError(
            f"{directory / CONFIG_NAME}: adapter is for a {saved['task_type']} model, "
            f"{type(model).__name__} is a {task_type} model"
        )
    _check_backbone(saved, model, directory / CONFIG_NAME)
    cls = CONFIG_CLASSES.get(saved["method"])
    if cls is None:
        raise AdapterError(f"{directory / CONFIG_NAME}: unknown method {saved['method']!r}")
    fields = {f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved}
    try:
        config = cls(**fields)
        _check_positions(model, config)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{directory / CONFIG_NAME}: {e}") from None
    state = _read_safetensors(directory / WEIGHTS_NAME, saved.get("weights_sha256"))

    if saved.get("compiled"):
        offset = state.get("offset")
        method = CompiledPrompt(state["prompt_embeddings"], offset)
        prompted = PromptedModel(model, config, adapter_name=adapter_name, method=method)
    else:
        # Random init is overwritten by the load; skip text init so no tokenizer is needed.
        build_config = PromptTuningConfig.from_dict({**config.to_dict(), "init": "sample_vocab", "init_text": None})
        prompted = PromptedModel(model, build_config, adapter_name=adapter_name)
        prompted.configs[adapter_name] = config
    try:
        prompted.load_adapter_state_dict(state)
    except ValueError as e:
        raise AdapterError(f"{directory / WEIGHTS_NAME}: {e}") from None
    return prompted.eval() if saved.get("compiled") else prompted


# ---------------------------------------------------------------------------- PEFT interop
_PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}


def _load_peft_prompt_tuning(model, directory: Path, saved: dict, adapter_name: str) -> PromptedModel:
    where = directory / CONFIG_NAME
    length = saved.get("num_virtual_tokens")
    if not isinstance(length, int) or length < 1:
        raise AdapterError(f"{where}: num_virtual_tokens missing or invalid")
    if saved.get("token_dim") not in (None, model.get_input_embeddings().weight.shape[1]):
        raise AdapterError(
            f"{where}: token_dim={saved['token_dim']} but this model's hidden size is "
            f"{model.get_input_embeddings().weight.shape[1]}"
        )
    state = _read_safetensors(directory / WEIGHTS_NAME)
    if "prompt_embeddings" not in state:
        raise AdapterError(f"{directory / WEIGHTS_NAME}: no 'prompt_embeddings' tensor")
    # A seq2seq adapter stores prompts for encoder and decoder (num_transformer_submodules=2);
    # PEFT prepends only the first half (the encoder's), so that is what we load.
    prompt = state.pop("prompt_embeddings")[:length]
    # PEFT trains (sequence classification) the head pooled at the first virtual token: 'backbone'.
    prompted = PromptedModel(model, PromptTuningConfig(prompt_length=length, pooling="backbone"), adapter_name=adapter_name)
    ours = {"prompt_embeddings": prompt}
    for key, value in state.items():
        name = key.removeprefix("base_model.model.").removeprefix("base_model.")
        ours[name] = value
    try:
        prompted.load_adapter_state_dict(ours)
    except ValueError as e:
        raise AdapterError(f"{directory / WEIGHTS_NAME}: {e}") from None
    return prompted


def export_peft(model: PromptedModel, directory) -> Path:
    """Write the active PT adapter in PEFT's prompt-tuning format (loadable by `PeftModel.from_pretrained`)."""
    if model.config.method != "pt":
        raise ValueError(f"export to PEFT: only prompt tuning ('pt') has a PEFT equivalent, not {model.config.method!r}")
    if model.task_type == "classification" and model.pooling != "backbone":
        raise ValueError(
            f"export to PEFT: this adapter uses pooling={model.pooling!r}; PEFT only reproduces pooling='backbone'"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.adapter_state_dict()
    prompt = state.pop("prompt_embeddings")
    submodules = 2 if model.task_type == "seq2seq" else 1
    if submodules == 2:
        # PEFT's seq2seq layout holds a decoder half it never prepends; fill it with a copy.
        prompt = torch.cat([prompt, prompt], dim=0)
    tensors = {"prompt_embeddings": prompt, **{f"base_model.{k}": v for k, v in state.items()}}
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _PEFT_TASK_TYPES[model.task_type],
        "num_virtual_tokens": int(model.config.prompt_length),
        "token_dim": model.hidden_size,
        "num_transformer_submodules": submodules,
        "num_attention_heads": getattr(model.backbone.config, "num_attention_heads", None),
        "num_layers": getattr(model.backbone.config, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": backbone_facts(model.backbone)["backbone"],
        "inference_mode": True,
        "modules_to_save": [model.head_name] if model.head_name else None,
        "revision": None,
        "auto_mapping": None,
    }
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


# ---------------------------------------------------------------------------- DePT interop
def _load_dept_checkpoint(model, directory: Path, saved: dict, adapter_name: str) -> PromptedModel:
    """A checkpoint of DePT's code: its PEFT fork's PROMPT_TUNING_LORA config and adapter_model.bin."""
    where = directory / CONFIG_NAME
    try:
        config = DePTConfig(
            prompt_length=int(saved["num_virtual_tokens"]),
            rank=int(saved["r"]),
            max_length=int(saved["max_length"]),
            alpha=float(saved.get("lora_alpha", 8)),
            pooling="backbone",  # DePT's own classifiers, like PEFT's, read the first virtual token
        )
    except (KeyError, TypeError, ValueError) as e:
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
    state = {}
    for key, value in raw.items():
        name = key.split(".")[-1] if "lora_embedding_" in key else key
        state[name.removeprefix("base_model.")] = value
    prompted = PromptedModel(model, config, adapter_name=adapter_name)
    try:
        prompted.load_adapter_state_dict(state)
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    return prompted

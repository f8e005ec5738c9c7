"""Comparison methods (docs/method.md, "Comparison methods") behind the same contract as
`PromptedModel`: `eptkit.trainable.TrainableModel`, the members the training loop uses.

Four wrappers provide it:

- `LoRAModel`: LoRA through PEFT (`peft.get_peft_model`), r=8 on BERT's query/value (PEFT's defaults
  elsewhere); for sequence classification PEFT's `modules_to_save` trains the classifier head.
  Groups: `lora`, `head`. Saved with PEFT's own `save_pretrained` (loadable by `PeftModel`).
- `FullFineTuneModel`: every weight trainable, one group `full`. Saved as `model.safetensors` of
  the whole state plus `eptkit_baseline.json`.
- `PeftPromptModel`: PEFT's P-tuning (`ptuning`: virtual tokens produced by an MLP prompt encoder) and
  prefix tuning (`prefix`: trained key/value prefixes in every layer), extra comparison rows from the
  paper's table. PEFT's own pipeline end to end, including its pooling (the backbone's, e.g. BERT's
  [CLS] pooler), so these rows measure PEFT as users get it. Groups: `prompt`, `head`.
- `HeadOnlyModel`: a linear probe. The encoder is frozen and *mean-pooled over the text tokens* (the
  pooling the prompt methods use by default on encoders), then the backbone's own
  classifier (a trainable copy, as for the prompt methods). Group `head`. Classification only.

`build_model` picks a wrapper (or a `PromptedModel`) from a method name.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .embeddings import whole_copy
from .files import (atomic_copy, atomic_save_safetensors, atomic_write_json, fsync_dir, make_readable,
                    sha256_file)
from .registry import METHODS, get_method
from .heads import apply_head, classification_loss, find_head_name, mean_pool
from .task_types import PEFT_TASK_TYPES, detect_task_type
from .trainable import AdapterStateMixin
from .version import __version__

BASELINE_CONFIG_NAME = "eptkit_baseline.json"
PEFT_PROMPT_CLASSES = ("ptuning", "prefix")  # PEFT's P-tuning and prefix tuning (PeftPromptModel)
FULL_WEIGHTS_NAME = "model.safetensors"  # methods full and head


class _Wrapper(AdapterStateMixin, nn.Module):
    """Shared plumbing: the wrapped module is `self.inner`; the trainable tensors are named as in it."""

    method_name = "baseline"
    method_config = None  # no prompt method: the text length comes from TrainConfig.max_length
    max_length = None
    prompt_positions = 0  # the text starts at the backbone's first position

    @property
    def backbone(self) -> nn.Module:
        return self.inner

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.inner.named_parameters() if p.requires_grad}

    def _write_info(self, directory: Path, files: dict[str, str], **extra) -> None:
        """eptkit_baseline.json, written last: it names the method and records the SHA-256 of every
        file written before it (`files_sha256`), so a crash between the files is detected on load."""
        facts = {"num_labels": int(self.inner.config.num_labels)} if self.task_type == "classification" else {}
        atomic_write_json(
            directory / BASELINE_CONFIG_NAME,
            {"method": self.method_name, "task_type": self.task_type, "eptkit_version": __version__,
             "files_sha256": files, **facts, **extra},
        )

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        if self.task_type == "classification":
            raise TypeError("generate: a sequence classifier does not generate; call the model for logits")
        out = self.inner.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # Same contract as PromptedModel.generate: new tokens only.
        return out[:, input_ids.shape[1]:] if self.task_type == "causal" else out


class _PeftWrapper(_Wrapper):
    """A PEFT model in `self.inner`: its trainable tensors split into the method's group (names
    containing `adapter_marker`) and the classifier head PEFT trains beside it."""

    group = ""
    adapter_marker = ""

    @staticmethod
    def peft_task_type(task_type: str):
        from peft import TaskType

        return TaskType[PEFT_TASK_TYPES[task_type]]

    def param_groups(self):
        adapter, head = [], []
        for name, p in self.inner.named_parameters():
            if p.requires_grad:
                (adapter if self.adapter_marker in name else head).append(p)
        return {k: v for k, v in {self.group: adapter, "head": head}.items() if v}

    def save_pretrained(self, directory) -> None:
        """PEFT's own files (loadable by `PeftModel.from_pretrained`), each moved into place atomically.

        PEFT's file names are fixed, so the files cannot all change at once: a kill -9 between two
        renames leaves new files beside an eptkit_baseline.json that vouches for the old ones, which
        `load_baseline` refuses (checksums), and the next save (a --resume) writes them all again."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".peft-*"):  # the staging folder of a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".peft-"))
        try:
            # LoRA's file is built from the tensors given: our trainable ones (whole, also in a sharded run,
            # where PEFT's own state_dict() would hold shards; `eptkit.sharding.state_view`).
            given = {"state_dict": dict(self.adapter_state_dict())} if self.method_name == "lora" else {}
            self.inner.save_pretrained(str(tmp), **given)
            files = {}
            for path in sorted(tmp.iterdir()):  # adapter_config.json, adapter_model.safetensors, README.md
                if not path.is_file():
                    continue
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                make_readable(path)
                files[path.name] = sha256_file(path)
                os.replace(path, directory / path.name)
            fsync_dir(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._write_info(directory, {k: v for k, v in files.items() if k != "README.md"})


class LoRAModel(_PeftWrapper):
    method_name = "lora"
    group, adapter_marker = "lora", "lora_"

    def __init__(self, model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.task_type = detect_task_type(model)
        if target_modules is None and getattr(model.config, "model_type", None) in ("bert", "roberta", "deberta"):
            target_modules = ["query", "value"]
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"lora_r: must be a positive integer, got {r!r}")
        config = LoraConfig(
            task_type=self.peft_task_type(self.task_type), r=r, lora_alpha=alpha, lora_dropout=dropout,
            target_modules=target_modules,
        )
        self.inner = get_peft_model(model, config)


class PeftPromptModel(_PeftWrapper):
    """PEFT's P-tuning (`method="ptuning"`) or prefix tuning (`method="prefix"`)."""

    group, adapter_marker = "prompt", "prompt_encoder."

    def __init__(self, model: nn.Module, method: str, num_virtual_tokens: int = 20, encoder_hidden_size: int = 128):
        super().__init__()
        from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

        if method not in PEFT_PROMPT_CLASSES:
            raise ValueError(f"method: expected 'ptuning' or 'prefix', got {method!r}")
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"prompt_length: must be a positive integer, got {num_virtual_tokens!r}")
        self.method_name = method
        self.task_type = detect_task_type(model)
        if method == "prefix" and self.task_type == "classification":
            # PEFT hands the prefixes to the backbone as `past_key_values`; encoder classifiers in
            # transformers 5 (BERT, RoBERTa, ...) no longer take that argument, and PEFT would only
            # fail at the first forward, deep inside. Say it here, by name.
            if not _accepts_past_key_values(model):
                raise TypeError(f"method 'prefix': {type(model).__name__} does not accept past_key_values, which "
                                "PEFT's prefix tuning needs; use a seq2seq or causal backbone, or --method ptuning")
        cfg = model.config
        if method == "prefix" and getattr(cfg, "d_kv", None) and cfg.d_kv * cfg.num_heads != cfg.d_model:
            # PEFT splits each prefix vector of width d_model into num_heads heads; T5 variants whose
            # attention width differs would fail in the first forward with a shape error.
            raise TypeError(f"method 'prefix': PEFT's prefix tuning needs num_heads * d_kv == d_model, got "
                            f"{cfg.num_heads} * {cfg.d_kv} != {cfg.d_model}")
        task = self.peft_task_type(self.task_type)
        if method == "ptuning":
            config = PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                                         encoder_hidden_size=encoder_hidden_size)
        else:
            config = PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
        self.inner = get_peft_model(model, config)

    @property
    def prompt_positions(self) -> int:
        """P-tuning prepends its virtual tokens to the text. Prefix tuning adds keys and values, not
        tokens, but hands them over as a cache (`past_key_values`), and decoders number the tokens
        after the cache: with either, the text starts at position num_virtual_tokens."""
        return int(self.inner.active_peft_config.num_virtual_tokens)


def _accepts_past_key_values(model: nn.Module) -> bool:
    forwards = [model.forward]
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is not None:
        forwards.append(base.forward)
    return any("past_key_values" in inspect.signature(f).parameters for f in forwards)


class FullFineTuneModel(_Wrapper):
    method_name = "full"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.task_type = detect_task_type(model)
        self.inner = model
        for p in model.parameters():
            p.requires_grad_(True)

    def param_groups(self):
        return {"full": [p for p in self.inner.parameters() if p.requires_grad]}

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digest = atomic_save_safetensors(directory / FULL_WEIGHTS_NAME, self.adapter_state_dict())
        self._write_info(directory, {FULL_WEIGHTS_NAME: digest},
                         backbone=getattr(self.inner.config, "_name_or_path", None))


class HeadOnlyModel(_Wrapper):
    """Linear probe: frozen encoder, mean pooling over the text tokens, trainable classifier head."""

    method_name = "head"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.task_type = detect_task_type(model)
        if self.task_type != "classification":
            raise ValueError("method 'head' (linear probe) needs a sequence-classification backbone")
        self.inner = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.head_name = find_head_name(model)
        head = whole_copy(getattr(model, self.head_name))
        head.requires_grad_(True)
        setattr(model, self.head_name, head)

    @property
    def head(self) -> nn.Module:
        return getattr(self.inner, self.head_name)

    def param_groups(self):
        return {"head": list(self.head.parameters())}

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.inner.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        logits = apply_head(self.inner, self.head, pooled)
        loss = None if labels is None else classification_loss(self.inner.config, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # the head's tensors under their names in the backbone (head_name.weight, ...): adapter_state_dict,
        # which a sharded run's saving replaces by whole tensors (`eptkit.sharding.state_view`)
        digest = atomic_save_safetensors(directory / FULL_WEIGHTS_NAME, self.adapter_state_dict())
        self._write_info(directory, {FULL_WEIGHTS_NAME: digest}, head_name=self.head_name, pooling="mean")


def build_model(model: nn.Module, method: str, method_config=None, *, tokenizer=None, lora_r: int = 8,
                num_virtual_tokens: int = 20):
    """Wrap a loaded backbone for `method` (a name in `eptkit.registry.METHODS`). Prompt methods need
    `method_config`; `num_virtual_tokens` is for PEFT's P-tuning and prefix tuning."""
    spec = get_method(method)
    if spec.is_prompt_method:
        from .model import get_prompted_model

        if method_config is None or method_config.method != method:
            raise ValueError(f"method {method!r} needs its config ({spec.config_class().__name__})")
        return get_prompted_model(model, method_config, tokenizer=tokenizer)
    return spec.builder()(model, method_config, tokenizer=tokenizer, lora_r=lora_r,
                          num_virtual_tokens=num_virtual_tokens, method=method)


# The builders the registry names (eptkit.registry): (backbone, method config, **options) -> model.
def build_lora(model: nn.Module, method_config=None, *, lora_r: int = 8, **_) -> "LoRAModel":
    return LoRAModel(model, r=lora_r)


def build_full(model: nn.Module, method_config=None, **_) -> "FullFineTuneModel":
    return FullFineTuneModel(model)


def build_head(model: nn.Module, method_config=None, **_) -> "HeadOnlyModel":
    return HeadOnlyModel(model)


def build_peft_prompt(model: nn.Module, method_config=None, *, method: str, num_virtual_tokens: int = 20,
                      **_) -> "PeftPromptModel":
    return PeftPromptModel(model, method, num_virtual_tokens=num_virtual_tokens)


# ---------------------------------------------------------------------------- loading a saved baseline
def read_baseline_info(directory) -> dict | None:
    """eptkit_baseline.json of a baseline's directory, or None when there is none (a prompt adapter)."""
    from .adapter_files import read_json

    path = Path(directory) / BASELINE_CONFIG_NAME
    return read_json(path) if path.is_file() else None


def load_baseline(model: nn.Module, directory) -> _Wrapper:
    """A saved LoRA, P-tuning, prefix-tuning, full fine-tuning or linear-probe model on `model` (a freshly
    loaded backbone of the same checkpoint, with the same number of labels). Every file is checked
    against the SHA-256 that eptkit_baseline.json records (written last), so a crash between two files
    never loads as a mixture. Errors are AdapterError naming the file."""
    from .adapter_files import AdapterError, read_safetensors

    directory = Path(directory)
    info_path = directory / BASELINE_CONFIG_NAME
    info = read_baseline_info(directory)
    if info is None:
        raise AdapterError(f"{info_path}: not found")
    method = info.get("method")
    if method not in METHODS or METHODS[method].is_prompt_method:
        raise AdapterError(f"{info_path}: unknown baseline method {method!r}")
    task_type = detect_task_type(model)
    if info.get("task_type", task_type) != task_type:
        raise AdapterError(f"{info_path}: saved for a {info['task_type']} model, {type(model).__name__} is a "
                           f"{task_type} model")
    files = info.get("files_sha256") or {}
    if not isinstance(files, dict):
        raise AdapterError(f"{info_path}: 'files_sha256' should map file names to digests")
    for name, digest in files.items():
        path = directory / str(name)
        if not path.is_file():
            raise AdapterError(f"{path}: not found")
        if sha256_file(path) != digest:
            raise AdapterError(f"{path}: checksum mismatch, the file is truncated, corrupted or from another save")
    if METHODS[method].peft_format:
        from peft import PeftModel

        wrapper = (LoRAModel if method == "lora" else PeftPromptModel).__new__(
            LoRAModel if method == "lora" else PeftPromptModel)
        nn.Module.__init__(wrapper)
        wrapper.method_name, wrapper.task_type = method, task_type
        try:
            wrapper.inner = PeftModel.from_pretrained(model, str(directory))
        except Exception as e:  # noqa: BLE001 - PEFT raises many kinds; all mean an unusable directory
            raise AdapterError(f"{directory}: cannot load the PEFT {method} adapter ({_first_line(e)})") from None
        return wrapper.eval()
    wrapper = FullFineTuneModel(model) if method == "full" else HeadOnlyModel(model)
    state = read_safetensors(directory / FULL_WEIGHTS_NAME)
    try:
        wrapper.load_adapter_state_dict(state)
    except ValueError as e:
        raise AdapterError(f"{directory / FULL_WEIGHTS_NAME}: {e}") from None
    if method == "full":
        wrapper.requires_grad_(False)
    return wrapper.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def copy_baseline(directory, out, info: dict) -> None:
    """Copy a PEFT-format baseline's files (and the run facts) to `out`; eptkit_baseline.json, which
    vouches for the others, last."""
    directory, out = Path(directory), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(info.get("files_sha256") or {}) or ["adapter_config.json", "adapter_model.safetensors"]
    for name in [*names, "eptkit_run.json", BASELINE_CONFIG_NAME]:
        if (directory / name).is_file():
            atomic_copy(directory / name, out / name)

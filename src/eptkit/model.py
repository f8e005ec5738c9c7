"""PromptedModel: one prompt method joined to a frozen Hugging Face backbone (docs/method.md).

Data flow for every task type: token ids -> frozen word embeddings E -> E + D (offset row per
position of each text's own real tokens) -> [prompt ; E + D] -> backbone. The three task types
differ only in what the backbone is asked for:

- "classification": `*ForSequenceClassification`; the head is a trainable copy of the backbone's
  own head, and `pooling` chooses which hidden state(s) reach it.
- "seq2seq": encoder-decoder generation (T5, BART); prompt and offset go to the encoder only.
- "causal": decoder-only generation (GPT-2, Llama); prompt positions carry label -100, and the
  offset is added to source tokens only (tokens whose label is -100), so training on
  [source ; target] matches `generate`, where generated tokens never receive an offset.
  By default the prompt's keys and values are computed once per batch and shared by every row
  through the key/value cache (`eptkit.prefix`: exact; the output's logits are then the text's).

Adapters live in `self.adapters` (a ModuleDict keyed by name, "default" unless told otherwise),
so several adapters can share one frozen backbone; `set_adapter` picks the one a plain call uses,
and `model(..., adapter_names=[...])` / `generate(..., adapter_names=[...])` run each row of a
batch through its own adapter (`eptkit.forward`). `load_adapter(prompted_model, dir, adapter_name=...)`
adds a saved adapter to a model that has others.

Saving and loading go through `eptkit.adapter_files` (the file formats): `save_adapter`,
`load_adapter` and `export_peft` below turn a PromptedModel into (config, tensors) and back.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from .adapter_files import AdapterError, read_adapter, write_adapter, write_peft_prompt_tuning
from .backbones import backbone_facts, check_positions
from .config import PromptTuningConfig
from .embeddings import embedding_shape, whole_copy
from .forward import embed, prompted_forward, prompted_generate
from .heads import find_head_name
from .methods import build_method
from .methods.folded import CompiledPrompt, FoldedPrompt  # noqa: F401 (CompiledPrompt: the old name)
from .task_types import detect_task_type
from .trainable import AdapterStateMixin


def decide_defaults(config: PromptTuningConfig, backbone: nn.Module, task_type: str, tokenizer) -> PromptTuningConfig:
    """`config` with its automatic (None) fields decided for this backbone; the adapter saves these."""
    decoder_classifier = hasattr(backbone, "score")
    encoder_classifier = task_type == "classification" and not decoder_classifier
    changes = {}
    if config.init is None:  # an instruction's tokens need the tokenizer (eptkit train always has it)
        changes["init"] = "text" if tokenizer is not None else "sample_vocab"
    if config.text_positions is None:
        # Encoders see their text at the positions they were trained on; decoders keep PEFT's layout,
        # where the text continues after the prompt as it would after any earlier text.
        changes["text_positions"] = "own" if encoder_classifier else "after_prompt"
    if task_type == "classification" and config.pooling is None:
        # Mean pooling is the default for encoders: with the backbone's own head, which reads
        # position 0 (a virtual token), prompt tuning collapsed to one class (docs/method.md, "Pooling").
        changes["pooling"] = "mean" if encoder_classifier else "backbone"
    return dataclasses.replace(config, **changes)


class PromptedModel(AdapterStateMixin, nn.Module):
    """A frozen backbone with one or more named prompt adapters; satisfies `eptkit.trainable.TrainableModel`."""

    def __init__(
        self,
        model: nn.Module,
        config: PromptTuningConfig,
        *,
        tokenizer=None,
        adapter_name: str = "default",
        method: nn.Module | None = None,
    ):
        super().__init__()
        self.task_type = detect_task_type(model)
        self.backbone = model
        # Frozen: no gradient and therefore no optimizer state for any backbone weight.
        for p in model.parameters():
            p.requires_grad_(False)
        self.word_embeddings = model.get_input_embeddings()
        self.configs: dict[str, PromptTuningConfig] = {}
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.head_name = None
        if self.task_type == "classification":
            self.head_name = find_head_name(model)
            # Each adapter trains its own copy of the head (as PEFT's modules_to_save does); the
            # pretrained head stays untouched, remembered on the backbone (outside the module tree)
            # so that wrapping the same backbone again starts from it, not from a trained copy.
            if not hasattr(model, "_eptkit_pretrained_head"):
                object.__setattr__(model, "_eptkit_pretrained_head", [getattr(model, self.head_name)])
        self.add_adapter(adapter_name, config, tokenizer=tokenizer, method=method)
        self.set_adapter(adapter_name)

    def add_adapter(self, name: str, config: PromptTuningConfig, *, tokenizer=None, method: nn.Module | None = None):
        """Add a named adapter (its own prompt method and, for classifiers, its own head) on the
        shared frozen backbone. `set_adapter(name)` makes it the one forward() uses."""
        if name in self.adapters:
            raise ValueError(f"adapter_name: an adapter named {name!r} exists already")
        config = decide_defaults(config, self.backbone, self.task_type, tokenizer)
        check_positions(self.backbone, config)
        if config.text_positions != "after_prompt" and self.task_type != "classification":
            raise ValueError(f"text_positions: {config.text_positions!r} is for sequence classifiers; a "
                             f"{self.task_type} model places the text after the prompt ('after_prompt')")
        if method is None:
            init_ids = None
            if config.init == "text":
                if tokenizer is None:
                    raise ValueError("init='text' needs the tokenizer: get_prompted_model(model, config, tokenizer=...)")
                init_ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            method = build_method(config, self.word_embeddings, init_ids)
        self.configs[name] = config
        self.adapters[name] = method
        if self.head_name is not None:
            self.heads[name] = whole_copy(self.backbone._eptkit_pretrained_head[0]).requires_grad_(True)

    def set_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"adapter_name: no adapter named {name!r}; have {sorted(self.adapters)}")
        self.active_adapter = name
        if self.head_name is not None:
            setattr(self.backbone, self.head_name, self.heads[name])

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> PromptTuningConfig:
        return self.configs[self.active_adapter]

    @property
    def method(self) -> nn.Module:
        """The active adapter's prompt method (an nn.Module); its name is `method_name`."""
        return self.adapters[self.active_adapter]

    @property
    def method_name(self) -> str:
        return self.config.method

    @property
    def method_config(self) -> PromptTuningConfig:
        return self.config

    @property
    def prompt_positions(self) -> int:
        return self.config.prompt_length

    @property
    def hidden_size(self) -> int:
        return embedding_shape(self.word_embeddings)[1]

    @property
    def max_length(self) -> int | None:
        return getattr(self.config, "offset_length", None)  # DePT/EPT read texts up to their offset's rows

    @property
    def is_folded(self) -> bool:
        """Whether the active adapter's prompt side is folded into constants (`fold_prompt`)."""
        return isinstance(self.method, FoldedPrompt)

    @property
    def is_compiled(self) -> bool:
        """The older name of `is_folded`."""
        return self.is_folded

    @property
    def pooling(self) -> str | None:
        return self.config.pooling if self.task_type == "classification" else None

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: prompt, low_rank, ept, head (empty groups omitted)."""
        groups = dict(self.method.param_groups())
        if self.heads:
            groups["head"] = list(self.heads[self.active_adapter].parameters())
        return {name: params for name, params in groups.items() if params}

    def _frozen_embedding_count(self) -> int:  # for num_parameters(exclude_embeddings=True)
        vocab, hidden = embedding_shape(self.word_embeddings)
        return vocab * hidden

    # ------------------------------------------------------------------ state
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the active adapter under the names of the adapter format (prompt_embeddings,
        lora_embedding_A/B, fusion.*, projection.*, and the head under its module path, e.g.
        classifier.weight; docs/method.md, "Adapters on disk")."""
        state = {k: v.detach() for k, v in self.method.state_dict().items() if v is not None}
        if self.heads:
            for k, v in self.heads[self.active_adapter].state_dict().items():
                state[f"{self.head_name}.{k}"] = v.detach()
        return state

    # ------------------------------------------------------------------ inputs
    def prompt_and_offset(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.method()

    def _embed(self, input_ids, attention_mask, offset_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt ; E + D] and its attention mask, for the active adapter (`eptkit.forward.embed`). D's
        row for a token is its position counted from the text's first real token (cumsum of the attention
        mask), so left padding, right padding and dynamic padding give the same result."""
        x = embed(self, input_ids, attention_mask, offset_mask=offset_mask)
        return x.inputs_embeds, x.attention_mask

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ):
        """adapter_names: one adapter name per row (a mixed batch); default: the active adapter. One
        code path either way (`eptkit.forward`)."""
        for unsupported in ("inputs_embeds", "position_ids", "past_key_values", "cache"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{unsupported}: not supported; pass input_ids and attention_mask")
            kwargs.pop(unsupported, None)
        return prompted_forward(self, adapter_names, input_ids, attention_mask, labels, token_type_ids, **kwargs)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 adapter_names: list[str] | None = None, **kwargs):
        """Generate with the prompt in front. Returns the new tokens only (for decoder-only models
        the input is not repeated, as with `generate(inputs_embeds=...)`); the key/value cache is used.
        adapter_names: one adapter per row (a mixed batch); default: the active adapter."""
        if self.task_type == "classification":
            raise TypeError("generate: a sequence classifier does not generate; call the model for logits")
        return prompted_generate(self, adapter_names, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ fold / save / load
    @torch.no_grad()
    def fold_prompt(self) -> "PromptedModel":
        """An inference-only model (sharing this backbone and head) whose prompt and offset are
        constant tensors: EPT's fusion and projection cost nothing per step. This is what a
        folded adapter file holds; the result has `is_folded` True. This model is left as it was."""
        prompt, offset = self.prompt_and_offset()
        name = self.active_adapter
        folded = PromptedModel(self.backbone, self.config, adapter_name=name, method=FoldedPrompt(prompt, offset))
        if self.head_name is not None:  # share the trained head, not a fresh copy of the pretrained one
            folded.heads[name] = self.heads[name]
            folded.set_adapter(name)
        return folded.eval()

    def compile(self) -> "PromptedModel":  # type: ignore[override]
        """Deprecated name of `fold_prompt()`, kept working for existing code. Unlike torch's
        `nn.Module.compile` it compiles nothing in place; for that, call `torch.compile(model)`."""
        warnings.warn("PromptedModel.compile() is deprecated: call fold_prompt() (torch.compile(model) compiles)",
                      DeprecationWarning, stacklevel=2)
        return self.fold_prompt()

    def save_pretrained(self, directory, **kwargs) -> None:
        save_adapter(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, **kwargs) -> "PromptedModel":
        return load_adapter(model, directory, **kwargs)


def get_prompted_model(model: nn.Module, config: PromptTuningConfig, *, tokenizer=None, adapter_name="default"):
    """Freeze `model` and join it to the prompt method `config` describes."""
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config: expected PromptTuningConfig, DePTConfig or EPTConfig, got {type(config).__name__}")
    return PromptedModel(model, config, tokenizer=tokenizer, adapter_name=adapter_name)


# ---------------------------------------------------------------------------- adapters on disk
def save_adapter(model: PromptedModel, directory, *, folded: bool | None = None, compiled: bool | None = None):
    """Save the active adapter of `model` to `directory` (created if needed); folded=True folds the
    prompt side into constants first (`fold_prompt`). `compiled` is the older name of `folded`. The
    file marks a folded adapter "compiled": true (the format's key, read by every eptkit version)."""
    folded = compiled if folded is None else folded
    folded = model.is_folded if folded is None else folded
    state = model.adapter_state_dict()
    if folded and not model.is_folded:
        state = model.fold_prompt().adapter_state_dict()
    config = {
        **model.config.to_dict(),
        **backbone_facts(model.backbone),
        "task_type": model.task_type,
        "head_name": model.head_name,
        "compiled": bool(folded),
    }
    return write_adapter(directory, config, state)


def load_adapter(model: nn.Module, directory, *, adapter_name: str = "default") -> PromptedModel:
    """Load an eptkit adapter, a PEFT prompt-tuning adapter, or a DePT checkpoint onto `model`.

    `model` is a backbone (a new PromptedModel is returned) or a PromptedModel, to which the adapter
    is added under `adapter_name` beside the ones it has (the active adapter stays active), for
    mixed batches (`model(..., adapter_names=[...])`)."""
    existing = model if isinstance(model, PromptedModel) else None
    files = read_adapter(directory, model.backbone if existing is not None else model)
    if files.folded:
        method, build = FoldedPrompt(files.tensors["prompt_embeddings"], files.tensors.get("offset")), files.config
    else:
        # Random init is overwritten by the load; skip text init so no tokenizer is needed.
        method = None
        build = PromptTuningConfig.from_dict({**files.config.to_dict(), "init": "sample_vocab"})
    if existing is None:
        prompted = PromptedModel(model, build, adapter_name=adapter_name, method=method)
        active = adapter_name
    else:
        prompted, active = existing, existing.active_adapter
        prompted.add_adapter(adapter_name, build, method=method)
        prompted.set_adapter(adapter_name)
    prompted.configs[adapter_name] = files.config
    try:
        prompted.load_adapter_state_dict(files.tensors)
    except ValueError as e:
        if existing is not None:
            prompted.set_adapter(active)
            remove_adapter(prompted, adapter_name)
        raise AdapterError(f"{files.weights_path}: {e}") from None
    prompted.set_adapter(active)
    return prompted.eval() if files.folded and existing is None else prompted


def remove_adapter(model: PromptedModel, name: str) -> None:
    """Drop adapter `name` (its prompt method, head and config) from `model`; if it was the active one,
    another becomes active. The last adapter cannot go: a PromptedModel always has one."""
    if name not in model.adapters:
        raise ValueError(f"adapter_name: no adapter named {name!r}; have {sorted(model.adapters)}")
    if len(model.adapters) == 1:
        raise ValueError(f"adapter_name: {name!r} is the model's only adapter; add another before removing it")
    if model.active_adapter == name:
        model.set_adapter(next(n for n in model.adapters if n != name))
    for table in (model.adapters, model.heads, model.configs):
        if name in table:
            del table[name]


@torch.no_grad()
def fold_adapter(model: PromptedModel, name: str) -> None:
    """Fold adapter `name`'s prompt side into constants in place (what `fold_prompt` does for a copy of the
    active adapter): inference only, EPT's fusion and projection then cost nothing per batch."""
    method = model.adapters[name]
    if not isinstance(method, FoldedPrompt):
        was_training = method.training
        prompt, offset = method.eval()()
        method.train(was_training)
        model.adapters[name] = FoldedPrompt(prompt, offset)


def export_peft(model: PromptedModel, directory):
    """Write the active PT adapter in PEFT's prompt-tuning format (loadable by `PeftModel.from_pretrained`)."""
    if model.config.method != "pt":
        raise ValueError(f"export to PEFT: only prompt tuning ('pt') has a PEFT equivalent, not "
                         f"{model.config.method!r}; use the folded format (eptkit export --format folded)")
    # PEFT's classifiers read the backbone's own head (pooling='backbone') with the text after the prompt.
    peft_layout = {"pooling": "backbone", "text_positions": "after_prompt"}
    used = {"pooling": model.pooling, "text_positions": model.config.text_positions}
    differ = [k for k in peft_layout if model.task_type == "classification" and used[k] != peft_layout[k]]
    if differ:
        raise ValueError(
            "export to PEFT: this adapter uses " + ", ".join(f"{k}={used[k]!r}" for k in differ)
            + "; PEFT only reproduces " + " and ".join(f"{k}={peft_layout[k]!r}" for k in differ)
            + ". Train with `--method pt " + " ".join(f"--{k.replace('_', '-')} {peft_layout[k]}" for k in differ)
            + "` for a PEFT-exportable adapter, or export --format folded")
    state = model.adapter_state_dict()
    prompt = state.pop("prompt_embeddings")
    return write_peft_prompt_tuning(directory, prompt, state, task_type=model.task_type, backbone=model.backbone,
                                    head_name=model.head_name)

"""PromptedModel: one prompt method joined to a frozen Hugging Face backbone (SPEC 2).

Data flow for every task type: token ids -> frozen word embeddings E -> E + D (offset row per
position of each text's own real tokens) -> [prompt ; E + D] -> backbone. The three task types
differ only in what the backbone is asked for:

- "classification": `*ForSequenceClassification`; the head is a trainable copy of the backbone's
  own head, and `pooling` chooses which hidden state(s) reach it.
- "seq2seq": encoder-decoder generation (T5, BART); prompt and offset go to the encoder only.
- "causal": decoder-only generation (GPT-2, Llama); prompt positions carry label -100, and the
  offset is added to source tokens only (tokens whose label is -100), so training on
  [source ; target] matches `generate`, where generated tokens never receive an offset.

Adapters live in `self.adapters` (a ModuleDict keyed by name, "default" unless told otherwise),
so several adapters can share one frozen backbone; the prompt and offset pass through
`_embed` as batch tensors, which is where per-row adapter selection will plug in.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto import modeling_auto

from .config import PromptTuningConfig
from .methods import build_method

TASK_TYPES = ("classification", "seq2seq", "causal")
HEAD_NAMES = ("classifier", "score")  # PEFT's default modules_to_save for sequence classification


def _mapping_class_names(mapping: dict) -> set[str]:
    names = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def detect_task_type(model: nn.Module) -> str:
    """Which of TASK_TYPES the backbone is, from its class; anything else is a clear error."""
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


def _check_positions(model: nn.Module, config: PromptTuningConfig) -> None:
    """The prompt plus the longest text the adapter accepts must fit the backbone's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = config.prompt_length + getattr(config, "max_length", 0)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(
            f"max_length: prompt_length + max_length = {longest} exceeds the backbone's "
            f"max_position_embeddings={limit}; lower max_length or prompt_length"
        )


def find_head_name(model: nn.Module) -> str:
    """The attribute holding a sequence classifier's head ('classifier' or 'score')."""
    name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    if name is None:
        raise TypeError(f"{type(model).__name__}: no classification head named one of {HEAD_NAMES}")
    return name


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states (batch x n x d) over the positions where mask (batch x n) is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def apply_head(backbone: nn.Module, head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Logits of a classification head on pooled vectors (batch x d), for the poolings we compute."""
    if isinstance(head, nn.Linear):
        dropout = getattr(backbone, "dropout", None)
        return head(dropout(pooled) if isinstance(dropout, nn.Dropout) else pooled)
    # Heads that read a sequence's first position (RoBERTa's, DeBERTa's pooler + classifier).
    sequence = pooled.unsqueeze(1)
    pooler = getattr(backbone, "pooler", None)
    if pooler is not None and backbone.base_model is not backbone and pooler is not getattr(
        backbone.base_model, "pooler", None
    ):
        sequence = pooler(sequence).unsqueeze(1)
    return head(sequence)


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss transformers' classifiers use, chosen the same way from `config.problem_type`."""
    num_labels = logits.shape[-1]
    problem = getattr(config, "problem_type", None)
    if problem == "regression" or (problem is None and num_labels == 1):
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


class CompiledPrompt(nn.Module):
    """A trained adapter's prompt side frozen into constants: (P_out, D) as buffers (SPEC 1.3)."""

    def __init__(self, prompt: torch.Tensor, offset: torch.Tensor | None):
        super().__init__()
        self.register_buffer("prompt_embeddings", prompt.detach().clone())
        self.register_buffer("offset", None if offset is None else offset.detach().clone())

    def forward(self):
        return self.prompt_embeddings, self.offset

    def param_groups(self):
        return {}


class PromptedModel(nn.Module):
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
        _check_positions(self.backbone, config)
        if self.task_type == "classification" and config.pooling is None:
            # Mean pooling is the default for encoders: with the backbone's own head, which reads
            # position 0 (a virtual token), prompt tuning collapsed to one class (SPEC 2).
            config = dataclasses.replace(config, pooling="backbone" if hasattr(self.backbone, "score") else "mean")
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
            self.heads[name] = copy.deepcopy(self.backbone._eptkit_pretrained_head[0]).requires_grad_(True)

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
        return self.adapters[self.active_adapter]

    @property
    def hidden_size(self) -> int:
        return self.word_embeddings.weight.shape[1]

    @property
    def max_length(self) -> int | None:
        return getattr(self.config, "max_length", None)

    @property
    def is_compiled(self) -> bool:
        return isinstance(self.method, CompiledPrompt)

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

    def num_parameters(self, trainable_only: bool = True, exclude_embeddings: bool = False) -> int:
        """Adapter (and head) parameters, or with trainable_only=False everything including the backbone.
        `exclude_embeddings` (asked by transformers.Trainer) leaves out the frozen word embeddings."""
        if exclude_embeddings and not trainable_only:
            return self.num_parameters(trainable_only=False) - self.word_embeddings.weight.numel()
        if trainable_only:
            return sum(p.numel() for ps in self.param_groups().values() for p in ps)
        seen = {id(p): p for p in self.parameters()}
        return sum(p.numel() for p in seen.values())

    # ------------------------------------------------------------------ state
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the active adapter under SPEC 3's names (prompt_embeddings, lora_embedding_A/B,
        fusion.*, projection.*, and the head under its module path, e.g. classifier.weight)."""
        state = {k: v.detach() for k, v in self.method.state_dict().items() if v is not None}
        if self.heads:
            for k, v in self.heads[self.active_adapter].state_dict().items():
                state[f"{self.head_name}.{k}"] = v.detach()
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors named as in `adapter_state_dict`; missing, extra or misshapen tensors are an error."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match the model: missing {missing}, unexpected {unexpected}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[name].shape)} (different backbone or hyper-parameters?)"
                )
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(state[name].to(target.dtype))

    # ------------------------------------------------------------------ inputs
    def prompt_and_offset(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.method()

    def _embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        offset_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt ; E + D] and its attention mask.

        D's row for a token is its position counted from the text's first real token
        (cumsum of the attention mask), so left padding, right padding and dynamic padding give the
        same result. `offset_mask` limits the offset to some tokens (the source, for causal LMs).
        """
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids: expected a 2-D tensor of token ids (batch x length)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        prompt, offset = self.prompt_and_offset()
        embeds = self.word_embeddings(input_ids)
        batch = input_ids.shape[0]
        if offset is not None:
            real = attention_mask.bool() if offset_mask is None else attention_mask.bool() & offset_mask
            positions = attention_mask.long().cumsum(dim=1) - 1
            # Only a padded width beyond max_length can hold a too-late token; checking the width
            # first spares the GPU a host sync on every step.
            too_long = real & (positions >= offset.shape[0]) if input_ids.shape[1] > offset.shape[0] else None
            if too_long is not None and too_long.any():
                row = int(too_long.any(dim=1).nonzero()[0])
                length = int(real[row].sum())
                raise ValueError(
                    f"input row {row} has {length} tokens, more than max_length={offset.shape[0]} that this "
                    "adapter's offset covers; truncate the text or use an adapter with a larger max_length"
                )
            rows = offset[positions.clamp(0, offset.shape[0] - 1)]  # batch x n x d
            embeds = embeds + (rows * real.unsqueeze(-1)).to(embeds.dtype)
        prompts = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs_embeds = torch.cat([prompts, embeds], dim=1)
        prompt_mask = attention_mask.new_ones(batch, prompt.shape[0])
        return inputs_embeds, torch.cat([prompt_mask, attention_mask], dim=1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        for unsupported in ("inputs_embeds", "position_ids", "past_key_values"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{unsupported}: not supported; pass input_ids and attention_mask")
            kwargs.pop(unsupported, None)
        if self.task_type == "classification":
            return self._forward_classification(input_ids, attention_mask, labels, token_type_ids, **kwargs)
        if self.task_type == "seq2seq":
            inputs_embeds, mask = self._embed(input_ids, attention_mask)
            labels = None if labels is None else labels.contiguous()  # T5 views labels
            return self.backbone(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels, **kwargs)
        # causal
        offset_mask = None if labels is None else labels.eq(-100)
        inputs_embeds, mask = self._embed(input_ids, attention_mask, offset_mask)
        if labels is not None:
            prompt_labels = labels.new_full((labels.shape[0], inputs_embeds.shape[1] - labels.shape[1]), -100)
            labels = torch.cat([prompt_labels, labels], dim=1)
        # Positions from the mask, as `generate` computes them, so a left-padded row scores exactly
        # as it would alone.
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return self.backbone(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, labels=labels, **kwargs
        )

    def _forward_classification(self, input_ids, attention_mask, labels, token_type_ids, **kwargs):
        inputs_embeds, mask = self._embed(input_ids, attention_mask)
        n_prompt = inputs_embeds.shape[1] - input_ids.shape[1]
        model_kwargs = dict(kwargs)
        if token_type_ids is not None:
            model_kwargs["token_type_ids"] = torch.cat(
                [token_type_ids.new_zeros(token_type_ids.shape[0], n_prompt), token_type_ids], dim=1
            )
        if self.pooling == "backbone" and not hasattr(self.backbone, "score"):
            # Encoder heads read position 0 (the first virtual token), exactly as PEFT does.
            return self.backbone(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels, **model_kwargs)

        base = self.backbone.base_model
        if hasattr(self.backbone, "score"):
            model_kwargs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = base(inputs_embeds=inputs_embeds, attention_mask=mask, **model_kwargs).last_hidden_state
        text_hidden, text_mask = hidden[:, n_prompt:], mask[:, n_prompt:]
        if self.pooling == "mean":
            pooled = mean_pool(text_hidden, text_mask)
        elif self.pooling == "text_first":
            first = text_mask.long().argmax(dim=1)  # first real token: left or right padding alike
            pooled = text_hidden[torch.arange(len(first)), first]
        else:  # backbone pooling of a decoder classifier: the last real token, as HF's head does
            last = mask.shape[1] - 1 - mask.long().flip(1).argmax(dim=1)
            pooled = hidden[torch.arange(len(last)), last]
        logits = apply_head(self.backbone, self.heads[self.active_adapter], pooled)
        loss = None if labels is None else classification_loss(self.backbone.config, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate with the prompt in front. Returns the new tokens only (for decoder-only models
        the input is not repeated, as with `generate(inputs_embeds=...)`); the key/value cache is used."""
        if self.task_type == "classification":
            raise TypeError("generate: a sequence classifier does not generate; call the model for logits")
        inputs_embeds, mask = self._embed(input_ids, attention_mask)
        return self.backbone.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)

    # ------------------------------------------------------------------ compile / save / load
    @torch.no_grad()
    def compile(self) -> "PromptedModel":
        """An inference-only model (sharing this backbone and head) whose prompt and offset are
        constant tensors: EPT's fusion and projection cost nothing per step."""
        prompt, offset = self.prompt_and_offset()
        name = self.active_adapter
        compiled = PromptedModel(self.backbone, self.config, adapter_name=name, method=CompiledPrompt(prompt, offset))
        if self.head_name is not None:  # share the trained head, not a fresh copy of the pretrained one
            compiled.heads[name] = self.heads[name]
            compiled.set_adapter(name)
        return compiled.eval()

    def save_pretrained(self, directory, **kwargs) -> None:
        from .adapters import save_adapter

        save_adapter(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, **kwargs) -> "PromptedModel":
        from .adapters import load_adapter

        return load_adapter(model, directory, **kwargs)


def get_prompted_model(model: nn.Module, config: PromptTuningConfig, *, tokenizer=None, adapter_name="default"):
    """Freeze `model` and join it to the prompt method `config` describes."""
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config: expected PromptTuningConfig, DePTConfig or EPTConfig, got {type(config).__name__}")
    return PromptedModel(model, config, tokenizer=tokenizer, adapter_name=adapter_name)

"""Configurations: the three prompt methods (docs/method.md) and the training loop (`TrainConfig`).

Each config is a dataclass whose fields carry their help text in `metadata["help"]` (the CLI
reads it). `validate()` runs at construction, so an impossible value fails where it is written,
with the field's name in the message. Configs round-trip through JSON with `to_dict`/`from_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .registry import config_classes, lr_fields

PROMPT_INITS = ("sample_vocab", "text", "random")
POOLINGS = ("mean", "backbone", "text_first")
TEXT_POSITIONS = ("after_prompt", "own")
MODULE_INITS = ("zero", "random")
# One generic instruction, not tuned per task: the prompt starts as the embeddings of its tokens. On the
# bundled MiniLM this start (with the text at its own positions) took PT, DePT and EPT from below the
# linear probe to well above it on STS-B (benchmarks/RESULTS.md, the recipe selection).
DEFAULT_INIT_TEXT = "Read the text and decide the answer."


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al., 2021): a trainable prompt of `prompt_length` vectors."""

    method: ClassVar[str] = "pt"

    prompt_length: int = _help("Number of virtual tokens l prepended to the input.", default=100)
    init: str | None = _help(
        "Prompt initialisation: 'text' (embeddings of init_text, repeated/truncated), 'sample_vocab' (random "
        "rows of the frozen vocabulary, PEFT's default) or 'random' (normal, std of the vocabulary). None "
        "picks 'text' when the model is built with a tokenizer (eptkit train always is), else 'sample_vocab'.",
        default=None,
    )
    init_text: str = _help("Text whose token embeddings initialise the prompt when init='text'.",
                           default=DEFAULT_INIT_TEXT)
    text_positions: str | None = _help(
        "Sequence classifiers only: 'own' (the text keeps the positions it has without a prompt, starting at 0, "
        "so a backbone with absolute position embeddings sees its text where it was trained to) or "
        "'after_prompt' (PEFT's layout: the prompt takes positions 0..l-1 and the text follows at l, l+1, ...). "
        "None picks 'own' for encoder classifiers and 'after_prompt' for every other model.",
        default=None)
    pooling: str | None = _help(
        "Sequence classification only: 'mean' (mean of the text's last hidden states, prompt excluded), "
        "'backbone' (the model's own pooler/head, as PEFT does) or 'text_first' (the text's first token). "
        "None picks 'mean' for encoders and 'backbone' for decoder-only classifiers.",
        default=None,
    )
    shared_prefix: bool = _help(
        "Decoder-only models: compute the virtual tokens' keys and values once per batch and let every row "
        "attend to them through the key/value cache (exact: the same logits, loss and gradients, with the "
        "prompt's share of the work no longer multiplied by the batch size). The model then returns the text's "
        "logits only. Applied where exact: one adapter per batch, no dropout active, a prompt of 2+ tokens. "
        "False runs the prompt through the model with every row.", default=True)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_positive_int(self, "prompt_length")
        if self.init is not None and self.init not in PROMPT_INITS:
            raise ValueError(f"init: must be one of {PROMPT_INITS} or None, got {self.init!r}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ValueError("init_text: required (a non-empty string) when init='text'")
        if self.text_positions is not None and self.text_positions not in TEXT_POSITIONS:
            raise ValueError(f"text_positions: must be one of {TEXT_POSITIONS} or None, got {self.text_positions!r}")
        if not isinstance(self.shared_prefix, bool):
            raise ValueError(f"shared_prefix: must be true or false, got {self.shared_prefix!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling: must be one of {POOLINGS} or None, got {self.pooling!r}")

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "PromptTuningConfig":
        """Build the config of `data["method"]`; unknown fields are an error, not silently dropped."""
        data = dict(data)
        method = data.pop("method", None)
        classes = config_classes()
        cls = classes.get(method)
        if cls is None:
            raise ValueError(f"method: unknown method {method!r}; expected one of {sorted(classes)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {old for old, new in RENAMED.items() if new in names})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> "PromptTuningConfig":
        return PromptTuningConfig.from_dict(json.loads(text))


# Old field name -> new: still accepted (as keyword, in a dict or JSON) with a one-line warning. Adapter
# files keep loading without one (eptkit.adapter_files maps their keys).
RENAMED = {"max_length": "offset_length"}


def _accepts_renamed(cls):
    """Let `cls(max_length=...)` keep working (RENAMED), with a warning naming the new field."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **renamed_fields(type(self).__name__, kwargs))

    cls.__init__ = __init__
    return cls


def saved_under_new_names(saved: dict) -> dict:
    """A config as a file saved it (adapter, checkpoint), its RENAMED keys under today's names; no warning:
    the file is as it was written and the user has nothing to change."""
    out = {k: v for k, v in saved.items() if k not in RENAMED}
    out.update({RENAMED[k]: v for k, v in saved.items() if k in RENAMED and RENAMED[k] not in saved})
    return out


def renamed_fields(owner: str, data: dict) -> dict:
    """`data` with RENAMED keys under their new names, each with a warning; `owner` names the config."""
    out = dict(data)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise ValueError(f"{owner}: {old} is the deprecated spelling of {new}; give only {new}")
            logging.getLogger("eptkit").warning("%s: '%s' is deprecated, use '%s' (the same setting)",
                                                owner, old, new)
            out[new] = out.pop(old)
    return out


@_accepts_renamed
@dataclass
class DePTConfig(PromptTuningConfig):
    """DePT (Shi & Lipani, 2024): a short prompt plus a low-rank offset to the input embeddings."""

    method: ClassVar[str] = "dept"

    prompt_length: int = _help("Length m of the short prompt P_s.", default=60)
    rank: int = _help("Rank r of the offset A (offset_length x r) B (r x d).", default=30)
    # Not `max_length`: that is TrainConfig's text length (PT, baselines); this is the offset's size,
    # which bounds the text (a position past the last row has no offset). DePT's own files say max_length.
    offset_length: int = _help(
        "Rows s of the offset (one per text position): the longest text in tokens DePT/EPT read. train, "
        "evaluate and predict truncate longer texts (results.json counts them under 'truncated'); a longer "
        "input passed to the model directly is an error. eptkit train sets it from --max-length when it is "
        "not given.",
        default=256,
    )
    alpha: float = _help("Offset scale: D = (alpha / sqrt(rank)) * A @ B.", default=8.0)

    def validate(self) -> None:
        super().validate()
        _check_positive_int(self, "rank")
        _check_positive_int(self, "offset_length")
        _check_number(self, "alpha", positive=True)

    @property
    def max_length(self) -> int:
        """Deprecated name of `offset_length`."""
        warnings.warn("DePTConfig.max_length is deprecated: read offset_length", DeprecationWarning, stacklevel=2)
        return self.offset_length


@_accepts_renamed
@dataclass
class EPTConfig(DePTConfig):
    """EPT (Lan et al., 2025): DePT's decomposition plus prompt fusion and multi-space projection."""

    method: ClassVar[str] = "ept"

    fusion: bool = _help("Prompt fusion: P_s attends to [P_s ; D] and adds the result through a gate.", default=True)
    fusion_rank: int = _help(
        "Rank of optional learned query/key maps in the fusion attention (0: plain dot-product attention).",
        default=0,
    )
    num_subspaces: int = _help("Number N of projection subspaces (0 switches multi-space projection off).", default=4)
    subspace_rank: int = _help("Rank p of each subspace projection U_k (d x p) V_k (p x d).", default=4)
    module_init: str = _help(
        "Start of the projection's V_k: 'zero' (EPT at initialisation computes exactly DePT; U_k gets no "
        "gradient until V_k has moved) or 'random' (V_k drawn like U_k, so every subspace is active from "
        "the first step).", default="zero")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.fusion, bool):
            raise ValueError(f"fusion: must be true or false, got {self.fusion!r}")
        _check_nonnegative_int(self, "fusion_rank")
        _check_nonnegative_int(self, "num_subspaces")
        if self.num_subspaces:
            _check_positive_int(self, "subspace_rank")
        if self.module_init not in MODULE_INITS:
            raise ValueError(f"module_init: must be one of {MODULE_INITS}, got {self.module_init!r}")


# ============================================================================ training
# The methods' names, parameter groups and the field holding each group's rate: `eptkit.registry`.
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_UNITS = ("embedding_rms", "absolute")
OPTIMIZERS = ("adamw", "adafactor")
REGRESSION_TARGETS = ("standardize", "raw")
LR_SCHEDULES = ("linear", "constant")


@dataclass
class TrainConfig:
    """Hyper-parameters of the training loop (the method's own live in its PromptTuningConfig).

    Each parameter group of the model trains at its own rate (`eptkit.registry.lr_fields`): `lr` is the prompt's,
    `lr_low_rank` DePT/EPT's offset, `lr_ept` EPT's modules, `lr_head` a classifier's head, and so on.
    """

    output_dir: str = _help("Directory for the best adapter, results.json, log.jsonl and checkpoints/.",
                            default="runs/eptkit")
    # `lr` is the rate of the "prompt" group only (the name is kept: recipes and saved runs use it).
    lr: float = _help("Learning rate of the prompt only (PT prompt, DePT/EPT short prompt), in lr_unit; not a "
                      "global rate: every other parameter group has its own lr_* option.", default=8e-2)
    lr_low_rank: float = _help("Learning rate of DePT/EPT's low-rank offset A, B, in lr_unit.", default=8e-3)
    lr_unit: str = _help(
        "Unit of lr and lr_low_rank with AdamW: 'embedding_rms' multiplies them by the RMS of the backbone's "
        "word embeddings (0.056 for all-MiniLM-L6-v2), so a prompt moves by the same fraction of a word vector "
        "per step on any backbone; 'absolute' takes them as given (the literature's T5 rates, e.g. 0.3). "
        "Adafactor's rates are always relative to each parameter's own RMS.",
        default="embedding_rms")
    optimizer: str = _help(
        "'adamw', or 'adafactor' (transformers' Adafactor with parameter scaling and no relative step: each "
        "group's rate is then relative to the RMS of the parameter it updates).", default="adamw")
    lr_ept: float | None = _help("Learning rate of EPT's fusion/projection/gate weights (default: lr_low_rank).",
                                 default=None)
    lr_head: float = _help("Learning rate of the classification head (classifiers only).", default=1e-2)
    lr_full: float = _help("Learning rate of every weight in full fine-tuning (method 'full').", default=2e-5)
    lr_lora: float = _help("Learning rate of the LoRA matrices (method 'lora').", default=5e-4)
    weight_decay: float = _help("AdamW weight decay (all groups).", default=1e-5)
    warmup_ratio: float = _help("Linear warm-up over this fraction of max_steps (ignored if warmup_steps > 0).",
                                default=0.06)
    warmup_steps: int = _help("Linear warm-up steps (overrides warmup_ratio when > 0).", default=0)
    lr_schedule: str = _help(
        "After the warm-up: 'linear' decays every rate to 0 at max_steps; 'constant' holds it, so the first N "
        "steps of a run are exactly an N-step run (with warmup_steps, not warmup_ratio) and one long run "
        "gives every shorter budget.", default="linear")
    test_at_best: bool = _help(
        "Also score the test split each time validation improves (logged in log.jsonl), so every shorter "
        "budget of a run has the test score of its best validation step. Selection still uses validation "
        "only.", default=False)
    max_grad_norm: float = _help("Clip the gradient norm to this value (0: no clipping).", default=1.0)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    batch_size: int = _help("Training examples per micro-batch per process.", default=16)
    eval_batch_size: int = _help("Examples per evaluation batch per process.", default=64)
    max_steps: int = _help("Optimizer steps to train.", default=1000)
    eval_steps: int = _help("Evaluate on the validation split every this many steps (0: only at the end).",
                            default=100)
    save_steps: int = _help("Write a checkpoint every this many steps (0: only at the end and on Ctrl-C).",
                            default=100)
    save_total_limit: int = _help("Checkpoints to keep (the newest ones).", default=2)
    logging_steps: int = _help("Print a progress line every this many steps when not on a terminal "
                               "(0: about 20 lines per run). log.jsonl always gets every step.", default=0)
    early_stopping_patience: int = _help("Stop after this many evaluations without improvement (0: never).",
                                         default=0)
    seed: int = _help("Seed of initialisation, data order and dropout.", default=42)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (accelerate's autocast; fp16 is meant for GPUs).",
                                 default="no")
    fsdp: bool = _help(
        "Shard the frozen backbone across the processes of a torchrun / `accelerate launch --multi_cpu` launch "
        "(PyTorch FSDP2, one unit per transformer block; eptkit.sharding), for backbones too large for one "
        "device. On CPUs (gloo) this is the way to shard; on GPUs use `accelerate launch --config_file "
        "recipes/accelerate/fsdp.yaml` (accelerate's FSDP, same layout). Needs 2+ processes and a "
        "classification task; not with --seeds/--sweep or methods ptuning/prefix.", default=False)
    gradient_checkpointing: bool = _help(
        "Activation checkpointing of the backbone's layers while training (transformers' own, non-reentrant): "
        "each layer's activations are recomputed in the backward pass instead of kept, so the memory for "
        "activations is about one layer's instead of all layers' (EPT on all-MiniLM-L6-v2, 16 x 188 tokens: "
        "37 MiB kept for the backward instead of 808 MiB) at the price of one more forward pass per step "
        "(2.1 times the step time there, on one CPU thread). Gradients and results are unchanged; evaluation "
        "and serving are not affected.", default=False)
    max_length: int = _help("Maximum text length in tokens; longer texts are truncated (counted in results.json's "
                            "'truncated'). DePT/EPT read texts up to their offset_length, which eptkit train "
                            "sets from this when --offset-length is not given. For PT, prompt_length + "
                            "max_length must fit the backbone's positions.", default=256)
    max_new_tokens: int | None = _help("Tokens to generate at evaluation for text-to-text models "
                                       "(default: the longest label word plus 2).", default=None)
    max_train_samples: int | None = _help("Train on a seeded random subset of this many examples.", default=None)
    max_eval_samples: int | None = _help("Evaluate on a seeded random subset of this many validation/test "
                                         "examples (whole MultiRC questions are not kept together).", default=None)
    regression_targets: str = _help(
        "Regression tasks: 'standardize' starts the head's output at the training labels' mean and measures the "
        "loss in units of their variance (the first steps then learn the variation, not the mean; predictions "
        "stay in label units); 'raw' trains on the labels as they are.", default="standardize")
    resume: bool = _help("Continue from the newest checkpoint in output_dir/checkpoints; with none there a "
                         "fresh run starts and says so on stderr. Every setting that changes the trajectory must "
                         "be the checkpoint's; max_steps may grow only under lr_schedule 'constant' with the "
                         "warm-up in warmup_steps (or none): the longer run then continues the same run.",
                         default=False)
    overwrite: bool = _help("Start afresh even if output_dir holds checkpoints of an earlier run.", default=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("lr", "lr_low_rank", "lr_head", "lr_full", "lr_lora"):
            _check_number(self, name, positive=True)
        if self.lr_ept is not None:
            _check_number(self, "lr_ept", positive=True)
        _check_number(self, "weight_decay")
        _check_number(self, "max_grad_norm")
        _check_number(self, "warmup_ratio")
        if self.warmup_ratio > 1:
            raise ValueError(f"warmup_ratio: must be between 0 and 1, got {self.warmup_ratio}")
        for name in ("gradient_accumulation_steps", "batch_size", "eval_batch_size", "max_steps", "max_length",
                     "save_total_limit"):
            _check_int(self, name, minimum=1)
        for name in ("warmup_steps", "eval_steps", "save_steps", "logging_steps", "early_stopping_patience", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("max_new_tokens", "max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        for name, choices in (("lr_unit", LR_UNITS), ("optimizer", OPTIMIZERS),
                              ("regression_targets", REGRESSION_TARGETS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing: must be true or false, got {self.gradient_checkpointing!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp: must be true or false, got {self.fsdp!r}")

    def group_lr(self, group: str) -> float:
        if group == "ept" and self.lr_ept is None:
            return self.lr_low_rank
        fields = lr_fields()
        if group not in fields:
            raise ValueError(f"parameter group {group!r} has no learning rate; known groups: {sorted(fields)}")
        if not hasattr(self, fields[group]):
            raise ValueError(f"parameter group {group!r}: its rate field {fields[group]!r} is not a TrainConfig field")
        return getattr(self, fields[group])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**data)




# Settings that change the trajectory: a resumed run must use the same ones.
TRAJECTORY_FIELDS = ("lr", "lr_low_rank", "lr_unit", "optimizer", "regression_targets", "lr_ept", "lr_head",
                     "lr_full", "lr_lora", "weight_decay",
                     "warmup_ratio", "warmup_steps", "lr_schedule", "max_grad_norm", "gradient_accumulation_steps",
                     "batch_size", "seed", "mixed_precision", "max_length", "max_train_samples",
                     "fsdp")  # fsdp: a sharded run's checkpoint holds one optimizer file per process


# ============================================================================ validation
def _check_positive_int(config, name: str) -> None:
    _check_int(config, name, minimum=1)


def _check_nonnegative_int(config, name: str) -> None:
    _check_int(config, name, minimum=0)


def _check_int(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: must be a {kind} integer, got {value!r}")


def _check_number(config, name: str, positive: bool = False) -> None:
    value = getattr(config, name)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            or (positive and value == 0)):
        raise ValueError(f"{name}: must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def default_text(name: str) -> str:
    """'(default: X)' for a method option, per method where their defaults differ (the CLI's help)."""
    by_method = {method: f.default for method, cls in config_classes().items() for f in dataclasses.fields(cls)
                 if f.name == name}
    if len(set(map(repr, by_method.values()))) == 1:
        return f"(default: {next(iter(by_method.values()))})"
    return "(default: " + ", ".join(f"{v} for {m}" for m, v in by_method.items()) + ")"

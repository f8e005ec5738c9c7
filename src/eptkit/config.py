"""Configurations of the three prompt methods (SPEC 1).

Each config is a dataclass whose fields carry their help text in `metadata["help"]` (the CLI
reads it). `validate()` runs at construction, so an impossible value fails where it is written,
with the field's name in the message. Configs round-trip through JSON with `to_dict`/`from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROMPT_INITS = ("sample_vocab", "text", "random")
POOLINGS = ("mean", "backbone", "text_first")
MODULE_INITS = ("zero", "random")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al., 2021): a trainable prompt of `prompt_length` vectors."""

    method: ClassVar[str] = "pt"

    prompt_length: int = _help("Number of virtual tokens l prepended to the input.", default=100)
    init: str = _help(
        "Prompt initialisation: 'sample_vocab' (random rows of the frozen vocabulary), "
        "'text' (embeddings of init_text, repeated/truncated), or 'random' (normal, std of the vocabulary).",
        default="sample_vocab",
    )
    init_text: str | None = _help("Text whose token embeddings initialise the prompt when init='text'.", default=None)
    pooling: str | None = _help(
        "Sequence classification only: 'mean' (mean of the text's last hidden states, prompt excluded), "
        "'backbone' (the model's own pooler/head, as PEFT does) or 'text_first' (the text's first token). "
        "None picks 'mean' for encoders and 'backbone' for decoder-only classifiers.",
        default=None,
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_positive_int(self, "prompt_length")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init: must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init_text: required (a non-empty string) when init='text'")
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
        cls = CONFIG_CLASSES.get(method)
        if cls is None:
            raise ValueError(f"method: unknown method {method!r}; expected one of {sorted(CONFIG_CLASSES)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> "PromptTuningConfig":
        return PromptTuningConfig.from_dict(json.loads(text))


@dataclass
class DePTConfig(PromptTuningConfig):
    """DePT (Shi & Lipani, 2024): a short prompt plus a low-rank offset to the input embeddings."""

    method: ClassVar[str] = "dept"

    prompt_length: int = _help("Length m of the short prompt P_s.", default=60)
    rank: int = _help("Rank r of the offset A (max_length x r) B (r x d).", default=30)
    max_length: int = _help(
        "Maximum source length s in tokens; the offset has one row per position. Longer inputs are an error.",
        default=256,
    )
    alpha: float = _help("Offset scale: D = (alpha / sqrt(rank)) * A @ B.", default=8.0)

    def validate(self) -> None:
        super().validate()
        _check_positive_int(self, "rank")
        _check_positive_int(self, "max_length")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")


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


CONFIG_CLASSES: dict[str, type[PromptTuningConfig]] = {
    c.method: c for c in (PromptTuningConfig, DePTConfig, EPTConfig)
}
# Every method `eptkit train` knows: eptkit's prompt methods (configured by the classes above), then
# the comparison methods of `eptkit.baselines` (LoRA, PEFT's P-tuning and prefix tuning, full
# fine-tuning, linear probe).
PROMPT_METHODS = tuple(CONFIG_CLASSES)
PEFT_PROMPT_METHODS = ("ptuning", "prefix")
METHODS = PROMPT_METHODS + ("lora",) + PEFT_PROMPT_METHODS + ("full", "head")


def _check_positive_int(config, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _check_nonnegative_int(config, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")

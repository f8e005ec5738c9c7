"""The method registry: every method `eptkit train` knows, in one table.

An entry names the method's config class (prompt methods), the nn.Module that implements it or the
function that builds the trainable model (baselines), its parameter groups and the TrainConfig field
holding each group's learning rate, and the command-line options it takes. The CLI's options, the
learning-rate lookup (`lr_field`), `eptkit.methods.build_method` and `eptkit.baselines.build_model` all
read this table, so a new prompt method is one module (config class + nn.Module) and one
`register_method(...)` call:

    register_method(MethodSpec("toy", config=ToyConfig, module=ToyModule, lr_groups={"prompt": "lr"}))

References may be "module:attribute" strings, resolved on first use, so reading the table (the CLI's
--help) imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

# Every classifier trains its head at lr_head, whatever the method.
HEAD_GROUP = {"head": "lr_head"}


@dataclass(frozen=True)
class MethodSpec:
    """One method. `config` and `module` (prompt methods) or `build` (baselines) may be objects or
    "module:attribute" strings."""

    name: str
    lr_groups: dict[str, str]  # parameter group -> TrainConfig field holding its learning rate
    config: Any = None  # the method's PromptTuningConfig subclass (prompt methods)
    module: Any = None  # nn.Module class: (config, word_embeddings, init_token_ids) -> forward() = (prompt, offset)
    build: Any = None  # baselines: (backbone, method_config, *, tokenizer, **options) -> a TrainableModel
    # Options a baseline takes besides TrainConfig's (a prompt method's are its config's fields):
    # option name -> (type, default, help); a name the prompt methods use shares their option.
    options: dict[str, tuple] = field(default_factory=dict)
    peft_format: bool = False  # a baseline saved in PEFT's own format (LoRA, P-tuning, prefix tuning)

    @property
    def is_prompt_method(self) -> bool:
        """A prompt method: a PromptedModel adapter (mixed batches, several runs per process, serving)."""
        return self.config is not None

    def config_class(self):
        return resolve(self.config)

    def module_class(self):
        return resolve(self.module)

    def builder(self):
        return resolve(self.build)


def resolve(ref):
    """The object a "module:attribute" string names (anything else as it is)."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add `spec` to the table (a method of the same name is replaced). Its rate fields are checked when
    a run starts (`TrainConfig.group_lr`)."""
    if (spec.config is None) == (spec.build is None):
        raise ValueError(f"method {spec.name!r}: give a config class (prompt method) or a build function (baseline)")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def prompt_methods() -> tuple[str, ...]:
    return tuple(n for n, s in METHODS.items() if s.is_prompt_method)


def config_classes() -> dict[str, type]:
    """Method name -> config class, for every prompt method."""
    return {n: s.config_class() for n, s in METHODS.items() if s.is_prompt_method}


def saved_by_peft(name: str) -> bool:
    """Whether a run of method `name` saves PEFT's own adapter files (LoRA, P-tuning, prefix tuning)."""
    return name in METHODS and METHODS[name].peft_format


def lr_fields() -> dict[str, str]:
    """Parameter group -> the TrainConfig field holding its learning rate, over every method."""
    out = dict(HEAD_GROUP)
    for spec in METHODS.values():
        out.update(spec.lr_groups)
    return out


_PROMPT = {"prompt": "lr"}
_DEPT = {**_PROMPT, "low_rank": "lr_low_rank"}
for _spec in (
    MethodSpec("pt", _PROMPT, config="eptkit.config:PromptTuningConfig", module="eptkit.methods.prompt_tuning:PromptTuning"),
    MethodSpec("dept", _DEPT, config="eptkit.config:DePTConfig", module="eptkit.methods.dept:DePT"),
    # EPT's modules train at lr_ept, which defaults to lr_low_rank (TrainConfig.group_lr)
    MethodSpec("ept", {**_DEPT, "ept": "lr_ept"}, config="eptkit.config:EPTConfig", module="eptkit.methods.ept:EPT"),
    MethodSpec("lora", {"lora": "lr_lora"}, build="eptkit.baselines:build_lora", peft_format=True,
               options={"lora_r": (int, 8, "LoRA rank (method lora).")}),
    # PEFT's P-tuning and prefix tuning take a number of virtual tokens: the prompt methods' --prompt-length
    MethodSpec("ptuning", _PROMPT, build="eptkit.baselines:build_peft_prompt", peft_format=True,
               options={"prompt_length": (int, 20, "")}),
    MethodSpec("prefix", _PROMPT, build="eptkit.baselines:build_peft_prompt", peft_format=True,
               options={"prompt_length": (int, 20, "")}),
    MethodSpec("full", {"full": "lr_full"}, build="eptkit.baselines:build_full"),
    MethodSpec("head", {}, build="eptkit.baselines:build_head"),
):
    METHODS[_spec.name] = _spec  # built in: checked by tests/test_registry.py, not at every import

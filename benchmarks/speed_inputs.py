"""What speed.py measures on: the backbones (the bundled MiniLM, a T5-base-shaped model with random weights,
tiny test models), a batch of real RTE pairs or random ids, and each method's model built on a backbone."""

from __future__ import annotations

import copy
import csv
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODELS = ("minilm", "t5-base-shaped", "tiny-bert", "tiny-t5")

# ---------------------------------------------------------------------------------------- backbones
def minilm_path() -> Path:
    from eptkit.backbones import bundled_model_path

    return Path(bundled_model_path())


def _t5_config(**kw):
    from transformers import T5Config

    return T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)


def build_backbone(model: str) -> tuple[nn.Module, Any]:
    """(pristine backbone in fp32, tokenizer or None). Random weights except for MiniLM."""
    if model == "minilm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = minilm_path()
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)
    if model == "t5-base-shaped":
        from transformers import T5ForConditionalGeneration

        cfg = _t5_config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                         num_heads=12, feed_forward_proj="relu")
        return T5ForConditionalGeneration(cfg), None
    if model == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, num_labels=2)
        return BertForSequenceClassification(cfg), None
    if model == "tiny-t5":
        from transformers import T5ForConditionalGeneration

        cfg = _t5_config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return T5ForConditionalGeneration(cfg), None
    raise ValueError(f"model: expected one of {MODELS}, got {model!r}")


def _default_data_dir() -> Path:
    env = os.environ.get("EPTKIT_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rte_pairs(data_dir: Path | None, count: int, seed: int) -> list[tuple[str, str]] | None:
    path = (data_dir or _default_data_dir()) / "glue" / "RTE" / "train.tsv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if len(r) >= 3]
    if len(rows) < count:
        return None
    rng = random.Random(seed)
    return [(r[1], r[2]) for r in rng.sample(rows, count)]


def make_batch(model: str, backbone: nn.Module, tokenizer, batch_size: int, source_length: int, target_length: int,
               seed: int, data_dir: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """One fixed batch (CPU tensors) and a sentence saying what it is."""
    g = torch.Generator().manual_seed(seed)
    vocab = backbone.config.vocab_size
    is_seq2seq = bool(getattr(backbone.config, "is_encoder_decoder", False))
    batch: dict[str, torch.Tensor]
    pairs = _rte_pairs(data_dir, batch_size, seed) if tokenizer is not None else None
    if pairs is not None:
        enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                        max_length=source_length, padding="max_length", return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        real = batch["attention_mask"].sum(1).float()
        what = (f"{batch_size} RTE train sentence pairs (seeded sample), tokenized with the backbone's tokenizer, "
                f"padded/truncated to {source_length} tokens (real tokens per row: mean {real.mean():.0f}, "
                f"max {real.max():.0f}; padding costs the same compute as text)")
    else:
        ids = torch.randint(3, vocab, (batch_size, source_length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        what = f"random token ids, {batch_size} x {source_length}, no padding"
    if is_seq2seq:
        batch["labels"] = torch.randint(2, vocab, (batch_size, target_length), generator=g)
        what += f"; random target ids of length {target_length}"
    else:
        batch["labels"] = torch.randint(0, backbone.config.num_labels, (batch_size,), generator=g)
    return batch, what


# ------------------------------------------------------------------------------------------ methods
def build_method_model(key: str, base: nn.Module, *, pt_length: int, short_length: int, rank: int,
                       source_length: int, pooling: str | None) -> nn.Module:
    """A fresh copy of `base` wrapped for method `key` (eptkit PT/DePT/EPT, PEFT PT, LoRA, full FT)."""
    from eptkit import DePTConfig, EPTConfig, PromptTuningConfig, get_prompted_model
    from eptkit.baselines import FullFineTuneModel, LoRAModel
    from eptkit.task_types import detect_task_type

    model = copy.deepcopy(base)
    task = detect_task_type(model)
    pool = {"pooling": pooling} if task == "classification" else {}
    if key == "pt":
        return get_prompted_model(model, PromptTuningConfig(prompt_length=pt_length, **pool))
    if key == "pt_short":
        return get_prompted_model(model, PromptTuningConfig(prompt_length=short_length, **pool))
    if key == "dept":
        return get_prompted_model(model, DePTConfig(prompt_length=short_length, rank=rank, offset_length=source_length, **pool))
    if key == "ept":
        return get_prompted_model(model, EPTConfig(prompt_length=short_length, rank=rank, offset_length=source_length, **pool))
    if key == "peft_pt":
        import peft

        peft_task = {"classification": peft.TaskType.SEQ_CLS, "seq2seq": peft.TaskType.SEQ_2_SEQ_LM,
                     "causal": peft.TaskType.CAUSAL_LM}[task]
        # Encoder-only prompt for seq2seq (PEFT's default also prepends a prompt to the decoder), so
        # that PEFT's PT runs the computation eptkit's PT runs (SPEC 2: prompt to the encoder only).
        extra = {"num_transformer_submodules": 1} if task == "seq2seq" else {}
        return peft.get_peft_model(
            model, peft.PromptTuningConfig(task_type=peft_task, num_virtual_tokens=pt_length, **extra)
        )
    if key == "lora":
        return LoRAModel(model, r=8)
    if key == "full":
        return FullFineTuneModel(model)
    raise ValueError(f"unknown method {key!r}")


def method_labels(pt_length: int, short_length: int, rank: int) -> dict[str, str]:
    return {
        "pt": f"eptkit PT (l={pt_length})",
        "dept": f"eptkit DePT (m={short_length}, r={rank})",
        "ept": f"eptkit EPT (m={short_length}, r={rank})",
        "peft_pt": f"PEFT PT (l={pt_length})",
        "lora": "PEFT LoRA (r=8, query/value)",
        "full": "full fine-tuning",
        "ept_compiled": f"eptkit EPT (m={short_length}), compiled",
        "pt_short": f"eptkit PT (l={short_length})",
    }


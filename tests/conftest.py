"""Shared fixtures: tiny random backbones of every supported family, and the bundled MiniLM."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from eptkit.backbones import bundled_model_path

VOCAB = 120
HIDDEN = 32


def tiny_bert(num_labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(num_labels=2, seed=0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=130, num_labels=num_labels, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config()).eval()


def tiny_llama_classifier(num_labels=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_llama_config(num_labels=num_labels)).eval()


def minilm_path() -> Path:
    return Path(bundled_model_path())


def data_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("EPTKIT_DATA_DIR", default))


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, e.g. load_benchmark("speed"). Its
    folder goes on the path, as it is when the script runs, so its sibling imports (`import speed`) work."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eptkit_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def random_ids():
    def make(batch=2, length=7, low=3):
        g = torch.Generator().manual_seed(1234)
        return torch.randint(low, VOCAB, (batch, length), generator=g)
    return make

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("EPTKIT_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"no data directory at {DATA_DIR} (set EPTKIT_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from eptkit.backbones import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path())


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer


def make_word_tokenizer(words, *, eos_after_source=False, bos=False):
    """A tiny whitespace word-level tokenizer with predictable ids: <pad>=0 <eos>=1 <unk>=2 <bos>=3,
    then `words` in order. eos_after_source appends <eos> to every encoding (T5-like targets);
    bos prepends <bos> (Llama-like)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<bos>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos_after_source:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    elif bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   bos_token="<bos>" if bos else None)

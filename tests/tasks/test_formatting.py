"""encode() and Collator: exact token values on tiny examples, padding sides, -100 masking, truncation."""

import logging

import datasets
import pytest
import torch

from eptkit.tasks import IGNORE_INDEX, MODEL_INPUT_KEYS, TASKS, Collator, DataError, encode, load_task

RTE = TASKS["rte"]
# word-level vocabulary: <pad>=0 <eos>=1 <unk>=2 <bos>=3, then these from 4 on
WORDS = "rte sentence1: sentence2: a b c d Answer: entailment not_entailment".split()
V = {w: i + 4 for i, w in enumerate(WORDS)}


@pytest.fixture
def rows():
    return datasets.Dataset.from_dict({"sentence1": ["a b", "c"], "sentence2": ["d", "a a a"], "label": [0, 1],
                                       "idx": [7, 8]})


def test_classification_exact(rows, word_tokenizer):
    tok = word_tokenizer(WORDS)
    enc = encode(rows, RTE, tok, "classification", 16)
    assert enc.column_names == ["input_ids", "attention_mask", "labels"]
    assert enc[0] == {"input_ids": [V["a"], V["b"], V["d"]], "attention_mask": [1, 1, 1], "labels": 0}
    batch = Collator(tok, "classification")(list(enc))
    assert batch["input_ids"].tolist() == [[V["a"], V["b"], V["d"], 0], [V["c"], V["a"], V["a"], V["a"]]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # right padding
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1]


def test_seq2seq_exact(rows, word_tokenizer):
    tok = word_tokenizer(WORDS, eos_after_source=True)  # T5-like: </s> after source and target
    enc = encode(rows, "rte", tok, "seq2seq", 16)
    src0 = [V["rte"], V["sentence1:"], V["a"], V["b"], V["sentence2:"], V["d"], 1]
    assert enc[0] == {"input_ids": src0, "attention_mask": [1] * 7, "labels": [V["entailment"], 1], "reference": 0}
    assert enc[1]["labels"] == [V["not_entailment"], 1]
    batch = Collator(tok, "seq2seq", pad_to_multiple_of=4)(list(enc))
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][0, -1] == 0  # right padded to 8
    assert batch["labels"].tolist() == [[V["entailment"], 1, IGNORE_INDEX, IGNORE_INDEX],
                                        [V["not_entailment"], 1, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["reference"].tolist() == [0, 1]


def test_causal_exact_and_left_padding(rows, word_tokenizer):
    tok = word_tokenizer(WORDS)
    enc = encode(rows, RTE, tok, "causal", 16)
    src0 = [V["rte"], V["sentence1:"], V["a"], V["b"], V["sentence2:"], V["d"], V["Answer:"]]
    src1 = [V["rte"], V["sentence1:"], V["c"], V["sentence2:"], V["a"], V["a"], V["a"], V["Answer:"]]
    assert enc[0] == {"input_ids": src0 + [V["entailment"], 1], "attention_mask": [1] * 9,
                      "labels": [IGNORE_INDEX] * 7 + [V["entailment"], 1], "source_input_ids": src0, "reference": 0}
    batch = Collator(tok, "causal")(list(enc))
    assert batch["input_ids"].tolist() == [[0] + src0 + [V["entailment"], 1], src1 + [V["not_entailment"], 1]]
    assert batch["attention_mask"].tolist() == [[0] + [1] * 9, [1] * 10]  # LEFT padding
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 8 + [V["entailment"], 1],
                                        [IGNORE_INDEX] * 8 + [V["not_entailment"], 1]]
    assert batch["source_input_ids"].tolist() == [[0] + src0, src1]
    assert batch["source_attention_mask"].tolist() == [[0] + [1] * 7, [1] * 8]
    assert not set(batch) - set(MODEL_INPUT_KEYS) - {"source_input_ids", "source_attention_mask", "reference"}


def test_too_long_is_an_error_naming_task_split_row(rows, word_tokenizer):
    tok = word_tokenizer(WORDS)
    with pytest.raises(DataError, match=r"task 'rte' split 'validation' row 1: 4 tokens exceed max_length=3"):
        encode(rows, RTE, tok, "classification", 3, split="validation")
    with pytest.raises(DataError, match=r"row 0: 9 tokens exceed max_length=8"):  # causal: source + target
        encode(rows, RTE, tok, "causal", 8, split="train")
    with pytest.raises(DataError, match=r"split 'test' row 0"):  # a DatasetDict names its splits
        encode(datasets.DatasetDict(test=rows), RTE, tok, "seq2seq", 2)


def test_truncation_reports_count(rows, word_tokenizer, caplog):
    tok = word_tokenizer(WORDS, eos_after_source=True)
    with caplog.at_level(logging.WARNING, logger="eptkit"):
        enc = encode(rows, RTE, tok, "seq2seq", 7, truncation=True, split="train")
    assert "truncated 1 of 2 rows" in caplog.text
    assert [len(x) for x in enc["input_ids"]] == [7, 7] and enc[1]["input_ids"][-1] == 1  # eos kept
    with caplog.at_level(logging.WARNING, logger="eptkit"):
        enc = encode(rows, RTE, tok, "classification", 3, truncation=True)
    assert [len(x) for x in enc["input_ids"]] == [3, 3]


def test_causal_truncation_keeps_bos_cue_and_target(rows, word_tokenizer):
    tok = word_tokenizer(WORDS, bos=True)
    enc = encode(rows, RTE, tok, "causal", 6, truncation=True)
    assert enc[0]["input_ids"] == [3, V["sentence2:"], V["d"], V["Answer:"], V["entailment"], 1]
    assert enc[0]["labels"] == [IGNORE_INDEX] * 4 + [V["entailment"], 1]
    with pytest.raises(DataError, match="exceed max_length=3"):  # BOS + target alone do not fit
        encode(rows, RTE, tok, "causal", 3, truncation=True)


def test_bert_pair_and_regression(bert_tokenizer):
    stsb = datasets.Dataset.from_dict({"sentence1": ["a man", "x"], "sentence2": ["a dog", "y z"], "label": [4.0, 1.25],
                                       "idx": [0, 1]})
    enc = encode(stsb, "stsb", bert_tokenizer, "classification", 32)
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert enc[0]["input_ids"][0] == cls and enc[0]["input_ids"].count(sep) == 2
    assert enc[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    batch = Collator(bert_tokenizer, "classification")(list(enc))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.0, 1.25]
    assert batch["token_type_ids"].tolist()[1] == [0, 0, 0, 1, 1, 1, 0]
    assert batch["attention_mask"].tolist()[1] == [1] * 6 + [0]
    s2s = encode(stsb, "stsb", bert_tokenizer, "seq2seq", 32)  # label rendered "4.0" / "1.2"
    assert bert_tokenizer.decode(s2s[1]["labels"], skip_special_tokens=True) == "1. 2"


def test_multirc_keeps_question_id(bert_tokenizer):
    ds = datasets.Dataset.from_dict({"paragraph": ["P p", "P p"], "question": ["q?", "q?"], "answer": ["a", "b"],
                                     "paragraph_idx": [0, 0], "question_idx": [0, 0], "answer_idx": [0, 1],
                                     "question_id": [5, 5], "label": [1, 0], "idx": [0, 1]})
    enc = encode(ds, "multirc", bert_tokenizer, "classification", 32)
    assert "question_id" in enc.column_names and "paragraph" not in enc.column_names
    batch = Collator(bert_tokenizer, "classification")(list(enc))
    assert batch["question_id"].tolist() == [5, 5]
    mixed = Collator(bert_tokenizer, "classification")([{**f, "note": "x"} for f in enc])
    assert mixed["note"] == ["x", "x"]  # non-numeric values pass through as lists


def test_real_rte_fits_512(data_dir, bert_tokenizer):
    try:
        dsd = load_task("rte", data_dir)
    except DataError:
        pytest.skip("RTE absent")
    enc = encode(dsd["validation"], "rte", bert_tokenizer, "classification", 512)
    assert len(enc) == len(dsd["validation"]) and list(enc["labels"]) == list(dsd["validation"]["label"])
    batch = Collator(bert_tokenizer, "classification", pad_to_multiple_of=8)([enc[i] for i in range(4)])
    assert batch["input_ids"].shape[1] % 8 == 0


def test_bad_arguments(rows, word_tokenizer):
    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="task_type"):
        encode(rows, RTE, tok, "generation", 8)
    with pytest.raises(ValueError, match="task_type"):
        Collator(tok, "lm")
    with pytest.raises(DataError, match="empty split"):
        encode(rows.select([]), RTE, tok, "classification", 8)

"""load_files: a user's own CSV / TSV / JSONL files."""

import json

import pytest

from eptkit.metrics import compute_metrics
from eptkit.tasks import DataError, load_files


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_all_splits(tmp_path):
    train = write(tmp_path / "train.csv", 'text,label\n"hello, world",pos\nbad,neg\n"say ""hi""",pos\n')
    val = write(tmp_path / "val.csv", "text,label\nok,pos\n")
    test = write(tmp_path / "test.csv", "text,label\nmeh,neg")  # no final newline
    dsd, spec = load_files(train, val, test)
    assert spec.label_names == ("neg", "pos") and spec.text_fields == ("text",) and spec.benchmark == "custom"
    assert dsd["train"][0] == {"text": "hello, world", "label": 1, "idx": 0}
    assert dsd["train"][2]["text"] == 'say "hi"'
    assert list(dsd["validation"]["label"]) == [1] and list(dsd["test"]["label"]) == [0]
    assert spec.source_text(dsd["train"][1]) == "custom text: bad"
    assert spec.render_label(1) == "pos" and spec.parse_label("neg") == 0
    assert compute_metrics(spec, ["pos", "neg", "x"], [1, 0, 0])["accuracy"] == pytest.approx(200 / 3)


def test_tsv_pair_integer_labels_sorted_numerically(tmp_path):
    rows = "".join(f's{i} "quote\ts2 {i}\t{i % 11}\n' for i in range(40))
    train = write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\n" + rows)
    dsd, spec = load_files(train, split_seed=1)
    assert spec.text_fields == ("sentence1", "sentence2")
    assert spec.label_names == tuple(str(i) for i in range(11))  # "10" after "9", so ids equal the integers
    assert {k: len(v) for k, v in dsd.items()} == {"train": 32, "validation": 4, "test": 4}
    all_idx = sorted([*dsd["train"]["idx"], *dsd["validation"]["idx"], *dsd["test"]["idx"]])
    assert all_idx == list(range(40))  # a partition of the training file
    assert list(dsd["train"]["idx"]) == sorted(dsd["train"]["idx"])  # remaining rows keep file order
    for row in dsd["train"]:
        assert row["label"] == row["idx"] % 11 and row["sentence1"] == f's{row["idx"]} "quote'
    again, _ = load_files(train, split_seed=1)
    other, _ = load_files(train, split_seed=2)
    assert list(again["validation"]["idx"]) == list(dsd["validation"]["idx"])
    assert list(other["validation"]["idx"]) != list(dsd["validation"]["idx"])


def test_jsonl_regression_auto(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "score": i / 4}) for i in range(20)]
    train = write(tmp_path / "train.jsonl", "\n".join(lines))
    dsd, spec = load_files(train, label_column="score", holdout=0.25)
    assert spec.is_regression and spec.num_labels == 1 and spec.metrics == ("pearson", "spearman")
    assert {k: len(v) for k, v in dsd.items()} == {"train": 10, "validation": 5, "test": 5}
    assert dsd["train"].features["label"].dtype == "float64"
    assert spec.render_label(1.234) == "1.23"


def test_jsonl_booleans_and_forced_names(tmp_path):
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n' * 5)
    dsd, spec = load_files(train)
    assert spec.label_names == ("False", "True") and list(dsd["validation"]["label"]) in ([0], [1])
    _, spec = load_files(train, label_names=("True", "False"))
    assert spec.label_names == ("True", "False")
    with pytest.raises(DataError, match="is not a finite number"):
        load_files(train, regression=True)


@pytest.mark.parametrize("content,match", [
    ("text,label\nx,a\ny,b\nz,a,extra\n", r"train\.csv:4: expected 2 columns"),
    ("text,label\nx,a\ny,\n", r"train\.csv:3: missing label column"),
    ("text\nx\n", r"missing label column 'label'"),
    ("words,label\nx,a\n", "no text columns given"),
    ("", "empty file"),
    ("text,label\n", "no data rows"),
    ("text,label\nx,a\ny,a\n", "at least two classes"),
])
def test_bad_csv(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        load_files(write(tmp_path / "train.csv", content))


def test_unknown_label_in_validation(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\nx,a\ny,b\n")
    val = write(tmp_path / "dev.csv", "text,label\nx,a\ny,c\n")
    with pytest.raises(DataError, match=r"dev\.csv:3: unknown label 'c'"):
        load_files(train, val, val)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_files(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unsupported file type"):
        load_files(write(tmp_path / "train.txt", "x"))
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv:2: not valid UTF-8"):
        load_files(tmp_path / "latin1.csv")
    with pytest.raises(DataError, match=r"train\.jsonl:2: invalid JSON"):
        load_files(write(tmp_path / "train.jsonl", '{"text": "a", "label": 1}\n{"text": \n'))
    with pytest.raises(DataError, match=r"train\.jsonl:1: expected a JSON object"):
        load_files(write(tmp_path / "train.jsonl", "[1, 2]\n"))
    with pytest.raises(DataError, match=r"train\.jsonl:2: column .text. should be a string"):
        load_files(write(tmp_path / "train.jsonl", '{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n'))
    with pytest.raises(DataError, match="too few"):
        load_files(write(tmp_path / "train.csv", "text,label\nx,a\ny,b\n"))


def test_k_shot_on_user_files(tmp_path):
    from eptkit.tasks import sample_k_shot

    train = write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(30)))
    dsd, spec = load_files(train, k_shot=3, k_shot_seed=5)
    assert sorted(dsd["train"]["label"]) == [0, 0, 0, 1, 1, 1]
    full, _ = load_files(train)
    again = sample_k_shot(full["train"], spec, 3, seed=5)
    assert list(again["idx"]) == list(dsd["train"]["idx"])

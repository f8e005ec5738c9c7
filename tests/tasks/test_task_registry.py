import dataclasses

import pytest

from eptkit.tasks import ANSWER_CUE, TASKS, DataError, TaskSpec, get_task

NAMES = "mnli qqp qnli sst2 stsb mrpc rte cola multirc boolq wic wsc cb".split()


def test_all_thirteen_tasks():
    assert sorted(TASKS) == sorted(NAMES)
    for name, spec in TASKS.items():
        assert spec.name == name and spec.benchmark in ("glue", "superglue")
        assert spec.main_metric in (*spec.metrics, "average")
        assert (spec.main_metric == "average") == (len(spec.metrics) > 1)
        if spec.is_regression:
            assert spec.num_labels == 1
        else:
            assert spec.num_labels == len(spec.label_names) == len(spec.label_words)


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["rte"].name = "x"


@pytest.mark.parametrize("alias", ["SST-2", "sst2", "Sst_2"])
def test_aliases(alias):
    assert get_task(alias) is TASKS["sst2"]


def test_unknown_task_lists_valid_names():
    with pytest.raises(DataError, match="valid names: mnli, qqp"):
        get_task("wnli")


def test_spec_passes_through():
    assert get_task(TASKS["cb"]) is TASKS["cb"]


@pytest.mark.parametrize("name", NAMES)
def test_templates_render_every_field(name):
    spec = TASKS[name]
    row = {f: f"<{f}>" for f in ("premise hypothesis question1 question2 question sentence sentence1 sentence2 "
                                "paragraph answer passage word text span1_text span2_text").split()}
    source = spec.source_text(row)
    for f in spec.text_fields:
        assert f"<{f}>" in source
    assert spec.causal_text(row) == source + ANSWER_CUE
    segments = spec.segments(row)
    assert 1 <= len(segments) <= 2
    assert all(f"<{f}>" in " ".join(segments) for f in spec.text_fields)


def test_examples():
    assert TASKS["rte"].source_text({"sentence1": "A.", "sentence2": "B."}) == "rte sentence1: A. sentence2: B."
    assert TASKS["wsc"].segments({"text": "T", "span1_text": "Mark", "span2_text": "He"}) == ("T", "He refers to Mark")
    assert TASKS["multirc"].segments({"question": "Q?", "answer": "A", "paragraph": "P"}) == ("Q? A", "P")


def test_label_words_round_trip():
    for spec in TASKS.values():
        if not spec.is_regression:
            for i in range(spec.num_labels):
                assert spec.parse_label(" " + spec.render_label(i) + "\n") == i
            assert spec.parse_label("maybe") is None
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")  # Hub order
    assert TASKS["cb"].label_names == ("entailment", "contradiction", "neutral")


@pytest.mark.parametrize("score,text", [(0.0, "0.0"), (3.8, "3.8"), (3.75, "3.8"), (4.09, "4.0"), (4.11, "4.2"),
                                        (5.0, "5.0"), (2.5, "2.4"), (0.1, "0.0")])
def test_stsb_rendering(score, text):
    # T5: round(score * 5) / 5 (ties to even: 2.5 -> 12.5 -> 12 -> 2.4), one decimal
    spec = TASKS["stsb"]
    assert spec.render_label(score) == text
    assert text in spec.label_words
    assert spec.parse_label(text) == pytest.approx(float(text))


def test_stsb_parse_invalid():
    spec = TASKS["stsb"]
    assert spec.parse_label("nan") is None and spec.parse_label("five") is None and spec.parse_label("inf") is None


def test_custom_spec_is_a_taskspec():
    spec = TaskSpec(name="mine", benchmark="custom", text_fields=("text",), label_names=("a", "b"),
                    template="mine text: {text}", label_words=("a", "b"), metrics=("accuracy",), main_metric="accuracy")
    assert spec.num_labels == 2 and not spec.is_regression

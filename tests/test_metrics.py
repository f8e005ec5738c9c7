"""compute_metrics against scikit-learn / scipy, plus hand-computed MultiRC and invalid-prediction cases."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from eptkit.metrics import compute_metrics
from eptkit.tasks import TASKS, DataError

rng = np.random.default_rng(0)


@pytest.mark.parametrize("task", sorted(t for t in TASKS if t != "multirc"))
def test_against_reference_implementations(task):
    spec = TASKS[task]
    n = 200
    if spec.is_regression:
        y = rng.uniform(0, 5, n)
        p = y + rng.normal(0, 1.5, n)
    else:
        y = rng.integers(0, spec.num_labels, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, spec.num_labels, n))
    got = compute_metrics(task, p, y)
    expected = {
        "accuracy": lambda: skm.accuracy_score(y, p),
        "f1": lambda: skm.f1_score(y, p),
        "macro_f1": lambda: skm.f1_score(y, p, average="macro"),
        "matthews_correlation": lambda: skm.matthews_corrcoef(y, p),
        "pearson": lambda: stats.pearsonr(p, y)[0],
        "spearman": lambda: stats.spearmanr(p, y)[0],
    }
    assert set(got) == {*spec.metrics, "average"}
    for name in spec.metrics:
        assert got[name] == pytest.approx(100 * expected[name]())
    assert got["average"] == pytest.approx(np.mean([got[m] for m in spec.metrics]))
    assert got[spec.main_metric] == (got["average"] if len(spec.metrics) > 1 else got[spec.metrics[0]])


def test_strings_equal_ids():
    y = rng.integers(0, 3, 50)
    p = rng.integers(0, 3, 50)
    words = [TASKS["cb"].label_words[i] for i in p]
    assert compute_metrics("cb", words, y) == compute_metrics("cb", p, y)


def test_numpy_scalars_and_lists():
    preds = [np.int64(1), np.int32(0), 1.0]
    assert compute_metrics("rte", preds, np.array([1, 0, 1]))["accuracy"] == 100.0


def test_logits_are_argmaxed():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert compute_metrics("sst2", logits, [1, 1, 1])["accuracy"] == pytest.approx(200 / 3)


def test_multirc_by_hand():
    # question 10: answers (ref 1, 0, 1), predicted (1, 0, 0) -> not all right
    # question 11: answers (ref 0, 1),    predicted (0, 1)    -> all right
    # question 12: answer  (ref 1),       predicted "True"    -> all right (a label word)
    refs = [1, 0, 1, 0, 1, 1]
    preds = [1, 0, 0, 0, 1, "True"]
    groups = [10, 10, 10, 11, 11, 12]
    got = compute_metrics("multirc", preds, refs, groups)
    # positive class: TP = 3 (rows 0, 4, 5), FP = 0, FN = 1 (row 2) -> F1 = 2*3 / (2*3 + 0 + 1) = 6/7
    assert got["f1a"] == pytest.approx(100 * 6 / 7)
    assert got["em"] == pytest.approx(100 * 2 / 3)
    assert got["average"] == pytest.approx((100 * 6 / 7 + 100 * 2 / 3) / 2)
    with pytest.raises(ValueError, match="group"):
        compute_metrics("multirc", preds, refs)


def test_invalid_words_count_as_wrong_binary():
    # MRPC: refs 1 1 0 0; predictions: right, invalid, right, invalid.
    # invalid -> opposite of the reference: row 1 is a false negative, row 3 a false positive.
    got = compute_metrics("mrpc", ["equivalent", "yes", "not_equivalent", "Equivalent"], [1, 1, 0, 0])
    assert got["accuracy"] == 50.0
    # TP = 1, FP = 1, FN = 1 -> F1 = 2 / 4
    assert got["f1"] == 50.0
    # an out-of-range id is invalid too
    assert compute_metrics("rte", [0, 2, -1, 1], [0, 0, 1, 1])["accuracy"] == 50.0


def test_none_is_invalid():
    assert compute_metrics("mrpc", [None, 1, 0, None], [1, 1, 0, 0]) == \
        compute_metrics("mrpc", ["?", "equivalent", "not_equivalent", "?"], [1, 1, 0, 0])
    assert compute_metrics("stsb", [None, 1.0, 4.0], [0.0, 1.0, 5.0]) == compute_metrics("stsb", ["x", 1.0, 4.0], [0.0, 1.0, 5.0])


def test_invalid_words_count_as_wrong_multiclass():
    # CB: refs e c n e; preds e, invalid, n, "neutral " (whitespace ignored: wrong class)
    got = compute_metrics("cb", ["entailment", "contra", "neutral", "neutral "], [0, 1, 2, 0])
    assert got["accuracy"] == 50.0
    # per class F1: entailment TP1 FN1 -> 2/3; contradiction TP0 FN1 -> 0; neutral TP1 FP1 -> 2/3
    assert got["macro_f1"] == pytest.approx(100 * (2 / 3 + 0 + 2 / 3) / 3)


def test_stsb_invalid_strings_are_worst_case():
    refs = [0.0, 1.0, 4.0, 5.0]
    got = compute_metrics("stsb", ["0.2", "junk", "nan", "4.8"], refs)
    # junk for ref 1.0 -> 5.0 (farther end of [0, 5]); nan for ref 4.0 -> 0.0
    expected = [0.2, 5.0, 0.0, 4.8]
    assert got["pearson"] == pytest.approx(100 * stats.pearsonr(expected, refs)[0])
    assert got["spearman"] == pytest.approx(100 * stats.spearmanr(expected, refs)[0])


def test_constant_predictions():
    assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0
    assert compute_metrics("cola", [1, 1, 1], [0, 1, 1])["matthews_correlation"] == 0.0


def test_bad_calls():
    with pytest.raises(ValueError, match="2 predictions but 3"):
        compute_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("rte", [], [])
    with pytest.raises(DataError, match="valid names"):
        compute_metrics("nope", [0], [0])

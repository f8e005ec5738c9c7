"""The split protocol of docs/method.md ("Tasks, splits and metrics") on the real files in shared/data (skipping tasks whose files are absent)."""

import json
from collections import Counter

import datasets
import pytest

from eptkit.tasks import LARGE_TASKS, SMALL_TASKS, TASKS, DataError, load_task

GLUE_DIR = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "qnli": "QNLI", "qqp": "QQP",
            "mnli": "MNLI"}
SG_DIR = {"multirc": "MultiRC", "boolq": "BoolQ", "wic": "WiC", "wsc": "WSC", "cb": "CB"}


def original_size(data_dir, task, split):
    """Examples in an original file, counted independently of the loader (MultiRC: answers, questions)."""
    if task in GLUE_DIR:
        name = {"train": "train.tsv", "validation": "dev.tsv"}[split]
        lines = (data_dir / "glue" / GLUE_DIR[task] / name).read_text(encoding="utf-8").split("\n")
        lines = [ln for ln in lines if ln]
        return len(lines) - (task != "cola")  # every GLUE file but CoLA's has a header
    path = data_dir / "superglue" / SG_DIR[task] / {"train": "train.jsonl", "validation": "val.jsonl"}[split]
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if task == "multirc":
        questions = [q for r in rows for q in r["passage"]["questions"]]
        return sum(len(q["answers"]) for q in questions), len(questions)
    return len(rows)


_cache = {}


def cached(task, data_dir):
    """The default-protocol DatasetDict, parsed once per session; skips where local files are absent."""
    if task not in _cache:
        try:
            _cache[task] = load_task(task, data_dir)
        except DataError as e:
            if "file not found" not in str(e):
                raise
            _cache[task] = e
    if isinstance(_cache[task], Exception):
        pytest.skip(f"{task}: local files absent ({_cache[task]})")
    return _cache[task]


@pytest.fixture(scope="module", params=sorted(TASKS))
def loaded(request, data_dir):
    return request.param, cached(request.param, data_dir)


def test_split_sizes(loaded, data_dir):
    task, dsd = loaded
    sizes = {k: len(v) for k, v in dsd.items()}
    if task in LARGE_TASKS:
        n_train = original_size(data_dir, task, "train")
        assert sizes == {"train": n_train - 1000, "validation": 1000, "test": original_size(data_dir, task, "validation")}
    elif task == "multirc":
        n_answers, n_questions = original_size(data_dir, task, "validation")
        assert sizes["train"] == original_size(data_dir, task, "train")[0]
        assert sizes["validation"] + sizes["test"] == n_answers
        assert len(set(dsd["validation"]["question_id"])) == n_questions // 2
        assert len(set(dsd["test"]["question_id"])) == n_questions - n_questions // 2
    else:
        assert task in SMALL_TASKS
        n_val = original_size(data_dir, task, "validation")
        assert sizes == {"train": original_size(data_dir, task, "train"), "validation": n_val // 2,
                         "test": n_val - n_val // 2}


def test_schema_and_labels(loaded):
    task, dsd = loaded
    spec = TASKS[task]
    for split in ("train", "validation", "test"):
        ds = dsd[split]
        for f in (*spec.text_fields, "idx", "label"):
            assert f in ds.column_names
        labels = ds["label"]
        if spec.is_regression:
            assert ds.features["label"].dtype == "float64"
            assert 0.0 <= min(labels) and max(labels) <= 5.0
        else:
            assert ds.features["label"].dtype == "int64"
            # every class occurs in every split (true of all these tasks' splits)
            assert set(labels) == set(range(spec.num_labels)), (split, Counter(labels))


def test_no_overlap(loaded):
    task, dsd = loaded
    key = "question_id" if task == "multirc" else "idx"
    if task in LARGE_TASKS:  # validation is carved out of train: the two partition the training file
        train, val = set(dsd["train"]["idx"]), set(dsd["validation"]["idx"])
        assert not train & val and len(train | val) == len(dsd["train"]) + 1000
    else:
        assert not set(dsd["validation"][key]) & set(dsd["test"][key])
        assert len(set(dsd["validation"]["idx"]) | set(dsd["test"]["idx"])) == len(dsd["validation"]) + len(dsd["test"])


def test_deterministic_and_seeded(loaded, data_dir):
    task, dsd = loaded
    if task in ("multirc", "sst2"):
        pytest.skip("covered by the smaller tasks (the code path is the same); keeps the suite fast")
    again = load_task(task, data_dir)
    for split in dsd:
        assert dsd[split]["idx"] == again[split]["idx"]
    other = load_task(task, data_dir, split_seed=7)
    assert other["validation"]["idx"] != dsd["validation"]["idx"]
    assert sorted([*other["validation"]["idx"], *other["test"]["idx"]]) == sorted([*dsd["validation"]["idx"], *dsd["test"]["idx"]])


def test_multirc_groups_stay_together(data_dir):
    cached("multirc", data_dir)  # skips if absent
    dsd = load_task("multirc", data_dir, split_seed=3)
    val, test = set(dsd["validation"]["question_id"]), set(dsd["test"]["question_id"])
    assert not val & test
    # question ids are unique across paragraphs: (paragraph_idx, question_idx) -> one question_id
    pairs = set(zip(dsd["validation"]["paragraph_idx"], dsd["validation"]["question_idx"], dsd["validation"]["question_id"]))
    assert len(pairs) == len(val)
    # each question's answers are contiguous
    ids = dsd["validation"]["question_id"]
    runs = [g for i, g in enumerate(ids) if i == 0 or ids[i - 1] != g]
    assert len(runs) == len(set(runs))


def test_known_values(data_dir):
    """Spot checks against the files (README): RTE label names, CoLA's header-less file, MRPC's BOM."""
    rte, cola, mrpc = (cached(t, data_dir) for t in ("rte", "cola", "mrpc"))
    first = rte["train"][0]
    assert first["sentence1"] == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert first["label"] == 1  # not_entailment
    assert cola["train"][0] == {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
                                "idx": 0, "label": 1}
    assert Counter(cola["train"]["label"]) == {0: 2528, 1: 6023}
    assert Counter(mrpc["train"]["label"]) == {0: 1194, 1: 2474}


# ----------------------------------------------------------------------------------------------
# k-shot
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,k", [("cb", 4), ("rte", 16), ("cola", 32)])
def test_k_shot(data_dir, task, k):
    full = cached(task, data_dir)
    a = load_task(task, data_dir, k_shot=k, k_shot_seed=1)
    assert Counter(a["train"]["label"]) == {c: k for c in range(TASKS[task].num_labels)}
    assert set(a["train"]["idx"]) <= set(full["train"]["idx"])
    assert a["validation"]["idx"] == full["validation"]["idx"] and a["test"]["idx"] == full["test"]["idx"]
    assert load_task(task, data_dir, k_shot=k, k_shot_seed=1)["train"]["idx"] == a["train"]["idx"]
    assert load_task(task, data_dir, k_shot=k, k_shot_seed=2)["train"]["idx"] != a["train"]["idx"]


def test_k_shot_stsb_bins(data_dir):
    try:
        dsd = load_task("stsb", data_dir, k_shot=4)
    except DataError:
        pytest.skip("files absent")
    bins = Counter(min(int(y), 4) for y in dsd["train"]["label"])
    assert bins == {b: 4 for b in range(5)}


def test_k_shot_too_many(data_dir):
    try:
        load_task("cb", data_dir, k_shot=4)
    except DataError:
        pytest.skip("files absent")
    with pytest.raises(DataError, match="neutral"):  # CB train has 16 neutral examples
        load_task("cb", data_dir, k_shot=17)
    with pytest.raises(DataError, match="positive integer"):
        load_task("cb", data_dir, k_shot=0)


# ----------------------------------------------------------------------------------------------
# Missing files and the Hub path (datasets.load_dataset replaced by a fake with the Hub's schema)
# ----------------------------------------------------------------------------------------------

def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_task("rte", tmp_path / "nope")
    (tmp_path / "glue" / "QNLI").mkdir(parents=True)
    (tmp_path / "glue" / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tq\ts\tentailment\n")
    with pytest.raises(DataError, match=r"QNLI/train\.tsv: file not found.*data_dir=None"):
        load_task("qnli", tmp_path)
    with pytest.raises(DataError, match=r"BoolQ/train\.jsonl: file not found"):
        load_task("boolq", tmp_path)


def _fake_hub(monkeypatch, tables):
    calls = []

    def load_dataset(repo, config):
        calls.append((repo, config))
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(cols, features=feats)
                                     for s, (cols, feats) in tables.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_glue(monkeypatch):
    feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                               "idx": datasets.Value("int32")})

    def split(n):
        return {"sentence1": [f"a{i}" for i in range(n)], "sentence2": [f"b{i}" for i in range(n)],
                "label": [i % 2 for i in range(n)], "idx": list(range(n))}, feats

    calls = _fake_hub(monkeypatch, {"train": split(10), "validation": split(9), "test": split(3)})
    dsd = load_task("rte")
    assert calls == [("nyu-mll/glue", "rte")]
    assert {k: len(v) for k, v in dsd.items()} == {"train": 10, "validation": 4, "test": 5}
    assert set(dsd["train"].column_names) == {"sentence1", "sentence2", "label", "idx"}


def test_hub_multirc(monkeypatch):
    feats = datasets.Features({"paragraph": datasets.Value("string"), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"),
                               "idx": {"paragraph": datasets.Value("int32"), "question": datasets.Value("int32"),
                                       "answer": datasets.Value("int32")},
                               "label": datasets.ClassLabel(names=["False", "True"])})
    # 2 paragraphs x 2 questions x 2 answers
    idx = [{"paragraph": p, "question": q, "answer": 2 * q + a} for p in range(2) for q in range(2) for a in range(2)]
    cols = {"paragraph": ["P"] * 8, "question": ["Q"] * 8, "answer": ["A"] * 8, "idx": idx, "label": [0, 1] * 4}
    calls = _fake_hub(monkeypatch, {"train": (cols, feats), "validation": (cols, feats)})
    dsd = load_task("multirc")
    assert calls == [("aps/super_glue", "multirc")]
    assert dsd["train"]["question_id"] == [0, 0, 1, 1, 2, 2, 3, 3]  # unique across paragraphs
    assert len(dsd["validation"]) == len(dsd["test"]) == 4
    assert not set(dsd["validation"]["question_id"]) & set(dsd["test"]["question_id"])


def test_hub_failure_is_a_data_error(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="offline"):
        load_task("sst2")


def test_protocol_is_the_reference_shuffle(data_dir):
    """Compacter/ATTEMPT/DePT: torch.randperm(n, generator seeded 42); validation = first n // 2."""
    import torch

    rte, sst2 = cached("rte", data_dir), cached("sst2", data_dir)
    perm = torch.randperm(277, generator=torch.Generator().manual_seed(42)).tolist()
    assert list(rte["validation"]["idx"]) == perm[:138] and list(rte["test"]["idx"]) == perm[138:]
    perm = torch.randperm(67349, generator=torch.Generator().manual_seed(42)).tolist()
    assert list(sst2["validation"]["idx"]) == perm[:1000] and list(sst2["train"]["idx"][:5]) == perm[1000:1005]


def test_absent_tasks_from_synthetic_files(tmp_path):
    """MNLI, QQP, QNLI and BoolQ are not in shared/data: check their parsers on files in their layout."""
    def tsv(rel, header, rows):
        path = tmp_path / "glue" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n", encoding="utf-8")

    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    labels = ["entailment", "neutral", "contradiction"]
    for name, n in [("train.tsv", 6), ("dev_matched.tsv", 4), ("dev_mismatched.tsv", 5)]:
        tsv(f"MNLI/{name}", mnli_header, [[i, 0, 0, "g", "(", "(", "(", "(", f"p{i}", f"h{i}", "x", labels[i % 3]]
                                          for i in range(n)])
    mnli = load_task("mnli", tmp_path)
    assert {k: len(v) for k, v in mnli.items()} == {"train": 6, "validation": 5, "test": 4}
    assert mnli["train"][1] == {"premise": "p1", "hypothesis": "h1", "idx": 1, "label": 1}

    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    tsv("QQP/train.tsv", qqp_header, [[i, 1, 2, f"a{i}", f"b{i}", i % 2] for i in range(1003)])
    tsv("QQP/dev.tsv", qqp_header, [[i, 1, 2, "a", "b", 1] for i in range(7)])
    qqp = load_task("qqp", tmp_path)
    assert {k: len(v) for k, v in qqp.items()} == {"train": 3, "validation": 1000, "test": 7}

    qnli_header = ["index", "question", "sentence", "label"]
    tsv("QNLI/train.tsv", qnli_header, [[i, "q", "s", "entailment"] for i in range(999)])
    tsv("QNLI/dev.tsv", qnli_header, [[0, "q", "s", "not_entailment"]])
    with pytest.raises(DataError, match="fewer than the 1000"):
        load_task("qnli", tmp_path)

    boolq = tmp_path / "superglue" / "BoolQ"
    boolq.mkdir(parents=True)
    for name, n in [("train.jsonl", 3), ("val.jsonl", 4)]:
        (boolq / name).write_text("\n".join(json.dumps({"question": "q", "passage": "p", "idx": i, "label": i % 2 == 0})
                                            for i in range(n)), encoding="utf-8")
    dsd = load_task("boolq", tmp_path)
    assert list(dsd["train"]["label"]) == [1, 0, 1] and len(dsd["validation"]) == len(dsd["test"]) == 2

"""Property: whatever bytes are in a data file, loading either works or raises DataError (never
anything else, never a half-parsed dataset)."""

import json
import tempfile
from pathlib import Path

import datasets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eptkit.tasks import DataError, load_files, load_task

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
texts = st.text(max_size=12)  # may contain tabs and newlines: noise
plain = st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=["Cs"]), max_size=12)


def corrupt(lines, noise, position, final_newline):
    """Join lines; with `noise` (not None) one line is replaced or inserted at `position`."""
    lines = list(lines)
    if noise is not None:
        i = position % (len(lines) + 1)
        lines[i:i + (position % 2)] = [noise]  # odd positions replace a line, even ones insert
    out = b"\n".join(ln if isinstance(ln, bytes) else ln.encode("utf-8", "surrogatepass") for ln in lines)
    return out + (b"\n" if final_newline else b"")


def file_of(valid_line, noise_line, header=None):
    """Mostly well-formed files: valid lines, then at most one bad line (half the time none)."""
    lines = st.lists(valid_line, min_size=2, max_size=8)
    if header is not None:
        lines = lines.map(lambda ls: [header, *ls])
    return st.builds(corrupt, lines, st.none() | noise_line, st.integers(0, 20), st.booleans())


def check(load):
    try:
        result = load()
    except DataError:
        return
    # success: every split is a proper, non-empty dataset with integer/float labels
    dsd = result[0] if isinstance(result, tuple) else result
    assert isinstance(dsd, datasets.DatasetDict)
    for ds in dsd.values():
        assert len(ds) > 0 and ds.features["label"].dtype in ("int64", "float64")


def write_tree(root: Path, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# RTE TSV: well-formed rows with one wrong column count, stray quote, tab, bad byte or bad label.
tsv_row = st.builds(lambda i, a, b, y: f"{i}\t{a}\t{b}\t{y}", st.integers(0, 9), plain, plain,
                    st.sampled_from(["entailment", "not_entailment"]))
tsv_noise = (texts | st.binary(max_size=12) | st.builds("\t".join, st.lists(texts, max_size=6))
             | st.builds(lambda a: f"0\t{a}\tb\tmaybe", texts) | st.just("\ufeffindex\tsentence1"))
RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


@SETTINGS
@given(train=file_of(tsv_row, tsv_noise, RTE_HEADER), dev=file_of(tsv_row, tsv_noise, RTE_HEADER))
def test_glue_tsv_never_crashes(train, dev):
    with tempfile.TemporaryDirectory() as d:
        write_tree(Path(d), {"glue/RTE/train.tsv": train, "glue/RTE/dev.tsv": dev})
        check(lambda: load_task("rte", d))


cola_row = st.builds(lambda a, y: f"src\t{y}\t\t{a}", plain, st.sampled_from(["0", "1"]))


@SETTINGS
@given(train=file_of(cola_row, tsv_noise), dev=file_of(cola_row, tsv_noise))
def test_cola_headerless_never_crashes(train, dev):
    with tempfile.TemporaryDirectory() as d:
        write_tree(Path(d), {"glue/CoLA/train.tsv": train, "glue/CoLA/dev.tsv": dev})
        check(lambda: load_task("cola", d))


# SuperGLUE JSONL: valid records, plus at most one line that is a record with a wrongly typed
# value, arbitrary JSON, text or bytes.
def jsonl_file(record, bad_record):
    noise = bad_record.map(json.dumps) | json_values.map(json.dumps) | texts | st.binary(max_size=12)
    return file_of(record.map(json.dumps), noise)


def records(fields, junk):
    """(valid record strategy, record strategy where each value may be junk)."""
    return (st.fixed_dictionaries(fields),
            st.fixed_dictionaries({k: v | junk for k, v in fields.items()}))


answer = st.fixed_dictionaries({"text": texts, "idx": st.integers(0, 3), "label": st.sampled_from([0, 1, True, False])})
question = st.fixed_dictionaries({"question": texts, "idx": st.integers(0, 3), "answers": st.lists(answer, max_size=3)})
questions = st.lists(question, max_size=3, unique_by=lambda q: q["idx"])
RECORDS = {
    "cb": ("CB", records({"premise": texts, "hypothesis": texts, "idx": st.integers(0, 9),
                          "label": st.sampled_from(["entailment", "contradiction", "neutral"])},
                         json_values | st.integers(-2**70, 2**70))),
    "wsc": ("WSC", records({"text": texts, "idx": st.integers(0, 5), "label": st.booleans(),
                            "target": st.fixed_dictionaries({"span1_text": texts, "span2_text": texts,
                                                             "span1_index": st.integers(0, 5),
                                                             "span2_index": st.integers(0, 5)})}, json_values)),
    "multirc": ("MultiRC", records({"idx": st.integers(0, 10**6), "passage": st.fixed_dictionaries(
        {"text": texts, "questions": questions})}, json_values)),
}


@SETTINGS
@given(task=st.sampled_from(sorted(RECORDS)), data=st.data())
def test_superglue_jsonl_never_crashes(task, data):
    folder, (good, bad) = RECORDS[task]
    files = {f"superglue/{folder}/{name}": data.draw(jsonl_file(good, bad)) for name in ("train.jsonl", "val.jsonl")}
    with tempfile.TemporaryDirectory() as d:
        write_tree(Path(d), files)
        check(lambda: load_task(task, d))


USER_GOOD, USER_BAD = records({"text": texts, "label": st.sampled_from(["a", "b"])}, json_values)


@SETTINGS
@given(kind=st.sampled_from(["csv", "tsv", "jsonl"]), data=st.data())
def test_user_files_never_crash(kind, data):
    if kind == "jsonl":
        content = data.draw(jsonl_file(USER_GOOD, USER_BAD))
    else:
        sep = "," if kind == "csv" else "\t"
        row = st.builds(lambda t, y: f"{t}{sep}{y}", plain.filter(lambda t: sep not in t and '"' not in t),
                        st.sampled_from(["a", "b"]))
        noise = st.builds(lambda t, y: f"{t}{sep}{y}", texts, st.sampled_from(["", "0.5", "c"])) | texts | st.binary(max_size=10)
        content = data.draw(file_of(row, noise, f"text{sep}label"))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"train.{kind}"
        path.write_bytes(content)
        check(lambda: load_files(path, holdout=0.01))

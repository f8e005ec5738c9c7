"""Read a task's *original* splits (train / validation) into plain columns, from local files or the Hub.

Both sources produce the same schema: the Hub's field names (`nyu-mll/glue`, `aps/super_glue`), an
`idx` (row number in the file for GLUE TSVs, the file's own `idx` for SuperGLUE) and `label` (class id,
or float for STS-B). MultiRC is flattened to one row per answer option with `paragraph_idx`,
`question_idx`, `answer_idx` and `question_id` (dense id of the (paragraph, question) pair, unique
across paragraphs, used to group answers for exact match).

Parsing is strict: every problem raises DataError naming the file and line, and a file is fully
parsed before any of it is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .registry import TaskSpec

Columns = dict[str, list]

# --------------------------------------------------------------------------------------------
# Generic readers. GLUE TSVs contain unbalanced quotes, so fields are split on tabs with no quote
# handling at all (what csv.QUOTE_NONE does). Lines are split on "\n" only: str.splitlines would
# also split on characters such as U+2028 that can occur inside a sentence.
# --------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a BOM is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    return text.removeprefix("\ufeff")


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) for every non-empty line of a UTF-8 file (a BOM is dropped)."""
    text = read_text(path)
    # A final newline is optional (several distributed files lack one); blank lines are skipped.
    return [(i + 1, ln.removesuffix("\r")) for i, ln in enumerate(text.split("\n")) if ln.strip("\r")]


def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a CSV file, parsed as a whole: a quoted field may hold line breaks."""
    import csv
    import io

    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    parsed, start = [], 1
    try:
        for fields in reader:
            if fields and any(f.strip() for f in fields) or len(fields) > 1:  # blank lines are skipped
                parsed.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return parsed


def read_table(path: Path, sep: str = "\t", names: tuple[str, ...] | None = None) -> list[tuple[int, dict]]:
    """Rows of a header-first (or, with `names`, header-less) delimited file as dicts.

    `sep="\\t"` splits on tabs without quote handling; `sep=","` uses the csv module (standard CSV
    quoting), for users' CSV files.
    """
    if sep == ",":
        parsed = _read_csv(path)
    else:
        parsed = [(no, ln.split(sep)) for no, ln in read_lines(path)]
    if names is None:
        if not parsed:
            raise DataError(f"{path}: empty file (expected a header line)")
        names = tuple(c.strip() for c in parsed[0][1])
        parsed = parsed[1:]
        if len(set(names)) != len(names):
            raise DataError(f"{path}:1: duplicate column names in header {names}")
    rows = []
    for no, fields in parsed:
        if len(fields) != len(names):
            raise DataError(f"{path}:{no}: expected {len(names)} columns {names}, found {len(fields)}")
        rows.append((no, dict(zip(names, fields))))
    return rows


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Rows of a JSON-lines file; every line must be a JSON object."""
    rows = []
    for no, ln in read_lines(path):
        try:
            obj = json.loads(ln)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{no}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{no}: expected a JSON object, found {type(obj).__name__}")
        rows.append((no, obj))
    return rows


# --------------------------------------------------------------------------------------------
# Value checks: raise ValueError with a short reason; the caller adds file and line.
# --------------------------------------------------------------------------------------------


def _get(rec: dict, key: str):
    """rec[key] where key may be dotted ('target.span1_text' for WSC)."""
    value = rec
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"missing field {key!r}")
        value = value[part]
    return value


def check_text(value, what: str) -> str:
    """A str that Arrow can store (JSON escapes can produce lone surrogates, which UTF-8 cannot)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} should be a string, found {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains an invalid unicode escape (lone surrogate)") from None
    return value


def _text(rec, key) -> str:
    return check_text(_get(rec, key), f"field {key!r}")


def _int(rec, key) -> int:
    value = _get(rec, key)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        number = int(value)
        if not -2**63 <= number < 2**63:  # Arrow stores int64
            raise ValueError
    except ValueError:
        raise ValueError(f"field {key!r} should be a 64-bit integer, found {value!r}") from None
    return number


def _label(value, kind, names: tuple[str, ...] | None):
    """Map a raw label to its id (or float). kind: 'ids' ("0"/"1"), 'names', 'bool' or 'float'."""
    if kind == "float":
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if isinstance(value, bool) or not math.isfinite(score):
            raise ValueError(f"label should be a finite number, found {value!r}")
        return score
    if kind == "bool":  # JSON booleans; also 0/1 and "true"/"false" as some re-exports write them
        table = {False: 0, True: 1, "false": 0, "true": 1, "False": 0, "True": 1}
    elif kind == "ids":
        table = {str(i): i for i in range(len(names))}
    else:
        table = {n: i for i, n in enumerate(names)}
    # 0/1 ints compare equal to False/True, so they match the bool table; floats never match.
    if isinstance(value, float) or not isinstance(value, (str, int)) or value not in table:
        raise ValueError(f"unknown label {value!r} (expected one of {list(table)})")
    return table[value]


# --------------------------------------------------------------------------------------------
# Local GLUE / SuperGLUE layouts.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _GlueLayout:
    folder: str  # glue/<folder>/
    fields: dict[str, str]  # our field -> the file's column
    label_column: str
    label_kind: str  # see _label
    header: tuple[str, ...] | None = None  # column names for a header-less file (CoLA)
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))


_GLUE = {
    "cola": _GlueLayout("CoLA", {"sentence": "sentence"}, "label", "ids",
                        header=("source", "label", "original_label", "sentence")),
    "sst2": _GlueLayout("SST-2", {"sentence": "sentence"}, "label", "ids"),
    "mrpc": _GlueLayout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", "ids"),
    "qqp": _GlueLayout("QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate", "ids"),
    "stsb": _GlueLayout("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", "float"),
    "mnli": _GlueLayout("MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label", "names",
                        files=(("train", "train.tsv"), ("validation_matched", "dev_matched.tsv"),
                               ("validation_mismatched", "dev_mismatched.tsv"))),
    "qnli": _GlueLayout("QNLI", {"question": "question", "sentence": "sentence"}, "label", "names"),
    "rte": _GlueLayout("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", "names"),
}

# task: (folder, our field -> (JSON key, type), label kind). MultiRC is nested and handled apart.
_SUPERGLUE = {
    "boolq": ("BoolQ", {"question": ("question", _text), "passage": ("passage", _text)}, "bool"),
    "cb": ("CB", {"premise": ("premise", _text), "hypothesis": ("hypothesis", _text)}, "names"),
    "wic": ("WiC", {"word": ("word", _text), "sentence1": ("sentence1", _text), "sentence2": ("sentence2", _text),
                    **{k: (k, _int) for k in ("start1", "start2", "end1", "end2")}}, "bool"),
    "wsc": ("WSC", {"text": ("text", _text), "span1_index": ("target.span1_index", _int),
                    "span2_index": ("target.span2_index", _int), "span1_text": ("target.span1_text", _text),
                    "span2_text": ("target.span2_text", _text)}, "bool"),
    "multirc": ("MultiRC", {}, "bool"),
}
_SUPERGLUE_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}


def _missing(path: Path, task: str) -> DataError:
    return DataError(f"{path}: file not found, so task {task!r} cannot be loaded from this data_dir; "
                     f"use data_dir=None to load {task!r} from the Hugging Face Hub")


def _convert(path: Path, rows, convert) -> Columns:
    """Apply `convert(record, row_number) -> dict` to every row, adding file:line to errors."""
    if not rows:
        raise DataError(f"{path}: no data rows")
    out: list[dict] = []
    for no, rec in rows:
        try:
            out.extend(convert(rec, len(out)))
        except KeyError as e:
            raise DataError(f"{path}:{no}: missing column {e}") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{no}: {e}") from None
    if not out:
        raise DataError(f"{path}: no examples found")
    return {k: [r[k] for r in out] for k in out[0]}


def load_local(spec: TaskSpec, data_dir: str | Path) -> dict[str, Columns]:
    """The original labelled splits of a task from a folder laid out like shared/data."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    task = spec.name
    if task in _GLUE:
        layout = _GLUE[task]

        def convert(rec, i):
            row = {f: rec[c] for f, c in layout.fields.items()}
            row["idx"] = i
            row["label"] = _label(rec[layout.label_column], layout.label_kind, spec.label_names)
            return [row]

        paths = {split: data_dir / "glue" / layout.folder / f for split, f in layout.files}
        for p in paths.values():  # fail before parsing anything if a file is absent
            if not p.is_file():
                raise _missing(p, task)
        return {split: _convert(p, read_table(p, "\t", layout.header), convert) for split, p in paths.items()}

    folder, fields, kind = _SUPERGLUE[task]

    def convert(rec, i):
        row = {f: get(rec, key) for f, (key, get) in fields.items()}
        row["idx"] = _int(rec, "idx")
        row["label"] = _label(_get(rec, "label"), kind, spec.label_names)
        return [row]

    paths = {split: data_dir / "superglue" / folder / f for split, f in _SUPERGLUE_FILES.items()}
    for p in paths.values():
        if not p.is_file():
            raise _missing(p, task)
    if task == "multirc":
        return {split: _multirc(p) for split, p in paths.items()}
    return {split: _convert(p, read_jsonl(p), convert) for split, p in paths.items()}


def _multirc(path: Path) -> Columns:
    qids: dict[tuple[int, int], int] = {}

    def convert(rec, _):
        pidx = _int(rec, "idx")
        paragraph = _text(rec, "passage.text")
        questions = _get(rec, "passage.questions")
        if not isinstance(questions, list):
            raise ValueError("field 'passage.questions' should be a list")
        rows = []
        for q in questions:
            qidx = _int(q, "idx")
            if (pidx, qidx) in qids:
                raise ValueError(f"duplicate question idx {qidx} in paragraph {pidx}")
            qid = qids[pidx, qidx] = len(qids)
            answers = _get(q, "answers")
            if not isinstance(answers, list):
                raise ValueError("field 'answers' should be a list")
            for a in answers:
                rows.append({"paragraph": paragraph, "question": _text(q, "question"), "answer": _text(a, "text"),
                             "paragraph_idx": pidx, "question_idx": qidx, "answer_idx": _int(a, "idx"),
                             "question_id": qid, "label": _label(_get(a, "label"), "bool", None)})
        return rows

    cols = _convert(path, read_jsonl(path), convert)
    cols["idx"] = list(range(len(cols["label"])))
    return cols


# --------------------------------------------------------------------------------------------
# Hugging Face Hub (needs network access; the schema already matches ours except MultiRC's idx).
# --------------------------------------------------------------------------------------------

_HUB = {  # task: (repo, config, raw splits)
    **{t: ("nyu-mll/glue", t, ("train", "validation")) for t in ("qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola")},
    "mnli": ("nyu-mll/glue", "mnli", ("train", "validation_matched", "validation_mismatched")),
    **{t: ("aps/super_glue", t, ("train", "validation")) for t in ("multirc", "boolq", "wic", "cb")},
    "wsc": ("aps/super_glue", "wsc.fixed", ("train", "validation")),  # the corrected WSC, as in the literature
}


def load_hub(spec: TaskSpec) -> dict[str, Columns]:
    import datasets

    repo, config, splits = _HUB[spec.name]
    try:
        dsd = datasets.load_dataset(repo, config)
    except Exception as e:  # network, missing config, ...: one clear line for the CLI
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"no data folder given and {repo} ({config}) could not be loaded from the Hugging Face "
                        f"Hub ({first}); pass --data-dir FOLDER (laid out like shared/data: glue/, superglue/) "
                        "or set EPTKIT_DATA_DIR") from e
    out = {}
    for split in splits:
        cols = dsd[split].to_dict()
        if spec.name == "multirc":
            idx = cols.pop("idx")
            cols["paragraph_idx"] = [d["paragraph"] for d in idx]
            cols["question_idx"] = [d["question"] for d in idx]
            cols["answer_idx"] = [d["answer"] for d in idx]
            qids: dict = {}
            cols["question_id"] = [qids.setdefault(k, len(qids)) for k in zip(cols["paragraph_idx"], cols["question_idx"])]
            cols["idx"] = list(range(len(cols["label"])))
        if not spec.is_regression and any(not 0 <= y < spec.num_labels for y in cols["label"]):
            raise DataError(f"{repo} ({config}) split {split!r} has rows without a label")
        out[split] = cols
    return out

"""Train / validation / test splits: the prompt-tuning literature's protocol, k-shot, users' files.

Protocol (Compacter, ATTEMPT and DePT; docs/method.md, "Tasks, splits and metrics"), with a split seed independent of the training seed:

* small tasks (CoLA, STS-B, MRPC, RTE, MultiRC, BoolQ, WiC, WSC, CB): the original validation set
  is shuffled; the first n // 2 examples are `validation`, the other n - n // 2 are `test`; `train`
  is the original training set. MultiRC is shuffled by question (`question_id`), so the answer
  options of a question never straddle validation and test: the first G // 2 of G questions go to
  `validation`.
* large tasks (QQP, QNLI, SST-2): the training set is shuffled; its first 1,000 examples are
  `validation`, the rest `train`; `test` is the original validation set.
* MNLI: `validation` is validation-mismatched, `test` is validation-matched.

The shuffle is `torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))`, the exact
permutation the reference implementations use, so with split_seed=42 the splits coincide with theirs
(for the same row order, which the local files and the Hub share). Shuffled splits keep that order.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import DataError
from .registry import TaskSpec, get_task
from .sources import Columns, check_text, load_hub, load_local, read_jsonl, read_table

if TYPE_CHECKING:  # imported where used: eptkit imports without datasets (and its pyarrow)
    import datasets

SMALL_TASKS = ("cola", "stsb", "mrpc", "rte", "multirc", "boolq", "wic", "wsc", "cb")
LARGE_TASKS = ("qqp", "qnli", "sst2")
LARGE_VALIDATION_SIZE = 1000


def permutation(n: int, seed: int) -> list[int]:
    """The seeded shuffle of the reference code (independent of global RNG state)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _select(cols: Columns, rows: list[int]) -> Columns:
    return {k: [v[i] for i in rows] for k, v in cols.items()}


def _rows(cols: Columns) -> int:
    return len(cols["label"])


def split_protocol(spec: TaskSpec, raw: dict[str, Columns], split_seed: int = 42) -> dict[str, Columns]:
    """Map a task's original splits to train/validation/test (see the module docstring)."""
    if spec.name == "mnli":
        return {"train": raw["train"], "validation": raw["validation_mismatched"], "test": raw["validation_matched"]}
    if spec.name in LARGE_TASKS:
        train = raw["train"]
        if _rows(train) <= LARGE_VALIDATION_SIZE:
            raise DataError(f"{spec.name}: training set has {_rows(train)} rows, fewer than the "
                            f"{LARGE_VALIDATION_SIZE} the protocol holds out for validation")
        perm = permutation(_rows(train), split_seed)
        return {"train": _select(train, perm[LARGE_VALIDATION_SIZE:]),
                "validation": _select(train, perm[:LARGE_VALIDATION_SIZE]), "test": raw["validation"]}
    original = raw["validation"]
    if spec.group_field:  # shuffle whole groups (MultiRC questions), keep rows of a group together
        members: dict = {}
        for i, g in enumerate(original[spec.group_field]):
            members.setdefault(g, []).append(i)
        groups = list(members.values())
        perm = permutation(len(groups), split_seed)
        half = len(groups) // 2
        val = [i for g in perm[:half] for i in groups[g]]
        test = [i for g in perm[half:] for i in groups[g]]
    else:
        perm = permutation(_rows(original), split_seed)
        half = len(perm) // 2
        val, test = perm[:half], perm[half:]
    if not val or not test:
        raise DataError(f"{spec.name}: the original validation set is too small to split in half")
    return {"train": raw["train"], "validation": _select(original, val), "test": _select(original, test)}


def k_shot_indices(spec: TaskSpec, labels: list, k: int, seed: int = 0) -> list[int]:
    """Rows of k examples per class: the first k of each class in a seeded shuffle (shuffled order).

    Regression (STS-B): the label range is cut into 5 equal-width bins (for STS-B's 0-5 scores:
    [0, 1), [1, 2), ..., [4, 5]) and k examples are drawn per bin, so 5k in all.
    Raises DataError when a class (bin) has fewer than k examples.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DataError(f"k_shot must be a positive integer, got {k!r}")
    if spec.is_regression:
        lo, hi = min(labels), max(labels)
        width = (hi - lo) / 5 or 1.0
        classes = [min(int((y - lo) / width), 4) for y in labels]
        names = [f"[{lo + b * width:g}, {lo + (b + 1) * width:g}]" for b in range(5)]
    else:
        classes, names = labels, list(spec.label_names)
    taken: dict[int, list[int]] = {c: [] for c in range(len(names))}
    chosen = []
    for i in permutation(len(labels), seed):
        if len(taken[classes[i]]) < k:
            taken[classes[i]].append(i)
            chosen.append(i)
    short = {names[c]: len(v) for c, v in taken.items() if len(v) < k}
    if short:
        raise DataError(f"{spec.name}: k_shot={k} but the training set has only {short} examples of these classes")
    return chosen


def sample_k_shot(dataset: datasets.Dataset, spec: str | TaskSpec, k: int, seed: int = 0) -> datasets.Dataset:
    """k examples per class of a (training) split; see k_shot_indices."""
    return dataset.select(k_shot_indices(get_task(spec), list(dataset["label"]), k, seed))


def _to_datasets(splits: dict[str, Columns]) -> datasets.DatasetDict:
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})


def load_task(name: str | TaskSpec, data_dir: str | Path | None = None, *, split_seed: int = 42,
              k_shot: int | None = None, k_shot_seed: int = 0) -> datasets.DatasetDict:
    """Load one of the 13 tasks as a DatasetDict with `train`, `validation` and `test`.

    data_dir: a folder laid out like shared/data (glue/<TASK>/*.tsv, superglue/<TASK>/*.jsonl);
        None loads the Hub copies (`nyu-mll/glue`, `aps/super_glue`). Both give the same schema:
        the Hub field names, `idx`, `label` (int class id; float for STS-B) and, for MultiRC, one
        row per answer option with `question_id`.
    split_seed: seed of the split protocol (module docstring); keep the default 42 to match the
        literature. It is independent of any training seed.
    k_shot: if set, `train` keeps k examples per class (see k_shot_indices), drawn with k_shot_seed;
        validation and test are unchanged.
    """
    spec = get_task(name)
    raw = load_hub(spec) if data_dir is None else load_local(spec, data_dir)
    splits = split_protocol(spec, raw, split_seed)
    if k_shot is not None:
        train = splits["train"]
        splits["train"] = _select(train, k_shot_indices(spec, train["label"], k_shot, k_shot_seed))
    return _to_datasets(splits)


# --------------------------------------------------------------------------------------------
# A user's own files.
# --------------------------------------------------------------------------------------------

_FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_AUTO_TEXT = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "passage"), ("text",), ("sentence",))


def read_rows(path) -> list[tuple[int, dict]]:
    """(line number, row) of a user's .csv, .tsv or .jsonl file, by its suffix."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    rows = read_jsonl(path) if fmt == "jsonl" else read_table(path, fmt)
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def _label_key(value) -> str | None:
    """A raw label as a class name: strings stripped, JSON true/false as 'True'/'False', ints as digits."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def load_files(train, validation=None, test=None, *, text_columns: tuple[str, ...] | None = None,
               label_column: str = "label", label_names: tuple[str, ...] | None = None,
               regression: bool | None = None, split_seed: int = 42, holdout: float = 0.1,
               name: str = "custom", k_shot: int | None = None,
               k_shot_seed: int = 0) -> tuple[datasets.DatasetDict, TaskSpec]:
    """Load a user's CSV / TSV / JSONL files (format from the extension) as a task.

    CSV uses standard CSV quoting; TSV is split on tabs with no quote handling (as GLUE's files);
    CSV/TSV need a header line. The result has the text columns, `label` and `idx` (row number).

    text_columns: one column (single text) or two (a text pair). Default: the first of
        (sentence1, sentence2), (premise, hypothesis), (question, passage), (text,), (sentence,)
        present in the training file.
    label_names: class names in id order. Default: the training file's distinct labels, sorted
        (numerically when all are integers, so labels 0..n-1 keep their ids); a validation/test
        label not among them is an error. Labels are matched as strings (JSON true/false as 'True'/'False').
    regression: True for float targets. Default (None): regression when every label is a number
        and at least one is not an integer.
    Missing validation / test: `holdout` (default 10%, at least one row) of the training rows each,
        taken in the order of permutation(n_train, split_seed): validation first, then test; the
        remaining training rows keep their file order.
    k_shot / k_shot_seed: as in load_task, applied to the final training split.

    Returns the DatasetDict and a TaskSpec (name=`name`, benchmark 'custom') to pass to encode()
    and compute_metrics(): accuracy and macro-F1 (main: accuracy), or Pearson and Spearman for
    regression (main: their average).
    """
    paths = {"train": train, "validation": validation, "test": test}
    records = {split: read_rows(p) for split, p in paths.items() if p is not None}
    first = records["train"][0][1]
    if text_columns is None:
        text_columns = next((c for c in _AUTO_TEXT if all(k in first for k in c)), None)
        if text_columns is None:
            raise DataError(f"{train}: no text columns given and none of {_AUTO_TEXT} found in {list(first)}")
    text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"text_columns must name one or two columns, got {text_columns}")
    for c in text_columns:  # they are used as str.format fields in the template
        if not c or c.isdigit() or any(ch in c for ch in "{}[].!:") or c in ("label", "idx"):
            raise DataError(f"text column name {c!r} cannot be used; rename it (letters, digits, _ , spaces)")

    for s, rows in records.items():
        check_columns(paths[s], rows, text_columns, "text columns")
    labels_raw = {s: [(no, rec.get(label_column, None)) for no, rec in rows] for s, rows in records.items()}
    for s, items in labels_raw.items():
        for no, v in items:
            if v is None or v == "":
                have = list(next(rec for n, rec in records[s] if n == no))
                raise DataError(f"{paths[s]}:{no}: missing label column {label_column!r} (the file has the "
                                f"columns {have}; choose with --label-column)")
    if regression is None:
        values = [v for items in labels_raw.values() for _, v in items]
        floats = [_as_float(v) for v in values]
        regression = (label_names is None and all(x is not None for x in floats)
                      and any(not x.is_integer() for x in floats))
    if not regression:
        if label_names is None:
            found = sorted({_label_key(v) for _, v in labels_raw["train"]} - {None})
            if all(re.fullmatch(r"-?[0-9]+", k) for k in found):
                found.sort(key=int)
            label_names = tuple(found)
        label_names = tuple(str(n) for n in label_names)
        if len(label_names) < 2:
            raise DataError(f"{train}: classification needs at least two classes, found {list(label_names)}")
        ids = {n: i for i, n in enumerate(label_names)}

    columns: dict[str, Columns] = {}
    for s, rows in records.items():
        cols: Columns = {c: [] for c in (*text_columns, "label", "idx")}
        for i, (no, rec) in enumerate(rows):
            for c in text_columns:
                try:
                    cols[c].append(check_text(rec.get(c), f"column {c!r}"))
                except ValueError as e:
                    raise DataError(f"{paths[s]}:{no}: {e}") from None
            raw = rec[label_column]
            if regression:
                y = _as_float(raw)
                if y is None:
                    raise DataError(f"{paths[s]}:{no}: label {raw!r} is not a finite number")
            else:
                y = ids.get(_label_key(raw))
                if y is None:
                    raise DataError(f"{paths[s]}:{no}: unknown label {raw!r} (labels: {list(label_names)})")
            cols["label"].append(y)
            cols["idx"].append(i)
        columns[s] = cols

    missing = [s for s in ("validation", "test") if s not in columns]
    if missing:
        n = _rows(columns["train"])
        n_hold = max(1, round(holdout * n))
        if n - n_hold * len(missing) < 1:
            raise DataError(f"{train}: {n} rows are too few to hold out {missing} ({n_hold} rows each)")
        perm = permutation(n, split_seed)
        for j, s in enumerate(missing):
            columns[s] = _select(columns["train"], perm[j * n_hold:(j + 1) * n_hold])
        columns["train"] = _select(columns["train"], sorted(perm[len(missing) * n_hold:]))

    template = " ".join(f"{c}: {{{c}}}" for c in text_columns)
    spec = TaskSpec(name=name, benchmark="custom", text_fields=text_columns,
                    label_names=None if regression else label_names, template=f"{name} {template}",
                    label_words=None if regression else label_names,
                    metrics=("pearson", "spearman") if regression else ("accuracy", "macro_f1"),
                    main_metric="average" if regression else "accuracy")
    if k_shot is not None:
        columns["train"] = _select(columns["train"], k_shot_indices(spec, columns["train"]["label"], k_shot, k_shot_seed))
    return _to_datasets({s: columns[s] for s in ("train", "validation", "test")}), spec


def check_columns(path, rows: list[tuple[int, dict]], needed, what: str, *, row_noun: str | None = None) -> None:
    """Every row has the `needed` columns as text, or a DataError naming the columns the file has.
    row_noun: rows held in memory (a request's), named `path[no]` and described as `row_noun` has..."""
    for no, row in rows:
        where = f"{path}[{no}]" if row_noun else f"{path}:{no}"
        missing = [c for c in needed if c not in row]
        if missing:
            raise DataError(f"{where}: no column(s) {missing} ({what}); {row_noun or 'the file'} has the "
                            f"columns {list(row)}")
        for c in needed:
            try:
                check_text(row[c], f"column {c!r}")
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None


def load_labelled_file(path, spec: TaskSpec, *, label_column: str = "label") -> datasets.Dataset:
    """A user's labelled .csv/.tsv/.jsonl file as a split of `spec`: its text fields, `label` (a class
    name of the task, or its id; a number for regression) and `idx`. Rows of a `group_field` task
    (MultiRC) without that column are each their own group."""
    path = Path(path)
    rows = read_rows(path)
    check_columns(path, rows, spec.text_fields, f"task {spec.name!r} reads {list(spec.text_fields)}")
    names = list(spec.label_names or ())
    cols: Columns = {c: [] for c in (*spec.text_fields, "label", "idx")}
    if spec.group_field:
        cols[spec.group_field] = []
    for i, (no, row) in enumerate(rows):
        if label_column not in row:
            raise DataError(f"{path}:{no}: no label column {label_column!r}; the file has the columns {list(row)}")
        raw = row[label_column]
        if spec.is_regression:
            y = _as_float(raw)
            if y is None:
                raise DataError(f"{path}:{no}: label {raw!r} is not a finite number")
        else:
            key = _label_key(raw)
            if key in names:
                y = names.index(key)
            elif key is not None and re.fullmatch(r"[0-9]+", key) and int(key) < len(names):
                y = int(key)
            else:
                raise DataError(f"{path}:{no}: unknown label {raw!r} (task {spec.name!r}: {names} or their ids "
                                f"0..{len(names) - 1})")
        for c in spec.text_fields:
            cols[c].append(row[c])
        cols["label"].append(y)
        cols["idx"].append(i)
        if spec.group_field:
            cols[spec.group_field].append(str(row.get(spec.group_field, f"row-{i}")))
    import datasets

    return datasets.Dataset.from_dict(cols)

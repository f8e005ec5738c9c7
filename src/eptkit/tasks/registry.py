"""Task specifications: what each of the 13 GLUE/SuperGLUE tasks looks like to a model.

A `TaskSpec` is pure description (no data): which columns hold the text, what the classes are
called, how the example is written as one string for text-to-text models, which metrics to report.
Field names and label ids follow the Hugging Face Hub datasets (`nyu-mll/glue`, `aps/super_glue`),
so a model trained on the local files and one trained on Hub data agree on what class 0 means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import DataError

# Decoder-only models get the text-to-text source followed by this cue; the label word is the
# continuation (" " + word + eos). Kept in one place so training and generation agree.
ANSWER_CUE = "\nAnswer:"

# T5 (Raffel et al., 2020) writes STS-B scores as strings rounded to the nearest 0.2: 26 "classes".
STSB_WORDS = tuple(f"{i / 5:.1f}" for i in range(26))


@dataclass(frozen=True)
class TaskSpec:
    name: str = field(metadata={"help": "Task name, e.g. 'rte' (lower case, no dashes)."})
    benchmark: str = field(metadata={"help": "'glue', 'superglue' or 'custom' (a user's files)."})
    text_fields: tuple[str, ...] = field(
        metadata={"help": "Dataset columns holding the input text, in reading order."})
    label_names: tuple[str, ...] | None = field(
        metadata={"help": "Class names indexed by label id; None for regression."})
    template: str = field(
        metadata={"help": "Text-to-text source, a str.format template over the row's columns."})
    label_words: tuple[str, ...] | None = field(
        metadata={"help": "Target string per class id (seq2seq/causal). For regression: the finite "
                          "vocabulary of rendered scores (STS-B: '0.0', '0.2', ..., '5.0')."})
    metrics: tuple[str, ...] = field(metadata={"help": "Keys of compute_metrics reported for this task."})
    main_metric: str = field(
        metadata={"help": "Key used for best-checkpoint selection; 'average' (mean of `metrics`) for "
                          "tasks that report two numbers, as benchmark tables do."})
    pair_template: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Templates for the (one or two) segments fed to a classifier; default: the text "
                "fields themselves. Needed where a segment combines columns (MultiRC, WSC, WiC)."})
    group_field: str | None = field(default=None, metadata={
        "help": "Column grouping rows for metrics (MultiRC: 'question_id', for exact match)."})
    regression_step: float | None = field(default=None, metadata={
        "help": "Regression targets are rendered as text rounded to this step (STS-B: 0.2)."})

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Output units of a classification head: 1 for regression (as HF models expect)."""
        return 1 if self.label_names is None else len(self.label_names)

    # -- text rendering -------------------------------------------------------------------
    def source_text(self, row: dict) -> str:
        """Text-to-text source for an encoder-decoder model."""
        return self.template.format_map(row)

    def causal_text(self, row: dict) -> str:
        """Prompt for a decoder-only model: the source plus the answer cue."""
        return self.source_text(row) + ANSWER_CUE

    def segments(self, row: dict) -> tuple[str, ...]:
        """One or two text segments for a sequence classifier (a text pair)."""
        if self.pair_template is not None:
            return tuple(t.format_map(row) for t in self.pair_template)
        return tuple(str(row[f]) for f in self.text_fields)

    # -- labels <-> words -----------------------------------------------------------------
    def render_label(self, label) -> str:
        """Target string for a label id (classification) or a score (regression)."""
        if self.is_regression:
            if self.regression_step is None:
                return f"{float(label):.2f}"
            # round(x / 0.2) * 0.2 is T5's STS-B rule (ties to even, as numpy.round).
            return f"{round(float(label) / self.regression_step) * self.regression_step:.1f}"
        return self.label_words[int(label)]

    def parse_label(self, text: str):
        """Inverse of render_label for generated text (surrounding whitespace ignored).

        Returns the class id, or the float score for regression; None when `text` is not a
        valid label word / not a finite number (metrics then count the prediction as wrong).
        """
        text = text.strip()
        if self.is_regression:
            try:
                value = float(text)
            except ValueError:
                return None
            return value if math.isfinite(value) else None
        try:
            return self.label_words.index(text)
        except ValueError:
            return None


def _spec(name, benchmark, text_fields, label_names, template, metrics, main_metric=None, **kw):
    return TaskSpec(name=name, benchmark=benchmark, text_fields=tuple(text_fields),
                    label_names=None if label_names is None else tuple(label_names),
                    template=template,
                    label_words=kw.pop("label_words", None if label_names is None else tuple(label_names)),
                    metrics=tuple(metrics),
                    main_metric=main_metric or (metrics[0] if len(metrics) == 1 else "average"), **kw)


NLI2 = ("entailment", "not_entailment")
BOOL = ("False", "True")  # SuperGLUE's JSON booleans, written as T5 writes them

# Label ids follow the Hub datasets' ClassLabel order (e.g. MNLI: entailment=0, neutral=1,
# contradiction=2; CB: entailment=0, contradiction=1, neutral=2).
TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    _spec("mnli", "glue", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          "mnli premise: {premise} hypothesis: {hypothesis}", ("accuracy",)),
    _spec("qqp", "glue", ("question1", "question2"), ("not_duplicate", "duplicate"),
          "qqp question1: {question1} question2: {question2}", ("accuracy", "f1")),
    _spec("qnli", "glue", ("question", "sentence"), NLI2,
          "qnli question: {question} sentence: {sentence}", ("accuracy",)),
    _spec("sst2", "glue", ("sentence",), ("negative", "positive"),
          "sst2 sentence: {sentence}", ("accuracy",)),
    _spec("stsb", "glue", ("sentence1", "sentence2"), None,
          "stsb sentence1: {sentence1} sentence2: {sentence2}", ("pearson", "spearman"),
          label_words=STSB_WORDS, regression_step=0.2),
    _spec("mrpc", "glue", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
          "mrpc sentence1: {sentence1} sentence2: {sentence2}", ("accuracy", "f1")),
    _spec("rte", "glue", ("sentence1", "sentence2"), NLI2,
          "rte sentence1: {sentence1} sentence2: {sentence2}", ("accuracy",)),
    _spec("cola", "glue", ("sentence",), ("unacceptable", "acceptable"),
          "cola sentence: {sentence}", ("matthews_correlation",)),
    # MultiRC: one row per answer option. The paragraph comes last so that right-truncation of a
    # long input cuts the paragraph, never the question or the answer being judged.
    _spec("multirc", "superglue", ("question", "answer", "paragraph"), BOOL,
          "multirc question: {question} answer: {answer} paragraph: {paragraph}", ("f1a", "em"),
          pair_template=("{question} {answer}", "{paragraph}"), group_field="question_id"),
    _spec("boolq", "superglue", ("question", "passage"), BOOL,
          "boolq question: {question} passage: {passage}", ("accuracy",)),
    _spec("wic", "superglue", ("word", "sentence1", "sentence2"), BOOL,
          "wic word: {word} sentence1: {sentence1} sentence2: {sentence2}", ("accuracy",),
          pair_template=("{word}: {sentence1}", "{word}: {sentence2}")),
    # WSC: does the pronoun (span2) refer to the noun phrase (span1)?
    _spec("wsc", "superglue", ("text", "span1_text", "span2_text"), BOOL,
          "wsc text: {text} span1: {span1_text} span2: {span2_text}", ("accuracy",),
          pair_template=("{text}", "{span2_text} refers to {span1_text}")),
    _spec("cb", "superglue", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
          "cb premise: {premise} hypothesis: {hypothesis}", ("accuracy", "macro_f1")),
]}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by name ('SST-2', 'sst2' and 'STS-B' all work); a TaskSpec passes through."""
    if isinstance(name, TaskSpec):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}")
    return TASKS[key]

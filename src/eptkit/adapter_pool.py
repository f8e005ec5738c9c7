"""Many trained adapters on one frozen backbone, answering mixed batches: what `eptkit serve` holds.

The pool owns one `PromptedModel` and adds or drops named adapters on it at run time. Rows for different
adapters share forward passes (`eptkit.forward`; rows of similar length together,
`eptkit.batching.length_groups`): every row goes through its own adapter and comes back as `eptkit predict`
writes it (label name, score, or None).

Every adapter must come from the pool's backbone: the one the first adapter's run records. An adapter
whose run records another backbone, or whose shapes do not fit it, is refused with the reason; so are the
baselines (LoRA, full fine-tuning...), which change the backbone itself and cannot share it. `model`
overrides the recorded backbone for every adapter, as `eptkit predict --model` does (shapes still checked).

Loads, unloads and forward passes run on the server's one worker thread (`eptkit.serve`), so a load or
an unload never runs during a forward pass. The event loop only reads: `get`, `check_rows` and
`describe` (a request's checks, GET /adapters) each take one dict lookup or one snapshot of the adapters,
which the GIL keeps whole while the worker adds or drops one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapter_files import DEPT_WEIGHTS_NAME, WEIGHTS_NAME, AdapterError
from .backbones import load_backbone, resolve_model_path
from .batching import length_groups
from .registry import prompt_methods
from .evaluation import predict_mixed
from .model import FoldedPrompt, PromptedModel, fold_adapter, load_adapter, remove_adapter
from .runs import read_trained
from .tasks.formatting import encode_input_rows, prediction_label
from .tasks.errors import DataError, MissingTask
from .tasks.loading import check_columns
from .tasks.registry import TaskSpec


class UnknownAdapter(LookupError):
    """A request named an adapter the pool does not hold."""


class NameConflict(ValueError):
    """A load under a name in use, or the unload of the last adapter (the backbone needs one)."""


@dataclass
class ServedAdapter:
    name: str
    directory: Path
    spec: TaskSpec
    method: str
    parameters: int  # values the adapter adds to the backbone (its tensors: prompt side and head)
    max_length: int  # longest text, in tokens, that the adapter was trained for
    compiled: bool

    def describe(self) -> dict:
        return {"name": self.name, "method": self.method, "task": self.spec.name, "parameters": self.parameters,
                "fields": list(self.spec.text_fields), "max_length": self.max_length, "compiled": self.compiled,
                "directory": str(self.directory)}


class AdapterPool:
    """One backbone and its adapters. model: backbone path or Hub id for every adapter (default: the one
    their runs record); fold: fold each adapter's prompt side into constants (`eptkit.model.fold_adapter`)."""

    def __init__(self, model: str | None = None, *, fold: bool = True):
        self.override = resolve_model_path(model) if model else None
        self.model_path = self.override
        self.fold = fold
        self.model: PromptedModel | None = None
        self.tokenizer = None
        self.task_type: str | None = None
        self.adapters: dict[str, ServedAdapter] = {}

    def load(self, name: str, directory, task: str | None = None) -> ServedAdapter:
        """Add the trained adapter in `directory` under `name`; AdapterError/DataError say why one is refused.
        task: the adapter's task, for one that does not record it (saved from the Python API)."""
        if name in self.adapters:
            raise NameConflict(f"name: an adapter named {name!r} is loaded already; unload it first")
        pickled = Path(directory) / DEPT_WEIGHTS_NAME
        if pickled.is_file() and not (Path(directory) / WEIGHTS_NAME).is_file():
            # Even weights-only unpickling is more than a server that loads adapters on request should run.
            raise AdapterError(f"{pickled}: a DePT checkpoint is a pickle and the server reads safetensors only; "
                               "convert it first (eptkit export --format folded)")
        try:
            trained = read_trained(directory, model=self.override, task=task)
        except MissingTask:
            raise MissingTask(f"{directory}: the adapter does not record its task; give it (POST /adapters field "
                            f"\"task\", or eptkit serve --task {name}=TASK)") from None
        method = (trained.baseline or {}).get("method") or trained.run.get("method")
        if trained.baseline is not None:
            raise AdapterError(f"{directory}: a {method!r} run changes the backbone itself and cannot share it; "
                               f"the server serves prompt adapters ({', '.join(prompt_methods())})")
        if self.model is None:
            backbone, self.tokenizer = load_backbone(trained.model_path, trained.task_type, trained.spec,
                                                     num_labels=trained.num_labels)
            self.model_path, self.task_type = trained.model_path, trained.task_type
            self.model = load_adapter(backbone, directory, adapter_name=name).eval()
        else:
            self._check_backbone(trained, directory)
            load_adapter(self.model, directory, adapter_name=name).eval()
        config = self.model.configs[name]
        state = self.model.adapters[name].state_dict()
        head = self.model.heads[name].state_dict() if name in self.model.heads else {}
        parameters = sum(t.numel() for t in [*state.values(), *head.values()] if t is not None)
        if self.fold:
            fold_adapter(self.model, name)
        # Runs record the text length they trained with; else the method's own, else TrainConfig's default.
        max_length = trained.run.get("max_length") or getattr(config, "offset_length", None) or 256
        compiled = isinstance(self.model.adapters[name], FoldedPrompt)  # folded here, or saved folded
        self.adapters[name] = ServedAdapter(name, Path(directory), trained.spec, method or config.method, parameters,
                                            int(max_length), compiled)
        return self.adapters[name]

    def _check_backbone(self, trained, directory) -> None:
        # Shapes (hidden size, vocabulary, labels) are checked by load_adapter; two checkpoints of one
        # architecture have equal shapes, so the backbone the run recorded must be this one too.
        recorded = trained.run.get("backbone")
        if recorded and self.override is None and trained.model_path != self.model_path:
            raise AdapterError(f"{directory}: trained on backbone {recorded}, but this server's backbone is "
                               f"{self.model_path}; all adapters of one server share its backbone")
        if trained.task_type != self.task_type:
            raise AdapterError(f"{directory}: a {trained.task_type} adapter; this server's backbone is a "
                               f"{self.task_type} model")

    def unload(self, name: str) -> None:
        self.get(name)
        if len(self.adapters) == 1:
            raise NameConflict(f"name: {name!r} is the only adapter loaded; load another before unloading it")
        remove_adapter(self.model, name)
        del self.adapters[name]

    def get(self, name) -> ServedAdapter:
        served = self.adapters.get(name)  # one lookup: the worker may drop `name` meanwhile
        if served is None:
            raise UnknownAdapter(f"adapter: no adapter named {name!r} is loaded; have {sorted(self.adapters)}")
        return served

    def check_rows(self, name: str, rows: list) -> None:
        """Rows (JSON objects) carrying the adapter's text fields as strings, or a DataError naming the row."""
        spec = self.get(name).spec
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"rows[{i}]: expected a JSON object with the fields {list(spec.text_fields)}, "
                                f"got {type(row).__name__}")
        check_columns("rows", list(enumerate(rows)), spec.text_fields,
                      f"task {spec.name!r} reads {list(spec.text_fields)}", row_noun="the row")

    def encode(self, name: str, rows: list[dict]) -> list[dict]:
        """Encoded rows for `name`; a row over its max_length raises `RowTooLong` (never truncated)."""
        served = self.get(name)
        encoded, _ = encode_input_rows(rows, served.spec, self.tokenizer, self.task_type, served.max_length,
                                       truncation=False, split=f"request to {name!r}")
        return encoded

    def predict(self, names: list[str], rows: list[dict]) -> list:
        """Mixed forward passes (or generate calls) for encoded rows, row i through adapter names[i]: each
        row's prediction as `eptkit predict` writes it. Rows of similar length share a pass
        (`eptkit.batching.length_groups`)."""
        specs = [self.get(name).spec for name in names]
        out: list = [None] * len(rows)
        for group in length_groups([len(r.get("source_input_ids", r["input_ids"])) for r in rows]):
            preds = predict_mixed(self.model, self.tokenizer, [rows[i] for i in group], [specs[i] for i in group],
                                  [names[i] for i in group])
            for i, p in zip(group, preds):
                out[i] = prediction_label(specs[i], p)
        return out

    def describe(self) -> list[dict]:
        return [a.describe() for a in list(self.adapters.values())]  # a snapshot (see the module docstring)

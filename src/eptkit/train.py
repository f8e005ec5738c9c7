"""The training loop: one loop for PT, DePT, EPT and the comparison methods.

Built on accelerate, so the same code runs on one CPU, one GPU or many processes under
`accelerate launch` (DDP; FSDP and DeepSpeed through accelerate's own config files, see
recipes/README.md), and sharded over CPU processes with `--fsdp` (`eptkit.sharding`). Any model that
satisfies `eptkit.trainable.TrainableModel` trains here: a `PromptedModel`, or one of the
`eptkit.baselines` wrappers (LoRA, full fine-tuning, ...).

    from eptkit.train import TrainConfig, train
    from eptkit.tasks.loading import load_task
    results = train(prompted, tokenizer, "cb", load_task("cb", "../shared/data"),
                    TrainConfig(output_dir="runs/cb", max_steps=200))

The parts live in their own modules, in the order the loop uses them:
- data (`eptkit.batching`): every split tokenized once; a deterministic batch order per (seed, epoch),
  so a data position is just (epoch, batch index).
- optimisation (`eptkit.optim`): one parameter group per `param_groups()` entry at its own rate,
  linear warm-up and decay; here: gradient clipping, accumulation, mixed precision (accelerate).
- evaluation (`eptkit.evaluation`) every `eval_steps` and at the last step on the validation split;
  the best adapter is kept (and written to output_dir when it improves); optional early stopping;
  at the end the best adapter is evaluated on the test split.
- files (main process only; `eptkit.run_files` names them): the best adapter, eptkit_run.json, log.jsonl
  (one line per optimizer step), results.json, and checkpoints (`eptkit.checkpoint`).
- resume (`resume=True`) continues from the newest checkpoint; the result equals an uninterrupted
  run with the same seed. Ctrl-C (SIGINT) stops at the end of the current step, writes a checkpoint
  and raises KeyboardInterrupt; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .batching import BatchPlan, encode_splits, text_max_length
from .checkpoint import RunState, load_checkpoint, rng_state, save_checkpoint
from .config import TrainConfig
from .evaluation import evaluate_rows, main_metric
from .files import atomic_write_json
from .reporting import Report, peak_memory_mb, run_results
from .sharding import check_sharding, cpu_state, load_whole, no_sync, placement, plain
from .sharding import save_whole, shard_model
from .optim import group_lrs, make_optimizer, make_scheduler, standardize_regression
from .run_files import LOG_NAME, RESULTS_NAME, prepare_output_dir, trim_log
from .tasks.formatting import MODEL_INPUT_KEYS, Collator
from .tasks.registry import get_task
from .trainable import TrainableModel, set_gradient_checkpointing

logger = logging.getLogger("eptkit")

__all__ = ["TrainConfig", "Trainer", "InterruptFlag", "make_accelerator", "train"]


def _describe_run(spec, model, config: TrainConfig, extra: dict | None) -> dict:
    """The run facts saved with every output (eptkit_run.json, results.json)."""
    return {
        "task": spec.name,
        "task_spec": dataclasses.asdict(spec) if spec.benchmark == "custom" else None,
        "method": model.method_name,
        "task_type": model.task_type,
        "backbone": getattr(model.backbone.config, "_name_or_path", None),
        "max_length": text_max_length(model, config),
        # `eptkit evaluate` scores the same seeded subset of the test split as the run by default
        "seed": config.seed,
        "max_eval_samples": config.max_eval_samples,
        "gradient_checkpointing": config.gradient_checkpointing,
        **(extra or {}),
    }


def _regression_loss_scale(spec, task_type: str, modules, config: TrainConfig, train_rows: list[dict]) -> float:
    """The loss scale: 1 / variance of the training labels with regression_targets='standardize'
    (the head's bias is then set to their mean; `eptkit.optim.standardize_regression`), else 1."""
    if not spec.is_regression or task_type != "classification" or config.regression_targets != "standardize":
        return 1.0
    return standardize_regression(modules, [float(r["labels"]) for r in train_rows])


class Trainer:
    """One training run. `train()` is the functional entry point; this class holds the run's state."""

    def __init__(self, model: TrainableModel, tokenizer, task, data, config: TrainConfig, *, run_info: dict | None = None,
                 callbacks: list[Callable[[dict], None]] | None = None, accelerator=None):
        from accelerate.utils import set_seed

        self.config = config
        self.spec = get_task(task)
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks or [])
        self.accelerator = acc = accelerator or make_accelerator(config)
        self.is_main = acc.is_main_process
        if not self.is_main:  # one copy of the data warnings, not one per process
            logger.setLevel(logging.ERROR)
        self.output_dir = Path(config.output_dir)
        self.num_threads = _fix_threads() if acc.device.type == "cpu" else torch.get_num_threads()
        set_seed(config.seed)

        for split in ("train", "validation"):
            if split not in data:
                raise ValueError(f"the data has no {split!r} split (found {list(data)})")
        self.truncated: dict[str, int] = {}  # split -> rows cut to the text length (results.json)
        self.encoded = encode_splits(data, self.spec, tokenizer, model, config, self.truncated)  # split -> rows
        self.run_info = _describe_run(self.spec, model, config, run_info)
        self.loss_scale = _regression_loss_scale(self.spec, model.task_type, self.own_modules(model), config,
                                                 self.encoded["train"])
        set_gradient_checkpointing(model, config.gradient_checkpointing)  # acts in training mode only
        lrs = group_lrs(model, config)
        self.run_info["lr_absolute"] = {k: float(f"{v:.4g}") for k, v in lrs.items()}
        self.model, self.optimizer, self.scheduler = _prepare(model, config, lrs, acc)
        self.placement = placement(self.model, self.optimizer)  # FSDP (eptkit's or accelerate's), ZeRO, or plain
        self.plan = BatchPlan(len(self.encoded["train"]), config.batch_size, acc.num_processes, acc.process_index,
                              config.seed)
        self.collate = Collator(tokenizer, model.task_type)
        self.state = RunState()  # saved and restored with every checkpoint
        self.best_state: dict[str, torch.Tensor] | None = None  # the best adapter's tensors (CPU)
        self.report = Report(self.output_dir / LOG_NAME, self.is_main)

    # -------------------------------------------------------------- helpers
    def own_modules(self, model):
        """This run's trainable modules (the whole model; one adapter's in several runs per process). A hook
        that eptkit.multirun overrides, as it does `trainable_parameters`."""
        return model

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def checkpoint_meta(self) -> dict:
        config = self.unwrapped.method_config
        return {"config": self.config.to_dict(), "method_config": config.to_dict() if config is not None else None,
                "method": self.run_info["method"]}

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, rng: dict | None = None) -> Path:
        """checkpoints/step-N/, complete or absent (`eptkit.checkpoint.save_checkpoint`)."""
        # Sharded (FSDP) or partitioned (ZeRO-3) tensors are read whole by every process together; plain ones
        # (one process, DDP, ZeRO-1/2) by the main process alone, which writes them: under DDP a fully
        # fine-tuned model's copy on every other process would be memory spent for nothing.
        trainable = cpu_state(self.unwrapped) if self.is_main or self.placement.collective_reads else None
        return save_checkpoint(self.output_dir, self.state, accelerator=self.accelerator, trainable=trainable,
                               best=self.best_state, optimizer=self.optimizer, scheduler=self.scheduler, rng=rng,
                               meta=self.checkpoint_meta(), keep=self.config.save_total_limit,
                               per_process_optimizer=self.placement.per_process_optimizer)

    def load_checkpoint(self, directory: Path) -> None:
        self.state, self.best_state = load_checkpoint(
            directory, accelerator=self.accelerator, config=self.config, meta=self.checkpoint_meta(),
            model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler,
            per_process_optimizer=self.placement.per_process_optimizer)
        if self.is_main:  # steps after the checkpoint will be redone
            trim_log(self.output_dir, self.state.step)

    # -------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "validation") -> dict[str, float]:
        return evaluate_rows(self.unwrapped, self.tokenizer, self.spec, self.encoded[split],
                             batch_size=self.config.eval_batch_size, accelerator=self.accelerator,
                             max_new_tokens=self.config.max_new_tokens)

    def _maybe_improve(self, metrics: dict) -> bool:
        s = self.state
        value = main_metric(self.spec, metrics)
        if s.best_metric is None or value > s.best_metric:
            s.best_metric, s.best_step, s.best_metrics = value, s.step, metrics
            s.best_test_metrics = None  # this step's, if test_at_best scores it next
            self.best_state = cpu_state(self.unwrapped)
            s.bad_evals = 0
            save_whole(self.unwrapped, self.output_dir, self.best_state, is_main=self.is_main)
            return True
        s.bad_evals += 1
        return False

    # -------------------------------------------------------------- one step
    def next_rows(self) -> list[dict]:
        """The next micro-batch of this run's own data order, as encoded rows; advances the data position."""
        s = self.state
        indices = self.plan.rows(s.epoch, s.batch)
        s.epoch, s.batch = self.plan.advance(s.epoch, s.batch)
        return [self.encoded["train"][i] for i in indices]

    def _forward_backward(self, rows: list[dict], scale: float, sync: bool) -> tuple[float, int]:
        batch = self.collate(rows)
        inputs = {k: v.to(self.accelerator.device) for k, v in batch.items() if k in MODEL_INPUT_KEYS}
        # Gradients are all-reduced between processes only on the last micro-batch of a step.
        with contextlib.nullcontext() if sync else no_sync(self.model, self.accelerator):
            with self.accelerator.autocast():
                loss = self.model(**inputs).loss * self.loss_scale
            self.accelerator.backward(loss * scale)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def trainable_parameters(self):
        """What gradient clipping measures (eptkit.multirun: one run's adapter of a shared model)."""
        return self.model.parameters()

    def update(self) -> tuple[float | None, dict[str, float]]:
        """Clip the gradient, update the weights, advance the schedule; return (grad norm, the rates used)."""
        cfg, acc = self.config, self.accelerator
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.trainable_parameters(), cfg.max_grad_norm)
            grad_norm = float(plain(grad_norm)) if grad_norm is not None else None
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        self._updating = True  # a hard interrupt from here on may leave the weights half-updated
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._updating = False
        # What a Ctrl-C checkpoint saves: the state at the end of this step (evaluation draws no random numbers).
        self._position_after_step = (self.state.epoch, self.state.batch)
        self._rng_after_step = rng_state()
        return grad_norm, lrs

    def end_step(self, dt: float, losses: list[float], tokens: int, grad_norm, lrs) -> bool:
        """Bookkeeping after an update that took `dt` seconds (its micro-batches' `losses`, `tokens` real
        tokens): log, evaluate, keep the best adapter, checkpoint, callbacks. Returns True to stop early."""
        cfg, acc, s = self.config, self.accelerator, self.state
        loss = sum(losses) / len(losses)
        if acc.num_processes > 1:
            stats = acc.reduce(torch.tensor([loss, float(tokens)], device=acc.device), "sum")
            loss, tokens = float(stats[0]) / acc.num_processes, int(stats[1])
        s.tokens_seen += tokens
        s.train_time += dt
        s.step_times.append(dt)
        record = {"step": s.step, "epoch": s.epoch, "loss": loss, "lr": lrs, "grad_norm": grad_norm,
                  "step_time_s": dt, "tokens_per_s": tokens / dt if dt else None,
                  "peak_memory_mb": peak_memory_mb(acc.device)}
        self.report.progress(s.step, cfg, loss, lrs, dt, s.step_times)
        stop = False
        has_validation = len(self.encoded.get("validation", [])) > 0
        if has_validation and (s.step == cfg.max_steps or (cfg.eval_steps and s.step % cfg.eval_steps == 0)):
            metrics = self.evaluate("validation")
            record["eval"] = {"validation": metrics, "improved": self._maybe_improve(metrics)}
            if cfg.test_at_best and record["eval"]["improved"] and len(self.encoded.get("test", [])) > 0:
                record["eval"]["test"] = s.best_test_metrics = self.evaluate("test")
            self.model.train()
            self.report.print(f"eval step {s.step}: {self.spec.main_metric} {main_metric(self.spec, metrics):.2f} "
                        f"(best {s.best_metric:.2f} at step {s.best_step})")
            stop = bool(cfg.early_stopping_patience and s.bad_evals >= cfg.early_stopping_patience)
        self.report.log(record)
        if stop or s.step == cfg.max_steps or (cfg.save_steps and s.step % cfg.save_steps == 0):
            self.save_checkpoint(self._rng_after_step)
        for callback in self.callbacks:
            callback({"step": s.step, "loss": loss, "record": record, "trainer": self})
        if stop:
            self.report.print(f"early stopping at step {s.step}: no improvement in "
                        f"{cfg.early_stopping_patience} evaluations")
        return stop

    # -------------------------------------------------------------- the loop
    # The public seam: begin(), then step() (or next_rows / update / end_step, for a loop that runs the
    # forward and backward itself, as eptkit.multirun does) until done, finish(); interrupted() on Ctrl-C.

    @property
    def done(self) -> bool:
        return self.state.step >= self.config.max_steps

    def begin(self) -> None:
        """Before the first step: the output directory, resume from its newest checkpoint, Ctrl-C bookkeeping."""
        cfg = self.config
        resume_from = prepare_output_dir(self.output_dir, cfg, self.run_info, self.accelerator)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.report.print(f"resumed from {resume_from} (step {self.state.step})")
        elif cfg.resume:
            self.report.print(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}; starting a fresh run")
        self.report.print(f"training {cfg.max_steps - self.state.step} steps of {cfg.batch_size} rows "
                          f"({len(self.encoded['train'])} training examples); output in {self.output_dir}")
        self._rng_after_step, self._position_after_step = rng_state(), (self.state.epoch, self.state.batch)
        self._updating = False

    def step(self) -> bool:
        """One optimizer step: forward and backward over its micro-batches (the gradients accumulate),
        update, bookkeeping. Returns True to stop early."""
        t0 = time.perf_counter()
        losses, tokens = [], 0
        n_micro = self.config.gradient_accumulation_steps
        for micro in range(n_micro):
            loss, n_tokens = self._forward_backward(self.next_rows(), 1.0 / n_micro, sync=micro == n_micro - 1)
            losses.append(loss)
            tokens += n_tokens
        grad_norm, lrs = self.update()
        return self.end_step(time.perf_counter() - t0, losses, tokens, grad_norm, lrs)

    def run(self) -> dict:
        self.begin()
        self.report.open_bar(self.config.max_steps, self.state.step)
        stopped_early = False
        self.model.train()
        try:
            with InterruptFlag() as stop:
                while not self.done and not stopped_early:
                    # every process stops at the same step boundary after a Ctrl-C
                    if _anywhere(stop.requested, self.accelerator):
                        raise KeyboardInterrupt
                    stopped_early = self.step()
        except KeyboardInterrupt:
            self.interrupted()
            raise
        self.report.close_bar()
        return self.finish(stopped_early)

    def interrupted(self) -> None:
        """Ctrl-C: checkpoint the end of the last complete step, unless the interrupt hit the update."""
        self.report.close_bar()
        if self._updating:  # a hard interrupt inside the weight update: the weights may be half-updated
            self.report.print(f"interrupted during the update of step {self.state.step + 1}; no "
                              "checkpoint written, --resume continues from the last periodic one")
            return
        # A hard interrupt between micro-batches: forget their data position and gradients.
        self.state.epoch, self.state.batch = self._position_after_step
        self.optimizer.zero_grad(set_to_none=True)
        path = self.save_checkpoint(self._rng_after_step)
        self.report.print(f"interrupted at step {self.state.step}; checkpoint written to {path}; "
                          "continue with --resume (resume=True)")

    # -------------------------------------------------------------- before and after
    def finish(self, stopped_early: bool = False) -> dict:
        """Restore and save the best adapter, score it on the test split, write results.json."""
        acc, s, model = self.accelerator, self.state, self.unwrapped
        if self.best_state is not None:
            load_whole(model, self.best_state, acc.device)
        whole = self.best_state if self.best_state is not None or not self.placement.sharded else cpu_state(model)
        save_whole(model, self.output_dir, whole, is_main=self.is_main)  # unsharded: the model's own tensors
        acc.wait_for_everyone()
        test_metrics = None
        if len(self.encoded.get("test", [])) > 0:
            # The best adapter's test scores, unless test_at_best already took them at its step (the same
            # adapter, so the same scores: a second pass over the test split would only cost time).
            test_metrics = s.best_test_metrics if s.best_test_metrics is not None else self.evaluate("test")
            self.report.print(f"test ({self.spec.name}, best step {s.best_step}): "
                        + ", ".join(f"{k} {v:.2f}" for k, v in test_metrics.items()))
        results = run_results(self, stopped_early, test_metrics)
        if self.is_main:
            atomic_write_json(self.output_dir / RESULTS_NAME, results)
        acc.wait_for_everyone()
        return results


class InterruptFlag:
    """First SIGINT: stop cleanly at the end of the step. Second: KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step and writing a checkpoint (Ctrl-C again aborts)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _prepare(model, config: TrainConfig, lrs: dict, acc):
    """(model, optimizer, scheduler) ready for `acc`. Under --fsdp where accelerate does not shard (CPUs)
    eptkit shards before the optimizer sees the parameters and keeps the model out of prepare (which would
    wrap it in DDP); accelerate's own FSDP (recipes/accelerate/fsdp.yaml) shards inside prepare."""
    _tell_deepspeed(acc, config)
    ours = check_sharding(config, model, acc)
    if ours:
        shard_model(model, acc.device, acc.num_processes)
    optimizer = make_optimizer(model, config, lrs)
    scheduler = make_scheduler(optimizer, config)
    if ours:
        return model, acc.prepare(optimizer), scheduler
    return *acc.prepare(model, optimizer), scheduler


def make_accelerator(config: TrainConfig):
    """The run's Accelerator. Create it before the backbone loads (as `eptkit train` does) and pass it to
    `train`: under DeepSpeed ZeRO-3 with `zero3_init_flag` (recipes/accelerate/zero3.yaml) creating it
    registers the DeepSpeed config with transformers, whose `from_pretrained` then loads every weight
    already partitioned (deepspeed.zero.Init), so no process ever holds the whole backbone. Otherwise
    when it is created changes nothing."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision: 'fp16' needs a GPU (on a CPU it would run unscaled fp32 autocast "
                         "under an fp16 name); use 'bf16' or 'no'")
    # Several processes on a machine without a GPU (torchrun / `accelerate launch --multi_gpu`): accelerate
    # only picks its multi-CPU (gloo) mode when told cpu=True. Under DeepSpeed (on a CPU: its CPU
    # accelerator, DS_ACCELERATOR=cpu) cpu=True would drop the DeepSpeed config, so accelerate is named the
    # gloo backend instead; without a backend it would count one process in each of the launched ones.
    several_cpus = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several_cpus and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return Accelerator(mixed_precision=config.mixed_precision,
                           kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(mixed_precision=config.mixed_precision, cpu=several_cpus)


def _tell_deepspeed(accelerator, config: TrainConfig) -> None:
    """Under DeepSpeed (recipes/accelerate/zero3.yaml) the engine needs the micro-batch size, which accelerate
    reads from a dataloader, and eptkit batches without one (`eptkit.batching`)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size


def _anywhere(flag: bool, accelerator) -> bool:
    """Whether `flag` is set in any process: every process must stop at the same step."""
    if accelerator.num_processes > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
        flag = bool(accelerator.reduce(t, "sum").item() > 0)
    return flag


def _fix_threads() -> int:
    """Pin the intra-op thread count, so that how work (and floating-point sums) is split among
    threads depends on that number alone, never on the machine's load (docs/reproducibility.md).

    torch.set_num_threads also switches MKL's dynamic thread choice off; OpenMP's own (OMP_DYNAMIC)
    is off unless the environment turns it on, which is warned about."""
    n = torch.get_num_threads()
    torch.set_num_threads(n)
    for var in ("OMP_DYNAMIC", "MKL_DYNAMIC"):
        if os.environ.get(var, "").strip().lower() in ("true", "1", "yes", "on"):
            logger.warning("%s=%s lets the thread count follow the machine's load; runs may then differ in "
                           "their last bits (unset it for bit-identical runs)", var, os.environ[var])
    return n


def train(model: TrainableModel, tokenizer, task, data, config: TrainConfig | None = None, *, run_info: dict | None = None,
          callbacks: list[Callable[[dict], None]] | None = None, accelerator=None) -> dict:
    """Train `model` (a PromptedModel or an `eptkit.baselines` wrapper) on `task` and return the results.

    task: a task name ('cb') or a TaskSpec (e.g. from `load_files`).
    data: a DatasetDict (or dict of Datasets) with raw `train`, `validation` and optionally `test`
        splits, as `eptkit.tasks.loading.load_task` / `load_files` return them.
    run_info: extra facts recorded in output_dir/eptkit_run.json (the CLI records the backbone path).
    callbacks: functions called after every optimizer step with {"step", "loss", "record", "trainer"}.
    Returns the dict also written to output_dir/results.json.
    """
    config = config or TrainConfig()
    return Trainer(model, tokenizer, task, data, config, run_info=run_info, callbacks=callbacks,
                   accelerator=accelerator).run()

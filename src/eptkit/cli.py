"""The `eptkit` command line: a table of commands, each parsing its arguments and calling the library.

    eptkit train    --task cb --method ept --data-dir ../shared/data --output-dir runs/cb-ept
    eptkit evaluate --adapter runs/cb-ept [--task cb] [--split test]
    eptkit predict  --adapter runs/cb-ept --input rows.jsonl --output predictions.jsonl
    eptkit export   --adapter runs/cb-ept --format folded|peft --output out/
    eptkit info     --adapter runs/cb-ept [--plot gates.png]

Every hyper-parameter is an option, generated from the config dataclasses (their help text is the
options' help). `--config FILE` reads a recipe (JSON, or TOML with a .toml suffix) whose keys are
option names (`prompt-length` or `prompt_length`); options given on the command line override it.

Bad input (unknown task or method, missing files, impossible hyper-parameters, an adapter from
another backbone) exits with status 2 and one line on stderr, no traceback. Ctrl-C during
training writes a checkpoint and exits with status 130.

Subcommands live in a registry: `@register_command("bench", "run the benchmarks")` on a function that
adds its arguments to a parser and returns the function to run (args -> exit status).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

# Only modules without torch/transformers at the top: `eptkit --help`, `--version`, `info --task` and
# argument errors never import them (tests/test_first_hour.py checks); commands import what they use.
from .config import TrainConfig
from .console import PROG, Parser, UsageError, check_output_dir, one_line, quiet_libraries, say, silence_stdout, summary
from .options import add_dataclass_arguments, add_method_arguments, build_configs, load_data
from .options import method_settings, resolve, run_info
from .registry import method_names, prompt_methods
from .task_types import TASK_TYPES
from .version import __version__


# ============================================================================ registry
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {}


def register_command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments to `parser` and returns the
    function that runs it (args -> exit status)."""

    def wrap(configure):
        COMMANDS[name] = (help, configure)
        return configure

    return wrap


# ============================================================================ train
def _train_parser(parser: argparse.ArgumentParser):
    S = argparse.SUPPRESS  # unset options stay absent, so a recipe's value is not overridden by a default
    g = parser.add_argument_group("task and data")
    g.add_argument("--task", default=S, help="Task name (cb, rte, sst2, ...), or a name for your own files.")
    g.add_argument("--data-dir", default=S,
                   help="Folder laid out like shared/data (glue/, superglue/). Default: $EPTKIT_DATA_DIR, "
                        "else the Hugging Face Hub (needs network).")
    g.add_argument("--k-shot", type=int, default=S, help="Train on k examples per class (seeded by --seed).")
    g.add_argument("--train-file", default=S, help="Your own training file (.csv, .tsv or .jsonl).")
    g.add_argument("--validation-file", default=S, help="Your own validation file (default: held out from train).")
    g.add_argument("--test-file", default=S, help="Your own test file (default: held out from train).")
    g.add_argument("--text-columns", default=S, help="Comma-separated text column(s) of your files (one or two).")
    g.add_argument("--label-column", default=S, help="Label column of your files (default: label).")
    g = parser.add_argument_group("model and method")
    g.add_argument("--method", choices=method_names(), default=S, help="Method (default: ept).")
    g.add_argument("--model", default=S, help="Backbone: a local path or Hub id (default: the bundled all-MiniLM-L6-v2).")
    g.add_argument("--task-type", choices=("auto",) + TASK_TYPES, default=S,
                   help="How to load the backbone: sequence classifier, encoder-decoder or decoder-only generator "
                        "(default auto: from the model's config).")
    add_method_arguments(g)  # every method's options (eptkit.registry, eptkit.options)
    g = parser.add_argument_group("training loop")
    add_dataclass_arguments(g, dataclasses.fields(TrainConfig), suppress=True)
    parser.add_argument("--config", default=S, help="Recipe file (JSON or TOML) whose keys are option names; "
                                                    "command-line options override it.")
    g = parser.add_argument_group("several runs in one process (pt, dept, ept; eptkit.sweep)")
    g.add_argument("--seeds", default=S, help="Comma-separated seeds (0,1,2): one adapter per seed over one frozen "
                                              "backbone, each batch holding rows of every run; OUTPUT_DIR/seed-N/.")
    g.add_argument("--sweep", default=S, help='File (JSON/TOML) {"runs": [{option: value, "name": ...}, ...]}: runs '
                                              "differing in method, rates or task, trained together; OUTPUT_DIR/NAME/.")
    return train_command


def resolve_train_options(args: argparse.Namespace) -> dict[str, Any]:
    """defaults < recipe (--config) < command line (`eptkit.options.resolve`)."""
    return resolve(vars(args))


def train_command(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from .backbones import check_prompt_fits, load_backbone, resolve_model_path
    from .baselines import build_model
    from .embeddings import partition_share, partitioned
    from .files import round_floats
    from .task_types import checkpoint_task_type
    from .train import make_accelerator, train

    options = resolve_train_options(args)
    if options.get("fsdp") and (options.get("seeds") is not None or options.get("sweep")):
        raise UsageError("--fsdp trains one run per launch; --seeds/--sweep share one unsharded backbone among "
                         "runs in one process (launch one sharded run per seed instead)")
    if options.get("seeds") is not None or options.get("sweep"):
        from .sweep import expand_runs, train_sweep

        for _, run in expand_runs(options):  # before any data is read
            check_output_dir(build_configs(run)[1])
        for results in train_sweep(options):
            print(json.dumps(round_floats(summary(results))))
        return 0
    method_config, train_config = build_configs(options)
    check_output_dir(train_config)
    model_path = resolve_model_path(options.get("model"))
    data, spec = load_data(options, train_config.seed)
    task_type = checkpoint_task_type(model_path, options.get("task_type") or "auto")
    accelerator = make_accelerator(train_config)  # before the backbone: ZeRO-3 then loads it partitioned
    set_seed(train_config.seed)
    say(f"loading the backbone ({model_path if options.get('model') else 'the bundled all-MiniLM-L6-v2'})")
    backbone, tokenizer = load_backbone(model_path, task_type, spec)
    if partitioned(backbone):  # what zero3_init_flag is for: no process held the backbone whole
        held, total = partition_share(backbone)
        say(f"the backbone loaded partitioned over {accelerator.num_processes} processes (DeepSpeed ZeRO-3): "
            f"this process holds {held:,} of its {total:,} weights")
    try:
        model = build_model(backbone, options["method"], method_config, tokenizer=tokenizer,
                            **method_settings(options, options["method"]))
    except TypeError as e:  # an unsupported model class
        raise UsageError(str(e)) from None
    if model.max_length is None and task_type != "seq2seq" and "max_length" in options:  # an explicit one fits
        check_prompt_fits(backbone, model.prompt_positions, train_config.max_length)
    results = train(model, tokenizer, spec, data, train_config,
                    run_info=run_info(options, model_path, task_type, spec), accelerator=accelerator)
    if accelerator.is_main_process:
        print(json.dumps(round_floats(summary(results))))
    return 0


# ============================================================================ evaluate
@register_command("evaluate", "score a trained adapter on a task split")
def _evaluate_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--task", help="Task (default: the one the adapter was trained on).")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"), help="Split (default test).")
    parser.add_argument("--data-dir", help="Data folder (default: the one used in training, $EPTKIT_DATA_DIR, the Hub).")
    parser.add_argument("--model", help="Backbone path or Hub id (default: the one recorded with the adapter).")
    parser.add_argument("--batch-size", type=int, default=64, help="Evaluation batch size (default: 64).")
    parser.add_argument("--max-eval-samples", type=int, help="Score a seeded random subset of this many rows "
                        "(default: the run's own --max-eval-samples, so the score is the one it reported; 0: all).")
    parser.add_argument("--test-file", help="Score your own labelled file (.jsonl, .csv or .tsv) instead of a "
                                            "split: the task's text columns (`eptkit info --task NAME`) and a label "
                                            "column holding class names or ids.")
    parser.add_argument("--label-column", default="label", help="Label column of --test-file (default: label).")
    parser.add_argument("--output", help="Also write the metrics to this JSON file.")
    return evaluate_command


def evaluate_command(args) -> int:
    from .files import atomic_write_json, round_floats
    from .runs import evaluate_trained, load_trained

    if args.test_file and not Path(args.test_file).is_file():
        raise UsageError(f"{args.test_file}: test file not found")
    model, tokenizer, spec, run = load_trained(args.adapter, model=args.model, task=args.task)
    data_dir = args.data_dir or run.get("data_dir") or os.environ.get("EPTKIT_DATA_DIR") or None
    n = run.get("max_eval_samples") if args.max_eval_samples is None and not args.test_file else args.max_eval_samples
    out = round_floats(evaluate_trained(model, tokenizer, spec, run, args.split, data_dir=data_dir,
                                        max_samples=n or None, batch_size=args.batch_size,
                                        test_file=args.test_file, label_column=args.label_column))
    print(json.dumps(out))
    if args.output:
        atomic_write_json(Path(args.output), out)
    return 0


# ============================================================================ predict
@register_command("predict", "label the rows of a JSONL/CSV/TSV file with a trained adapter")
def _predict_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--input", required=True, help="Rows to label (.jsonl, .csv or .tsv) with the task's text columns.")
    parser.add_argument("--output", required=True, help="JSONL file: each input row plus 'prediction' (label name); "
                                                         "'-' writes the rows to standard output.")
    parser.add_argument("--task", help="Task (default: the one the adapter was trained on).")
    parser.add_argument("--model", help="Backbone path or Hub id (default: the one recorded with the adapter).")
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size (default: 64).")
    return predict_command


def predict_command(args) -> int:
    from .files import atomic_write_lines
    from .runs import load_trained, predict_file

    input_path = Path(args.input)
    if not input_path.is_file():
        raise UsageError(f"{input_path}: input file not found")
    model, tokenizer, spec, run = load_trained(args.adapter, model=args.model, task=args.task)
    rows = predict_file(model, tokenizer, spec, run, input_path, batch_size=args.batch_size)
    if args.output == "-":  # a pipe: the rows alone, no summary line
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_lines(out_path, [json.dumps(row, ensure_ascii=False) for row in rows])
    print(json.dumps({"rows": len(rows), "output": str(out_path)}))
    return 0


# ============================================================================ export
@register_command("export", "write a trained adapter as a folded adapter or in PEFT's format")
def _export_parser(parser):
    parser.add_argument("--adapter", required=True, help="Output dir of `eptkit train`, or an adapter dir.")
    parser.add_argument("--format", required=True, choices=("folded", "peft", "compiled"),
                        help="folded: EPT/DePT prompt side folded into constant tensors (eptkit format; "
                             "'compiled' is its older name); "
                             "peft: PEFT prompt-tuning format (PT adapters with pooling 'backbone' only).")
    parser.add_argument("--output", required=True, help="Directory to write.")
    parser.add_argument("--model", help="Backbone path or Hub id (default: the one recorded with the adapter).")
    return export_command


def export_command(args) -> int:
    from .baselines import copy_baseline, read_baseline_info
    from .registry import saved_by_peft
    from .files import atomic_copy
    from .model import export_peft, save_adapter
    from .run_files import RUN_INFO_NAME
    from .runs import load_trained

    baseline = read_baseline_info(args.adapter) if Path(args.adapter).is_dir() else None
    out = Path(args.output)
    if baseline is not None:  # LoRA, P-tuning, prefix: PEFT's files already; full and head: no adapter format
        method = baseline.get("method")
        if args.format != "peft" or not saved_by_peft(method):
            what = ("a PEFT adapter already: --format peft copies it" if saved_by_peft(method)
                    else "a whole model, not an adapter: use it with `eptkit evaluate` and `predict`")
            raise UsageError(f"{args.adapter}: --format {args.format} is for pt/dept/ept adapters; a {method!r} "
                             f"run is {what}")
        load_trained(args.adapter, model=args.model)  # refuses a corrupted or mixed directory before copying it
        copy_baseline(args.adapter, out, baseline)
        print(json.dumps({"format": args.format, "output": str(out)}))
        return 0
    model, _, _, _ = load_trained(args.adapter, model=args.model)
    if args.format == "peft":
        try:
            export_peft(model, out)
        except ValueError as e:
            raise UsageError(f"{args.adapter}: {e}") from None
    else:
        save_adapter(model, out, folded=True)
        run_file = Path(args.adapter) / RUN_INFO_NAME
        if run_file.is_file():
            atomic_copy(run_file, out / RUN_INFO_NAME)
    print(json.dumps({"format": args.format, "output": str(out)}))
    return 0


# ============================================================================ info
@register_command("info", "describe an adapter (for EPT, the learned subspace gate weights), or a task's fields")
def _info_parser(parser):
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="Output dir of `eptkit train`, or an adapter dir.")
    which.add_argument("--task", help="A task's name: the fields its rows need (for `predict` and "
                                      "`evaluate --test-file`) and its labels.")
    parser.add_argument("--plot", help="Write a PNG heat map of EPT's gate weights (prompt token x subspace).")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON instead of text.")
    return info_command


def info_command(args) -> int:
    from .inspection import adapter_info, adapter_info_lines, plot_gate_weights, task_info, task_info_lines

    if args.task:
        if args.plot:
            raise UsageError("--plot needs --adapter")
        info = task_info(args.task)
        print(json.dumps(info, indent=2) if args.json else "\n".join(task_info_lines(info)))
        return 0
    info = adapter_info(args.adapter)
    gates = info.get("gate_weights")
    if args.plot:
        if gates is None:
            raise UsageError(f"{args.adapter}: --plot needs an unfolded EPT adapter with multi-space projection")
        plot_gate_weights(gates, args.plot, title=f"EPT gate weights ({info['adapter']})")
    print(json.dumps(info, indent=2) if args.json else "\n".join(adapter_info_lines(info)))
    if args.plot and not args.json:
        print(f"heat map written to {args.plot}")
    return 0


# ============================================================================ bench
@register_command("bench", "run a benchmark of benchmarks/ (speed or accuracy); needs a source checkout")
def _bench_parser(parser: argparse.ArgumentParser):
    parser.add_argument("which", choices=("speed", "accuracy"), help="benchmarks/speed.py or benchmarks/accuracy.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of that script (see its --help)")
    return bench_command


def bench_command(args) -> int:
    import runpy

    # The harnesses are scripts beside the package, not part of it: they import the library as users do.
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise UsageError(f"{script}: not found; `eptkit bench` runs from a source checkout of eptkit")
    module = runpy.run_path(str(script))
    module["main"](args.args)
    return 0


@register_command("serve", "serve adapters over HTTP: one backbone, concurrent requests in mixed batches")
def _serve_parser(parser):
    from .serve import add_arguments, run_command  # the server lives in the library
    return add_arguments(parser) or run_command


# ============================================================================ main
register_command("train", f"train an adapter ({', '.join(prompt_methods())}) or a baseline "
                          f"({', '.join(m for m in method_names() if m not in prompt_methods())}) on a task")(_train_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Efficient prompt tuning (PT, DePT, EPT) for "
                                     "Hugging Face models. Run `eptkit COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    order = ["train", "evaluate", "predict", "export", "info"]
    for name in order + [n for n in COMMANDS if n not in order]:
        help_text, configure = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        p.set_defaults(func=configure(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `eptkit ... | head`: the reader has gone, which is no error of ours
        silence_stdout()
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "info" or args.adapter:  # a command that loads a model (info --task needs none)
        quiet_libraries()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except (UsageError, ValueError, OSError) as e:  # AdapterError and DataError are ValueErrors
        if os.environ.get("EPTKIT_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

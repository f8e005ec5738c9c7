"""How much did EPT's own modules change the prompt in trained runs? (diagnostic for RESULTS.md)

    python benchmarks/ept_modules.py runs/accuracy/sst2-ept-s0-* [more run dirs] [--out results/ept_modules.md]

For each `eptkit train` output directory of an EPT run, rebuilds the run's initial adapter (same seed,
same construction order as `eptkit train`) and reports, as relative Frobenius norms:

    prompt drift       ||P_s - P_s(init)|| / ||P_s(init)||   how far training moved the short prompt itself
    fusion             ||P_f - P_s|| / ||P_s||                what prompt fusion adds (zero at init)
    projection         ||P_out - P_f|| / ||P_f||              what multi-space projection adds (zero at init)
    gate spread        max |w - 1/N|                          how far the subspace weights left uniform

Both modules only transform the short prompt, which does not depend on the input text (that is why a
trained adapter compiles to constants): they can change how training moves the prompt, not what a
prompt can express. If they add little next to the prompt's own drift, EPT trains like DePT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@torch.no_grad()
def module_shares(run_dir: Path) -> dict:
    from accelerate.utils import set_seed

    from eptkit import PromptedModel
    from eptkit.baselines import build_model
    from eptkit.backbones import load_backbone
    from eptkit.tasks.registry import get_task

    saved = json.loads((run_dir / "adapter_config.json").read_text())
    if saved.get("method") != "ept":
        raise SystemExit(f"{run_dir}: not an EPT run (method {saved.get('method')!r})")
    seed = json.loads((run_dir / "results.json").read_text())["config"]["train"]["seed"]
    spec = get_task(json.loads((run_dir / "eptkit_run.json").read_text())["task"])
    backbone, _ = load_backbone(saved["backbone"], "classification", spec)
    trained = PromptedModel.from_pretrained(backbone, run_dir)
    ept = trained.method
    # The initial adapter, built exactly as `eptkit train` built it (seed, then backbone, then method).
    set_seed(seed)
    backbone, tokenizer = load_backbone(saved["backbone"], "classification", spec)
    initial = build_model(backbone, "ept", trained.config, tokenizer=tokenizer).method.prompt_embeddings.detach()
    prompt, offset = ept.prompt_embeddings, ept.offset()
    fused = ept.fused_prompt(offset)
    out, _ = ept()
    gates = ept.gate_weights()
    return {
        "run": run_dir.name,
        "prompt_drift": _rel(prompt, initial),
        "fusion": _rel(fused, prompt),
        "projection": _rel(out, fused),
        "gate_spread": float((gates - 1 / gates.shape[1]).abs().max()) if gates is not None else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of `eptkit train --method ept` runs")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    rows = [module_shares(r) for r in args.runs]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| run | prompt drift | fusion | projection | gate spread |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {fmt(r['prompt_drift'])} | {fmt(r['fusion'])} | {fmt(r['projection'])} | "
              f"{fmt(r['gate_spread'])} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(f"Command: `python benchmarks/ept_modules.py {' '.join(sys.argv[1:])}`\n\n" + text)


if __name__ == "__main__":
    main()

"""speed.py's result as markdown and JSON files (results/speed_<model>_<device>[_suffix].{json,md})."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from timing import RESULTS_DIR, write_text

# ------------------------------------------------------------------------------------------ output
def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    s, m = result["setting"], result["machine"]
    lines = [
        f"# Speed: {s['model']} on {s['device']} ({m.get('device_name')})",
        "",
        f"{result['date']}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
        f"torch threads {m['torch_threads']}; dtype {s['dtype']}.",
        f"Batch {s['batch_size']} x source length {s['source_length']}"
        + (f", target length {s['target_length']}" if s.get("target_length") else "")
        + (f", pooling `{s['pooling']}`" if s.get("pooling") else "")
        + f". Inputs: {s['inputs']}.",
        f"Timing: {s['schedule']}; {s['warmup']} warm-up + {s['repeats']} timed training rounds, "
        f"{s['infer_warmup']} + {s['infer_repeats']} inference rounds. Optimizer: {s['optimizer']}.",
        f"Command: `{result['command']}`",
        "",
    ]
    if result["train"]:
        pt = result["train"].get("pt")
        lines += ["## Training step (forward + backward + AdamW)", "",
                  "| method | trainable params | median ms | IQR ms | x PT | fwd / bwd / opt ms | saved activations MiB | "
                  "state MiB (params+grads+AdamW) |" + (" CUDA peak MiB |" if s["device"].startswith("cuda") else ""),
                  "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if s["device"].startswith("cuda") else "")]
        for key, t in result["train"].items():
            parts = t["parts_median_s"]
            mem = t.get("memory", {})
            state = None if not mem else 2 * mem["trainable_param_bytes"] + mem["optimizer_state_bytes"]
            rel = f"{t['median_s'] / pt['median_s']:.3f}" if pt else ""
            row = (f"| {t['label']} | {t['trainable_params']:,} | {t['median_s'] * 1e3:.1f} | "
                   f"{t['q25_s'] * 1e3:.1f}-{t['q75_s'] * 1e3:.1f} | {rel} | "
                   f"{parts['forward'] * 1e3:.1f} / {parts['backward'] * 1e3:.1f} / {parts['optimizer'] * 1e3:.1f} | "
                   f"{_mib(mem.get('saved_activation_bytes'))} | {_mib(state)} |")
            if s["device"].startswith("cuda"):
                row += f" {_mib(mem.get('cuda_peak_step_bytes'))} |"
            lines.append(row)
        lines.append("")
    if result["inference"]:
        lines += ["## Inference (forward only, eval, no_grad)", "",
                  "| method | median ms | IQR ms |" + (" CUDA peak MiB |" if s["device"].startswith("cuda") else ""),
                  "|---|---:|---:|" + ("---:|" if s["device"].startswith("cuda") else "")]
        for key, t in result["inference"].items():
            row = f"| {t['label']} | {t['median_s'] * 1e3:.1f} | {t['q25_s'] * 1e3:.1f}-{t['q75_s'] * 1e3:.1f} |"
            if s["device"].startswith("cuda"):
                row += f" {_mib(t.get('memory', {}).get('cuda_peak_step_bytes'))} |"
            lines.append(row)
        lines.append("")
    lines += ["## Ratios (of medians)", "",
              "| ratio | value | median paired ratio | bootstrap 95% CI | ratio of minimums | target | result |",
              "|---|---:|---:|---|---:|---:|---|"]
    labels = {**{k: v["label"] for k, v in result["train"].items()}, **{k: v["label"] for k, v in result["inference"].items()}}
    for name, r in result["ratios"].items():
        phase = "training" if r["phase"] == "train" else "inference"
        title = f"{labels[r['numerator']]} / {labels[r['denominator']]} ({phase})"
        ci = f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if r["ci95"] else ""
        if r["target_max"] is None:
            target, verdict = "", "context"
        else:
            target = f"<= {r['target_max']:.2f}"
            verdict = "PASS" if r["pass"] else "FAIL"
            if r.get("verdict_robust") is False:
                verdict += " (within noise)"
        lines.append(f"| {title} | {r['ratio_of_medians']:.3f} | {r['median_paired_ratio']:.3f} | {ci} | "
                     f"{r['ratio_of_minimums']:.3f} | {target} | {verdict} |")
    lines += ["", f"Memory: {s['memory_measure']}.", ""]
    return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: str | os.PathLike | None = None, name: str | None = None) -> tuple[Path, Path]:
    """Write `speed_<model>_<device>[_<suffix>].json` and `.md` atomically; returns both paths."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    s = result["setting"]
    name = name or f"speed_{s['model']}_{torch.device(s['device']).type}"
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    write_text(jpath, json.dumps(result, indent=1) + "\n")
    write_text(mpath, to_markdown(result))
    return jpath, mpath


"""Decoder-only speed: eptkit's PT and EPT (the prompt as a shared key/value prefix, eptkit.prefix)
against PEFT's prompt tuning, per training step and per forward, on a Llama-shaped model with random
weights (no download).

Methods (keys in the JSON): pt (eptkit PT, l, shared prefix), pt_plain (eptkit PT, l, shared_prefix
off: [prompt ; text] through the model for every row, as PEFT does), ept (eptkit EPT, m, r, shared
prefix), peft_pt (PEFT PT, l). Timing is speed.py's: one process, the methods interleaved round-robin
with the start rotating, warm-up rounds discarded, medians and a paired bootstrap 95% interval of the
ratio of medians. Training step = forward + backward + AdamW + zero_grad; forward = eval, no_grad.

    python benchmarks/decoder_speed.py                        # Llama-shaped d=1024, 8 layers, 16 x 256
    python benchmarks/decoder_speed.py --shape small          # d=512, 4 layers, vocabulary 8000 (CPU)
    python benchmarks/decoder_speed.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

import speed_inputs  # sibling scripts: their folder is on the path when a script of benchmarks/ runs
import timing

SCHEMA = "eptkit-bench-decoder-speed/1"
METHODS = ("pt", "pt_plain", "ept", "peft_pt")
# Llama-shaped backbones: (hidden, layers, heads, key/value heads, MLP width, vocabulary).
SHAPES = {
    "llama-1024x8": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                         intermediate_size=2816, vocab_size=32000),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408, vocab_size=8000),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=120),
}
# (name, numerator, denominator, phase, target upper bound or None for context)
RATIOS = (
    ("pt_vs_peft_pt", "pt", "peft_pt", "train", 0.85),
    ("ept_vs_peft_pt", "ept", "peft_pt", "train", None),
    ("pt_plain_vs_peft_pt", "pt_plain", "peft_pt", "train", None),
    ("pt_vs_pt_plain", "pt", "pt_plain", "train", None),
    ("pt_vs_peft_pt_forward", "pt", "peft_pt", "forward", None),
    ("ept_vs_peft_pt_forward", "ept", "peft_pt", "forward", None),
    ("pt_plain_vs_peft_pt_forward", "pt_plain", "peft_pt", "forward", None),
)


def build_backbone(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    return LlamaForCausalLM(cfg).eval()


def build(key: str, base, *, pt_length: int, short_length: int, rank: int, source_length: int):
    model = speed_inputs.build_method_model("pt" if key == "pt_plain" else key, base, pt_length=pt_length,
                                     short_length=short_length, rank=rank, source_length=source_length, pooling=None)
    if key == "pt_plain":
        model.configs[model.active_adapter].shared_prefix = False
    return model


def make_batch(vocab: int, batch_size: int, length: int, target: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids, no padding; the last `target` tokens are the target (labels), the rest source."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, length), generator=g)
    labels = ids.clone()
    labels[:, : length - target] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _interleaved(keys, rounds, step):
    raw = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            raw[key].append(step(key))
    return raw


def run(shape: str = "small", *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 16,
        source_length: int = 256, target_length: int = 64, pt_length: int = 100, short_length: int = 60,
        rank: int = 30, methods: Sequence[str] = METHODS, warmup: int = 1, repeats: int = 5,
        threads: int | None = None, seed: int = 0, log=None) -> dict[str, Any]:
    log = log or (lambda s: None)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {METHODS}")
    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)}, got {shape!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    base = build_backbone(shape)
    batch = {k: v.to(dev) for k, v in make_batch(base.config.vocab_size, batch_size, source_length, target_length,
                                                 seed).items()}
    forward_batch = {k: v for k, v in batch.items() if k != "labels"}
    kw = dict(pt_length=pt_length, short_length=short_length, rank=rank, source_length=source_length)
    models, optimizers = {}, {}
    for i, key in enumerate(methods):
        torch.manual_seed(seed + 1 + i)
        models[key] = build(key, base, **kw).to(dev).train()
        optimizers[key] = torch.optim.AdamW(timing.trainable_parameters(models[key]), lr=1e-5)
    keys, result = list(methods), {"train": {}, "forward": {}}

    def train(key):
        t = timing.train_step(models[key], optimizers[key], batch, dev, dtype, timing.Clock(dev))["total"]
        log(f"train {key}: {t * 1e3:.0f} ms")
        return t

    def forward(key):
        t = timing.infer_step(models[key], forward_batch, dev, dtype)
        log(f"forward {key}: {t * 1e3:.0f} ms")
        return t

    for phase, step in (("train", train), ("forward", forward)):
        if phase == "forward":
            for m in models.values():
                m.eval()
        raw = _interleaved(keys, warmup + repeats, step)
        for key in keys:
            times = raw[key][warmup:]
            result[phase][key] = {"times_s": times, "warmup_times_s": raw[key][:warmup], **timing.summarize(times),
                                  "trainable_params": sum(p.numel() for p in timing.trainable_parameters(models[key]))}
    ratios = {}
    for name, num, den, phase, target in RATIOS:
        if num in result[phase] and den in result[phase]:
            stats = timing.ratio_stats(result[phase][num]["times_s"], result[phase][den]["times_s"], seed=seed)
            ratios[name] = {"numerator": num, "denominator": den, "phase": phase, **stats, "target_max": target}
            if target is not None:
                ratios[name]["pass"] = stats["ratio_of_medians"] <= target
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "setting": {"shape": shape, "backbone": {"model": "LlamaForCausalLM, random weights", **SHAPES[shape]},
                    "device": str(dev), "dtype": dtype, "batch_size": batch_size, "source_length": source_length,
                    "target_length": target_length, "pt_length": pt_length, "short_length": short_length,
                    "rank": rank, "warmup": warmup, "repeats": repeats, "seed": seed,
                    "inputs": f"random token ids {batch_size} x {source_length}, no padding; labels on the last "
                              f"{target_length} tokens"},
        "machine": timing.machine_info(dev),
        **result,
        "ratios": ratios,
    }


LABELS = {"pt": "eptkit PT (l={l}, shared prefix)", "pt_plain": "eptkit PT (l={l}, shared_prefix off)",
          "ept": "eptkit EPT (m={m}, r={r}, shared prefix)", "peft_pt": "PEFT PT (l={l})"}


def to_markdown(res: dict[str, Any], note: str = "") -> str:
    s, m = res["setting"], res["machine"]
    label = {k: v.format(l=s["pt_length"], m=s["short_length"], r=s["rank"]) for k, v in LABELS.items()}
    b = s["backbone"]
    lines = [f"# Decoder-only speed: Llama-shaped `{s['shape']}` on {s['device']} ({m.get('device_name')})", "",
             f"{res['date']}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; torch threads "
             f"{m['torch_threads']}; dtype {s['dtype']}. Backbone: {b['model']}, d={b['hidden_size']}, "
             f"{b['num_hidden_layers']} layers, {b['num_attention_heads']} heads ({b['num_key_value_heads']} key/value), "
             f"MLP {b['intermediate_size']}, vocabulary {b['vocab_size']}. Inputs: {s['inputs']}. "
             f"{s['warmup']} warm-up + {s['repeats']} timed rounds per phase, interleaved.", ""]
    if note:
        lines += [note, ""]
    for phase, title in (("train", "Training step (forward + backward + AdamW)"), ("forward", "Forward (eval, no_grad)")):
        lines += [f"## {title}", "", "| method | trainable params | median ms | IQR ms |", "|---|---:|---:|---:|"]
        for key, t in res[phase].items():
            lines.append(f"| {label[key]} | {t['trainable_params']:,} | {t['median_s'] * 1e3:.0f} | "
                         f"{t['q25_s'] * 1e3:.0f}-{t['q75_s'] * 1e3:.0f} |")
        lines.append("")
    lines += ["## Ratios (of medians)", "", "| ratio | phase | value | bootstrap 95% CI | ratio of minimums | target |",
              "|---|---|---:|---|---:|---|"]
    for r in res["ratios"].values():
        ci = f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if r["ci95"] else ""
        target = "" if r["target_max"] is None else f"<= {r['target_max']:.2f}: {'PASS' if r['pass'] else 'FAIL'}"
        lines.append(f"| {label[r['numerator']]} / {label[r['denominator']]} | {r['phase']} | "
                     f"{r['ratio_of_medians']:.3f} | {ci} | {r['ratio_of_minimums']:.3f} | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1024x8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast, fp32 weights")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--source-length", type=int, default=256, help="text length (also EPT's offset_length)")
    p.add_argument("--target-length", type=int, default=64, help="tokens at the end of the text that carry labels")
    p.add_argument("--pt-length", type=int, default=100)
    p.add_argument("--short-length", type=int, default=60)
    p.add_argument("--rank", type=int, default=30)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", default="", help="a sentence for the markdown (e.g. the machine's load)")
    p.add_argument("--out-dir", default=str(timing.RESULTS_DIR))
    p.add_argument("--name", default=None, help="file stem (default decoder_speed_<shape>_<device type>)")
    a = p.parse_args(argv)
    res = run(a.shape, device=a.device, dtype=a.dtype, batch_size=a.batch_size, source_length=a.source_length,
              target_length=a.target_length, pt_length=a.pt_length, short_length=a.short_length, rank=a.rank,
              methods=[x for x in a.methods.split(",") if x], warmup=a.warmup, repeats=a.repeats, threads=a.threads,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    res["command"] = "python benchmarks/decoder_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["note"] = a.note
    name = a.name or f"decoder_speed_{a.shape}_{torch.device(a.device).type}" + ("" if a.dtype == "fp32" else f"_{a.dtype}")
    out = Path(a.out_dir)
    timing.write_text(out / f"{name}.json", json.dumps(res, indent=1) + "\n")
    timing.write_text(out / f"{name}.md", to_markdown(res, a.note))
    print(to_markdown(res, a.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much does an untrained prompt change the frozen backbone's features?

A prompt method starts from the linear probe's features plus whatever its fresh prompt does to them.
This script measures that start: it mean-pools the text tokens' last hidden states of the bundled
all-MiniLM-L6-v2 with no prompt and with several untrained prompts, fits a ridge (regression) or
logistic (classification) probe on training rows and scores it on validation rows. No training of
the prompt happens here, so the numbers are where gradient descent starts from.

    python benchmarks/fresh_prompt.py --task stsb        # --train 1000 --validation 400

Configurations: PEFT-style prompt tuning (prompt vectors first, positions counted from the prompt's
first vector, so the text moves l positions to the right), the same with the text keeping the
positions it has without a prompt, and a prompt initialised from an instruction's token embeddings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from transformers import AutoModel, AutoTokenizer

from eptkit.backbones import bundled_model_path
from eptkit.tasks import load_task
from eptkit.tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
from eptkit.config import DEFAULT_INIT_TEXT as INIT_TEXT  # the accuracy suite's generic instruction


@torch.no_grad()
def features(model, tok, pairs, prompt, positions, batch_size=64):
    """Mean of the text tokens' last hidden states, with `prompt` (l x d or None) in front."""
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        second = [p[1] for p in chunk] if len(chunk[0]) > 1 else None
        enc = tok([p[0] for p in chunk], second, padding=True, truncation=True, max_length=128, return_tensors="pt")
        if prompt is None:
            hidden = model(**enc).last_hidden_state
        else:
            batch, n, length = enc["input_ids"].shape[0], enc["input_ids"].shape[1], prompt.shape[0]
            embeds = torch.cat([prompt.expand(batch, -1, -1), model.get_input_embeddings()(enc["input_ids"])], 1)
            mask = torch.cat([torch.ones(batch, length, dtype=enc["attention_mask"].dtype), enc["attention_mask"]], 1)
            types = torch.cat([torch.zeros(batch, length, dtype=torch.long), enc["token_type_ids"]], 1)
            text_pos = torch.arange(length, length + n) if positions == "shifted" else torch.arange(n)
            pos = torch.cat([torch.arange(length), text_pos]).unsqueeze(0)
            hidden = model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                           position_ids=pos).last_hidden_state[:, length:]
        weights = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * weights).sum(1) / weights.sum(1)).numpy())
    return np.concatenate(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="stsb")
    parser.add_argument("--train", type=int, default=1000, help="training rows for the probe")
    parser.add_argument("--validation", type=int, default=400, help="validation rows it is scored on")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EPTKIT_DATA_DIR", ROOT.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = bundled_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    spec, data = get_task(args.task), load_task(args.task, args.data_dir)

    def take(split, n):
        rows = data[split].shuffle(seed=0).select(range(min(n, len(data[split]))))
        return [spec.segments(r) for r in rows], np.array(rows["label"], dtype=float)

    train_x, train_y = take("train", args.train)
    val_x, val_y = take("validation", args.validation)
    vocab = model.get_input_embeddings().weight.detach()
    sampled = vocab[torch.randint(0, vocab.shape[0], (100,), generator=torch.Generator().manual_seed(0))]
    ids = tok(INIT_TEXT, add_special_tokens=False)["input_ids"]
    text = vocab[torch.tensor((ids * 100)[:100])]
    configs = {
        "no prompt (the linear probe's features)": (None, None),
        "sampled vocabulary, l = 100, text shifted by l (PEFT's layout)": (sampled, "shifted"),
        "sampled vocabulary, l = 60, text shifted by l": (sampled[:60], "shifted"),
        "sampled vocabulary, l = 100, text keeps its own positions": (sampled, "own"),
        "instruction text, l = 100, text shifted by l": (text, "shifted"),
        "instruction text, l = 100, text keeps its own positions": (text, "own"),
    }
    lines = [f"Task {args.task}: probe on {len(train_y)} training rows, scored on {len(val_y)} validation rows "
             f"({'Pearson' if spec.is_regression else 'accuracy'}, 0-100); cosine: mean cosine similarity of each "
             "validation row's features to its unprompted features.", "",
             "| untrained prompt | probe score | cosine to unprompted |", "|---|---:|---:|"]
    reference = None
    for name, (prompt, positions) in configs.items():
        train_f = features(model, tok, train_x, prompt, positions)
        val_f = features(model, tok, val_x, prompt, positions)
        reference = val_f if reference is None else reference
        cosine = float(np.mean(np.sum(val_f * reference, 1)
                               / (np.linalg.norm(val_f, axis=1) * np.linalg.norm(reference, axis=1))))
        if spec.is_regression:
            probe = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(train_f, train_y)
            score = 100 * pearsonr(probe.predict(val_f), val_y)[0]
        else:
            probe = LogisticRegressionCV(max_iter=2000, Cs=7).fit(train_f, train_y)
            score = 100 * probe.score(val_f, val_y)
        lines.append(f"| {name} | {score:.1f} | {cosine:.3f} |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"fresh_prompt_{args.task}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

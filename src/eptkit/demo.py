"""A one-minute tour on the bundled all-MiniLM-L6-v2: build PT, DePT and EPT, run them, save,
reload and fold an EPT adapter. `python -m eptkit.demo` (what `make run` did before the CLI)."""

import tempfile

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from eptkit import DePTConfig, EPTConfig, PromptedModel, PromptTuningConfig, get_prompted_model
from eptkit.backbones import bundled_model_path


def main() -> None:
    transformers.logging.set_verbosity_error()  # the bundled model has no classifier: that is expected
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a gripping, beautifully shot film", "ninety minutes I will never get back"],
                      padding=True, return_tensors="pt")
    for config in (PromptTuningConfig(prompt_length=100), DePTConfig(), EPTConfig()):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        prompted = get_prompted_model(model, config, tokenizer=tokenizer)  # the default instruction start
        out = prompted(**batch, labels=torch.tensor([1, 0]))
        print(f"{config.method:5s} trainable {prompted.num_parameters():>8,d} of "
              f"{prompted.num_parameters(trainable_only=False):,d}  loss {out.loss.item():.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        prompted.save_pretrained(tmp)
        reloaded = PromptedModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), tmp).eval()
        same = torch.allclose(reloaded(**batch).logits, prompted.eval()(**batch).logits)
        folded = prompted.fold_prompt()
        print(f"EPT adapter saved and reloaded: identical logits {same}; folded: "
              f"{torch.allclose(folded(**batch).logits, prompted(**batch).logits, atol=1e-6)}")


if __name__ == "__main__":
    main()

"""eptkit.evaluation: predictions come back in row order, whatever order the batches take (longest first)."""

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from conftest import minilm_path
from eptkit import PromptTuningConfig, get_prompted_model
from eptkit.evaluation import predict_rows
from eptkit.tasks.registry import get_task


def test_predictions_in_row_order_equal_each_row_scored_alone():
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    backbone = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=64, num_labels=1))
    model = get_prompted_model(backbone, PromptTuningConfig(prompt_length=3, init="random")).eval()
    texts = ["a", "a long sentence with many words in it", "two words", "", "one more sentence here", "x y"]
    rows = [dict(tok(t), labels=0) for t in texts]
    expected = []
    with torch.no_grad():  # each row alone: no padding, no batch order
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]]), attention_mask=torch.tensor([r["attention_mask"]]),
                           token_type_ids=torch.tensor([r["token_type_ids"]])).logits
            expected.append(float(logits[0, 0]))
    assert len({round(v, 4) for v in expected}) == len(rows)  # every row's score differs: a permutation would show
    assert predict_rows(model, tok, get_task("stsb"), rows, batch_size=4) == pytest.approx(expected, abs=1e-5)

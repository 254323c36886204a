"""evaluate.py: the masked loss is the hand-computed one; base vs fine-tuned margins; reports and model card."""

from __future__ import annotations

import json
import math

import torch
from datasets import Dataset

import evaluate
from inference import Reply
from conftest import run_script


class Uniformish(torch.nn.Module):
    """A model with fixed, known logits, so the loss can be computed by hand."""

    device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        vocab = 4
        logits = torch.zeros(*input_ids.shape, vocab)
        logits[..., 1] = math.log(3.0)  # p(1) = 3/6, p(others) = 1/6 each
        return type("Out", (), {"logits": logits})()


def test_masked_loss_equals_hand_computation():
    data = Dataset.from_dict({"input_ids": [[0, 1, 2, 1], [3, 1]], "labels": [[-100, -100, 2, 1], [-100, 1]]})
    loss, count = evaluate.answer_loss(Uniformish(), data, pad_id=0, batch_size=2)
    # scored labels: 2 (p=1/6), 1 (p=1/2), 1 (p=1/2); the first position of each row never counts
    expected = (math.log(6) + math.log(2) + math.log(2)) / 3
    assert count == 3 and abs(loss - expected) < 1e-6


def test_fake_turn_and_stop_counters():
    replies = [Reply("a", 5, "eos"), Reply("b", 7, "marker"), Reply("", 48, "length"), Reply("c", 3, "eos")]
    m = evaluate.generation_metrics(replies, max_new_tokens=48)
    assert m["stop_rate"] == 0.75 and m["fake_turn_rate"] == 0.25 and m["eos_rate"] == 0.5
    assert m["empty_rate"] == 0.25 and m["median_answer_tokens"] == 6


def test_fine_tuned_beats_base_and_reports_agree(smoke_run, tmp_path):
    run_script("evaluate.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
               "--num-prompts", "16", "--reports-dir", str(tmp_path), "--name", "t")
    result = json.loads((tmp_path / "eval-t.json").read_text())
    base, tuned = result["base"], result["finetuned"]
    assert tuned["answer_loss"] < base["answer_loss"] - 4.0
    assert tuned["perplexity"] < 5 < base["perplexity"]
    assert tuned["stop_rate"] >= base["stop_rate"] + 0.5 and tuned["stop_rate"] >= 0.8
    assert tuned["fake_turn_rate"] == 0
    md = (tmp_path / "eval-t.md").read_text()
    assert f"| answer_loss | {base['answer_loss']:.4f} | {tuned['answer_loss']:.4f} |" in md
    assert f"| stop_rate | {base['stop_rate']:.4f} | {tuned['stop_rate']:.4f} |" in md
    assert len(result["samples"]) == 5 and "**Prompt:**" in md
    card = (smoke_run / "final" / "README.md").read_text()
    assert "### evaluate.py" in card and f"| answer_loss | {base['answer_loss']:.4f} | {tuned['answer_loss']:.4f} |" in card
    assert "conversations" in card

"""evaluate.py: the masked loss is the hand-computed one; base vs fine-tuned margins; reports and model card."""

from __future__ import annotations

import argparse
import gc
import json
import math
import weakref

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import evaluate
from answers import Reply
from conftest import TINY, run_script


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


def test_pair_log_likelihoods_are_the_answers_own_sums_in_any_batch(tokenizer):
    """Summed over the answer's tokens and its EOS only, whatever the batch pads; the metrics by hand."""
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    eos = tokenizer.eos_token
    pairs = [{"prompt": "### Human: What is 2 plus 3? ### Assistant:", "chosen": " 2 plus 3 is 5." + eos,
              "rejected": " I am not sure." + eos},
             {"prompt": "### Human: Hi ### Assistant:", "chosen": " Hello! How can I help you today?" + eos,
              "rejected": " No." + eos}]

    @torch.no_grad()
    def alone(prompt: str, answer: str) -> float:
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(logp[prompt_len - 1:].sum())

    chosen, rejected = evaluate.pair_log_likelihoods(model, tokenizer, pairs, batch_size=2)
    for i, pair in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(alone(pair["prompt"], pair["chosen"]), abs=1e-3)
        assert rejected[i].item() == pytest.approx(alone(pair["prompt"], pair["rejected"]), abs=1e-3)
    m = evaluate.preference_metrics(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -4.0]),
                                    (torch.tensor([-3.0, -3.0]), torch.tensor([-1.0, -1.0])), beta=0.5)
    # rewards: chosen 0.5*(2, -2), rejected 0.5*(-1, -3): margins 1.5 and 0.5
    assert m == {"pairs": 2, "likelihood_accuracy": 0.5, "reward_accuracy": 1.0, "reward_margin": 1.0}


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


@pytest.mark.slow
def test_the_same_command_twice_gives_the_same_metrics(smoke_run, tmp_path):
    """Greedy by default, even when the config samples (temperature 0.9 here), so a rerun repeats every number;
    --sample is seeded and says so."""
    common = ["evaluate.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
              "--num-prompts", "12", "--no-base", "--reports-dir", str(tmp_path), "--generation.temperature", "0.9"]
    results = []
    for name in ("a", "b"):
        run_script(*common, "--name", name)
        results.append(json.loads((tmp_path / f"eval-{name}.json").read_text()))
    assert results[0] == results[1] and results[0]["decoding"].startswith("greedy")
    sampled = []
    for name in ("s1", "s2"):
        run_script(*common, "--name", name, "--sample", "--seed", "3")
        sampled.append(json.loads((tmp_path / f"eval-{name}.json").read_text()))
    assert sampled[0] == sampled[1] and "seed 3" in sampled[0]["decoding"] and "temperature 0.9" in sampled[0]["decoding"]
    assert "seed 3" in (tmp_path / "eval-s1.md").read_text()


def test_one_model_in_memory_at_a_time(smoke_cfg, monkeypatch, tmp_path):
    """The fine-tuned model is freed before the base loads: evaluation needs the memory of one model."""
    loaded: list[weakref.ref] = []
    real_finetuned, real_base = evaluate.load_finetuned, evaluate.load_base

    def finetuned(*args, **kwargs):
        model = real_finetuned(*args, **kwargs)
        loaded.append(weakref.ref(model.model))
        return model

    def base(*args, **kwargs):
        gc.collect()
        assert loaded and loaded[0]() is None, "the fine-tuned model is still in memory"
        model = real_base(*args, **kwargs)
        loaded.append(weakref.ref(model.model))
        return model

    monkeypatch.setattr(evaluate, "load_finetuned", finetuned)
    monkeypatch.setattr(evaluate, "load_base", base)
    args = argparse.Namespace(num_prompts=4, batch_size=4, samples=2, merged=None, no_base=False, allow_pickle=False,
                              sample=False, seed=0)
    result = evaluate.run(smoke_cfg, args)
    gc.collect()
    assert len(loaded) == 2 and loaded[1]() is None and result["base"] and result["finetuned"]


def test_model_card_keeps_the_training_runs_hyperparameters(smoke_run, tmp_path):
    card = smoke_run / "final" / "README.md"
    run_script("evaluate.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
               "--num-prompts", "4", "--no-base", "--reports-dir", str(tmp_path), "--training.learning_rate", "0.123",
               "--lora.r", "7", "--data.max_length", "64")
    text = card.read_text()
    assert "### evaluate.py" in text
    assert "| learning_rate | 0.005 |" in text and "r=32" in text and "| max_length | 128 |" in text
    assert "0.123" not in text and "r=7" not in text
    assert "- Products of the frozen base: dequantized (QLoRA's" in text  # from the run's run.json


@pytest.mark.slow  # two processes
def test_a_merged_folder_is_evaluated_by_either_name(chat_model, smoke_run, tmp_path):
    """--merged DIR and --inference.model DIR (what inference.py and app.py take) evaluate the same folder, and
    neither writes that folder's scores into the adapter's model card."""
    merged = chat_model.save_merged(tmp_path / "merged")
    card = (smoke_run / "final" / "README.md").read_text()
    reports = []
    for flag in ("--merged", "--inference.model"):
        out = tmp_path / flag.strip("-").replace(".", "_")
        run_script("evaluate.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
                   flag, str(merged), "--num-prompts", "4", "--no-base", "--reports-dir", str(out))
        reports.append(json.loads(next(out.glob("*.json")).read_text()))
    assert reports[0]["finetuned"] == reports[1]["finetuned"] and reports[0]["finetuned"]["answer_loss"] > 0
    assert (smoke_run / "final" / "README.md").read_text() == card

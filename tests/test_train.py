"""train.py end to end through its CLI on the tiny model: outputs, learning margin, stopping, packing isolation."""

from __future__ import annotations

import json

import torch
import yaml
from PIL import Image
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import data_utils as du
from config import DataConfig, GenerationSettings
from evaluate import answer_loss
from conftest import TINY, run_script


def test_smoke_run_writes_adapter_checkpoints_and_records(smoke_run):
    final = smoke_run / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml",
                 "data_stats.json", "loss.png", "README.md", "log_history.json"):
        assert (final / name).is_file(), name
    assert sorted(p.name for p in smoke_run.glob("checkpoint-*"))  # resumable checkpoints exist
    assert yaml.safe_load((final / "config.yaml").read_text())["lora"]["r"] == 32
    stats = json.loads((final / "data_stats.json").read_text())
    assert stats["train"]["conversations"] > 500 and stats["train"]["deleted"] >= 1
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("tiny-phi")
    with Image.open(final / "loss.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    card = (final / "README.md").read_text()
    assert "duplicate_id" in card and "Final train loss" in card and "/work/" not in card


def test_fine_tuning_learned_the_answers(smoke_cfg, chat_model, tokenizer):
    """Held-out answer loss drops far below the untrained model's (a real margin, not noise)."""
    data = du.load_conversations(DataConfig(dataset="data/smoke", max_length=128))
    val = du.tokenize_conversations(data.splits["validation"], tokenizer, 128, "validation", data.stats)
    base = AutoModelForCausalLM.from_pretrained(TINY)
    base_loss, n = answer_loss(base, val, tokenizer.pad_token_id)
    tuned_loss, n2 = answer_loss(chat_model.model, val, tokenizer.pad_token_id)
    assert n == n2 > 500
    assert tuned_loss < 1.5 and base_loss - tuned_loss > 4.0, (base_loss, tuned_loss)


def test_fine_tuned_model_learned_to_stop(chat_model):
    data = du.load_conversations(DataConfig(dataset="data/smoke"))
    prompts = [m[:-1] for m in data.splits["validation"]["messages"][:24]]
    replies = chat_model.chat_batch(prompts, GenerationSettings(max_new_tokens=48, temperature=0.0), batch_size=8)
    ended_with_eos = sum(r.stop == "eos" for r in replies)
    assert ended_with_eos >= 0.8 * len(replies)
    assert all(r.text and "###" not in r.text for r in replies)


def test_packed_loss_equals_unpacked_loss(tokenizer):
    """Packing (trl's padding-free collator, sdpa) never lets one conversation attend to another."""
    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="sdpa").eval()
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
             [("What is 2 plus 3?", "2 plus 3 is 5."), ("What colour is snow?", "Snow is usually white."),
              ("Hello! How are you?", "I am fine, thank you.")]]
    examples = [du.encode_conversation(tokenizer, c, 128) for c in convs]
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]

    def loss_sum(batch):
        # use_cache=False as in training (trl sets it): with a cache transformers skips the packed-sequence mask
        out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")},
                    use_cache=False)
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")

    with torch.no_grad():
        separate = sum(loss_sum(DataCollatorForLanguageModeling(pad_token_id=0)([e])) for e in examples)
        packed_batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
        assert packed_batch["input_ids"].shape[0] == 1  # really one packed row
        packed = loss_sum(packed_batch)
    assert torch.allclose(packed, separate, rtol=1e-5, atol=1e-4), (packed, separate)
    # and without the position ids resetting, the conversations would leak into each other
    with torch.no_grad():
        leaky = loss_sum({"input_ids": packed_batch["input_ids"], "labels": packed_batch["labels"]})
    assert abs(float(leaky) - float(separate)) > 1e-2


def test_bad_config_value_fails_before_training(tmp_path):
    proc = run_script("train.py", "--config", "configs/smoke.yaml", "--lora.r", "0", "--training.output_dir",
                      str(tmp_path), check=False)
    assert proc.returncode == 2 and "lora.r: must be > 0" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_wrong_target_modules_fail_listing_the_real_layers(tmp_path):
    proc = run_script("train.py", "--config", "configs/smoke.yaml", "--lora.target_modules", "Wqkv,out_proj",
                      "--training.output_dir", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "match no linear layer" in proc.stderr and "q_proj" in proc.stderr and "Traceback" not in proc.stderr

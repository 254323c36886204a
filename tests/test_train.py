"""train.py end to end through its CLI on the tiny model: outputs, learning margin, stopping, packing isolation.
(The plan it decides before the model loads: tests/test_training_plan.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import data_utils as du
import train
import training_plan
from config import DataConfig, GenerationSettings, parse_config
from evaluate import answer_loss
from model_utils import VARLEN, decide_device_dtype, register_varlen_attention, resolve_attention
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
    # what the adapter was trained against, for whoever takes it elsewhere (the CPU: QLoRA's products)
    assert json.loads((final / "run.json").read_text())["products"].startswith("dequantized (QLoRA's")
    assert "- Products of the frozen base: dequantized (QLoRA's" in card


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


@pytest.fixture(scope="module")
def packed_trainer(tokenizer):
    """train.py's own trainer for the smoke config (4-bit tiny model, its attention choice, trl's packing)."""
    cfg, _ = parse_config(["--config", "configs/smoke.yaml", "--training.output_dir", "/tmp/unused",
                           "--data.max_length", "96"])
    choice = decide_device_dtype(cfg.model.dtype, cuda_available=False)
    train_ds, _, _ = train.prepare_data(cfg.data, tokenizer)
    plan = training_plan.decide_training(cfg, choice)
    trainer = train.build_trainer(cfg, train.build_model(cfg, choice, plan), tokenizer,
                                  train_ds.select(range(24)), None, choice, plan)
    return cfg, choice, trainer


@pytest.mark.parametrize("attention", ["train.py's choice", "varlen", "flex_attention"])
def test_packed_loss_equals_unpacked_loss(packed_trainer, attention):
    """A packed row from train.py's trainer (trl's bfd packing + its padding-free collator) gives the same loss as
    its conversations one by one: packing never lets one conversation attend to another. The attention is what
    train.py chooses here (sdpa on the CPU), varlen (the bf16-GPU choice; on the CPU its reference path, with the
    boundaries the collator sends) and flex_attention (its forward runs on the CPU)."""
    cfg, choice, trainer = packed_trainer
    attn = (resolve_attention(cfg.model.attn_implementation, choice, cfg.training.packing, compiled=False)
            if attention == "train.py's choice" else attention)
    if attn == VARLEN:
        register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation=attn).eval()
    row = max(trainer.train_dataset, key=lambda r: len(r["seq_lengths"]))
    assert len(row["seq_lengths"]) >= 3 and sum(row["seq_lengths"]) == len(row["input_ids"])  # really packed
    batch = trainer.data_collator([row])
    assert batch["input_ids"].shape[0] == 1

    def nll(input_ids, labels, **extra):
        # use_cache=False as in training: with a cache transformers skips the packed-sequence mask
        logits = model(input_ids=input_ids, use_cache=False, **extra).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                 reduction="sum")

    with torch.no_grad():
        packed = nll(**batch)  # what the trainer passes: position ids and the boundaries (cu_seq_lens_q, ...)
        separate, start = torch.zeros(()), 0
        for n in row["seq_lengths"]:
            separate += nll(batch["input_ids"][:, start:start + n], batch["labels"][:, start:start + n])
            start += n
        leaky = nll(batch["input_ids"], batch["labels"])  # without the position ids restarting
        # packed by another tool: position ids only, the boundaries found from them
        positions_only = nll(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
    assert torch.allclose(packed, separate, rtol=1e-4, atol=1e-3), (packed, separate)  # fp32 sums, reordered
    assert torch.allclose(positions_only, separate, rtol=1e-4, atol=1e-3), (positions_only, separate)
    assert abs(float(leaky) - float(separate)) > 1e-1  # conversations would leak into each other


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


def test_eval_steps_zero_evaluates_once_at_the_end(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                      "--training.max_steps", "12", "--training.eval_steps", "0", "--training.save_steps", "100")
    history = json.loads((out / "final" / "log_history.json").read_text())
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [12]
    assert "Final eval loss" in (out / "final" / "README.md").read_text() and "No eval loss" not in \
        (out / "final" / "README.md").read_text()
    assert "FutureWarning" not in proc.stderr  # a run's log holds only what matters


def test_checkpoints_carry_the_tokenizer_with_its_chat_template(smoke_run):
    for folder in [smoke_run / "final", *smoke_run.glob("checkpoint-*")]:
        assert AutoTokenizer.from_pretrained(folder).chat_template == du.CHAT_TEMPLATE, folder


@pytest.mark.slow
def test_compiled_training_keeps_the_loss(tmp_path):
    """torch.compile (regional: one compiled decoder layer reused for every layer) computes the same training as
    eager: the logged losses of 20 smoke steps agree to 1e-4 (fp32 on the CPU; measured equal to 5 decimals)."""
    losses = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        proc = run_script("train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                          "--training.max_steps", "20", "--training.logging_steps", "1", "--training.eval_steps", "0",
                          "--training.torch_compile", mode)
        assert ("torch.compile on (regions)" if mode == "on" else "torch.compile off") in proc.stderr
        history = json.loads((out / "final" / "log_history.json").read_text())
        losses[mode] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["on"]) == 20
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


@pytest.mark.slow
def test_compiled_training_with_adapter_dropout_keeps_the_loss(tmp_path):
    """With adapter dropout, compiled layers drop through ATen's dropout kernels (faster on a GPU than inductor's own
    random numbers). The masks are not eager's, so the losses agree within dropout's noise: 10 smoke steps with
    dropout 0.1, each logged loss within 5% of eager's (measured: within 2%), and the run learns as much."""
    losses, logs = {}, {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        logs[mode] = run_script("train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                                "--training.max_steps", "10", "--training.logging_steps", "1",
                                "--training.eval_steps", "0", "--lora.dropout", "0.1", "--training.torch_compile",
                                mode).stderr
        history = json.loads((out / "final" / "log_history.json").read_text())
        losses[mode] = [h["loss"] for h in history if "loss" in h]
    assert "dropout in compiled layers: ATen's kernels (adapter dropout 0.1)" in logs["on"]
    assert len(losses["on"]) == 10
    assert losses["on"] == pytest.approx(losses["off"], rel=5e-2)
    assert losses["on"][-1] < 0.5 * losses["on"][0]


@pytest.mark.slow
def test_fp8_products_keep_the_loss(tmp_path):
    """quantization.products fp8 (the frozen 4-bit layers multiply in fp8) trains as QLoRA's products do: 20 smoke
    steps on the CPU, compiled fp8 against eager dequantized products, the first loss within 0.5% (one forward:
    measured 0.02%), every logged loss within 5% (fp8 rounding of every product, and two trajectories at the smoke
    learning rate: measured within 3.4%), and the run learns as much."""
    losses, logs = {}, {}
    for products, compile_mode in (("dequantized", "off"), ("fp8", "on")):
        out = tmp_path / products
        logs[products] = run_script(
            "train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out), "--training.max_steps",
            "20", "--training.logging_steps", "1", "--training.eval_steps", "0", "--training.torch_compile",
            compile_mode, "--quantization.products", products).stderr
        history = json.loads((out / "final" / "log_history.json").read_text())
        losses[products] = [h["loss"] for h in history if "loss" in h]
    assert "fp8 products: 12 frozen 4-bit layers" in logs["fp8"]
    assert "fp8 products" not in logs["dequantized"]
    recorded = "fp8 (12 layers: e4m3 weights scaled per output channel, inputs and gradients per row; both layouts)"
    assert json.loads((tmp_path / "fp8" / "final" / "run.json").read_text())["products"] == recorded
    assert f"- Products of the frozen base: {recorded}" in (tmp_path / "fp8" / "final" / "README.md").read_text()
    assert len(losses["fp8"]) == 20
    assert losses["fp8"][0] == pytest.approx(losses["dequantized"][0], rel=5e-3)
    assert losses["fp8"] == pytest.approx(losses["dequantized"], rel=5e-2)
    assert losses["fp8"][-1] < 0.25 * losses["fp8"][0]


def test_fsdp_setups_that_cannot_work_are_refused_with_every_reason(monkeypatch):
    from config import QuantizationConfig
    from model_utils import DeviceChoice
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    gpu = DeviceChoice("cuda", torch.bfloat16, "test")
    with pytest.raises(ValueError) as e:
        train.check_fsdp(QuantizationConfig(mode="nf4", storage="uint8"), gpu)
    assert "fsdp_version: 2" in str(e.value) and "quantization.storage: compute" in str(e.value)
    monkeypatch.setenv("FSDP_VERSION", "2")
    train.check_fsdp(QuantizationConfig(mode="nf4", storage="compute"), gpu)  # the supported setup passes
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    train.check_fsdp(QuantizationConfig(mode="nf4", storage="uint8"), DeviceChoice("cpu", torch.float32, "test"))


def test_an_older_library_than_the_pins_stops_train_py_before_anything_loads(tmp_path, monkeypatch, capfd):
    """A machine with an older transformers than requirements.txt pins (the lent GPU's image had 5.17.0): train.py
    used to load the data and the model and then fail inside trl with `SFTConfig.__init__() got an unexpected keyword
    argument 'activation_checkpointing'`. It now stops at once, naming the library, both versions and the fix."""
    from importlib import metadata
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "5.17.0" if name == "transformers" else real(name))
    out = tmp_path / "out"
    assert train.main(["--config", "configs/smoke.yaml", "--training.output_dir", str(out)]) == 1
    err = capfd.readouterr().err
    assert "transformers 5.17.0" in err and "5.23.0" in err and "pip install -r requirements.txt" in err
    assert "loading" not in err.lower() and not out.exists()


@pytest.mark.slow
def test_plain_bf16_training_keeps_the_loss(tmp_path):
    """bf16 training without autocast (every weight and activation in bf16, the default) logs the losses of bf16
    autocast (fp32 norms, embeddings and residual stream) within bf16 rounding: 10 smoke steps on the CPU in bf16,
    each loss within 2% (measured: within 0.5%), and the run learns as much."""
    losses = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        proc = run_script("train.py", "--config", "configs/smoke.yaml", "--model.dtype", "bf16",
                          "--training.output_dir", str(out), "--training.max_steps", "10",
                          "--training.logging_steps", "1", "--training.eval_steps", "0", "--training.autocast", mode)
        assert ("bf16 autocast" if mode == "on" else "bf16 throughout") in proc.stderr
        history = json.loads((out / "final" / "log_history.json").read_text())
        losses[mode] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["off"]) == 10
    assert losses["off"] == pytest.approx(losses["on"], rel=2e-2)
    assert losses["off"][-1] < 0.8 * losses["off"][0]


@pytest.mark.parametrize("packing", [True, False])
def test_metrics_kept_on_the_device_log_what_trl_logs(tmp_path, monkeypatch, packing):
    """train.py's trainer reads trl's per-micro-batch metrics back only when it logs (trl 1.16 waits for the GPU
    after every forward to read them). A user sees the same log: loss, grad norm, entropy, token accuracy and token
    count of every training and evaluation line equal trl's own trainer's, step for step, packed (token count from
    the packed row's length) and padded (from the attention mask)."""
    from trl import SFTTrainer

    # in-process runs: pytest keeps its own Ctrl-C/SIGTERM handling (train.py's save-and-exit is tested elsewhere)
    monkeypatch.setattr(train.Guard, "install_signal_handlers", lambda self: None)
    histories = {}
    for name, trainer_class in (("trl", SFTTrainer), ("train.py", train.SFTTrainerMetricsOnDevice)):
        monkeypatch.setattr(train, "SFTTrainerMetricsOnDevice", trainer_class)
        out = tmp_path / name
        assert train.main(["--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                           "--training.max_steps", "6", "--training.logging_steps", "2", "--training.eval_steps", "3",
                           "--training.packing", str(packing).lower()]) == 0
        histories[name] = json.loads((out / "final" / "log_history.json").read_text())
    ours, theirs = histories["train.py"], histories["trl"]
    assert [sorted(h) for h in ours] == [sorted(h) for h in theirs]
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "eval_loss", "eval_entropy",
            "eval_mean_token_accuracy", "eval_num_tokens")
    assert {k for h in ours for k in h} >= set(keys)
    for mine, trl_line in zip(ours, theirs):
        for key in keys:
            if key in trl_line:
                assert mine[key] == pytest.approx(trl_line[key], rel=1e-6), (key, mine, trl_line)
    assert [h["num_tokens"] for h in ours if "loss" in h][-1] > 0

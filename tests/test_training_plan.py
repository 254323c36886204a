"""training_plan.py: the plan a run gets, decided once: the memory plan from the GPU's budget (Phi-2's measured peaks,
fp8 products' weight copies, DPO's pairs), what the user set kept, FSDP left alone, too small a budget warned with
the fix, the optimizer, and on --resume the interrupted run's plan. (Under accelerate launch, one plan for every
process: tests/test_distributed.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from config import Config, DataConfig, LoraSettings, QuantizationConfig, TrainingConfig, parse_config, save_config
from conftest import ROOT
from model_utils import DeviceChoice, decide_device_dtype
from training_plan import (PLAN_HEADROOM, estimate_peak_gib, fp8_copy_gib, fp8_layouts, plan_memory, resolve_optim,
                           resumed_plan)


def planning(t: TrainingConfig, lora: LoraSettings | None = None, explicit: set[str] = frozenset(),
             quantization=None) -> Config:
    """The config plan_memory reads: these training and LoRA settings, 2048-token rows, these keys set by the user."""
    cfg = Config(training=t, lora=lora or LoraSettings(), data=DataConfig(max_length=2048),
                 quantization=quantization or QuantizationConfig())
    cfg.explicit = set(explicit)
    return cfg


def _phi2_shape():
    from transformers import PhiConfig

    import bench
    return PhiConfig(**bench.PHI2_CONFIG)


@pytest.mark.parametrize("budget, dropout, dtype, expected", [
    (79.0, 0.05, torch.bfloat16, (8, 2, False)),  # an 80 GB GPU: the speed preset's micro-batch, no checkpointing
    (40.0, 0.05, torch.bfloat16, (4, 4, False)),  # a 40-48 GB GPU: half the rows
    (15.0, 0.05, torch.bfloat16, (8, 2, True)),   # a 16 GB bf16 GPU: checkpointing with 8 rows beats 1 row without
    (15.0, 0.05, torch.float32, (4, 4, True)),    # a 16 GB T4 (fp32 compute): checkpointing, the old default
    (6.0, 0.05, torch.bfloat16, (4, 4, True)),
])
def test_memory_plan_fills_unset_values_from_the_budget(budget, dropout, dtype, expected, caplog):
    """`python train.py` on a GPU: micro-batch, accumulation and checkpointing come from the memory budget, the
    optimizer's batch (micro x accumulation = 16 rows) stays, and the choice is logged with its estimate."""
    gpu = DeviceChoice("cuda", dtype, "test")
    with caplog.at_level("INFO", logger="training_plan"):
        t = plan_memory(planning(TrainingConfig(), LoraSettings(dropout=dropout)), _phi2_shape(), gpu,
                              (budget, "test budget"))
    got = (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing)
    assert got == expected
    assert got[0] * got[1] == 16
    assert f"micro-batch {got[0]} x accumulation {got[1]}" in caplog.text and "test budget" in caplog.text
    peak = estimate_peak_gib(_phi2_shape(), LoraSettings(dropout=dropout), 2048, got[0], got[2],
                                   fp32=dtype == torch.float32)
    assert peak <= PLAN_HEADROOM * budget


@pytest.mark.parametrize("preset, budget, both", [
    ("configs/phi2-oasst1.yaml", 79.0, False),  # python train.py on an 80 GB GPU: 8 rows fit with one layout
    ("configs/phi2-oasst1.yaml", 139.0, True),  # the whole H200
    ("configs/phi2-speed.yaml", 79.0, True),    # no adapter dropout: room for both
])
def test_fp8_products_on_an_fp8_gpu_are_planned_with_their_weight_copies(preset, budget, both, caplog):
    """On an fp8 GPU (H100/H200) auto's fp8 products hold an fp8 copy of the 4-bit weights: the memory plan counts
    it (on an 80 GB GPU `python train.py` still gets the speed preset's 8 uncheckpointed rows), and the backward's
    layout of the weights (a second copy, no transposes) is kept only where the estimate fits with it too."""
    h200 = DeviceChoice("cuda", torch.bfloat16, "test", (9, 0))
    cfg, _ = parse_config(["--config", str(ROOT / preset)])
    with caplog.at_level("INFO", logger="training_plan"):
        t = plan_memory(planning(cfg.training, cfg.lora, cfg.explicit, cfg.quantization), _phi2_shape(),
                              h200, (budget, "test budget"))
    assert (t.per_device_train_batch_size, t.gradient_checkpointing) == (8, False)
    planned = preset.endswith("phi2-oasst1.yaml")  # the speed preset sets every value the plan would choose
    assert ("memory plan" in caplog.text) == planned
    if planned:
        copy = fp8_copy_gib(_phi2_shape())
        peak = estimate_peak_gib(_phi2_shape(), cfg.lora, 2048, 8, False) + copy
        assert f"estimated peak {peak:.1f} GiB" in caplog.text
    cfg.training = t
    kept, why = fp8_layouts(cfg, _phi2_shape(), h200, autocast=False, budget=(budget, "test budget"))
    assert kept == both and "test budget" in why


def test_the_dpo_plan_covers_the_peak_measured_on_the_h200(caplog):
    """DPO's memory plan (configs/phi2-dpo.yaml's values, the SFT preset's adapter: r 64, dropout 0.05): on the H200
    4 pairs of up to 2048 tokens without checkpointing peaked at 74.9 GiB (bench.py dpo, docs/PERFORMANCE.md), so the
    estimate for them may not be lower, and an 80 GB GPU, where those 4 pairs would not fit the plan's share, gets
    fewer pairs a micro-batch, never more than its share."""
    cfg, _ = parse_config(["--config", str(ROOT / "configs/phi2-dpo.yaml")])
    t = dataclasses.replace(cfg.training, packing=False, torch_compile="off")  # what decide_training makes of DPO
    lora = LoraSettings(r=64, alpha=16, dropout=0.05)
    assert estimate_peak_gib(_phi2_shape(), lora, 2048, 4, False, pairs=True) >= 74.9
    h200 = DeviceChoice("cuda", torch.bfloat16, "test", (9, 0))
    for budget, micro in ((139.3, 4), (79.0, 2)):
        with caplog.at_level("INFO", logger="training_plan"):
            planned = plan_memory(planning(t, lora, cfg.explicit, cfg.quantization), _phi2_shape(), h200,
                                        (budget, "test budget"))
        assert (planned.per_device_train_batch_size, planned.gradient_accumulation_steps,
                planned.gradient_checkpointing) == (micro, 16 // micro, False)
        peak = estimate_peak_gib(_phi2_shape(), lora, 2048, micro, False, pairs=True)
        assert peak <= PLAN_HEADROOM * budget and f"estimated peak {peak:.1f} GiB" in caplog.text


def test_memory_plan_keeps_what_the_user_set():
    gpu = DeviceChoice("cuda", torch.bfloat16, "test")
    t = TrainingConfig(per_device_train_batch_size=2, gradient_accumulation_steps=8)
    kept = plan_memory(planning(t, explicit={"training.per_device_train_batch_size",
                                                   "training.gradient_accumulation_steps"}), _phi2_shape(), gpu,
                             (79.0, "test"))
    assert (kept.per_device_train_batch_size, kept.gradient_accumulation_steps, kept.gradient_checkpointing) == \
        (2, 8, False)  # only checkpointing was left to the plan
    assert plan_memory(planning(TrainingConfig(memory_plan="off")), _phi2_shape(), gpu,
                             (79.0, "test")) == TrainingConfig(memory_plan="off")
    cpu = decide_device_dtype("auto", cuda_available=False)
    assert plan_memory(planning(TrainingConfig()), _phi2_shape(), cpu, (79.0, "test")) == TrainingConfig()


def test_memory_plan_stays_out_of_fsdp(monkeypatch):
    """Under FSDP the plan's one-process estimates do not apply: the config's values stay (FSDP was measured with
    configs/phi2-fsdp.yaml's)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    gpu = DeviceChoice("cuda", torch.bfloat16, "test")
    assert plan_memory(planning(TrainingConfig()), _phi2_shape(), gpu, (79.0, "test")) == TrainingConfig()


def test_too_small_a_budget_warns_with_the_fix(caplog):
    gpu = DeviceChoice("cuda", torch.bfloat16, "test")
    t = plan_memory(planning(TrainingConfig()), _phi2_shape(), gpu, (3.0, "test"))
    assert (t.per_device_train_batch_size, t.gradient_checkpointing) == (1, True)
    assert "expect running out of memory" in caplog.text and "phi2-lowmem.yaml" in caplog.text


def test_auto_optimizer_is_fused_adamw_unless_memory_is_tight():
    """training.optim auto: fused AdamW on a GPU with memory to spare (no gradient checkpointing); paged 8-bit AdamW,
    which waits for the GPU after every step, only where checkpointing says memory is tight; plain AdamW on the CPU."""
    gpu, cpu = DeviceChoice("cuda", torch.bfloat16, "an H200"), decide_device_dtype("auto")
    assert resolve_optim("auto", gpu, checkpointing=False) == "adamw_torch_fused"
    assert resolve_optim("auto", gpu, checkpointing=True) == "paged_adamw_8bit"
    assert resolve_optim("auto", cpu, checkpointing=False) == "adamw_torch"
    assert resolve_optim("paged_adamw_8bit", gpu, checkpointing=False) == "paged_adamw_8bit"


def test_resume_keeps_the_interrupted_runs_plan(tmp_path):
    """--resume on a GPU reuses the micro-batch, accumulation and checkpointing of the run it continues (its saved
    config.yaml), not a new plan from today's free memory: the Trainer finds its place in the data by counting
    micro-batches. What the user sets still wins; without a saved config there is nothing to keep."""
    saved = Config(training=TrainingConfig(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                           gradient_accumulation_steps=2, gradient_checkpointing=False))
    save_config(saved, tmp_path / "config.yaml")
    t = resumed_plan(TrainingConfig(output_dir=str(tmp_path)), set())
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing) == (8, 2, False)
    # the checkpoint holds paged 8-bit AdamW's state (auto's choice before it was saved resolved); another optimizer
    # would fail on it, so auto does not get decided afresh
    assert t.optim == "paged_adamw_8bit"
    save_config(dataclasses.replace(saved, training=dataclasses.replace(saved.training, optim="adamw_torch_fused")),
                tmp_path / "config.yaml")
    assert resumed_plan(TrainingConfig(output_dir=str(tmp_path)), set()).optim == "adamw_torch_fused"
    assert resumed_plan(TrainingConfig(output_dir=str(tmp_path), optim="adamw_torch"),
                              {"training.optim"}).optim == "adamw_torch"
    t = resumed_plan(TrainingConfig(output_dir=str(tmp_path), gradient_checkpointing=True),
                           {"training.gradient_checkpointing"})
    assert (t.per_device_train_batch_size, t.gradient_checkpointing) == (8, True)
    assert resumed_plan(TrainingConfig(output_dir=str(tmp_path / "new")), set()) is None

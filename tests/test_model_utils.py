"""model_utils.py: the device/dtype decision and its reason, attention/compile choices, loading errors."""

from __future__ import annotations

import pytest
import torch

from config import ModelConfig
from model_utils import (ModelLoadError, check_context, decide_device_dtype, load_model_config, load_tokenizer,
                         resolve_attention, resolve_compile)
from conftest import TINY


def test_cpu_is_fp32_with_reason():
    choice = decide_device_dtype("auto", cuda_available=False)
    assert (choice.device, choice.dtype) == ("cpu", torch.float32)
    assert "CPU" in choice.reason


def test_ampere_and_newer_get_bf16():
    choice = decide_device_dtype("auto", cuda_available=True, cuda_capability=(9, 0), gpu_name="NVIDIA H200")
    assert (choice.device, choice.dtype, choice.name) == ("cuda", torch.bfloat16, "bf16")
    assert "H200" in choice.reason and "bf16" in choice.reason


def test_t4_computes_in_fp32_and_says_why():
    choice = decide_device_dtype("auto", cuda_available=True, cuda_capability=(7, 5), gpu_name="Tesla T4")
    assert choice.dtype == torch.float32
    assert "fp16 overflows" in choice.reason and "T4" in choice.reason


def test_impossible_requests_raise_with_the_fix():
    with pytest.raises(ValueError, match="no native bf16.*model.dtype auto"):
        decide_device_dtype("bf16", cuda_available=True, cuda_capability=(7, 5), gpu_name="Tesla T4")
    with pytest.raises(ValueError, match="fp16 is refused"):
        decide_device_dtype("fp16", cuda_available=True, cuda_capability=(9, 0))


def test_attention_choice():
    cpu = decide_device_dtype("auto", cuda_available=False)
    gpu = decide_device_dtype("auto", cuda_available=True, cuda_capability=(9, 0))
    assert resolve_attention("auto", cpu, packing=True, compiled=False) == "sdpa"
    assert resolve_attention("auto", gpu, packing=True, compiled=True) == "flex_attention"
    assert resolve_attention("auto", gpu, packing=True, compiled=False) == "sdpa"
    with pytest.raises(ValueError, match="flex_attention needs a CUDA GPU"):
        resolve_attention("flex_attention", cpu, packing=True, compiled=False)


def test_compile_choice():
    cpu = decide_device_dtype("auto", cuda_available=False)
    assert resolve_compile("auto", cpu) is False
    assert resolve_compile("off", cpu) is False
    assert resolve_compile("on", cpu) is True


def test_context_window_check():
    config = load_model_config(ModelConfig(name_or_path=str(TINY)))
    check_context(config, 512)
    with pytest.raises(ValueError, match="exceeds the model's context window of 512"):
        check_context(config, 1024)


def test_tokenizer_gets_a_pad_token():
    tok = load_tokenizer(ModelConfig(name_or_path=str(TINY)))
    assert tok.pad_token_id == tok.eos_token_id


def test_missing_model_says_how_to_work_offline(tmp_path):
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model_config(ModelConfig(name_or_path=str(tmp_path / "missing")))

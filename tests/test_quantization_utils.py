"""quantization_utils.py: the BitsAndBytesConfig builder, and the real NF4 path on the CPU (no mocks)."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from config import ModelConfig, QuantizationConfig
from model_utils import decide_device_dtype, load_model
from quantization_utils import build_bnb_config
from conftest import TINY


def test_builder_modes():
    nf4 = build_bnb_config(QuantizationConfig(), torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16 and nf4.bnb_4bit_quant_storage == torch.uint8
    fp4 = build_bnb_config(QuantizationConfig(mode="fp4", double_quant=False), torch.float32)
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert build_bnb_config(QuantizationConfig(mode="int8"), torch.float32).load_in_8bit
    assert build_bnb_config(QuantizationConfig(mode="none"), torch.float32) is None
    fsdp = build_bnb_config(QuantizationConfig(storage="compute"), torch.bfloat16)
    assert fsdp.bnb_4bit_quant_storage == torch.bfloat16


def test_real_nf4_on_cpu_quantizes_the_linear_layers_and_stays_close():
    choice = decide_device_dtype("auto", cuda_available=False)
    cfg = ModelConfig(name_or_path=str(TINY))
    q = load_model(cfg, choice, build_bnb_config(QuantizationConfig(), choice.dtype), "sdpa")
    full = load_model(cfg, choice, None, "sdpa")
    linear4 = [n for n, mod in q.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 6  # q, k, v, dense, fc1, fc2 in each of the 2 layers; lm_head stays full precision
    layer = q.model.layers[0].mlp.fc1
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.numel() == full.model.layers[0].mlp.fc1.weight.numel() // 2  # two 4-bit values a byte
    ids = torch.tensor([[1, 5, 9, 13, 40, 2]])
    with torch.no_grad():
        a, b = q(ids).logits, full(ids).logits
    rel = (a - b).norm() / b.norm()
    assert 0 < rel < 0.2  # quantized, so not identical, but the same function


def test_built_config_is_what_transformers_loads_and_records():
    """The model loaded with the built config is 4-bit NF4 with double-quantized scales computing in the chosen
    dtype, and its saved config records exactly that (what a later load of a checkpoint reads)."""
    choice = decide_device_dtype("auto", cuda_available=False)
    q = load_model(ModelConfig(name_or_path=str(TINY)), choice, build_bnb_config(QuantizationConfig(), choice.dtype),
                   "sdpa")
    assert q.is_loaded_in_4bit
    state = q.model.layers[1].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested and state.dtype == torch.float32  # double quant, fp32 compute
    recorded = q.config.quantization_config.to_dict()
    assert (recorded["bnb_4bit_quant_type"], recorded["bnb_4bit_use_double_quant"], recorded["load_in_4bit"]) == \
        ("nf4", True, True)
    assert recorded["bnb_4bit_compute_dtype"] == "float32"

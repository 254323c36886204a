"""quantization_utils.py: the BitsAndBytesConfig builder, and the real NF4 path on the CPU (no mocks)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from config import ModelConfig, QuantizationConfig
from model_utils import decide_device_dtype, load_model
from quantization_utils import Fp8ProductsLinear4bit, build_bnb_config, resolve_products
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
    q = load_model(cfg.name_or_path, cfg, choice.dtype, choice.device,
                   build_bnb_config(QuantizationConfig(), choice.dtype), "sdpa")
    full = load_model(cfg.name_or_path, cfg, choice.dtype, choice.device, None, "sdpa")
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
    q = load_model(TINY, ModelConfig(), choice.dtype, choice.device, build_bnb_config(QuantizationConfig(), choice.dtype),
                   "sdpa")
    assert q.is_loaded_in_4bit
    state = q.model.layers[1].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested and state.dtype == torch.float32  # double quant, fp32 compute
    recorded = q.config.quantization_config.to_dict()
    assert (recorded["bnb_4bit_quant_type"], recorded["bnb_4bit_use_double_quant"], recorded["load_in_4bit"]) == \
        ("nf4", True, True)
    assert recorded["bnb_4bit_compute_dtype"] == "float32"


def _nf4_tiny(device: str = "cpu"):
    choice = decide_device_dtype("auto", cuda_available=device == "cuda")
    return load_model(TINY, ModelConfig(), choice.dtype, choice.device, build_bnb_config(QuantizationConfig(), choice.dtype),
                      "sdpa"), choice


def _dequantized_product(layer, x: torch.Tensor) -> torch.Tensor:
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(x.dtype)
    return x @ weight.t() + layer.bias.to(x.dtype)


def _fp8_layers_match_qlora(model, device: str, dtype: torch.dtype, compiled: bool) -> list[torch.Tensor]:
    """Every converted layer's output and input gradient against the dequantized product (QLoRA's): within fp8's
    rounding (e4m3 keeps 3 mantissa bits, ~3% relative per element; measured at most 3.8% on the tiny model).
    Returns the outputs and gradients."""
    torch.manual_seed(0)
    layers = [m for m in model.modules() if isinstance(m, Fp8ProductsLinear4bit)]
    assert len(layers) == 2 * 6
    results = []
    for layer in layers:
        x = torch.randn(3, 37, layer.in_features, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(3, 37, layer.out_features, device=device, dtype=dtype)
        run = torch.compile(layer) if compiled else layer
        y = run(x)
        (grad,) = torch.autograd.grad(y, x, dy)
        x_ref = x.detach().float().requires_grad_(True)
        y_ref = _dequantized_product(layer, x_ref)
        (grad_ref,) = torch.autograd.grad(y_ref, x_ref, dy.float())
        for got, want in ((y, y_ref), (grad, grad_ref)):
            rel = float(((got.float() - want).norm() / want.norm()).detach())
            assert 0 < rel < 0.06, rel  # rounded to fp8, so not exact, but the same product
        results += [y.detach(), grad]
    return results


def test_fp8_products_give_qlora_products_within_fp8_rounding_and_save_the_same_model():
    """quantization.products fp8 on the CPU (torch's own _scaled_mm): every 4-bit layer of the tiny model multiplies
    in fp8 — output and input gradient within fp8 rounding of the dequantized product, eager and compiled, the same
    numbers whether the layer keeps the backward's layout of its weight or transposes it in each backward — while the
    state dict (what checkpoints, merging and saving read) stays the 4-bit one, and peft wraps the layers as QLoRA's."""
    from peft import get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from adapter_utils import build_lora_config
    from config import LoraSettings
    from quantization_utils import use_fp8_products

    results = {}
    for both in (True, False):
        model, choice = _nf4_tiny()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert use_fp8_products(model, both_layouts=both) == 12
        assert (model.model.layers[0].mlp.fc1.fp8_weight_t is not None) == both
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        results[both] = _fp8_layers_match_qlora(model, "cpu", choice.dtype, compiled=False)
        compiled = _fp8_layers_match_qlora(model, "cpu", choice.dtype, compiled=True)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(compiled, results[both]))
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))
    peft_model = get_peft_model(model, build_lora_config(LoraSettings()))
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 12 and all(isinstance(m.base_layer, Fp8ProductsLinear4bit) for m in wrapped)


def test_fp8_products_leave_layers_of_other_widths_to_qlora_and_say_which(caplog):
    """fp8 products need widths that are multiples of 16 (torch._scaled_mm): another model's odd-width layer keeps
    QLoRA's products, is named in the log, and still computes its product."""
    from quantization_utils import use_fp8_products
    model = torch.nn.Sequential(bnb.nn.Linear4bit(100, 30, quant_type="nf4"),
                                bnb.nn.Linear4bit(32, 64, quant_type="nf4")).to("cpu")  # .to quantizes
    with caplog.at_level("WARNING", logger="quantization_utils"):
        assert use_fp8_products(model) == 1
    assert type(model[0]) is bnb.nn.Linear4bit and isinstance(model[1], Fp8ProductsLinear4bit)
    assert "these 4-bit layers keep QLoRA's products: 0" in caplog.text
    x = torch.randn(3, 100)
    assert torch.allclose(model[0](x), _dequantized_product(model[0], x), rtol=1e-4, atol=1e-4)


def _gpu(capability=(9, 0), dtype=torch.bfloat16):
    from model_utils import DeviceChoice
    return DeviceChoice("cuda", dtype, "test", capability)


@pytest.mark.parametrize("mode, fsdp, choice, problem", [
    ("int8", False, _gpu(), "the base is not 4-bit"),
    ("nf4", True, _gpu(), "FSDP"),
    ("nf4", False, _gpu((8, 0)), "compute capability 8.0"),
    ("nf4", False, _gpu(dtype=torch.float32), "compute dtype is fp32"),
])
def test_fp8_products_that_cannot_run_are_refused_with_the_fix(mode, fsdp, choice, problem):
    with pytest.raises(ValueError, match=problem) as error:
        resolve_products(QuantizationConfig(mode=mode, products="fp8"), choice, True, fsdp)
    assert "quantization.products dequantized" in str(error.value)
    products, why = resolve_products(QuantizationConfig(mode=mode), choice, True, fsdp)  # auto falls back, says why
    assert products == "dequantized" and problem in why


def test_auto_products_are_fp8_only_for_compiled_bf16_runs_on_fp8_gpus():
    auto = QuantizationConfig()
    assert resolve_products(auto, _gpu((9, 0)), True, False) == ("fp8", "auto: a compiled bf16 run on an fp8 GPU")
    assert resolve_products(auto, _gpu((8, 9)), True, False)[0] == "fp8"
    assert resolve_products(auto, _gpu((9, 0)), False, False) == (
        "dequantized", "auto: torch.compile is off (rounding to fp8 would be extra passes over each activation)")
    assert resolve_products(auto, decide_device_dtype("auto", cuda_available=False), True, False)[0] == "dequantized"
    assert resolve_products(QuantizationConfig(products="fp8"), decide_device_dtype("auto", cuda_available=False),
                            False, False)[0] == "fp8"  # asked for: torch's CPU kernels (the tests' path)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an fp8 GPU (Ada, Hopper and newer)")
@pytest.mark.parametrize("both_layouts", [True, False])
def test_fp8_products_on_gpu(both_layouts):
    """On an fp8 GPU (cuBLAS/CUTLASS fp8 kernels, bf16 compute) the same agreement, eager and compiled."""
    from quantization_utils import use_fp8_products

    model, choice = _nf4_tiny(device="cuda")
    assert choice.dtype == torch.bfloat16
    use_fp8_products(model, both_layouts)
    _fp8_layers_match_qlora(model, "cuda", choice.dtype, compiled=False)
    _fp8_layers_match_qlora(model, "cuda", choice.dtype, compiled=True)

"""The base model's quantization: the bitsandbytes config (QLoRA's 4-bit NF4 by default), and how the frozen 4-bit
layers' matrix products run in training.

The compute dtype is not a setting of its own: it is the dtype that model_utils.decide_device_dtype chose, so the
dequantized matmuls run in the same precision as the rest of the step.

Products (`quantization.products`): QLoRA dequantizes each 4-bit weight to the compute dtype in every forward and
backward product. `fp8` dequantizes each 4-bit weight once, at start, into an fp8 (e4m3) copy with a power-of-two
scale per output channel (1 byte a weight), and rounds each product's activations and incoming gradients to e4m3 per
row, as torchao's rowwise float8 recipe does; torch._scaled_mm multiplies them (fast accumulation in the forward
product, fp32 in the backward's). The adapters, layer norms, attention and lm_head are untouched, and the 4-bit
weights stay the layers' parameters, so checkpoints, adapters and merging are QLoRA's.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
from transformers import BitsAndBytesConfig

from config import QuantizationConfig
from model_utils import DeviceChoice

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer


def build_bnb_config(cfg: QuantizationConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """NF4/FP4 4-bit (optionally double-quantized), int8, or None for an unquantized base (plain LoRA)."""
    if cfg.mode == "none":
        return None
    if cfg.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.mode,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP can only shard parameters of one float dtype, so under FSDP the packed weights are stored in the
        # compute dtype; the bytes are the same either way.
        bnb_4bit_quant_storage=compute_dtype if cfg.storage == "compute" else torch.uint8,
    )


def resolve_products(cfg: QuantizationConfig, choice: DeviceChoice, compiled: bool, fsdp: bool) -> tuple[str, str]:
    """How the frozen 4-bit layers multiply in training, and why. auto takes fp8 where it was measured faster: a
    compiled bf16 run on an fp8 GPU (docs/PERFORMANCE.md);
    without compilation the rounding to fp8 would be extra passes over every activation. An explicit fp8 that
    cannot run raises with the fix."""
    cap = choice.capability or (0, 0)
    blockers = [  # (whether it blocks fp8 products, what to tell the user)
        (cfg.mode not in ("nf4", "fp4"), f"the base is not 4-bit (quantization.mode {cfg.mode})"),
        (fsdp, "FSDP shards the 4-bit weights, and the fp8 copies would be whole on every GPU"),
        (choice.device == "cuda" and cap < FP8_CAPABILITY,
         f"this GPU (compute capability {cap[0]}.{cap[1]}) has no fp8 tensor cores (Ada 8.9, Hopper 9.0 and newer do)"),
        (choice.device == "cuda" and choice.dtype != torch.bfloat16,
         f"fp8 products return bf16 on a GPU, and the compute dtype is {choice.name}"),
    ]
    problems = [message for blocked, message in blockers if blocked]
    if cfg.products == "dequantized":
        return "dequantized", "quantization.products dequantized"
    if cfg.products == "fp8":
        if problems:
            raise ValueError("quantization.products fp8: " + "; ".join(problems) +
                             ". Use quantization.products dequantized (QLoRA's) or auto.")
        return "fp8", "quantization.products fp8"
    if choice.device != "cuda":
        return "dequantized", "auto: no GPU"
    if problems:
        return "dequantized", f"auto: {problems[0]}"
    if not compiled:
        return "dequantized", "auto: torch.compile is off (rounding to fp8 would be extra passes over each activation)"
    return "fp8", "auto: a compiled bf16 run on an fp8 GPU"


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, k) -> (e4m3 values (rows, k), fp32 scales (rows, 1)) with x ~= values * scales. The scales are powers
    of two (applying one is exact), the smallest that keeps the row's largest |value| within e4m3's 448."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Product(torch.autograd.Function):
    """y = x @ W.T for a frozen W (out, k) held in e4m3 with a power-of-two scale per output channel: `w` is its
    (k, out) column-major view, the layout torch._scaled_mm takes its second operand in. The backward gives only the
    input's gradient (W is frozen): dx = dy @ W = (dy * scale) @ W8, the scale moved onto dy's columns (exact: a
    power of two), with W8 in the other layout, (out, k) column-major: `w_t` when the layer keeps it, else
    transposed here (1 byte a weight; the speed preset ran a little slower with one layout than with both:
    docs/PERFORMANCE.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                w_t: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w, w_scale, w_t)
        xq, x_scale = fp8_rows(x)  # (rows, k), (rows, 1)
        # Fast accumulation (Hopper's fp8 accumulator, promoted less often) in the forward product only, as torchao's
        # float8 training does: 10-16% faster at Phi-2's widths (docs/bench/fp8_products.py); the backward keeps
        # full fp32 accumulation for the gradients.
        return torch._scaled_mm(xq, w, scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype,
                                use_fast_accum=True)  # (rows, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, w_scale, w_t = ctx.saved_tensors  # (k, out) column-major, (1, out), (out, k) column-major or None
        gq, g_scale = fp8_rows(grad * w_scale)  # (rows, out), (rows, 1)
        w_t = w.contiguous().t() if w_t is None else w_t
        ones = torch.ones(1, w_t.shape[1], device=w.device, dtype=torch.float32)
        grad_x = torch._scaled_mm(gq, w_t, scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)  # (rows, k)
        return grad_x, None, None, None


class Fp8ProductsLinear4bit(bnb.nn.Linear4bit):
    """A frozen bitsandbytes 4-bit layer whose products run in fp8 (Fp8Product). Still a Linear4bit: peft wraps it as
    it wraps QLoRA's layers, its state dict is the 4-bit one; the fp8 weights are buffers that are never saved."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Fp8Product.apply(x.reshape(-1, x.shape[-1]), self.fp8_weight, self.fp8_scale, self.fp8_weight_t)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)


def use_fp8_products(model: torch.nn.Module, both_layouts: bool = True) -> int:
    """Give every frozen 4-bit layer whose widths fit fp8 products (multiples of 16) its fp8 weight and forward; with
    `both_layouts` the backward's layout too (1 byte a weight more, no transposes in the backward). Returns how many
    layers now multiply in fp8; the others keep QLoRA's products (logged)."""
    converted, kept = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or isinstance(module, Fp8ProductsLinear4bit):
            continue
        if module.in_features % 16 or module.out_features % 16:
            kept.append(name)
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()  # (out, k)
        w, w_scale = fp8_rows(weight)  # (out, k) row-major, (out, 1)
        module.register_buffer("fp8_weight", w.t(), persistent=False)  # (k, out) column-major
        module.register_buffer("fp8_scale", w_scale.view(1, -1), persistent=False)  # (1, out)
        module.register_buffer("fp8_weight_t", w.t().contiguous().t() if both_layouts else None,
                               persistent=False)  # (out, k) column-major
        module.__class__ = Fp8ProductsLinear4bit
        converted += 1
    if kept:
        logger.warning("fp8 products need widths that are multiples of 16; these 4-bit layers keep QLoRA's "
                       "products: %s", ", ".join(kept))
    return converted


def products_used(model: torch.nn.Module) -> str:
    """How the model's frozen 4-bit layers multiplied, as recorded next to the adapter (run.json, the model card):
    what the adapter was trained against."""
    fp8 = [m for m in model.modules() if isinstance(m, Fp8ProductsLinear4bit)]
    if not fp8:
        return "dequantized (QLoRA's: the 4-bit weights dequantized to the compute dtype in each product)"
    layouts = "both layouts" if fp8[0].fp8_weight_t is not None else "one layout"
    return f"fp8 ({len(fp8)} layers: e4m3 weights scaled per output channel, inputs and gradients per row; {layouts})"

"""Builds the bitsandbytes quantization config of the base model (QLoRA's 4-bit NF4 by default).

The compute dtype is not a setting of its own: it is the dtype that model_utils.decide_device_dtype chose, so the
dequantized matmuls run in the same precision as the rest of the step.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from config import QuantizationConfig


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

"""Runs decoding's Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by the caller
before Triton is imported), on inputs a test saved, and saves what they computed.

Test helper only (tests/test_inference.py): the interpreter runs each kernel's program instances one by one in
NumPy, the same kernel source the GPU compiles, so CI checks the kernels' arithmetic and indexing without a GPU.

    TRITON_INTERPRET=1 python tests/kernel_probe.py INPUTS.pt OUTPUTS.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding import SPLIT_CONFIGS, decode_attention, split_attention, triton_decode_attention, triton_gemv  # noqa

inputs = torch.load(sys.argv[1])
q, keys, values, layout, scale = (inputs[k] for k in ("q", "keys", "values", "layout", "scale"))
head_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (keys, values)]  # StaticCache's layout
out = {}
for config in set(SPLIT_CONFIGS.values()):  # the one-step kernel (batch 1) and the walking one
    for name, (k, v) in (("token-major", (keys, values)), ("head-major", head_major)):
        out[f"split {config} {name} fp32"] = split_attention(q, k, v, layout, scale, config)
    out[f"split {config} token-major bf16"] = split_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(),
                                                              layout, scale, config)
triton_decode_attention()  # registers the op the decode step calls
out["op"] = decode_attention(q, keys, values, layout, scale, "split")
gemv = triton_gemv()
for rows, dtype in inputs["gemv cases"]:
    x, w, b = (inputs[f"gemv {n}"][:rows].to(dtype) if n == "x" else inputs[f"gemv {n}"].to(dtype)
               for n in ("x", "w", "b"))
    out[f"gemv {rows} {dtype}"] = gemv(x, w, b)
torch.save(out, sys.argv[2])

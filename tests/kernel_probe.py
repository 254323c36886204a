"""Runs decode_kernels.py's Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by the caller
before Triton is imported), on inputs a test saved, and saves what they computed.

Test helper only (tests/test_inference.py): the interpreter runs each kernel's program instances one by one in
NumPy, the same kernel source the GPU compiles, so CI checks the kernels' arithmetic and indexing without a GPU.
Last, the tiny model's decode steps run through the fused layers' kernels (phi_layers._fused_decode_step for one row, in
fp32 and in fp16 (attend_out); a few rows in fp16 through the rows kernel and the step attention; as on a GPU:
triton_supported is made to say yes), eagerly: the interpreter cannot run inside torch.compile's tracing.

    TRITON_INTERPRET=1 python tests/kernel_probe.py INPUTS.pt OUTPUTS.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import decode_kernels  # noqa: E402
import decoding  # noqa: E402
import phi_layers  # noqa: E402
from config import GenerationSettings  # noqa: E402
from data_utils import HUMAN  # noqa: E402
from decode_kernels import (SPLIT_CONFIGS, attend_out, split_attention, triton_decode_attention,  # noqa: E402
                            triton_gemv, triton_layer_products)
from decoding import FastDecoder  # noqa: E402
from phi_layers import decode_attention, decode_layout, norm_folded  # noqa: E402

inputs = torch.load(sys.argv[1])
q, keys, values, layout, scale = (inputs[k] for k in ("q", "keys", "values", "layout", "scale"))
head_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (keys, values)]  # StaticCache's layout
out = {}
for config in set(SPLIT_CONFIGS.values()):  # the one-step kernel (batch 1) and the walking one
    for name, (k, v) in (("token-major", (keys, values)), ("head-major", head_major)):
        out[f"split {config} {name} fp32"] = split_attention(q, k, v, layout, scale, config)
    out[f"split {config} token-major bf16"] = split_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(),
                                                              layout, scale, config)
# the walking launch on a cache longer than WALKED_SLOTS (longer blocks), every slot past the first 384 loud
longer = [torch.cat((t, torch.full((t.shape[0], 2048 - t.shape[1], *t.shape[2:]), 30.0)), 1) for t in (keys, values)]
out["long cache split"] = split_attention(q, *longer, decode_layout(inputs["starts"], inputs["used"], 2048), scale,
                                          SPLIT_CONFIGS[64])
triton_decode_attention()  # registers the op the decode step calls
out["op"] = decode_attention(q, keys, values, layout, scale, "split")
# the same rows in a pool (BatchDecoder's): one flat run of slots viewed (1, slots, heads, dim), each row's slots at
# a flat start of its own, out of row order and past the end of a region of 384, every other slot loud; the launch
# covers `reach` slots a row (the rows' length), not the pool's; then the step's key and value written into it
starts, used = inputs["starts"], inputs["used"]
pool_starts = inputs["pool starts"]
pool_k, pool_v = (torch.full((1, int((pool_starts + used).max()) + 50, *keys.shape[2:]), 30.0) for _ in range(2))
for row in range(rows := q.shape[0]):
    mine = slice(int(starts[row]), int(starts[row] + used[row]))
    theirs = slice(int(pool_starts[row]), int(pool_starts[row] + used[row]))
    pool_k[0, theirs], pool_v[0, theirs] = keys[row, mine], values[row, mine]
pool_layout = decode_layout(pool_starts, used, 0)
for config in set(SPLIT_CONFIGS.values()):
    out[f"pool split {config}"] = split_attention(q, pool_k, pool_v, pool_layout, scale, config, reach=keys.shape[1])
out["pool op"] = decode_attention(q, pool_k, pool_v, pool_layout, scale, "split", reach=keys.shape[1])
out["pool products"] = decode_attention(q, pool_k, pool_v, pool_layout, scale, "products", reach=keys.shape[1])
kk, vv = pool_k.clone(), pool_v.clone()
step_q = q.transpose(1, 2).reshape(rows, 1, -1)
o = split_attention(step_q, kk, vv, pool_layout, scale, SPLIT_CONFIGS[64], reach=keys.shape[1],
                    new=tuple(inputs[k] for k in ("k new", "v new", "cos", "sin")))
out["pool step"] = (o, kk, vv, pool_k, pool_v)
gemv = triton_gemv()
for rows, dtype in inputs["gemv cases"]:
    x, w, b = (inputs[f"gemv {n}"][:rows].to(dtype) if n == "x" else inputs[f"gemv {n}"].to(dtype)
               for n in ("x", "w", "b"))
    out[f"gemv {rows} {dtype}"] = gemv(x, w, b)
# the step's attention with this step's key and value (rotary, cache writes), on copies of the cache
k_new, v_new, cos, sin = (inputs[k] for k in ("k new", "v new", "cos", "sin"))
rows = q.shape[0]
for config in set(SPLIT_CONFIGS.values()):
    for dtype in (torch.float32, torch.bfloat16):
        kk, vv = keys.to(dtype), values.to(dtype)
        step_q = q.transpose(1, 2).reshape(rows, 1, -1).to(dtype)
        counts = torch.zeros(rows * keys.shape[2], dtype=torch.int32)  # the last block combines: zero again after
        o = split_attention(step_q, kk, vv, layout, scale, config,
                            new=(k_new.to(dtype), v_new.to(dtype), cos.to(dtype), sin.to(dtype)), counts=counts)
        out[f"step {config} {dtype}"] = (o, kk, vv, counts)
# attend_out: the step attention of one row and the layer's output product ([attention | ff] through a weight, plus
# the residual) in one launch, on copies of the cache
for dtype in (torch.float32, torch.bfloat16):
    kk, vv = keys[:1].to(dtype), values[:1].to(dtype)
    step_q = q[:1].transpose(1, 2).reshape(1, 1, -1).to(dtype)
    ff, w, b, hidden = (inputs[f"out {n}"].to(dtype) for n in ("ff", "w", "b", "hidden"))
    counts = torch.zeros(keys.shape[2], dtype=torch.int32)
    sync = torch.zeros(3, dtype=torch.int32)
    y = attend_out(step_q, k_new[:1].to(dtype), v_new[:1].to(dtype), cos[:1].to(dtype), sin[:1].to(dtype), kk, vv,
                   decode_layout(inputs["starts"][:1], inputs["used"][:1], keys.shape[1]), scale, counts, sync, ff, w,
                   b, hidden)
    out[f"attend_out {dtype}"] = (y, kk, vv, counts, sync)
layer_in, layer_out = triton_layer_products()
for dtype in (torch.float32, torch.bfloat16):
    hidden, norm_w, norm_b, w, b = (inputs[f"layer {n}"].to(dtype) for n in ("hidden", "norm weight", "norm bias",
                                                                             "w in", "b in"))
    sums, folded = norm_folded(w, b, norm_w, norm_b)
    out[f"layer_in {dtype}"] = layer_in(hidden, norm_w, sums, 1e-5, w, folded, inputs["gelu from"])
    args = [inputs[f"layer {n}"].to(dtype) for n in ("attention", "ff", "w out", "b out", "hidden")]
    out[f"layer_out {dtype}"] = layer_out(*args)
# the tiny model decoding greedily: one row through the three-kernel layer (and the greedy loop), three left-padded
# rows through the split attention
phi_layers.triton_supported = lambda device, dtype: True
decode_kernels.one_row_blocks = lambda k, dtype, norm=False: (64, 128, 4, 1)  # fewer programs: the interpreter runs them
# one by one
model = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
decoder = FastDecoder(model, AutoTokenizer.from_pretrained(inputs["model"]), 512, HUMAN)
out["fused layers"] = all(layer.step_kernels for layer in model.model.layers)
decoder.step, decoder.greedy_step = model.__call__, decoding._greedy_step  # eager
with torch.inference_mode():
    for ids, mask in inputs["prompts"]:
        greedy = GenerationSettings(**{**inputs["greedy"], "max_new_tokens": 8})
        out[f"decoded {tuple(ids.shape)}"] = decoder.generate(ids, mask, greedy, ignore_eos=True, output_logits=True)
        out[f"greedy loop {tuple(ids.shape)}"] = decoder.generate(ids, mask, greedy, ignore_eos=True)[0]
# again in fp16, where one row's layer takes attend_out and a few rows the rows kernel and the step attention
model = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float16).eval()
decoder = FastDecoder(model, AutoTokenizer.from_pretrained(inputs["model"]), 512, HUMAN)
decoder.step = model.__call__
with torch.inference_mode():
    for ids, mask in inputs["prompts"]:
        greedy = GenerationSettings(**{**inputs["greedy"], "max_new_tokens": 8})
        out[f"decoded fp16 {tuple(ids.shape)}"] = decoder.generate(ids, mask, greedy, ignore_eos=True,
                                                                   output_logits=True)
torch.save(out, sys.argv[2])

"""The compiled decode step alone (no decode loop), before and after decoding.fuse_phi_layers, on a random-init
Phi-2: bf16 at batch 1 and 64, with inductor's coordinate-descent tuning, and fp32 at batch 1.

    python docs/bench/decode_step_fused.py            # from the repo root, on a CUDA GPU
    python docs/bench/decode_step_fused.py fp32       # the fp32 step's kernels, and with TF32 matmuls
    python docs/bench/decode_step_fused.py attention [--all]  # each row's own slots, Triton GEMV (--all: before)
    python docs/bench/decode_step_fused.py rows [--own]  # 8 users' rows: cuBLAS or the Triton rows kernel, own slots
    python docs/bench/decode_step_fused.py b64        # 64 rows, own slots, the kernels' profile
    python docs/bench/decode_step_fused.py kernels [--before]  # one row, bf16 and fp32: a layer in four kernels

Output of the 2026-11-29 H200 runs: docs/bench/h200-decode-step-fused-2026-11-29.log and -fp32- (both before the
Triton GEMV, which fused layers now use at batch 1), docs/bench/h200-decode-step-own-slots-2026-11-29.log; with the
split attention kernel (2026-11-30): h200-decode-step-split-attention-2026-11-30.log (`attention`: "own slots" rows
read with decoding.decode_kernel's choice, the split kernel on an H200) and h200-decode-step-fp32-split-2026-11-30.log
(`fp32`: the Triton GEMV, attention still over the whole cache: this mode passed no layout then; it now measures
the own-slots step as the decoders run it, and the whole-cache step after it). Eleventh session (2026-11-30):
`kernels` as h200-decode-step-kernels-stats-first-2026-11-30.log and -first-blocks- (two earlier layer_in
versions, see docs/PERFORMANCE.md; not run with the final one) and `b64` as
h200-decode-step-b64-step-attention-2026-11-30.log (when 64 rows also took the step attention; they no longer do).
"""
import sys, time, traceback
sys.path.insert(0, ".")
import torch
from transformers import CompileConfig, PhiConfig, PhiForCausalLM, StaticCache
from bench import PHI2_CONFIG
from decoding import DecodeCache, decode_layout, fuse_phi_layers


def random_phi2(dtype):
    torch.manual_seed(0)
    with torch.device("cuda"):
        return PhiForCausalLM(PhiConfig(**PHI2_CONFIG)).to(dtype).eval()


@torch.inference_mode()
def measure(model, label, batch, size=384, width=64, profile=False, own_slots=False):
    """own_slots: the decoders' DecodeCache, each row attending to its own slots (decoding.decode_attention);
    otherwise transformers' StaticCache and attention over the whole cache (the step before that change)."""
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    step = model.get_compiled_call(CompileConfig(dynamic=False))
    cache = (DecodeCache if own_slots else StaticCache)(config=model.config, max_cache_len=size)
    # own slots: each row reads the prompt's slots and the new one, as a step early in an answer would
    starts, used = torch.zeros(batch, device="cuda"), torch.full((batch,), width + 1, device="cuda")
    placed = {"kv_layout": decode_layout(starts, used, size)} if own_slots else {}
    ids = torch.randint(1, 50000, (batch, width), device="cuda")
    mask = torch.ones(batch, size, dtype=torch.long, device="cuda")
    pos = torch.arange(width, device="cuda")[None].expand(batch, -1)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = torch.randint(1, 50000, (batch, 1), device="cuda")
    p = torch.full((batch, 1), width, device="cuda")
    def run(n):
        for _ in range(n):
            step(input_ids=tok, attention_mask=mask, position_ids=p, past_key_values=cache,
                 use_cache=True, **placed).logits[:, -1].argmax(-1)
        for l in cache.layers:
            l.cumulative_length.fill_(width)
    t0 = time.perf_counter(); run(3); torch.cuda.synchronize(); first = time.perf_counter() - t0
    run(5); torch.cuda.synchronize()
    t0 = time.perf_counter(); run(100); torch.cuda.synchronize(); ms = (time.perf_counter() - t0) * 10
    print(f"ROW {label} b{batch}: first {first:.1f}s, {ms:.3f} ms/step -> {batch * 1e3 / ms:,.0f} tok/s", flush=True)
    if profile:
        from torch.profiler import profile as prof_, ProfilerActivity
        with prof_(activities=[ProfilerActivity.CUDA]) as prof:
            run(10); torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=90), flush=True)


def attempt(*args, **kwargs):
    try:
        measure(*args, **kwargs)
    except Exception:
        traceback.print_exc(limit=6)


if sys.argv[1:2] == ["attention"]:  # the prompt's 64 slots + 1 of a 384-slot cache, as early in a 256-token answer
    model = random_phi2(torch.bfloat16)
    fuse_phi_layers(model)
    gemv = model.model.layers[0].gemv
    for layer in model.model.layers:  # cuBLAS first, then decoding.triton_gemv (the default at batch 1)
        layer.gemv = None
    if "--all" in sys.argv:  # the step before (each row compiles for ~35 s)
        attempt(model, "bf16 fused, whole cache", 1)
        attempt(model, "bf16 fused, whole cache", 64)
    attempt(model, "bf16 fused, own slots", 1, own_slots=True)
    for layer in model.model.layers:
        layer.gemv = gemv
    attempt(model, "bf16 fused, own slots, triton gemv", 1, profile=True, own_slots=True)
    attempt(model, "bf16 fused, own slots", 64, profile=True, own_slots=True)
    sys.exit()
if sys.argv[1:2] == ["b64"]:  # 64 rows, each attending over its own slots (the step attention at batch 64)
    model = random_phi2(torch.bfloat16)
    fuse_phi_layers(model)
    attempt(model, "bf16 fused, own slots", 64, profile=True, own_slots=True)
    sys.exit()
if sys.argv[1:2] == ["kernels"]:  # one row: the layer in four kernels (layer.step_kernels) against the step before
    for dtype in (torch.bfloat16, torch.float32):
        model = random_phi2(dtype)
        fuse_phi_layers(model)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        if "--before" in sys.argv:
            for layer in model.model.layers:
                layer.step_kernels = False
            attempt(model, f"{name} fused, own slots, triton gemv (before)", 1, own_slots=True)
            for layer in model.model.layers:
                layer.step_kernels = True
        attempt(model, f"{name} layer kernels", 1, profile=True, own_slots=True)
        del model
        torch.cuda.empty_cache()
    sys.exit()
if sys.argv[1:2] == ["rows"]:  # 8 users' step (BatchDecoder's slots): cuBLAS, the Triton rows kernel, own slots
    model = random_phi2(torch.bfloat16)
    fuse_phi_layers(model)
    gemv = model.model.layers[0].gemv
    for layer in model.model.layers:
        layer.gemv = None
    if "--own" not in sys.argv:  # --own: only the step BatchDecoder runs
        attempt(model, "bf16 fused, whole cache, cuBLAS", 8)
    for layer in model.model.layers:
        layer.gemv = gemv
    if "--own" not in sys.argv:
        attempt(model, "bf16 fused, whole cache, triton rows [q; k; v; fc1]", 8, profile=True)
    attempt(model, "bf16 fused, own slots, triton rows [q; k; v; fc1]", 8, profile=True, own_slots=True)
    sys.exit()
if sys.argv[1:] == ["fp32"]:  # where the fp32 step's time goes, and what TF32 matmuls change
    model = random_phi2(torch.float32)
    fuse_phi_layers(model)
    attempt(model, "fp32 fused, own slots", 1, profile=True, own_slots=True)  # what FastDecoder runs
    attempt(model, "fp32 fused, whole cache", 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    attempt(model, "fp32 fused tf32", 1)
    sys.exit()
model = random_phi2(torch.bfloat16)
attempt(model, "bf16 unfused", 1)
attempt(model, "bf16 unfused", 64)
fuse_phi_layers(model)
attempt(model, "bf16 fused", 1, profile=True)
attempt(model, "bf16 fused", 64)
torch._inductor.config.coordinate_descent_tuning = True
attempt(model, "bf16 fused coordinate-descent", 1)
torch._inductor.config.coordinate_descent_tuning = False
del model
torch.cuda.empty_cache()
model = random_phi2(torch.float32)
attempt(model, "fp32 unfused", 1)
fuse_phi_layers(model)
attempt(model, "fp32 fused", 1)

"""Time the compiled decode step alone (no decode loop) on a random-init Phi-2, bf16, with a profile of its kernels.

    python docs/bench/decode_step_profile.py     # from the repo root, on a CUDA GPU

Output of the 2026-11-29 H200 run: docs/bench/h200-decode-step-profile-2026-11-29.log.
"""
import sys, time, traceback
sys.path.insert(0, ".")
import torch
from transformers import CompileConfig, PhiConfig, PhiForCausalLM, StaticCache
from bench import PHI2_CONFIG

torch.manual_seed(0)
with torch.device("cuda"):
    model = PhiForCausalLM(PhiConfig(**PHI2_CONFIG)).to(torch.bfloat16).eval()
torch._logging.set_logs(perf_hints=True)


@torch.inference_mode()
def measure(label, batch, size=384, width=64, profile=False):
    step = model.get_compiled_call(CompileConfig(dynamic=False))
    cache = StaticCache(config=model.config, max_cache_len=size)
    ids = torch.randint(1, 50000, (batch, width), device="cuda")
    mask = torch.ones(batch, size, dtype=torch.long, device="cuda")
    pos = torch.arange(width, device="cuda")[None].expand(batch, -1)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = torch.randint(1, 50000, (batch, 1), device="cuda")
    p = torch.full((batch, 1), width, device="cuda")
    def one():
        out = step(input_ids=tok, attention_mask=mask, position_ids=p, past_key_values=cache, use_cache=True).logits[:, -1]
        return out.to(torch.float32, copy=True).argmax(-1)
    def run(n):
        for _ in range(n):
            one()
        for l in cache.layers:
            l.cumulative_length.fill_(width)
    t0 = time.perf_counter(); run(3); torch.cuda.synchronize(); first = time.perf_counter() - t0
    run(5); torch.cuda.synchronize()
    t0 = time.perf_counter(); run(100); torch.cuda.synchronize(); ms = (time.perf_counter() - t0) * 10
    print(f"{label} b{batch}: first {first:.1f}s, {ms:.3f} ms/step -> {batch * 1e3 / ms:,.0f} tok/s", flush=True)
    if profile:
        from torch.profiler import profile as prof_, ProfilerActivity
        with prof_(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(10); torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)


for label, cudnn in (("cudnn-sdpa-on", True), ("cudnn-sdpa-off", False)):
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        measure(label, 1, profile=True)
    except Exception:
        traceback.print_exc(limit=4)
try:
    measure("cudnn-sdpa-off", 64)
except Exception:
    traceback.print_exc(limit=4)

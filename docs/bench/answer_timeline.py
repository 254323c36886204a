"""Issue 18: where a bf16 batch-1 answer's time goes outside the decode step. ChatModel(fast) as bench generate runs
it (random-init Phi-2, 64-token prompt, 256 new tokens, greedy, no penalty); wall times of 1-, 2- and 256-token
answers, again with the eager prefill where FastDecoder prefills through CUDA graphs (_PrefillGraph); with --penalty,
the 256-token answer with the app's default repetition penalty (1.1); then one 256-token answer under
torch.profiler: GPU busy time (union of kernels), idle gaps by size, the prefill's span, the kernels by GPU time.

    python docs/bench/answer_timeline.py [--penalty]     # from the repo root, on a CUDA GPU
Output of the 2026-11-30 H200 runs: docs/bench/h200-answer-timeline-2026-11-30.log (without --penalty),
h200-answer-timeline-penalty-2026-11-30.log (the penalty applied by generate()'s processors each token) and
h200-answer-timeline-penalty-step-2026-11-30.log (the penalty inside the greedy step; cut by its time limit before
the penalty's row)."""
import sys, time
sys.path.insert(0, ".")
import numpy as np
import torch
from pathlib import Path
from bench import make_random_phi2, serving_config
from config import GenerationSettings
from inference import ChatModel, load_model_folder

path = make_random_phi2(Path("/tmp/phi2"))
loaded = load_model_folder(str(path), serving_config("bf16", fast=False))
chat = ChatModel(loaded.model, loaded.tokenizer, fast=True)
prompt = np.random.default_rng(0).integers(1, 50000, size=64).tolist()
gen = GenerationSettings(max_new_tokens=256, temperature=0.0, repetition_penalty=1.0)
def timed(n, reps=5):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        chat.generate_ids([prompt], gen, max_new_tokens=n, ignore_eos=True)
        torch.cuda.synchronize(); out.append(time.perf_counter() - t0)
    return sorted(out)[reps // 2]
def wall(label):
    timed(256, 2)
    t1, t2, t256 = timed(1), timed(2), timed(256)
    print(f"ROW wall{label}: 1 token {t1 * 1e3:.2f} ms, 2 tokens {t2 * 1e3:.2f}, 256 tokens {t256 * 1e3:.2f} -> "
          f"{256 / t256:.1f} tok/s; per later token {(t256 - t1) / 255 * 1e3:.4f} ms", flush=True)
    return t256
plain = wall("")
if chat._decoder.prefill_graphs:  # the same answers with the eager prefill
    chat._decoder.prefill_graphs = False
    wall(", eager prefill")
    chat._decoder.prefill_graphs = True
if "--penalty" in sys.argv:
    gen = GenerationSettings(max_new_tokens=256, temperature=0.0, repetition_penalty=1.1)
    timed(256, 2)  # its step compiles
    t = timed(256)
    print(f"ROW 256 tokens with repetition penalty 1.1: {t * 1e3:.2f} ms -> {256 / t:.1f} tok/s "
          f"(without: {plain * 1e3:.2f} ms -> {256 / plain:.1f})", flush=True)
    gen = GenerationSettings(max_new_tokens=256, temperature=0.0, repetition_penalty=1.0)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    torch.cuda.synchronize(); t0 = time.perf_counter()
    chat.generate_ids([prompt], gen, max_new_tokens=256, ignore_eos=True)
    torch.cuda.synchronize(); wall = time.perf_counter() - t0
kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
busy, gaps, cur_s, cur_e = 0.0, [], None, None
for s, e, _ in kernels:
    if cur_e is None or s > cur_e:
        if cur_e is not None:
            busy += cur_e - cur_s; gaps.append(s - cur_e)
        cur_s, cur_e = s, e
    else:
        cur_e = max(cur_e, e)
busy += cur_e - cur_s
span = kernels[-1][1] - kernels[0][0]
gaps = np.array(gaps)
print(f"ROW profiled wall {wall * 1e3:.2f} ms; GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, "
      f"{len(kernels)} kernels; idle {gaps.sum() / 1e3:.2f} ms in {len(gaps)} gaps", flush=True)
for lo, hi in ((0, 2), (2, 5), (5, 20), (20, 100), (100, 1e9)):
    sel = gaps[(gaps >= lo) & (gaps < hi)]
    print(f"ROW gaps {lo}-{hi} us: {len(sel)}, {sel.sum() / 1e3:.3f} ms", flush=True)
big = np.argsort(gaps)[-8:]
print("ROW biggest gaps (us):", [round(float(gaps[i]), 1) for i in big], flush=True)
# the prefill: kernels before the first triton layer_in-like kernel (the compiled step's first)
first_step = next(i for i, k in enumerate(kernels) if "kernel" == k[2] or "gemv" in k[2].lower() or k[2].startswith("triton_"))
print(f"ROW prefill: {first_step} kernels, {(kernels[first_step][0] - kernels[0][0]) / 1e3:.2f} ms from first kernel "
      f"to the step's first ({kernels[first_step][2][:40]})", flush=True)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60), flush=True)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90), flush=True)

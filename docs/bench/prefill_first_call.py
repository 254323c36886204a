"""The decoders' eager prefill (the model's forward over the prompts, as decoding.BatchDecoder._prefill runs it) of a
(rows, length) shape met for the first time, against the same shape again: by PyTorch's attention kernel (SDPA's
default choice; flash, memory-efficient or cuDNN only), then a profile of one new shape with the default choice.

On an H200 (bf16, random-init Phi-2) a prefill of a new shape took 77-93 ms inside the server, 16-23 ms the second
time (docs/bench/serve_admission.py). Output of the 2026-11-30 H200 run, before decoding.prefill_attention:
docs/bench/h200-prefill-first-call-2026-11-30.log.

    python docs/bench/prefill_first_call.py   # from the repo root, on a CUDA GPU
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

import bench
from inference import load_model_folder

cfg = bench.serving_config("bf16", True, ("--inference.batch_slots", "8", "--generation.max_new_tokens", "256"))
chat = load_model_folder(str(bench.make_random_phi2(Path("/tmp/phi2"))), cfg)
model = chat.model
from decoding import fuse_phi_layers
fuse_phi_layers(model)
print("attn impl", model.config._attn_implementation, flush=True)


@torch.inference_mode()
def prefill(rows, width, note=""):
    ids = torch.randint(1, 800, (rows, width), device="cuda")
    last = torch.full((rows, 1), width - 1, device="cuda")
    torch.cuda.synchronize()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        model(input_ids=ids, position_ids=torch.arange(width, device="cuda")[None],
              past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=last)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    print(f"ROW prefill {rows}x{width} {note}: first {times[0]:.1f} ms, again {times[1]:.1f} ms", flush=True)


for rows, width in [(1, 132), (7, 140), (8, 140), (1, 64), (3, 77)]:
    prefill(rows, width, "default SDPA")
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
    with sdpa_kernel([backend]):
        for rows, width in [(4, 90 + backend.value), (5, 111 + backend.value), (1, 150 + backend.value)]:
            try:
                prefill(rows, width, f"{backend.name} only")
            except Exception as e:
                print(f"ROW {backend.name} {rows}x{width} failed: {type(e).__name__}: {str(e)[:150]}", flush=True)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    prefill(6, 133, "profiled")
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)

"""BatchDecoder's copy of prefilled prompts into the shared KV cache, on a CUDA GPU: 8 prompts of bench serve's lengths
(132, 124, 100, 135, 140, 125, 122, 128 tokens) from the eager prefill's DynamicCache into the 8-row, 512-slot cache,
ending at slot 200. "index": one gather and one scatter per tensor and layer (decoding.BatchDecoder._prefill now);
"slices": a slice copy per prompt, tensor and layer (before). Prints five timings of each (ms, between device
synchronizations; the first includes one-off costs), whether both give the same cache, and a profile of each.
Output of the 2026-11-30 H200 run: docs/bench/h200-prefill-copy-2026-11-30.log.

    python docs/bench/prefill_copy.py   # from the repo root
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import bench  # noqa: E402
import decoding  # noqa: E402
from inference import load_model_folder  # noqa: E402

LENGTHS = [132, 124, 100, 135, 140, 125, 122, 128]
T = 200  # the shared write index: prompt i goes to slots [T - LENGTHS[i], T) of row i


def timed(fn, n=5):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1e3)
    return " ".join(f"{x:.2f}" for x in out)


cfg = bench.serving_config("bf16", True, ("--inference.batch_slots", "8", "--generation.max_new_tokens", "256"))
chat = load_model_folder(str(bench.make_random_phi2(Path("/tmp/phi2"))), cfg)
model = chat.model
with torch.inference_mode():
    cache = chat.batcher._cache_for(8, 512)
    ids = torch.randint(0, 800, (8, max(LENGTHS)), device="cuda")
    scratch = DynamicCache(config=model.config)
    with decoding.prefill_attention(ids.device):
        model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device="cuda")[None], past_key_values=scratch,
              use_cache=True, logits_to_keep=1)
    sizes = torch.tensor(LENGTHS)
    slots = torch.cat([torch.arange(n) for n in LENGTHS])
    where = torch.stack([torch.arange(8).repeat_interleave(sizes), slots, torch.arange(8).repeat_interleave(sizes),
                         slots + T - sizes.repeat_interleave(sizes)]).cuda()
    source_rows, source_slots, target_rows, target_slots = where

    def index():
        for source, target in zip(scratch.layers, cache.layers):
            target.keys[target_rows, :, target_slots] = source.keys[source_rows, :, source_slots]
            target.values[target_rows, :, target_slots] = source.values[source_rows, :, source_slots]

    def slices():
        for source, target in zip(scratch.layers, cache.layers):
            for row, n in enumerate(LENGTHS):
                target.keys[row, :, T - n:T] = source.keys[row, :, :n]
                target.values[row, :, T - n:T] = source.values[row, :, :n]

    print("ROW index copy ms:", timed(index), flush=True)
    print("ROW slice copy ms:", timed(slices), flush=True)
    index()
    expected = cache.layers[5].keys.clone()
    cache.layers[5].keys.zero_()
    slices()
    print("ROW same result:", torch.equal(expected, cache.layers[5].keys), flush=True)
    from torch.profiler import ProfilerActivity, profile
    for name, fn in (("index", index), ("slices", slices)):
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            fn()
            torch.cuda.synchronize()
        print("PROFILE", name, flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70), flush=True)

"""FastDecoder's batch-1 prefill (the model's forward over one prompt into the decoders' DecodeCache, as
decoding.FastDecoder.generate runs it) eager against torch.compile with dynamic shapes (inductor, no CUDA graphs):
per prompt length, the first call (compilation), the calls after it, the compiled logits' largest difference from
eager's, and how many times it compiled. Written for issue 18 after a 256-token bf16 answer on an H200 spent 19.5 ms
of its 450.9 in the eager prefill (1,241 kernels; docs/bench/answer_timeline.py): not yet run on a GPU (since then
FastDecoder's one-row prompts prefill through CUDA graphs).
--rows: BatchDecoder's prefill of several prompts that join at once (one right-padded pass into a DynamicCache, each
prompt's last logits), which stays eager: on an H200, 8 x 192 tokens took 24-26 ms, about half of it eager
elementwise kernels (docs/PERFORMANCE.md, fifteenth session); whether inductor's fused kernels make it shorter.

    python docs/bench/prefill_compiled.py [--rows]          # from the repo root, on a CUDA GPU: random-init Phi-2, bf16
    python docs/bench/prefill_compiled.py --tiny [--rows]   # the tiny model in fp32 on the CPU (that the script runs)
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import bench
from decoding import FastDecoder, prefill_attention
from model_utils import load_tokenizer
from config import ModelConfig

tiny = "--tiny" in sys.argv
device = torch.device("cpu" if tiny else "cuda")
path = bench.TINY_MODEL if tiny else bench.make_random_phi2(Path("/tmp/phi2"))
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if tiny else torch.bfloat16).to(device).eval()
decoder = FastDecoder(model, load_tokenizer(ModelConfig(name_or_path=str(path))), 2048)  # fuses the layers
compiled = torch.compile(model, dynamic=True)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill(forward, width: int) -> tuple[float, torch.Tensor]:
    """One prompt of `width` tokens into a fresh 512-slot DecodeCache (FastDecoder's chat size); (seconds, logits)."""
    cache = decoder._cache(1, width + 256)
    size = cache.layers[0].max_cache_len
    ids = torch.randint(1, 800, (1, width), generator=torch.Generator().manual_seed(width)).to(device)
    mask = torch.ones(1, size, dtype=torch.long, device=device)
    position = torch.arange(width, device=device)[None]
    sync()
    start = time.perf_counter()
    with prefill_attention(device):
        logits = forward(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1].float()
    sync()
    return time.perf_counter() - start, logits


@torch.inference_mode()
def group_prefill(forward, rows: int, width: int) -> tuple[float, torch.Tensor]:
    """`rows` prompts of `width` tokens in one pass, as BatchDecoder._prefill runs several; (seconds, logits)."""
    ids = torch.randint(1, 800, (rows, width), generator=torch.Generator().manual_seed(rows * width)).to(device)
    last = torch.full((rows, 1), width - 1, device=device)
    sync()
    start = time.perf_counter()
    with prefill_attention(device):
        logits = forward(input_ids=ids, position_ids=torch.arange(width, device=device)[None],
                         past_key_values=DynamicCache(config=model.config), use_cache=True,
                         logits_to_keep=last).logits[:, -1].float()
    sync()
    return time.perf_counter() - start, logits


if "--rows" in sys.argv:
    for rows, width in ((7, 140), (8, 128), (4, 140), (7, 100), (7, 140)):
        eager = [group_prefill(model, rows, width) for _ in range(4)]
        first = group_prefill(compiled, rows, width)
        after = [group_prefill(compiled, rows, width) for _ in range(4)]
        diff = float((after[-1][1] - eager[-1][1]).abs().max())
        print(f"ROW {rows} x {width} tokens: eager {sorted(t for t, _ in eager)[1] * 1e3:.2f} ms, compiled first call "
              f"{first[0]:.2f} s, then {sorted(t for t, _ in after)[1] * 1e3:.2f} ms; max |logit diff| {diff:.3g}",
              flush=True)
    print("ROW compilations:", dict(torch._dynamo.utils.counters["stats"]), flush=True)
    sys.exit()
prefill(model, 16)  # the cache's first use initializes it (static addresses, as the decoders' first prefill does)
for width in (23, 64, 150, 400, 64):
    eager = [prefill(model, width) for _ in range(4)]
    first = prefill(compiled, width)
    after = [prefill(compiled, width) for _ in range(4)]
    diff = float((after[-1][1] - eager[-1][1]).abs().max())
    print(f"ROW {width} tokens: eager {sorted(t for t, _ in eager)[1] * 1e3:.2f} ms, compiled first call "
          f"{first[0]:.2f} s, then {sorted(t for t, _ in after)[1] * 1e3:.2f} ms; max |logit diff| {diff:.3g}",
          flush=True)
print("ROW compilations:", dict(torch._dynamo.utils.counters["stats"]), flush=True)

"""Issue 18: batch-1 speed of the fast path alone, as `bench.py generate` measures it (ChatModel, random-init Phi-2,
64-token prompt, 256 new tokens, greedy, no penalty; the median of 5 answers after two warm-up calls), without the
plain path: for A/B runs of two versions of decoding.py, each in its own process (and its own inductor cache,
TORCHINDUCTOR_CACHE_DIR, or the second reuses the first's compiled step).

    python docs/bench/answer_speed.py fp32 [bf16]     # from the repo root, on a CUDA GPU
"""
import sys
import time

sys.path.insert(0, ".")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pathlib import Path  # noqa: E402

from bench import make_random_phi2, serving_config  # noqa: E402
from config import GenerationSettings  # noqa: E402
from inference import ChatModel, load_model_folder  # noqa: E402

path = make_random_phi2(Path("/tmp/phi2"))
prompt = np.random.default_rng(0).integers(1, 50000, size=64).tolist()
gen = GenerationSettings(max_new_tokens=256, temperature=0.0, repetition_penalty=1.0)
for dtype in sys.argv[1:]:
    loaded = load_model_folder(str(path), serving_config(dtype, fast=False))
    chat = ChatModel(loaded.model, loaded.tokenizer, fast=True)
    times = []
    for i in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        chat.generate_ids([prompt], gen, max_new_tokens=256, ignore_eos=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = sorted(times[2:])[2]
    print(f"ROW {dtype} batch 1: {256 / t:.1f} tok/s ({t * 1e3:.2f} ms a 256-token answer; all: "
          f"{', '.join(f'{x * 1e3:.1f}' for x in times)} ms)", flush=True)
    del chat, loaded
    torch.cuda.empty_cache()

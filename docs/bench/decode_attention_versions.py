"""Decode attention alone (decoding.split_attention, bf16, Phi-2's 32 heads of 80), the same launches timed for
each version of decoding.py given: how a kernel edit changes each launch at 1, 8 and 64 rows and 65 / 192 / 320
used slots (32 layers' caches read in turn, in one CUDA graph, as decode_attention_split.py). One-row launches are
also timed as the step runs them (this step's key and value rotated and written inside: "step").

    git show fab5d2e:decoding.py > /tmp/decoding_before.py
    python docs/bench/decode_attention_versions.py /tmp/decoding_before.py decoding.py   # repo root, CUDA GPU

Output of the 2026-11-30 H200 runs: docs/bench/h200-decode-attention-early-exit-first-version-2026-11-30.log and
h200-decode-attention-early-exit-2026-11-30.log (from the session script this was made from, which took module
names; this file has not run on a GPU itself).
"""
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
sys.path.insert(0, str(Path(__file__).parent))
from gemv_triton import LAYERS, timed  # noqa: E402  (microseconds a layer, from a CUDA graph of 32 calls)

HEADS, DIM = 32, 80
# (slots a program, slots a step of its walk, warps, stages) by rows: decoding.SPLIT_CONFIGS' and their neighbours
CONFIGS = {1: [(32, 32, 2, 1), (32, 32, 1, 1), (16, 16, 1, 1), (64, 64, 2, 1)],
           8: [(64, 8, 1, 3), (32, 32, 1, 1), (32, 32, 2, 1), (32, 16, 2, 2), (64, 64, 2, 1), (64, 16, 2, 3),
               (16, 16, 1, 1), (128, 8, 1, 3)],
           64: [(128, 8, 1, 3), (64, 8, 1, 3), (32, 32, 1, 1), (64, 64, 2, 1)]}


def load(path: str):
    spec = importlib.util.spec_from_file_location(f"decoding_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(versions: dict, batch: int, size: int, used: int) -> None:
    torch.manual_seed(0)
    caches = [tuple(torch.randn(batch, size, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(LAYERS)]
    q = torch.randn(batch, 1, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = torch.randn_like(q), torch.randn_like(q)
    cos, sin = (torch.randn(batch, 1, 32, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    counts = torch.zeros(batch * HEADS, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, 1, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    for name, mod in versions.items():
        layout = mod.decode_layout(torch.zeros(batch, device="cuda"), torch.full((batch,), used, device="cuda"), size)
        reference = mod.decode_attention(q.view(batch, 1, HEADS, DIM).transpose(1, 2).float(), caches[0][0].float(),
                                         caches[0][1].float(), layout, DIM ** -0.5, "products")
        for config in CONFIGS[batch]:
            for step in ((False, True) if batch == 1 else (False,)):
                def fn(i=0):
                    out.copy_(mod.split_attention(q, *caches[i], layout, DIM ** -0.5, config, counts=counts,
                                                  new=(k_new, v_new, cos, sin) if step else None))
                fn()
                diff = "writes the cache" if step else f"max diff {float((out.float() - reference).abs().max()):.2g}"
                us = timed(lambda: [fn(i) for i in range(LAYERS)] and None)
                print(f"ROW {name} b{batch} {used}/{size} {'step ' if step else ''}{config} {us:.2f} us ({diff})",
                      flush=True)


def main():
    versions = {path: load(path) for path in sys.argv[1:] or ["decoding.py"]}
    for batch, size in ((1, 512), (8, 512), (64, 384)):
        for used in (65, 192, 320):
            case(versions, batch, size, used)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""A few users' decode-step products of the fused Phi-2 layer: cuBLAS (what F.linear runs) against
decoding.rows_kernel, at 1, 2, 4 and 8 rows.

When several chat users are decoded together (BatchDecoder: up to 8 rows), a step still mostly reads weights: 8
rows are 8 x 2 x 2.7e9 FLOP, nothing for the GPU, against 5.3 GB of bf16 weights. This measures how fast cuBLAS
and a Triton kernel that reads each block of weights once for all rows (one tensor-core product a block, x padded
to 16 rows) get through them. As in the real step, 32 different weight matrices are read in turn (no L2 reuse),
the calls captured in one CUDA graph (no launch gaps), bf16.

    python docs/bench/gemv_rows_triton.py      # from the repo root, on a CUDA GPU
"""
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, ".")
sys.path.insert(0, "docs/bench")
from decoding import ROWS_BLOCKS, rows_kernel, triton_gemv  # noqa: E402
from gemv_triton import LAYERS, timed  # noqa: E402  (the same timing as the one-row benchmark)


def main():
    torch.manual_seed(0)
    configs = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 128, 4, 4),
               (64, 256, 8, 3), (16, 1024, 8, 2), (32, 128, 4, 5)]
    print(f"production blocks (decoding.ROWS_BLOCKS): {ROWS_BLOCKS}", flush=True)
    for name, n, k in (("[q; k; v; fc1]", 17920, 2560), ("[dense | fc2]", 2560, 12800)):
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        mb = n * k * 2 / 1e6
        for m in (1, 2, 4, 8):
            x = torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, 1, n, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float(), bs[0].float())

            def cublas():
                for w, b in zip(ws, bs):
                    y.copy_(F.linear(x, w, b))
            us = timed(cublas)
            print(f"ROW {name} {n}x{k} ({mb:.0f} MB) rows {m}: cuBLAS {us:.1f} us = {mb / us:.2f} TB/s", flush=True)
            op = triton_gemv()

            def production():
                for w, b in zip(ws, bs):
                    y.copy_(op(x, w, b))
            err = float((op(x, ws[0], bs[0]).float() - ref).abs().max())
            us = timed(production)
            print(f"ROW {name} rows {m}: triton_gemv {us:.1f} us = {mb / us:.2f} TB/s (max diff {err:.3g})",
                  flush=True)
            if m != 8:
                continue
            for cfg in configs:
                block_n, block_k, warps, stages = cfg
                try:
                    def tri():
                        for w, b in zip(ws, bs):
                            rows_kernel()[(triton.cdiv(n, block_n),)](w, x, b, y, m, n, k, BLOCK_N=block_n,
                                                                       BLOCK_K=block_k, num_warps=warps,
                                                                       num_stages=stages)
                    rows_kernel()[(triton.cdiv(n, block_n),)](ws[0], x, bs[0], y, m, n, k, BLOCK_N=block_n,
                                                               BLOCK_K=block_k, num_warps=warps, num_stages=stages)
                    err = float((y.float() - ref).abs().max())  # the first layer's product, as ref
                    us = timed(tri)
                    print(f"ROW {name} rows {m}: rows_kernel {cfg} {us:.1f} us = {mb / us:.2f} TB/s "
                          f"(max diff {err:.3g})", flush=True)
                except Exception as e:  # a configuration that does not compile or fit: skip it
                    print(f"ROW {name}: rows_kernel {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        ws = bs = None  # free this shape's weights before the next
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Issue 18, bf16 batch 1: does programmatic dependent launch (PDL, Hopper) hide part of the ~4-6 us a
weight-reading launch costs beyond streaming its bytes?

32 layers of the one-row step's kernels, chained as in the step: [q; k; v; fc1] 17920 x 2560 (x: the previous
layer's output), two small kernels standing in for the split attention's partial and combine (32 and 32 programs
reading the q part, writing a 2560 vector), then [dense | fc2] 2560 x 12800 (x: [small output | last 10240 of the
first product]), bf16, in one CUDA graph, production launches (decoding.one_row_blocks). Variants (GDC mode):
  0 plain kernels; 1 launch_dependents + wait at the top; 2 the first weight tile loaded before them.
Each with plain launches and with launch_pdl=True. Outputs are compared with the plain chain.

    python docs/bench/pdl_chain.py       # on an H100/H200
Output of the 2026-11-30 H200 runs: docs/bench/h200-pdl-chain-2026-11-30.log. The production kernel
(decoding.gemv_kernel) with a PDL switch was measured in this chain and in the real step at commit 6265f17 (logs:
h200-pdl-chain-rotation-, h200-pdl-chain-production-, h200-decode-step-kernels-pdl-*-2026-11-30.log): the step was
slower with it, and decoding does not use PDL (docs/PERFORMANCE.md).
"""
import time

import torch
import triton
import triton.language as tl

LAYERS = 32


@triton.jit
def gemv(w_ptr, x_ptr, x2_ptr, b_ptr, y_ptr, N, K: tl.constexpr, K1: tl.constexpr, GDC: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    if GDC == 1:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    # the first weight tile does not depend on the previous kernel: with GDC 2 loaded before the wait
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0,
                eviction_policy="evict_first")
    if GDC == 2:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + cols, mask=cols < K1, other=0.0).to(tl.float32)
    if K1 < K:
        x += tl.load(x2_ptr + cols - K1, mask=(cols >= K1) & (cols < K), other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        c = k0 + cols
        w = tl.load(w_ptr + rows[:, None] * K + c[None, :], mask=(rows[:, None] < N) & (c[None, :] < K), other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + c, mask=c < K1, other=0.0).to(tl.float32)
        if K1 < K:
            x += tl.load(x2_ptr + c - K1, mask=(c >= K1) & (c < K), other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1) + tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def small(x_ptr, y_ptr, GDC: tl.constexpr):
    d = tl.program_id(0) * 80 + tl.arange(0, 128)
    if GDC > 0:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + d, mask=tl.arange(0, 128) < 80, other=0.0).to(tl.float32)
    tl.store(y_ptr + d, (x * 0.5 + 0.25).to(y_ptr.dtype.element_ty), mask=tl.arange(0, 128) < 80)


def main():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    w_in = [torch.randn(17920, 2560, device="cuda", dtype=dtype) * 0.02 for _ in range(LAYERS)]
    w_out = [torch.randn(2560, 12800, device="cuda", dtype=dtype) * 0.02 for _ in range(LAYERS)]
    b_in = torch.zeros(17920, device="cuda", dtype=dtype)
    b_out = torch.zeros(2560, device="cuda", dtype=dtype)
    x0 = torch.randn(2560, device="cuda", dtype=dtype)
    ys_in = [torch.empty(17920, device="cuda", dtype=dtype) for _ in range(LAYERS)]
    ys_mid = [torch.empty(2560, device="cuda", dtype=dtype) for _ in range(LAYERS)]
    ys_att = [torch.empty(2560, device="cuda", dtype=dtype) for _ in range(LAYERS)]
    ys_out = [torch.empty(2560, device="cuda", dtype=dtype) for _ in range(LAYERS)]

    def chain(gdc, pdl, smalls):
        x = x0
        for i in range(LAYERS):
            gemv[(triton.cdiv(17920, 8),)](w_in[i], x, x, b_in, ys_in[i], 17920, K=2560, K1=2560, GDC=gdc,
                                          BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=4, launch_pdl=pdl)
            att = ys_in[i]
            if smalls:
                small[(32,)](ys_in[i], ys_mid[i], GDC=gdc, launch_pdl=pdl)
                small[(32,)](ys_mid[i], ys_att[i], GDC=gdc, launch_pdl=pdl)
                att = ys_att[i]
            gemv[(triton.cdiv(2560, 8),)](w_out[i], att, ys_in[i][7680:], b_out, ys_out[i], 2560, K=12800,
                                         K1=2560, GDC=gdc, BLOCK_N=8, BLOCK_K=1024, num_warps=8, num_stages=2,
                                         launch_pdl=pdl)
            x = ys_out[i]
        return x

    for smalls in (False, True):
        reference = chain(0, False, smalls).clone()
        for label, gdc, pdl in (("off", 0, False), ("gdc top, plain launch", 1, False), ("pdl, wait at top", 1, True),
                                ("pdl, first tile before wait", 2, True), ("off", 0, False),
                                ("pdl, wait at top", 1, True), ("pdl, first tile before wait", 2, True)):
            try:
                out = chain(gdc, pdl, smalls).clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    chain(gdc, pdl, smalls)
                graph.replay()
                torch.cuda.synchronize()
                same = torch.equal(ys_out[-1], reference) and torch.equal(out, reference)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(20):
                        graph.replay()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) / 20 / LAYERS * 1e6)
                us = min(times)
                print(f"ROW {'4 kernels' if smalls else '2 kernels'} a layer, {label}: {us:.2f} us a layer "
                      f"(best of 3: {', '.join(f'{t:.2f}' for t in times)}), {us * LAYERS / 1e3:.3f} ms for 32; "
                      f"same output as off: {same}", flush=True)
            except Exception as e:
                print(f"ROW {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()

"""Batch-1 weight products of the fused Phi-2 layer: cuBLAS (what F.linear runs) against decoding.gemv_kernel.

At batch 1 a decode step is 32 x two matrix-vector products ([q; k; v; fc1]: 17920 x 2560, [dense | fc2]:
2560 x 12800) plus lm_head, and cuBLAS reads those weights at ~3.5 TB/s of the H200's 4.8
(docs/PERFORMANCE.md). This measures whether a simple Triton kernel (each program: a block of rows, the whole
input, fp32 sums) reads them faster. As in the real step, 32 different weight matrices are read in turn (no L2
reuse: 92 MB each), the calls captured in one CUDA graph (no launch gaps), bf16 (or fp32: twice the bytes).

    python docs/bench/gemv_triton.py      # from the repo root, on a CUDA GPU
    python docs/bench/gemv_triton.py fp32 # the fp32 model's products (fp32 weights, fp32 sums)
    python docs/bench/gemv_triton.py layer  # the one-row step's fused launches (layer norm, gelu, residual inside)
    python docs/bench/gemv_triton.py sweep  # bf16 layer_in/layer_out over a wider grid of launches, the best first
"""
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, ".")
from decoding import gemv_kernel  # noqa: E402

LAYERS = 32


def gemv(w, x, b, y, block_n, block_k, warps, stages, x2=None, res=None, norm=None, gelu_from=None):
    """One launch of gemv_kernel; x2/res/norm/gelu_from: the fused layer's switches (layer_in, layer_out)."""
    n, k = w.shape
    nw, sums = norm if norm is not None else (x, x)  # norm: the layer norm's weight, decoding.norm_folded's sums
    gemv_kernel()[(triton.cdiv(n, block_n),)](
        w, x, x if x2 is None else x2, b, x if res is None else res, nw, sums, y, n, 1e-5,
        n if gelu_from is None else gelu_from, K=k, K1=k if x2 is None else x.shape[-1], NORM=norm is not None,
        GELU=gelu_from is not None, RESIDUAL=res is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)


def timed(fn, reps=20) -> float:
    """Microseconds per product, from a CUDA graph of one product per layer."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps / LAYERS * 1e6


def layer(dtype):
    """The one-row step's two fused launches (decoding.triton_layer_products) against what they replace: layer_in
    (layer norm inside, gelu on fc1's rows) against F.layer_norm + the plain kernel, layer_out ([attention |
    gelu(fc1)] read from two tensors, residual added) against cat + the plain kernel + add; each by block sizes."""
    configs = [(1, 2048, 4, 2), (2, 2048, 4, 2), (2, 1024, 4, 2), (2, 1024, 4, 3), (4, 1024, 4, 3), (4, 512, 4, 3),
               (8, 1024, 8, 2), (8, 512, 4, 3), (8, 256, 4, 4), (16, 512, 8, 3), (16, 256, 4, 4)]
    hidden = torch.randn(1, 2560, device="cuda", dtype=dtype) * 3
    norm = (torch.randn(2560, device="cuda", dtype=dtype), torch.randn(2560, device="cuda", dtype=dtype))
    for name, n, k in (("layer_in [q; k; v; fc1]", 17920, 2560), ("layer_out [dense | fc2]", 2560, 12800)):
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(LAYERS)]
        bs = [torch.randn(n, device="cuda", dtype=dtype) for _ in range(LAYERS)]
        y = torch.empty(1, n, device="cuda", dtype=dtype)
        mb = n * k * dtype.itemsize / 1e6
        attention = torch.randn(1, 2560, device="cuda", dtype=dtype)
        ff = torch.randn(1, 10240, device="cuda", dtype=dtype)
        sums = torch.randn(n, device="cuda")
        fused = dict(norm=(norm[0], sums), gelu_from=7680) if n == 17920 else dict(x2=ff, res=hidden)
        x = hidden if n == 17920 else attention
        for cfg in ((2, 2048, 4, 2), (8, 1024, 8, 2), (1, 2048, 4, 2), (2, 1024, 4, 2)):  # the plain launches
            def before():
                for w, b in zip(ws, bs):
                    if n == 17920:
                        gemv(w, F.layer_norm(hidden, (2560,), *norm), b, y, *cfg)
                    else:
                        gemv(w, torch.cat((attention, ff), -1), b, y, *cfg)
                        y.add_(hidden)
            us = timed(before)
            print(f"ROW {name} ({mb:.0f} MB): before (separate kernels) {cfg} {us:.1f} us", flush=True)
        fused_times(f"{name}: fused", ws, bs, x, y, fused, mb, configs)
        ws = bs = None
        torch.cuda.empty_cache()


def fused_times(label, ws, bs, x, y, fused, mb, configs) -> list[tuple[float, tuple]]:
    """(us, launch) of the fused launches (fused: gemv's switches) over the layers' weights ws, bs, for each launch
    that compiles; each printed."""
    results = []
    for cfg in configs:
        try:
            def after():
                for w, b in zip(ws, bs):
                    gemv(w, x, b, y, *cfg, **fused)
            us = timed(after)
            results.append((us, cfg))
            print(f"ROW {label} {cfg} {us:.1f} us = {mb / us:.2f} TB/s", flush=True)
        except Exception as e:  # a configuration that does not compile or fit: skip it
            print(f"ROW {label} {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return results


def sweep():
    """bf16 layer_in and layer_out over every launch with 8 to 64 weights a thread a step (rows a program 1-16,
    columns a step 256-2048, 2/4/8 warps, 2 stages; a few stage counts around the production launch), each timed as
    in `layer`; the ten fastest of each printed last."""
    import decoding
    dtype = torch.bfloat16
    grid = [(n, k, w, 2) for n in (1, 2, 4, 8, 16) for k in (256, 512, 1024, 2048) for w in (2, 4, 8)
            if 8 <= n * k // (32 * w) <= 64]
    hidden = torch.randn(1, 2560, device="cuda", dtype=dtype) * 3
    norm_weight = torch.randn(2560, device="cuda", dtype=dtype)
    for name, n, k in (("layer_in", 17920, 2560), ("layer_out", 2560, 12800)):
        production = decoding.one_row_blocks(k, dtype, norm=name == "layer_in")
        configs = grid + [(*production[:3], s) for s in (1, 3, 4) if (*production[:3], s) not in grid]
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(LAYERS)]
        bs = [torch.randn(n, device="cuda", dtype=dtype) for _ in range(LAYERS)]
        y = torch.empty(1, n, device="cuda", dtype=dtype)
        mb = n * k * dtype.itemsize / 1e6
        sums = torch.randn(n, device="cuda")
        ff = torch.randn(1, 10240, device="cuda", dtype=dtype)
        attention = torch.randn(1, 2560, device="cuda", dtype=dtype)
        fused = dict(norm=(norm_weight, sums), gelu_from=7680) if name == "layer_in" else dict(x2=ff, res=hidden)
        x = hidden if name == "layer_in" else attention
        results = fused_times(f"{name}:", ws, bs, x, y, fused, mb, configs)
        print(f"BEST {name} ({mb:.0f} MB; production {production}):", flush=True)
        for us, cfg in sorted(results)[:10]:
            print(f"BEST {name}: {cfg} {us:.1f} us = {mb / us:.2f} TB/s", flush=True)
        ws = bs = None
        torch.cuda.empty_cache()


def main():
    torch.manual_seed(0)
    if sys.argv[1:2] == ["sweep"]:
        sweep()
        return
    if sys.argv[1:2] == ["layer"]:
        for dtype in (torch.bfloat16, torch.float32):
            layer(dtype)
        return
    dtype = torch.float32 if sys.argv[1:] == ["fp32"] else torch.bfloat16
    configs = [(8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 8, 3), (32, 256, 8, 3), (4, 1024, 4, 3),
               (8, 1024, 8, 2), (2, 2048, 4, 2), (16, 1024, 8, 2)]
    if dtype == torch.float32:  # same bytes a block as bf16's, or half
        configs += [(4, 512, 4, 3), (8, 256, 4, 4), (2, 1024, 4, 2), (8, 512, 8, 2), (1, 2048, 4, 2)]
    for name, n, k in (("[q; k; v; fc1]", 17920, 2560), ("[dense | fc2]", 2560, 12800), ("lm_head", 51200, 2560)):
        layers = LAYERS if name != "lm_head" else 8
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(layers)]
        bs = [torch.randn(n, device="cuda", dtype=dtype) for _ in range(layers)]
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        y = torch.empty(1, n, device="cuda", dtype=dtype)
        mb = n * k * dtype.itemsize / 1e6
        ref = F.linear(x, ws[0], bs[0])

        def cublas():
            for w, b in zip(ws, bs):
                y.copy_(F.linear(x, w, b))
        us = timed(cublas) * LAYERS / layers
        print(f"ROW {name} {n}x{k} ({mb:.0f} MB): cuBLAS {us:.1f} us = {mb / us:.2f} TB/s", flush=True)
        for cfg in configs:
            try:
                gemv(ws[0], x, bs[0], y, *cfg)
                err = float((y.float() - ref.float()).abs().max())

                def tri():
                    for w, b in zip(ws, bs):
                        gemv(w, x, b, y, *cfg)
                us = timed(tri) * LAYERS / layers
                print(f"ROW {name}: triton {cfg} {us:.1f} us = {mb / us:.2f} TB/s (max diff {err:.3g})", flush=True)
            except Exception as e:  # a configuration that does not compile or fit: skip it
                print(f"ROW {name}: triton {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        ws = bs = None  # free this shape's weights before the next
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

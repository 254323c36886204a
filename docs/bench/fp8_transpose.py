"""The backward's transposes of fp8 products' one-layout path (quantization.products fp8 without the second copy):
each 4-bit layer's e4m3 weight, kept (k, out) column-major, made (out, k) column-major in every backward, 192 a
Phi-2 step (32 layers x q, k, v, dense, fc1, fc2). GPU time of one step's 192, by way of making them:

- `aten`: `w.contiguous()` eagerly; `inductor`: the same compiled (what the compiled backward runs today);
- `triton bytes BRxBC/warps`: a tile of bytes a program, transposed in registers (tl.trans);
- `triton words BGxBW/warps`: 4 source rows x BW int32 words a program; each output word packs one column's bytes of
  4 rows (shifts and masks), so loads and stores are 4-byte words.

Timed as one CUDA graph of all 192 (no host time between them), replayed 20 times after 3, CUDA events; each way
checked byte for byte against ATen's. Run from the repo root on a CUDA GPU:

    python docs/bench/fp8_transpose.py

Log: docs/bench/h200-fp8-transpose-2026-11-30.log (inductor's 2.1 ms a step, the best Triton way 1.55 ms).
"""
import torch
import triton
import triton.language as tl

LAYERS = 32
SHAPES = {"q/k/v/dense": (2560, 2560, 4), "fc1": (2560, 10240, 1), "fc2": (10240, 2560, 1)}  # (k, out, per layer)


@triton.jit
def tile_transpose(src, dst, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """dst (C, R) = src (R, C).T for 1-byte elements; R, C multiples of the tile."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    tile = tl.load(src + r[:, None] * C + c[None, :])
    tl.store(dst + c[:, None] * R + r[None, :], tl.trans(tile))


@triton.jit
def word_transpose(src, dst, R, C, BG: tl.constexpr, BW: tl.constexpr):
    """The same through int32 words: src (R, C // 4) words -> dst (C, R // 4) words, a program taking 4 * BG rows
    and BW words (4 * BW columns); output word j of a source word packs byte j of 4 consecutive rows."""
    g = tl.program_id(0) * BG + tl.arange(0, BG)
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    cw, rw = C // 4, R // 4
    base = src + (4 * g)[:, None] * cw + w[None, :]
    a0 = tl.load(base)
    a1 = tl.load(base + cw)
    a2 = tl.load(base + 2 * cw)
    a3 = tl.load(base + 3 * cw)
    for j in tl.static_range(4):
        b = ((a0 >> (8 * j)) & 0xFF) | (((a1 >> (8 * j)) & 0xFF) << 8) | (((a2 >> (8 * j)) & 0xFF) << 16) \
            | (((a3 >> (8 * j)) & 0xFF) << 24)
        tl.store(dst + (4 * w + j)[:, None] * rw + g[None, :], tl.trans(b))


def bytes_way(br, bc, warps):
    def run(w):  # w: (k, out) column-major fp8 -> (k, out) row-major
        src = w.t().view(torch.uint8)  # (out, k) row-major
        R, C = src.shape
        out = src.new_empty(C, R)
        tile_transpose[(R // br, C // bc)](src, out, R, C, BR=br, BC=bc, num_warps=warps)
        return out.view(w.dtype)
    return run


def words_way(bg, bw, warps):
    def run(w):
        src = w.t().view(torch.uint8)
        R, C = src.shape
        out = src.new_empty(C, R)
        word_transpose[(R // 4 // bg, C // 4 // bw)](src.view(torch.int32), out.view(torch.int32), R, C,
                                                     BG=bg, BW=bw, num_warps=warps)
        return out.view(w.dtype)
    return run


def main() -> None:
    torch.manual_seed(0)
    weights = []
    for k, n, per_layer in SHAPES.values():
        for _ in range(LAYERS * per_layer):
            weights.append(torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t())  # (k, out) column-major
    ways = {"aten": lambda w: w.contiguous(), "inductor": torch.compile(lambda w: w.contiguous(), dynamic=False)}
    for br, bc, warps in ((64, 64, 4), (128, 128, 8), (64, 256, 8), (32, 128, 4)):
        ways[f"triton bytes {br}x{bc}/{warps}"] = bytes_way(br, bc, warps)
    for bg, bw, warps in ((32, 32, 4), (16, 64, 4), (32, 64, 8), (64, 32, 8), (64, 64, 8)):
        ways[f"triton words {bg}x{bw}/{warps}"] = words_way(bg, bw, warps)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{len(weights)} transposes, {sum(w.numel() for w in weights) / 2**30:.2f} GiB each way")
    print("| way | ms a step (192) | GB/s (read + write) | 2560x2560 ms | 2560x10240 ms |")
    print("| --- | --- | --- | --- | --- |")
    total_bytes = 2 * sum(w.numel() for w in weights)
    for name, way in ways.items():
        try:
            for w in weights[:: LAYERS]:
                assert torch.equal(way(w).view(torch.uint8), w.contiguous().view(torch.uint8)), name
            times = []
            for group in (weights, weights[:1], weights[4 * LAYERS:4 * LAYERS + 1]):
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = [way(w) for w in group]
                for _ in range(3):
                    graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 20)
                del outs, graph
            print(f"| {name} | {times[0]:.3f} | {total_bytes / times[0] / 1e6:.0f} | {times[1]:.4f} | {times[2]:.4f} |",
                  flush=True)
        except Exception as e:  # a tile that does not fit the GPU's shared memory, say: report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | |", flush=True)


if __name__ == "__main__":
    main()

"""The frozen 4-bit base's products of one Phi-2 training micro-batch (16,384 tokens), QLoRA's way against fp8's
(quantization.products): forward and input-gradient of each projection, on random NF4 weights, bf16 activations.

    python docs/bench/fp8_products.py        # from the repo root, on an fp8 GPU (Ada, Hopper and newer)

Rows: `qlora` = bitsandbytes' Linear4bit (dequantize + bf16 product, eager as in training: bitsandbytes' layers are
not compiled through); `fp8 both layouts` / `fp8 one layout` = quantization_utils' Fp8ProductsLinear4bit compiled
(the rounding to fp8 fused by inductor, as in training), keeping the backward's layout of the weight or transposing
it in each backward; `bf16 mm` / `fp8 mm` = the bare products (torch.mm, torch._scaled_mm with per-row scales, with
and without fast accumulation), for the rate each reaches. Then the transpose itself: ATen's copy, inductor's
compiled copy, and a Triton tile transpose (below; tried as the backward's transpose and dropped). Times per call,
CUDA events over 50 calls after 10.

Logs: docs/bench/h200-fp8-products-*-2026-11-30.log, made by earlier states of this script and of quantization_utils
(each log says which); this version, which measures the final code's two layouts side by side, has not run on a GPU.
"""
import sys

import bitsandbytes as bnb
import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from quantization_utils import Fp8ProductsLinear4bit, fp8_rows, use_fp8_products  # noqa: E402

TOKENS = 16384
SHAPES = {"q/k/v/dense": (2560, 2560), "fc1": (2560, 10240), "fc2": (10240, 2560)}  # (in, out)
BLOCK = 64


@triton.jit
def tile_transpose(src, dst, R, C, BLOCK: tl.constexpr):
    """dst (C, R) = src (R, C).T for 1-byte elements, one BLOCK x BLOCK tile a program."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = (r[:, None] < R) & (c[None, :] < C)
    tile = tl.load(src + r[:, None] * C + c[None, :], mask=inside)
    tl.store(dst + c[:, None] * R + r[None, :], tl.trans(tile), mask=tl.trans(inside))


def triton_other_layout(w: torch.Tensor) -> torch.Tensor:
    """(k, out) column-major fp8 -> (out, k) column-major, by tile_transpose."""
    src = w.t().view(torch.uint8)  # (out, k) row-major bytes
    rows, cols = src.shape
    out = src.new_empty(cols, rows)
    tile_transpose[(triton.cdiv(rows, BLOCK), triton.cdiv(cols, BLOCK))](src, out, rows, cols, BLOCK=BLOCK)
    return out.view(w.dtype).t()


def timed(fn, calls: int = 50) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls  # ms


def layer(k: int, n: int) -> torch.nn.Module:
    q = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    q = q.to(torch.bfloat16).cuda()  # quantizes its random initial weight
    q.weight.requires_grad_(False)
    q.bias.requires_grad_(False)
    return q


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}, "
          f"{TOKENS} tokens")
    transposes = {}
    print("| product | path | forward ms | input grad ms | forward TFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, (k, n) in SHAPES.items():
        flop = 2 * TOKENS * k * n
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
        paths = {"qlora": layer(k, n)}
        for both in (True, False):
            fp8 = layer(k, n)
            use_fp8_products(fp8, both_layouts=both)
            assert isinstance(fp8, Fp8ProductsLinear4bit)
            paths[f"fp8 {'both layouts' if both else 'one layout'}"] = torch.compile(fp8)
        for label, module in paths.items():
            fwd = timed(lambda: module(x.detach()))
            both = timed(lambda: torch.autograd.grad(module(x), x, dy))
            print(f"| {name} | {label} | {fwd:.3f} | {both - fwd:.3f} | {flop / fwd / 1e9:.0f} |")
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        mm = timed(lambda: x.detach() @ w.t())
        print(f"| {name} | bf16 mm | {mm:.3f} | | {flop / mm / 1e9:.0f} |")
        xq, xs = fp8_rows(x.detach())
        wq, ws = fp8_rows(w)
        for fast in (False, True):
            t = timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1),
                                               out_dtype=torch.bfloat16, use_fast_accum=fast))
            print(f"| {name} | fp8 mm{' fast accum' if fast else ''} | {t:.3f} | | {flop / t / 1e9:.0f} |")
        transposes[name] = wq.t()  # (k, out) column-major, as the layer keeps it
    print("\n| weight (k x out) | ATen copy ms | inductor copy ms | Triton tiles ms | Triton GB/s |")
    print("| --- | --- | --- | --- | --- |")
    compiled_copy = torch.compile(lambda w: w.contiguous())
    for name, w in transposes.items():
        aten, inductor, tiles = (timed(lambda: fn(w)) for fn in (lambda w: w.contiguous(), compiled_copy,
                                                                  triton_other_layout))
        assert torch.equal(triton_other_layout(w).float(), w.contiguous().t().float())
        print(f"| {name} {tuple(w.shape)} | {aten:.3f} | {inductor:.3f} | {tiles:.3f} | "
              f"{2 * w.numel() / tiles / 1e6:.0f} |")


if __name__ == "__main__":
    main()

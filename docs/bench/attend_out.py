"""Issue 18: the attention and the layer's output product in one launch (decoding.attend_out), against the layer's
kernels one after another.

32 layers of Phi-2's one-row decode-step kernels chained as in the step (each layer its own weights, no L2 reuse),
one CUDA graph, us a layer from 200 replays; the cache holds 65 used slots of 512 (the 64-token prompt and the new
one), or N with `used N`. bf16, then fp32: before = layer_in -> decode_step_attention -> layer_out (the step until
this change); after = layer_in -> attend_out. Then attend_out's product blocks (decoding.ATTEND_OUT_BLOCKS) swept.
The chain's output after is compared with before's (the same sums, in another order).

    python docs/bench/attend_out.py [used 300]     # from the repo root, on a CUDA GPU

Output of the 2026-11-30 H200 run: docs/bench/h200-attend-out-2026-11-30.log. That run swept the blocks through
one_row_blocks (the production value then was layer_out's (8, 1024, 8, 2)) and had a `rows` mode: 8 rows, before =
layer norm -> Triton rows kernel [q; k; v; fc1] -> decode_step_attention -> gelu -> cuBLAS [dense | fc2] + residual,
after = the rows kernel with gelu inside -> attend_out with a rows-kernel product; after was slower at every launch
tried (101-149 against 69.3 us a layer) and that code was not kept.
"""
import sys
import time

sys.path.insert(0, ".")
import torch  # noqa: E402

import decoding  # noqa: E402
from decoding import decode_layout, norm_folded  # noqa: E402

LAYERS, HIDDEN, QKV, FF, HEADS, DIM, SIZE = 32, 2560, 7680, 10240, 32, 80, 512
USED = int(sys.argv[sys.argv.index("used") + 1]) if "used" in sys.argv else 65


def layers(dtype, rows):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    made = []
    for _ in range(LAYERS):
        w_in, b_in, norm_w, norm_b = randn(QKV + FF, HIDDEN, scale=HIDDEN ** -0.5), randn(QKV + FF), randn(HIDDEN), \
            randn(HIDDEN)
        sums, folded = norm_folded(w_in, b_in, norm_w, norm_b)
        made.append(dict(w_in=w_in, b_in=b_in, norm_w=norm_w, norm_b=norm_b, sums=sums, folded=folded,
                         w_out=randn(HIDDEN, HIDDEN + FF, scale=(HIDDEN + FF) ** -0.5), b_out=randn(HIDDEN),
                         keys=randn(rows, SIZE, HEADS, DIM), values=randn(rows, SIZE, HEADS, DIM),
                         counts=torch.zeros(rows * HEADS, dtype=torch.int32, device="cuda"),
                         sync=torch.zeros(3, dtype=torch.int32, device="cuda")))
    angle = torch.randn(rows, 1, 16, generator=gen, device="cuda")
    cos, sin = (torch.cat((f(angle), f(angle)), -1).to(dtype) for f in (torch.cos, torch.sin))
    layout = decode_layout(torch.zeros(rows, device="cuda"), torch.full((rows,), USED, device="cuda"), SIZE)
    return made, cos, sin, layout, randn(rows, 1, HIDDEN, scale=3) + 1


def one_before(h, L, cos, sin, layout):
    y = torch.ops.phi2_qlora.layer_in(h, L["norm_w"], L["sums"], 1e-5, L["w_in"], L["folded"], QKV)
    q, k, v, ff = y.split([HIDDEN] * 3 + [FF], -1)
    out = torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, L["keys"], L["values"], layout, DIM ** -0.5,
                                                     L["counts"])
    return torch.ops.phi2_qlora.layer_out(out, ff, L["w_out"], L["b_out"], h)


def one_after(h, L, cos, sin, layout):
    y = torch.ops.phi2_qlora.layer_in(h, L["norm_w"], L["sums"], 1e-5, L["w_in"], L["folded"], QKV)
    q, k, v, ff = y.split([HIDDEN] * 3 + [FF], -1)
    return torch.ops.phi2_qlora.attend_out(q, k, v, cos, sin, L["keys"], L["values"], layout, DIM ** -0.5,
                                           L["counts"], L["sync"], ff, L["w_out"], L["b_out"], h)


def timed(layer, made, cos, sin, layout, h0, label):
    """us a layer of the 32-layer chain replayed as one CUDA graph; the chain's output."""
    def chain():
        h = h0
        for L in made:
            h = layer(h, L, cos, sin, layout)
        return h
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            chain()  # Triton compiles, outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    us = (time.perf_counter() - t0) / 200 / LAYERS * 1e6
    left = sum(int(L["sync"].abs().sum()) + int(L["counts"].abs().sum()) for L in made)
    print(f"ROW {label}: {us:.2f} us a layer ({us * LAYERS / 1e3:.3f} ms for 32){'' if not left else ' COUNTS LEFT'}",
          flush=True)
    return out.clone()


def compare(got, ref):
    print(f"  max |after - before| {(got.float() - ref.float()).abs().max().item():.3g} of "
          f"{ref.float().abs().max().item():.3g}", flush=True)


def attempt(*args):
    try:
        return timed(*args)
    except Exception as e:  # a launch that does not fit (shared memory, registers)
        print(f"ROW {args[-1]}: failed {type(e).__name__}: {e}"[:300], flush=True)


def main():
    decoding.triton_layer_products()
    decoding.triton_decode_attention()
    decoding.triton_gemv()
    print(f"{USED} used slots of {SIZE}", flush=True)
    production = decoding.ATTEND_OUT_BLOCKS
    for dtype in (torch.bfloat16, torch.float32):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        made, cos, sin, layout, h = layers(dtype, 1)
        ref = timed(one_before, made, cos, sin, layout, h, f"{name} one row, before (layer_in, attention, out)")
        compare(timed(one_after, made, cos, sin, layout, h, f"{name} one row, after (layer_in, attend_out)"), ref)
        for blocks in ((8, 1024, 8, 2), (4, 1024, 8, 2), (8, 512, 8, 3), (4, 512, 4, 3), (2, 1024, 4, 2),
                       (8, 1024, 4, 2), (16, 512, 8, 2), (4, 256, 4, 4), (2, 512, 4, 3)):
            decoding.ATTEND_OUT_BLOCKS = blocks
            attempt(one_after, made, cos, sin, layout, h, f"{name} one row, attend_out blocks {blocks}")
        decoding.ATTEND_OUT_BLOCKS = production
        del made
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

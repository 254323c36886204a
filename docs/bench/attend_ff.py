"""Issue 18: the attention and fc1's product in one launch (decoding.attend_ff), against the layer as it was.

32 layers of Phi-2's decode-step kernels chained as in the step (each layer its own weights, no L2 reuse), one CUDA
graph, us a layer from 200 replays; the cache holds 65 used slots of 512 (the 64-token prompt and the new one).
- `one` (bf16, then fp32), one row: before = layer_in ([q; k; v; fc1], layer norm, gelu) -> decode_step_attention
  -> layer_out; after = layer_in ([q; k; v]) -> attend_ff (the attention, fc1 through gelu) -> layer_out. Then the
  launch blocks of attend_ff's product and of layer_in's [q; k; v] (decoding.one_row_blocks) swept.
- `rows` (bf16), 8 rows: before = layer norm -> rows kernel [q; k; v; fc1] -> decode_step_attention -> gelu ->
  cuBLAS [dense | fc2] + residual; after = layer norm -> rows kernel [q; k; v] -> attend_ff -> cuBLAS + residual.
  Then decoding.ROWS_BLOCKS swept. (The real 8-row step is compiled by inductor; this chain runs the same ops
  eagerly under the graph.)
Outputs of after are compared with before's (the same sums, in another grouping).

    python docs/bench/attend_ff.py one rows        # from the repo root, on a CUDA GPU, at commit aecc5c3
Output of the 2026-11-30 H200 run: docs/bench/h200-attend-ff-2026-11-30.log. attend_ff did not help and was replaced
by attend_out in the next commit (docs/bench/attend_out.py); this script needs aecc5c3's decoding.py.
"""
import sys
import time

sys.path.insert(0, ".")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import decoding  # noqa: E402
from decoding import decode_layout, norm_folded  # noqa: E402

LAYERS, HIDDEN, QKV, FF, HEADS, DIM, SIZE, USED = 32, 2560, 7680, 10240, 32, 80, 512, 65


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
                         counts=torch.zeros(rows * HEADS, dtype=torch.int32, device="cuda")))
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
    y = torch.ops.phi2_qlora.layer_in(h, L["norm_w"], L["sums"][:QKV], 1e-5, L["w_in"][:QKV], L["folded"][:QKV], QKV)
    q, k, v = y.split(HIDDEN, -1)
    out, ff = torch.ops.phi2_qlora.attend_ff(q, k, v, cos, sin, L["keys"], L["values"], layout, DIM ** -0.5,
                                             L["counts"], h, L["w_in"][QKV:], L["folded"][QKV:], L["norm_w"],
                                             L["sums"][QKV:], 1e-5)
    return torch.ops.phi2_qlora.layer_out(out, ff, L["w_out"], L["b_out"], h)


def rows_before(h, L, cos, sin, layout):
    x = F.layer_norm(h, (HIDDEN,), L["norm_w"], L["norm_b"], 1e-5)
    q, k, v, ff = torch.ops.phi2_qlora.gemv(x, L["w_in"], L["b_in"]).split([HIDDEN] * 3 + [FF], -1)
    out = torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, L["keys"], L["values"], layout, DIM ** -0.5,
                                                     L["counts"])
    return F.linear(torch.cat((out, F.gelu(ff, approximate="tanh")), -1), L["w_out"], L["b_out"]) + h


def rows_after(h, L, cos, sin, layout):
    x = F.layer_norm(h, (HIDDEN,), L["norm_w"], L["norm_b"], 1e-5)
    q, k, v = torch.ops.phi2_qlora.gemv(x, L["w_in"][:QKV], L["b_in"][:QKV]).split(HIDDEN, -1)
    out, ff = torch.ops.phi2_qlora.attend_ff(q, k, v, cos, sin, L["keys"], L["values"], layout, DIM ** -0.5,
                                             L["counts"], x, L["w_in"][QKV:], L["b_in"][QKV:], None, None, 0.0)
    return F.linear(torch.cat((out, ff), -1), L["w_out"], L["b_out"]) + h


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
    print(f"ROW {label}: {us:.2f} us a layer ({us * LAYERS / 1e3:.3f} ms for 32)", flush=True)
    return out.clone()


def main():
    decoding.triton_layer_products()
    decoding.triton_decode_attention()
    decoding.triton_gemv()
    if "one" in sys.argv[1:]:
        production = decoding.one_row_blocks
        for dtype in (torch.bfloat16, torch.float32):
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            made, cos, sin, layout, h = layers(dtype, 1)
            ref = timed(one_before, made, cos, sin, layout, h, f"{name} one row, before (layer_in, attention, out)")
            got = timed(one_after, made, cos, sin, layout, h, f"{name} one row, after (qkv, attend_ff, out)")
            print(f"  max |after - before| {(got.float() - ref.float()).abs().max().item():.3g} of "
                  f"{ref.float().abs().max().item():.3g}", flush=True)
            for which in ("attend_ff", "qkv"):
                for blocks in ((8, 256, 4, 4), (4, 256, 4, 4), (16, 256, 4, 4), (8, 512, 4, 2), (8, 256, 8, 4),
                               (4, 512, 4, 3), (2, 1024, 4, 2), (8, 128, 4, 4)):
                    state = {"in attend_ff": False}

                    def pick(k, dtype, norm=False, blocks=blocks, which=which, state=state):
                        ours = norm and (state["in attend_ff"] == (which == "attend_ff"))
                        return blocks if ours else production(k, dtype, norm)

                    def layer(h, L, cos, sin, layout, state=state):
                        y = torch.ops.phi2_qlora.layer_in(h, L["norm_w"], L["sums"][:QKV], 1e-5, L["w_in"][:QKV],
                                                          L["folded"][:QKV], QKV)
                        q, k, v = y.split(HIDDEN, -1)
                        state["in attend_ff"] = True
                        out, ff = torch.ops.phi2_qlora.attend_ff(q, k, v, cos, sin, L["keys"], L["values"], layout,
                                                                 DIM ** -0.5, L["counts"], h, L["w_in"][QKV:],
                                                                 L["folded"][QKV:], L["norm_w"], L["sums"][QKV:],
                                                                 1e-5)
                        state["in attend_ff"] = False
                        return torch.ops.phi2_qlora.layer_out(out, ff, L["w_out"], L["b_out"], h)

                    decoding.one_row_blocks = pick
                    try:
                        timed(layer, made, cos, sin, layout, h, f"{name} one row, {which} blocks {blocks}")
                    except Exception as e:  # a launch that does not fit (shared memory, registers)
                        print(f"ROW {name} one row, {which} blocks {blocks}: failed {type(e).__name__}: {e}"[:300])
                    decoding.one_row_blocks = production
            del made
            torch.cuda.empty_cache()
    if "rows" in sys.argv[1:]:
        made, cos, sin, layout, h = layers(torch.bfloat16, 8)
        ref = timed(rows_before, made, cos, sin, layout, h, "bf16 8 rows, before (rows [q; k; v; fc1], attention)")
        got = timed(rows_after, made, cos, sin, layout, h, "bf16 8 rows, after (rows [q; k; v], attend_ff)")
        print(f"  max |after - before| {(got.float() - ref.float()).abs().max().item():.3g} of "
              f"{ref.float().abs().max().item():.3g}", flush=True)
        production = decoding.ROWS_BLOCKS
        for blocks in ((32, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
                       (32, 128, 8, 4), (16, 512, 4, 2)):
            decoding.ROWS_BLOCKS = blocks
            try:
                timed(rows_after, made, cos, sin, layout, h, f"bf16 8 rows, after, ROWS_BLOCKS {blocks}")
            except Exception as e:
                print(f"ROW bf16 8 rows, ROWS_BLOCKS {blocks}: failed {type(e).__name__}: {e}"[:300])
        decoding.ROWS_BLOCKS = production


if __name__ == "__main__":
    main()

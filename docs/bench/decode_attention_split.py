"""Decode attention alone (one query a row, Phi-2's 32 heads of 80): the kernels a decode step can attend with.

- "cuDNN, whole cache": what batches ran before the split kernel: SDPA (PyTorch picks cuDNN on an H200) over every
  row's whole head-major cache, the unused slots masked;
- "flash, own slots": PyTorch's FlashAttention-2 varlen kernel over each row's used slots (batch 1 before);
- "split (S, n, w, stages)": decoding.split_attention: blocks of S slots, each walked n slots at a time, w warps
  (decoding.SPLIT_CONFIGS holds the chosen ones), on the token-major cache and on a head-major one;
- fp32: "products, whole cache" (fp32 batch 1 before: two batched products and a softmax, masked) and split.

As in the real step, 32 layers' caches are read in turn (no L2 reuse), the 32 calls captured in one CUDA graph.
"useful" bandwidth counts only the keys and values of the used slots.

    python docs/bench/decode_attention_split.py      # from the repo root, on a CUDA GPU
"""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from decoding import decode_attention, decode_layout, split_attention  # noqa: E402
from gemv_triton import LAYERS, timed  # noqa: E402  (microseconds a layer, from a CUDA graph of 32 calls)

HEADS, DIM = 32, 80
# (slots a program, slots a step of its walk, warps, stages): decoding.SPLIT_CONFIGS' entries come from these
CONFIGS = [(32, 32, 1, 1), (32, 32, 2, 1), (64, 64, 2, 1), (32, 16, 2, 2), (64, 16, 2, 3), (128, 16, 2, 3),
           (64, 8, 1, 3), (128, 8, 1, 3), (128, 8, 1, 4), (128, 4, 1, 3), (256, 8, 1, 3)]


def split(q, keys, values, layout, out, config):
    out.copy_(split_attention(q, keys, values, layout, DIM ** -0.5, config))


def case(dtype, batch, size, used):
    torch.manual_seed(0)
    token_major = [(torch.randn(batch, size, HEADS, DIM, device="cuda", dtype=dtype),
                    torch.randn(batch, size, HEADS, DIM, device="cuda", dtype=dtype)) for _ in range(LAYERS)]
    q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=dtype)
    layout = decode_layout(torch.zeros(batch, device="cuda"), torch.full((batch,), used, device="cuda"), size)
    reference = decode_attention(q.float(), token_major[0][0].float(), token_major[0][1].float(), layout,
                                 DIM ** -0.5, "products")
    mb = batch * used * HEADS * DIM * 2 * dtype.itemsize / 1e6
    label = f"{str(dtype)[6:]} b{batch} {used}/{size} slots ({mb:.1f} MB used a layer)"
    out = torch.empty(batch, 1, HEADS * DIM, device="cuda", dtype=dtype)

    def report(name, fn):
        try:
            fn()
            err = float((out.float() - reference).abs().max())
            us = timed(lambda: [fn(i) for i in range(LAYERS)] and None)
            print(f"ROW {label}: {name} {us:.2f} us, useful {mb / us:.2f} TB/s (max diff {err:.2g})", flush=True)
        except Exception as e:  # a kernel that does not run for this shape: say so, go on
            print(f"ROW {label}: {name} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)

    if dtype != torch.float32:
        head_major = [(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for k, v in token_major]
        mask = (torch.arange(size, device="cuda") < used)[None, None, None].expand(batch, 1, 1, size)
        report("cuDNN, whole cache", lambda i=0: out.copy_(F.scaled_dot_product_attention(
            q, *head_major[i], attn_mask=mask, scale=DIM ** -0.5).transpose(1, 2).reshape(batch, 1, -1)))
        head_major = None
        report("flash, own slots", lambda i=0: out.copy_(decode_attention(q, *token_major[i], layout, DIM ** -0.5,
                                                                          "flash")))
    else:
        report("products, own slots masked over the whole cache", lambda i=0: out.copy_(
            decode_attention(q, *token_major[i], layout, DIM ** -0.5, "products")))
    for config in CONFIGS:
        report(f"split {config}", lambda i=0: split(q, *token_major[i], layout, out, config))
    token_major = [(k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2))
                   for k, v in token_major]  # the same keys and values, stored head-major (StaticCache's layout)
    for config in CONFIGS:
        report(f"split head-major {config}", lambda i=0: split(q, *token_major[i], layout, out, config))
    token_major = None
    torch.cuda.empty_cache()


def main():
    for batch, size in ((1, 512), (8, 512), (64, 384)):
        for used in (65, 192, 320):
            case(torch.bfloat16, batch, size, used)
    for used in (65, 320):
        case(torch.float32, 1, 512, used)


if __name__ == "__main__":
    main()

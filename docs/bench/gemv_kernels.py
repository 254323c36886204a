"""Matrix-vector products of the fused decode step (batch 1) on their own: cuBLAS (F.linear) against inductor's
reduction kernel for (x * W).sum(-1), in bf16 and fp32 (fp32 also with TF32 matmuls). L2 is flushed between
calls (triton's do_bench), as in the real step where 5 GB of weights stream through a 60 MB L2.

    python docs/bench/gemv_kernels.py     # from the repo root, on a CUDA GPU
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = {"q+k+v+fc1": (17920, 2560), "dense|fc2": (2560, 12800), "lm_head": (51200, 2560)}


def reduction(x, w, b):
    return (x[:, None, :] * w).sum(-1) + b  # (1, out); inductor reads w once, row by row


for dtype in (torch.bfloat16, torch.float32):
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=dtype)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        gb = w.numel() * w.element_size() / 1e9
        ref = F.linear(x.double(), w.double(), b.double())
        for label in ("cublas", "inductor-reduction", "inductor-reduction-tuned"):
            torch._dynamo.reset()  # each variant compiles afresh, with its own setting
            torch._inductor.config.coordinate_descent_tuning = label.endswith("tuned")
            fn = F.linear if label == "cublas" else torch.compile(reduction)
            err = float((fn(x, w, b).double() - ref).abs().max())
            us = do_bench(lambda: fn(x, w, b), warmup=25, rep=200) * 1e3
            print(f"ROW {str(dtype)[6:]:8} {name:10} {label:25} {us:7.1f} us {gb / us * 1e6:6.0f} GB/s  "
                  f"max err {err:.2e}", flush=True)
        if dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True
            us = do_bench(lambda: F.linear(x, w, b), warmup=25, rep=200) * 1e3
            err = float((F.linear(x, w, b).double() - ref).abs().max())
            torch.backends.cuda.matmul.allow_tf32 = False
            print(f"ROW {'float32':8} {name:10} {'cublas-tf32':25} {us:7.1f} us {gb / us * 1e6:6.0f} GB/s  "
                  f"max err {err:.2e}", flush=True)

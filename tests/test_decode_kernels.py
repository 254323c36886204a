"""decode_kernels.py: the Triton kernels against a reference, through Triton's interpreter on the CPU (CI) and on
a GPU (marked gpu)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

import decode_kernels
import decoding
import phi_layers
from config import GenerationSettings
from data_utils import HUMAN
from decoding import FastDecoder
from doubles import ARGMAX, GREEDY, limited
from inference import ChatModel
from phi_layers import FEW_ROWS, decode_attention, decode_kernel, decode_layout, triton_supported
from conftest import TINY, run_script


def loud_cache(batch: int, device: str, heads: int = 32, size: int = 384):
    """A token-major cache (heads of 80, Phi-2's) of `size` slots a row whose rows sit at different places in
    their first 384: row i's slots are [starts[i], starts[i] + used[i]); every other slot holds keys 30 times
    larger, which would show if read. Returns q, keys, values, starts, used."""
    dim = 80
    gen = torch.Generator(device=device).manual_seed(0)
    keys, values = (torch.randn(batch, size, heads, dim, generator=gen, device=device) * 30 for _ in range(2))
    starts = torch.tensor(([37, 17, 200, 5, 100, 0, 64] * 3)[:batch], device=device)
    used = torch.tensor(([300, 9, 184, 1, 250, 384, 65] * 3)[:batch], device=device)  # one slot, one block, or many
    slot = torch.arange(size, device=device)[None]
    inside = ((slot >= starts[:, None]) & (slot < (starts + used)[:, None]))[:, :, None, None]  # (b, cache, 1, 1)
    keys = torch.where(inside, keys / 30, keys)  # out-of-row slots stay loud
    q = torch.randn(batch, heads, 1, dim, generator=gen, device=device)
    return q, keys, values, starts, used


def near(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    """Every element within `tolerance` of the largest expected magnitude."""
    return bool((got.double() - expected.double()).abs().max() < tolerance * expected.double().abs().max())


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' partial rotary (apply_rotary_pos_emb) of x (batch, 1, heads * dim) -> (batch, heads, 1, dim)."""
    x = x.reshape(x.shape[0], 1, heads, -1).transpose(1, 2)
    r = cos.shape[-1]
    turned, _ = apply_rotary_pos_emb(x[..., :r], x[..., :r], cos, sin)
    return torch.cat((turned, x[..., r:]), dim=-1)


def step_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, used: torch.Tensor):
    """What decode_step_attention computes, from transformers' rotary and the reference products: q, k_new, v_new
    (batch, 1, heads * dim); returns the attention (batch, 1, heads * dim) and the cache with the step's key and
    value written to each row's newest slot, start + used - 1."""
    batch, size, heads, dim = keys.shape
    keys, values = keys.clone(), values.clone()
    newest = starts + used - 1
    keys[torch.arange(batch), newest] = rotated(k_new, cos, sin, heads)[:, :, 0]
    values[torch.arange(batch), newest] = v_new.reshape(batch, heads, dim)
    out = decode_attention(rotated(q, cos, sin, heads), keys, values, decode_layout(starts, used, size), dim ** -0.5,
                           "products")
    return out, keys, values

@pytest.mark.slow
def test_triton_kernels_compute_the_reference_in_the_interpreter(tmp_path, tokenizer):
    """The decode step's Triton kernels run on the CPU through Triton's interpreter, in a fresh process
    (TRITON_INTERPRET=1 must be set before Triton builds them), against reference products:
    - split attention with each launch SPLIT_CONFIGS uses, on token- and head-major caches, each row reading only
      its own slots of loud_cache (and of the same rows in a 2,048-slot cache, whose walking launch reads longer
      blocks); and with the step's own key and value (rotary on q and k, both written to each
      row's newest slot, nothing else of the cache touched; the blocks combined inside the first kernel, its
      arrival counts left at zero);
    - attend_out, one row: that step attention and, in the same launch, the layer's output product of it (the
      product waiting for the attention's programs), its counts left at zero;
    - the GEMV for one row and for a few; the fused layer's layer_in (layer norm, product, gelu on fc1's rows) and
      layer_out (two inputs, product, residual);
    - the tiny model's greedy decoding through those kernels (fp32 one row: layer_in, the step attention, layer_out,
      with and without the greedy loop; three left-padded rows: the split attention) and in fp16 (one row: layer_in
      and attend_out; three rows: the rows kernel and the step attention): the tokens and logits of the CPU's path.
    The GPU tests below run the same kernels compiled. Tolerance: bf16 rounding of inputs and outputs; fp32 sums
    in another order."""
    q, keys, values, starts, used = loud_cache(5, "cpu", heads=4)
    batch, heads, _, dim = q.shape
    size = keys.shape[1]
    layout = decode_layout(starts, used, size)
    gen = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(1000, 333, generator=gen) / 333 ** 0.5, torch.randn(1000, generator=gen), \
        torch.randn(3, 1, 333, generator=gen)
    # a few rows in fp16: Triton 3.7's interpreter computes tl.dot wrongly in bf16 (off by ~1e10 on a 16 x 16
    # product; fp16 and fp32 exact); the GPU test runs bf16
    cases = [(1, torch.float32), (1, torch.bfloat16), (3, torch.float16)]
    k_new, v_new = (torch.randn(batch, 1, heads * dim, generator=gen) for _ in range(2))
    angle = torch.randn(batch, 1, 16, generator=gen) * 3
    cos, sin = torch.cat((angle.cos(), angle.cos()), -1), torch.cat((angle.sin(), angle.sin()), -1)  # 32 rotary dims
    hidden = torch.randn(1, 1, 96, generator=gen) * 3 + 1  # a residual stream: not centred
    layer = {"hidden": hidden, "norm weight": torch.randn(96, generator=gen),
             "norm bias": torch.randn(96, generator=gen),
             "w in": torch.randn(200, 96, generator=gen) / 10, "b in": torch.randn(200, generator=gen),
             "attention": torch.randn(1, 1, 40, generator=gen), "ff": torch.randn(1, 1, 56, generator=gen),
             "w out": torch.randn(96, 96, generator=gen) / 10, "b out": torch.randn(96, generator=gen)}
    prompts = [torch.randint(1, len(tokenizer), (rows, 12), generator=gen) for rows in (1, 3)]
    prompts = [(ids, torch.ones_like(ids).index_fill_(1, torch.arange(4), 0) if len(ids) > 1 else torch.ones_like(ids))
               for ids in prompts]  # three rows: two of them left-padded
    # attend_out, one row: [attention | ff] (the attention: 4 heads of 80) through a weight, plus the residual
    out_product = {"ff": torch.randn(1, 1, 56, generator=gen), "w": torch.randn(96, 320 + 56, generator=gen) / 20,
                   "b": torch.randn(96, generator=gen), "hidden": torch.randn(1, 1, 96, generator=gen)}
    torch.save({"q": q, "keys": keys, "values": values, "layout": layout, "scale": dim ** -0.5, "gemv w": w,
                "gemv b": b, "gemv x": x, "gemv cases": cases, "k new": k_new, "v new": v_new, "cos": cos,
                "sin": sin, **{f"layer {k}": t for k, t in layer.items()}, "gelu from": 120, "model": str(TINY),
                **{f"out {k}": t for k, t in out_product.items()}, "starts": starts, "used": used, "prompts": prompts,
                "greedy": {"max_new_tokens": 8, "temperature": 0.0, "repetition_penalty": 1.0},
                # a pool: the rows in the order 1, 4, 3, 0, 2, each at a start of its own, not its region's
                "pool starts": torch.tensor([400, 0, 1000, 300, 10])},
               tmp_path / "in.pt")
    run_script("tests/kernel_probe.py", str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
               env={"TRITON_INTERPRET": "1"})
    out = torch.load(tmp_path / "out.pt")

    reference = decode_attention(q, keys, values, layout, dim ** -0.5, "products")
    attention = [k for k in out if k.startswith("split")] + ["op"]
    assert len(attention) == 3 * len(set(decode_kernels.SPLIT_CONFIGS.values())) + 1
    for name in attention:
        assert out[name].shape == (5, 1, 4 * dim)
        assert near(out[name], reference, 0.02 if "bf16" in name else 1e-5), name
    assert near(out["long cache split"], reference, 1e-5)  # the same rows in 2,048 slots: 4 blocks of 512
    # the same rows anywhere in a pool (BatchDecoder's): every launch, the op and the CPU's products read each
    # row's slots from its flat start, nothing else; the step writes its key and value at start + used - 1 there
    pooled = [k for k in out if k.startswith("pool split")] + ["pool op", "pool products"]
    assert len(pooled) == len(set(decode_kernels.SPLIT_CONFIGS.values())) + 2
    for name in pooled:
        assert near(out[name], reference, 1e-5), name
    got, got_keys, got_values, pool_keys, pool_values = out["pool step"]
    expected, written_keys, written_values = step_reference(q.transpose(1, 2).reshape(batch, 1, -1), k_new, v_new,
                                                            cos, sin, keys, values, starts, used)
    assert near(got, expected, 1e-5)
    pool_newest = torch.tensor([400, 0, 1000, 300, 10]) + used - 1
    assert near(got_keys[0, pool_newest], written_keys[torch.arange(batch), starts + used - 1], 1e-5)
    assert near(got_values[0, pool_newest], written_values[torch.arange(batch), starts + used - 1], 1e-5)
    untouched = torch.ones(got_keys.shape[1], dtype=torch.bool).index_fill_(0, pool_newest, False)
    assert torch.equal(got_keys[0, untouched], pool_keys[0, untouched])  # no other slot written
    for rows, dtype in cases:
        expected = torch.nn.functional.linear(x[:rows].to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())
        y = out[f"gemv {rows} {dtype}"]
        assert y.shape == (rows, 1, 1000) and y.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 0.02
        assert ((y.double() - expected).abs().amax(-1) < tolerance * expected.abs().amax(-1)).all(), (rows, dtype)

    # the step's own key and value: rotated, written to slot start + used - 1 of each row, attended to
    expected, written_keys, written_values = step_reference(q.transpose(1, 2).reshape(batch, 1, -1), k_new, v_new,
                                                            cos, sin, keys, values, starts, used)
    newest = starts + used - 1
    steps = [k for k in out if k.startswith("step ")]
    assert len(steps) == 2 * len(set(decode_kernels.SPLIT_CONFIGS.values()))
    for name in steps:
        got, got_keys, got_values, counts = out[name]
        tolerance = 0.02 if "bfloat16" in name else 1e-5
        assert near(got, expected, tolerance), name
        assert near(got_keys, written_keys, tolerance) and near(got_values, written_values, tolerance), name
        assert not counts.any(), name  # the blocks' arrival counts are back to zero for the next step
        untouched = torch.ones(batch, size, dtype=torch.bool).index_put_((torch.arange(batch), newest),
                                                                         torch.tensor(False))
        dtype = got_keys.dtype
        assert torch.equal(got_keys[untouched], keys.to(dtype)[untouched]), name  # no other slot written
        assert torch.equal(got_values[untouched], values.to(dtype)[untouched]), name
    assert not near(expected, reference, 0.02)  # the new key and value matter: a kernel ignoring them fails

    # attend_out: the same step attention, then the layer's output product of it, from one launch
    F = torch.nn.functional  # noqa: N806
    for dtype in (torch.float32, torch.bfloat16):
        got, got_keys, got_values, counts, sync = out[f"attend_out {dtype}"]
        tolerance = 1e-5 if dtype == torch.float32 else 0.02
        attention, written_keys, written_values = step_reference(
            q[:1].transpose(1, 2).reshape(1, 1, -1).to(dtype).float(), k_new[:1].to(dtype).float(),
            v_new[:1].to(dtype).float(), cos[:1].to(dtype).float(), sin[:1].to(dtype).float(),
            keys[:1].to(dtype).float(), values[:1].to(dtype).float(), starts[:1], used[:1])
        t = {k: v.to(dtype).double() for k, v in out_product.items()}
        expected = F.linear(torch.cat((attention.to(dtype).double(), t["ff"]), -1), t["w"], t["b"]) + t["hidden"]
        assert got.shape == (1, 1, 96) and got.dtype == dtype and near(got, expected, tolerance), dtype
        assert near(got_keys, written_keys, tolerance) and near(got_values, written_values, tolerance)
        assert not counts.any() and not sync.any()  # ready for the next launch

    for dtype in (torch.float32, torch.bfloat16):
        tolerance = 1e-5 if dtype == torch.float32 else 0.02
        t = {k: v.to(dtype).double() for k, v in layer.items()}
        product = F.linear(F.layer_norm(t["hidden"], (96,), t["norm weight"], t["norm bias"], 1e-5), t["w in"],
                           t["b in"])
        expected = torch.cat((product[..., :120], F.gelu(product[..., 120:], approximate="tanh")), -1)
        assert out[f"layer_in {dtype}"].dtype == dtype and near(out[f"layer_in {dtype}"], expected, tolerance)
        expected = F.linear(torch.cat((t["attention"], t["ff"]), -1), t["w out"], t["b out"]) + t["hidden"]
        assert out[f"layer_out {dtype}"].dtype == dtype and near(out[f"layer_out {dtype}"], expected, tolerance)

    assert out["fused layers"]  # the tiny model's layers took the kernels' path
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    plain = FastDecoder(model, tokenizer, 512, HUMAN)
    plain.step, plain.greedy_step = model.__call__, decoding._greedy_step  # eager; the CPU's attention
    greedy = GenerationSettings(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
    with torch.inference_mode():
        for ids, mask in prompts:
            tokens, logits = plain.generate(ids, mask, limited(greedy, 8), ignore_eos=True, output_logits=True)
            got_tokens, got_logits = out[f"decoded {tuple(ids.shape)}"]
            assert got_tokens == tokens and (got_logits - logits).abs().max() < 1e-4, ids.shape
            assert out[f"greedy loop {tuple(ids.shape)}"] == tokens, ids.shape
    # fp16, against the CPU's path in fp16: one row through attend_out, three left-padded rows through the rows
    # kernel and the step attention
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float16).eval()
    plain = FastDecoder(model, tokenizer, 512, HUMAN)
    plain.step = model.__call__
    for ids, mask in prompts:
        with torch.inference_mode():
            tokens, logits = plain.generate(ids, mask, limited(greedy, 8), ignore_eos=True, output_logits=True)
        got_tokens, got_logits = out[f"decoded fp16 {tuple(ids.shape)}"]
        assert got_tokens == tokens and (got_logits - logits).abs().max() < 0.02 * logits.abs().max(), ids.shape


@pytest.mark.gpu
@pytest.mark.parametrize("batch, size", [(1, 384), (7, 384), (16, 384), (16, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_attention_kernels_read_each_rows_own_slots_on_gpu(batch, size, dtype):
    """The GPU decode attention kernels (Triton's split kernel; FlashAttention for bf16) against the reference
    products (fp32) on the same token-major cache (loud_cache): each row sees only its own slots, in one-step
    launches (up to 8 rows) and walking ones (16 rows; in 2,048 slots, the longer blocks of WALKED_SLOTS). Eager,
    and compiled as in the decode step (inductor calls the kernel itself). Tolerance: bf16 rounding of q, k, v and
    the output; fp32 sums in another order."""
    q, keys, values, starts, used = loud_cache(batch, "cuda", size=size)
    dim = q.shape[-1]
    layout = decode_layout(starts, used, size)
    kernels = ["split"] + (["flash"] if dtype == torch.bfloat16 else [])
    if decode_kernel(q.device, dtype) != "split":
        pytest.skip("needs Triton")
    reference = decode_attention(q, keys, values, layout, dim ** -0.5, "products")
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    for kernel in kernels:
        inputs = (q.to(dtype), keys.to(dtype), values.to(dtype), layout, dim ** -0.5, kernel)
        for out in (decode_attention(*inputs), torch.compile(decode_attention)(*inputs)):
            assert out.dtype == dtype and out.shape == (batch, 1, q.shape[1] * dim)
            assert (out.float() - reference).abs().max() < tolerance * reference.abs().max(), kernel
    wrong = decode_attention(q, keys, values, decode_layout(torch.zeros_like(starts), starts + used, size),
                             dim ** -0.5, "products")
    assert (wrong - reference).abs().max() > 0.2 * reference.abs().max()  # reading other slots shows


@pytest.mark.gpu
@pytest.mark.parametrize("rows, dtype", [(1, torch.bfloat16), (3, torch.bfloat16), (FEW_ROWS, torch.bfloat16),
                                         (1, torch.float32)], ids=["1-bf16", "3-bf16", f"{FEW_ROWS}-bf16", "1-fp32"])
def test_triton_gemv_is_the_linear_product_on_gpu(rows, dtype):
    """The decode-step products of the fused layers (decode_kernels.triton_gemv: one row, and a few users' rows; fp32
    models one row) against fp32 F.linear, both of Phi-2's fused shapes and a ragged one, in the compiled step too
    (inductor takes the op in); every row its own product. Tolerance: bf16 inputs and output; fp32 sums in
    another order."""
    if not triton_supported(torch.device("cuda"), dtype):
        pytest.skip("needs Triton and compute capability 8.0 or later")
    gemv = decode_kernels.triton_gemv()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((17920, 2560), (2560, 12800), (1000, 333)):
        w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
        b = torch.randn(n, generator=gen, device="cuda").to(dtype)
        x = torch.randn(rows, 1, k, generator=gen, device="cuda").to(dtype)
        expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
        for y in (gemv(x, w, b), torch.compile(gemv)(x, w, b)):
            assert y.shape == (rows, 1, n) and y.dtype == dtype
            tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
            assert ((y.double() - expected).abs().amax(-1) < tolerance * expected.abs().amax(-1)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_layer_kernels_compute_the_reference_on_gpu(dtype):
    """A one-row step's layer kernels at Phi-2's shapes (layer_in: layer norm, [q; k; v; fc1], gelu on fc1's rows;
    layer_out: [dense | fc2] of [attention | gelu(fc1)] plus the residual), the step attention with the step's
    own key and value (rotary, cache writes, the blocks combined in its first kernel; 1 and 7 rows of loud_cache)
    and attend_out (that attention of one row and the layer's output product in one launch), eager and
    compiled, three launches each: under inductor the attention op must still write the cache it was given, and
    every launch leaves its counts at zero for the next.
    Tolerance: bf16 rounding; fp32 sums in another order."""
    if not triton_supported(torch.device("cuda"), dtype):
        pytest.skip("needs Triton and compute capability 8.0 or later")
    layer_in, layer_out = decode_kernels.triton_layer_products()
    decode_kernels.triton_decode_attention()
    F = torch.nn.functional  # noqa: N806
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-4

    hidden, norm_w, norm_b = randn(1, 1, 2560, scale=3) + 1, randn(2560), randn(2560)
    w_in, b_in = randn(17920, 2560, scale=2560 ** -0.5), randn(17920)
    product = F.linear(F.layer_norm(hidden.double(), (2560,), norm_w.double(), norm_b.double(), 1e-5),
                       w_in.double(), b_in.double())
    expected = torch.cat((product[..., :7680], F.gelu(product[..., 7680:], approximate="tanh")), -1)
    sums, folded = phi_layers.norm_folded(w_in, b_in, norm_w, norm_b)
    for y in (layer_in(hidden, norm_w, sums, 1e-5, w_in, folded, 7680),
              torch.compile(layer_in)(hidden, norm_w, sums, 1e-5, w_in, folded, 7680)):
        assert y.dtype == dtype and y.shape == (1, 1, 17920) and near(y, expected, tolerance)
    attention, ff = randn(1, 1, 2560), randn(1, 1, 10240)
    w_out, b_out = randn(2560, 12800, scale=12800 ** -0.5), randn(2560)
    expected = F.linear(torch.cat((attention, ff), -1).double(), w_out.double(), b_out.double()) + hidden.double()
    for y in (layer_out(attention, ff, w_out, b_out, hidden), torch.compile(layer_out)(attention, ff, w_out, b_out,
                                                                                        hidden)):
        assert y.dtype == dtype and y.shape == (1, 1, 2560) and near(y, expected, tolerance)

    def step(q, k, v, cos, sin, keys, values, layout, counts):
        return torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, keys, values, layout, 80 ** -0.5,
                                                          keys.shape[1], counts)

    for batch in (1, 7):
        _, keys, values, starts, used = loud_cache(batch, "cuda")
        q, k, v, _ = randn(batch, 1, 3 * 2560 + 64).split([2560] * 3 + [64], -1)  # q, k, v share a row stride
        angle = torch.randn(batch, 1, 16, generator=gen, device="cuda") * 3
        cos, sin = (torch.cat((f(angle), f(angle)), -1).to(dtype) for f in (torch.cos, torch.sin))
        expected, written_keys, written_values = step_reference(q.float(), k.float(), v.float(), cos.float(),
                                                                sin.float(), keys, values, starts, used)
        counts = torch.zeros(batch * 32, dtype=torch.int32, device="cuda")  # the blocks' arrivals, kept at zero
        for run in (step, torch.compile(step)):
            for _ in range(3):  # the blocks combined inside the first kernel: each launch leaves the counts at zero
                cache_k, cache_v = keys.to(dtype), values.to(dtype)
                out = run(q, k, v, cos, sin, cache_k, cache_v, decode_layout(starts, used, keys.shape[1]), counts)
                assert out.dtype == dtype and out.shape == (batch, 1, 2560) and near(out, expected, tolerance)
                assert near(cache_k, written_keys, tolerance) and near(cache_v, written_values, tolerance)  # in place
                assert not counts.any()

    # attend_out: the same step attention of one row and, in the same launch, the layer's output ([dense | fc2] of
    # [attention | gelu(fc1)] plus the residual)
    def attend_out(q, k, v, cos, sin, keys, values, layout, counts, sync, ff):
        return torch.ops.phi2_qlora.attend_out(q, k, v, cos, sin, keys, values, layout, 80 ** -0.5, keys.shape[1],
                                               counts, sync, ff, w_out, b_out, residual)

    _, keys, values, starts, used = loud_cache(1, "cuda")
    q, k, v, ff = randn(1, 1, 3 * 2560 + 10240).split([2560] * 3 + [10240], -1)  # layer_in's output
    angle = torch.randn(1, 1, 16, generator=gen, device="cuda") * 3
    cos, sin = (torch.cat((f(angle), f(angle)), -1).to(dtype) for f in (torch.cos, torch.sin))
    attention, written_keys, written_values = step_reference(q.float(), k.float(), v.float(), cos.float(),
                                                             sin.float(), keys, values, starts, used)
    residual = randn(1, 1, 2560, scale=3) + 1
    expected = F.linear(torch.cat((attention.to(dtype), ff), -1).double(), w_out.double(), b_out.double()) + \
        residual.double()
    counts = torch.zeros(32, dtype=torch.int32, device="cuda")
    sync = torch.zeros(3, dtype=torch.int32, device="cuda")
    for run in (attend_out, torch.compile(attend_out)):
        for _ in range(3):
            cache_k, cache_v = keys.to(dtype), values.to(dtype)
            y = run(q, k, v, cos, sin, cache_k, cache_v, decode_layout(starts, used, keys.shape[1]), counts, sync, ff)
            assert y.dtype == dtype and y.shape == (1, 1, 2560) and near(y, expected, tolerance)
            assert near(cache_k, written_keys, tolerance) and near(cache_v, written_values, tolerance)
            assert not counts.any() and not sync.any()


@pytest.mark.gpu
def test_fast_path_through_the_layer_kernels_decodes_the_plain_tokens_on_gpu(tokenizer):
    """The compiled, CUDA-graphed fast path with the fused layers' Triton kernels (one row: three kernels a layer;
    the greedy token picked inside the step, with and without a repetition penalty; one row's prompt prefilled by a
    CUDA graph) against transformers' generate, fp32: the same greedy tokens, one row (prompts in turn: the loop's
    buffers reset; two lengths through one prefill graph, one through the next bucket's) and batched with left
    padding, the same logits within 1e-4."""
    if not triton_supported(torch.device("cuda"), torch.float32):
        pytest.skip("needs Triton and compute capability 8.0 or later")
    plain = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=False)
    fast = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=True)
    assert all(layer.step_kernels for layer in fast.model.model.layers)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, len(tokenizer), (n,), generator=rng).tolist() for n in (5, 17, 30, 70)]
    strong = dataclasses.replace(ARGMAX, repetition_penalty=1.8)
    for batch, gen in ((prompts[:1], ARGMAX), (prompts[1:2], ARGMAX), (prompts[:1], GREEDY), (prompts[1:2], strong),
                       (prompts[3:], ARGMAX), (prompts[:3], GREEDY)):
        assert fast.generate_ids(batch, limited(gen, 40), ignore_eos=True) == plain.generate_ids(batch, limited(gen, 40),
                                                                                       ignore_eos=True)
    assert any(loop.seen.any() for loop in fast._decoder._loops.values())  # one row: tokens picked inside the step
    prefills = fast._decoder._prefills
    assert sorted(bucket for bucket, _ in prefills) == [64, 128] and all(p.graph for p in prefills.values())
    ids, logits = fast.generate_with_logits(prompts[1:2], limited(GREEDY, 20))
    plain_ids, plain_logits = plain.generate_with_logits(prompts[1:2], limited(GREEDY, 20))
    assert ids == plain_ids and (logits - plain_logits).abs().max() < 1e-4


@pytest.mark.gpu
def test_fp16_steps_through_the_layer_kernels_decode_the_plain_tokens_on_gpu(tokenizer):
    """fp16, where one row's layer takes attend_out (the attention and the layer's output in one launch) and a few
    rows (BatchDecoder's users) the Triton rows kernel and the step attention: the compiled steps against
    transformers' generate in fp16, one row and left-padded rows of different lengths: the same greedy tokens, the
    logits within fp16 rounding."""
    if not triton_supported(torch.device("cuda"), torch.float16):
        pytest.skip("needs Triton and compute capability 8.0 or later")

    def model():
        return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float16).cuda()

    plain, fast = ChatModel(model(), tokenizer, fast=False), ChatModel(model(), tokenizer, fast=True)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, len(tokenizer), (n,), generator=rng).tolist() for n in (5, 17, 30)]
    for batch in (prompts[:1], prompts):
        ids, logits = fast.generate_with_logits(batch, limited(GREEDY, 20))
        plain_ids, plain_logits = plain.generate_with_logits(batch, limited(GREEDY, 20))
        assert ids == plain_ids and (logits - plain_logits).abs().max() < 0.02 * plain_logits.abs().max(), len(batch)
    # one row's greedy loop (its step compiled with the greedy token inside)
    assert fast.generate_ids(prompts[:1], limited(GREEDY, 20), ignore_eos=True) == plain.generate_ids(prompts[:1], limited(GREEDY, 20),
                                                                                           ignore_eos=True)

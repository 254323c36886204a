"""The decode step's Triton kernels and the PyTorch ops that run them (phi_layers.py decides where they are used).

- gemv_kernel / rows_kernel: y = W x + b for one row or a few rows, reading the weights once (triton_gemv), with a
  layer norm, a concatenation, gelu and a residual add done inside the one-row product (triton_layer_products);
- split_attention_kernel: one query a row against that row's used cache slots, split into blocks read in parallel
  and combined by the last block to finish (triton_decode_attention), the step's rotary and cache writes inside;
- attend_out_kernel: that attention and the layer's output product in one launch.

The ops (torch.library.triton_op, namespace phi2_qlora) are registered on first use, by the functions that return
them, so that inductor and CUDA graphs take the kernels in. Program bodies are Triton functions the kernels call:
at module level, because Triton's interpreter (the CPU tests) runs a kernel's source with the module's globals and
inductor copies a called function's source into its generated code. Importing this module needs Triton (PyTorch's
CUDA builds ship it); nothing else imports it unless phi_layers.triton_supported says so. Why each kernel exists, and
what it was measured against, is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton



@triton.jit
def _wait_for(done_ptr, need):
    """Until the count at done_ptr reaches `need` (other programs of this launch add to it as they finish);
    what they wrote before is visible after (acquire)."""
    done = tl.atomic_add(done_ptr, 0, sem="acquire", scope="gpu")
    while done < need:
        done = tl.atomic_add(done_ptr, 0, sem="acquire", scope="gpu")

@triton.jit
def _one_row_program(pid, w_ptr, x_ptr, x2_ptr, b_ptr, res_ptr, nw_ptr, ws_ptr, y_ptr, N, eps, gelu_from,
                     done_ptr, need, K: tl.constexpr, K1: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr,
                     RESIDUAL: tl.constexpr, WAIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n] = sum_k w[n, k] x[k] + b[n] for the BLOCK_N rows n of program `pid`, with gemv_kernel's switches;
    WAIT: x2's columns first, then x's (K1 of them, written by other programs of the launch) once `need` have
    signalled at done_ptr."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if NORM:  # the row's statistics gathered along the product: sums of x - x[0] (less cancellation than x)
        shift = tl.load(x_ptr).to(tl.float32)
        s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if WAIT:
        for k0 in range(K1, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                        mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0, eviction_policy="evict_first")
            x = tl.load(x2_ptr + cols - K1, mask=cols < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        _wait_for(done_ptr, need)
        for k0 in range(0, K1, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                        mask=(rows[:, None] < N) & (cols[None, :] < K1), other=0.0, eviction_policy="evict_first")
            # .cg: from L2, where the other programs wrote it
            x = tl.load(x_ptr + cols, mask=cols < K1, other=0.0, cache_modifier=".cg").to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                        mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=cols < K1, other=0.0).to(tl.float32)
            if K1 < K:
                x += tl.load(x2_ptr + cols - K1, mask=(cols >= K1) & (cols < K), other=0.0).to(tl.float32)
            if NORM:
                centred = tl.where(cols < K, x - shift, 0.0)
                s1 += centred
                s2 += centred * centred
                x = x * tl.load(nw_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
    if NORM:  # W (g * (x - mean) * rstd + beta) + b = rstd (W (g * x) - mean W g) + (W beta + b): b_ptr holds the
        # last term, ws_ptr W g (norm_folded)
        m = tl.sum(s1, 0) / K
        rstd = 1.0 / tl.sqrt(tl.sum(s2, 0) / K - m * m + eps)
        acc = acc * rstd
        y = tl.sum(acc, axis=1) - (shift + m) * rstd * tl.load(ws_ptr + rows, mask=rows < N, other=0.0)
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    else:
        y = tl.sum(acc, axis=1) + tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    if GELU:  # gelu_new(y) = y * sigmoid(2 sqrt(2 / pi) (y + 0.044715 y^3)), of y in the model's dtype
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = tl.where(rows >= gelu_from, y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y)), y)
    if RESIDUAL:  # added to the product in the model's dtype, as the plain path adds
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rows, mask=rows < N,
                                                                   other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

@triton.jit
def _attend_program(pid, block, q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr, scale, batch, size,
                    row_stride, slot_stride, head_stride, q_stride, knew_ptr, vnew_ptr, cos_ptr, sin_ptr, o_ptr,
                    count_ptr, done_ptr, HEADS: tl.constexpr, DIM: tl.constexpr, SPLIT: tl.constexpr,
                    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    NEW: tl.constexpr, ROT: tl.constexpr, SIGNAL: tl.constexpr):
    """Block `block` of the (row, head) pid = row * HEADS + head of split_attention_kernel. SIGNAL: the program
    that writes a (row, head)'s output then adds 1 at done_ptr (attend_out_kernel's programs wait for them)."""
    row, head = pid // HEADS, pid % HEADS
    start = tl.load(layout_ptr + batch + 1 + row) - row * size  # the row's first slot
    used = tl.load(layout_ptr + 2 * (batch + 1) + row)
    if SPLIT == BLOCK_N:
        # The grid is sized by the cache (a CUDA graph's launch is fixed), so early in an answer most blocks
        # hold none of the row's used slots: their programs leave at once, and the combine waits for the blocks
        # that hold some (the first always, so that a row without any still gets its output): faster than every
        # program at work, most early in an answer (docs/PERFORMANCE.md).
        held = tl.maximum((used + SPLIT - 1) // SPLIT, 1)
        takes_part = block < held
    else:
        # Walking launches keep every program (an empty block's walk takes no step): with the loop inside a
        # branch they ran slower at 64 rows (docs/PERFORMANCE.md).
        held = SPLITS
        takes_part = True  # (a constant: no branch)
    if takes_part:
        d = tl.arange(0, BLOCK_D)
        at = row * q_stride + head * DIM  # this row's head in q (and in the new keys and values)
        q = tl.load(q_ptr + at + d, mask=d < DIM, other=0.0).to(tl.float32)
        base = row.to(tl.int64) * row_stride + head * head_stride
        lo = block * SPLIT
        hi = tl.minimum(used, lo + SPLIT)
        if NEW:  # this step's key and value, slot used - 1: rotated here, written to the cache by its block
            k_new = tl.load(knew_ptr + at + d, mask=d < DIM, other=0.0).to(tl.float32)
            v_new = tl.load(vnew_ptr + at + d, mask=d < DIM, other=0.0)
            if ROT > 0:  # partial rotary, rotate_half's pairs: d and d + ROT / 2 for the first ROT dims
                turn = d < ROT
                partner = tl.where(d < ROT // 2, d + ROT // 2, d - ROT // 2)
                sign = tl.where(d < ROT // 2, -1.0, 1.0)
                cos = tl.load(cos_ptr + row * ROT + d, mask=turn, other=1.0).to(tl.float32)
                sin = tl.load(sin_ptr + row * ROT + d, mask=turn, other=0.0).to(tl.float32)
                q_pair = tl.load(q_ptr + at + partner, mask=turn, other=0.0).to(tl.float32)
                k_pair = tl.load(knew_ptr + at + partner, mask=turn, other=0.0).to(tl.float32)
                q = q * cos + sign * q_pair * sin
                k_new = k_new * cos + sign * k_pair * sin
            # in the model's dtype, as the plain path's rotary and the cache hold them
            q = q.to(knew_ptr.dtype.element_ty).to(tl.float32)
            k_new = k_new.to(k_ptr.dtype.element_ty)
            newest = used - 1
            owner = (newest >= lo) & (newest < hi)
            slot = base + (start + newest).to(tl.int64) * slot_stride + d
            tl.store(k_ptr + slot, k_new, mask=(d < DIM) & owner)
            tl.store(v_ptr + slot, v_new.to(v_ptr.dtype.element_ty), mask=(d < DIM) & owner)
            k_new = k_new.to(tl.float32)
            v_new = v_new.to(v_ptr.dtype.element_ty).to(tl.float32)
        q = (q * scale).to(tl.float32) * 1.4426950408889634  # scores in log2 units: exp2 below
        if SPLIT == BLOCK_N:  # one step, no loop: faster at batch 1 (docs/PERFORMANCE.md)
            slots = lo + tl.arange(0, BLOCK_N)
            live = slots < hi
            # the block's (BLOCK_N, BLOCK_D) keys and values
            offsets = base + (start + slots).to(tl.int64)[:, None] * slot_stride + d[None, :]
            read = live[:, None] & (d < DIM)[None, :]
            # both loads issued before any math: two reads in flight, not one after the other
            k = tl.load(k_ptr + offsets, mask=read, other=0.0, eviction_policy="evict_first").to(tl.float32)
            v = tl.load(v_ptr + offsets, mask=read, other=0.0, eviction_policy="evict_first").to(tl.float32)
            if NEW:  # the newest slot from registers: its store above need not be visible to this program yet
                k = tl.where((slots == used - 1)[:, None], k_new[None, :], k)
                v = tl.where((slots == used - 1)[:, None], v_new[None, :], v)
            s = tl.where(live, tl.sum(k * q[None, :], 1), float("-inf"))  # (BLOCK_N,) scores in log2 units
            top = tl.max(s, 0)  # -inf only in a row without used slots
            p = tl.exp2(s - tl.where(top == float("-inf"), 0.0, top))
            total = tl.sum(p, 0)
            acc = tl.sum(p[:, None] * v, 0)
        else:  # walk the block BLOCK_N slots at a time, online softmax
            top = float("-inf")  # stays -inf in a block past the row's used slots: it then adds nothing
            total = 0.0
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for n0 in range(lo, hi, BLOCK_N):
                slots = n0 + tl.arange(0, BLOCK_N)
                live = slots < hi
                offsets = base + (start + slots).to(tl.int64)[:, None] * slot_stride + d[None, :]
                read = live[:, None] & (d < DIM)[None, :]
                k = tl.load(k_ptr + offsets, mask=read, other=0.0, eviction_policy="evict_first").to(tl.float32)
                v = tl.load(v_ptr + offsets, mask=read, other=0.0, eviction_policy="evict_first").to(tl.float32)
                if NEW:
                    k = tl.where((slots == used - 1)[:, None], k_new[None, :], k)
                    v = tl.where((slots == used - 1)[:, None], v_new[None, :], v)
                s = tl.where(live, tl.sum(k * q[None, :], 1), float("-inf"))
                new = tl.maximum(top, tl.max(s, 0))  # finite: every step holds a used slot
                p = tl.exp2(s - new)
                alpha = tl.exp2(top - new)
                total = total * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * v, 0)
                top = new
        out = pid * SPLITS + block
        tl.store(acc_ptr + out * BLOCK_D + d, acc)
        tl.store(stats_ptr + out * 2, top)
        tl.store(stats_ptr + out * 2 + 1, total)
        # the last of a (row, head)'s blocks to finish adds them up (count_ptr: zero between launches)
        tl.debug_barrier()  # every thread's stores come before this program's arrival (one thread's atomic)
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == held - 1:
            blocks = pid * SPLITS + tl.arange(0, SPLITS_P2)
            there = tl.arange(0, SPLITS_P2) < held
            # .cg: from L2, where the other programs' results are, never a stale L1 line
            tops = tl.load(stats_ptr + blocks * 2, mask=there, other=float("-inf"), cache_modifier=".cg")
            totals = tl.load(stats_ptr + blocks * 2 + 1, mask=there, other=0.0, cache_modifier=".cg")
            accs = tl.load(acc_ptr + blocks[:, None] * BLOCK_D + d[None, :], mask=there[:, None], other=0.0,
                           cache_modifier=".cg")
            w = tl.exp2(tops - tl.max(tops, 0))  # the first block always holds a used slot: the max is finite
            o = tl.sum(w[:, None] * accs, 0) / tl.sum(w * totals, 0)
            tl.store(o_ptr + pid * DIM + d, o.to(o_ptr.dtype.element_ty), mask=d < DIM)
            tl.store(count_ptr + pid, 0)  # every block has arrived: ready for the next launch
            if SIGNAL:
                tl.debug_barrier()  # every thread's part of the output is stored before the signal
                tl.atomic_add(done_ptr, 1, sem="release", scope="gpu")




@triton.jit
def gemv_kernel(w_ptr, x_ptr, x2_ptr, b_ptr, res_ptr, nw_ptr, ws_ptr, y_ptr, N, eps, gelu_from, K: tl.constexpr,
           K1: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The Triton kernel of one-row products: y[n] = sum_k w[n, k] x[k] + b[n], each program BLOCK_N rows of w over
    the whole input, fp32 sums (docs/bench/gemv_triton.py times it against cuBLAS). What a fused layer's decode
    step does around its two products happens inside it (constexpr switches, all off for a plain product), so that
    the layer norm, the concatenation, gelu and the residual add take no kernels of their own:
    - NORM: x is the residual stream, layer-normed on the way in: each program gathers the row's mean and variance
      along its product (from L2) and applies them at the end, with the norm's weight folded into two per-row
      vectors (norm_folded); a first pass for the statistics was slower than the layer norm's own kernel
      (docs/PERFORMANCE.md);
    - K1 < K: x is [x; x2], K1 columns from x and the rest from x2 ([attention | gelu(fc1)] read in place);
    - GELU: rows from gelu_from on (fc1's) come out through gelu_new, the tanh approximation Phi uses;
    - RESIDUAL: res[n] added (the residual stream)."""
    _one_row_program(tl.program_id(0), w_ptr, x_ptr, x2_ptr, b_ptr, res_ptr, nw_ptr, ws_ptr, y_ptr, N, eps,
                     gelu_from, y_ptr, 0, K, K1, NORM, GELU, RESIDUAL, False, BLOCK_N, BLOCK_K)


@triton.jit
def rows_kernel(w_ptr, x_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The Triton kernel of triton_gemv for 2 to FEW_ROWS rows x: y[m, n] = sum_k x[m, k] w[n, k] + b[n], each
    program BLOCK_N rows of w over the whole input, read once for every row of x: one tensor-core product a block
    (x padded to 16 rows, the smallest it takes), fp32 sums (docs/bench/gemv_rows_triton.py times it)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, 16)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                    mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=(ms[:, None] < M) & (cols[None, :] < K),
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + ms[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(ms[:, None] < M) & (rows[None, :] < N))


ROWS_BLOCKS = (64, 128, 4, 4)  # rows_kernel's BLOCK_N, BLOCK_K, warps, stages: the fastest of 8 for [q; k; v; fc1]


@functools.cache
def triton_gemv():
    """y = x W^T + b for a few rows x (batch, 1, in), batch <= FEW_ROWS, with gemv_kernel (one row) or rows_kernel,
    registered as a PyTorch op so that inductor and CUDA graphs take it in.

    Why not cuBLAS (F.linear): at batch 1 a decode step is reading weights, and this kernel reads the fused layer's
    matrices closer to the memory's bandwidth than cuBLAS; at 8 rows rows_kernel is faster on [q; k; v; fc1] but
    slower on [dense | fc2], so the fused layer calls it there only for one row. Inductor's own generated
    reductions were slower than cuBLAS. Block sizes: the fastest of those measured for each shape, by the input
    width (docs/PERFORMANCE.md has every figure)."""

    @triton_op("phi2_qlora::gemv", mutates_args={})
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        y = x.new_empty(*x.shape[:-1], n)
        rows = x.numel() // k
        if rows == 1:
            one_row_product(wrap_triton(gemv_kernel), weight, x.contiguous(), bias, y)
        else:
            block_n, block_k, warps, stages = ROWS_BLOCKS
            wrap_triton(rows_kernel)[(triton.cdiv(n, block_n),)](weight, x.contiguous(), bias, y, rows, n, k,
                                                         BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                                         num_stages=stages)
        return y

    return gemv


def one_row_blocks(k: int, dtype: torch.dtype, norm: bool = False) -> tuple[int, int, int, int]:
    """gemv_kernel's launch for an input of width k: (rows a program, input columns a step, warps, stages), the
    fastest of those measured for Phi-2's two fused shapes (docs/PERFORMANCE.md)."""
    if norm:  # more rows a program, fewer programs gathering the row's statistics
        block_n, block_k, warps, stages = 8, 256, 4, 4
    elif dtype == torch.float32:  # fp32: faster than cuBLAS on both shapes
        block_n, block_k, warps, stages = (2, 1024, 4, 2) if k >= 8192 else (1, 2048, 4, 2)
    else:
        block_n, block_k, warps, stages = (8, 1024, 8, 2) if k >= 8192 else (2, 2048, 4, 2)
    return block_n, min(block_k, triton.next_power_of_2(k)), warps, stages  # narrower inputs: the tests' model


def one_row_product(kernel, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                    x2: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu_from: int | None = None) -> None:
    """Launch gemv_kernel (`kernel`, wrapped for the op calling it) for y = weight [x; x2] + bias, with its
    switches: x2 (the input's rest), residual (added), norm (the layer norm's weight, norm_folded's weight sums, eps;
    then `bias` is norm_folded's too), gelu_from; launched as one_row_blocks says."""
    n, k = weight.shape
    block_n, block_k, warps, stages = one_row_blocks(k, weight.dtype, norm is not None)
    norm_weight, sums, eps = norm if norm is not None else (x, x, 0.0)
    kernel[(triton.cdiv(n, block_n),)](
        weight, x, x if x2 is None else x2, bias, x if residual is None else residual, norm_weight, sums, y, n, eps,
        n if gelu_from is None else gelu_from, K=k, K1=k if x2 is None else x.shape[-1], NORM=norm is not None,
        GELU=gelu_from is not None, RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)


@functools.cache
def triton_layer_products():
    """A one-row decode step's two products of a fused Phi layer with what surrounds them (gemv_kernel's switches),
    registered as PyTorch ops so that inductor and CUDA graphs take them in:
    - phi2_qlora::layer_in(hidden, norm weight, weight sums, eps, [q; k; v; fc1] weight, folded bias, gelu_from):
      layer_norm(hidden) through [q; k; v; fc1] (norm_folded gives the sums and bias), fc1's part through gelu_new;
    - phi2_qlora::layer_out(attention, gelu(fc1), [dense | fc2] weight, bias, hidden): the layer's output, the
      product of [attention | gelu(fc1)] plus the residual stream (the decode step's attend_out does this itself).
    Why: around its products, a compiled one-row step ran a layer norm (with the residual add), a gelu and a
    concatenation as kernels of their own (docs/PERFORMANCE.md)."""

    @triton_op("phi2_qlora::layer_in", mutates_args={})
    def layer_in(hidden: torch.Tensor, norm_weight: torch.Tensor, sums: torch.Tensor, eps: float,
                 weight: torch.Tensor, bias: torch.Tensor, gelu_from: int) -> torch.Tensor:
        hidden = hidden.contiguous()
        y = hidden.new_empty(*hidden.shape[:-1], weight.shape[0])
        one_row_product(wrap_triton(gemv_kernel), weight, hidden, bias, y, norm=(norm_weight, sums, eps),
                        gelu_from=gelu_from)
        return y

    @triton_op("phi2_qlora::layer_out", mutates_args={})
    def layer_out(attention: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  hidden: torch.Tensor) -> torch.Tensor:
        attention, ff, hidden = attention.contiguous(), ff.contiguous(), hidden.contiguous()
        y = hidden.new_empty(hidden.shape)
        one_row_product(wrap_triton(gemv_kernel), weight, attention, bias, y, x2=ff, residual=hidden)
        return y

    return layer_in, layer_out


# triton_decode_attention's launch by batch size: (slots a program reads, slots a step of its walk, warps, pipeline
# stages); for each, the fastest on average at 65, 192 and 320 used slots of those measured; 8 rows since blocks
# past a row's used slots leave one-step launches early (docs/PERFORMANCE.md). One step (slots == step) takes no
# loop.
SPLIT_CONFIGS = {1: (32, 32, 2, 1), 8: (32, 32, 2, 1), 64: (128, 8, 1, 3)}  # others: the next larger batch's
# Walking launches cut a cache of more than this many slots into as many blocks as this many slots give (longer
# blocks): their programs all run, a block past a row's used slots too, and a batch's long cache is mostly unused
# early in its answers (BatchDecoder's shapes of 16 rows and more have rows as long as the context window).
WALKED_SLOTS = 512


@triton.jit
def split_attention_kernel(q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr, scale, batch, size, row_stride,
                           slot_stride, head_stride, q_stride, knew_ptr, vnew_ptr, cos_ptr, sin_ptr, o_ptr, count_ptr,
                           HEADS: tl.constexpr, DIM: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                           SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NEW: tl.constexpr,
                           ROT: tl.constexpr):
    """triton_decode_attention's Triton kernel ("flash decoding"), one launch: one program per (row, head, block of
    SPLIT slots) walks the block's used slots BLOCK_N at a time (online softmax) and writes the block's softmax
    statistics (max, sum, in log2 units) and weighted values; the last of a (row, head)'s programs to finish (an
    atomic count of arrivals, as CUDA's threadFenceReduction sample does) rescales its blocks' results to one max
    and adds them up. (The adding up was a second kernel: one launch and one gap more a layer, docs/PERFORMANCE.md.)
    In one-step launches (SPLIT == BLOCK_N) a block that holds none of the row's used
    slots takes no part.
    The cache is read through its strides (token- or head-major); fp32 sums whatever its dtype; head dims padded to
    a power of two (Phi-2's 80 -> 128, masked)."""
    _attend_program(tl.program_id(0), tl.program_id(1), q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr,
                    scale, batch, size, row_stride, slot_stride, head_stride, q_stride, knew_ptr, vnew_ptr,
                    cos_ptr, sin_ptr, o_ptr, count_ptr, count_ptr, HEADS, DIM, SPLIT, SPLITS, SPLITS_P2, BLOCK_N,
                    BLOCK_D, NEW, ROT, False)


def split_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                    config: tuple[int, int, int, int], wrap=None, new: tuple[torch.Tensor, ...] | None = None,
                    counts: torch.Tensor | None = None, reach: int | None = None) -> torch.Tensor:
    """Run split_attention_kernel: q (batch, heads, 1, head dim), or (batch, 1, heads * head dim) in any row
    stride; keys/values (batch, cache, heads, head dim) in any strides (a transposed view of a head-major cache
    too); config: SPLIT_CONFIGS' (slots a program, slots a step, warps, stages). Returns (batch, 1, heads * head
    dim). wrap: torch.library.wrap_triton inside an op.
    new: this step's (key, value, cos, sin), keys/values (batch, 1, heads * head dim) in q's row stride, cos/sin
    (batch, 1, rotary dims): q and the key are rotated (partial rotary, rotate_half) and the key and value written
    to the row's newest slot (decode_layout's last used one), all inside the kernel.
    counts: (batch * heads) int32, zero (each launch leaves it so; _TokenMajorLayer.step_counts), where the
    blocks of each (row, head) count their arrivals; zeros made here without.
    reach: the most slots a row may use, which the launch's blocks cover: the cache's row length (the default)
    for a cache of one region a row; for a pool (keys/values one flat run of every row's slots, (1, slots, heads,
    head dim), decode_layout's starts flat), the longest a row may be."""
    partial = split_attention_kernel if wrap is None else wrap(split_attention_kernel)
    _, _, warps, stages = config
    grid, args, constants, out = _attention_launch(q, keys, values, layout, scale, config, new, counts, reach)
    partial[grid](*args, **constants, num_warps=warps, num_stages=stages)
    return out


def _attention_launch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                      config: tuple[int, int, int, int], new: tuple[torch.Tensor, ...] | None,
                      counts: torch.Tensor | None, reach: int | None = None
                      ) -> tuple[tuple[int, int], list, dict, torch.Tensor]:
    """split_attention's launch (split_attention's arguments): the grid ((row, head)s, blocks a row), the kernel's
    arguments and constants, and the output it writes. A row's slots are found from its flat start (decode_layout)
    whatever the cache's shape: the kernel's row offset and row length cancel out, in a pool's one-row view too."""
    batch, heads, dim = q.shape[0], keys.shape[2], keys.shape[3]
    size = keys.shape[1]
    reach = size if reach is None else reach
    slots, step, _, _ = config
    if slots != step:  # a walking launch: at most WALKED_SLOTS' blocks
        slots = max(slots, triton.cdiv(triton.cdiv(reach, triton.cdiv(WALKED_SLOTS, slots)), step) * step)
    blocks = triton.cdiv(reach, slots)
    block_d = triton.next_power_of_2(dim)
    acc = q.new_empty(batch * heads * blocks * block_d, dtype=torch.float32)  # each block's weighted values
    stats = q.new_empty(batch * heads * blocks * 2, dtype=torch.float32)  # each block's max and sum
    out = q.new_empty(batch, 1, heads * dim)
    row_stride, slot_stride, head_stride, _ = keys.stride()
    if q.dim() == 4:
        q = q.contiguous()
    assert q.stride(-1) == 1, "rows of heads laid out one after another"
    k_new, v_new, cos, sin = (q, q, q, q) if new is None else new
    if new is not None:
        assert k_new.stride() == q.stride() == v_new.stride(), "the new key and value in q's layout"
        cos, sin = cos.expand(batch, 1, -1).contiguous(), sin.expand(batch, 1, -1).contiguous()
    if counts is None:
        counts = torch.zeros(batch * heads, dtype=torch.int32, device=q.device)
    assert counts.shape == (batch * heads,) and counts.dtype == torch.int32, "one arrival count per (row, head)"
    args = [q, keys, values, layout, acc, stats, scale, batch, size, row_stride, slot_stride, head_stride,
            q.stride(0), k_new, v_new, cos, sin, out, counts]
    constants = dict(HEADS=heads, DIM=dim, SPLIT=slots, SPLITS=blocks, SPLITS_P2=triton.next_power_of_2(blocks),
                     BLOCK_N=step, BLOCK_D=block_d, NEW=new is not None, ROT=0 if new is None else cos.shape[-1])
    return (batch * heads, blocks), args, constants, out


@triton.jit
def attend_out_kernel(q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr, scale, batch, size, row_stride,
                      slot_stride, head_stride, q_stride, knew_ptr, vnew_ptr, cos_ptr, sin_ptr, o_ptr, count_ptr,
                      w_ptr, ff_ptr, b_ptr, res_ptr, y_ptr, sync_ptr, N, products,
                      HEADS: tl.constexpr, DIM: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                      SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NEW: tl.constexpr,
                      ROT: tl.constexpr, K: tl.constexpr, K1: tl.constexpr, PRODUCT_N: tl.constexpr,
                      PRODUCT_K: tl.constexpr):
    """One launch for the rest of a fused Phi layer's one-row decode step after layer_in: the step attention
    (split_attention_kernel's programs, with the step's own key and value: rotary, cache writes) and the layer's
    output, [dense | fc2] of [attention | gelu(fc1)] plus the residual (gemv_kernel's programs). The product's
    programs read fc2's columns first (80% of the weights; gelu(fc1) is there already) and dense's last, once every
    head's attention is out (a count the attention's combining programs add to: _wait_for): the attention, which
    left the memory idle as a kernel of its own, runs while the product streams its weights, and a layer takes two
    launches instead of three. Faster in bf16; the compiled fp32 step was slower with it, so fp32 keeps the three
    launches (launching the attention with fc1's product instead was slower, and at 8 rows both were:
    docs/PERFORMANCE.md).
    Roles go by the order programs start (a ticket from an atomic count), not by program id: every attention
    program started before any product program that waits for it, so the wait ends whatever order the GPU starts
    programs in. The sync counts (tickets, heads done, products finished) are zero between launches: the program
    that takes the last ticket and the last product to finish set them back."""
    attending = HEADS * SPLITS  # tickets: every head's block 0, then every block 1, ...; then the product's
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == attending + products - 1:
        tl.store(sync_ptr, 0)  # every program holds its ticket: ready for the next launch
    if ticket < attending:
        _attend_program(ticket % HEADS, ticket // HEADS, q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr,
                        scale, batch, size, row_stride, slot_stride, head_stride, q_stride, knew_ptr, vnew_ptr,
                        cos_ptr, sin_ptr, o_ptr, count_ptr, sync_ptr + 1, HEADS, DIM, SPLIT, SPLITS, SPLITS_P2,
                        BLOCK_N, BLOCK_D, NEW, ROT, True)
    else:
        _one_row_program(ticket - attending, w_ptr, o_ptr, ff_ptr, b_ptr, res_ptr, b_ptr, b_ptr, y_ptr, N, 0.0, N,
                         sync_ptr + 1, HEADS, K, K1, False, False, True, True, PRODUCT_N, PRODUCT_K)
        left = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel", scope="gpu")
        if left == products - 1:  # the last product program to finish: every program is past its wait
            tl.store(sync_ptr + 1, 0)
            tl.store(sync_ptr + 2, 0)


# attend_out's product launch (rows a program, input columns a step, warps, stages): the fastest of those measured in
# bf16 and in fp32 (docs/PERFORMANCE.md)
ATTEND_OUT_BLOCKS = (4, 512, 4, 3)


def attend_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float, counts: torch.Tensor,
               sync: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor,
               wrap=None, reach: int | None = None) -> torch.Tensor:
    """Run attend_out_kernel for one row: the step attention as split_attention(q, keys, values, layout, scale,
    new=(k, v, cos, sin), counts), then weight [attention; ff] + bias + hidden; ff (1, 1, ff width), weight
    (hidden, heads * head dim + ff width), hidden (1, 1, hidden). sync: 3 int32, zero (each launch leaves them so;
    _TokenMajorLayer.step_sync). Returns (1, 1, hidden). wrap: torch.library.wrap_triton inside an op; reach: as
    split_attention's."""
    kernel = attend_out_kernel if wrap is None else wrap(attend_out_kernel)
    assert q.shape[0] == 1, "one row"
    (heads, blocks), args, constants, out = _attention_launch(q, keys, values, layout, scale, _split_config(1),
                                                              (k, v, cos, sin), counts, reach)
    n, width = weight.shape
    assert ff.is_contiguous() and width == out.shape[-1] + ff.shape[-1], "[attention | ff] is the weight's input"
    assert sync.shape == (3,) and sync.dtype == torch.int32, "three sync counts"
    hidden = hidden.contiguous()
    y = torch.empty_like(hidden)
    block_n, block_k, warps, stages = ATTEND_OUT_BLOCKS
    products = triton.cdiv(n, block_n)
    kernel[(heads * blocks + products,)](
        *args, weight, ff, bias, hidden, y, sync, n, products, **constants, K=width, K1=out.shape[-1],
        PRODUCT_N=block_n, PRODUCT_K=min(block_k, triton.next_power_of_2(width)), num_warps=warps,
        num_stages=stages)
    return y


@functools.cache
def triton_decode_attention():
    """decode_attention's "split" kernel, registered as the PyTorch op phi2_qlora::decode_attention so that inductor
    and CUDA graphs take it in: one query a row against the row's used slots only (decode_layout), split into
    blocks read in parallel (split_attention_kernel, launched as SPLIT_CONFIGS says for the batch size), so that a
    step reads what the answers hold, not the whole cache, at any batch size (reach: split_attention's). Its sibling
    phi2_qlora::decode_step_attention(q, k, v, cos, sin, keys, values, layout, scale, reach, counts) rotates q and k
    and writes the step's key and value into the cache (in place: the op mutates keys and values): the rotary and
    the two cache writes were kernels of their own. A fused Phi layer's
    decode step of one row in bf16/fp16 calls phi2_qlora::attend_out(q, k, v, cos, sin, keys, values, layout, scale,
    reach, counts, sync, ff, [dense | fc2] weight, bias, hidden): that attention and the layer's output in one launch
    (attend_out_kernel); of one row in fp32, and of 2 to FEW_ROWS rows in bf16/fp16, decode_step_attention. All add
    up the blocks in the one kernel (counts: the cache's step_counts).

    Why: batches attended over every row's whole cache with cuDNN, whatever was used; this kernel reads only the
    used slots. FlashAttention over own slots keeps 64- or 128-query tiles for one query, slower for batches and at
    batch 1; fp32 had no fused kernel at all (masked products over the whole cache). docs/PERFORMANCE.md has the
    timings."""

    @triton_op("phi2_qlora::decode_attention", mutates_args={"counts"})
    def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
               scale: float, reach: int, counts: torch.Tensor) -> torch.Tensor:
        return split_attention(q, keys, values, layout, scale, _split_config(q.shape[0]), wrap=wrap_triton,
                               counts=counts, reach=reach)

    @triton_op("phi2_qlora::decode_step_attention", mutates_args={"keys", "values", "counts"})
    def attend_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float, reach: int,
                   counts: torch.Tensor) -> torch.Tensor:
        return split_attention(q, keys, values, layout, scale, _split_config(q.shape[0]), wrap=wrap_triton,
                               new=(k, v, cos, sin), counts=counts, reach=reach)

    @triton_op("phi2_qlora::attend_out", mutates_args={"keys", "values", "counts", "sync"})
    def attend_and_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float, reach: int,
                       counts: torch.Tensor, sync: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return attend_out(q, k, v, cos, sin, keys, values, layout, scale, counts, sync, ff, weight, bias, hidden,
                          wrap=wrap_triton, reach=reach)

    return attend


def _split_config(batch: int) -> tuple[int, int, int, int]:
    return SPLIT_CONFIGS[min([b for b in SPLIT_CONFIGS if b >= batch], default=max(SPLIT_CONFIGS))]



"""The decoding engine: the repetition penalty and stopping rules every path shares, and two decoders.

`BatchDecoder` answers chats: every user's streamed answer decoded together, joining and leaving as they come
(continuous batching). `FastDecoder` decodes a batch given at once (evaluate.py, bench.py). Both use a static KV
cache and, on CUDA, a decode step compiled with CUDA graphs (each Phi layer's six weight products fused into two,
`fuse_phi_layers`), driven by a loop that never waits for the GPU between tokens. inference.py's ChatModel runs them
(or transformers' `generate`, the plain path for batches on the CPU) on its generation thread; the CLI, the Gradio
app, the OpenAI-compatible API and evaluate.py are layers over that ChatModel. Nothing here runs at import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (CompileConfig, DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache,
                          SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb, eager_attention_forward

from config import GenerationSettings
from data_utils import HUMAN

logger = logging.getLogger(__name__)

CACHE_BUCKET = 128  # batched static KV caches come in multiples of this many tokens (FastDecoder.cache_size)
CHECK_EVERY = 8     # fast path: the host looks at new tokens (EOS, stop marker, streaming) every this many steps
# One-row prompts up to PREFILL_BUCKETS[-1] tokens prefill through CUDA graphs (_PrefillGraph): BatchDecoder pads a
# prompt that joins alone to the first of these lengths it fits; FastDecoder pads to a power of two from 64 (its rule
# when measured; not re-measured with these)
PREFILL_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024)
PREFILL_TOKENS = 4096  # BatchDecoder prefills prompts that wait together in passes of up to this many (padded) tokens


class AnswerRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty, counting only the tokens this answer generated (per row), never EOS.

    transformers' RepetitionPenaltyLogitsProcessor penalizes every token of input_ids, the prompt included: the EOS
    that closes each earlier answer of a conversation and the EOS used as left padding in a batch. That penalizes
    the one token training teaches for stopping, and by a batch-dependent amount. input_ids: (batch, prompt_width +
    generated); scores: (batch, vocab)."""

    def __init__(self, penalty: float, prompt_width: int, eos_token_id: int):
        self.penalty, self.prompt_width, self.eos = penalty, prompt_width, eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[:, self.prompt_width:]  # (batch, generated so far)
        if new.shape[1] == 0:
            return scores
        picked = scores.gather(1, new)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        penalized = scores.scatter(1, new, picked)
        penalized[:, self.eos] = scores[:, self.eos]
        return penalized


def penalty_processors(gen: GenerationSettings, prompt_width: int, eos_token_id: int) -> LogitsProcessorList:
    """The repetition penalty both paths apply (to generate() as its `logits_processor`, before its warpers)."""
    procs = LogitsProcessorList()
    if gen.repetition_penalty != 1.0:
        procs.append(AnswerRepetitionPenalty(gen.repetition_penalty, prompt_width, eos_token_id))
    return procs


def logits_processors(gen: GenerationSettings, sample: bool, suppress: list[int], device: torch.device,
                      prompt_width: int, eos_token_id: int) -> LogitsProcessorList:
    """The processors generate() applies for these settings, in its order: suppressed tokens (what its
    min_new_tokens does to EOS), the penalty, then the sampling warpers. None of them may copy from the host per
    step: a blocking copy waits for the GPU, which would stall the fast loop every token."""
    procs = LogitsProcessorList()
    if suppress:
        procs.append(SuppressTokensLogitsProcessor(suppress, device=device))  # its ids live on the GPU
    procs.extend(penalty_processors(gen, prompt_width, eos_token_id))
    if sample:
        procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k > 0:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs


def prefill_attention(device: torch.device):
    """The attention kernels a decoder's eager prefill may use: on CUDA, PyTorch's memory-efficient kernel first and
    never cuDNN's, which PyTorch prefers on an H100/H200 but which builds a plan for each new (rows, length) shape:
    a prefill of a shape met for the first time took 55-66 ms there instead of 15-20 (memory-efficient: 14-23 ms
    the first time, 14 after; docs/PERFORMANCE.md), and every user who joins a batch brings a new shape."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
                       set_priority=True)


def stop_index(tokenizer, row: list[int], checked: int) -> int | None:
    """Index of the token that ends this row of new tokens (EOS, or the one completing the `### Human:` marker),
    looking only at tokens from `checked` on (earlier ones were looked at before)."""
    eos = tokenizer.eos_token_id
    at_eos = row.index(eos, checked) if eos in row[checked:] else None
    # The marker spans a few tokens: decode a tail that reaches back before this chunk. Within a chunk the stop is
    # whichever comes first, EOS or the marker, as in generate().
    end_of_search = len(row) if at_eos is None else at_eos + 1
    tail_start = max(0, checked - 16)
    if HUMAN not in tokenizer.decode(row[tail_start:end_of_search], skip_special_tokens=True):
        return at_eos
    for end in range(max(checked, 1), end_of_search + 1):
        if HUMAN in tokenizer.decode(row[tail_start:end], skip_special_tokens=True):
            return end - 1
    return at_eos


def fuse_phi_layers(model) -> bool:
    """Rewire each Phi decoder layer to read its weights with two matrix products instead of six.

    A Phi layer feeds one normalized input to q, k, v and fc1, and adds dense(attention) to fc2(gelu(fc1)): so
    [q; k; v; fc1] is one (7680 + 10240) x 2560 product and [dense | fc2] one 2560 x 12800 product. At batch 1 each
    product is a matrix-vector pass over its weights, and small ones do not reach the GPU's bandwidth (H200, bf16:
    q/k/v/dense ~7 us each at ~1.9 TB/s, fc1/fc2 ~16 us at ~3.4 TB/s; docs/PERFORMANCE.md). The math is the same;
    the sums are ordered differently (fp32 CPU: logits within 1e-5 of the unfused model, tested).

    In place and memory-neutral: the fused matrices take over the weights' storage and each Linear keeps a view
    of its part, so the state dict keeps its names (ChatModel.save_merged writes the ordinary layout). Fuse after
    the last `.to()`: moving the model afterwards would give each view its own copy. Returns False (and changes
    nothing) for a model that is not Phi."""
    if getattr(model.config, "model_type", None) != "phi":
        return False
    for layer in model.model.layers:
        if hasattr(layer, "fused_in_weight"):  # fused already (both engines of one ChatModel ask)
            continue
        attn, mlp = layer.self_attn, layer.mlp
        ins, outs = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc1], [attn.dense, mlp.fc2]
        layer.fused_in_sizes = [m.out_features for m in ins]
        layer.fused_in_weight = torch.cat([m.weight.detach() for m in ins])  # (q + k + v + ff, hidden)
        layer.fused_in_bias = torch.cat([m.bias.detach() for m in ins])
        for m, w, b in zip(ins, layer.fused_in_weight.split(layer.fused_in_sizes),
                           layer.fused_in_bias.split(layer.fused_in_sizes)):
            m.weight, m.bias = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
        layer.fused_out_weight = torch.cat([m.weight.detach() for m in outs], 1)  # (hidden, attention + ff)
        layer.fused_out_bias = (attn.dense.bias.detach().float() + mlp.fc2.bias.detach().float()).to(
            attn.dense.bias.dtype)
        for m, w in zip(outs, layer.fused_out_weight.split([m.in_features for m in outs], 1)):
            m.weight = torch.nn.Parameter(w, requires_grad=False)
        for t in (layer.fused_in_weight, layer.fused_in_bias, layer.fused_out_weight, layer.fused_out_bias):
            torch._dynamo.mark_static_address(t, guard=False)  # CUDA graphs read them in place, never copy them
        device, dtype = layer.fused_in_weight.device, layer.fused_in_weight.dtype
        layer.decode_kernel = decode_kernel(device, dtype)
        layer.gemv = triton_gemv() if triton_supported(device, dtype) else None
        # decode steps in a few kernels (_fused_decode_step): Triton's, and Phi-2's own layer (tanh gelu, no q/k norm)
        layer.step_kernels = layer.decode_kernel == "split" and model.config.hidden_act in TANH_GELU \
            and not attn.qk_layernorm
        if layer.step_kernels:
            triton_layer_products()
            norm = layer.input_layernorm
            layer.norm_sums, layer.norm_bias = norm_folded(layer.fused_in_weight, layer.fused_in_bias, norm.weight,
                                                           norm.bias)
            for t in (layer.norm_sums, layer.norm_bias):
                torch._dynamo.mark_static_address(t, guard=False)
        layer.forward = _fused_phi_layer_forward.__get__(layer)
    head = model.lm_head
    if model.model.layers[0].gemv is not None and head.bias is not None and not hasattr(head, "gemv"):
        # one row's logits through triton_gemv too: 60.8 us against cuBLAS's 70.4 in bf16, 115.0 against 132.3 in
        # fp32 (H200, docs/bench/gemv_triton.py)
        head.gemv = model.model.layers[0].gemv
        head.forward = _one_row_head_forward.__get__(head)
    return True


def _one_row_head_forward(self, x: torch.Tensor) -> torch.Tensor:
    """lm_head (an nn.Linear) reading its weights with triton_gemv for one row (batch, 1, hidden), cuBLAS else."""
    if x.shape[:-1].numel() == 1:
        return self.gemv(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def _fused_phi_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                             past_key_values=None, use_cache=False, position_embeddings=None,
                             kv_layout: torch.Tensor | None = None, **kwargs):
    """PhiDecoderLayer.forward + PhiAttention.forward (transformers 5.23, eval mode) with the products fused.
    kv_layout: where a decode step's rows sit in the decoders' DecodeCache (decode_layout); without it,
    transformers' attention over the whole cache. One row with layer.step_kernels goes to _fused_decode_step."""
    attn = self.self_attn
    stepping = self.step_kernels and kv_layout is not None and hidden_states.shape[1] == 1 and \
        isinstance(past_key_values, DecodeCache)
    if stepping and hidden_states.shape[0] == 1:
        return _fused_decode_step(self, hidden_states, position_embeddings, past_key_values.layers[attn.layer_idx],
                                  kv_layout)
    x = self.input_layernorm(hidden_states)  # (batch, seq, hidden)
    # A decode step of one row, or of a few users' rows: matrix-vector products, where triton_gemv reads the weights
    # faster than cuBLAS; for 2-8 rows only [q; k; v; fc1] (docs/bench/gemv_rows_triton.py: its rows kernel took
    # 25.5 us against 28.8 at 8 rows on an H200, but 29.4 against 22.1 on the 2560-row [dense | fc2]).
    # (fp32: one row only; rows_kernel's tensor-core product would round x and w to TF32)
    few = self.gemv is not None and x.shape[1] == 1 and x.shape[0] <= (FEW_ROWS if x.dtype != torch.float32 else 1)
    linear_in = self.gemv if few else F.linear
    linear_out = self.gemv if few and x.shape[0] == 1 else F.linear
    q, k, v, ff = linear_in(x, self.fused_in_weight, self.fused_in_bias).split(self.fused_in_sizes, dim=-1)
    if stepping and x.shape[0] <= FEW_ROWS and x.dtype in HALF:
        # A few users' step (BatchDecoder's rows): the rotary, the cache writes and the attention in the one-row
        # step's attention kernel (decode_step_attention) instead of ~4 kernels; no write index advanced (the
        # decoders keep theirs). On an H200 the bf16 8-row step took 2.099 ms instead of 2.243 (65 used slots; fp32
        # not measured, so it keeps the kernels before). attend_out with a rows-kernel product was slower than
        # cuBLAS here (docs/PERFORMANCE.md).
        layer = past_key_values.layers[attn.layer_idx]
        cos, sin = position_embeddings  # (batch, 1, rotary dims)
        out = torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, layer.token_keys, layer.token_values,
                                                         kv_layout, attn.scaling, layer.step_counts)
        return linear_out(torch.cat((out, self.mlp.activation_fn(ff)), dim=-1), self.fused_out_weight,
                          self.fused_out_bias) + hidden_states
    heads = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = q.view(heads).transpose(1, 2), k.view(heads).transpose(1, 2), v.view(heads).transpose(1, 2)
    if attn.qk_layernorm:
        q, k = attn.q_layernorm(q), attn.k_layernorm(k)
    cos, sin = position_embeddings
    r = attn.rotary_ndims  # partial rotary: only the first r dims of each head rotate
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
    q, k = torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, attn.layer_idx)
    if kv_layout is not None and q.shape[-2] == 1 and isinstance(past_key_values, DecodeCache):
        layer = past_key_values.layers[attn.layer_idx]
        out = decode_attention(q, layer.token_keys, layer.token_values, kv_layout, attn.scaling,
                               self.decode_kernel, layer.step_counts)  # (batch, 1, heads * head dim)
    else:
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        if q.shape[-2] == 1 and q.dtype == torch.float32 and attention_mask is not None:
            # A batched decode step in fp32: PyTorch's fp32 SDPA kernel (memory-efficient, 64 x 128 tiles for one
            # query) took 39 us a layer on an H200, 28% of the step; two small batched products and a softmax read
            # the cache once.
            attend = eager_attention_forward
            if attention_mask.dtype == torch.bool:  # SDPA's mask (True = attend); eager adds a float mask
                attention_mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~attention_mask, torch.finfo(q.dtype).min)
        out, _ = attend(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
        out = out.reshape(*x.shape[:-1], -1)
    mixed = torch.cat((out, self.mlp.activation_fn(ff)), dim=-1)
    return linear_out(mixed, self.fused_out_weight, self.fused_out_bias) + hidden_states


def _fused_decode_step(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                       cache: "_TokenMajorLayer", layout: torch.Tensor) -> torch.Tensor:
    """A fused Phi layer's one-row decode step where the Triton kernels run (layer.step_kernels), hidden (1, 1,
    hidden): layer_in (layer norm, [q; k; v; fc1], gelu on fc1's rows), then in bf16/fp16 attend_out (the split
    attention with the rotary and the cache writes, its blocks combined by the last to finish; in the same launch
    [dense | fc2] and the residual, fc2's columns read while the attention runs), in fp32 that attention
    (decode_step_attention) and layer_out ([dense | fc2], the residual) one after the other. On an H200, with the
    greedy token picked inside the step, batch 1 went from 485.6 to 556.5-571.2 tok/s in bf16 and from 300.4 to 338.9
    in fp32 with four kernels a layer; with three and the argmax in chunks, a later token took 1.650-1.656 ms instead
    of 1.695; with attend_out, 604.7 tok/s against 591.7 in bf16 on one machine, but 327.8 against 339.3 in fp32
    (docs/PERFORMANCE.md). The step's key and value go to the row's newest slot of decode_layout, not to the cache's
    shared write index: the cache's cumulative_length is not advanced (the decoders keep their own)."""
    norm = self.input_layernorm
    y = torch.ops.phi2_qlora.layer_in(hidden, norm.weight, self.norm_sums, norm.eps, self.fused_in_weight,
                                      self.norm_bias, sum(self.fused_in_sizes[:3]))  # gelu from fc1's rows on
    q, k, v, ff = y.split(self.fused_in_sizes, dim=-1)  # (1, 1, heads * head dim) each but ff
    cos, sin = position_embeddings  # (1, 1, rotary dims)
    if hidden.dtype in HALF:
        return torch.ops.phi2_qlora.attend_out(q, k, v, cos, sin, cache.token_keys, cache.token_values, layout,
                                               self.self_attn.scaling, cache.step_counts, cache.step_sync, ff,
                                               self.fused_out_weight, self.fused_out_bias, hidden)
    out = torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, cache.token_keys, cache.token_values, layout,
                                                     self.self_attn.scaling, cache.step_counts)  # (1, 1, heads * dim)
    return torch.ops.phi2_qlora.layer_out(out, ff, self.fused_out_weight, self.fused_out_bias, hidden)


HALF = (torch.bfloat16, torch.float16)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # gelu's tanh approximation, as layer_in computes it


def _ampere_or_later(device: torch.device) -> bool:
    """A GPU of compute capability 8.0+: where this module's decode-step kernels run (and were measured)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def triton_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps use this module's Triton kernels: triton_gemv (bf16/fp16 up to FEW_ROWS rows, fp32 one
    row) and triton_decode_attention, on a GPU of compute capability 8.0+ with Triton (PyTorch's CUDA builds ship
    it). Decided once per layer when fusing, outside compiled code."""
    return _ampere_or_later(device) and dtype in (*HALF, torch.float32) and \
        importlib.util.find_spec("triton") is not None


@functools.cache
def kernel_programs():
    """One program's work for each kind of this module's decode-step kernels, as Triton functions that kernels
    call (inlined): `_one_row_program` (gemv_kernel's) and `_attend_program` (split_attention_kernel's).
    attend_out_kernel runs programs of both kinds in one launch: the product's then wait (`_wait_for`) for what the
    attention's write."""
    global _wait_for, _one_row_program, _attend_program
    import triton
    import triton.language as tl

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
            # that hold some (the first always, so that a row without any still gets its output). At 8 rows x 512
            # slots, 32-slot blocks: 8.4 / 11.4 / 17.2 us a layer at 65 / 192 / 320 used slots, against 15.5 /
            # 17.2 / 19.4 with every program at work (H200, docs/PERFORMANCE.md).
            held = tl.maximum((used + SPLIT - 1) // SPLIT, 1)
            takes_part = block < held
        else:
            # Walking launches keep every program (an empty block's walk takes no step): with the loop inside a
            # branch they ran 4-8 us a layer slower at 64 rows on an H200 (docs/PERFORMANCE.md).
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
            if SPLIT == BLOCK_N:  # one step, no loop: 1-1.5 us a layer less at batch 1 on an H200
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


# kernel_programs() defines these (Triton functions) as module globals: kernels call them by these names, because
# Triton's interpreter (the CPU tests) runs a kernel's source with the module's globals, without its closure, and
# inductor copies a called Triton function's source into its generated code under its own name.
_wait_for = _one_row_program = _attend_program = None


@functools.cache
def gemv_kernel():
    """The Triton kernel of one-row products: y[n] = sum_k w[n, k] x[k] + b[n], each program BLOCK_N rows of w over
    the whole input, fp32 sums (docs/bench/gemv_triton.py times it against cuBLAS). What a fused layer's decode
    step does around its two products happens inside it (constexpr switches, all off for a plain product), so that
    the layer norm, the concatenation, gelu and the residual add take no kernels of their own:
    - NORM: x is the residual stream, layer-normed on the way in: each program gathers the row's mean and variance
      along its product (from L2) and applies them at the end, with the norm's weight folded into two per-row
      vectors (norm_folded); a first pass for the statistics made [q; k; v; fc1] take 50 us instead of 28 with
      the layer norm's own kernel (bf16, H200);
    - K1 < K: x is [x; x2], K1 columns from x and the rest from x2 ([attention | gelu(fc1)] read in place);
    - GELU: rows from gelu_from on (fc1's) come out through gelu_new, the tanh approximation Phi uses;
    - RESIDUAL: res[n] added (the residual stream)."""
    import triton
    import triton.language as tl
    kernel_programs()

    @triton.jit
    def kernel(w_ptr, x_ptr, x2_ptr, b_ptr, res_ptr, nw_ptr, ws_ptr, y_ptr, N, eps, gelu_from, K: tl.constexpr,
               K1: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        _one_row_program(tl.program_id(0), w_ptr, x_ptr, x2_ptr, b_ptr, res_ptr, nw_ptr, ws_ptr, y_ptr, N, eps,
                         gelu_from, y_ptr, 0, K, K1, NORM, GELU, RESIDUAL, False, BLOCK_N, BLOCK_K)

    return kernel


@functools.cache
def rows_kernel():
    """The Triton kernel of triton_gemv for 2 to FEW_ROWS rows x: y[m, n] = sum_k x[m, k] w[n, k] + b[n], each
    program BLOCK_N rows of w over the whole input, read once for every row of x: one tensor-core product a block
    (x padded to 16 rows, the smallest it takes), fp32 sums (docs/bench/gemv_rows_triton.py times it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(w_ptr, x_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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

    return kernel


# Decode steps of up to this many rows (BatchDecoder's 8 users, small batches) read [q; k; v; fc1] with triton_gemv;
# bigger batches use cuBLAS. On an H200 (bf16, docs/bench/decode_step_fused.py rows) an 8-row step took 2.511 ms with
# cuBLAS, 2.456 with the rows kernel. (Attending over each row's own slots as batch 1 does took 2.314 in that bare
# step, 65 slots filled, but served 8 users slower end to end, 2,405 against 2,526 tok/s: not used for batches.)
FEW_ROWS = 8  # at most 16: rows_kernel pads x to 16 rows
ROWS_BLOCKS = (64, 128, 4, 4)  # rows_kernel's BLOCK_N, BLOCK_K, warps, stages: the fastest of 8 for [q; k; v; fc1]


@functools.cache
def triton_gemv():
    """y = x W^T + b for a few rows x (batch, 1, in), batch <= FEW_ROWS, with gemv_kernel (one row) or rows_kernel,
    registered as a PyTorch op so that inductor and CUDA graphs take it in.

    Why not cuBLAS (F.linear): at batch 1 a decode step is reading weights, and cuBLAS read the fused layer's
    matrices at 3.0-3.3 TB/s on an H200 against this kernel's 3.6-3.9 (docs/bench/gemv_triton.py, 32 different
    matrices in turn as in the step, no L2 reuse): [q; k; v; fc1] 28.1 -> 23.5 us, [dense | fc2] 22.0 -> 18.3 us.
    At 8 rows, rows_kernel read [q; k; v; fc1] in 25.5 us against cuBLAS's 28.8 (docs/bench/gemv_rows_triton.py;
    on [dense | fc2] it was slower, 29.4 against 22.1, so the fused layer calls it there only for one row).
    Inductor's own generated reductions were slower than cuBLAS (docs/PERFORMANCE.md). Block sizes: the fastest
    of 8 measured for each shape, by the input width."""
    import triton
    from torch.library import triton_op, wrap_triton
    one, few = gemv_kernel(), rows_kernel()

    @triton_op("phi2_qlora::gemv", mutates_args={})
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        y = x.new_empty(*x.shape[:-1], n)
        rows = x.numel() // k
        if rows == 1:
            one_row_product(wrap_triton(one), weight, x.contiguous(), bias, y)
        else:
            block_n, block_k, warps, stages = ROWS_BLOCKS
            wrap_triton(few)[(triton.cdiv(n, block_n),)](weight, x.contiguous(), bias, y, rows, n, k,
                                                         BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                                         num_stages=stages)
        return y

    return gemv


def one_row_blocks(k: int, dtype: torch.dtype, norm: bool = False) -> tuple[int, int, int, int]:
    """gemv_kernel's launch for an input of width k: (rows a program, input columns a step, warps, stages), the
    fastest of those measured on an H200 for Phi-2's two fused shapes (docs/bench/gemv_triton.py; `layer` for
    layer_in, norm=True: 25.0 us in bf16, 44.2 in fp32, of 11 launches; in bf16 also the fastest of 43 in `sweep`,
    as was layer_out's (8, 1024, 8) at 18.5 us)."""
    import triton
    if norm:  # more rows a program, fewer programs gathering the row's statistics
        block_n, block_k, warps, stages = 8, 256, 4, 4
    elif dtype == torch.float32:  # fp32: 31.7 and 42.1 us against cuBLAS's 40.0 and 52.3
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
    import triton
    n, k = weight.shape
    block_n, block_k, warps, stages = one_row_blocks(k, weight.dtype, norm is not None)
    norm_weight, sums, eps = norm if norm is not None else (x, x, 0.0)
    kernel[(triton.cdiv(n, block_n),)](
        weight, x, x if x2 is None else x2, bias, x if residual is None else residual, norm_weight, sums, y, n, eps,
        n if gelu_from is None else gelu_from, K=k, K1=k if x2 is None else x.shape[-1], NORM=norm is not None,
        GELU=gelu_from is not None, RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)


def norm_folded(weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """layer_in's two per-row fp32 vectors for W layer_norm(x) + b with the norm's weight g and bias beta:
    (W g, W beta + b), computed once when fusing (weight (out, in); the rest (in,) or (out,))."""
    w = weight.float()
    return w @ norm_weight.float(), w @ norm_bias.float() + bias.float()


@functools.cache
def triton_layer_products():
    """A one-row decode step's two products of a fused Phi layer with what surrounds them (gemv_kernel's switches),
    registered as PyTorch ops so that inductor and CUDA graphs take them in:
    - phi2_qlora::layer_in(hidden, norm weight, weight sums, eps, [q; k; v; fc1] weight, folded bias, gelu_from):
      layer_norm(hidden) through [q; k; v; fc1] (norm_folded gives the sums and bias), fc1's part through gelu_new;
    - phi2_qlora::layer_out(attention, gelu(fc1), [dense | fc2] weight, bias, hidden): the layer's output, the
      product of [attention | gelu(fc1)] plus the residual stream (the decode step's attend_out does this itself).
    Why: around its products, a compiled one-row step ran a layer norm (with the residual add), a gelu and a
    concatenation as kernels of their own, ~4 us a layer on an H200 (docs/PERFORMANCE.md)."""
    from torch.library import triton_op, wrap_triton
    kernel = gemv_kernel()

    @triton_op("phi2_qlora::layer_in", mutates_args={})
    def layer_in(hidden: torch.Tensor, norm_weight: torch.Tensor, sums: torch.Tensor, eps: float,
                 weight: torch.Tensor, bias: torch.Tensor, gelu_from: int) -> torch.Tensor:
        hidden = hidden.contiguous()
        y = hidden.new_empty(*hidden.shape[:-1], weight.shape[0])
        one_row_product(wrap_triton(kernel), weight, hidden, bias, y, norm=(norm_weight, sums, eps),
                        gelu_from=gelu_from)
        return y

    @triton_op("phi2_qlora::layer_out", mutates_args={})
    def layer_out(attention: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  hidden: torch.Tensor) -> torch.Tensor:
        attention, ff, hidden = attention.contiguous(), ff.contiguous(), hidden.contiguous()
        y = hidden.new_empty(hidden.shape)
        one_row_product(wrap_triton(kernel), weight, attention, bias, y, x2=ff, residual=hidden)
        return y

    return layer_in, layer_out


class _TokenMajorLayer(StaticLayer):
    """transformers' StaticLayer with its keys and values stored token-major, (batch, cache, heads, head dim), so that
    one row's slots are one contiguous block that FlashAttention's varlen kernel reads in place (decode_attention;
    the split kernel reads either layout: head-major was 1-5% faster for it at batch 64, not worth a second cache).
    `keys`/`values` are (batch, heads, cache, head dim) views of that storage for eager code (the decoders' row
    copies, reset); compiled code touches only `token_keys`/`token_values` (a view of a mutated graph input made
    inductor copy the whole cache every layer: 4.8k instead of 12.6k tok/s at batch 64 on an H200).
    storage: flat (keys, values) buffers to view instead of allocating (BatchDecoder's prefill graphs' scratch
    caches, which never hold anything at the same time, share one pair a layer)."""

    def __init__(self, max_cache_len: int, storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(max_cache_len=max_cache_len)
        self.storage = storage

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        rows = (self.batch_size, self.max_cache_len, self.num_heads)
        if self.storage is None:
            self.token_keys = torch.zeros(*rows, self.k_head_dim, dtype=self.dtype, device=self.device)
            self.token_values = torch.zeros(*rows, self.v_head_dim, dtype=self.dtype, device=self.device)
        else:
            keys, values = self.storage
            self.token_keys = keys[:rows[0] * rows[1] * rows[2] * self.k_head_dim].view(*rows, self.k_head_dim)
            self.token_values = values[:rows[0] * rows[1] * rows[2] * self.v_head_dim].view(*rows, self.v_head_dim)
        self.keys, self.values = self.token_keys.transpose(1, 2), self.token_values.transpose(1, 2)
        self.cumulative_length = self.cumulative_length.to(self.device)
        # the step attention's arrival counts (split_attention's counts) and attend_out's sync counts, zero between
        # their launches
        self.step_counts = torch.zeros(self.batch_size * self.num_heads, dtype=torch.int32, device=self.device)
        self.step_sync = torch.zeros(3, dtype=torch.int32, device=self.device)
        if not torch.compiler.is_compiling():  # as StaticLayer: CUDA graphs read the cache in place
            for t in (self.token_keys, self.token_values, self.cumulative_length, self.step_counts, self.step_sync):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (batch, heads, new, head dim) at the next slots; return the (batch, heads, cache, head dim) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        slots = torch.arange(new, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(new)
        self.token_keys.index_copy_(1, slots, key_states.transpose(1, 2))
        self.token_values.index_copy_(1, slots, value_states.transpose(1, 2))
        return self.token_keys.transpose(1, 2), self.token_values.transpose(1, 2)


class DecodeCache(StaticCache):
    """The decoders' static KV cache: StaticCache with token-major storage (_TokenMajorLayer); storage: a layer's
    flat (keys, values) buffers to view, one pair a layer (None: each layer allocates its own)."""

    def __init__(self, config, max_cache_len: int, storage: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        Cache.__init__(self, layers=[_TokenMajorLayer(max_cache_len, None if storage is None else storage[i])
                                     for i in range(config.num_hidden_layers)])


def allocated(cache: StaticCache, model, batch: int) -> StaticCache:
    """`cache` with its tensors allocated now for `batch` rows of the model's heads, dtype and device."""
    config = model.config
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    cache.early_initialization(batch, config.num_key_value_heads or config.num_attention_heads, head_dim,
                               model.dtype, model.device)
    return cache


def decode_layout(starts: torch.Tensor, used: torch.Tensor, size: int) -> torch.Tensor:
    """Where a decode step's rows sit in a DecodeCache of `size` slots a row: (3, batch + 1) int32 of query offsets
    (one query a row), each row's first slot in the flattened (batch * cache) slots (plus the end), and how many
    slots each row reads (last column unused). The decoders keep a row's tokens in the contiguous slots [start, t]
    up to the shared write index t (left padding or an earlier answer before start), so a step reads t + 1 - start
    slots of row i, and the decoders add 1 to that count after each step. This is FlashAttention's varlen layout
    (cu_seqlens_q, cu_seqlens_k, seqused_k): no step reads the unused rest of the cache."""
    batch = starts.shape[0]
    layout = torch.zeros(3, batch + 1, dtype=torch.int32, device=starts.device)
    layout[0] = torch.arange(batch + 1, device=starts.device)
    layout[1] = layout[0] * size
    layout[1, :-1] += starts.to(torch.int32)
    layout[2, :-1] = used.to(torch.int32)
    return layout


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                     kernel: str, counts: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row, q: (batch, heads, 1, head dim), against that row's slots (decode_layout) of a
    token-major cache, keys/values: (batch, cache, heads, head dim); returns (batch, 1, heads * head dim).
    kernel (decode_kernel decides it):
    - "split": triton_decode_attention, each row's slots cut into blocks read in parallel (CUDA, any dtype);
    - "flash": FlashAttention-2's varlen kernel (cu_seqlens_k + seqused_k) reads only the row's used slots: 7.2 us
      a layer at batch 1 on an H200, against 8.4 us for cuDNN over the whole cache. At batch 64 its one-query tiles
      made it slower than cuDNN (61 us a layer for 65 slots), so with it batches keep transformers' attention;
    - "products" (the CPU): two small batched products and a softmax over the row's slots, masked.
    counts: "split"'s arrival counts (split_attention), the cache's step_counts; zeros made here without."""
    batch, heads, _, dim = q.shape
    size = keys.shape[1]
    if kernel == "split":
        if counts is None:
            counts = torch.zeros(batch * keys.shape[2], dtype=torch.int32, device=q.device)
        return torch.ops.phi2_qlora.decode_attention(q, keys, values, layout, scale, counts)
    if kernel == "flash":
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(batch, heads, dim), keys.view(batch * size, heads, dim), values.view(batch * size, heads, dim),
            layout[0], layout[1], 1, size, 0.0, False, False, scale=scale, seqused_k=layout[2, :-1])[0]
        return out.reshape(batch, 1, heads * dim)
    slot = torch.arange(size, device=q.device)[None]  # (1, cache)
    start = (layout[1, :-1] - layout[0, :-1] * size)[:, None]  # (batch, 1)
    hidden = (slot < start) | (slot >= start + layout[2, :-1, None])  # (batch, cache)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * scale  # (batch, heads, 1, cache)
    scores = scores.masked_fill(hidden[:, None, None], torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # as transformers' eager attention
    out = torch.matmul(weights, values.transpose(1, 2))  # (batch, heads, 1, dim)
    return out.transpose(1, 2).reshape(batch, 1, heads * dim)


# triton_decode_attention's launch by batch size: (slots a program reads, slots a step of its walk, warps, pipeline
# stages); for each, the fastest on average at 65, 192 and 320 used slots of the 11 in
# docs/bench/decode_attention_split.py on an H200 (docs/PERFORMANCE.md); 8 rows since blocks past a row's used slots
# leave one-step launches early (docs/bench/decode_attention_versions.py: 8.4 / 11.4 / 17.2 us a layer against
# 14.2 / 15.1 / 16.4 for the walking (64, 8, 1, 3) before). One step (slots == step) takes no loop.
SPLIT_CONFIGS = {1: (32, 32, 2, 1), 8: (32, 32, 2, 1), 64: (128, 8, 1, 3)}  # others: the next larger batch's


@functools.cache
def split_attention_kernel():
    """triton_decode_attention's Triton kernel ("flash decoding"), one launch: one program per (row, head, block of
    SPLIT slots) walks the block's used slots BLOCK_N at a time (online softmax) and writes the block's softmax
    statistics (max, sum, in log2 units) and weighted values; the last of a (row, head)'s programs to finish (an
    atomic count of arrivals, as CUDA's threadFenceReduction sample does) rescales its blocks' results to one max
    and adds them up. (The adding up was a second kernel: one launch and one gap more a layer, 1.85 us at batch 1 on
    an H200, docs/PERFORMANCE.md.) In one-step launches (SPLIT == BLOCK_N) a block that holds none of the row's used
    slots takes no part.
    The cache is read through its strides (token- or head-major); fp32 sums whatever its dtype; head dims padded to
    a power of two (Phi-2's 80 -> 128, masked)."""
    import triton
    import triton.language as tl
    kernel_programs()

    @triton.jit
    def partial(q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr, scale, batch, size, row_stride, slot_stride,
                head_stride, q_stride, knew_ptr, vnew_ptr, cos_ptr, sin_ptr, o_ptr, count_ptr, HEADS: tl.constexpr,
                DIM: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NEW: tl.constexpr, ROT: tl.constexpr):
        _attend_program(tl.program_id(0), tl.program_id(1), q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr,
                        scale, batch, size, row_stride, slot_stride, head_stride, q_stride, knew_ptr, vnew_ptr,
                        cos_ptr, sin_ptr, o_ptr, count_ptr, count_ptr, HEADS, DIM, SPLIT, SPLITS, SPLITS_P2, BLOCK_N,
                        BLOCK_D, NEW, ROT, False)

    return partial


def split_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                    config: tuple[int, int, int, int], wrap=None, new: tuple[torch.Tensor, ...] | None = None,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """Run split_attention_kernel: q (batch, heads, 1, head dim), or (batch, 1, heads * head dim) in any row
    stride; keys/values (batch, cache, heads, head dim) in any strides (a transposed view of a head-major cache
    too); config: SPLIT_CONFIGS' (slots a program, slots a step, warps, stages). Returns (batch, 1, heads * head
    dim). wrap: torch.library.wrap_triton inside an op.
    new: this step's (key, value, cos, sin), keys/values (batch, 1, heads * head dim) in q's row stride, cos/sin
    (batch, 1, rotary dims): q and the key are rotated (partial rotary, rotate_half) and the key and value written
    to the row's newest slot (decode_layout's last used one), all inside the kernel.
    counts: (batch * heads) int32, zero (each launch leaves it so; _TokenMajorLayer.step_counts), where the
    blocks of each (row, head) count their arrivals; zeros made here without."""
    partial = split_attention_kernel()
    if wrap is not None:
        partial = wrap(partial)
    _, _, warps, stages = config
    grid, args, constants, out = _attention_launch(q, keys, values, layout, scale, config, new, counts)
    partial[grid](*args, **constants, num_warps=warps, num_stages=stages)
    return out


def _attention_launch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                      config: tuple[int, int, int, int], new: tuple[torch.Tensor, ...] | None,
                      counts: torch.Tensor | None) -> tuple[tuple[int, int], list, dict, torch.Tensor]:
    """split_attention's launch (split_attention's arguments): the grid ((row, head)s, blocks a row), the kernel's
    arguments and constants, and the output it writes."""
    import triton
    batch, heads, dim = q.shape[0], keys.shape[2], keys.shape[3]
    size = keys.shape[1]
    slots, step, _, _ = config
    blocks = triton.cdiv(size, slots)
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


@functools.cache
def attend_out_kernel():
    """One launch for the rest of a fused Phi layer's one-row decode step after layer_in: the step attention
    (split_attention_kernel's programs, with the step's own key and value: rotary, cache writes) and the layer's
    output, [dense | fc2] of [attention | gelu(fc1)] plus the residual (gemv_kernel's programs). The product's
    programs read fc2's columns first (80% of the weights; gelu(fc1) is there already) and dense's last, once every
    head's attention is out (a count the attention's combining programs add to: _wait_for): the attention, ~5 us a
    layer that left the memory idle as a kernel of its own, runs while the product streams its weights, and a layer
    takes two launches instead of three. On an H200 (docs/bench/attend_out.py, 32 layers in a CUDA graph, 65 used
    slots) a layer took 46.4 us instead of 48.2 in bf16 and 78.5 instead of 80.5 in fp32; a 256-token bf16 answer
    ran at 604.7 tok/s instead of 591.7, but the compiled fp32 step was slower (327.8 against 339.3 tok/s), so fp32
    keeps the three launches. (Launching the attention with fc1's product instead, the other half of the layer that
    does not need it, took 47.1-50.1 us; at 8 rows both were slower than before: docs/PERFORMANCE.md.)
    Roles go by the order programs start (a ticket from an atomic count), not by program id: every attention
    program started before any product program that waits for it, so the wait ends whatever order the GPU starts
    programs in. The sync counts (tickets, heads done, products finished) are zero between launches: the program
    that takes the last ticket and the last product to finish set them back."""
    import triton
    import triton.language as tl
    kernel_programs()

    @triton.jit
    def kernel(q_ptr, k_ptr, v_ptr, layout_ptr, acc_ptr, stats_ptr, scale, batch, size, row_stride, slot_stride,
               head_stride, q_stride, knew_ptr, vnew_ptr, cos_ptr, sin_ptr, o_ptr, count_ptr,
               w_ptr, ff_ptr, b_ptr, res_ptr, y_ptr, sync_ptr, N, products,
               HEADS: tl.constexpr, DIM: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr,
               SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NEW: tl.constexpr,
               ROT: tl.constexpr, K: tl.constexpr, K1: tl.constexpr, PRODUCT_N: tl.constexpr,
               PRODUCT_K: tl.constexpr):
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

    return kernel


# attend_out's product launch (rows a program, input columns a step, warps, stages): the fastest of 7 in bf16 and
# in fp32 on an H200 (docs/bench/attend_out.py; layer_out's own (8, 1024, 8, 2) took 52.5 us a layer there)
ATTEND_OUT_BLOCKS = (4, 512, 4, 3)


def attend_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float, counts: torch.Tensor,
               sync: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor,
               wrap=None) -> torch.Tensor:
    """Run attend_out_kernel for one row: the step attention as split_attention(q, keys, values, layout, scale,
    new=(k, v, cos, sin), counts), then weight [attention; ff] + bias + hidden; ff (1, 1, ff width), weight
    (hidden, heads * head dim + ff width), hidden (1, 1, hidden). sync: 3 int32, zero (each launch leaves them so;
    _TokenMajorLayer.step_sync). Returns (1, 1, hidden). wrap: torch.library.wrap_triton inside an op."""
    import triton
    kernel = attend_out_kernel()
    if wrap is not None:
        kernel = wrap(kernel)
    assert q.shape[0] == 1, "one row"
    (heads, blocks), args, constants, out = _attention_launch(q, keys, values, layout, scale, _split_config(1),
                                                              (k, v, cos, sin), counts)
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
    step reads what the answers hold, not the whole cache, at any batch size. Its sibling
    phi2_qlora::decode_step_attention(q, k, v, cos, sin, keys, values, layout, scale, counts) also rotates q and k
    and writes the step's key and value into the cache (in place: the op mutates keys and values): the rotary and
    the two cache writes were kernels of their own, ~3.7 us a layer at batch 1 on an H200. A fused Phi layer's
    decode step of one row in bf16/fp16 calls phi2_qlora::attend_out(q, k, v, cos, sin, keys, values, layout, scale,
    counts, sync, ff, [dense | fc2] weight, bias, hidden): that attention and the layer's output in one launch
    (attend_out_kernel); of one row in fp32, and of 2 to FEW_ROWS rows in bf16/fp16, decode_step_attention. All add
    up the blocks in the one kernel (counts: the cache's step_counts).

    Why (H200, bf16, one layer, docs/bench/decode_attention_split.py): batches attended over every row's whole cache
    with cuDNN, 86 us at batch 64 and 384 slots however many were used; this kernel takes 25, 43 and 65 us at 65,
    192 and 320 used slots. FlashAttention over own slots keeps 64- or 128-query tiles for one query: 63-130 us
    there; at batch 1 it took 7.9-14.8 us, this kernel 6.6-7.6. fp32 had no fused kernel (30 us a layer, masked
    products over the whole cache; this kernel 6.5-7.8)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("phi2_qlora::decode_attention", mutates_args={"counts"})
    def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
               scale: float, counts: torch.Tensor) -> torch.Tensor:
        return split_attention(q, keys, values, layout, scale, _split_config(q.shape[0]), wrap=wrap_triton,
                               counts=counts)

    @triton_op("phi2_qlora::decode_step_attention", mutates_args={"keys", "values", "counts"})
    def attend_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                   counts: torch.Tensor) -> torch.Tensor:
        return split_attention(q, keys, values, layout, scale, _split_config(q.shape[0]), wrap=wrap_triton,
                               new=(k, v, cos, sin), counts=counts)

    @triton_op("phi2_qlora::attend_out", mutates_args={"keys", "values", "counts", "sync"})
    def attend_and_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                       counts: torch.Tensor, sync: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return attend_out(q, k, v, cos, sin, keys, values, layout, scale, counts, sync, ff, weight, bias, hidden,
                          wrap=wrap_triton)

    return attend


def _split_config(batch: int) -> tuple[int, int, int, int]:
    return SPLIT_CONFIGS[min([b for b in SPLIT_CONFIGS if b >= batch], default=max(SPLIT_CONFIGS))]


def decode_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """decode_attention's kernel for decode steps on a model's device and dtype, decided once per layer when fusing
    (outside compiled code, where it also registers the Triton op): "split" (triton_decode_attention, every batch
    size) where triton_gemv runs (compute capability 8.0+, bf16/fp16/fp32: the GPUs these kernels were measured
    on); else "flash" (PyTorch's FlashAttention-2: bf16/fp16 on compute capability 8.0+, a PyTorch whose kernel
    takes seqused_k) for batch 1 only; "products" on the CPU; None elsewhere (a T4, say), where the step keeps
    transformers' attention over the whole cache."""
    if triton_supported(device, dtype):
        triton_decode_attention()
        return "split"
    flash_args = {a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments}
    if _ampere_or_later(device) and dtype in HALF and "seqused_k" in flash_args:
        return "flash"
    return "products" if device.type == "cpu" else None


def reads_own_slots(model, batch: int) -> bool:
    """Whether a fused model's decode steps of `batch` rows attend through decode_attention (DecodeCache +
    decode_layout): with "split" and "products" at every batch size, with "flash" at batch 1 only."""
    kernel = getattr(model.model.layers[0], "decode_kernel", None)
    return kernel is not None and (batch == 1 or kernel != "flash")


class FastDecoder:
    """Decoding with a static KV cache and a compiled, CUDA-graphed decode step (the fast path).

    Why not `generate()` with a static cache: its loop reads a GPU flag after every token (the stopping check), so
    the host waits for the GPU at each step before queuing the next. Here the host queues steps without waiting and
    looks at the new tokens (EOS, the stop marker, streaming) every CHECK_EVERY steps, one chunk behind the GPU; the
    price is up to 2 * CHECK_EVERY steps computed after a stop and thrown away. Measured on an H200 (random-init
    Phi-2, docs/PERFORMANCE.md): 604.2-610.7 tok/s at batch 1 and 16,858-16,895 at batch 64 in bf16, 339 at batch 1 in
    fp32, against 35-60, 2,773-3,891 and 63-66 for generate(). At batch 1 each layer is two Triton launches in
    bf16/fp16 and three in fp32 (_fused_decode_step), a greedy token is picked inside the compiled step
    (_greedy_step) and the prompt is prefilled by a CUDA graph (_PrefillGraph); every row attends over its own used
    slots only (DecodeCache, decode_attention).

    Pieces are transformers' own where they suffice: StaticCache (DecodeCache where rows read their own slots), the
    model's compiled call (`get_compiled_call`, inductor with CUDA graphs on CUDA) and the logits processors. Batches
    prefill eagerly (one call; their shapes vary; prefill_attention's kernels). Batches of up to FEW_ROWS rows read
    [q; k; v; fc1] with triton_gemv and (bf16/fp16) attend with the step attention. Making a decoder fuses the
    model's Phi layers in place (fuse_phi_layers); the model stays usable everywhere.
    """

    def __init__(self, model, tokenizer, context_window: int):
        self.model, self.tokenizer, self.context_window = model, tokenizer, context_window
        self.fused = fuse_phi_layers(model)
        # Static shapes: each (batch, cache bucket) compiles once (30-42 s for Phi-2 on an H200) and replays as its own
        # CUDA graph. A dynamic-shape recompile for batch 64 did not finish in 100 s there, and ran slower.
        self.step = model.get_compiled_call(CompileConfig(dynamic=False))
        self.greedy_step = torch.compile(_greedy_step, **CompileConfig(dynamic=False).to_dict())
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._loops: dict[tuple[int, int], _GreedyLoop] = {}
        # One-row prompts prefill through CUDA graphs where the one-row step runs the layer kernels (the GPUs those
        # were measured on); tests set it on the CPU, where the same padded prefill runs eagerly.
        self.prefill_graphs = self.fused and model.device.type == "cuda" and model.model.layers[0].step_kernels
        self._prefills: dict[tuple[int, int], _PrefillGraph] = {}
        self._prefill_pool = None  # the prefill graphs' shared memory pool: they never run at the same time

    def cache_size(self, batch: int, length: int) -> int:
        """Static cache length for `length` tokens. Each (batch, size) compiles once (30-42 s for Phi-2), so a chat
        (batch 1) uses powers of two from 512: a growing conversation meets at most 3 sizes, the first compiled at
        load. Batches (evaluate.py) use steps of CACHE_BUCKET: attention reads every row's whole cache each step."""
        if batch == 1:
            size = max(512, 1 << (length - 1).bit_length())
        else:
            size = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        return min(self.context_window, size)

    def _cache(self, batch: int, length: int) -> StaticCache:
        size = self.cache_size(batch, length)
        key = (batch, size)
        if key not in self._caches:
            own = self.fused and reads_own_slots(self.model, batch)
            self._caches[key] = (DecodeCache if own else StaticCache)(self.model.config, max_cache_len=size)
        cache = self._caches[key]
        cache.reset()
        return cache

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationSettings,
                 max_new_tokens: int, ignore_eos: bool = False, output_logits: bool = False,
                 cache_length: int = 0) -> tuple[list[list[int]], torch.Tensor | None]:
        """New ids per row, each cut after the token that ended it; plus the raw logits of each step
        (batch, steps, vocab) when asked. input_ids/attention_mask: (batch, prompt) left-padded. cache_length:
        size the cache for at least this many tokens (one shape for many calls)."""
        batch, width = input_ids.shape
        device = input_ids.device
        cache = self._cache(batch, max(width + max_new_tokens, cache_length))
        size = cache.layers[0].max_cache_len
        # One (batch, cache) mask for every call: 0 on left padding, 1 elsewhere; the causal rule hides the future.
        mask = torch.ones(batch, size, dtype=attention_mask.dtype, device=device)
        mask[:, :width] = attention_mask
        position = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, width): positions skip the padding
        # Each row's decode attention reads its used slots [padding, t] (decode_layout).
        layout = decode_layout(width - attention_mask.sum(-1), position[:, -1] + 2, size) \
            if isinstance(cache, DecodeCache) else None
        step_kwargs = {} if layout is None else {"kv_layout": layout}
        seq = torch.empty(batch, width + max_new_tokens, dtype=torch.long, device=device)
        seq[:, :width] = input_ids  # what the repetition penalty looks at, like generate's input_ids
        sample = gen.samples
        eos = self.tokenizer.eos_token_id
        suppress = [eos] if ignore_eos else []  # ignore_eos: benchmarks
        procs = logits_processors(gen, sample, suppress, device, width, eos)
        prefill = self._prefill_graph(cache, attention_mask) if self.prefill_graphs else None
        if prefill is not None:
            logits = prefill(input_ids, write_at=width)  # (1, vocab)
        else:
            with prefill_attention(device):
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position,
                                    past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_position = position[:, -1:] + 1  # (batch, 1)
        # Greedy decoding of one row picks each token inside the compiled step, whose inputs live in one _GreedyLoop
        # per shape: no kernel between two replays of the step's CUDA graph; the repetition penalty too (on an H200,
        # applied by the processors below each token, penalty 1.1 made batch 1 5.9% slower, docs/PERFORMANCE.md).
        # (Batches keep the loop below: with both this and the step attention, batch 64 ran at 13,021 tok/s against
        # 16,259 on an H200.)
        loop = None
        penalty = gen.repetition_penalty if gen.repetition_penalty != 1.0 else None
        if batch == 1 and not (sample or output_logits):
            loop = self._loop(batch, size, mask, next_position, layout, penalty)
        new = loop.tokens if loop is not None else seq[:, width:]  # (batch, >= max_new_tokens): this call's tokens
        rows: list[list[int]] = [[] for _ in range(batch)]
        stop_at: list[int | None] = [None] * batch
        # New tokens reach the host through one pinned buffer, a chunk at a time, each chunk with its CUDA event.
        # (steps, batch): a chunk is a contiguous block; a strided target would make the copy wait for the GPU.
        host = torch.empty(max_new_tokens, batch, dtype=torch.long, pin_memory=device.type == "cuda")
        pending: list[tuple[int, int, torch.cuda.Event | None]] = []
        raw_logits: list[torch.Tensor] = []
        chunk_start = 0

        def take_oldest_chunk() -> None:
            start, end, ready = pending.pop(0)
            if ready is not None:
                ready.synchronize()
            for b, new_ids in enumerate(host[start:end].T.tolist()):
                if stop_at[b] is not None:
                    continue
                checked = len(rows[b])
                rows[b].extend(new_ids)
                stop_at[b] = None if ignore_eos else stop_index(self.tokenizer, rows[b], checked)

        for step in range(max_new_tokens):
            if step == 0 or loop is None:  # the greedy loop's later tokens come from its step
                if not (sample or procs or output_logits):
                    # The argmax is queued before the next replay overwrites this CUDA-graph output; bf16 -> fp32
                    # keeps the order, so this is generate()'s token.
                    token = logits.argmax(-1)  # (batch,)
                else:
                    scores = logits.to(torch.float32, copy=True)  # (batch, vocab); graph outputs are overwritten
                    if output_logits:
                        raw_logits.append(scores.clone())
                    scores = procs(seq[:, :width + step], scores)
                    token = torch.multinomial(scores.softmax(-1), 1)[:, 0] if sample else scores.argmax(-1)
                new[:, step] = token
                if loop is not None:
                    loop.tok.copy_(token[:, None])
                    if penalty is not None:
                        remember(loop.seen, loop.tok, eos)
            done = step + 1 == max_new_tokens
            if (step + 1) % CHECK_EVERY == 0 or done:
                host[chunk_start:step + 1].copy_(new[:, chunk_start:step + 1].T.contiguous(), non_blocking=True)
                ready = None
                if device.type == "cuda":
                    ready = torch.cuda.Event()
                    ready.record()
                pending.append((chunk_start, step + 1, ready))
                chunk_start = step + 1
                # Look at the chunk before this one: by now the GPU has finished it, so this does not stall.
                while len(pending) > (0 if done else 1):
                    take_oldest_chunk()
                if all(s is not None for s in stop_at):
                    break
            if done:
                continue
            if loop is not None:
                self.greedy_step(self.model, cache, loop.tok, loop.pos, loop.mask, loop.layout, loop.tokens,
                                 loop.at, eos if ignore_eos else -1, *((loop.seen, loop.penalty, eos)
                                                                       if penalty is not None else ()))
            else:
                logits = self.step(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                                   past_key_values=cache, use_cache=True, **step_kwargs).logits[:, -1]
                next_position = next_position + 1
                if layout is not None:
                    layout[2].add_(1)
        while pending:
            take_oldest_chunk()
        new_ids = [row if s is None else row[:s + 1] for row, s in zip(rows, stop_at)]
        steps = torch.stack(raw_logits, 1).cpu() if output_logits else None
        return new_ids, steps

    def _prefill_graph(self, cache: StaticCache, attention_mask: torch.Tensor) -> "_PrefillGraph | None":
        """The prefill graph for one prompt without padding of at most PREFILL_BUCKETS[-1] tokens into `cache` (a
        DecodeCache of one row), made on first use; None for anything else (eager prefill)."""
        batch, width = attention_mask.shape
        # (flash_attention_2 would unpad the prompt, reading its lengths on the host: not capturable)
        if batch != 1 or width > PREFILL_BUCKETS[-1] or not isinstance(cache, DecodeCache) or \
                self.model.config._attn_implementation not in ("sdpa", "eager") or \
                not bool(attention_mask.all()):  # the GPU is idle here: the check waits for nothing
            return None
        size = cache.layers[0].max_cache_len
        bucket = min(size, max(64, 1 << (width - 1).bit_length()))
        key = (bucket, size)
        if key not in self._prefills:
            if self._prefill_pool is None and attention_mask.device.type == "cuda":
                self._prefill_pool = torch.cuda.graph_pool_handle()
            self._prefills[key] = _PrefillGraph(self.model, cache, bucket, self._prefill_pool)
        return self._prefills[key]

    def _loop(self, batch: int, size: int, mask: torch.Tensor, position: torch.Tensor,
              layout: torch.Tensor | None, penalty: float | None) -> "_GreedyLoop":
        """The greedy step's inputs for a (batch, cache) shape, set for a new call; tokens come from step 1 on."""
        key = (batch, size)
        if key not in self._loops:
            self._loops[key] = _GreedyLoop.empty(batch, size, self.model.config.vocab_size, mask.dtype,
                                                 layout is not None, mask.device)
        loop = self._loops[key]
        loop.mask.copy_(mask)
        loop.pos.copy_(position)
        if layout is not None:
            loop.layout.copy_(layout)
        loop.at.fill_(1)
        if penalty is not None:
            loop.seen.zero_()
            loop.penalty.fill_(penalty)
        return loop


class _PrefillGraph:
    """A prefill of one prompt of up to `bucket` tokens into `cache` (a DecodeCache of one row), replayed as one CUDA
    graph: FastDecoder's prompts, straight into the row's cache, and BatchDecoder's prompts that join alone, into a
    scratch cache they are copied out of. Why: the eager prefill is ~1,241 kernel launches for Phi-2, which the host
    issues slower than the GPU runs them (a 1-token answer, mostly prefill, took 19.5-38.5 ms on H200s; a 140-token
    prompt 16-17 ms eager, 6.2 ms as a graph: docs/PERFORMANCE.md). (Several prompts at once keep the GPU busy
    anyway: 8 x 192 tokens took 24.7 ms as a graph, 26 eager.) Captured once (an eager warm-up, then the capture: no
    compilation).

    The prompt is padded on the right to the bucket: each token sees only the slots before it (causal), so the
    padding changes none of the prompt's results; the padding's keys and values land in the slots after the prompt,
    which FastDecoder's steps overwrite before any step reads them (each writes its slot, then attends) and
    BatchDecoder never copies out; each layer's write index is then set to `write_at`. On the CPU (tests) the same
    padded prefill runs eagerly."""

    def __init__(self, model, cache: DecodeCache, bucket: int, pool):
        self.model, self.cache, self.pool = model, cache, pool
        size = cache.layers[0].max_cache_len
        device = model.device
        self.ids = torch.zeros(1, bucket, dtype=torch.long, device=device)  # the prompt, then leftovers
        self.positions = torch.arange(bucket, device=device)[None]  # (1, bucket)
        # Token i attends to slots 0..i, in the form the model's attention takes (transformers' own mask, made once
        # here with the cache empty; a 4D mask goes through as it is, None means causal).
        self.mask = create_causal_mask(
            config=model.config, inputs_embeds=torch.empty(1, bucket, 0, dtype=model.dtype, device=device),
            attention_mask=torch.ones(1, size, dtype=torch.long, device=device), past_key_values=cache,
            position_ids=self.positions)
        self.last = torch.zeros(1, dtype=torch.long, device=device)  # the prompt's last token: its logits
        self.write_at = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (1, vocab), the graph's output

    def _forward(self) -> torch.Tensor:
        with prefill_attention(self.ids.device):
            logits = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                                past_key_values=self.cache, use_cache=True, logits_to_keep=self.last).logits[:, -1]
        for layer in self.cache.layers:  # where the next write goes: not after the padding
            layer.cumulative_length.copy_(self.write_at)
        return logits

    def capture(self) -> None:
        """Record the graph now (CUDA; nothing to do elsewhere), on the thread that will replay it."""
        if self.graph is not None or self.ids.device.type != "cuda":
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up, as capture needs: cuBLAS handles, the cache allocated
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the app's server) may use CUDA while this one captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.logits = self._forward()
        self.graph = graph

    def __call__(self, input_ids: torch.Tensor, write_at: int) -> torch.Tensor:
        """The prompt's last logits (1, vocab); the cache holds the prompt from slot 0. input_ids: (1, width) on the
        model's device. A graph output: read it before the next call."""
        width = input_ids.shape[1]
        self.ids[:, :width].copy_(input_ids)
        self.last.fill_(width - 1)
        self.write_at.fill_(write_at)
        if self.ids.device.type != "cuda":
            return self._forward()
        self.capture()
        self.graph.replay()
        return self.logits


@dataclass
class _GreedyLoop:
    """The inputs of FastDecoder's compiled greedy step for one (batch, cache) shape, updated in place by the step
    (CUDA graphs read them at fixed addresses): the last token (batch, 1), its position (batch, 1), the attention
    mask (batch, cache), decode_layout or None, the call's new tokens (batch, cache) and where the next one goes;
    for the repetition penalty the tokens the answer holds (batch, vocab; remember) and the penalty (a tensor: a new
    value compiles nothing)."""
    tok: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    layout: torch.Tensor | None
    tokens: torch.Tensor
    at: torch.Tensor
    seen: torch.Tensor
    penalty: torch.Tensor

    @classmethod
    def empty(cls, batch: int, size: int, vocab: int, mask_dtype: torch.dtype, placed: bool, device: torch.device):
        longs = functools.partial(torch.zeros, dtype=torch.long, device=device)
        loop = cls(longs(batch, 1), longs(batch, 1), torch.zeros(batch, size, dtype=mask_dtype, device=device),
                   torch.zeros(3, batch + 1, dtype=torch.int32, device=device) if placed else None,
                   longs(batch, size), longs(1), torch.zeros(batch, vocab, dtype=torch.bool, device=device),
                   torch.ones((), device=device))
        for t in (loop.tok, loop.pos, loop.mask, loop.layout, loop.tokens, loop.at, loop.seen, loop.penalty):
            if t is not None:
                torch._dynamo.mark_static_address(t)
        return loop


def _greedy_step(model, cache: StaticCache, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                 layout: torch.Tensor | None, tokens: torch.Tensor, at: torch.Tensor, suppress: int,
                 seen: torch.Tensor | None = None, penalty: torch.Tensor | None = None, eos: int = -1) -> None:
    """One greedy decode step, compiled whole (FastDecoder.greedy_step): the model's step, the argmax (never
    `suppress`, a token id, when >= 0: generate's SuppressTokensLogitsProcessor for ignore_eos) and the bookkeeping,
    in place: the token goes to tokens[:, at] and becomes the next input, positions, the layout's used slots and
    `at` advance. bf16 -> argmax keeps generate()'s token (its processors see the logits cast to fp32, same order).
    seen/penalty/eos: AnswerRepetitionPenalty's arithmetic on the fp32 logits of the tokens the answer holds (seen,
    never eos), then the argmax; the new token is remembered."""
    placed = {} if layout is None else {"kv_layout": layout}
    logits = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1, **placed).logits[:, -1]  # (batch, vocab)
    if seen is not None:
        logits = logits.float()
    if suppress >= 0:
        logits[:, suppress] = float("-inf")
    if seen is not None:
        logits = penalize(logits, seen, penalty)
    token = chunked_argmax(logits)  # (batch,)
    if seen is not None:
        remember(seen, token[:, None], eos)
    tokens.index_copy_(1, at, token[:, None])
    tok.copy_(token[:, None])
    pos.add_(1)
    at.add_(1)
    if layout is not None:
        layout[2].add_(1)


def chunked_argmax(scores: torch.Tensor, chunks: int = 64) -> torch.Tensor:
    """scores.argmax(-1), (rows, vocab) -> (rows,), in two passes for compiled code: under inductor one row's argmax
    is one program walking all of Phi-2's 51,200 logits, 9.8 us of each 1.7 ms step on an H200 (docs/PERFORMANCE.md);
    here `chunks` programs a row each find their chunk's maximum, then the first chunk holding the row's maximum
    gives the index. The same token as argmax: the first index of the maximum."""
    rows, vocab = scores.shape
    width = -(-vocab // chunks)
    if width * chunks > vocab:  # -inf after the last: never before a real maximum
        scores = F.pad(scores, (0, width * chunks - vocab), value=float("-inf"))
    best, where = scores.view(rows, chunks, width).max(-1)  # (rows, chunks) each
    chunk = best.argmax(-1, keepdim=True)  # (rows, 1)
    return (chunk * width + where.gather(1, chunk))[:, 0]


def penalize(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """AnswerRepetitionPenalty's arithmetic on fp32 scores (rows, vocab) of the tokens marked in `seen` (rows,
    vocab; remember): negative ones times the penalty, others divided by it. penalty: a tensor, () or (rows, 1)."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def remember(seen: torch.Tensor, token: torch.Tensor, eos: int) -> None:
    """Mark each row's new token (batch, 1) in `seen` (batch, vocab), the tokens the repetition penalty counts:
    never eos (AnswerRepetitionPenalty's rule)."""
    seen.scatter_(1, token, True)
    seen[:, eos] = False


class Busy(RuntimeError):
    """Every place in the queue is taken: the request is turned away now (HTTP 429) rather than waiting unbounded.
    retry_after: seconds after which a place is likely free."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NonFiniteScores(RuntimeError):
    """The model's scores for one answer were NaN or infinite: that answer is stopped, the others go on."""


class ShuttingDown(RuntimeError):
    """The server is stopping: answers in flight end with this error, new ones are refused."""


@dataclass(eq=False)
class _Answer:
    """One streamed answer in BatchDecoder: what was asked, and where it stands."""
    ids: list[int]
    gen: GenerationSettings
    sink: object                              # gets put(new token ids) and end(error or None); see submit
    generator: torch.Generator
    procs: LogitsProcessorList | None = None  # None: greedy (one argmax, and the penalty, for all such rows at once)
    cancel: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None        # a failure of this answer alone, found in the batch loop
    done: bool = False
    began: float = field(default_factory=time.monotonic)
    seq: torch.Tensor | None = None           # (1, prompt + max_new_tokens) on the device: what the penalty reads
    start: int = 0                            # cache slot of its first prompt token; it occupies [start, write index)
    new: list[int] = field(default_factory=list)  # tokens the host has seen
    queued: int = 0                           # decode steps queued on the device (the host sees them a chunk later)
    streamed: int = 0

    @property
    def max_new_tokens(self) -> int:
        return self.gen.max_new_tokens

    @property
    def remaining(self) -> int:
        """Tokens still allowed, by what the host has seen."""
        return self.max_new_tokens - len(self.new)

    @property
    def to_queue(self) -> int:
        """Decode steps still to queue: the first token comes from the prefill, each step gives one more."""
        return self.max_new_tokens - 1 - self.queued


class BatchDecoder:
    """Continuous batching: the streamed answers of every user decoded together, one model step for all of them.

    A request that arrives while others are being generated joins them at the next chunk boundary (every
    CHECK_EVERY steps when compiled, every step otherwise): its prompt is run (prefill; the prompts waiting at one
    boundary in one forward pass; on a GPU, one alone through a CUDA graph captured at load: _PrefillGraph) and its
    keys and values are copied into a free row of the shared static KV cache; a finished or cancelled answer frees
    its row at the next boundary. Each answer still streams to its own client, with its own sampling settings, stop
    rules and seed (greedy rows' repetition penalties applied to all rows at once, as AnswerRepetitionPenalty
    computes them).
    The host queues a chunk before it reads the previous one's tokens (one chunk behind the GPU, as FastDecoder), so
    a finished answer costs up to one chunk of wasted steps; a joining answer first waits for the queued chunk.

    The cache layout: one write index t shared by all rows (transformers' StaticCache writes every row at the same
    slot); each row holds its prompt and answer in the slots just before t, [start, t), and its attention mask hides
    the slots before start. Positions (rotary) are per row, so where a row sits in the cache does not change its
    math: a row's greedy answer is the answer it gets alone (tested exactly in fp32 on the CPU). When a new prompt
    does not fit before t, or the answers would run past the cache end, the rows are moved together (one block copy
    per layer) to a tighter or larger cache. The batch has two shapes: 1 row while one answer is generated (the
    single user gets batch-1 speed, the row moved to the cache's start) and `slots` rows once a second one joins;
    each (rows, cache size) shape is compiled once, like FastDecoder's. Fused, each row attends over its own slots
    [start, t] of a DecodeCache (decode_layout; with FlashAttention, the one-row shape only), as FastDecoder's rows.

    Admission: at most `slots` answers are decoded and `max_waiting` more wait, in arrival order; past that, submit
    raises Busy at once (the caller answers 429). The rows share one write index, so a prompt joins only if
    max(held, its length) + max(steps left, its max_new_tokens) fits the context window. An answer that does not fit
    yet waits at the head; one behind it may join first only if it fits now and will have finished (at its
    max_new_tokens) by the time the answers already running reach theirs: it never pushes back the moment at which
    the waiting one is sure to fit, so that one is never starved; it joins as soon as it fits, before later arrivals.

    One request cannot fail another: what comes from a request (its settings, its sampling processors, its prompt)
    is checked and built in `submit`, in the caller's thread, so a value that cannot be used raises to that caller
    alone; in the loop, what is done for one answer (its sampled token, its stop rules, handing its tokens over) is
    guarded per answer, and a row whose scores are not finite is found on the device without an assert (its token
    marked -1 for the host) and fails alone (NonFiniteScores). Only a failure of the shared model step fails every
    answer it held, and then every client hears of it.

    Runs on the ChatModel's generation thread (`executor().submit`); `submit`, `cancel` and `shutdown` are safe from
    any thread.
    """

    def __init__(self, model, tokenizer, context_window: int, slots: int, compiled: bool, executor,
                 max_waiting: int = 32):
        self.model, self.tokenizer, self.context_window = model, tokenizer, context_window
        self.slots, self.executor, self.max_waiting = slots, executor, max_waiting
        self.fused = compiled and fuse_phi_layers(model)
        if compiled:
            self.step = model.get_compiled_call(CompileConfig(dynamic=False))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        else:
            self.step = model
        self.device = model.device
        # The host looks at new tokens (and admits new answers) every CHECK_EVERY steps on the compiled path, which
        # must not wait for the GPU each token; eager steps (the CPU) wait anyway, so there it streams every token.
        self.check_every = CHECK_EVERY if compiled else 1
        self._lock = threading.Lock()
        self._waiting: list[_Answer] = []
        self._in_flight = 0  # answers submitted and not yet finished: waiting, being admitted or in a row
        self._running = False
        self._closed: ShuttingDown | None = None
        self._durations: list[float] = []  # seconds of the last answers, for Busy's retry_after
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self.most_rows = 0  # the most answers ever decoded together (a record for tests and benchmarks)
        # where the loop's time went, for benchmarks: prefill passes, prompts, seconds admitting answers (prefill,
        # cache moves, first tokens), decode steps queued, answers in those steps (answer_steps / steps = rows), and
        # steps by compiled shape
        self.record = Counter()
        # A prompt that joins alone prefills through a CUDA graph of its padded length (_PrefillGraph), all captured
        # at load (capture_prefill_graphs), where the one-row step runs the layer kernels (as FastDecoder's); tests
        # set it on the CPU, where the same padded prefill runs eagerly. The graphs' scratch caches share storage.
        self.prefill_graphs = self.fused and self.device.type == "cuda" and model.model.layers[0].step_kernels
        self._prefills: dict[int, _PrefillGraph] = {}
        self._prefill_pool = None
        self._scratch: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._reset()

    def _reset(self) -> None:
        self.rows: list[_Answer | None] = []
        self.cache: StaticCache | None = None
        self.t = 0
        self.tok = self.pos = self.mask = self.layout = None
        # Greedy rows' repetition penalty, applied to all rows at once (_decode_chunk): the tokens each row's answer
        # holds (rows, vocab; remember) and each row's penalty (rows,), 1 where none (x * 1 and x / 1 are x).
        self.seen = self.penalty = None
        self._pending = None  # the last queued chunk: (host tokens, ready event, its rows), not yet looked at
        self._admitting: list[_Answer] = []  # answers taken from the queue whose prefill has not finished

    # ------------------------------------------------------------------------------------------------------------
    def submit(self, ids: list[int], gen: GenerationSettings, sink, seed: int | None = None) -> _Answer:
        """Queue one answer to prompt `ids`, of up to gen.max_new_tokens tokens; returns its handle (for cancel).

        `sink` gets, on the generation thread, put(list of new token ids) as they are decided (cut after the token
        that ends the answer: EOS or the `### Human:` marker) and then end(None), or end(error) when the answer
        failed. Raises ValueError for a request that cannot be decoded, Busy when the queue is full, ShuttingDown
        after shutdown; all of it here, in the caller's thread."""
        vocab = self.model.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"the prompt must be 1 or more token ids in [0, {vocab})")
        if len(ids) + gen.max_new_tokens > self.context_window:
            raise ValueError(f"{len(ids)} prompt tokens + {gen.max_new_tokens} new tokens exceed the "
                             f"{self.context_window}-token context window")
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        # sampling: generate()'s processors and warpers, this answer alone (their constructors check the values)
        procs = logits_processors(gen, True, [], self.device, len(ids), self.tokenizer.eos_token_id) \
            if gen.samples else None
        answer = _Answer(list(ids), gen, sink, generator, procs)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            if self._in_flight >= self.slots + self.max_waiting:
                raise Busy(f"the server is busy: all {self.slots} rows are answering and its queue of "
                           f"{self.max_waiting} is full", self._retry_after())
            self._in_flight += 1
            self._waiting.append(answer)
            if not self._running:
                self._running = True
                self.executor().submit(self._serve)
        return answer

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent answers' mean time, per slot, for the queue ahead."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(60, round(mean * (1 + len(self._waiting) / self.slots))))

    def cancel(self, answer: _Answer) -> None:
        """Stop an answer: one still waiting leaves the queue now; one being written frees its row at the next
        chunk boundary (the host stops looking at its tokens then)."""
        answer.cancel.set()
        with self._lock:
            waiting = answer in self._waiting
            if waiting:
                self._waiting.remove(answer)
        if waiting:
            self._finish(answer)

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Refuse new answers and end every answer in flight with ShuttingDown (waiting ones now, the ones being
        written at the loop's next chunk boundary)."""
        with self._lock:
            self._closed = ShuttingDown(reason)
            waiting, self._waiting = self._waiting, []
        for answer in waiting:
            self._finish(answer, self._closed)

    def _serve(self) -> None:
        """The batch loop: admit, decode a chunk, hand out its tokens; until no answer is left."""
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        closed = self._closed
                        if closed is None and not self._waiting and not any(self.rows) and self._pending is None:
                            self._running = False
                            self._reset()
                            return
                    if closed is not None:  # shutdown: the rows' clients hear of it below
                        raise closed
                    self._free_cancelled()
                    while group := self._pick():
                        self._flush()  # the layout may change: every queued token must be seen first
                        begun = time.perf_counter()
                        self._admit(group)
                        self.record["admit_s"] += time.perf_counter() - begun
                    if any(a is not None and a.to_queue > 0 for a in self.rows):
                        self._decode_chunk()
                    else:
                        self._flush()
        except BaseException as error:  # every waiting client must hear of it, not hang
            with self._lock:
                held = [a for a in self.rows if a]
                answers = held + [a for a in self._admitting if a not in held] + self._waiting
                self._waiting, self._running = [], False
                self._reset()
            for a in answers:
                self._finish(a, error=error)
            if not isinstance(error, ShuttingDown):
                raise

    # ------------------------------------------------------------------------------------------------------------
    def _size_for(self, length: int) -> int:
        return min(self.context_window, max(512, 1 << (max(length, 1) - 1).bit_length()))

    def _cache_for(self, batch: int, size: int) -> StaticCache:
        key = (batch, size)
        if key not in self._caches:
            own = self.fused and reads_own_slots(self.model, batch)
            self._caches[key] = allocated((DecodeCache if own else StaticCache)(self.model.config, max_cache_len=size),
                                          self.model, batch)
        return self._caches[key]

    # ------------------------------------------------------------------------------------------------------------
    def prefill_bucket(self, prompts: int, width: int) -> int | None:
        """The length of the prefill graph that takes a group of `prompts` prompts of up to `width` tokens: one prompt
        (a user who joins alone: its eager prefill is launch-bound) up to PREFILL_BUCKETS[-1] tokens, with attention
        the padded mask goes through (flash_attention_2 unpads on the host); None: eager."""
        if prompts != 1 or self.model.config._attn_implementation not in ("sdpa", "eager"):
            return None
        return next((bucket for bucket in PREFILL_BUCKETS if bucket >= width), None)

    def capture_prefill_graphs(self) -> None:
        """Capture every prefill graph now, on the generation thread where they replay (ChatModel.warm_up): the user
        who brought a new length would otherwise wait for its warm-up and capture, two eager prefills."""
        if not self.prefill_graphs:
            return

        def capture():
            with torch.inference_mode():
                for bucket in PREFILL_BUCKETS:
                    self._prefill_graph(bucket).capture()
        self.executor().submit(capture).result()

    def _prefill_graph(self, bucket: int) -> "_PrefillGraph":
        if bucket not in self._prefills:
            if self._scratch is None:  # one (keys, values) pair a layer for every graph's scratch cache
                config = self.model.config
                numel = PREFILL_BUCKETS[-1] * config.hidden_size  # tokens x heads x head dim
                self._scratch = [tuple(torch.zeros(numel, dtype=self.model.dtype, device=self.device)
                                       for _ in range(2)) for _ in range(config.num_hidden_layers)]
                if self.device.type == "cuda":
                    self._prefill_pool = torch.cuda.graph_pool_handle()
            scratch = allocated(DecodeCache(self.model.config, bucket, storage=self._scratch), self.model, 1)
            self._prefills[bucket] = _PrefillGraph(self.model, scratch, bucket, self._prefill_pool)
        return self._prefills[bucket]

    def _relayout(self, batch: int, size: int, t: int) -> None:
        """Move the active rows to rows 0.. of the (batch, size) cache, every row shifted by the same amount so that
        they end at write index t (one block copy per layer)."""
        active = [(i, a) for i, a in enumerate(self.rows) if a]
        cache = self._cache_for(batch, size)
        shift = t - self.t
        if active:
            first = min(a.start for _, a in active)
            src = torch.tensor([i for i, _ in active], device=self.device)
            for old, new in zip(self.cache.layers, cache.layers):
                keys, values = old.keys[src, :, first:self.t], old.values[src, :, first:self.t]  # copies
                new.keys[:len(active), :, first + shift:t] = keys
                new.values[:len(active), :, first + shift:t] = values
        mask = torch.ones(batch, size, dtype=torch.long, device=self.device)  # free rows attend anywhere (finite)
        tok = torch.full((batch, 1), self.tokenizer.eos_token_id, dtype=torch.long, device=self.device)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        seen = torch.zeros(batch, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        penalty = torch.ones(batch, device=self.device)
        for row, (i, a) in enumerate(active):
            a.start += shift
            mask[row, :a.start] = 0
            tok[row], pos[row], seen[row], penalty[row] = self.tok[i], self.pos[i], self.seen[i], self.penalty[i]
        self.rows = [a for _, a in active] + [None] * (batch - len(active))
        self.cache, self.t, self.tok, self.pos, self.mask = cache, t, tok, pos, mask
        self.seen, self.penalty = seen, penalty
        self._place_rows()
        for layer in cache.layers:
            layer.cumulative_length.fill_(t)

    def _place_rows(self) -> None:
        """Where the next decode step's rows sit in a DecodeCache (decode_layout): an answer's tokens are the slots
        [start, t], its next token (position pos) goes to slot t; a free row reads [0, pos] (finite, thrown away).
        In a StaticCache rows attend with the mask."""
        self.layout = None
        if isinstance(self.cache, DecodeCache):
            starts = torch.tensor([a.start if a else 0 for a in self.rows], device=self.device)
            self.layout = decode_layout(starts, self.pos[:, 0] + 1, self.cache.layers[0].max_cache_len)

    def _free_cancelled(self) -> None:
        """Rows whose client left are freed now, before another chunk is queued for them (their queued tokens are
        never looked at)."""
        for row, answer in enumerate(self.rows):
            if answer is not None and answer.cancel.is_set():
                self.rows[row] = None
                self._finish(answer)

    def _pick(self) -> list[_Answer]:
        """The waiting answers that join at this boundary, by the admission rule in the class docstring; the
        prompts of one group are prefilled in one pass of up to PREFILL_TOKENS padded tokens (the rest join in the
        next pass), so the last of several users who arrive at once does not wait behind the others' prefills."""
        group: list[_Answer] = []
        with self._lock:
            active = [a for a in self.rows if a]
            left = max([self.t - a.start for a in active], default=0)  # the smallest write index that fits all
            need = max([a.to_queue for a in active], default=0)
            blocked = False
            for answer in list(self._waiting):
                if len(active) + len(group) >= self.slots:
                    break
                length, budget = len(answer.ids), answer.max_new_tokens
                wider, longer = max(left, length), max(need, budget)
                if (active or group) and wider + longer > self.context_window:
                    blocked = True  # it joins once earlier answers have ended
                    continue
                if blocked and budget - 1 > need:
                    continue  # it would outlast the running answers: the waiting one goes first
                if group and (len(group) + 1) * max(length, *(len(a.ids) for a in group)) > PREFILL_TOKENS:
                    break
                self._waiting.remove(answer)
                group.append(answer)
                left, need = wider, longer
            self._admitting = group
        return group

    def _admit(self, group: list[_Answer]) -> None:
        """Move `group` into free rows: the cache re-laid out if its shape or room must change, then the prefill."""
        active = [a for a in self.rows if a]
        left = max([self.t - a.start for a in active] + [len(a.ids) for a in group])
        need = max([a.to_queue for a in active] + [a.max_new_tokens for a in group])
        batch = self.slots if active or len(group) > 1 else 1
        if (not active or batch != len(self.rows) or self.t < left
                or self.t + need > self.cache.layers[0].max_cache_len):
            self._relayout(batch, self._size_for(left + need), left)
        self._prefill(group)
        self._admitting = []

    def _prefill(self, group: list[_Answer]) -> None:
        """Run the prompts of `group` through the model in one pass (right-padded: causal attention keeps each
        prompt's tokens from seeing the padding after them, so each row computes what it computes alone), copy each
        one's keys and values into a free row of the shared cache, ending at the write index, and choose its first
        token. One prompt alone is a prefill graph's pass (padded further to its bucket), several an eager one."""
        lengths = [len(a.ids) for a in group]
        ids = torch.full((len(group), max(lengths)), self.tokenizer.eos_token_id, dtype=torch.long)
        for i, answer in enumerate(group):
            ids[i, :lengths[i]] = torch.tensor(answer.ids)
        rows = [i for i, a in enumerate(self.rows) if a is None][:len(group)]
        # Every prompt's slots as index lists (prompt's row and slot in the prefill's cache, row and slot in the
        # shared one: [start, t)), for one gather and one scatter per tensor and layer below (a slice copy per
        # prompt, tensor and layer took 5.8 ms for 8 prompts on an H200, these 2.3); sent before the prefill, while
        # the GPU is idle (a copy from the host waits for it).
        sizes = torch.tensor(lengths)
        slots = torch.cat([torch.arange(n) for n in lengths])
        where = torch.stack([torch.arange(len(group)).repeat_interleave(sizes), slots,
                             torch.tensor(rows).repeat_interleave(sizes),
                             slots + self.t - sizes.repeat_interleave(sizes)])
        ids, (source_rows, source_slots, target_rows, target_slots) = ids.to(self.device), where.to(self.device)
        bucket = self.prefill_bucket(len(group), max(lengths)) if self.prefill_graphs else None
        if bucket is not None:
            graph = self._prefill_graph(bucket)
            logits = graph(ids, write_at=0)  # (1, vocab)
            scratch = graph.cache  # the prompt from slot 0
            self.record["graph_prefills"] += 1
        else:
            last = torch.tensor(lengths, device=self.device)[:, None] - 1  # (prompts, 1): each one's last position
            scratch = DynamicCache(config=self.model.config)
            with prefill_attention(self.device):
                logits = self.model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=self.device)[None],
                                    past_key_values=scratch, use_cache=True, logits_to_keep=last).logits[:, -1]
        for answer, length in zip(group, lengths):
            answer.start = self.t - length
        for source, target in zip(scratch.layers, self.cache.layers):  # keys/values: (rows, heads, slots, head dim)
            target.keys[target_rows, :, target_slots] = source.keys[source_rows, :, source_slots]
            target.values[target_rows, :, target_slots] = source.values[source_rows, :, source_slots]
        eos = self.tokenizer.eos_token_id
        first = torch.empty(len(group), dtype=torch.long, device=self.device)
        for i, (row, answer) in enumerate(zip(rows, group)):
            self.mask[row] = 1
            self.mask[row, :answer.start] = 0
            if answer.procs is not None:  # sampling: what the penalty reads, like generate()'s input_ids
                answer.seq = torch.empty(1, lengths[i] + answer.max_new_tokens, dtype=torch.long, device=self.device)
                answer.seq[0, :lengths[i]] = ids[i, :lengths[i]]
            # greedy rows: the penalty with all rows at once (its first token has no answer tokens to penalize)
            self.penalty[row] = 1.0 if answer.gen.samples else answer.gen.repetition_penalty
            self.seen[row] = False
            token, ok = self._choose(answer, logits[i:i + 1], 0)
            first[i] = token.where(ok, -1)[0]
            self.tok[row, 0], self.pos[row, 0] = token[0], lengths[i]
            self.rows[row] = answer
        remember(self.seen, self.tok, eos)  # the other rows' tokens are there already
        self._place_rows()
        self.record.update(prefill_passes=1, prompts=len(group))
        self.most_rows = max(self.most_rows, sum(a is not None for a in self.rows))
        for answer, token in zip(group, first.tolist()):  # one wait for the GPU for the whole group
            self._take(answer, [token])

    def _choose(self, answer: _Answer, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of one answer from its logits (1, vocab), as generate() would choose it, and whether its
        scores were finite (1,) bool. Nothing here waits for the GPU or can assert on it: scores with a NaN or an
        infinity (their maximum is not finite) sample from a uniform stand-in, and the host fails the answer."""
        if answer.error is not None:
            return logits.new_zeros(1, dtype=torch.long), logits.new_zeros(1, dtype=torch.bool)
        if answer.procs is None:
            best, token = logits.max(-1)  # the first index of the maximum, as argmax; NaN propagates to best
            return token, torch.isfinite(best)
        width = len(answer.ids)
        try:
            scores = answer.procs(answer.seq[:, :width + step], logits.to(torch.float32, copy=True))
            ok = torch.isfinite(scores.max(-1).values)
            probs = torch.where(ok[:, None], scores.softmax(-1), 1.0)
            token = torch.multinomial(probs, 1, generator=answer.generator)[:, 0]
        except Exception as error:  # this answer's own processors: it fails alone
            answer.error = error
            return logits.new_zeros(1, dtype=torch.long), logits.new_zeros(1, dtype=torch.bool)
        answer.seq[0, width + step] = token[0]
        return token, ok

    def _decode_chunk(self) -> None:
        """Queue up to check_every steps for every row without waiting for the GPU; then look at the chunk queued
        before this one (the GPU has finished it by now, so the host never stalls it)."""
        rows = list(self.rows)
        steps = min(self.check_every, max(a.to_queue for a in rows if a))
        chunk = torch.empty(len(rows), steps, dtype=torch.long, device=self.device)
        # Greedy rows with a repetition penalty: AnswerRepetitionPenalty's arithmetic for all rows in a few kernels
        # (per row, generate()'s processors were ~10 small kernels a step).
        penalized = any(a is not None and a.procs is None and a.gen.repetition_penalty != 1.0 for a in rows)
        eos = self.tokenizer.eos_token_id
        for s in range(steps):
            placed = {} if self.layout is None else {"kv_layout": self.layout}
            logits = self.step(input_ids=self.tok, attention_mask=self.mask, position_ids=self.pos,
                               past_key_values=self.cache, use_cache=True, **placed).logits[:, -1]  # (batch, vocab)
            # One argmax for every row, then the rows that sample overwrite theirs. A row whose best score is not
            # finite (NaN propagates to the maximum) goes to the host as -1; its token (an index, always in range)
            # is the next step's input until the host drops the row.
            if penalized:
                best, token = penalize(logits.float(), self.seen, self.penalty[:, None]).max(-1)
                remember(self.seen, token[:, None], eos)
            else:
                best, token = logits.max(-1)  # (batch,) each
            ok = torch.isfinite(best)
            for row, answer in enumerate(rows):
                made = 1 + answer.queued + s if answer is not None else 0  # tokens before this one
                if answer is not None and answer.procs is not None and made < answer.max_new_tokens:
                    token[row], ok[row] = (t[0] for t in self._choose(answer, logits[row:row + 1], made))
            chunk[:, s] = token.where(ok, -1)
            self.tok = token[:, None]
            self.pos = self.pos + 1
            if self.layout is not None:
                self.layout[2].add_(1)
        for answer in rows:
            if answer is not None:
                answer.queued += steps
        self.record.update(steps=steps, answer_steps=steps * sum(a is not None for a in rows))
        self.record[f"steps at {len(rows)} rows x {self.cache.layers[0].max_cache_len} slots"] += steps
        self.t += steps
        host = torch.empty(chunk.shape, dtype=torch.long, pin_memory=self.device.type == "cuda")
        host.copy_(chunk, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        previous, self._pending = self._pending, (host, ready, rows)
        if previous is not None:
            self._look(previous)
        active = [a for a in self.rows if a]
        if len(active) == 1 and len(self.rows) > 1:  # back to the one-row shape: batch-1 speed for the last user
            self._flush()
            if active[0] in self.rows:
                # its slots move to the start of the one-row cache, which is sized for them and what is still to come
                held = self.t - active[0].start
                self._relayout(1, self._size_for(held + active[0].to_queue), held)

    def _flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._look(pending)

    def _look(self, pending) -> None:
        host, ready, rows = pending
        if ready is not None:
            ready.synchronize()
        new = host.tolist()
        for row, answer in enumerate(rows):
            if answer is not None and not answer.done:
                self._take(answer, new[row])

    def _take(self, answer: _Answer, tokens: list[int]) -> None:
        """New tokens of one answer (-1: its scores were not finite): stop rules, handing them over, and the end of
        the answer. Whatever fails here fails this answer alone."""
        stop = None
        try:
            if answer.error is not None:
                raise answer.error
            checked = len(answer.new)
            tokens = tokens[:answer.remaining]
            bad = tokens.index(-1) if -1 in tokens else None
            answer.new.extend(tokens[:bad])
            stop = stop_index(self.tokenizer, answer.new, checked)
            if stop is not None:
                answer.new = answer.new[:stop + 1]
            if len(answer.new) > answer.streamed:
                answer.sink.put(answer.new[answer.streamed:])
                answer.streamed = len(answer.new)
            if bad is not None and stop is None:
                raise NonFiniteScores(
                    f"the model's scores for this answer were not finite (NaN or infinity) at token "
                    f"{len(answer.new) + 1}: it was stopped there. Other answers are not affected; the model or its "
                    "dtype overflowed (fp16 often does: serve in bf16 or fp32)")
        except Exception as error:
            answer.error = error
        if answer.error is not None or stop is not None or answer.remaining <= 0 or answer.cancel.is_set():
            if answer in self.rows:
                row = self.rows.index(answer)
                self.rows[row] = None
                if isinstance(answer.error, NonFiniteScores):
                    # Its slots may hold NaN, and a masked slot still multiplies: 0 * NaN is NaN. A later answer in
                    # this row would read them (StaticCache rows attend over the whole row, masked).
                    for layer in self.cache.layers:
                        layer.keys[row].zero_()
                        layer.values[row].zero_()
            self._finish(answer, answer.error)

    def _finish(self, answer: _Answer, error: BaseException | None = None) -> None:
        """The answer's end, told to its sink once; its place in the queue is free again."""
        with self._lock:
            if answer.done:
                return
            answer.done = True
            self._in_flight -= 1
            self._durations = self._durations[-31:] + [time.monotonic() - answer.began]
        try:
            answer.sink.end(error)
        except Exception:  # a sink that fails must not stop the loop for the others
            logger.exception("the end of an answer could not be handed over")

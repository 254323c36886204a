"""Phi's decoder layers rewritten for decoding, and the decode cache they read.

fuse_phi_layers makes each layer read its weights with two products instead of six ([q; k; v; fc1] and
[dense | fc2]), and gives it a decode step that, on a GPU with Triton, runs decode_kernels.py's kernels (the products with
the layer norm, gelu and residual inside; the attention over each row's own cache slots; both in one launch for one
row). DecodeCache is transformers' StaticCache stored token-major, so one row's slots are one block (kv_bytes_per_token
and kv_budget_for: the memory it takes and may take); decode_layout says where each row's slots are;
decode_attention attends one query a row over them. The decoders (decoding.py, batching.py) build on these. Where the kernels are used is decided here once per layer when fusing
(triton_supported, decode_kernel); why, with the measurements, is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import StaticCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb, eager_attention_forward

# Decode steps of up to this many rows (BatchDecoder's 8 users, small batches) read [q; k; v; fc1] with triton_gemv;
# bigger batches use cuBLAS, which is faster there (docs/PERFORMANCE.md).
FEW_ROWS = 8  # at most 16: rows_kernel pads x to 16 rows


HALF = (torch.bfloat16, torch.float16)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # gelu's tanh approximation, as layer_in computes it


def _ampere_or_later(device: torch.device) -> bool:
    """A GPU of compute capability 8.0+: where decode_kernels.py's kernels run (and were measured)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def triton_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps use decode_kernels.py's Triton kernels: triton_gemv (bf16/fp16 up to FEW_ROWS rows, fp32 one
    row) and triton_decode_attention, on a GPU of compute capability 8.0+ with Triton (PyTorch's CUDA builds ship
    it). Decided once per layer when fusing, outside compiled code."""
    return _ampere_or_later(device) and dtype in (*HALF, torch.float32) and \
        importlib.util.find_spec("triton") is not None


def fuse_phi_layers(model) -> bool:
    """Rewire each Phi decoder layer to read its weights with two matrix products instead of six.

    A Phi layer feeds one normalized input to q, k, v and fc1, and adds dense(attention) to fc2(gelu(fc1)): so
    [q; k; v; fc1] is one (7680 + 10240) x 2560 product and [dense | fc2] one 2560 x 12800 product. At batch 1 each
    product is a matrix-vector pass over its weights, and small ones do not reach the GPU's bandwidth
    (docs/PERFORMANCE.md). The math is the same; the sums are ordered differently (tested: fp32 logits within
    rounding of the unfused model's).

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
        layer.gemv = None
        if triton_supported(device, dtype):
            import decode_kernels  # Triton's; imported only where it runs
            layer.gemv = decode_kernels.triton_gemv()
        # decode steps in a few kernels (_fused_decode_step): Triton's, and Phi-2's own layer (tanh gelu, no q/k norm)
        layer.step_kernels = layer.decode_kernel == "split" and model.config.hidden_act in TANH_GELU \
            and not attn.qk_layernorm
        if layer.step_kernels:
            import decode_kernels
            decode_kernels.triton_layer_products()
            norm = layer.input_layernorm
            layer.norm_sums, layer.norm_bias = norm_folded(layer.fused_in_weight, layer.fused_in_bias, norm.weight,
                                                           norm.bias)
            for t in (layer.norm_sums, layer.norm_bias):
                torch._dynamo.mark_static_address(t, guard=False)
        layer.forward = _fused_phi_layer_forward.__get__(layer)
    head = model.lm_head
    if model.model.layers[0].gemv is not None and head.bias is not None and not hasattr(head, "gemv"):
        # one row's logits through triton_gemv too: faster than cuBLAS in bf16 and fp32 (docs/PERFORMANCE.md)
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
    # faster than cuBLAS; for 2-8 rows only [q; k; v; fc1] (on [dense | fc2] the rows kernel was slower:
    # docs/PERFORMANCE.md).
    # (fp32: one row only; rows_kernel's tensor-core product would round x and w to TF32)
    few = self.gemv is not None and x.shape[1] == 1 and x.shape[0] <= (FEW_ROWS if x.dtype != torch.float32 else 1)
    linear_in = self.gemv if few else F.linear
    linear_out = self.gemv if few and x.shape[0] == 1 else F.linear
    q, k, v, ff = linear_in(x, self.fused_in_weight, self.fused_in_bias).split(self.fused_in_sizes, dim=-1)
    if stepping and x.shape[0] <= FEW_ROWS and x.dtype in HALF:
        # A few users' step (BatchDecoder's rows): the rotary, the cache writes and the attention in the one-row
        # step's attention kernel (decode_step_attention) instead of ~4 kernels; no write index advanced (the
        # decoders keep theirs): a faster 8-row step in bf16 (fp32 was not measured, so it keeps the kernels
        # before); attend_out with a rows-kernel product was slower than cuBLAS here (docs/PERFORMANCE.md).
        layer = past_key_values.layers[attn.layer_idx]
        cos, sin = position_embeddings  # (batch, 1, rotary dims)
        out = torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, layer.token_keys, layer.token_values,
                                                         kv_layout, attn.scaling, layer.max_cache_len,
                                                         layer.step_counts)
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
        k, v = past_key_values.update(k, v, attn.layer_idx, kv_layout=kv_layout)
    if kv_layout is not None and q.shape[-2] == 1 and isinstance(past_key_values, DecodeCache):
        layer = past_key_values.layers[attn.layer_idx]
        out = decode_attention(q, layer.token_keys, layer.token_values, kv_layout, attn.scaling,
                               self.decode_kernel, layer.step_counts, layer.max_cache_len)  # (batch, 1, heads * dim)
    else:
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        if q.shape[-2] == 1 and q.dtype == torch.float32 and attention_mask is not None:
            # A batched decode step in fp32: PyTorch's fp32 SDPA kernel (memory-efficient, 64 x 128 tiles for one
            # query) took over a quarter of the step; two small batched products and a softmax read the cache once
            # (docs/PERFORMANCE.md).
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
    (decode_step_attention) and layer_out ([dense | fc2], the residual) one after the other: attend_out made the
    compiled fp32 step slower (docs/PERFORMANCE.md has each step's speeds). The step's key and value go to the row's
    newest slot of decode_layout, not to the cache's
    shared write index: the cache's cumulative_length is not advanced (the decoders keep their own)."""
    norm = self.input_layernorm
    y = torch.ops.phi2_qlora.layer_in(hidden, norm.weight, self.norm_sums, norm.eps, self.fused_in_weight,
                                      self.norm_bias, sum(self.fused_in_sizes[:3]))  # gelu from fc1's rows on
    q, k, v, ff = y.split(self.fused_in_sizes, dim=-1)  # (1, 1, heads * head dim) each but ff
    cos, sin = position_embeddings  # (1, 1, rotary dims)
    if hidden.dtype in HALF:
        return torch.ops.phi2_qlora.attend_out(q, k, v, cos, sin, cache.token_keys, cache.token_values, layout,
                                               self.self_attn.scaling, cache.max_cache_len, cache.step_counts,
                                               cache.step_sync, ff, self.fused_out_weight, self.fused_out_bias, hidden)
    out = torch.ops.phi2_qlora.decode_step_attention(q, k, v, cos, sin, cache.token_keys, cache.token_values, layout,
                                                     self.self_attn.scaling, cache.max_cache_len,
                                                     cache.step_counts)  # (1, 1, heads * dim)
    return torch.ops.phi2_qlora.layer_out(out, ff, self.fused_out_weight, self.fused_out_bias, hidden)


def norm_folded(weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """layer_in's two per-row fp32 vectors for W layer_norm(x) + b with the norm's weight g and bias beta:
    (W g, W beta + b), computed once when fusing (weight (out, in); the rest (in,) or (out,))."""
    w = weight.float()
    return w @ norm_weight.float(), w @ norm_bias.float() + bias.float()


class _TokenMajorLayer(StaticLayer):
    """transformers' StaticLayer with its keys and values stored token-major, (batch, cache, heads, head dim), so that
    one row's slots are one contiguous block that FlashAttention's varlen kernel reads in place (decode_attention;
    the split kernel reads either layout: head-major was a little faster for it at batch 64, not worth a second
    cache). `keys`/`values` are (batch, heads, cache, head dim) views of that storage for eager code (the decoders'
    row copies, reset); compiled code touches only `token_keys`/`token_values` (a view of a mutated graph input made
    inductor copy the whole cache every layer, at a third of the speed: docs/PERFORMANCE.md).
    storage: flat (keys, values) buffers to view instead of allocating (BatchDecoder's prefill graphs' scratch
    caches, which never hold anything at the same time, share one pair a layer).
    rows_apart: each row has its own positions (BatchDecoder's rows, each from slot 0): a decode step writes each
    row's key and value at that row's newest slot of decode_layout (the step's kv_layout, else the layout placed on
    the cache), not at one write index shared by all rows; the shared index stays at the last slot, so that
    transformers' causal mask hides nothing and each row's attention mask alone says which slots it reads.
    pooled (with rows_apart and storage): the rows have no regions of their own; `token_keys`/`token_values` view all
    of the storage as one run of slots, (1, slots, heads, head dim), a row's slots wherever decode_layout's flat
    starts put them (BatchDecoder's pool), and max_cache_len is the most slots a row may use (the step's reach)."""

    def __init__(self, max_cache_len: int, storage: tuple[torch.Tensor, torch.Tensor] | None = None,
                 rows_apart: bool = False, pooled: bool = False):
        super().__init__(max_cache_len=max_cache_len)
        self.storage, self.rows_apart, self.pooled = storage, rows_apart, pooled
        self.layout: torch.Tensor | None = None  # rows_apart: decode_layout of the next step (DecodeCache.place)
        if rows_apart:
            self.cumulative_length.fill_(max_cache_len - 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        rows = (self.batch_size, self.max_cache_len, self.num_heads)
        if self.storage is None:
            self.token_keys = torch.zeros(*rows, self.k_head_dim, dtype=self.dtype, device=self.device)
            self.token_values = torch.zeros(*rows, self.v_head_dim, dtype=self.dtype, device=self.device)
        elif self.pooled:
            keys, values = self.storage
            self.token_keys = keys.view(1, -1, self.num_heads, self.k_head_dim)
            self.token_values = values.view(1, -1, self.num_heads, self.v_head_dim)
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               kv_layout: torch.Tensor | None = None, **kwargs):
        """Write (batch, heads, new, head dim) at the next slots (rows_apart: one token at each row's own newest
        slot); return the (batch, heads, cache, head dim) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rows_apart:
            layout = self.layout if kv_layout is None else kv_layout
            newest = (layout[1, :-1] + layout[2, :-1] - 1).long()  # flat start + used - 1, in any layout
            # as (row, slot) of the cache: written in place (a view of it, written, made inductor copy all of it)
            row, slot = newest // self.token_keys.shape[1], newest % self.token_keys.shape[1]
            self.token_keys[row, slot] = key_states[:, :, 0]  # (batch, heads, head dim): one query a row
            self.token_values[row, slot] = value_states[:, :, 0]
            return self.token_keys.transpose(1, 2), self.token_values.transpose(1, 2)
        new = key_states.shape[-2]
        slots = torch.arange(new, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(new)
        self.token_keys.index_copy_(1, slots, key_states.transpose(1, 2))
        self.token_values.index_copy_(1, slots, value_states.transpose(1, 2))
        return self.token_keys.transpose(1, 2), self.token_values.transpose(1, 2)


class DecodeCache(StaticCache):
    """The decoders' static KV cache: StaticCache with token-major storage (_TokenMajorLayer); storage: a layer's
    flat (keys, values) buffers to view, one pair a layer (None: each layer allocates its own); rows_apart: every
    row at its own positions; pooled: rows placed anywhere in the buffers (_TokenMajorLayer)."""

    def __init__(self, config, max_cache_len: int, storage: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 rows_apart: bool = False, pooled: bool = False):
        Cache.__init__(self, layers=[_TokenMajorLayer(max_cache_len, None if storage is None else storage[i],
                                                      rows_apart, pooled) for i in range(config.num_hidden_layers)])

    def place(self, layout: torch.Tensor) -> None:
        """Where the rows of the next decode steps sit (decode_layout), for steps that do not pass kv_layout
        (transformers' attention, which reads the slots through the attention mask)."""
        for layer in self.layers:
            layer.layout = layout


def allocated(cache: StaticCache, model, batch: int) -> StaticCache:
    """`cache` with its tensors allocated now for `batch` rows of the model's heads, dtype and device."""
    config = model.config
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    cache.early_initialization(batch, config.num_key_value_heads or config.num_attention_heads, head_dim,
                               model.dtype, model.device)
    return cache


def kv_heads(config) -> tuple[int, int]:
    """The key/value heads and the head dim of one token in one layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def kv_width(config) -> int:
    """Keys (or values) of one token in one layer: key/value heads x head dim."""
    heads, head_dim = kv_heads(config)
    return heads * head_dim


def kv_buffers(config, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every layer's flat keys and values buffers as one tensor, (layers, 2, numel), for caches that only eager code
    and CUDA graphs write (the prefill graphs' scratch caches): DecodeCache's storage is its pairs (kv_pairs), and
    all_layers reads every layer's slots in one call, where a pair a layer took two calls a layer (64 for Phi-2, each
    able to wait a GIL switch while the server takes requests). Not for caches the compiled decode steps write: inputs
    they write that view one tensor gave wrong tokens and an illegal memory access on an H100 (docs/PERFORMANCE.md)."""
    return torch.zeros(config.num_hidden_layers, 2, numel, dtype=dtype, device=device)


def kv_pairs(buffers: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """kv_buffers' (keys, values) of each layer, as DecodeCache's storage takes them."""
    return [(layer[0], layer[1]) for layer in buffers]


def all_layers(buffers: torch.Tensor, config, rows: int, size: int) -> torch.Tensor:
    """The slots of a cache of `rows` rows of `size` slots on kv_buffers, every layer's keys and values at once,
    token-major as DecodeCache stores them: (layers, 2, rows, size, heads, head dim)."""
    heads, head_dim = kv_heads(config)
    return buffers[:, :, :rows * size * heads * head_dim].view(*buffers.shape[:2], rows, size, heads, head_dim)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes in every layer (Phi-2 in bf16: 320 KiB)."""
    return 2 * config.num_hidden_layers * kv_width(config) * torch.empty((), dtype=dtype).element_size()


def kv_budget_for(free_bytes: int, total_bytes: int) -> int:
    """The bytes a GPU's KV cache may take: the memory free after the model, less a reserve for activations, the
    prefill graphs and compiled steps (2 GiB or a tenth of the GPU, whichever is more)."""
    return free_bytes - max(2 << 30, total_bytes // 10)


def decode_layout(starts: torch.Tensor, used: torch.Tensor, size: int) -> torch.Tensor:
    """Where a decode step's rows sit in a DecodeCache of `size` slots a row: (3, batch + 1) int32 of query offsets
    (one query a row), each row's first slot in the flattened (batch * cache) slots (plus the end), and how many
    slots each row reads (last column unused). A row's tokens are the contiguous slots [start, start + used), its
    newest at the end: FastDecoder's rows end at its shared write index t (left padding before start), BatchDecoder's
    each start at slot 0 and end at their own position; the decoders advance `used` after each step. This is
    FlashAttention's varlen layout
    (cu_seqlens_q, cu_seqlens_k, seqused_k): no step reads the unused rest of the cache. size 0: `starts` are flat
    already (a pool's rows, anywhere in it)."""
    batch = starts.shape[0]
    layout = torch.zeros(3, batch + 1, dtype=torch.int32, device=starts.device)
    layout[0] = torch.arange(batch + 1, device=starts.device)
    layout[1] = layout[0] * size
    layout[1, :-1] += starts.to(torch.int32)
    layout[2, :-1] = used.to(torch.int32)
    return layout


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: torch.Tensor, scale: float,
                     kernel: str, counts: torch.Tensor | None = None, reach: int | None = None) -> torch.Tensor:
    """One query per row, q: (batch, heads, 1, head dim), against that row's slots (decode_layout) of a
    token-major cache, keys/values: (batch, cache, heads, head dim); returns (batch, 1, heads * head dim).
    kernel (decode_kernel decides it):
    - "split": triton_decode_attention, each row's slots cut into blocks read in parallel (CUDA, any dtype);
    - "flash": FlashAttention-2's varlen kernel (cu_seqlens_k + seqused_k) reads only the row's used slots, faster
      than cuDNN over the whole cache at batch 1; at batch 64 its one-query tiles made it slower than cuDNN, so with
      it batches keep transformers' attention (docs/PERFORMANCE.md);
    - "products" (the CPU): two small batched products and a softmax over the row's slots, masked.
    counts: "split"'s arrival counts (split_attention), the cache's step_counts; zeros made here without.
    reach: the most slots a row may use (split_attention's): the row length of a cache of one region a row (the
    default), the longest row of a pool (keys/values (1, slots, heads, head dim), every row anywhere in it)."""
    batch, heads, _, dim = q.shape
    size = keys.shape[1]
    reach = size if reach is None else reach
    if kernel == "split":
        if counts is None:
            counts = torch.zeros(batch * keys.shape[2], dtype=torch.int32, device=q.device)
        return torch.ops.phi2_qlora.decode_attention(q, keys, values, layout, scale, reach, counts)
    if kernel == "flash":
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(batch, heads, dim), keys.view(batch * size, heads, dim), values.view(batch * size, heads, dim),
            layout[0], layout[1], 1, size, 0.0, False, False, scale=scale, seqused_k=layout[2, :-1])[0]
        return out.reshape(batch, 1, heads * dim)
    if reach != size:  # a pool: each row's `reach` slots from its flat start, as a cache of one region a row
        slot = torch.arange(reach, device=q.device)
        at = (layout[1, :-1, None] + slot).clamp(max=size - 1)  # (batch, reach)
        keys, values, size = keys.view(-1, *keys.shape[2:])[at], values.view(-1, *values.shape[2:])[at], reach
        # past a row's used slots lie other answers' (a NaN there would pass through a masked weight: 0 * NaN)
        values = values.masked_fill((slot >= layout[2, :-1, None])[:, :, None, None], 0)
        layout = torch.stack((layout[0], layout[0] * size, layout[2]))  # each row from its slot 0
    slot = torch.arange(size, device=q.device)[None]  # (1, cache)
    start = (layout[1, :-1] - layout[0, :-1] * size)[:, None]  # (batch, 1)
    hidden = (slot < start) | (slot >= start + layout[2, :-1, None])  # (batch, cache)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * scale  # (batch, heads, 1, cache)
    scores = scores.masked_fill(hidden[:, None, None], torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # as transformers' eager attention
    out = torch.matmul(weights, values.transpose(1, 2))  # (batch, heads, 1, dim)
    return out.transpose(1, 2).reshape(batch, 1, heads * dim)


def decode_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """decode_attention's kernel for decode steps on a model's device and dtype, decided once per layer when fusing
    (outside compiled code, where it also registers the Triton op): "split" (triton_decode_attention, every batch
    size) where triton_gemv runs (compute capability 8.0+, bf16/fp16/fp32: the GPUs these kernels were measured
    on); else "flash" (PyTorch's FlashAttention-2: bf16/fp16 on compute capability 8.0+, a PyTorch whose kernel
    takes seqused_k) for batch 1 only; "products" on the CPU; None elsewhere (a T4, say), where the step keeps
    transformers' attention over the whole cache."""
    if triton_supported(device, dtype):
        import decode_kernels  # Triton's; imported only where it runs
        decode_kernels.triton_decode_attention()
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



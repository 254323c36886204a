"""The decoding engine's shared rules and the batch decoder: what every path does to choose and stop, and FastDecoder.

The rules: the repetition penalty (counting only the answer's own tokens, never EOS), the logits processors in
generate()'s order (and their sampling warpers for many rows with their own settings at once, warp), the stop at EOS
or at the stop marker the caller names, and the prefill's attention kernels.
FastDecoder decodes a batch given at once (evaluate.py, bench.py) with a static KV cache and, on CUDA, a compiled,
CUDA-graphed decode step over the rewritten Phi layers (phi_layers.py), driven by a loop that never waits for the
GPU between tokens. Chat answers are batching.py's BatchDecoder. The engine takes token ids, a stop marker and
generation settings; it knows nothing of the chat template or the data pipeline. Nothing here runs at import.
How fast each piece is, and what it replaced, is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (CompileConfig, LogitsProcessor, LogitsProcessorList, StaticCache,
                          SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)
from transformers.masking_utils import create_causal_mask

from config import GenerationSettings
from phi_layers import (DecodeCache, all_layers, allocated, decode_layout, fuse_phi_layers, kv_buffers, kv_pairs,
                        kv_width, reads_own_slots)

CACHE_BUCKET = 128  # batched static KV caches come in multiples of this many tokens (FastDecoder.cache_size)
CHECK_EVERY = 8     # fast path: the host looks at new tokens (EOS, stop marker, streaming) every this many steps
# One-row prompts up to PREFILL_BUCKETS[-1] tokens prefill through CUDA graphs (_PrefillGraph): BatchDecoder pads a
# prompt that joins alone to the first of these lengths it fits; FastDecoder pads to a power of two from 64 (its rule
# when measured; not re-measured with these)
PREFILL_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024)


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
    never cuDNN's, which PyTorch prefers on Hopper GPUs but which builds a plan for each new (rows, length) shape,
    several times slower the first time (docs/PERFORMANCE.md), and every user who joins a batch brings a new
    shape."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
                       set_priority=True)


def stop_index(tokenizer, row: list[int], checked: int, marker: str) -> int | None:
    """Index of the token that ends this row of new tokens (EOS, or the one completing the stop `marker`, the chat
    template's `### Human:`), looking only at tokens from `checked` on (earlier ones were looked at before)."""
    eos = tokenizer.eos_token_id
    at_eos = row.index(eos, checked) if eos in row[checked:] else None
    # The marker spans a few tokens: decode a tail that reaches back before this chunk. Within a chunk the stop is
    # whichever comes first, EOS or the marker, as in generate().
    end_of_search = len(row) if at_eos is None else at_eos + 1
    tail_start = max(0, checked - 16)
    if marker not in tokenizer.decode(row[tail_start:end_of_search], skip_special_tokens=True):
        return at_eos
    for end in range(max(checked, 1), end_of_search + 1):
        if marker in tokenizer.decode(row[tail_start:end], skip_special_tokens=True):
            return end - 1
    return at_eos


class FastDecoder:
    """Decoding with a static KV cache and a compiled, CUDA-graphed decode step (the fast path).

    Why not `generate()` with a static cache: its loop reads a GPU flag after every token (the stopping check), so
    the host waits for the GPU at each step before queuing the next. Here the host queues steps without waiting and
    looks at the new tokens (EOS, the stop marker, streaming) every CHECK_EVERY steps, one chunk behind the GPU; the
    price is up to 2 * CHECK_EVERY steps computed after a stop and thrown away (docs/PERFORMANCE.md has the speeds
    against generate()'s). At batch 1 each layer is two Triton launches in
    bf16/fp16 and three in fp32 (_fused_decode_step), a greedy token is picked inside the compiled step
    (_greedy_step) and the prompt is prefilled by a CUDA graph (_PrefillGraph); every row attends over its own used
    slots only (DecodeCache, decode_attention).

    Pieces are transformers' own where they suffice: StaticCache (DecodeCache where rows read their own slots), the
    model's compiled call (`get_compiled_call`, inductor with CUDA graphs on CUDA) and the logits processors. Batches
    prefill eagerly (one call; their shapes vary; prefill_attention's kernels). Batches of up to FEW_ROWS rows read
    [q; k; v; fc1] with triton_gemv and (bf16/fp16) attend with the step attention. Making a decoder fuses the
    model's Phi layers in place (fuse_phi_layers); the model stays usable everywhere.
    """

    def __init__(self, model, tokenizer, context_window: int, marker: str):
        self.model, self.tokenizer, self.context_window, self.marker = model, tokenizer, context_window, marker
        self.fused = fuse_phi_layers(model)
        # Static shapes: each (batch, cache bucket) compiles once and replays as its own CUDA graph; dynamic shapes
        # compiled far slower and ran slower (docs/PERFORMANCE.md).
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
                 ignore_eos: bool = False, output_logits: bool = False, cache_length: int = 0
                 ) -> tuple[list[list[int]], torch.Tensor | None]:
        """New ids per row (up to gen.max_new_tokens), each cut after the token that ended it; plus the raw logits
        of each step (batch, steps, vocab) when asked. input_ids/attention_mask: (batch, prompt) left-padded.
        cache_length: size the cache for at least this many tokens (one shape for many calls). ignore_eos: always
        gen.max_new_tokens tokens (benchmarks)."""
        call, logits = self._begin(input_ids, attention_mask, gen, ignore_eos, output_logits, cache_length)
        steps = gen.max_new_tokens
        for step in range(steps):
            if step == 0 or call.loop is None:  # the greedy loop's later tokens come from its step
                token = self._choose(call, logits, step)
            done = step + 1 == steps
            if (step + 1) % CHECK_EVERY == 0 or done:
                self._queue_chunk(call, step + 1, done)
                if all(s is not None for s in call.stop_at):
                    break
            if not done:
                logits = self._step(call, token)
        while call.pending:
            self._take_oldest_chunk(call)
        new_ids = [row if s is None else row[:s + 1] for row, s in zip(call.rows, call.stop_at)]
        return new_ids, torch.stack(call.raw_logits, 1).cpu() if output_logits else None

    def _begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationSettings,
               ignore_eos: bool, output_logits: bool, cache_length: int) -> tuple[_Call, torch.Tensor]:
        """A call's state, and the prompt's last logits (batch, vocab): the prompt prefilled into the cache."""
        batch, width = input_ids.shape
        device = input_ids.device
        cache = self._cache(batch, max(width + gen.max_new_tokens, cache_length))
        size = cache.layers[0].max_cache_len
        # One (batch, cache) mask for every call: 0 on left padding, 1 elsewhere; the causal rule hides the future.
        mask = torch.ones(batch, size, dtype=attention_mask.dtype, device=device)
        mask[:, :width] = attention_mask
        position = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, width): positions skip the padding
        # Each row's decode attention reads its used slots [padding, t] (decode_layout).
        layout = decode_layout(width - attention_mask.sum(-1), position[:, -1] + 2, size) \
            if isinstance(cache, DecodeCache) else None
        seq = torch.empty(batch, width + gen.max_new_tokens, dtype=torch.long, device=device)
        seq[:, :width] = input_ids  # what the repetition penalty looks at, like generate's input_ids
        eos = self.tokenizer.eos_token_id
        procs = logits_processors(gen, gen.samples, [eos] if ignore_eos else [], device, width, eos)
        prefill = self._prefill_graph(cache, attention_mask) if self.prefill_graphs else None
        if prefill is not None:
            logits = prefill(input_ids, write_at=width)  # (1, vocab)
        else:
            with prefill_attention(device):
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position,
                                    past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        # Greedy decoding of one row picks each token inside the compiled step, whose inputs live in one _GreedyLoop
        # per shape: no kernel between two replays of the step's CUDA graph, the repetition penalty included.
        # Batches keep the loop in generate (docs/PERFORMANCE.md: faster for them).
        penalty = gen.repetition_penalty if gen.repetition_penalty != 1.0 else None
        loop = None
        if batch == 1 and not (gen.samples or output_logits):
            loop = self._loop(batch, size, mask, position[:, -1:] + 1, layout, penalty)
        # New tokens reach the host through one pinned buffer, a chunk at a time, each chunk with its CUDA event.
        # (steps, batch): a chunk is a contiguous block; a strided target would make the copy wait for the GPU.
        host = torch.empty(gen.max_new_tokens, batch, dtype=torch.long, pin_memory=device.type == "cuda")
        call = _Call(width, cache, mask, position[:, -1:] + 1, layout, seq, procs, gen.samples, penalty, loop, host,
                     [[] for _ in range(batch)], [None] * batch, ignore_eos, output_logits)
        return call, logits

    def _choose(self, call: _Call, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Every row's token at `step` from its logits (batch, vocab), as generate() chooses it; written to the
        call's tokens (and the greedy loop's input)."""
        if not (call.sample or call.procs or call.keep_logits):
            # The argmax is queued before the next replay overwrites this CUDA-graph output; bf16 -> fp32 keeps the
            # order, so this is generate()'s token.
            token = logits.argmax(-1)  # (batch,)
        else:
            scores = logits.to(torch.float32, copy=True)  # (batch, vocab); graph outputs are overwritten
            if call.keep_logits:
                call.raw_logits.append(scores.clone())
            scores = call.procs(call.seq[:, :call.width + step], scores)
            token = torch.multinomial(scores.softmax(-1), 1)[:, 0] if call.sample else scores.argmax(-1)
        call.new[:, step] = token
        if call.loop is not None:
            call.loop.tok.copy_(token[:, None])
            if call.penalty is not None:
                remember(call.loop.seen, call.loop.tok, self.tokenizer.eos_token_id)
        return token

    def _step(self, call: _Call, token: torch.Tensor) -> torch.Tensor | None:
        """Queue the next decode step: the greedy loop's (its token stays on the device), or the model's; returns
        the step's logits (batch, vocab), None from the greedy loop."""
        eos = self.tokenizer.eos_token_id
        if call.loop is not None:
            loop = call.loop
            self.greedy_step(self.model, call.cache, loop.tok, loop.pos, loop.mask, loop.layout, loop.tokens,
                             loop.at, eos if call.ignore_eos else -1,
                             *((loop.seen, loop.penalty, eos) if call.penalty is not None else ()))
            return None
        placed = {} if call.layout is None else {"kv_layout": call.layout}
        logits = self.step(input_ids=token[:, None], attention_mask=call.mask, position_ids=call.position,
                           past_key_values=call.cache, use_cache=True, **placed).logits[:, -1]
        call.position = call.position + 1
        if call.layout is not None:
            call.layout[2].add_(1)
        return logits

    def _queue_chunk(self, call: _Call, end: int, done: bool) -> None:
        """Copy the tokens of steps [chunk start, end) to the host without waiting, then look at the chunk before
        this one (by now the GPU has finished it, so looking does not stall it); at the end, at everything."""
        call.host[call.chunk_start:end].copy_(call.new[:, call.chunk_start:end].T.contiguous(), non_blocking=True)
        ready = None
        if call.host.is_pinned():
            ready = torch.cuda.Event()
            ready.record()
        call.pending.append((call.chunk_start, end, ready))
        call.chunk_start = end
        while len(call.pending) > (0 if done else 1):
            self._take_oldest_chunk(call)

    def _take_oldest_chunk(self, call: _Call) -> None:
        start, end, ready = call.pending.pop(0)
        if ready is not None:
            ready.synchronize()
        for b, new_ids in enumerate(call.host[start:end].T.tolist()):
            if call.stop_at[b] is not None:
                continue
            checked = len(call.rows[b])
            call.rows[b].extend(new_ids)
            call.stop_at[b] = None if call.ignore_eos else stop_index(self.tokenizer, call.rows[b], checked,
                                                                        self.marker)

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
    scratch cache they are copied out of. Why: the eager prefill is over a thousand kernel launches for Phi-2, which
    the host issues slower than the GPU runs them; as one graph a prompt takes a fraction of the time (several
    prompts at once keep the GPU busy anyway, so they stay eager; docs/PERFORMANCE.md). Captured once (an eager
    warm-up, then the capture: no compilation).

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


class ScratchPrefills:
    """BatchDecoder's prefill graphs (_PrefillGraph) of one prompt, one for each PREFILL_BUCKETS length, made when
    first asked for: each prefills into a scratch cache of one row that the prompt's keys and values are copied out
    of. The scratch caches, never in use at the same time, view one (keys, values) pair of buffers a layer, all of
    them one tensor (kv_buffers: held reads every layer's at once), and the graphs share one memory pool."""

    def __init__(self, model):
        self.model = model
        self.graphs: dict[int, _PrefillGraph] = {}
        self._buffers: torch.Tensor | None = None  # the scratch caches' keys and values, every layer (kv_buffers)
        self._pool = None

    def bucket(self, prompts: int, width: int) -> int | None:
        """The length of the graph that takes a group of `prompts` prompts of up to `width` tokens: one prompt (a
        user who joins alone: its eager prefill is launch-bound) up to PREFILL_BUCKETS[-1] tokens, with attention
        the padded mask goes through (flash_attention_2 unpads on the host); None: eager."""
        if prompts != 1 or self.model.config._attn_implementation not in ("sdpa", "eager"):
            return None
        return next((bucket for bucket in PREFILL_BUCKETS if bucket >= width), None)

    def __getitem__(self, bucket: int) -> _PrefillGraph:
        if bucket not in self.graphs:
            model = self.model
            if self._buffers is None:
                self._buffers = kv_buffers(model.config, PREFILL_BUCKETS[-1] * kv_width(model.config), model.dtype,
                                           model.device)
                if model.device.type == "cuda":
                    self._pool = torch.cuda.graph_pool_handle()
            scratch = allocated(DecodeCache(model.config, bucket, storage=kv_pairs(self._buffers)), model, 1)
            self.graphs[bucket] = _PrefillGraph(model, scratch, bucket, self._pool)
        return self.graphs[bucket]

    def held(self, bucket: int) -> torch.Tensor:
        """What the `bucket` graph's last replay left in its scratch cache, every layer at once: (layers, 2 (keys,
        values), 1, bucket, heads, head dim), the prompt from slot 0 (all_layers)."""
        return all_layers(self._buffers, self.model.config, 1, bucket)


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
    is one program walking all of Phi-2's 51,200 logits, a visible share of the step (docs/PERFORMANCE.md);
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


def on_device(values, device: torch.device) -> torch.Tensor:
    """`values` (a list or a CPU tensor) on `device` without waiting for the GPU: on CUDA through pinned memory (a
    copy from pageable memory first waits for every kernel queued, the decode chunk running included)."""
    host = torch.as_tensor(values)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


@dataclass
class RowSampling:
    """The sampling settings of some rows of a batch, on the device, one copy for all of them (RowSampling.of):
    each row's temperature, top-k and top-p as generate()'s warpers take them, for warp."""
    temperature: torch.Tensor        # (rows, 1)
    top_k: torch.Tensor | None       # (rows, 1) long, clamped to the vocabulary, 0 where off; None: off in every row
    most_k: int                      # the largest of them
    cut: torch.Tensor | None         # (rows, 1): 1 - top_p, -1 where top_p is 1 (off); None: off in every row

    @classmethod
    def of(cls, gens: list[GenerationSettings], vocab: int, device: torch.device) -> RowSampling:
        top_k = [min(g.top_k, vocab) for g in gens]
        cut = [1 - g.top_p if g.top_p < 1.0 else -1.0 for g in gens]  # (1 - top_p in Python, as the warper does)
        values = on_device(torch.tensor([[g.temperature for g in gens], top_k, cut], dtype=torch.float32).T, device)
        return cls(values[:, 0:1], values[:, 1:2].long() if any(top_k) else None, max(top_k),
                   values[:, 2:3] if any(c >= 0 for c in cut) else None)


def warp(scores: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """generate()'s TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (in that order, as
    logits_processors lists them), each row with its own settings, on fp32 scores (rows, vocab): a few operators for
    all the rows, not the warpers' few a row. The same arithmetic as theirs, so the same scores on the CPU (a GPU
    divides by a number as a product with its inverse, so the temperature's division may round differently there)."""
    scores = scores / sampling.temperature
    if sampling.top_k is not None:  # below the k-th largest score (ties kept); nothing where k is 0
        kth = torch.topk(scores, sampling.most_k).values.gather(1, (sampling.top_k - 1).clamp(min=0))
        scores = scores.masked_fill(scores < torch.where(sampling.top_k > 0, kth, float("-inf")), float("-inf"))
    if sampling.cut is not None:  # the least likely tokens whose probabilities add up to at most 1 - top_p
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= sampling.cut
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token a row from probabilities (rows, vocab), each row from its own generator: torch.multinomial's draw
    of one sample (the largest p / q, q ~ Exp(1)) with its q filled row by row and the rest done for all rows at once,
    so the same tokens as multinomial row by row, with one kernel a row where multinomial launched several."""
    wait = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        wait[row].exponential_(generator=generator)
    return (probs / wait).argmax(-1)


def sample_rows(scores: torch.Tensor, sampling: RowSampling, generators: list[torch.Generator]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token from fp32 scores (rows, vocab), warped with its own settings (warp) and drawn from its own
    generator (draw), and whether its scores were finite. Nothing waits for the GPU or asserts on it: a row with a
    NaN or an infinity (its maximum is not finite) draws from a uniform stand-in, for the caller to fail."""
    warped = warp(scores, sampling)
    fine = torch.isfinite(warped.max(-1).values)
    return draw(torch.where(fine[:, None], warped.softmax(-1), 1.0), generators), fine


def remember(seen: torch.Tensor, token: torch.Tensor, eos: int) -> None:
    """Mark each row's new token (batch, 1) in `seen` (batch, vocab), the tokens the repetition penalty counts:
    never eos (AnswerRepetitionPenalty's rule)."""
    seen.scatter_(1, token, True)
    seen[:, eos] = False


@dataclass
class _Call:
    """One FastDecoder.generate call: its inputs on the device, and what the host has seen of its tokens."""
    width: int                        # the prompts' (padded) width
    cache: StaticCache
    mask: torch.Tensor                # (batch, cache)
    position: torch.Tensor            # (batch, 1): the next token's position
    layout: torch.Tensor | None       # decode_layout, where rows read their own slots
    seq: torch.Tensor                 # (batch, prompt + new tokens): what the repetition penalty reads
    procs: LogitsProcessorList
    sample: bool
    penalty: float | None
    loop: _GreedyLoop | None          # one row, greedy: the compiled greedy step's inputs
    host: torch.Tensor                # (new tokens, batch): tokens reach the host a chunk at a time
    rows: list[list[int]]             # each row's tokens the host has seen
    stop_at: list[int | None]         # where each row ended (None: not yet)
    ignore_eos: bool
    keep_logits: bool
    pending: list = field(default_factory=list)  # chunks copied, not looked at: (start, end, CUDA event)
    raw_logits: list = field(default_factory=list)
    chunk_start: int = 0

    @property
    def new(self) -> torch.Tensor:
        """(batch, >= new tokens): this call's tokens on the device."""
        return self.loop.tokens if self.loop is not None else self.seq[:, self.width:]

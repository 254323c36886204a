"""Continuous batching: every user's streamed answer decoded together, joining and leaving as they come.

BatchDecoder is the engine behind chat (the CLI, the Gradio page, the OpenAI-compatible API, through inference.py's
ChatModel): one bounded queue, one model step for every answer being written, each answer streamed to its own sink
with its own settings, stop rules and seed, and one request unable to fail another (the class docstring says how).
It uses answer_queue.py's queue (each answer's place, and its end told to its client once), decoding.py's rules and
prefill graphs, phi_layers.py's cache and fused layers, and kv_pool.py's KV memory (the caches' buffers and the pool's
runs).
"""

from __future__ import annotations

import array
import logging
import time
from collections import Counter
from itertools import chain

import torch
from transformers import CompileConfig, DynamicCache

from answer_queue import Answer, AnswerQueue, NonFiniteScores, ShuttingDown
from config import GenerationSettings
from decoding import (CHECK_EVERY, PREFILL_BUCKETS, RowSampling, ScratchPrefills, logits_processors, on_device,
                      penalize, prefill_attention, remember, sample_rows, stop_index)
from kv_pool import KVMemory, pool_slots
from phi_layers import DecodeCache, decode_layout, fuse_phi_layers, kv_bytes_per_token, reads_own_slots

logger = logging.getLogger(__name__)

PREFILL_TOKENS = 4096  # prompts that wait together are prefilled in passes of up to this many (padded) tokens
BURST_STEPS = 2  # the decode steps between two prefill passes of a burst (a full chunk would delay the next pass)
# Whether the chunk after a pass that leaves rows free is BURST_STEPS too (the rest of a burst may be arriving)
SHORT_AFTER_PASS = True
# Batch shapes (rows a decode step runs), up to the engine's slots: a few users do not pay for a 64-row step, and each
# shape is compiled once (times each cache size).
ROW_BUCKETS = (1, 8, 16, 32, 64)
SHORT_ROWS = 8  # shapes of up to this many rows keep 512-slot rows for short answers beside their long ones (__init__)
SCHEDULE_EVENTS = 12  # the first prefill passes and chunks kept in BatchDecoder.schedule (for benchmarks)


def timed_event(device: torch.device) -> torch.cuda.Event | None:
    """A CUDA event recorded now on the current stream, that times (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def prefill_inputs(prompts: list[list[int]], bases: list[int], last_slots: list[int], rows: list[int], pad: int,
                   device: torch.device) -> list[torch.Tensor]:
    """A prefill pass's inputs on `device`: the prompts right-padded with `pad` (prompts, width); every prompt token's
    row in the pass's cache, row in the shared one, slot (the same in both) and slot in the pool (from the prompt's
    base), for one gather and one scatter per tensor and layer (a slice copy per prompt, tensor and layer was slower,
    docs/PERFORMANCE.md); and each prompt's row, length, last slot and last position. Built in Python and copied to
    the device in one piece, without waiting for the chunk the GPU is running: torch lets go of the GIL around every
    operator, and while the server's threads take a burst's requests, each operator can cost a switch interval (5 ms)
    to get it back (what a torch operator or two a prompt cost so: docs/PERFORMANCE.md)."""
    lengths = [len(p) for p in prompts]
    width, total = max(lengths), sum(lengths)
    parts = ([p + [pad] * (width - n) for p, n in zip(prompts, lengths)],
             [[i] * n for i, n in enumerate(lengths)], [[row] * n for row, n in zip(rows, lengths)],
             [range(n) for n in lengths], [range(base, base + n) for base, n in zip(bases, lengths)],
             [rows, lengths, last_slots, [n - 1 for n in lengths]])
    packed = torch.frombuffer(array.array("q", chain.from_iterable(chain.from_iterable(parts))), dtype=torch.long)
    ids, *rest = on_device(packed, device).split([len(prompts) * width] + [total] * 4 + [len(prompts)] * 4)
    return [ids.view(len(prompts), width), *rest]


def to_host(values: torch.Tensor) -> list:
    """`values` as a list, waiting for the GPU on an event: the engine waits for the GPU only where it means to (a
    chunk's end, a prefill pass's end), and torch's sync debug mode, which flags every other wait (a .tolist() of a
    CUDA tensor among them), shows that in a test."""
    if values.device.type != "cuda":
        return values.tolist()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    ready.synchronize()
    return host.tolist()


class BatchDecoder:
    """Continuous batching: the streamed answers of every user decoded together, one model step for all of them.

    A request that arrives while others are being generated joins them at the next chunk boundary (every CHECK_EVERY
    steps when compiled, every step otherwise): its prompt is prefilled (the prompts waiting at a boundary in one
    pass of up to PREFILL_TOKENS tokens, one pass a boundary, so the answers being written go on between the passes
    of a burst, BURST_STEPS steps each, as after a pass that leaves rows free; on a GPU one prompt alone through a
    CUDA graph captured at load) and copied into a free row of the cache; a finished or cancelled answer frees its
    row at the next boundary. Each answer streams to its own client with its own sampling settings, stop rules and
    seed (the repetition penalties applied to all rows at once, the sampling settings to all sampling rows). The
    host queues a chunk before it reads the previous one's tokens (one chunk behind the GPU, as FastDecoder), so a
    finished answer costs up to one chunk of wasted steps.

    The cache: every answer holds its prompt and answer in a run of slots of its own, each token at the slot of its
    position, and a decode step writes each row's token at that row's own next slot (DecodeCache with rows_apart;
    the attention mask, or decode_layout where the fused step reads a row's slots itself, says which slots a row
    reads): a row's greedy answer is the one it gets alone (tested exactly in fp32 on the CPU), and a row that ends
    is free at once. The batch runs the smallest of ROW_BUCKETS' shapes (up to `slots`) that holds its answers.
    Where the compiled steps read each row's own slots (a GPU with the Triton kernels), the KV memory is one pool of
    token slots allocated at load (pool_slots: every row's context, or what kv_budget holds) from which each answer
    takes, while it runs, a run of exactly its prompt + max_new_tokens (first fit; where the free slots are
    scattered, the answers' slots are moved together first), so 64 short chats take 64 short runs, not 64 context
    windows; a shape's fixed `lengths` are then only how far its steps reach (each shape compiled at the warm-up),
    and a change of shape moves no memory. Elsewhere (transformers' attention reads whole rows) each row is a
    region of the batch's cache, as long as the longest answer needs, and a change of shape moves the rows (one
    block copy per layer).

    Admission: at most `slots` answers are decoded and `max_waiting` more wait, in arrival order (AnswerQueue); past
    that, submit raises Busy at once (the caller answers 429). A waiting answer joins at the first boundary where a
    row is free, whatever the lengths of the answers running, as long as its slots are free in the pool (or, without
    one, the batch's cache with it stays within `kv_budget` bytes: on a GPU, what its memory holds); else it waits at
    the head of the queue until answers end (one answer alone always runs).

    One request cannot fail another: what comes from a request (its settings, its sampling processors, its prompt)
    is checked and built in `submit`, in the caller's thread; in the loop, what is done for one answer (its sampled
    token, its stop rules, handing its tokens over) is guarded per answer, and a row whose scores are not finite is
    found on the device without an assert (its token marked -1 for the host) and fails alone (NonFiniteScores). Only
    a failure of the shared model step fails every answer it held, and then every client hears of it.

    Runs on the ChatModel's generation thread (`executor().submit`); `submit`, `cancel` and `shutdown` are safe from
    any thread.
    """

    def __init__(self, model, tokenizer, context_window: int, slots: int, compiled: bool, executor, marker: str,
                 max_waiting: int = 32, kv_budget: int | None = None):
        self.model, self.tokenizer, self.context_window, self.marker = model, tokenizer, context_window, marker
        self.slots, self.executor = slots, executor
        # the answers' places: at most `slots` decoded and `max_waiting` waiting; the batch loop starts on the
        # generation thread when the first one arrives
        self.queue = AnswerQueue(slots, max_waiting, lambda: executor().submit(self._serve))
        # bytes the KV cache may take (kv_budget_for; None: no bound), and what a token of every layer takes
        self.kv_budget, self.kv_per_token = kv_budget, kv_bytes_per_token(model.config, model.dtype)
        self.shapes = sorted({b for b in ROW_BUCKETS if b < slots} | {slots})  # batch shapes, rows
        self.fused = compiled and fuse_phi_layers(model)
        # Where the compiled steps read only each row's own slots: the KV pool's token slots (its memory is taken at
        # the first step, the warm-up's), and every batch shape's row lengths (how far a row's steps reach), fixed
        # at load and compiled at the warm-up, so nothing compiles while serving (a compile stops every answer
        # while it runs: docs/PERFORMANCE.md): _fixed_lengths. Elsewhere (eager steps; transformers' attention,
        # which reads whole rows) rows are regions sized by need: a power of two from 512.
        own = self.fused and reads_own_slots(model, slots)
        self.pool = pool_slots(slots, context_window, kv_budget, self.kv_per_token) if own else None
        self.lengths = {rows: self._fixed_lengths(rows) for rows in self.shapes} if own else None
        if own:
            logger.info("KV cache: one pool of %d tokens (%.1f GiB, taken at the first step), each answer taking its "
                        "prompt + max_new_tokens of it while it runs", self.pool,
                        (self.pool + 1) * self.kv_per_token / 2**30)
        if compiled:
            self.step = model.get_compiled_call(CompileConfig(dynamic=False))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # Prompts prefilled together: one graph for any number (2+) and length of them, and one for a prompt alone
            # too long for a prefill graph, both compiled at the warm-up (ChatModel.warm_up). The host issuing the
            # eager pass (~1,241 launches) was its bound: admitting 64 users took 0.341 s eager, 0.231 compiled
            # (docs/PERFORMANCE.md)
            self.group_prefill = torch.compile(self._group_prefill, dynamic=True)
        else:
            self.step = model
            self.group_prefill = self._group_prefill
        self.device = model.device
        # The host looks at new tokens (and admits new answers) every CHECK_EVERY steps on the compiled path, which
        # must not wait for the GPU each token; eager steps (the CPU) wait anyway, so there it streams every token.
        self.check_every = CHECK_EVERY if compiled else 1
        self.kv = KVMemory(model, self.pool)  # the caches of every shape, the pool's runs
        self.most_rows = 0  # the most answers ever decoded together (a record for tests and benchmarks)
        # where the loop's time went, for benchmarks: prefill passes, prompts, seconds admitting answers (admit_s) and
        # of it waiting for the GPU at a pass's end (prefill_wait_s: for the chunk queued before the pass and the
        # pass; near 0 where the host issuing them is the bound), decode steps queued, answers in them
        # (answer_steps / steps = rows), steps by shape and, on a GPU, the GPU's seconds for them ("gpu s at ..."),
        # and the host's seconds waiting for a chunk (step_wait_s); admitting's host seconds by part ("admit <part> s",
        # _spent) and freeing rows ("vacate s")
        self.record = Counter()
        # the order the loop ran in since it was last cleared, for benchmarks (how a burst of arrivals was admitted):
        # ["pass", prompts, 0, begun, handed out, {part: host seconds}] (host times: its admitting began, its first
        # tokens were handed out; admitting's parts, _spent, and the wait for the GPU, "gpu wait") and ["steps",
        # steps, rows, queued] (the first chunk's), a shape's consecutive chunks merged;
        # SCHEDULE_EVENTS at most. (When the answers were queued: queue.arrivals.)
        self.schedule: list[list] = []
        self._parts: dict[str, float] = {}  # the host seconds by part of the pass being admitted (its schedule entry)
        # A prompt that joins alone prefills through a CUDA graph of its padded length, all captured at load, where
        # the one-row step runs the layer kernels (as FastDecoder's); tests set it on the CPU (eager, padded).
        self.prefill_graphs = self.fused and self.device.type == "cuda" and model.model.layers[0].step_kernels
        self.prefills = ScratchPrefills(model)
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Answer | None] = []
        self.cache: DecodeCache | None = None
        # each row's next input token and its position, which is also the slot the step writes it at (batch, 1);
        # the last position its steps may take (Answer.last_slot; 0 for a free row, which stays at slot 0); the
        # slots each row reads, as an attention mask (batch, cache) and as decode_layout
        self.tok = self.pos = self.limit = self.mask = self.layout = None
        # The repetition penalty, applied to all rows at once (_decode_chunk): the tokens each row's answer holds
        # (rows, vocab; remember) and each row's penalty (rows,), 1 where none (x * 1 and x / 1 are x).
        self.seen = self.penalty = None
        # the sampling rows' settings on the device (_draw), kept while the same answers sample in the same rows
        self._sampling: tuple | None = None
        # the last queued chunk, not yet looked at: (host tokens, its begin and ready events, its rows, its shape)
        self._pending = None
        self._vacated: list[int] = []  # rows freed whose device state is not reset yet (_reset_vacated)
        self._admitting: list[Answer] = []  # answers taken from the queue whose prefill has not finished
        self._pass_ready = False  # whether the last _pick left prompts for a next pass (see _serve)

    # ------------------------------------------------------------------------------------------------------------
    def submit(self, ids: list[int], gen: GenerationSettings, sink, seed: int | None = None) -> Answer:
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
        # generate()'s processors and warpers for these settings, which warp and penalize apply to all the rows at
        # once: made here for their constructors' checks of the values
        logits_processors(gen, gen.samples, [], self.device, len(ids), self.tokenizer.eos_token_id)
        answer = Answer(list(ids), gen, sink, generator)
        self.queue.put(answer)
        return answer

    def cancel(self, answer: Answer) -> None:
        """Stop an answer: one still waiting leaves the queue now; one being written frees its row at the next
        chunk boundary (the host stops looking at its tokens then)."""
        self.queue.cancel(answer)

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Refuse new answers and end every answer in flight with ShuttingDown (waiting ones now, the ones being
        written at the loop's next chunk boundary)."""
        self.queue.close(reason)

    def _serve(self) -> None:
        """The batch loop: admit, decode a chunk, hand out its tokens; until no answer is left."""
        try:
            with torch.inference_mode():
                while True:
                    if self.queue.stop_if_idle(any(self.rows) or self._pending is not None, self._reset):
                        return
                    if self.queue.closed is not None:  # shutdown: the rows' clients hear of it below
                        raise self.queue.closed
                    self._free_cancelled()
                    # One prefill pass a boundary: the answers being written get a chunk between the passes of a
                    # burst of arrivals, instead of waiting for all of them. Admitted while the last chunk queued
                    # runs: what admitting issues follows it on the stream, and the host's work of admitting (the
                    # bound of a pass) overlaps the GPU's steps instead of leaving it idle (docs/PERFORMANCE.md).
                    # Rows whose answers ended in that chunk are free at the next boundary, once the host has seen
                    # it (waiting for it here would stall every chunk while the queue is full).
                    if group := self._pick():
                        self._reset_vacated()  # (the rows freed since the last chunk, before any is given out)
                        begun = time.perf_counter()
                        self.record["admit_s"] += self._admit(group, begun) - begun
                    # While another pass is ready (the prompts that arrived together did not fit in one), the
                    # running answers get a few steps, not a full chunk: the next pass is queued behind them on the
                    # GPU, and its users' first tokens with it. So do they after a pass that left rows free: a
                    # burst's first prompts often arrive before the rest (on an H100, one prompt alone, then a full
                    # chunk at one row before the others' pass: docs/PERFORMANCE.md).
                    short = self._pass_ready or (SHORT_AFTER_PASS and bool(group)
                                                 and sum(a is not None for a in self.rows) < self.slots)
                    if any(a is not None and a.to_queue > 0 for a in self.rows):
                        self._decode_chunk(min(BURST_STEPS, self.check_every) if short else self.check_every)
                    else:
                        self._flush()
        except BaseException as error:  # every waiting client must hear of it, not hang
            held = [a for a in self.rows if a]
            self.queue.fail_all(held + [a for a in self._admitting if a not in held], error, self._reset)
            if not isinstance(error, ShuttingDown):
                raise

    # ------------------------------------------------------------------------------------------------------------
    def _fixed_lengths(self, rows: int) -> tuple[int, ...]:
        """The row lengths (the slots a row's steps reach) of the `rows`-row shape where they are fixed (see
        __init__), shortest first: the context window, and 512 as well for shapes of up to SHORT_ROWS rows (a short
        answer's faster step); none where the pool cannot hold more answers of 512 tokens than the next smaller
        shape has rows (such a shape is not run). One row always gets the context window (one answer alone always
        runs)."""
        length, short = self.context_window, min(512, self.context_window)
        smaller = max([r for r in self.shapes if r < rows], default=0)
        if rows > 1 and (smaller + 1) * short > self.pool:
            return ()
        return (short, length) if rows <= SHORT_ROWS and length > short else (length,)

    def _length(self, rows: int, longest: int) -> int | None:
        """Slots a row of a `rows`-row batch has when its longest answer needs `longest` of them: the shortest of
        the shape's fixed lengths that holds it (None: none does), or by need."""
        if self.lengths is not None:
            return next((length for length in self.lengths[rows] if length >= longest), None)
        return min(self.context_window, max(512, 1 << (max(longest, 1) - 1).bit_length()))

    def _rows_for(self, answers: int) -> int:
        return next(rows for rows in self.shapes if rows >= answers)

    # ------------------------------------------------------------------------------------------------------------
    def capture_prefill_graphs(self) -> None:
        """Capture every prefill graph now, on the generation thread where they replay (ChatModel.warm_up): the user
        who brought a new length would otherwise wait for its warm-up and capture, two eager prefills."""
        if not self.prefill_graphs:
            return

        def capture():
            with torch.inference_mode():
                for bucket in PREFILL_BUCKETS:
                    self.prefills[bucket].capture()
        self.executor().submit(capture).result()

    def _relayout(self, batch: int, size: int) -> None:
        """Move the active rows to rows 0.. of the (batch, size) cache, and their state with them: each row's slots
        where they were (one block copy per layer), or with the pool, nothing (the rows' slots stay in it)."""
        active = [i for i, a in enumerate(self.rows) if a]
        self._vacated = []  # (the rows' state is rebuilt here)
        cache = self.kv.cache(batch, size)
        tok = torch.full((batch, 1), self.tokenizer.eos_token_id, dtype=torch.long, device=self.device)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        limit = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        seen = torch.zeros(batch, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        penalty = torch.ones(batch, device=self.device)
        if active:
            n, src = len(active), on_device(active, self.device)
            self.kv.move_rows(self.cache, cache, src, max(self.rows[i].position for i in active) + 1)
            tok[:n], pos[:n], limit[:n], seen[:n], penalty[:n] = (
                t[src] for t in (self.tok, self.pos, self.limit, self.seen, self.penalty))
        # each row reads its slots up to its position, a free row slot 0 (finite, thrown away); rebuilt here, as the
        # mask is not kept up where the steps read decode_layout
        mask = (torch.arange(size, device=self.device)[None] <= pos).long()  # (batch, size)
        self.rows = [self.rows[i] for i in active] + [None] * (batch - len(active))
        self.cache, self.tok, self.pos, self.limit, self.mask = cache, tok, pos, limit, mask
        self.seen, self.penalty = seen, penalty
        self._place_rows()

    def _place_rows(self) -> None:
        """Where the next decode step's rows sit (decode_layout): each row's slots from its first (its region's slot
        0, or its answer's base in the pool) up to its position, where its next token goes; a free row reads one
        slot (its region's first, or the one after the pool). The cache's own writes read it, and so do the fused
        steps that read a row's slots themselves (reads_own_slots); transformers' attention reads the mask."""
        self.own_slots = self.fused and reads_own_slots(self.model, len(self.rows))
        if self.pool is not None:
            starts = on_device([self.pool if a is None else a.base for a in self.rows], self.device)
            self.layout = decode_layout(starts, self.pos[:, 0] + 1, 0)
        else:
            size = self.cache.layers[0].max_cache_len
            self.layout = decode_layout(torch.zeros_like(self.pos[:, 0]), self.pos[:, 0] + 1, size)
        self.cache.place(self.layout)

    def _free_cancelled(self) -> None:
        """Rows whose client left are freed now, before another chunk is queued for them (their queued tokens are
        never looked at)."""
        for row, answer in enumerate(self.rows):
            if answer is not None and answer.cancel.is_set():
                self._vacate(row)
                self.queue.finish(answer)

    def _vacate(self, row: int) -> None:
        """Row `row` free, and its answer's slots of the pool; the row's device state is reset with the other rows
        freed at this boundary (_reset_vacated), before anything more is queued."""
        answer, self.rows[row] = self.rows[row], None
        if self.pool is not None:
            self.kv.release(answer)
            self._vacated.append(row)

    def _reset_vacated(self) -> None:
        """The rows freed since the last call read and write the spare slot past the pool from now on, at position 0
        (their runs may be other answers' by then; steps queued before still write them, and whatever is queued for
        the next answers there follows them): one write per tensor for all of them (a write per row and tensor was
        12% of the engine thread's time at 64 clients, docs/PERFORMANCE.md)."""
        if self._vacated:
            begun = time.perf_counter()
            rows = on_device(self._vacated, self.device)
            for t, value in ((self.pos, 0), (self.limit, 0), (self.layout[1], self.pool), (self.layout[2], 1)):
                t.index_fill_(0, rows, value)  # (t[rows] = value would wait for the GPU: see _prefill)
            self._vacated = []
            self.record["vacate s"] += time.perf_counter() - begun

    def _pick(self) -> list[Answer]:
        """The waiting answers that join at this boundary, in arrival order, as many as rows are free; the prompts
        of one group are prefilled in one pass of up to PREFILL_TOKENS padded tokens (the rest join in the next
        pass), so the last of several users who arrive at once does not wait behind the others' prefills."""
        group: list[Answer] = []
        with self.queue.lock:
            active = [a for a in self.rows if a]
            self._pass_ready = False
            while self.queue.waiting and len(active) + len(group) < self.slots:
                head = self.queue.waiting[0]
                if group and (len(group) + 1) * max(len(a.ids) for a in group + [head]) > PREFILL_TOKENS:
                    self._pass_ready = True
                    break
                if (active or group) and not self._fits(active, group + [head]):
                    break  # it waits for answers to end, and nothing behind it passes it
                group.append(self.queue.waiting.pop(0))
            self._admitting = group
        return group

    def holds(self, rows: int, tokens: int) -> bool:
        """Without the pool (rows sized by need): whether a batch of `rows` rows of `tokens` slots stays within
        kv_budget."""
        return self.kv_budget is None or rows * self._length(rows, tokens) * self.kv_per_token <= self.kv_budget

    def _fits(self, active: list[Answer], joining: list[Answer]) -> bool:
        """Whether the batch with `joining` holds every answer: in the shape _admit gives it (at least the rows, and
        by need the length, the cache has while answers run), and with the pool, `joining`'s slots among its free
        ones."""
        rows, longest = self._rows_for(len(active) + len(joining)), max(a.need for a in active + joining)
        if active:
            rows = max(rows, len(self.rows))
            if self.lengths is None:
                longest = max(longest, self.cache.layers[0].max_cache_len)
        if self.pool is not None:
            return self._length(rows, longest) is not None and \
                sum(a.need for a in joining) <= self.kv.slots.free
        return self.holds(rows, longest)

    def _admit(self, group: list[Answer], begun: float) -> float:
        """Move `group` into free rows: the cache re-laid out first if the batch needs more rows or longer rows, then
        the prefill. begun: when the caller's admit_s began, where the parts (_spent) begin; returns when the last
        part ended, where admit_s ends, so that the parts account for all of it (a GIL switch in a gap between the
        last part and the caller's clock would be admitting's time and no part's)."""
        self._parts = {}
        active = [a for a in self.rows if a]
        rows = self._rows_for(len(active) + len(group))
        if active:
            rows = max(rows, len(self.rows))
        size = self._length(rows, max(a.need for a in active + group))
        if not active or rows != len(self.rows) or size > self.cache.layers[0].max_cache_len:
            self._relayout(rows, size)
        if self.pool is not None and self.kv.place(group, active, self.cache):
            self.record["compactions"] += 1
        ended = self._prefill(group, begun, self._spent("layout", begun))
        self._admitting = []
        return ended

    def _spent(self, part: str, since: float) -> float:
        """The host's seconds since `since` added to admitting's `part` (record["admit <part> s"], and the pass's
        own); returns now."""
        now = time.perf_counter()
        self.record[f"admit {part} s"] += now - since
        self._parts[part] = self._parts.get(part, 0.0) + now - since
        return now

    def _prefill(self, group: list[Answer], started: float, begun: float) -> float:
        """Run the prompts of `group` through the model in one pass (right-padded: causal attention keeps each
        prompt's tokens from seeing the padding after them, so each row computes what it computes alone), copy each
        one's keys and values into a free row of the shared cache, from its slot 0, and choose its first token. One
        prompt alone is a prefill graph's pass (padded further to its bucket), several (or one too long for a graph)
        a pass of group_prefill, compiled on the fast path. Returns when the first tokens were handed out."""
        lengths = [len(a.ids) for a in group]
        rows = [i for i, a in enumerate(self.rows) if a is None][:len(group)]
        ids, source_rows, target_rows, slots, flat, rows_at, lengths_at, last_at, last = prefill_inputs(
            [a.ids for a in group], [a.base or 0 for a in group], [a.last_slot for a in group], rows,
            self.tokenizer.eos_token_id, self.device)
        # each row's repetition penalty, for every row's steps at once (the first token has no answer tokens to
        # penalize)
        penalties = on_device([a.gen.repetition_penalty for a in group], self.device)
        bucket = self.prefills.bucket(len(group), max(lengths)) if self.prefill_graphs else None
        begun = self._spent("inputs", begun)
        if bucket is not None:
            logits = self.prefills[bucket](ids, write_at=0)  # (1, vocab)
            scratch = self.prefills.held(bucket)  # (layers, 2, 1, bucket, heads, head dim): the prompt from slot 0
            self.record["graph_prefills"] += 1
        else:
            # last: each prompt's last position, a tensor of its own (not a view at an offset that changes from pass
            # to pass, which the compiled pass could guard on)
            with prefill_attention(self.device):
                logits, scratch = self.group_prefill(ids, last.clone())
        begun = self._spent("pass", begun)
        # Each prompt token's keys and values, a layer's keys or values at a time as (tokens, heads, head dim), into
        # its answer's slots: the run it took in the pool, or its row's region. From a prefill graph, gathered for
        # every layer at once (its scratch is one tensor): a gather a layer and kind were 64 more calls for Phi-2, each
        # able to wait a GIL switch while the server takes requests. From a group pass, a gather each, as it is written:
        # stacking every layer's first added the pass's whole KV to the GPU's peak (2.1 GiB on an H100, 36th session,
        # docs/PERFORMANCE.md).
        if bucket is not None:
            prompts = scratch[:, :, source_rows, slots].flatten(0, 1).unbind()
        else:
            prompts = (t[source_rows, :, slots] for pair in scratch for t in pair)
        self.kv.write_prompts(self.cache, prompts, flat, target_rows, slots)
        begun = self._spent("scatter", begun)
        # First tokens: one argmax for every prompt (as argmax: the first index of the maximum; NaN propagates to
        # best), then the prompts that sample draw theirs, all at once.
        best, token = logits.max(-1)  # (prompts,) each
        ok = torch.isfinite(best)
        if sampled := [i for i, a in enumerate(group) if a.gen.samples]:
            self._draw(logits, token, ok, sampled, group)
        for row, answer in zip(rows, group):
            self.rows[row] = answer
        first = token.where(ok, -1)
        slot = torch.arange(self.mask.shape[1], device=self.device)[None]
        self.mask[rows_at] = (slot <= lengths_at[:, None]).long()  # the prompt and the slot its first step writes
        # index_fill_, not seen[rows_at] = False: a number written through an index tensor is first copied to the GPU
        # from pageable memory, which waits for everything queued (the chunk running and this pass; measured on an
        # H100, docs/PERFORMANCE.md)
        self.penalty[rows_at] = penalties
        self.seen.index_fill_(0, rows_at, False)
        self.tok[rows_at, 0], self.pos[rows_at, 0], self.limit[rows_at, 0] = token, lengths_at, last_at
        remember(self.seen, self.tok, self.tokenizer.eos_token_id)  # the other rows' tokens are there already
        self._place_rows()
        self.record.update(prefill_passes=1, prompts=len(group), sampled=len(sampled))
        event = self._scheduled("pass", len(group), 0, started)
        self.most_rows = max(self.most_rows, sum(a is not None for a in self.rows))
        issued = self._spent("first tokens", begun)
        tokens = to_host(first)  # one wait for the GPU for the whole group
        begun = time.perf_counter()
        self.record["prefill_wait_s"] += begun - issued
        self._parts["gpu wait"] = begun - issued
        for answer, token in zip(group, tokens):
            self._take(answer, [token])
        handed = self._spent("handing out", begun)
        if event is not None:
            event += [handed, self._parts]
        return handed

    def _group_prefill(self, ids: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Right-padded prompts ids (prompts, length) through the model: the logits at each one's last position
        `last` (prompts,) and every layer's (keys, values), (prompts, heads, length, head dim). The last positions are
        gathered here, not by transformers' logits_to_keep, whose gather made a compiled graph hold the number of
        prompts (docs/PERFORMANCE.md)."""
        scratch = DynamicCache(config=self.model.config)
        hidden = self.model.model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                                  past_key_values=scratch, use_cache=True).last_hidden_state
        logits = self.model.lm_head(hidden[torch.arange(ids.shape[0], device=ids.device), last])
        return logits, [(layer.keys, layer.values) for layer in scratch.layers]

    def _draw(self, scores: torch.Tensor, token: torch.Tensor, ok: torch.Tensor, sampled: list[int],
              answers: list[Answer | None]) -> None:
        """The tokens of the rows `sampled` (of answers that sample) drawn into `token` (rows,), and whether their
        scores were finite into `ok`, from `scores` (rows, vocab; the penalty applied): generate()'s warpers for all
        of them at once (decoding.warp; each row's own processors were tens of operators a row and step,
        docs/PERFORMANCE.md), then a draw from each answer's own generator (decoding.draw), so that each draws what
        it draws alone (decoding.sample_rows: nothing waits for the GPU; a row whose scores are not finite draws
        from a stand-in, and the host fails that answer)."""
        key = [len(answers)] + [(i, answers[i]) for i in sampled]
        if self._sampling is None or self._sampling[0] != key:  # (the same rows from one step to the next)
            at = None if len(sampled) == len(answers) else on_device(sampled, self.device)
            settings = RowSampling.of([answers[i].gen for i in sampled], scores.shape[-1], self.device)
            self._sampling = key, at, settings
        _, at, settings = self._sampling
        drawn, fine = sample_rows((scores if at is None else scores[at]).float(), settings,
                                  [answers[i].generator for i in sampled])
        if at is None:
            token.copy_(drawn)
            ok.copy_(fine)
        else:
            token[at], ok[at] = drawn, fine

    def _decode_chunk(self, most: int) -> None:
        """Queue up to `most` steps for every row without waiting for the GPU; then look at the chunk queued before
        this one (the GPU has finished it by now, so the host never stalls it)."""
        queued = time.perf_counter()
        self._reset_vacated()
        rows = list(self.rows)
        steps = min(most, max(a.to_queue for a in rows if a))
        shape = f"{len(rows)} rows x {self.cache.layers[0].max_cache_len} slots"
        began = timed_event(self.device)
        chunk = torch.empty(len(rows), steps, dtype=torch.long, device=self.device)
        # Rows with a repetition penalty: AnswerRepetitionPenalty's arithmetic for all rows in a few kernels (per row,
        # generate()'s processors were ~10 small kernels a step).
        penalized = any(a is not None and a.gen.repetition_penalty != 1.0 for a in rows)
        sampled = [row for row, a in enumerate(rows) if a is not None and a.gen.samples]
        eos = self.tokenizer.eos_token_id
        for s in range(steps):
            placed = {"kv_layout": self.layout} if self.own_slots else {}
            logits = self.step(input_ids=self.tok, attention_mask=self.mask, position_ids=self.pos,
                               past_key_values=self.cache, use_cache=True, **placed).logits[:, -1]  # (batch, vocab)
            # One argmax for every row, then the rows that sample overwrite theirs (also past an answer's end: its
            # later draws are never read). A row whose best score is not finite (NaN propagates to the maximum) goes
            # to the host as -1; its token (an index, always in range) is the next step's input until the host drops
            # the row.
            scores = penalize(logits.float(), self.seen, self.penalty[:, None]) if penalized else logits
            best, token = scores.max(-1)  # (batch,) each
            ok = torch.isfinite(best)
            if sampled:
                self._draw(scores, token, ok, sampled, rows)
            if penalized:
                remember(self.seen, token[:, None], eos)
            chunk[:, s] = token.where(ok, -1)
            self.tok = token[:, None]
            torch.minimum(self.pos + 1, self.limit, out=self.pos)  # a row past its last step stays at its last slot
            torch.add(self.pos[:, 0], 1, out=self.layout[2, :-1])
            if not self.own_slots:
                self.mask.scatter_(1, self.pos, 1)
        for answer in rows:
            if answer is not None:
                answer.queued += steps
        self.record.update(steps=steps, answer_steps=steps * sum(a is not None for a in rows))
        self.record[f"steps at {shape}"] += steps
        self._scheduled("steps", steps, len(rows), queued)
        host = torch.empty(chunk.shape, dtype=torch.long, pin_memory=self.device.type == "cuda")
        host.copy_(chunk, non_blocking=True)
        previous, self._pending = self._pending, (host, began, timed_event(self.device), rows, shape)
        if previous is not None:
            self._look(previous)
        if self._smaller_shape() is not None:
            # a smaller shape, or shorter rows, hold the answers left: its faster step (batch-1 speed for the last
            # user)
            self._flush()
            if shape := self._smaller_shape():
                self._relayout(*shape)

    def _scheduled(self, kind: str, n: int, rows: int, at: float) -> list | None:
        """A prefill pass of n prompts or a chunk of n steps at `rows` rows, begun at host time `at`, added to
        self.schedule; returns its entry there (None: not kept)."""
        last = self.schedule[-1] if self.schedule else None
        if kind == "steps" and last is not None and last[0] == kind and last[2] == rows:
            last[1] += n
            return last
        if len(self.schedule) < SCHEDULE_EVENTS:
            self.schedule.append([kind, n, rows, at])
            return self.schedule[-1]
        return None

    def _smaller_shape(self) -> tuple[int, int] | None:
        """The (rows, row length) that holds the answers in the rows, where it is smaller than the current one."""
        active = [a for a in self.rows if a]
        if not active:
            return None
        rows = self._rows_for(len(active))
        size = self._length(rows, max(a.need for a in active))  # (a smaller shape's rows are no shorter)
        return (rows, size) if rows < len(self.rows) or size < self.cache.layers[0].max_cache_len else None

    def _flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._look(pending)

    def _look(self, pending) -> None:
        host, began, ready, rows, shape = pending
        if ready is not None:
            waited = time.perf_counter()
            ready.synchronize()
            self.record["step_wait_s"] += time.perf_counter() - waited
            self.record[f"gpu s at {shape}"] += began.elapsed_time(ready) / 1000
        new = host.tolist()
        for row, answer in enumerate(rows):
            if answer is not None and not answer.done:
                self._take(answer, new[row])

    def _take(self, answer: Answer, tokens: list[int]) -> None:
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
            stop = stop_index(self.tokenizer, answer.new, checked, self.marker)
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
                if isinstance(answer.error, NonFiniteScores):
                    self.kv.clear(self.cache, row, answer)  # (its slots may hold NaN)
                self._vacate(row)
            self.queue.finish(answer, answer.error)

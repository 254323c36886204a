"""An engine's KV memory: every layer's keys and values buffers, which each batch shape's cache views, and, where
the compiled decode steps read each row's own slots, the pool of token slots that answers take runs of by need.

Where the compiled decode steps read each row's own slots (a GPU with decode_kernels.py's kernels), BatchDecoder keeps
its KV memory as one pool of token slots, sized at load (pool_slots) and taken at the first step, and each answer
takes a run of exactly its prompt + max_new_tokens slots while it runs (SlotPool, first fit), so 64 short chats take
64 short runs, not 64 context windows. Runs and not vLLM's paged blocks: the kernels read each row from one flat start
(phi_layers.decode_layout), so a run needs no block table in their walk, and what blocks avoid, scattered free space,
costs one move of the running answers' slots here (KVMemory.place; the why and the costs: docs/PERFORMANCE.md).
Elsewhere (eager steps; transformers' attention, which reads whole rows) each row of a batch is a region of its
cache. KVMemory holds the tensors and moves them; BatchDecoder decides the batch shapes and which answers run.
"""

from __future__ import annotations

from typing import Iterable

import torch

from decoding import on_device
from phi_layers import DecodeCache, allocated, kv_width


def pool_slots(slots: int, window: int, kv_budget: int | None, per_token: int) -> int:
    """Token slots of the KV pool of an engine of `slots` rows: every row's whole context window, or what kv_budget
    bytes hold where that is less, and never less than one window (one answer alone always runs)."""
    full = slots * window
    return full if kv_budget is None else min(full, max(window, kv_budget // per_token))


class SlotPool:
    """The free slots of a pool of `size` token slots, as runs (start, slots) in order; an answer claims a run of its
    need (the first free run that holds it) and releases it when it ends."""

    def __init__(self, size: int):
        self.size = size
        self.runs: list[tuple[int, int]] = [(0, size)]

    @property
    def free(self) -> int:
        """Free slots in all (not necessarily one run)."""
        return sum(slots for _, slots in self.runs)

    def claim(self, need: int) -> int | None:
        """The start of a run of `need` slots, now taken: the first free run that holds it; None where none does."""
        for i, (start, slots) in enumerate(self.runs):
            if slots >= need:
                self.runs[i:i + 1] = [(start + need, slots - need)] if slots > need else []
                return start
        return None

    def release(self, base: int, need: int) -> None:
        """The run of `need` slots from `base` free again, merged with the free runs beside it."""
        merged: list[tuple[int, int]] = []
        for start, slots in sorted(self.runs + [(base, need)]):
            if merged and sum(merged[-1]) == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + slots)
            else:
                merged.append((start, slots))
        self.runs = merged

    def compact(self, held: list[tuple[int, int]]) -> list[int]:
        """The runs `held` (base, need) of every running answer laid out one after another from slot 0, in the order
        they sat; returns each one's new base, in the order given. The free slots are then one run after them."""
        bases, at = {}, 0
        for base, need in sorted(held):
            bases[base], at = at, at + need
        self.runs = [(at, self.size - at)] if at < self.size else []
        return [bases[base] for base, _ in held]


class KVMemory:
    """The keys and values of an engine's answers (BatchDecoder's): a flat keys and a flat values buffer a layer, which
    each (rows, row length) shape's DecodeCache views (rows_apart), and a compiled shape finds its cache where it was
    captured. With a pool of `pool` token slots: the buffers are the pool and the slot after it (where free rows
    write), allocated with the first cache, every shape's cache views all of it, its row length being only how far
    its rows reach, and each answer holds a run of it (its `base` and `need`) while it runs. Without (pool None): a
    shape's rows are regions from the buffers' start, so the memory held is the largest shape used so far; a larger
    shape replaces the buffers and the caches on the old ones are dropped (the current one lives until its rows are
    moved: move_rows).

    A buffer a layer and not one tensor for all of them (phi_layers.kv_buffers, which the prefill graphs' scratch
    caches share): the compiled decode steps write every layer's cache, and inputs they write that view one tensor
    gave wrong tokens and an illegal memory access on an H100 (36th session, docs/PERFORMANCE.md)."""

    def __init__(self, model, pool: int | None):
        self.model, self.config, self.pool = model, model.config, pool
        self.slots = SlotPool(pool) if pool is not None else None  # the pool's free slots
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # a layer's flat (keys, values)
        self.caches: dict[tuple[int, int], DecodeCache] = {}  # every (rows, row length) shape met, on the buffers
        # each shape's keys and values tensors that write_prompts writes, every layer's, in order: the pool's slots
        # (slots, heads, head dim), or the regions (rows, row length, heads, head dim)
        self._targets: dict[tuple[int, int], list[torch.Tensor]] = {}

    @property
    def bytes(self) -> int:
        """Bytes of KV cache held now (every shape's cache is a view of them; the pool's from the first step)."""
        return sum(t.numel() * t.element_size() for pair in self.buffers for t in pair)

    def cache(self, batch: int, size: int) -> DecodeCache:
        """The cache of `batch` rows of `size` slots, on the buffers (made larger first where it needs more)."""
        numel = (self.pool + 1 if self.pool is not None else batch * size) * kv_width(self.config)
        if not self.buffers or numel > self.buffers[0][0].numel():
            self.buffers = [tuple(torch.zeros(numel, dtype=self.model.dtype, device=self.model.device)
                                  for _ in range(2)) for _ in range(self.config.num_hidden_layers)]
            self.caches, self._targets = {}, {}
        if (batch, size) not in self.caches:
            cache = allocated(DecodeCache(self.config, size, self.buffers, rows_apart=True,
                                          pooled=self.pool is not None), self.model, batch)
            self.caches[batch, size] = cache
            self._targets[batch, size] = [t[0] if self.pool is not None else t
                                          for layer in cache.layers for t in (layer.token_keys, layer.token_values)]
        return self.caches[batch, size]

    def write_prompts(self, cache: DecodeCache, prompts: Iterable[torch.Tensor], pool_slots: torch.Tensor,
                      rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Prompt tokens' keys and values into their answers' slots of `cache`: `prompts` gives each layer's keys,
        then its values, in the layers' order, each (tokens, heads, head dim); they go to the pool's `pool_slots`
        (tokens,), or without a pool, to slots `slots` of rows `rows` (tokens,) each. One write a layer's keys or
        values."""
        at = (pool_slots,) if self.pool is not None else (rows, slots)
        for target, source in zip(self._targets[cache.layers[0].batch_size, cache.layers[0].max_cache_len], prompts):
            target.index_put_(at, source)

    def move_rows(self, old: DecodeCache, new: DecodeCache, rows: torch.Tensor, held: int) -> None:
        """Without a pool: the first `held` slots of `old`'s rows `rows` into rows 0.. of `new` (a change of shape;
        both may view the same buffers, so the rows are gathered first). With one, nothing moves: the answers' runs
        stay where they are in the pool, which every shape views."""
        if self.pool is None:
            for source, target in zip(old.layers, new.layers):
                target.keys[:len(rows), :, :held] = source.keys[rows, :, :held]  # (a copy: the index gathers)
                target.values[:len(rows), :, :held] = source.values[rows, :, :held]

    def clear(self, cache: DecodeCache, row: int, answer) -> None:
        """Zeros in the slots `answer` held (its run of the pool, or its row of `cache`): an answer whose scores were
        not finite may have left NaN there, and a masked slot still multiplies (0 * NaN is NaN), so a later answer
        there would read them (transformers' attention reads the whole row, masked)."""
        for layer in cache.layers:
            for t in (layer.token_keys, layer.token_values):
                if self.pool is not None:
                    t[0, answer.base:answer.base + answer.need].zero_()
                else:
                    t[row].zero_()

    def place(self, joining: list, running: list, cache: DecodeCache) -> bool:
        """A run of the pool's free slots for each answer `joining` (its `base`), first fit; where no free run holds
        one, the `running` answers' slots in `cache` are moved together first (the caller has checked that enough
        are free in all). Returns whether they were moved."""
        for answer in joining:
            answer.base = self.slots.claim(answer.need)
        if all(answer.base is not None for answer in joining):
            return False
        for answer in joining:
            self.release(answer)
        self._compact(running, cache)
        for answer in joining:
            answer.base = self.slots.claim(answer.need)
        return True

    def release(self, answer) -> None:
        """`answer`'s slots back to the pool, where it holds any. Steps queued before may still write them; whatever is
        queued after (the next answer's prefill there) follows."""
        if answer.base is not None:
            self.slots.release(answer.base, answer.need)
            answer.base = None

    def _compact(self, running: list, cache: DecodeCache) -> None:
        """The `running` answers' slots moved to the pool's start, one run after another, so that its free slots are
        one run: the slots each has filled (its `position` + 1, with the steps queued), one gather and write a
        layer's keys or values, queued after the steps that wrote them."""
        source, target = [], []
        for answer, base in zip(running, self.slots.compact([(a.base, a.need) for a in running])):
            held = min(answer.position + 1, answer.need)
            if answer.base != base:
                source.append(torch.arange(answer.base, answer.base + held))
                target.append(torch.arange(base, base + held))
            answer.base = base
        if source:
            source, target = (on_device(torch.cat(t), self.model.device) for t in (source, target))
            for layer in cache.layers:
                for t in (layer.token_keys, layer.token_values):
                    t[0, target] = t[0, source]  # (the index gathers first: runs may overlap)

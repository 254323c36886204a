"""The KV pool's token slots: which are free, given out as runs by need and taken back.

Where the compiled decode steps read each row's own slots (a GPU with decode_kernels.py's kernels), BatchDecoder keeps
its KV memory as one pool of token slots a layer, allocated at load (pool_slots), and each answer takes a run of
exactly its prompt + max_new_tokens slots while it runs (SlotPool, first fit), so 64 short chats take 64 short runs,
not 64 context windows. Runs and not vLLM's paged blocks: the kernels read each row from one flat start
(phi_layers.decode_layout), so a run needs no block table in their walk, and what blocks avoid, scattered free space,
costs one move of the running answers' slots here (compact; the why and the costs: docs/PERFORMANCE.md). This module
only keeps the books; batching.py moves the tensors.
"""

from __future__ import annotations


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

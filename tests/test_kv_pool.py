"""kv_pool.py: the KV pool's token slots, given out as runs by need and taken back, and the keys and values in them
moved with their answers (BatchDecoder's KV memory where the steps read each row's own slots; the engine with it is
tested in test_batching.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kv_pool import KVMemory, SlotPool, pool_slots


def test_answers_take_runs_of_exactly_their_slots_first_fit():
    pool = SlotPool(1000)
    assert [pool.claim(need) for need in (300, 200, 500)] == [0, 300, 500]
    assert pool.free == 0 and pool.claim(1) is None  # full: the next answer waits
    pool.release(300, 200)
    assert pool.claim(250) is None and pool.claim(120) == 300 and pool.claim(80) == 420 and pool.free == 0


def test_slots_given_back_merge_with_the_free_runs_beside_them():
    """An answer that ends gives its run back whole, joined with the free slots on either side: three answers that
    end in any order leave one run of the whole pool, which the longest answer can take."""
    for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)):
        pool = SlotPool(900)
        runs = [(pool.claim(need), need) for need in (100, 300, 500)]
        for i in order:
            pool.release(*runs[i])
        assert pool.runs == [(0, 900)] and pool.claim(900) == 0, order


def test_scattered_free_slots_are_gathered_by_moving_the_running_answers_together():
    """Enough slots free in all but no run long enough: compact lays the running answers' runs out one after
    another from slot 0, in the order they sat (so no run moves past another), returns where each now starts, and
    leaves the free slots as one run after them, where the arriving answer fits."""
    pool = SlotPool(1000)
    a, b, c, d = (pool.claim(need) for need in (200, 300, 200, 300))
    pool.release(a, 200)
    pool.release(c, 200)
    assert pool.free == 400 and pool.claim(350) is None
    assert pool.compact([(d, 300), (b, 300)]) == [300, 0]  # b sat first: it stays first
    assert pool.runs == [(600, 400)] and pool.claim(350) == 600


def test_compacting_a_pool_with_nothing_running_frees_it_all():
    pool = SlotPool(64)
    pool.claim(64)
    assert pool.compact([]) == [] and pool.runs == [(0, 64)]


@pytest.mark.parametrize("budget, expected", [(None, 64 * 2048), (10**12, 64 * 2048), (1000 * 4096, 4096),
                                              (10, 2048)])
def test_the_pool_holds_every_rows_context_or_what_the_budget_holds_and_always_one_window(budget, expected):
    assert pool_slots(64, 2048, budget, per_token=1000) == expected


def test_an_answer_that_needs_a_longer_run_than_any_free_one_moves_the_others_keys_and_values_along(chat_model):
    """Three answers in a pool of 64 slots; the middle one ends, and a fourth needs more slots than either free run
    holds: the running answers' runs are moved to the pool's start and the fourth takes the run after them. Every
    layer's keys and values of each running answer's filled slots go with it (what a later step of that answer
    reads), and the prompt written for the fourth is where it reads it."""
    model = chat_model.model
    memory = KVMemory(model, pool=64)
    cache = memory.cache(4, 32)
    first, middle, last = (SimpleNamespace(need=need, position=filled - 1, base=None)
                           for need, filled in ((10, 6), (20, 20), (10, 9)))
    assert not memory.place([first, middle, last], [], cache)
    assert (first.base, middle.base, last.base) == (0, 10, 30)
    width = cache.layers[0].token_keys.shape[2:]  # (heads, head dim)
    written = {}
    for answer in (first, middle, last):
        filled = answer.position + 1
        written[id(answer)] = torch.randn(model.config.num_hidden_layers, 2, filled, *width)
        memory.write_prompts(cache, written[id(answer)].flatten(0, 1), torch.arange(answer.base, answer.base + filled),
                             None, None)
    memory.release(middle)  # free: slots 10-29 and 40-63, 44 in all, no run of 30
    joining = SimpleNamespace(need=30, position=-1, base=None)
    assert memory.place([joining], [first, last], cache)
    assert (first.base, last.base, joining.base) == (0, 10, 20)
    prompt = torch.randn(model.config.num_hidden_layers, 2, 5, *width)
    memory.write_prompts(cache, prompt.flatten(0, 1), torch.arange(20, 25), None, None)
    for answer, held in ((first, written[id(first)]), (last, written[id(last)]), (joining, prompt)):
        for i, layer in enumerate(cache.layers):
            for kind, slots in enumerate((layer.token_keys, layer.token_values)):
                assert torch.equal(slots[0, answer.base:answer.base + held.shape[2]], held[i, kind])

"""answer_queue.py: the bounded queue in front of the batch. A client past its places is turned away at once with a
time to come back, a waiting client that leaves frees its place, every answer's end reaches its client exactly once
whichever thread ends it, and a failed or closed server tells every client instead of leaving one hanging. (The
queue with the engine behind it, through ChatModel: test_batching.py.)"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from answer_queue import Answer, AnswerQueue, Busy, ShuttingDown
from config import GenerationSettings


class Sink:
    """A client: the ends it was told."""

    def __init__(self, fails: bool = False):
        self.ends, self.fails = [], fails

    def put(self, tokens):
        pass

    def end(self, error):
        self.ends.append(error)
        if self.fails:
            raise OSError("the client's connection is gone")


def answer(sink: Sink | None = None) -> Answer:
    return Answer([1, 2, 3], GenerationSettings(max_new_tokens=4), sink or Sink(), torch.Generator())


def queue(slots: int = 2, max_waiting: int = 1) -> tuple[AnswerQueue, list]:
    """A queue whose batch loop only counts its starts."""
    starts = []
    return AnswerQueue(slots, max_waiting, lambda: starts.append(1)), starts


def test_past_its_places_a_client_is_turned_away_at_once_with_a_time_to_come_back():
    q, starts = queue(slots=2, max_waiting=1)
    held = [answer() for _ in range(3)]
    for a in held:
        q.put(a)
    assert len(starts) == 1  # one loop for all of them
    with pytest.raises(Busy) as busy:
        q.put(answer())
    # 1 s a slot before any answer ended, for the queue ahead: 1 x (1 + 3 waiting / 2 slots), rounded
    assert "busy" in str(busy.value) and busy.value.retry_after == 2
    for a in held[:2]:
        q.waiting.remove(a)  # (taken by the batch loop)
        a.began -= 10
        q.finish(a)  # two answers of 10 s: about 10 s a slot, for the queue ahead
    q.put(answer())
    q.put(answer())
    with pytest.raises(Busy) as busy:
        q.put(answer())
    assert busy.value.retry_after == 25  # 10 s times (1 + 3 waiting / 2 slots)


def test_a_waiting_client_that_leaves_frees_its_place_and_hears_its_end_once():
    q, _ = queue(slots=1, max_waiting=1)
    first, waiting = answer(), answer()
    q.put(first)
    q.put(waiting)
    q.cancel(waiting)
    assert waiting.sink.ends == [None] and waiting not in q.waiting and q.in_flight == 1
    q.put(answer())  # its place is free again
    q.finish(waiting)  # the loop ending it as well tells its client nothing more
    assert waiting.sink.ends == [None] and q.in_flight == 2


def test_an_answer_ended_from_two_threads_at_once_is_ended_once():
    q, _ = queue(slots=64, max_waiting=0)
    answers = [answer() for _ in range(64)]
    for a in answers:
        q.put(a)
    go = threading.Barrier(2)

    def end_all():
        go.wait()
        for a in answers:
            q.finish(a)
    threads = [threading.Thread(target=end_all) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.sink.ends == [None] for a in answers) and q.in_flight == 0


def test_closing_ends_the_waiting_answers_and_refuses_new_ones():
    q, _ = queue()
    waiting = [answer() for _ in range(2)]
    for a in waiting:
        q.put(a)
    q.close("the server is shutting down")
    assert all(isinstance(e, ShuttingDown) and "shutting down" in str(e) for a in waiting for e in a.sink.ends)
    assert all(len(a.sink.ends) == 1 for a in waiting) and q.in_flight == 0
    with pytest.raises(ShuttingDown):
        q.put(answer())
    assert not q.stop_if_idle(held=False, reset=lambda: None)  # the loop goes on to end what it holds


def test_a_failed_loop_tells_every_client_and_the_next_answer_starts_a_fresh_one():
    q, starts = queue(slots=2, max_waiting=2)
    answers = [answer() for _ in range(4)]
    for a in answers:
        q.put(a)
    held = [q.waiting.pop(0), q.waiting.pop(0)]  # (rows the loop holds)
    resets = []
    q.fail_all(held, RuntimeError("CUDA error: an illegal memory access"), lambda: resets.append(1))
    assert all(len(a.sink.ends) == 1 and "illegal" in str(a.sink.ends[0]) for a in answers)
    assert resets == [1] and q.in_flight == 0 and not q.waiting
    q.put(answer())
    assert len(starts) == 2


def test_the_loop_stops_only_with_nothing_waiting_or_held_and_a_new_answer_restarts_it():
    q, starts = queue()
    q.put(answer())
    assert not q.stop_if_idle(held=False, reset=lambda: None)  # one waits
    q.waiting.clear()
    assert not q.stop_if_idle(held=True, reset=lambda: None)  # one is held
    resets = []
    assert q.stop_if_idle(held=False, reset=lambda: resets.append(1)) and resets == [1]
    q.put(answer())
    assert len(starts) == 2


def test_a_client_whose_end_fails_does_not_keep_the_others_from_theirs(caplog):
    q, _ = queue()
    gone, fine = answer(Sink(fails=True)), answer()
    q.put(gone)
    q.put(fine)
    with caplog.at_level(logging.ERROR, logger="answer_queue"):
        q.fail_all([], RuntimeError("the model step failed"), lambda: None)
    assert len(fine.sink.ends) == 1 and q.in_flight == 0
    assert "could not be handed over" in caplog.text

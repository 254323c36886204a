"""The bounded queue in front of the batch (batching.BatchDecoder): each answer's handle, its place among at most
`slots` answers decoded and `max_waiting` waiting (past that, Busy at once: the caller answers HTTP 429 with
Retry-After), cancelling, shutting down, and each answer's end told to its client exactly once.

Any thread may put, cancel or close (under one lock); the batch loop takes the waiting answers from here
(AnswerQueue.lock and .waiting) and ends every answer here (finish).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from config import GenerationSettings

logger = logging.getLogger(__name__)

ARRIVALS_KEPT = 256  # the first answers' arrival times kept in AnswerQueue.arrivals (for benchmarks)
DURATIONS_KEPT = 32  # the last answers' durations, for Busy's retry_after


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
class Answer:
    """One streamed answer: what was asked, and where it stands in the batch."""
    ids: list[int]
    gen: GenerationSettings
    sink: object                              # gets put(new token ids) and end(error or None); BatchDecoder.submit
    generator: torch.Generator                # its draws, where it samples: the same as alone, whoever it runs beside
    cancel: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None        # a failure of this answer alone, found in the batch loop
    done: bool = False
    began: float = field(default_factory=time.monotonic)
    new: list[int] = field(default_factory=list)  # tokens the host has seen
    queued: int = 0                           # decode steps queued on the device (the host sees them a chunk later)
    streamed: int = 0
    base: int | None = None                   # its first slot in the engine's KV pool, where it has one

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

    @property
    def last_slot(self) -> int:
        """The last cache slot its steps write (and the position there): the prompt is in slots [0, prompt), each
        step writes its input token at that token's position; steps queued past its end rewrite this slot."""
        return len(self.ids) + self.max_new_tokens - 1

    @property
    def need(self) -> int:
        """Cache slots it can fill: its prompt and every token it may be given."""
        return self.last_slot + 1

    @property
    def position(self) -> int:
        """The position of its next input token, the slot the next step writes, counting the steps queued on the
        device (as the device's pos, capped at last_slot): it has filled the slots before it."""
        return min(len(self.ids) + self.queued, self.last_slot)


class AnswerQueue:
    """At most `slots` answers being decoded and `max_waiting` more waiting, in arrival order. The batch loop, which
    `start_loop` starts (on put, when none runs), takes them from `waiting` under `lock` and ends each with finish.

    An answer counts from put until finish, whether it waits, is being admitted or holds a row, so a cancelled or
    failed answer frees its place exactly once, whichever thread ends it."""

    def __init__(self, slots: int, max_waiting: int, start_loop: Callable[[], None]):
        self.slots, self.max_waiting, self._start_loop = slots, max_waiting, start_loop
        self.lock = threading.Lock()
        self.waiting: list[Answer] = []
        self.closed: ShuttingDown | None = None
        self._in_flight = 0  # answers put and not yet finished
        self._running = False  # whether the batch loop runs (or is about to)
        self._durations: list[float] = []  # seconds of the last answers
        self.arrivals: list[float] = []  # when the answers were put, ARRIVALS_KEPT at most (for benchmarks)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def put(self, answer: Answer) -> None:
        """Queue `answer`, starting the batch loop if none runs; raises ShuttingDown after close, Busy when every
        place is taken."""
        with self.lock:
            if self.closed is not None:
                raise self.closed
            if self._in_flight >= self.slots + self.max_waiting:
                raise Busy(f"the server is busy: all {self.slots} rows are answering and its queue of "
                           f"{self.max_waiting} is full", self._retry_after())
            self._in_flight += 1
            self.waiting.append(answer)
            if len(self.arrivals) < ARRIVALS_KEPT:
                self.arrivals.append(time.perf_counter())
            if not self._running:
                self._running = True
                self._start_loop()

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent answers' mean time, per slot, for the queue ahead."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(60, round(mean * (1 + len(self.waiting) / self.slots))))

    def cancel(self, answer: Answer) -> None:
        """Stop an answer: one still waiting leaves the queue now; one being written is ended by the batch loop
        (which sees answer.cancel at its next chunk boundary)."""
        answer.cancel.set()
        with self.lock:
            waiting = answer in self.waiting
            if waiting:
                self.waiting.remove(answer)
        if waiting:
            self.finish(answer)

    def close(self, reason: str) -> None:
        """Refuse new answers and end the waiting ones with ShuttingDown now (the batch loop ends the ones it holds
        when it sees `closed`)."""
        with self.lock:
            self.closed = ShuttingDown(reason)
            waiting, self.waiting = self.waiting, []
        for answer in waiting:
            self.finish(answer, self.closed)

    def stop_if_idle(self, held: bool, reset: Callable[[], None]) -> bool:
        """Whether the batch loop ends now: nothing waits, the loop holds nothing (`held`) and the queue is open;
        then `reset` runs under the lock, so that a put after it starts a fresh loop."""
        with self.lock:
            if self.closed is None and not self.waiting and not held:
                self._running = False
                reset()
                return True
        return False

    def fail_all(self, held: list[Answer], error: BaseException, reset: Callable[[], None]) -> None:
        """The batch loop failed: every answer it `held` and every waiting one ends with `error` (no client may hang),
        and the next put starts a fresh loop."""
        with self.lock:
            answers = held + self.waiting
            self.waiting, self._running = [], False
            reset()
        for answer in answers:
            self.finish(answer, error)

    def finish(self, answer: Answer, error: BaseException | None = None) -> None:
        """The answer's end, told to its sink once; its place in the queue is free again."""
        with self.lock:
            if answer.done:
                return
            answer.done = True
            self._in_flight -= 1
            self._durations = self._durations[1 - DURATIONS_KEPT:] + [time.monotonic() - answer.began]
        try:
            answer.sink.end(error)
        except Exception:  # a sink that fails must not stop the loop for the others
            logger.exception("the end of an answer could not be handed over")

"""What a user is shown of an answer: its text from its new tokens, cut at the model's own `### Human:` turn or a
caller's stop string, as the final Reply and as the stream a client reads while the answer is written (the stop
marker, stop strings and half a character held back until they are known)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from batching import BatchDecoder
from config import GenerationSettings
from data_utils import HUMAN


@dataclass
class Reply:
    text: str                 # the answer, prompt and stop marker removed
    new_tokens: int           # tokens generated (including a final EOS)
    stop: str                 # "eos", "marker" (model began a new ### Human: turn), "stop" (a caller's stop string),
                              # "length" or "cancelled"
    turns_dropped: int = 0    # oldest history turns dropped to fit the context window


def first_stop(text: str, stop: tuple[str, ...] = ()) -> tuple[int, str] | None:
    """(index, reason) of the earliest `### Human:` the model wrote itself ("marker") or caller's stop string
    ("stop"), or None."""
    hits = [(i, "marker") for i in [text.find(HUMAN)] if i >= 0]
    hits += [(i, "stop") for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def split_answer(text: str, ended_with_eos: bool, stop: tuple[str, ...] = ()) -> tuple[str, str]:
    """(answer, stop reason) from decoded new text: cut at a `### Human:` the model wrote itself or a stop string."""
    hit = first_stop(text, stop)
    if hit is not None:
        return text[:hit[0]].strip(), hit[1]
    return text.strip(), "eos" if ended_with_eos else "length"


def _held_back(text: str, stop: tuple[str, ...] = ()) -> int:
    """Length of the longest tail of text that could be the start of the stop marker or a stop string (held back
    while streaming, so neither is ever shown)."""
    for n in range(min(max(len(m) for m in (HUMAN, *stop)), len(text)), 0, -1):
        if any(m.startswith(text[-n:]) for m in (HUMAN, *stop)):
            return n
    return 0


def reply_for(tokenizer, new_ids: list[int], dropped: int = 0, stop: tuple[str, ...] = (), cancelled: bool = False
              ) -> Reply:
    """The Reply of an answer's new token ids: cut after EOS, at a `### Human:` or a stop string."""
    eos = tokenizer.eos_token_id
    ended = eos in new_ids
    if ended:
        new_ids = new_ids[:new_ids.index(eos) + 1]
    text, reason = split_answer(tokenizer.decode(new_ids, skip_special_tokens=True), ended, stop)
    if cancelled and reason == "length":
        reason = "cancelled"
    return Reply(text=text, new_tokens=len(new_ids), stop=reason, turns_dropped=dropped)


class AnswerStream:
    """One answer being generated on the generation thread.

    Iterate it -- `for`, or `async for`, whose waiting holds no thread -- for the answer so far (growing; the stop
    marker and stop strings are never shown, nor half a character); `reply` holds the finished Reply afterwards;
    `cancel()` stops the generation within one decode chunk and frees its row, or its place in the queue (a reader
    that leaves calls it: iterating again starts from the first piece). A stop string ends the answer and the
    generation. A failure of this answer (its scores not finite, the server shutting down) is raised by the
    iteration, after the text it had."""

    def __init__(self, batcher: BatchDecoder, tokenizer, ids: list[int], gen: GenerationSettings,
                 stop: tuple[str, ...], seed: int | None, turns_dropped: int):
        self.tokenizer, self.stop, self.turns_dropped = tokenizer, tuple(s for s in stop if s), turns_dropped
        self.prompt_tokens = len(ids)
        self.reply: Reply | None = None
        self._tokens: list[int] = []
        self._marks: list[int] = []  # len(_tokens) after each put: every put is a piece of the stream
        self._ended, self._error, self._cancelled = False, None, False
        self._changed = threading.Condition()
        self._wakers: list = []  # async readers' wake-ups, called on the generation thread
        self._batcher = batcher
        self._handle = batcher.submit(ids, gen, self, seed)

    # The batcher's sink (batching.BatchDecoder.submit), called on the generation thread.
    def put(self, tokens: list[int]) -> None:
        with self._changed:
            self._tokens += tokens
            self._marks.append(len(self._tokens))
            self._wake()

    def end(self, error: BaseException | None) -> None:
        with self._changed:
            self._ended, self._error = True, error
            self._wake()

    def _wake(self) -> None:
        self._changed.notify_all()
        for wake in self._wakers:
            wake()

    def cancel(self) -> None:
        self._cancelled = True
        self._batcher.cancel(self._handle)

    def _shown(self, tokens: list[int], ended: bool) -> tuple[str, bool]:
        """(the text to show for these tokens, whether a stop string or the marker ended the answer)."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hit = first_stop(text, self.stop)
        if hit is not None:
            return text[:hit[0]].strip(), True
        if not ended:  # what may still become a marker, a stop string or a whole character is held back
            text = text.rstrip("\ufffd")
            text = text[:len(text) - _held_back(text, self.stop)]
        return text.strip(), False

    def _ready(self, state: dict) -> bool:
        """Whether a piece (or the end) is there that this reader has not looked at; under the lock."""
        return (bool(self._marks) and self._marks[-1] > state["seen"]) or self._ended

    def _step(self, state: dict) -> tuple[bool, str | None]:
        """Look at the next piece that arrived: (whether there was one, the new text to yield or None);
        state["over"] once the answer is done."""
        with self._changed:
            later = [m for m in self._marks if m > state["seen"]]
            ended = self._ended
            upto = later[0] if later else len(self._tokens)
            tokens = self._tokens[:upto]
            last = ended and upto == len(self._tokens)
        if not later and not ended:
            return False, None
        state["seen"] = upto
        text, stopped = self._shown(tokens, last)
        if stopped and not ended:
            self.cancel()  # the answer is complete; the rest would be thrown away
        if stopped or last:
            state["over"] = True
            self.reply = reply_for(self.tokenizer, tokens, self.turns_dropped, self.stop,
                                   cancelled=self._cancelled and not stopped)
            if self._error is not None and not stopped:
                state["error"] = self._error
        if text and text != state["shown"]:
            state["shown"] = text
            return True, text
        return True, None

    def __iter__(self) -> Iterator[str]:
        state = {"seen": 0, "shown": "", "over": False, "error": None}
        while not state["over"]:
            with self._changed:
                self._changed.wait_for(lambda: self._ready(state))
            _, text = self._step(state)
            if text is not None:
                yield text
        if state["error"] is not None:
            raise state["error"]

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:  # the reader's loop has closed: nobody is waiting any more
                pass

        with self._changed:
            self._wakers.append(wake)
        state = {"seen": 0, "shown": "", "over": False, "error": None}
        try:
            while not state["over"]:
                arrived.clear()  # before looking: a put after the look sets it again
                progressed, text = self._step(state)
                if text is not None:
                    yield text
                elif not progressed:
                    await arrived.wait()
        finally:
            with self._changed:
                self._wakers.remove(wake)
        if state["error"] is not None:
            raise state["error"]

"""decoding.py's BatchDecoder under careless and hostile use: one answer's bad values or bad scores fail only that
answer, the queue is bounded, a waiting request is not held behind one that cannot join yet, and shutdown ends
every answer with an error instead of leaving a client hanging."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import PhiForCausalLM

from config import GenerationSettings
from conftest import TINY
from inference import ChatModel
from test_inference import ScriptedPhi, endless, finish, start_all

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0)
OTHERS = [[{"role": "user", "content": q}] for q in ("Hi", "What is the capital of France?", "Name a color.")]
PERU = [{"role": "user", "content": "What is the capital of Peru?"}]


def read(answer, timeout: float = 60):
    """(text, error) of an answer, read on a thread of its own: a client that hangs fails the test, not the run."""
    out = {"text": "", "error": None}

    def run():
        try:
            for out["text"] in answer:
                pass
        except Exception as error:
            out["error"] = error

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "the client was left hanging"
    return out["text"], out["error"]


def poisoned(chat_model) -> ChatModel:
    """The smoke model with the embedding of " Lima" made NaN: a row that writes " Lima" (only the answer about Peru
    does) gets NaN hidden states, keys, values and scores from its next step on."""
    model = PhiForCausalLM.from_pretrained(TINY).eval()
    model.load_state_dict(chat_model.model.state_dict())
    lima = chat_model.tokenizer(" Lima", add_special_tokens=False)["input_ids"]
    assert len(lima) == 1
    with torch.no_grad():
        model.model.embed_tokens.weight[lima[0]] = float("nan")
    return ChatModel(model, chat_model.tokenizer, fast=False, batch_slots=4)


def test_a_row_whose_scores_go_non_finite_fails_alone_and_leaves_nothing_behind(chat_model):
    chat = poisoned(chat_model)
    alone = [chat.chat(c, GREEDY).text for c in OTHERS]
    assert all(alone) and not any("Lima" in a for a in alone)
    answers = start_all(chat, [PERU] + OTHERS, GREEDY)
    (peru, error), *others = [read(a) for a in answers]
    assert isinstance(error, RuntimeError) and "not finite" in str(error)  # a clear error to that client alone
    assert peru == "The capital of Peru is Lima"                            # with the text it had
    assert [text for text, _ in others] == alone and all(e is None for _, e in others)
    # The failed row's slots held NaN; the answers that take the rows next are still their alone-answers.
    again = [read(a) for a in start_all(chat, OTHERS + OTHERS[:1], GREEDY)]
    assert [text for text, _ in again] == alone + alone[:1] and all(e is None for _, e in again)


def test_temperatures_below_the_floor_decode_greedily_beside_sampled_rows(chat_model):
    """1e-300 passes every range check (it is >= 0); dividing the scores by it gave inf, a NaN softmax, and a
    sampler error that failed every answer in the batch. Below config.MIN_TEMPERATURE, answers are greedy."""
    greedy = chat_model.chat(PERU, GREEDY).text
    tiny = GenerationSettings(max_new_tokens=24, temperature=1e-300)
    sampled = GenerationSettings(max_new_tokens=24, temperature=1.0)
    answers = [chat_model.start(chat_model.prompt_ids(PERU, 24)[0], g, seed=i)
               for i, g in enumerate([tiny, sampled, tiny, sampled])]
    results = [read(a) for a in answers]
    assert all(error is None for _, error in results), results
    assert results[0][0] == results[2][0] == greedy


def test_a_request_that_fits_is_not_held_behind_one_that_does_not(tokenizer):
    """The rows share one write index: a long prompt (A) cannot join a long-running answer (R) until R has written
    enough that both fit. A short request that fits and ends before R (B) joins at once instead of waiting behind A;
    one that would outlast R (C) waits behind A, which joins as soon as it fits: no starvation. (Steps are slowed so
    that R runs ~3 s.)"""
    chat, messages = endless(tokenizer, fast=False, delay=0.005)
    assert chat.context_window == 512
    running = chat.start(chat.prompt_ids(messages, 420)[0], GenerationSettings(max_new_tokens=420, temperature=0.0))
    pieces = iter(running)
    next(pieces)
    long_question = [{"role": "user", "content": "la " * 150}]
    events: list[str] = []

    def started(name, answer):
        def watch():
            for i, _ in enumerate(answer):
                if i == 0:
                    events.append(f"{name} started")
            events.append(f"{name} ended")
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    a_ids = chat.prompt_ids(long_question, 60)[0]
    assert len(a_ids) + 420 > 512  # A does not fit beside R
    readers = [started("A", chat.start(a_ids, GenerationSettings(max_new_tokens=60, temperature=0.0))),
               started("B", chat.start(chat.prompt_ids(messages, 3)[0],
                                       GenerationSettings(max_new_tokens=3, temperature=0.0))),
               started("C", chat.start(chat.prompt_ids(messages, 450)[0],
                                       GenerationSettings(max_new_tokens=450, temperature=0.0)))]
    threading.Thread(target=lambda: [events.append("R ended") for _ in [list(pieces)]], daemon=True).start()
    for reader in readers:
        reader.join(120)
        assert not reader.is_alive()
    assert events.index("B ended") < events.index("A started")  # B joined at once, not behind A
    assert events.index("B ended") < events.index("R ended")
    assert events.index("A started") < events.index("C started")  # C, which would delay A, did not pass it


def test_the_queue_is_bounded_and_a_waiting_answer_that_leaves_it_frees_its_place(tokenizer):
    from decoding import Busy
    chat, messages = endless(tokenizer, fast=False, delay=0.01)
    chat = ChatModel(chat.model, tokenizer, batch_slots=2, max_waiting=1)
    ids = chat.prompt_ids(messages, 200)[0]
    gen = GenerationSettings(max_new_tokens=200, temperature=0.0)
    held = [chat.start(ids, gen) for _ in range(3)]  # two rows and one place in the queue
    with pytest.raises(Busy) as busy:
        chat.start(ids, gen)
    assert busy.value.retry_after >= 1 and "busy" in str(busy.value)
    held[2].cancel()  # the waiting one leaves: its place is free at once, before any row is
    replacement = chat.start(ids, GenerationSettings(max_new_tokens=3, temperature=0.0))
    for answer in held[:2]:
        answer.cancel()
    assert read(replacement)[0] == "la la la" and read(held[2]) == ("", None)
    assert held[2].reply.stop == "cancelled" and held[2].reply.new_tokens == 0  # it never ran


def test_shutdown_ends_every_answer_with_an_error_and_refuses_new_ones(tokenizer):
    from decoding import ShuttingDown
    chat, messages = endless(tokenizer, fast=False, delay=0.01)
    chat = ChatModel(chat.model, tokenizer, batch_slots=2)
    ids = chat.prompt_ids(messages, 300)[0]
    gen = GenerationSettings(max_new_tokens=300, temperature=0.0)
    answers = [chat.start(ids, gen) for _ in range(4)]  # two written, two waiting
    next(iter(answers[0]))
    chat.shutdown("the server is shutting down")
    for answer in answers:
        _, error = read(answer)
        assert isinstance(error, ShuttingDown) and "shutting down" in str(error)
    with pytest.raises(ShuttingDown):
        chat.start(ids, gen)
    calls = ScriptedPhi.calls
    time.sleep(0.3)
    assert ScriptedPhi.calls == calls  # nothing runs on

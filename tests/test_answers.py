"""answers.py: what a user is shown of an answer: cut at the model's own `### Human:` turn or at EOS, streamed
growing piece by piece, and stopped (its row freed) when the reader cancels or leaves."""

from __future__ import annotations

import pytest

import inference
from config import GenerationSettings
from decoding import CHECK_EVERY
from doubles import GREEDY, ScriptedPhi, endless, scripted


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_generation_halts_at_a_human_turn_the_model_writes(tokenizer, fast):
    chat, messages = scripted(tokenizer, " Sure, here it is. ### Human: and now I ask myself a long question",
                              fast=fast)
    reply = chat.chat(messages, GenerationSettings(max_new_tokens=60, temperature=0.0))
    assert reply.text == "Sure, here it is." and reply.stop == "marker"
    assert reply.new_tokens < 30  # generation stopped at the marker, not at max_new_tokens
    streamed = list(chat.stream(messages, GenerationSettings(max_new_tokens=60, temperature=0.0)))
    assert streamed[-1] == "Sure, here it is." and all("#" not in s for s in streamed)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_generation_halts_at_eos(tokenizer, fast):
    chat, messages = scripted(tokenizer, " Done.", tail=[tokenizer.eos_token_id] + [5] * 50, fast=fast)
    reply = chat.chat(messages, GenerationSettings(max_new_tokens=60, temperature=0.0))
    answer_tokens = len(tokenizer(" Done.", add_special_tokens=False)["input_ids"])
    assert (reply.text, reply.stop, reply.new_tokens) == ("Done.", "eos", answer_tokens + 1)


def test_streaming_grows_token_by_token(chat_model):
    pieces = list(chat_model.stream([{"role": "user", "content": "What is the capital of Peru?"}], GREEDY))
    assert len(pieces) >= 3 and pieces[-1] == "The capital of Peru is Lima."
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_cancel_stops_the_generation_within_one_chunk(tokenizer, fast):
    chat, messages = endless(tokenizer, fast)
    gen = GenerationSettings(max_new_tokens=300, temperature=0.0)
    answer = chat.start(chat.prompt_ids(messages, 300)[0], gen)
    pieces = iter(answer)
    next(pieces), next(pieces)
    answer.cancel()
    rest = list(pieces)
    assert answer.reply.stop == "cancelled" and answer.reply.new_tokens <= 4 * CHECK_EVERY
    assert all(r.startswith("la") for r in rest)


def test_closing_the_stream_frees_the_model(tokenizer):
    """A client that leaves closes the stream (gradio does); generation stops at the next token, not at 300."""
    chat, messages = endless(tokenizer, fast=False)
    ScriptedPhi.calls = 0
    stream = chat.stream(messages, GenerationSettings(max_new_tokens=300, temperature=0.0))
    next(stream)
    stream.close()
    inference.generation_thread().submit(lambda: None).result()  # the generation thread is free again
    assert ScriptedPhi.calls < 20


def test_half_a_character_is_never_shown(tokenizer):
    """An emoji is four byte tokens here: while only some of them have come, the stream shows the text before it,
    never the replacement character a partial decode gives; once whole, the emoji."""
    chat, messages = scripted(tokenizer, " Hi 😀 there", tail=[tokenizer.eos_token_id])
    pieces = list(chat.stream(messages, GenerationSettings(max_new_tokens=20, temperature=0.0)))
    assert pieces[-1] == "Hi 😀 there" and "Hi 😀" in pieces, pieces
    assert not any("\ufffd" in p for p in pieces), pieces


def test_a_stop_string_is_never_shown_even_in_part(tokenizer):
    """A caller's stop string ("END", the OpenAI routes' `stop`) arrives a token at a time; no piece shows its start
    while it may still become the stop string, and the answer ends before it, the rest unsent."""
    chat, messages = scripted(tokenizer, " Sure, END here is more text", tail=[tokenizer.eos_token_id])
    answer = chat.start(chat.prompt_ids(messages, 30)[0], GenerationSettings(max_new_tokens=30, temperature=0.0),
                        stop=("END",))
    pieces = list(answer)
    assert pieces[-1] == "Sure," and not any("E" in p for p in pieces), pieces
    assert answer.reply.text == "Sure," and answer.reply.stop == "stop"

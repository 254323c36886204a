"""openai_api.py served by app.py, used as OpenAI clients and careless or hostile callers use it: the official openai
client and raw HTTP. What vLLM's and llama.cpp's server suites check of an OpenAI-compatible server, plus a bounded
queue, clients that leave, and errors that are always OpenAI's JSON."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import inference
from config import GenerationSettings
from conftest import MODEL_ID
from inference import ChatModel
from test_app import PERU, openai_client, serve, server, wait_until_idle  # noqa: F401 (server: a fixture)
from doubles import ScriptedPhi, endless

QUESTION = [{"role": "user", "content": "What is the capital of Peru?"}]


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + "v1/chat/completions", json=body, timeout=60, **kwargs)


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.fixture()
def endless_chat(tokenizer):
    """A model that never stops by itself and takes 20 ms a step: answers are still being written when clients act."""
    model, _ = endless(tokenizer, fast=False, delay=0.02)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Values that would have failed the batch
# ----------------------------------------------------------------------------------------------------------------

def test_a_tiny_temperature_is_greedy_through_the_api_and_the_page(server):
    """1e-300 passes the 0..2 range check of both entry points; it used to reach the sampler and fail."""
    r = openai_client(server).chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=1e-300)
    assert r.choices[0].message.content == PERU
    assert Client(server, verbose=False).predict("What is the capital of Peru?", 40, 1e-300, 0.9,
                                                 api_name="/chat") == PERU


def test_bodies_that_broke_the_parser_or_the_tokenizer_get_400_in_openai_shape(server):
    nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = openai_error(httpx.post(server + "v1/chat/completions", content=nested, timeout=60,
                                    headers={"content-type": "application/json"}), 400)
    assert "nested too deeply" in error["message"]
    surrogate = b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'
    error = openai_error(httpx.post(server + "v1/chat/completions", content=surrogate, timeout=60,
                                    headers={"content-type": "application/json"}), 400)
    assert "surrogate" in error["message"] and error["param"] == "messages"
    assert openai_client(server).chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0
                                                         ).choices[0].message.content == PERU  # still serving


def test_a_failure_inside_the_model_is_a_500_in_openai_shape(tokenizer):
    model, _ = endless(tokenizer, fast=False)
    forward = model.model.forward
    model.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: device-side assert"))
    demo, url = serve(model)
    try:
        error = openai_error(post(url, {"messages": QUESTION, "max_tokens": 5}), 500)
        assert error["type"] == "server_error" and "generation failed" in error["message"]
        with httpx.stream("POST", url + "v1/chat/completions", timeout=60,
                          json={"messages": QUESTION, "max_tokens": 5, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert "generation failed" in events[-1]["error"]["message"]
        model.model.forward = forward
        assert post(url, {"messages": QUESTION, "max_tokens": 3}).json()["choices"][0]["message"]["content"]
    finally:
        demo.close()


# ----------------------------------------------------------------------------------------------------------------
# OpenAI compatibility, with the official client
# ----------------------------------------------------------------------------------------------------------------

def test_models_routes_name_the_served_model_and_unknown_models_are_404(server):
    oa = openai_client(server)
    assert [m.id for m in oa.models.list()] == [MODEL_ID] and oa.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError) as missing:
        oa.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found" and MODEL_ID in missing.value.body["message"]
    assert oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0).model == MODEL_ID


def test_the_default_model_id_is_the_served_folders_name():
    assert [inference.model_id(p) for p in ("model/final", "runs/a/checkpoint-200", "merged/my-phi2", "x/final/")] \
        == ["model", "a-checkpoint-200", "my-phi2", "x"]


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_features_this_server_does_not_have_are_refused_never_ignored(server, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(server).chat.completions.create(model=MODEL_ID, messages=QUESTION, **extra)
    assert refused.value.body["param"] == param


def test_an_unknown_field_is_refused_naming_it_and_fields_without_effect_are_accepted(server):
    error = openai_error(post(server, {"messages": QUESTION, "temprature": 0}), 400)
    assert error["param"] == "temprature" and "unrecognized" in error["message"]
    r = openai_client(server).chat.completions.create(
        model=MODEL_ID, messages=QUESTION, temperature=0, user="u-1", metadata={"k": "v"}, store=False,
        tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto", logprobs=False)
    assert r.choices[0].message.content == PERU


def test_streamed_usage_only_when_asked_in_a_last_chunk_without_choices(server):
    oa = openai_client(server)
    plain = list(oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == PERU
    counted = list(oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens > 3
    assert counted[-1].usage.total_tokens == counted[-1].usage.prompt_tokens + counted[-1].usage.completion_tokens
    assert all(c.usage is None for c in counted[:-1]) and counted[-2].choices[0].finish_reason == "stop"


def test_developer_is_a_system_message_and_repeated_roles_are_one_turn(server):
    oa = openai_client(server)

    def answer(messages):
        return oa.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0,
                                          max_tokens=12).choices[0].message.content

    joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello.\n\nWhat is 2 plus 3?"}]
    assert answer([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello."},
                   {"role": "user", "content": "What is 2 plus 3?"}]) == answer(joined)


# ----------------------------------------------------------------------------------------------------------------
# One bounded queue; clients that leave
# ----------------------------------------------------------------------------------------------------------------

def test_past_the_queue_the_api_answers_429_with_retry_after_and_the_page_a_notice(endless_chat, tokenizer):
    chat = ChatModel(endless_chat.model, tokenizer, batch_slots=2, max_waiting=2, name=MODEL_ID)
    demo, url = serve(chat, GenerationSettings(max_new_tokens=200, temperature=0.0))
    try:
        streams = [httpx.stream("POST", url + "v1/chat/completions", timeout=60,
                                json={"messages": QUESTION, "max_tokens": 200, "stream": True}) for _ in range(4)]
        for stream in streams:  # two rows and two places in the queue
            assert stream.__enter__().status_code == 200
        full = post(url, {"messages": QUESTION, "max_tokens": 5})
        error = openai_error(full, 429)
        assert error["type"] == "rate_limit_error" and int(full.headers["retry-after"]) >= 1
        with pytest.raises(AppError, match="busy"):
            Client(url, verbose=False).predict("Hi", 5, 0.0, 0.9, api_name="/chat")
        for stream in streams:
            stream.__exit__(None, None, None)  # they leave: their places are free again
        deadline = time.time() + 30
        while (r := post(url, {"messages": QUESTION, "max_tokens": 3})).status_code == 429:
            assert time.time() < deadline
            time.sleep(0.2)
        assert r.json()["choices"][0]["message"]["content"] == "la la la"
    finally:
        demo.close()


def test_a_non_streamed_client_that_leaves_frees_its_row(endless_chat):
    """The generation stops when the client goes away (it would write 250 tokens, 5 s), waiting or decoding."""
    demo, url = serve(endless_chat, GenerationSettings(max_new_tokens=250, temperature=0.0))
    try:
        wait_until_idle()
        ScriptedPhi.calls = 0
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and goes away
            httpx.post(url + "v1/chat/completions", json={"messages": QUESTION, "max_tokens": 250}, timeout=1.0)
        time.sleep(0.5)
        wait_until_idle()
        stopped_at = ScriptedPhi.calls
        assert stopped_at < 150, stopped_at
        time.sleep(1.0)
        assert ScriptedPhi.calls == stopped_at  # nothing runs on after the client left
    finally:
        demo.close()


def test_waiting_requests_hold_no_thread_and_the_page_still_answers(endless_chat, tokenizer):
    """64 non-streamed requests in flight (8 decoded, 56 waiting): each used to hold a worker thread of the pool
    Gradio's page routes share (40 threads), until its first token."""
    chat = ChatModel(endless_chat.model, tokenizer, batch_slots=8, max_waiting=64, name=MODEL_ID)
    demo, url = serve(chat, GenerationSettings(max_new_tokens=100, temperature=0.0), max_queue=64)

    async def crowd() -> list[float]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            requests = [asyncio.create_task(client.post(url + "v1/chat/completions",
                                                        json={"messages": QUESTION, "max_tokens": 100}))
                        for _ in range(64)]
            await asyncio.sleep(2.0)  # all in flight: 8 being written, the others waiting
            assert not any(r.done() for r in requests)
            times = []
            for route in ("", "config"):
                start = time.perf_counter()
                assert (await client.get(url + route, timeout=30)).status_code == 200
                times.append(time.perf_counter() - start)
            for r in requests:
                r.cancel()  # the crowd leaves
            await asyncio.gather(*requests, return_exceptions=True)
            return times

    try:
        times = asyncio.run(crowd())
        assert max(times) < 1.0, times
        time.sleep(0.5)
        wait_until_idle()  # every request left: the generation thread is free again
    finally:
        demo.close()


# ----------------------------------------------------------------------------------------------------------------
# Access
# ----------------------------------------------------------------------------------------------------------------

def test_a_non_ascii_password_works_as_the_api_key_compared_as_utf8(chat_model):
    from app import password_note
    from config import AppConfig
    demo, url = serve(chat_model, auth="me:pässwörd")
    try:
        key = "Bearer pässwörd".encode("utf-8")
        r = httpx.post(url + "v1/chat/completions", timeout=60, headers={"authorization": key},
                       json={"messages": QUESTION, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == PERU
        wrong = httpx.get(url + "v1/models", headers={"authorization": "Bearer passwörd".encode("utf-8")})
        assert openai_error(wrong, 401)["code"] == "invalid_api_key"
    finally:
        demo.close()
    assert "cannot send it" in password_note(AppConfig(auth="me:pässwörd"))
    assert password_note(AppConfig(auth="me:secret")) is None


def test_bodies_other_than_json_and_foreign_host_names_are_refused(server):
    """Without auth (the loopback default) a web page could post a plain form to the API, or reach the server under
    a name of its own (DNS rebinding)."""
    r = httpx.post(server + "v1/chat/completions", content=json.dumps({"messages": QUESTION}),
                   headers={"content-type": "text/plain"}, timeout=60)
    assert "application/json" in openai_error(r, 415)["message"]
    assert openai_error(httpx.post(server + "v1/chat/completions", content=json.dumps({"messages": QUESTION}),
                                   timeout=60), 415)
    for path in ("", "config", "v1/models"):
        assert httpx.get(server + path, headers={"host": "attacker.example:7860"}).status_code == 400, path
    assert httpx.get(server + "v1/models", headers={"host": "localhost"}).status_code == 200

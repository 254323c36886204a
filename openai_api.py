"""OpenAI-compatible HTTP API over a ChatModel: `POST /v1/chat/completions` (streamed or not) and `GET /v1/models`.

app.py serves these routes on the same host and port as the Gradio UI, through the same ChatModel, so any OpenAI
client works against the fine-tuned model:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")   # with --app.auth u:p, api_key="p"
    client.chat.completions.create(model="phi2-qlora", messages=[{"role": "user", "content": "Hi"}])

Requests take `messages` (system/user/assistant, string content or text parts), `max_tokens` (or
`max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed` and `stream`; other OpenAI fields are accepted and
ignored, except `n` > 1, which is refused. Limits: app.max_messages messages and app.max_chars characters per
request, a body of at most MAX_BODY_BYTES, and the conversation must fit the context window with its max_tokens
(no silent trimming: that is a 400 `context_length_exceeded`). Every bad request gets OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status, never a traceback. When the app needs a
password (app.auth), the API needs it as the bearer key.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from config import AppConfig, GenerationSettings
from data_utils import BadConversation, PromptTooLong, normalize_chat
from inference import AnswerStream, ChatModel

logger = logging.getLogger(__name__)

MODEL_ID = "phi2-qlora"
MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4  # as OpenAI
FINISH = {"eos": "stop", "marker": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class RequestError(ValueError):
    """A request the API refuses; rendered in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.code, self.status, self.kind = param, code, status, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    gen: GenerationSettings
    stop: tuple[str, ...]
    seed: int | None
    stream: bool


def _number(body: dict, key: str, low: float, high: float, integer: bool = False) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {what} between {low:g} and {high:g} (got {value!r})", param=key)
    return value


def parse_request(body: Any, model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig) -> ChatRequest:
    """Validates and caps one chat request; raises RequestError saying what to fix."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    raw = body.get("messages")
    if isinstance(raw, list) and len(raw) > app_cfg.max_messages:
        raise RequestError(f"at most {app_cfg.max_messages} messages per request (got {len(raw)})", param="messages")
    try:
        messages = normalize_chat(raw, ends_with="user")
    except BadConversation as e:
        raise RequestError(str(e), param="messages") from e
    chars = sum(len(m["content"]) for m in messages)
    if chars > app_cfg.max_chars:
        raise RequestError(f"at most {app_cfg.max_chars} characters per request (got {chars})", param="messages")
    if body.get("n") not in (None, 1):
        raise RequestError("n must be 1: one answer per request", param="n")
    for key in ("max_completion_tokens", "max_tokens"):
        max_new = _number(body, key, 1, model.context_window - 1, integer=True)
        if max_new is not None:
            break
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0.01, 1)
    seed = _number(body, "seed", -2**63, 2**63 - 1, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                           param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false (got {stream!r})", param="stream")
    gen = dataclasses.replace(defaults, **{k: v for k, v in (("max_new_tokens", max_new), ("temperature", temperature),
                                                             ("top_p", top_p)) if v is not None})
    return ChatRequest(messages, gen, tuple(stop), None if seed is None else int(seed) % 2**63, stream)


def _check_key(request: Request, app_cfg: AppConfig) -> None:
    if app_cfg.auth is None:
        return
    password = app_cfg.auth.split(":", 1)[1] if ":" in app_cfg.auth else ""
    given = request.headers.get("authorization", "")
    key = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(key.encode(), password.encode()):
        raise RequestError("a valid API key is required: send the app's password (app.auth) as the bearer key",
                           code="invalid_api_key", status=401)


async def _body(request: Request) -> Any:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise RequestError(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from e


def _start(model: ChatModel, req: ChatRequest) -> AnswerStream:
    try:
        ids, dropped = model.prompt_ids(req.messages, req.gen.max_new_tokens)
    except PromptTooLong as e:
        raise RequestError(str(e), param="messages", code="context_length_exceeded") from e
    if dropped:
        raise RequestError(f"the conversation does not fit the {model.context_window}-token context window with "
                           f"max_tokens {req.gen.max_new_tokens}: drop its oldest {dropped} turn(s) or lower "
                           "max_tokens", param="messages", code="context_length_exceeded")
    return model.start(ids, req.gen, stop=req.stop, seed=req.seed)


def _usage(answer: AnswerStream) -> dict[str, int]:
    completion = answer.reply.new_tokens if answer.reply else 0
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens + completion}


def routes(model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig) -> list[APIRoute]:
    """The API's routes, for app.py to serve beside the UI."""

    async def chat_completions(request: Request):
        try:
            _check_key(request, app_cfg)
            req = parse_request(await _body(request), model, defaults, app_cfg)
            answer = _start(model, req)
        except RequestError as e:
            return e.response()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_events(answer, ident, created), media_type="text/event-stream")
        text = await _drain(answer)  # a client that leaves cancels the generation (_texts)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH[answer.reply.stop], "logprobs": None}],
            "usage": _usage(answer)})

    async def list_models(request: Request):
        try:
            _check_key(request, app_cfg)
        except RequestError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0,
                                                         "owned_by": "phi2-qlora"}]})

    return [APIRoute("/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False),
            APIRoute("/v1/models", list_models, methods=["GET"], include_in_schema=False)]


async def _drain(answer: AnswerStream) -> str:
    text = ""
    async for text in _texts(answer):
        pass
    return text


async def _texts(answer: AnswerStream) -> AsyncIterator[str]:
    """The growing answer, read on a worker thread (the streamer blocks); cancels the generation when abandoned."""
    iterator = iter(answer)
    done = object()
    try:
        while (text := await run_in_threadpool(next, iterator, done)) is not done:
            yield text
    finally:
        answer.cancel()


async def _events(answer: AnswerStream, ident: str, created: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: role, content deltas, finish reason with usage, [DONE]."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    try:
        async for text in _texts(answer):
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk({"content": text[len(sent):]})
                sent = text
    except Exception as e:  # the generation failed: tell the client in-stream, the status line is already sent
        logger.exception("generation failed")
        error = {"message": f"generation failed: {type(e).__name__}", "type": "server_error", "param": None,
                 "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    yield chunk({}, FINISH[answer.reply.stop], _usage(answer))
    yield "data: [DONE]\n\n"

"""OpenAI-compatible HTTP API over a ChatModel: `POST /v1/chat/completions` (streamed or not), `GET /v1/models` and
`GET /v1/models/{id}`.

app.py serves these routes on the same host and port as the Gradio UI, through the same ChatModel, so any OpenAI
client works against the fine-tuned model:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")   # with --app.auth u:p, api_key="p"
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}])

What a request may hold is listed below (SUPPORTED, NO_EFFECT, REFUSED): anything else is a 400 naming the field,
as OpenAI answers an unrecognized argument. Every error has OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`: 4xx for the request's own fault (415 for a body that is not `application/json`, 413 over MAX_BODY_BYTES,
404 `model_not_found`, 429 with `Retry-After` when the queue is full), 500 when the generation failed (the message
says why), never plain text or a traceback. When the app needs a password (app.auth), the API needs it as the bearer
key, compared as UTF-8.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from answer_queue import Busy, ShuttingDown
from answers import AnswerStream
from config import AppConfig, GenerationSettings, SettingsError, request_settings
from data_utils import BadConversation, PromptTooLong, is_text, normalize_chat
from inference import ChatModel

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4  # as OpenAI
FINISH = {"eos": "stop", "marker": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
SUPPORTED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
             "stream", "stream_options", "n", "logprobs", "top_logprobs", "response_format", "tool_choice")
# Accepted and without effect here: bookkeeping for OpenAI's platform, or tools a model trained on plain chats
# never calls (it answers in text, as a model that chose not to call one; `tool_choice` none/auto only).
NO_EFFECT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "tools", "functions",
             "function_call", "prompt_cache_key", "safety_identifier", "reasoning_effort", "verbosity")
# Refused unless absent or at their default: each would change the answer in a way this server does not do.
REFUSED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "modalities": ["text"], "audio": None,
           "prediction": None, "web_search_options": None}
API_NAMES = {"max_new_tokens": "max_tokens"}


class RequestError(ValueError):
    """A request the API refuses; rendered in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.param, self.code, self.status, self.kind, self.headers = param, code, status, kind, headers

    def response(self) -> JSONResponse:
        return error_response(str(self), self.status, self.kind, self.param, self.code, self.headers)


def error_response(message: str, status: int, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    gen: GenerationSettings
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _integer(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise RequestError(f"{key} must be an integer between {low} and {high} (got {value!r})", param=key)
    return value


def _check_fields(body: dict) -> None:
    """Unknown fields and features this server does not have are refused, never silently ignored."""
    for key in body:
        if key not in SUPPORTED and key not in NO_EFFECT and key not in REFUSED:
            raise RequestError(f"unrecognized request argument {key!r}; supported: {', '.join(SUPPORTED)} (README, "
                               "'OpenAI-compatible API')", param=key)
    for key, default in REFUSED.items():
        if body.get(key) not in (None, default):
            raise RequestError(f"{key} is not supported by this server (only {default!r})", param=key)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise RequestError("logprobs are not supported by this server: leave logprobs and top_logprobs unset",
                           param="logprobs")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schema)",
                           param="response_format")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none", "auto"):
            raise RequestError(f"{key}: this model does not call tools; only \"none\" or \"auto\" (it answers in "
                               "text)", param=key)
    if body.get("stream_options") is not None:
        if body.get("stream") is not True:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        options = body["stream_options"]
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise RequestError("stream_options must be an object like {\"include_usage\": true}",
                               param="stream_options")


def parse_request(body: Any, model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig) -> ChatRequest:
    """Validates and caps one chat request; raises RequestError saying what to fix."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("model") not in (None, model.name):
        raise RequestError(f"the model {body['model']!r} does not exist here; this server serves {model.name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found", status=404)
    _check_fields(body)
    raw = body.get("messages")
    if isinstance(raw, list) and len(raw) > app_cfg.max_messages:
        raise RequestError(f"at most {app_cfg.max_messages} messages per request (got {len(raw)})", param="messages")
    try:
        messages = normalize_chat(raw, ends_with="user", join_repeated=True)
    except BadConversation as e:
        raise RequestError(str(e), param="messages") from e
    if not all(is_text(m["content"]) for m in messages):
        raise RequestError("messages hold a lone UTF-16 surrogate (like \"\\ud800\"), which is not text: send "
                           "valid Unicode", param="messages")
    chars = sum(len(m["content"]) for m in messages)
    if chars > app_cfg.max_chars:
        raise RequestError(f"at most {app_cfg.max_chars} characters per request (got {chars})", param="messages")
    if body.get("n") not in (None, 1):
        raise RequestError("n must be 1: one answer per request", param="n")
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    names = {**API_NAMES, "max_new_tokens": "max_completion_tokens" if "max_completion_tokens" in body
             else "max_tokens"}
    try:
        gen = request_settings(defaults, {"max_new_tokens": max_new, "temperature": body.get("temperature"),
                                          "top_p": body.get("top_p")}, model.context_window, names)
    except SettingsError as e:
        raise RequestError(str(e), param=e.param) from e
    seed = _integer(body, "seed", -2**63, 2**63 - 1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s and is_text(s) for s in stop)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                           param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false (got {stream!r})", param="stream")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return ChatRequest(messages, gen, tuple(stop), None if seed is None else seed % 2**63, stream, include_usage)


def key_problem(request: Request, app_cfg: AppConfig) -> RequestError | None:
    """Why this request's bearer key is not the app's password (compared as UTF-8 bytes), or None."""
    if app_cfg.auth is None:
        return None
    password = app_cfg.auth.partition(":")[2].encode("utf-8")
    # Starlette hands header values over as Latin-1 text: encoding them back gives the bytes the client sent.
    given = request.headers.get("authorization", "").encode("latin-1")
    key = given[7:] if given[:7].lower() == b"bearer " else b""
    if not hmac.compare_digest(key, password):
        return RequestError("a valid API key is required: send the app's password (app.auth) as the bearer key",
                            code="invalid_api_key", status=401, kind="authentication_error")
    return None


async def _body(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError(f"the body must be JSON sent as Content-Type: application/json (got {media_type or 'none'!r})",
                           status=415)
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise RequestError(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise RequestError("the request body is nested too deeply to be a chat request") from e


async def _start(model: ChatModel, req: ChatRequest) -> AnswerStream:
    """Tokenizes on a worker thread (the event loop serves every route meanwhile) and joins the queue."""
    try:
        ids, dropped = await anyio.to_thread.run_sync(model.prompt_ids, req.messages, req.gen.max_new_tokens)
    except PromptTooLong as e:
        raise RequestError(str(e), param="messages", code="context_length_exceeded") from e
    if dropped:
        raise RequestError(f"the conversation does not fit the {model.context_window}-token context window with "
                           f"max_tokens {req.gen.max_new_tokens}: drop its oldest {dropped} turn(s) or lower "
                           "max_tokens", param="messages", code="context_length_exceeded")
    try:
        return model.start(ids, req.gen, stop=req.stop, seed=req.seed)
    except Busy as e:
        raise RequestError(f"{e}; retry after {e.retry_after} s", code="rate_limit_exceeded", status=429,
                           kind="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from e
    except ShuttingDown as e:
        raise RequestError(str(e), status=503, kind="server_error") from e


def _usage(answer: AnswerStream) -> dict[str, int]:
    completion = answer.reply.new_tokens if answer.reply else 0
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens + completion}


def _failure(error: BaseException) -> dict[str, Any]:
    """OpenAI's error body for a generation that failed after it was accepted."""
    return {"message": f"generation failed: {error}", "type": "server_error", "param": None,
            "code": "shutting_down" if isinstance(error, ShuttingDown) else None}


def routes(model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig) -> list[APIRoute]:
    """The API's routes, for app.py to serve beside the UI."""

    async def chat_completions(request: Request):
        try:
            if problem := key_problem(request, app_cfg):
                raise problem
            req = parse_request(await _body(request), model, defaults, app_cfg)
            answer = await _start(model, req)
        except RequestError as e:
            return e.response()
        except Exception:  # a bug of ours: the client still gets its protocol's error
            logger.exception("a chat request failed before generation")
            return error_response("the server could not start this request", 500, "server_error")
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_events(answer, ident, created, model.name, req.include_usage),
                                     media_type="text/event-stream")
        try:
            text = await _complete(request, answer)
        except Exception as e:
            logger.warning("a chat request's generation failed: %s", e)
            return JSONResponse({"error": _failure(e)}, status_code=503 if isinstance(e, ShuttingDown) else 500)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": model.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH[answer.reply.stop], "logprobs": None}],
            "usage": _usage(answer)})

    def card() -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": 0, "owned_by": "phi2-qlora"}

    async def list_models(request: Request):
        if problem := key_problem(request, app_cfg):
            return problem.response()
        return JSONResponse({"object": "list", "data": [card()]})

    async def get_model(request: Request, model_name: str):
        if problem := key_problem(request, app_cfg):
            return problem.response()
        if model_name != model.name:
            return error_response(f"the model {model_name!r} does not exist here; this server serves "
                                  f"{model.name!r}", 404, param="model", code="model_not_found")
        return JSONResponse(card())

    return [APIRoute("/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False),
            APIRoute("/v1/models", list_models, methods=["GET"], include_in_schema=False),
            APIRoute("/v1/models/{model_name:path}", get_model, methods=["GET"], include_in_schema=False)]


async def _complete(request: Request, answer: AnswerStream) -> str:
    """The whole answer; a client that leaves while it waits (queued or decoding) cancels it at once."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        answer.cancel()

    watcher = asyncio.create_task(watch())
    try:
        text = ""
        async for text in answer:
            pass
        return text
    finally:
        watcher.cancel()
        answer.cancel()  # nothing once it has ended; frees the row if this task was cancelled


async def _events(answer: AnswerStream, ident: str, created: int, name: str, include_usage: bool
                  ) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: role, content deltas, finish reason, the usage (only with
    stream_options.include_usage: one more chunk with no choices, as OpenAI sends it), [DONE]. A client that leaves
    ends the iteration, which cancels the answer."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    try:
        async for text in answer:
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk({"content": text[len(sent):]})
                sent = text
    except Exception as e:  # the generation failed: tell the client in-stream, the status line is already sent
        logger.warning("a streamed chat request's generation failed: %s", e)
        yield f"data: {json.dumps({'error': _failure(e)})}\n\n"
        return
    finally:  # a client that left (Starlette cancels this task) frees its row
        answer.cancel()
    yield chunk({}, FINISH[answer.reply.stop])
    if include_usage:
        usage = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [],
                 "usage": _usage(answer)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"

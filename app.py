"""Gradio chat demo and OpenAI-compatible API on top of inference.py: streamed multi-turn answers from the merged model.

    python app.py --config configs/smoke.yaml            # tiny smoke model on the CPU, http://127.0.0.1:7860
    python app.py --inference.dtype bf16                 # real Phi-2 + model/final adapter on a GPU
    python app.py --app.host 0.0.0.0 --app.auth me:secret   # reachable from the network: auth is required

The model is loaded and merged once at start. The page keeps two things apart: the chat it shows, and the
conversation the model reads (a gr.State). Notes for the person (an empty message, old turns left out, a message
too long, a busy server, an empty answer) are shown as notifications and never enter the conversation; a user's
message is shown as typed (markdown in it is not rendered). History is rendered through the training template and
trimmed to the context window (oldest turns first).

Several users: page, gradio_client and API requests share one bounded queue -- inference.batch_slots answers are
decoded together and app.max_queue more wait; past that the page shows a notice and the API answers 429 with
Retry-After. Waiting holds no thread (the page's and the API's handlers are asynchronous). Stop, a closed page or a
client that leaves (streamed or not, waiting or being answered) frees its place within one decode chunk. One
request's values cannot fail another's answer (docs/RELIABILITY.md says how).
`POST /v1/chat/completions`, `GET /v1/models[/{id}]` (openai_api.py) are served on the same host and port.

Access: nothing is shared publicly unless --app.share (which requires --app.auth). With app.auth, the page, its
event streams and the API need the login (the API takes the password as its bearer key); after 10 failed
logins or keys from one address within a minute, that address gets 429 for a minute (Guard). Bound to loopback, requests must name a loopback host (no DNS rebinding), and the API takes
only `application/json` bodies (a web page cannot post a plain form to it). SIGTERM or Ctrl-C: answers in flight
end with an error event saying the server is stopping, and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
import gradio as gr
from starlette.middleware import Middleware

import openai_api
from adapter_utils import AdapterError
from answer_queue import Busy, NonFiniteScores, ShuttingDown
from config import AppConfig, GenerationSettings, SettingsError, parse_config, request_settings
from data_utils import Message, PromptTooLong, is_text
from inference import ChatModel, load_chat_model
from model_utils import ModelLoadError

logger = logging.getLogger("app")

EXAMPLES = ["What is the capital of France?", "What is 2 plus 3?", "Explain what a large language model is."]
EMPTY_MESSAGE = "Your message is empty. Type a question and press Enter."
NOT_TEXT = "Your message holds characters that are not text (a lone surrogate); remove them and send it again."
EMPTY_ANSWER = "The model returned an empty answer; that turn is left out of the conversation."
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~=])")
PAGE_NAMES = {"max_new_tokens": "max new tokens"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def shown_as_typed(text: str) -> str:
    """Markdown for a user's message that displays the text itself (a leading ### stays ###, not a heading)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def settings(model: ChatModel, defaults: GenerationSettings, max_new_tokens: Any, temperature: Any, top_p: Any
             ) -> GenerationSettings:
    """The page's (or gradio_client's) values, held to the limits the API is held to (config.request_settings)."""
    try:
        return request_settings(defaults, {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                           "top_p": top_p}, model.context_window, PAGE_NAMES)
    except SettingsError as e:
        raise gr.Error(f"generation settings: {e}") from e


def check_message(message: Any, conversation: list[Message], app_cfg: AppConfig) -> str | None:
    """Why this message cannot be sent (a note for the person), or None."""
    if not isinstance(message, str) or not message.strip():
        return EMPTY_MESSAGE
    if not is_text(message):
        return NOT_TEXT
    if len(conversation) + 1 > app_cfg.max_messages:
        return (f"This chat has reached {app_cfg.max_messages} messages, the most one conversation may have; "
                "press Clear to start a new one.")
    chars = sum(len(m["content"]) for m in conversation) + len(message)
    if chars > app_cfg.max_chars:
        return (f"This chat would hold {chars} characters, more than the {app_cfg.max_chars} allowed; shorten the "
                "message or press Clear.")
    return None


def busy_note(error: Busy) -> str:
    return f"The server is busy: {str(error).split(': ', 1)[-1]}. Your message stays in the box: send it again in " \
           f"{error.retry_after} s."


def make_respond(model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig):
    """The UI callback: validates, trims history, streams the answer.

    Yields (textbox, shown chat, conversation). The conversation (what the model reads) and the shown chat grow
    together with each piece of the answer, so a stopped answer is kept in both as far as it got."""

    async def respond(message: str, shown: list[dict], conversation: list[Message], max_new_tokens: float,
                      temperature: float, top_p: float) -> AsyncIterator[tuple[Any, Any, Any]]:
        gen = settings(model, defaults, max_new_tokens, temperature, top_p)
        unchanged = (gr.skip(), gr.skip(), gr.skip())
        problem = check_message(message, conversation, app_cfg)
        if problem:
            gr.Warning(problem)
            yield unchanged  # the message stays in the box, the chat as it was
            return
        asked = conversation + [{"role": "user", "content": message.strip()}]
        try:
            ids, dropped = await anyio.to_thread.run_sync(model.prompt_ids, asked, gen.max_new_tokens)
            answer = model.start(ids, gen, turns_dropped=dropped)
        except PromptTooLong as e:
            gr.Warning(f"This message is too long for the model: {e}.")
            yield unchanged
            return
        except (Busy, ShuttingDown) as e:
            gr.Warning(busy_note(e) if isinstance(e, Busy) else f"{e}.")
            yield unchanged
            return
        if dropped:
            gr.Info(f"The oldest {dropped} turn(s) no longer fit the {model.context_window}-token context and are "
                    "left out of what the model reads.")
        shown = shown + [{"role": "user", "content": shown_as_typed(message.strip())}]
        yield "", shown, conversation
        text = ""
        try:
            async for text in answer:
                yield "", shown + [{"role": "assistant", "content": text}], \
                    asked + [{"role": "assistant", "content": text}]
        except (NonFiniteScores, ShuttingDown, RuntimeError) as e:
            gr.Warning(f"The answer stopped: {e}")
            return
        finally:  # Stop, Clear or a closed page cancel this task: the row is freed
            answer.cancel()
        if not text:
            gr.Info(EMPTY_ANSWER)

    return respond


def make_api_chat(model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig):
    """The `/chat` endpoint for gradio_client: one question, no history, the answer streamed."""

    async def chat(message: str, max_new_tokens: float, temperature: float, top_p: float) -> AsyncIterator[str]:
        gen = settings(model, defaults, max_new_tokens, temperature, top_p)
        problem = check_message(message, [], app_cfg)
        if problem:
            raise gr.Error(problem)
        try:
            ids, _ = await anyio.to_thread.run_sync(model.prompt_ids, [{"role": "user", "content": message.strip()}],
                                                    gen.max_new_tokens)
            answer = model.start(ids, gen)
        except PromptTooLong as e:
            raise gr.Error(f"This message is too long for the model: {e}.") from e
        except Busy as e:
            raise gr.Error(busy_note(e)) from e
        try:
            async for text in answer:
                yield text
        except (NonFiniteScores, ShuttingDown, RuntimeError) as e:
            raise gr.Error(f"generation failed: {e}") from e
        finally:
            answer.cancel()

    return chat


def build_app(model: ChatModel, gen: GenerationSettings, app_cfg: AppConfig) -> gr.Blocks:
    with gr.Blocks(title="Phi-2 QLoRA assistant") as demo:
        gr.Markdown("# Phi-2 QLoRA assistant\nAnswers come from the base model merged with the trained adapter, in "
                    "the training template (### Human / ### Assistant). Older turns are left out when the chat "
                    "outgrows the context.")
        chatbot = gr.Chatbot(label="Chat", height=460)
        conversation = gr.State([])
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8, autofocus=True,
                             max_length=app_cfg.max_chars)
            send = gr.Button("Send", variant="primary", scale=1)
            stop = gr.Button("Stop", scale=1)
            clear = gr.Button("Clear", scale=1)
        with gr.Accordion("Generation settings", open=False):
            max_new = gr.Slider(1, max(1, model.context_window // 2), value=gen.max_new_tokens, step=1,
                                label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top_p")
        gr.Examples(EXAMPLES, inputs=box)
        inputs = [box, chatbot, conversation, max_new, temperature, top_p]
        respond = make_respond(model, gen, app_cfg)
        answering = [trigger(respond, inputs, [box, chatbot, conversation], api_visibility="private")
                     for trigger in (box.submit, send.click)]
        stop.click(None, cancels=answering)
        clear.click(lambda: ("", [], []), outputs=[box, chatbot, conversation], cancels=answering,
                    api_visibility="private")
        # gradio_client's /chat: hidden components give it the same validation as the page's sliders.
        api_message, api_answer = gr.Textbox(visible=False), gr.Textbox(visible=False)
        gr.Button(visible=False).click(make_api_chat(model, gen, app_cfg), [api_message, max_new, temperature, top_p],
                                       api_answer, api_name="chat")
    # The one bound on waiting is the model's queue (ChatModel.start raises Busy past it): Gradio runs every chat
    # event at once (its handlers wait without a thread) and only caps its own queue at the same size.
    demo.queue(max_size=model.batch_slots + app_cfg.max_queue, default_concurrency_limit=None)
    return demo


@dataclass
class Guard:
    """Failed logins and API keys per client address: after `failures_allowed` within `window_s` seconds, that
    address is answered 429 for `lockout_s` seconds (and it is logged once). A few thousand addresses at most are
    remembered, the oldest forgotten first."""
    failures_allowed: int = 10
    window_s: float = 60.0
    lockout_s: float = 60.0
    most_addresses: int = 4096
    failures: dict[str, list[float]] = field(default_factory=dict)
    locked: dict[str, float] = field(default_factory=dict)

    def retry_after(self, address: str) -> int | None:
        until = self.locked.get(address)
        if until is None or until <= time.monotonic():
            self.locked.pop(address, None)
            return None
        return max(1, round(until - time.monotonic()))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        recent = [t for t in self.failures.pop(address, []) if t > now - self.window_s] + [now]
        self.failures[address] = recent  # re-inserted: the dict's order is the order of the last failure
        while len(self.failures) > self.most_addresses:
            self.failures.pop(next(iter(self.failures)))
        if len(recent) >= self.failures_allowed:
            self.locked[address] = now + self.lockout_s
            self.failures.pop(address)
            logger.warning("%d failed logins or API keys from %s within %g s: it is answered 429 for %g s",
                           len(recent), address, self.window_s, self.lockout_s)
            while len(self.locked) > self.most_addresses:
                self.locked.pop(next(iter(self.locked)))

    def succeeded(self, address: str) -> None:
        self.failures.pop(address, None)


class ServerGuard:
    """ASGI middleware in front of every route of the app (page, Gradio's routes, the API):

    - bound to loopback (and no share link), a Host header that is not a loopback name is refused: a web page the
      user visits cannot reach the server under a name of its own (DNS rebinding);
    - with app.auth, Gradio's heartbeat event stream (which Gradio leaves open) needs the login's session cookie;
    - failed logins (POST /login) and API keys (/v1) are counted per address (Guard) and a locked-out address gets
      429 with Retry-After, on /v1 in OpenAI's error shape."""

    def __init__(self, app, app_cfg: AppConfig, guard: Guard):
        self.app, self.app_cfg, self.guard = app, app_cfg, guard
        self.check_host = app_cfg.host in LOOPBACK_NAMES and not app_cfg.share
        self.hosts = {app_cfg.host, *LOOPBACK_NAMES}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        api = path.startswith("/v1/")
        if self.check_host and _host_name(scope) not in self.hosts:
            return await self._refuse(scope, send, 400, api, f"the Host header must name this server "
                                      f"({', '.join(sorted(self.hosts))}) while it is bound to loopback")
        address = (scope.get("client") or ("unknown", 0))[0]
        counted = api or path.rstrip("/") == "/login"
        if counted and (wait := self.guard.retry_after(address)) is not None:
            return await self._refuse(scope, send, 429, api, f"too many failed logins or API keys from this "
                                      f"address: try again in {wait} s", {"retry-after": str(wait)})
        if self.app_cfg.auth and "/heartbeat/" in path and not _logged_in(scope):
            return await self._refuse(scope, send, 401, api, "log in first")
        if not counted:
            return await self.app(scope, receive, send)

        async def observed(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 401 or (status == 400 and not api):  # Gradio answers a wrong login with 400
                    self.guard.failed(address)
                elif status < 400 and not api:
                    self.guard.succeeded(address)
            await send(message)

        await self.app(scope, receive, observed)

    @staticmethod
    async def _refuse(scope, send, status: int, api: bool, message: str, headers: dict[str, str] | None = None):
        if api:
            body = {"error": {"message": message, "type": "invalid_request_error" if status != 429
                              else "rate_limit_error", "param": None, "code": None}}
        else:
            body = {"detail": message}
        data = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})


def _host_name(scope) -> str:
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
    if host.startswith("["):  # [::1]:7860
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _logged_in(scope) -> bool:
    """Whether the request carries a session cookie of Gradio's login (its App keeps the tokens)."""
    gradio_app = scope.get("app")
    tokens, cookie_id = getattr(gradio_app, "tokens", {}), getattr(gradio_app, "cookie_id", None)
    cookies = {}
    for key, value in scope["headers"]:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, token = part.strip().partition("=")
                cookies[name] = token
    return any(tokens.get(cookies.get(f"{prefix}{cookie_id}")) for prefix in ("access-token-", "access-token-unsecure-"))


def password_note(app_cfg: AppConfig) -> str | None:
    """Why HTTP clients cannot send this password as the API's bearer key, or None."""
    if app_cfg.auth and not app_cfg.auth.partition(":")[2].isascii():
        return ("app.auth's password has non-ASCII characters: the page's login takes it, but most HTTP clients "
                "(the official openai client among them) cannot send it as the API's bearer key; use an ASCII "
                "password if the API is used")
    return None


def launch(demo: gr.Blocks, app_cfg: AppConfig, model: ChatModel, gen: GenerationSettings, block: bool = True):
    """Serve the UI and the OpenAI-compatible routes on app.host:app.port, behind ServerGuard, with FastAPI's own
    schema routes off (Gradio's API page keeps its login)."""
    auth = tuple(app_cfg.auth.split(":", 1)) if app_cfg.auth else None
    if note := password_note(app_cfg):
        logger.warning("%s", note)
    return demo.launch(server_name=app_cfg.host, server_port=app_cfg.port, share=app_cfg.share, auth=auth,
                       prevent_thread_lock=not block, show_error=False,
                       app_kwargs={"routes": openai_api.routes(model, gen, app_cfg), "openapi_url": None,
                                   "middleware": [Middleware(ServerGuard, app_cfg=app_cfg, guard=Guard())]})


def serve_until_stopped(demo: gr.Blocks, app_cfg: AppConfig, model: ChatModel, gen: GenerationSettings) -> None:
    """Serve until SIGTERM or Ctrl-C, then stop in order: answers in flight end with an error event that says so,
    the HTTP server closes, the model is freed on its own thread (no teardown of compiled code at exit)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    launch(demo, app_cfg, model, gen, block=False)
    logger.info("the chat page: %s, the OpenAI-compatible API: %sv1 (model %r)%s", demo.local_url, demo.local_url,
                model.name, f"; the public link: {demo.share_url}" if demo.share_url else "")
    while not stop.wait(0.5):
        pass
    logger.info("stopping: ending the answers in flight")
    model.shutdown("the server is shutting down; send the request again once it is back")
    time.sleep(0.5)  # the streams' last events go out before their connections close
    demo.close()
    model.close()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # (gradio's requests to itself at startup)
    try:
        model = load_chat_model(cfg)
    except (AdapterError, ModelLoadError, ValueError) as e:
        logger.error("%s", e)
        return 1
    serve_until_stopped(build_app(model, cfg.generation, cfg.app), cfg.app, model, cfg.generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())

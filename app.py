"""Gradio chat demo and OpenAI-compatible API on top of inference.py: streamed multi-turn answers from the merged model.

    python app.py --config configs/smoke.yaml            # tiny smoke model on the CPU, http://127.0.0.1:7860
    python app.py --inference.dtype bf16                 # real Phi-2 + model/final adapter on a GPU
    python app.py --app.host 0.0.0.0 --app.auth me:secret   # reachable from the network: auth is required

The model is loaded and merged once at start. The page keeps two things apart: the chat it shows, and the
conversation the model reads (a gr.State). Notes for the person (an empty message, old turns left out, a message
too long, an empty answer) are shown as notifications and never enter the conversation; a user's message is shown as
typed (markdown in it is not rendered). History is rendered through the training template and trimmed to the context
window (oldest turns first). Stop, a closed page or a cancelled API call stops the generation within one decode
chunk. Concurrent requests (page, gradio_client and API) are decoded together, up to inference.batch_slots at once
(decoding.BatchDecoder); more wait in a bounded queue.
`POST /v1/chat/completions` and `GET /v1/models` (openai_api.py) are served on the same host and port. Nothing is
shared publicly unless --app.share (which requires --app.auth) is given.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Iterator

import gradio as gr

from adapter_utils import AdapterError
from config import AppConfig, GenerationSettings, parse_config
from data_utils import Message, PromptTooLong
from inference import ChatModel, load_chat_model
from model_utils import ModelLoadError
import openai_api

logger = logging.getLogger("app")

EXAMPLES = ["What is the capital of France?", "What is 2 plus 3?", "Explain what a large language model is."]
EMPTY_MESSAGE = "Your message is empty. Type a question and press Enter."
EMPTY_ANSWER = "The model returned an empty answer; that turn is left out of the conversation."
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~=])")


def shown_as_typed(text: str) -> str:
    """Markdown for a user's message that displays the text itself (a leading ### stays ###, not a heading)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def settings(defaults: GenerationSettings, max_new_tokens: Any, temperature: Any, top_p: Any) -> GenerationSettings:
    try:
        gen = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                 top_p=float(top_p), top_k=defaults.top_k,
                                 repetition_penalty=defaults.repetition_penalty)
    except (TypeError, ValueError) as e:
        raise gr.Error(f"generation settings must be numbers: {e}") from e
    if gen.max_new_tokens < 1 or gen.temperature < 0 or not 0 < gen.top_p <= 1:
        raise gr.Error("max new tokens must be >= 1, temperature >= 0 and top_p in (0, 1]")
    return gen


def check_message(message: Any, conversation: list[Message], app_cfg: AppConfig) -> str | None:
    """Why this message cannot be sent (a note for the person), or None."""
    if not isinstance(message, str) or not message.strip():
        return EMPTY_MESSAGE
    if len(conversation) + 1 > app_cfg.max_messages:
        return (f"This chat has reached {app_cfg.max_messages} messages, the most one conversation may have; "
                "press Clear to start a new one.")
    chars = sum(len(m["content"]) for m in conversation) + len(message)
    if chars > app_cfg.max_chars:
        return (f"This chat would hold {chars} characters, more than the {app_cfg.max_chars} allowed; shorten the "
                "message or press Clear.")
    return None


def make_respond(model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig):
    """The UI callback: validates, trims history, streams the answer.

    Yields (textbox, shown chat, conversation). The conversation (what the model reads) and the shown chat grow
    together with each piece of the answer, so a stopped answer is kept in both as far as it got."""

    def respond(message: str, shown: list[dict], conversation: list[Message], max_new_tokens: float,
                temperature: float, top_p: float) -> Iterator[tuple[Any, Any, Any]]:
        gen = settings(defaults, max_new_tokens, temperature, top_p)
        unchanged = (gr.skip(), gr.skip(), gr.skip())
        problem = check_message(message, conversation, app_cfg)
        if problem:
            gr.Warning(problem)
            yield unchanged  # the message stays in the box, the chat as it was
            return
        asked = conversation + [{"role": "user", "content": message.strip()}]
        try:
            _, dropped = model.prompt_ids(asked, gen.max_new_tokens)
        except PromptTooLong as e:
            gr.Warning(f"This message is too long for the model: {e}.")
            yield unchanged
            return
        if dropped:
            gr.Info(f"The oldest {dropped} turn(s) no longer fit the {model.context_window}-token context and are "
                    "left out of what the model reads.")
        shown = shown + [{"role": "user", "content": shown_as_typed(message.strip())}]
        yield "", shown, conversation
        answer = ""
        for answer in model.stream(asked, gen):
            yield "", shown + [{"role": "assistant", "content": answer}], \
                asked + [{"role": "assistant", "content": answer}]
        if not answer:
            gr.Info(EMPTY_ANSWER)

    return respond


def make_api_chat(model: ChatModel, defaults: GenerationSettings, app_cfg: AppConfig):
    """The `/chat` endpoint for gradio_client: one question, no history, the answer streamed."""

    def chat(message: str, max_new_tokens: float, temperature: float, top_p: float) -> Iterator[str]:
        gen = settings(defaults, max_new_tokens, temperature, top_p)
        problem = check_message(message, [], app_cfg)
        if problem:
            raise gr.Error(problem)
        try:
            yield from model.stream([{"role": "user", "content": message.strip()}], gen)
        except PromptTooLong as e:
            raise gr.Error(f"This message is too long for the model: {e}.") from e

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
    demo.queue(max_size=app_cfg.max_queue, default_concurrency_limit=app_cfg.concurrency_limit)
    return demo


def launch(demo: gr.Blocks, app_cfg: AppConfig, model: ChatModel, gen: GenerationSettings, block: bool = True):
    """Serve the UI and the OpenAI-compatible routes on app.host:app.port."""
    auth = tuple(app_cfg.auth.split(":", 1)) if app_cfg.auth else None
    return demo.launch(server_name=app_cfg.host, server_port=app_cfg.port, share=app_cfg.share, auth=auth,
                       prevent_thread_lock=not block, show_error=False,
                       app_kwargs={"routes": openai_api.routes(model, gen, app_cfg)})


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    try:
        model = load_chat_model(cfg)
    except (AdapterError, ModelLoadError, ValueError) as e:
        logger.error("%s", e)
        return 1
    launch(build_app(model, cfg.generation, cfg.app), cfg.app, model, cfg.generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gradio chat demo on top of inference.py: streamed multi-turn answers from the merged model.

    python app.py --config configs/smoke.yaml            # tiny smoke model on the CPU, http://127.0.0.1:7860
    python app.py --inference.dtype bf16                 # real Phi-2 + model/final adapter on a GPU
    python app.py --app.host 0.0.0.0 --app.auth me:secret   # reachable from the network: auth is required

The model is loaded and merged once at start. History is rendered through the training template and trimmed to
the context window (oldest turns first). Requests wait in a bounded queue; `app.concurrency_limit` of them generate
at once. Nothing is shared publicly unless --app.share is given.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterator

import gradio as gr

from adapter_utils import AdapterError
from config import AppConfig, GenerationSettings, parse_config
from data_utils import Message, PromptTooLong
from inference import ChatModel, load_chat_model
from model_utils import ModelLoadError

logger = logging.getLogger("app")

EXAMPLES = ["What is the capital of France?", "What is 2 plus 3?", "Explain what a large language model is."]
EMPTY_MESSAGE = "Your message is empty. Type a question and press Enter."


def _text(content: Any) -> str:
    """Gradio history content is a string, or a list of parts with text for multimodal messages."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return ""


def to_messages(history: list[dict], message: str) -> list[Message]:
    """Gradio's openai-style history + the new message -> alternating user/assistant messages."""
    messages: list[Message] = []
    for item in history:
        role, text = item.get("role"), _text(item.get("content")).strip()
        if role not in ("user", "assistant") or not text:
            continue
        if messages and messages[-1]["role"] == role:  # a failed turn left two in a row: keep the newest
            messages[-1] = {"role": role, "content": text}
        else:
            messages.append({"role": role, "content": text})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages + [{"role": "user", "content": message}]


def make_respond(model: ChatModel, defaults: GenerationSettings):
    """The ChatInterface callback: validates, trims history, streams the answer."""

    def respond(message: str, history: list[dict], max_new_tokens: float, temperature: float,
                top_p: float) -> Iterator[str]:
        if not isinstance(message, str) or not message.strip():
            yield EMPTY_MESSAGE
            return
        gen = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                 top_p=float(top_p), top_k=defaults.top_k,
                                 repetition_penalty=defaults.repetition_penalty)
        messages = to_messages(history, message)
        try:
            _, dropped = model.prompt_ids(messages, gen.max_new_tokens)
        except PromptTooLong as e:
            yield f"This message is too long for the model: {e}."
            return
        note = (f"_(The oldest {dropped} turn(s) no longer fit the {model.context_window}-token context and were "
                "left out.)_\n\n") if dropped else ""
        answer = ""
        for answer in model.stream(messages, gen):
            yield note + answer
        if not answer:
            yield note + "_(The model returned an empty answer.)_"

    return respond


def build_app(model: ChatModel, gen: GenerationSettings, app_cfg: AppConfig) -> gr.Blocks:
    respond = make_respond(model, gen)
    demo = gr.ChatInterface(
        respond,
        title="Phi-2 QLoRA assistant",
        description="Answers come from the base model merged with the trained adapter, in the training template "
                    "(### Human / ### Assistant). Older turns are dropped when the chat outgrows the context.",
        additional_inputs=[
            gr.Slider(1, max(1, model.context_window // 2), value=gen.max_new_tokens, step=1,
                      label="max new tokens"),
            gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05, label="temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top_p"),
        ],
        examples=[[e, gen.max_new_tokens, gen.temperature, gen.top_p] for e in EXAMPLES],
        cache_examples=False,
        concurrency_limit=app_cfg.concurrency_limit,
        api_name="chat",
    )
    demo.queue(max_size=app_cfg.max_queue, default_concurrency_limit=app_cfg.concurrency_limit)
    return demo


def launch(demo: gr.Blocks, app_cfg: AppConfig, block: bool = True):
    auth = tuple(app_cfg.auth.split(":", 1)) if app_cfg.auth else None
    return demo.launch(server_name=app_cfg.host, server_port=app_cfg.port, share=app_cfg.share, auth=auth,
                       prevent_thread_lock=not block, show_error=False)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    try:
        model = load_chat_model(cfg)
    except (AdapterError, ModelLoadError, ValueError) as e:
        logger.error("%s", e)
        return 1
    launch(build_app(model, cfg.generation, cfg.app), cfg.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())

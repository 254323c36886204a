"""A diagnostic for .ci/gpu (docs/PERFORMANCE.md, users who sample): the engine's host work for a decode step at 64
rows, greedy against the server's default settings (temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.1,
each answer seeded): the Python-level torch calls a step makes (each a dispatch, and on a GPU a kernel launch; counted
on the plain path, where no compiled code traces the counting mode) and the host's milliseconds a step, inside
BatchDecoder's chunks, on the tiny model (its fast path on a GPU, whose steps are CUDA graphs; the plain path on the
CPU). Three runs of each, 64 answers of 48 tokens.

    python3 .ci/sampling_micro.py
"""
import sys
import time

import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

sys.path.insert(0, ".")
from config import GenerationSettings  # noqa: E402
from inference import ChatModel  # noqa: E402
from model_utils import load_tokenizer  # noqa: E402

TINY, ROWS, TOKENS = "data/tiny-phi", 64, 48


class Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def measure(chat: ChatModel, gen: GenerationSettings, count: bool) -> float:
    """Torch calls a step (count) or host milliseconds a step, over one run of ROWS answers."""
    batcher, chunk = chat.batcher, chat.batcher._decode_chunk
    spent, calls = [0.0], Calls()

    def timed(most):
        begun = time.perf_counter()
        if count:
            with calls:
                chunk(most)
        else:
            chunk(most)
        spent[0] += time.perf_counter() - begun

    batcher._decode_chunk = timed
    before = batcher.record["steps"]
    answers = [chat.start(chat.prompt_ids([{"role": "user", "content": f"Tell me about country {i}."}], TOKENS)[0],
                          gen, seed=i) for i in range(ROWS)]
    for answer in answers:
        for _ in answer:
            pass
    batcher._decode_chunk = chunk
    steps = batcher.record["steps"] - before
    return calls.n / steps if count else 1000 * spent[0] / steps


if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(TINY)
    plain = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).to(device), tokenizer, fast=False, batch_slots=ROWS)
    chat = plain if device.type != "cuda" else \
        ChatModel(AutoModelForCausalLM.from_pretrained(TINY).to(device), tokenizer, fast=True, batch_slots=ROWS)
    greedy = GenerationSettings(max_new_tokens=TOKENS, temperature=0.0, repetition_penalty=1.0)
    defaults = GenerationSettings(max_new_tokens=TOKENS)
    if device.type == "cuda":
        chat.warm_up(greedy)
    print(torch.__version__, torch.cuda.get_device_name() if device.type == "cuda" else "CPU", flush=True)
    for name, gen in (("greedy", greedy), ("the server's defaults (sampled)", defaults)):
        measure(chat, gen, count=False)  # (each shape seen once)
        calls = measure(plain, gen, count=True)
        ms = [measure(chat, gen, count=False) for _ in range(3)]
        print(f"{name:32} {calls:6.0f} torch calls a step; host " + ", ".join(f"{m:.2f}" for m in ms) +
              f" ms a step at {ROWS} rows", flush=True)
    for model in {id(m): m for m in (plain, chat)}.values():
        model.shutdown()
        model.close()

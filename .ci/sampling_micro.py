"""A diagnostic for .ci/gpu (docs/PERFORMANCE.md, users who sample): the engine's host work for a decode step at 64
rows, greedy against the server's default settings (temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.1,
each answer seeded): the Python-level torch calls a step makes (each a dispatch, and on a GPU a kernel launch; counted
on the plain path, where no compiled code traces the counting mode) and the host's milliseconds a step, inside
BatchDecoder's chunks, on the tiny model (its fast path on a GPU, whose steps are CUDA graphs; the plain path on the
CPU). Three runs of each, 64 answers of 48 tokens. Then what the server's defaults add to a step's device work (35th
session: 64 sampled rows with the repetition penalty took 5.74 ms a step on an H100, greedy ones without it 4.81): the
engine's penalty, and its warp, softmax and draw (decoding.sample_rows), at 64 rows of Phi-2's 51,200 scores, each
timed, and each operator's share under torch.profiler.

    python3 .ci/sampling_micro.py
"""
import sys
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

sys.path.insert(0, ".")
from config import GenerationSettings  # noqa: E402
from decoding import RowSampling, penalize, remember, sample_rows  # noqa: E402
from inference import ChatModel  # noqa: E402
from model_utils import load_tokenizer  # noqa: E402

TINY, ROWS, TOKENS = "data/tiny-phi", 64, 48
PHI2_VOCAB = 51200


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


def sampled_step_work(device: torch.device, gen: GenerationSettings) -> None:
    """The device work a step adds for ROWS rows of Phi-2's vocabulary beyond the greedy argmax, as BatchDecoder's
    chunk does it: the repetition penalty (penalize, then remember the tokens), and _draw's sample_rows (warp,
    softmax and draw, each row from its own generator). Each part's time a step (synchronized), then each
    operator's self time for both under torch.profiler; 50 steps each on a GPU, 5 on the CPU."""
    repeats = 50 if device.type == "cuda" else 5
    scores = torch.randn(ROWS, PHI2_VOCAB, device=device, dtype=torch.bfloat16) * 3
    seen = torch.rand(ROWS, PHI2_VOCAB, device=device) < 0.002  # ~100 tokens a row seen
    penalty = torch.full((ROWS, 1), gen.repetition_penalty, device=device)
    settings = RowSampling.of([gen] * ROWS, PHI2_VOCAB, device)
    generators = [torch.Generator(device).manual_seed(i) for i in range(ROWS)]

    def penalized():
        token = penalize(scores.float(), seen, penalty).argmax(-1)
        remember(seen, token[:, None], PHI2_VOCAB - 1)
        return token

    def sampled():
        return sample_rows(scores.float(), settings, generators)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, part in (("the repetition penalty", penalized), ("warp, softmax and draw", sampled)):
        for _ in range(5):
            part()
        sync()
        begun = time.perf_counter()
        for _ in range(repeats):
            part()
        sync()
        print(f"{name} at {ROWS} rows x {PHI2_VOCAB} scores: "
              f"{(time.perf_counter() - begun) * 1e3 / repeats:.3f} ms a step (wall, synchronized)", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            penalized()
            sampled()
        sync()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=50), flush=True)


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
    sampled_step_work(device, defaults)
    for model in {id(m): m for m in (plain, chat)}.values():
        model.shutdown()
        model.close()

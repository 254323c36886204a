"""Where decoding.BatchDecoder's time goes when users join: a timeline of its admission (the cache moved, the prompts'
eager prefill, the first tokens), each part timed between two device synchronizations.

bench.py serve reported 0.167 s of admitting in the 0.82 s that 8 clients took (H200, bf16). This loads the model as
bench.run_serve does (random-init Phi-2, lm_head limited to the tiny tokenizer's ids, warm-up), starts answers in this
process (no HTTP) and prints, for three arrivals (one answer alone; one, then seven 20 ms later; eight at once),
twice, the wall time and the timeline; then a profile of one arrival pattern. Output of the 2026-11-30 H200 run:
docs/bench/h200-serve-admission-2026-11-30.log. On a machine without CUDA it runs the tiny model in fp32.

    python docs/bench/serve_admission.py   # from the repo root
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
import torch

import bench
import decoding
from inference import load_model_folder

timeline = []
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
T0 = time.perf_counter()


def timed(cls, name):
    fn = getattr(cls, name)

    def wrapper(self, *a, **k):
        sync()
        t = time.perf_counter()
        try:
            return fn(self, *a, **k)
        finally:
            sync()
            timeline.append((name, t - T0, time.perf_counter() - t))
    setattr(cls, name, wrapper)


for n in ("_admit", "_relayout", "_prefill", "_place_rows", "_take"):
    timed(decoding.BatchDecoder, n)


class Timed:
    def __init__(self, m):
        object.__setattr__(self, "m", m)

    def __getattr__(self, n):
        return getattr(self.m, n)

    def __call__(self, *a, **k):
        sync()
        t = time.perf_counter()
        r = self.m(*a, **k)
        sync()
        timeline.append(("prefill forward", t - T0, time.perf_counter() - t))
        return r


gpu = torch.cuda.is_available()
cfg = bench.serving_config("bf16" if gpu else "fp32", gpu,
                           ("--inference.batch_slots", "8", "--generation.max_new_tokens", "256"))
chat = load_model_folder(str(bench.make_random_phi2(Path("/tmp/phi2")) if gpu else bench.TINY_MODEL), cfg)
chat.model.lm_head.bias.data[len(chat.tokenizer):] = -1e4
chat.warm_up(cfg.generation)
b = chat.batcher
b.model = Timed(b.model)
gen = cfg.generation
ids = [chat.prompt_ids([{"role": "user", "content": q}], 256)[0] for q in bench.questions(8, 40)]
print("prompt tokens", [len(i) for i in ids], flush=True)


def scenario(label, delay):
    timeline.clear()
    b.record.clear()
    t = time.perf_counter()
    streams = [chat.start(ids[0], gen)]
    if delay is not None:
        time.sleep(delay)
        streams += [chat.start(i, gen) for i in ids[1:]]
    for s in streams:
        for _ in s:
            pass
    wall = time.perf_counter() - t
    tokens = 256 * len(streams)
    print(f"ROW {label}: wall {wall:.3f} s, {tokens / wall:,.0f} tok/s, record {dict(b.record)}", flush=True)
    for name, start, took in timeline:
        if name != "_take" or took > 0.002:
            print(f"   {start - (t - T0):8.4f} {name:16s} {took * 1e3:8.2f} ms", flush=True)
    takes = [x[2] for x in timeline if x[0] == "_take"]
    print(f"   _take: {len(takes)} calls, {sum(takes) * 1e3:.1f} ms total", flush=True)


for rep in range(2):
    scenario("1 client", None)
    scenario("1 then 7 after 20 ms", 0.02)
    scenario("8 at once", 0.0)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    scenario("1 then 7 after 20 ms (profiled)", 0.02)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50), flush=True)

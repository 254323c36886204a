"""A diagnostic for .ci/gpu (issue 41: a prefill pass's inputs took 12-14 ms of the engine's host time on an H100, and
21-27 ms a pass while a burst of 64 requests arrived, against ~1 ms alone): the host time of BatchDecoder._prefill's
inputs (29 prompts of 95-134 tokens, the pool's bases), in two forms: `operators`, a torch operator or two a prompt
and five copies to the device (the engine up to b47ce93, copied here), and `packed`, the lists built in Python and
copied in one piece (the engine since: batching.prefill_inputs). Each with the GPU idle and with ~30 ms of work
queued (on a GPU), alone and with a thread spinning in Python beside it (the GIL contended, as the server's threads
contend for it while they take a burst's requests): torch lets go of the GIL around every operator, and each can
cost a switch interval (5 ms) to get it back; the spinning cases once more with a 0.5 ms interval. Runs on the CPU
too (no queued work there).

    python3 .ci/prefill_inputs_micro.py
"""
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, ".")
from batching import on_device, prefill_inputs  # noqa: E402

REPEATS = 25  # the first 5 not counted
SHORT_SWITCH = 0.0005  # the spinning cases again with the GIL handed over after 0.5 ms, not Python's 5 (bench.py serve
# --switch-interval: 35th session, a burst's first pass took 77-86 ms while the server took the burst's requests)
PAD = 50256

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 50000, (int(n),), generator=gen).tolist()
           for n in torch.randint(95, 135, (29,), generator=gen)]
bases = [i * 2048 for i in range(29)]
last_slots = [base + 300 for base in bases]
free_rows = list(range(3, 32))


def operators() -> list[torch.Tensor]:
    lengths = [len(p) for p in prompts]
    ids = torch.full((len(prompts), max(lengths)), PAD, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, :lengths[i]] = torch.tensor(prompt)
    sizes = torch.tensor(lengths)
    slots = torch.cat([torch.arange(n) for n in lengths])
    flat = torch.tensor(bases).repeat_interleave(sizes) + slots
    where = torch.stack([torch.arange(len(prompts)).repeat_interleave(sizes),
                         torch.tensor(free_rows).repeat_interleave(sizes), slots, flat])
    ids, where = on_device(ids, device), on_device(where, device)
    rows_at, lengths_at, last_at = on_device([free_rows, lengths, last_slots], device)
    on_device([1.0] * len(prompts), device)
    last = on_device(lengths, device) - 1
    return [ids, *where, rows_at, lengths_at, last_at, last]


def packed() -> list[torch.Tensor]:
    inputs = prefill_inputs(prompts, bases, last_slots, free_rows, PAD, device)
    on_device([1.0] * len(prompts), device)
    return inputs


def queue_work() -> None:
    for _ in range(20):  # ~30 ms of products on an H100
        product @ product


def run(label: str, form, before) -> None:
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        before()
        start = time.perf_counter()
        form()
        times.append(time.perf_counter() - start)
    times = times[5:]
    print(f"{label:62} {form.__name__:9} median {statistics.median(times) * 1e3:8.3f} ms  "
          f"max {max(times) * 1e3:8.3f} ms", flush=True)


if __name__ == "__main__":
    assert all(torch.equal(a, b) for a, b in zip(operators(), packed()))  # the same inputs
    product = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) if device.type == "cuda" else None
    print(torch.__version__, torch.cuda.get_device_name() if device.type == "cuda" else "CPU", flush=True)
    spinning = False

    def spin() -> None:
        while spinning:
            pass

    default = sys.getswitchinterval()
    for contended, interval in ((False, default), (True, default), (True, SHORT_SWITCH)):
        sys.setswitchinterval(interval)
        if contended and not spinning:
            spinning = True
            threading.Thread(target=spin, daemon=True).start()
        for busy in ([False, True] if device.type == "cuda" else [False]):
            label = ("GPU busy" if busy else "GPU idle" if device.type == "cuda" else "CPU") + \
                (", a thread spinning in Python" if contended else "") + \
                (f", switch {interval * 1e3:g} ms" if interval != default else "")
            for form in (operators, packed):
                run(label, form, queue_work if busy else lambda: None)
    spinning = False
    sys.setswitchinterval(default)

"""A GPU diagnostic for .ci/gpu (issue 41's open question: a prefill pass's inputs took 12-14 ms of the host on an H100
with the GPU idle, 0.4 ms on the CPU): the host time of each statement of BatchDecoder._prefill's inputs, copied here
as they stand (20 prompts of 95-134 tokens, the pool's bases), with the GPU idle and with ~30 ms of work queued. If
every statement is fast here, the cost is the engine's context (other threads, the allocator's state), not the
statements."""
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from batching import on_device  # noqa: E402

REPEATS = 40  # the first 5 not counted

if not torch.cuda.is_available():
    sys.exit("needs a CUDA GPU")
device = torch.device("cuda")
product = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 50000, (int(n),), generator=gen).tolist()
           for n in torch.randint(95, 135, (20,), generator=gen)]
bases = [i * 2048 for i in range(20)]
last_slots = [base + 300 for base in bases]
free_rows = list(range(3, 23))


def queue_work() -> None:
    for _ in range(20):  # ~30 ms of products on an H100
        product @ product


def inputs(clock) -> None:
    """_prefill's statements up to the pass, each followed by clock(name)."""
    lengths = [len(p) for p in prompts]
    clock("lengths")
    ids = torch.full((len(prompts), max(lengths)), 50256, dtype=torch.long)
    clock("full")
    for i, prompt in enumerate(prompts):
        ids[i, :lengths[i]] = torch.tensor(prompt)
    clock("ids rows")
    sizes = torch.tensor(lengths)
    slots = torch.cat([torch.arange(n) for n in lengths])
    clock("slots")
    flat = torch.tensor(bases).repeat_interleave(sizes) + slots
    where = torch.stack([torch.arange(len(prompts)).repeat_interleave(sizes),
                         torch.tensor(free_rows).repeat_interleave(sizes), slots, flat])
    clock("where")
    on_device(ids, device)
    clock("on_device ids")
    on_device(where, device)
    clock("on_device where")
    on_device([free_rows, lengths, last_slots], device)
    clock("on_device rows, lengths, last slots")
    on_device([1.0] * len(prompts), device)
    clock("on_device penalties")
    on_device(lengths, device)
    clock("on_device lengths (a group pass)")


def run(label: str, before) -> None:
    times: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        before()
        start = last = time.perf_counter()

        def clock(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            times.setdefault(name, []).append(now - last)
            last = now

        inputs(clock)
        times.setdefault("all", []).append(time.perf_counter() - start)
    for name, values in times.items():
        values = values[5:]
        print(f"{label:9} {name:36} median {statistics.median(values) * 1e3:7.3f} ms  max {max(values) * 1e3:7.3f} ms",
              flush=True)


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
run("GPU idle", lambda: None)
run("GPU busy", queue_work)

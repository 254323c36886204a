"""Where a benchmark's time goes: bench.py's instruments, apart from what it runs.

kernel_summary groups a torch.profiler run's GPU time by kind of kernel; idle_summary finds where the GPU waited for
the host and names the Python line to blame; write_profile writes both with the busiest operators. HostTime counts a
serve run's CPU seconds by thread, the graphs compiled and the garbage collector's passes while it runs; StackSampler
samples threads' Python stacks. What each found is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import bisect
import gc
import logging
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def sync() -> None:
    """Wait for the GPU (nothing on the CPU): timings start and stop on an idle device."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


KERNEL_GROUPS = (  # (group, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "flex")),
    ("inductor fused", ("triton_",)),
    ("nf4 dequantize", ("dequantize", "kDequantize")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "splitK")),
    ("optimizer", ("adam", "Adam", "Optimizer", "multi_tensor", "foreach")),
    ("copies", ("Memcpy", "Memset", "copy_", "CatArrayBatched")),
)


def kernel_summary(prof, steps: int, wall_s: float) -> str:
    """GPU time per step by kind of kernel, from a torch.profiler run over `steps` steps that took `wall_s`."""
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0)
        if us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # the kernels themselves, not the operators that launched them (counted twice otherwise)
        group = next((g for g, keys in KERNEL_GROUPS if any(k in event.key for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + us / 1e3 / steps
    busy = sum(groups.values())
    lines = [f"wall {1e3 * wall_s / steps:.1f} ms/step, GPU busy {busy:.1f} ms/step "
             f"({100 * busy / (1e3 * wall_s / steps):.0f}%)",
             "| kernels | ms/step | share of GPU time |", "| --- | --- | --- |"]
    lines += [f"| {g} | {ms:.1f} | {100 * ms / busy:.0f}% |" for g, ms in sorted(groups.items(), key=lambda x: -x[1])]
    return "\n".join(lines)


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # a .item() or blocking copy
LAUNCHES = ("cudaLaunch", "cuLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")
PYTHON_FRAME = re.compile(r".+\.py\(\d+\): ")  # with_stack's frames: "path/file.py(123): function"


def idle_summary(prof, steps: int, min_gap_us: float = 20.0, top: int = 8,
                 device: torch.autograd.DeviceType = torch.autograd.DeviceType.CUDA) -> str:
    """Where the GPU waited for the host, per step: every gap of at least `min_gap_us` between kernels, put down to
    the host's last wait for the GPU that ended inside the gap (a read-back such as `.item()`, a blocking copy) or,
    with none, to the launch of the kernel after the gap (the host was busy elsewhere until then); each named by the
    innermost Python frame outside torch above it. Needs a profile taken with `with_stack=True`. `device` CPU reads
    the CPU's matrix products as the kernels and as their own launches (what the tests can run)."""
    events = prof.events()
    on_cpu = device == torch.autograd.DeviceType.CPU
    kernels = sorted((e for e in events if e.device_type == device and (not on_cpu or e.name == "aten::mm")),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return "no kernels"
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    waits = sorted((e for e in host if e.name.startswith(SYNCS)), key=lambda e: e.time_range.end)
    launches = sorted((e for e in host if e.name.startswith(LAUNCHES)), key=lambda e: e.time_range.start)
    launch_starts = [e.time_range.start for e in launches]

    ops = sorted((e for e in host if not e.name.startswith(("cuda", "cu"))), key=lambda e: e.time_range.start)
    op_starts = [e.time_range.start for e in ops]

    def enclosing(event):  # the innermost operator or frame around a runtime call (older torch leaves no parent)
        i = bisect.bisect_right(op_starts, event.time_range.start) - 1
        while i >= 0 and ops[i].time_range.end < event.time_range.end:
            i -= 1
        return ops[i] if i >= 0 else None

    def caller(event) -> str:
        event = event.cpu_parent or enclosing(event) if event.name.startswith(("cuda", "cu")) else event
        while event is not None:
            frames = [f for f in (getattr(event, "stack", None) or []) if "/torch/" not in f]
            if frames:  # older torch: the stack rides on the operator
                return frames[0].rsplit("/", 1)[-1]
            if PYTHON_FRAME.match(event.name) and "/torch/" not in event.name:
                return event.name.rsplit("/", 1)[-1]
            event = event.cpu_parent
        return "?"

    def launcher(kernel):  # the last launch call the host made before the kernel started
        if on_cpu:
            return kernel
        i = bisect.bisect_right(launch_starts, kernel.time_range.start) - 1
        return launches[i] if i >= 0 else None

    causes: dict[str, list[float]] = {}
    end = kernels[0].time_range.end
    for k in kernels[1:]:
        gap = k.time_range.start - end
        if gap >= min_gap_us:
            inside = [w for w in waits if end - 1 <= w.time_range.end <= k.time_range.start]
            if inside:
                cause = f"after a wait ({inside[-1].name}) in {caller(inside[-1])}"
            else:
                op = launcher(k)
                parent = (op.cpu_parent or enclosing(op)) if op is not None and not on_cpu else op
                cause = f"host busy; next kernel from {parent.name if parent else '?'} ({caller(op)})"
            causes.setdefault(cause, []).append(gap)
        end = max(end, k.time_range.end)
    total = sum(sum(g) for g in causes.values())
    lines = [f"GPU idle between kernels: {total / 1e3 / steps:.1f} ms/step in gaps >= {min_gap_us:.0f} us",
             "| idle because | gaps/step | ms/step |", "| --- | --- | --- |"]
    for cause, gaps in sorted(causes.items(), key=lambda c: -sum(c[1]))[:top]:
        lines.append(f"| {cause} | {len(gaps) / steps:.1f} | {sum(gaps) / 1e3 / steps:.1f} |")
    return "\n".join(lines)


def profiler(all_threads: bool = False):
    """torch.profiler over the CPU (the operators with their Python frames: of this thread, or of every thread) and
    the GPU's kernels."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []), with_stack=True,
        experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=all_threads))


def write_profile(prof, steps: int, wall: float, path: Path, title: str) -> None:
    """A profile's per-kind kernel summary, where the GPU waited for the host and the busiest operators, to `path`."""
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90)
    try:
        idle = idle_summary(prof, steps)
    except Exception as e:  # a diagnostic that breaks on another torch must not lose the measured row
        idle = f"idle summary failed: {e!r}"
    path.write_text(title + kernel_summary(prof, steps, wall) + "\n\n" + idle + "\n\n" + table)


class HostTime:
    """Where a serve run's host time went: CPU seconds of the engine's thread (the generation thread: admitting and
    decoding), of the HTTP server's thread (its event loop: parsing requests, templates, streaming), of the rest of
    the process, graphs compiled, and the garbage collector's passes (every thread stops while one runs), from
    start() to spent(). The engine and the server share one interpreter: where their seconds add up to more than the
    wall, they waited for each other (the GIL). Used as `with HostTime(...) as host:`, which stops counting the
    collector's passes however the block ends."""

    def __init__(self, engine_thread: int, server_thread: int):
        self.threads = (engine_thread, server_thread)  # (threading.get_ident()s)
        self.collections: list[tuple[int, float]] = []  # (generation, seconds) of each collector's pass
        self._collecting = 0.0
        gc.callbacks.append(self._collection)
        self.began = self._read()

    def __enter__(self) -> HostTime:
        return self

    def __exit__(self, *exc) -> None:
        """Stop counting the collector's passes (its callback off: it would outlive the run otherwise)."""
        gc.callbacks.remove(self._collection)

    def _collection(self, phase: str, info: dict) -> None:
        """gc's callback, at the start and the stop of each pass (on the thread whose allocation set it off)."""
        if phase == "start":
            self._collecting = time.perf_counter()
        else:
            self.collections.append((info["generation"], time.perf_counter() - self._collecting))

    @staticmethod
    def _compiled() -> int:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]

    def _read(self) -> tuple[float, ...]:
        return (*(time.clock_gettime(time.pthread_getcpuclockid(t)) for t in self.threads), time.process_time(),
                self._compiled())

    def start(self) -> None:
        self.began, self.collections = self._read(), []

    def spent(self, run: str) -> dict:
        engine, server, process, compiled = (b - a for a, b in zip(self.began, self._read()))
        if compiled:
            logger.warning("%d graph(s) compiled during the %s run: its figures include compiling", compiled, run)
        full = [seconds for generation, seconds in self.collections if generation == 2]
        return {"engine_cpu_s": engine, "server_cpu_s": server, "other_cpu_s": process - engine - server,
                "compiled_while_serving": compiled, "gc_passes": len(self.collections),
                "gc_s": sum(seconds for _, seconds in self.collections), "gc_full_passes": len(full),
                "gc_longest_full_s": max(full, default=0.0)}


class StackSampler:
    """Where named threads spend their time, by their Python stacks: every `every` seconds, from a thread of its own,
    the innermost `depth` frames of each (sys._current_frames), counted. With `during` (a named thread and a function
    name), also every other thread of the process, by its name, in the samples where that thread's stack holds that
    function: who else runs, or waits where, while the engine admits, say. The sampler takes the interpreter for a
    few microseconds a sample."""

    def __init__(self, threads: dict[str, int], every: float = 0.002, depth: int = 3,
                 during: tuple[str, str] | None = None):
        self.threads, self.every, self.depth, self.during = threads, every, depth, during
        self.counts = {name: Counter() for name in threads}
        self.beside: dict[str, Counter] = {}  # thread name -> where, in the samples inside `during`
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._run, daemon=True, name="stack sampler")

    def __enter__(self) -> StackSampler:
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()

    def _where(self, frame) -> str:
        where = []
        while frame is not None and len(where) < self.depth:
            where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return " < ".join(where)

    @staticmethod
    def _inside(frame, function: str) -> bool:
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            frames = sys._current_frames()
            for name, ident in self.threads.items():
                self.counts[name][self._where(frames.get(ident))] += 1
            if self.during is None:
                continue
            watched, function = self.during
            if not self._inside(frames.get(self.threads[watched]), function):
                continue
            names, seen = {}, Counter()
            for t in threading.enumerate():  # (several threads may share a name: AnyIO's workers)
                seen[t.name] += 1
                names[t.ident] = t.name if seen[t.name] == 1 else f"{t.name} #{seen[t.name]}"
            for ident, frame in frames.items():
                if ident not in (self.threads[watched], threading.get_ident()):
                    self.beside.setdefault(names.get(ident, str(ident)), Counter())[self._where(frame)] += 1

    def table(self, top: int = 12) -> str:
        lines = []
        for name, counts in self.counts.items():
            lines += self._table(f"{name} thread", counts, top)
        if self.during is not None:
            watched, function = self.during
            for name, counts in sorted(self.beside.items()):
                lines += self._table(f"{name!r} while the {watched} thread is in {function}", counts, top)
        return "\n".join(lines)

    @staticmethod
    def _table(title: str, counts: Counter, top: int) -> list[str]:
        total = sum(counts.values())
        return ([f"| {title}: where ({total} samples) | share |", "| --- | --- |"]
                + [f"| {where} | {n / total:.1%} |" for where, n in counts.most_common(top)] + [""])

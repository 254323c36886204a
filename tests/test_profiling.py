"""profiling.py: the instruments bench.py reads a run with (on the CPU: the GPU's own figures are measured on GPUs)."""

from __future__ import annotations

import gc
import logging
import threading
import time

import torch

from profiling import HostTime, StackSampler, idle_summary


def test_a_compile_during_a_serve_run_is_counted_and_named(caplog):
    """A serve run's figures that include a compile (a graph first met while serving stops every answer: 48.7 s on an
    H100, docs/PERFORMANCE.md) say so: HostTime counts the graphs compiled between start() and spent() and warns;
    a run without one counts none."""
    with HostTime(threading.get_ident(), threading.get_ident()) as host:
        host.start()
        assert host.spent("quiet")["compiled_while_serving"] == 0
        host.start()
        torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
        with caplog.at_level(logging.WARNING):
            spent = host.spent("64-client")
    assert spent["compiled_while_serving"] >= 1 and spent["engine_cpu_s"] >= 0 and spent["server_cpu_s"] > 0
    assert "graph(s) compiled during the 64-client run: its figures include compiling" in caplog.text


def test_a_serve_runs_garbage_collector_passes_are_counted():
    """A full pass of the garbage collector stops every thread while it walks every object (a loaded server's:
    docs/PERFORMANCE.md): HostTime counts the passes between start() and spent(), and the full ones with the
    longest's seconds."""
    with HostTime(threading.get_ident(), threading.get_ident()) as host:
        host.start()
        gc.collect()
        gc.collect(0)
        spent = host.spent("collected")
        assert spent["gc_full_passes"] == 1 and spent["gc_passes"] >= 2
        assert 0 < spent["gc_longest_full_s"] <= spent["gc_s"]
        host.start()
        assert host.spent("quiet")["gc_full_passes"] == 0
    gc.collect()
    assert host.spent("closed")["gc_full_passes"] == 0  # (its callback is off)


def test_a_serve_run_that_fails_stops_counting_the_collectors_passes():
    """A serve run that stops on an error (a client's RuntimeError) leaves no collector callback behind it: in a
    process that goes on (a test session, a notebook) it would keep a list of every pass growing until the end."""
    callbacks = list(gc.callbacks)
    try:
        with HostTime(threading.get_ident(), threading.get_ident()):
            raise RuntimeError("a client's stream broke")
    except RuntimeError:
        pass
    assert gc.callbacks == callbacks


def test_idle_summary_names_the_code_that_kept_the_device_waiting():
    """bench.py train --profile says where the GPU waited for the host. Here the CPU's matrix products stand in for
    kernels: a 30 ms pause of the host between two of them is found and put down to the line that launched the
    product after it."""
    a = torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        a @ a
        time.sleep(0.03)
        a @ a  # the launcher
    summary = idle_summary(prof, steps=1, min_gap_us=10_000, device=torch.autograd.DeviceType.CPU)
    first = summary.splitlines()[3]
    assert "next kernel from aten::mm" in first and "test_profiling.py" in first, summary
    assert 30 <= float(first.split("|")[-2]) < 60, summary


def test_the_stack_sampler_names_who_ran_while_the_engine_admitted():
    """bench.py serve --profile samples every thread's stack while the engine's thread admits (its _prefill), to find
    who holds the interpreter then. Here a thread spins in Python in one function before the "engine" admits and in
    another while it does: only the second is counted beside the admission, and by the spinning thread's name."""
    admitting, done = threading.Event(), threading.Event()

    def _prefill():
        admitting.set()
        time.sleep(0.3)

    def engine():
        time.sleep(0.3)
        _prefill()
        done.set()

    def spin_before():
        while not admitting.is_set():
            pass

    def spin_during():
        while not done.is_set():
            pass

    spinner = threading.Thread(target=lambda: (spin_before(), spin_during()), name="spinner")
    worker = threading.Thread(target=engine, name="engine")
    worker.start()
    spinner.start()
    with StackSampler({"engine": worker.ident}, every=0.005, during=("engine", "_prefill")) as sampler:
        worker.join()
        spinner.join()
    spun = sampler.beside["spinner"]
    during = sum(n for where, n in spun.items() if "test_profiling.py:spin_during" in where)
    assert during >= 10 and during >= 0.9 * sum(spun.values()), spun
    assert "| 'spinner' while the engine thread is in _prefill: where (" in sampler.table()
    assert sum(sampler.counts["engine"].values()) > during  # the engine's own stack in every sample

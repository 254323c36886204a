"""bench.py serve: N streaming clients of the OpenAI-compatible routes over HTTP, against a static batch of the same
questions on the same loaded model (bench.py's module docstring has the commands; bench.py runs this in a child process
per dtype).

The serve benchmark loads the model as the app does (inference.load_model_folder, warm-up included), serves openai_api's
routes (the app's OpenAI-compatible endpoint, without the Gradio page) with uvicorn, and sends N streaming greedy
requests at once over HTTP from N client processes, each with its own question (40 random words from a fixed vocabulary,
numpy seed 0: about 60 tokens) and max_tokens 256, without a repetition penalty unless --penalty says; with --sample,
sampled with the app's default settings instead (temperature, top-p, top-k), each question with a seed of its own, so
its answer still compares with its answer alone. It reports the
aggregate tokens/s (completion tokens of all clients over the time from sending to the last answer), the time to first
token (median and worst), the most answers decoded together, how many clients got the same text as when they were alone,
and where the decoder's time went: prefill passes (prompts), seconds spent admitting answers (prefill, cache moves,
first tokens) and the mean number of answers in a decode step, and the order a run's first passes and chunks ran in (how
its burst of arrivals was admitted, the first pass's host time by part). After the clients, the same model decodes the
most clients' questions as one static batch (ChatModel.generate_ids, each answer to the same length), and each row's
aggregate is also given as a multiple of that figure (x static batch), so the two are measured in one run. Each row
also gives the longest wait between two pieces of text of any client's answer after its first; a last row streams up
to 8 of the questions again while one more client sends a prompt of ~1,000 tokens (90% of what the context leaves
after the answer, on the tiny model) halfway through them: the running answers' longest wait then is what that prefill
costs them (beside the same clients' wait without it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench import WORDS, free_port, serving_config
from profiling import HostTime, StackSampler, profiler, sync, write_profile

logger = logging.getLogger(__name__)
DEFAULT_SWITCH_INTERVAL = 0.005  # Python's (sys.getswitchinterval)


def questions(n: int, words: int) -> list[str]:
    rng = np.random.default_rng(0)
    vocab = np.array(WORDS)
    return [" ".join(vocab[rng.integers(0, len(vocab), size=words)]) + "?" for _ in range(n)]


def stream_completion(port: int, question: str, max_tokens: int, model: str, delay_s: float = 0.0,
                      sampling: dict | None = None) -> dict:
    """One streaming request as an OpenAI client sends it (after delay_s), greedy, or with `sampling`'s settings
    (temperature, top_p, seed); times the first content token, the end and the longest wait between two pieces of
    text after the first (a running answer's stall)."""
    import http.client
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                       **(sampling or {"temperature": 0})})
    time.sleep(delay_s)
    start, last, gap = time.perf_counter(), None, 0.0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    text, first, usage = "", None, None
    for line in response:
        line = line.decode().strip()
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        content = event["choices"][0]["delta"].get("content") if event["choices"] else None
        now = time.perf_counter()
        if content and first is None:
            first = now - start
        if content:
            if last is not None:
                gap = max(gap, now - last)
            last = now
        text += content or ""
        usage = event.get("usage") or usage
    connection.close()
    return {"text": text, "ttft_s": first, "end_s": time.perf_counter() - start, "max_gap_s": gap,
            "tokens": usage["completion_tokens"] if usage else 0, "client_pid": os.getpid(), "sent_at": start}


def sampling(seed: int, sample: bool) -> dict | None:
    """A request's sampling settings: the app's defaults (the server's top-k is its own), seeded; None: greedy."""
    from config import GenerationSettings
    app = GenerationSettings()
    return {"temperature": app.temperature, "top_p": app.top_p, "seed": seed} if sample else None


def requests(port: int, asked: list[str], new_tokens: int, model: str, sample: bool) -> list[tuple]:
    """stream_completion's arguments for each question: greedy, or sampled, each question seeded with its index."""
    return [(port, q, new_tokens, model, 0.0, sampling(i, sample)) for i, q in enumerate(asked)]


def napping_pid(_) -> int:
    """A client process's id after a short nap (bench serve: proof that every client process has started)."""
    time.sleep(0.2)
    return os.getpid()


def load_for_serving(model_path: Path, cfg, tiny: bool):
    """The model loaded and warmed up as the app does; returns it and the seconds both took and the warm-up alone."""
    from inference import load_model_folder
    t0 = time.perf_counter()
    chat = load_model_folder(str(model_path), cfg)
    if not tiny:
        # The random Phi-2 speaks with the tiny tokenizer (822 tokens): its other 50k ids would decode to no text at
        # all. Ruling them out costs nothing (all 51,200 logits are still computed) and gives clients text to stream.
        chat.model.lm_head.bias.data[len(chat.tokenizer):] = -1e4
    warm = time.perf_counter()
    chat.warm_up(cfg.generation)
    load_s, warm_s = time.perf_counter() - t0, time.perf_counter() - warm
    logger.info("loaded in %.1f s, of which the warm-up %.1f s", load_s, warm_s)
    return chat, {"load_and_warm_up_s": load_s, "warm_up_s": warm_s}


def start_server(chat, cfg):
    """openai_api's routes for `chat` under uvicorn on a free local port, in a thread; returns (server, thread, port)
    once it answers."""
    import uvicorn
    from fastapi import FastAPI

    import openai_api
    from config import AppConfig
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(FastAPI(routes=openai_api.routes(chat, cfg.generation, AppConfig())),
                                           host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.05)
    return server, serving, port


def run_serve(model_path: Path, dtype: str, tiny: bool, clients: list[int], prompt_words: int, new_tokens: int,
              partial: Path | None = None, penalty: float = 1.0, profile: Path | None = None,
              sample: bool = False) -> list[dict]:
    """N concurrent streaming clients of the OpenAI-compatible routes, for each N; answers compared with alone
    (greedy, or with `sample` sampled and seeded). With `profile`, the most clients once more under torch.profiler
    after the timed runs (profile_clients)."""
    import multiprocessing

    from inference import generation_thread

    # inference.batch_slots as `python app.py` chooses it with no batching settings (64 on a GPU: README's table of
    # what its memory holds); the queue holds every client beyond them
    cfg = serving_config(dtype, torch.cuda.is_available(), ("--app.max_queue", str(max(clients)),
                                                            "--generation.max_new_tokens", str(new_tokens),
                                                            "--generation.repetition_penalty", str(penalty)))
    chat, loading = load_for_serving(model_path, cfg, tiny)
    server, serving, port = start_server(chat, cfg)
    # the rows' names: the dtype, whether the clients sample, and the GIL's switch interval where bench.py serve
    # --switch-interval set it
    label = f"{dtype} sampled" if sample else dtype
    if sys.getswitchinterval() != DEFAULT_SWITCH_INTERVAL:
        label += f", GIL switch {sys.getswitchinterval() * 1e3:g} ms"
    asked = questions(max(clients), prompt_words)
    # one at a time; warms every shape
    alone = [stream_completion(*request) for request in requests(port, asked, new_tokens, chat.name, sample)]
    rows = []
    # SIGTERM or Ctrl-C: the streams in flight end with the server's error event, the rows measured so far are kept,
    # and the process stops in order below (exit code 0).
    stopped = threading.Event()

    def stop(signum, frame):
        stopped.set()
        chat.batcher.shutdown("the benchmark was stopped")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    # Clients run in processes of their own, as remote clients would: in this process their threads would take the
    # interpreter lock from the server's generation loop.
    processes = max(max(clients), min(8, max(clients)) + 1)  # (the long prompt's probe: up to 8 clients + 1)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        # Every client process started (its imports done) before any timing: a pool hands requests only to started
        # processes, so 8 "concurrent" clients would otherwise run partly one after another.
        deadline = time.monotonic() + 300
        while len(set(pool.map(napping_pid, range(2 * processes), chunksize=1))) < processes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{processes} client processes did not all start within 300 s")
        with HostTime(generation_thread().submit(threading.get_ident).result(), serving.ident) as host:
            for n in clients:
                cleared(chat.batcher)
                host.start()
                start = time.perf_counter()
                try:
                    got = pool.starmap(stream_completion, requests(port, asked[:n], new_tokens, chat.name, sample),
                                       chunksize=1)
                except RuntimeError:
                    if not stopped.is_set():
                        raise
                    logger.warning("stopped by a signal: the %d-client run is left out", n)
                    break
                wall = time.perf_counter() - start
                rows.append(serve_row(label, n, got, alone, wall, chat.batcher.most_rows, loading)
                            | {"decoder": dict(chat.batcher.record), "schedule": schedule(chat.batcher)}
                            | timeline(chat.batcher, got)
                            | host.spent(f"{n}-client") | memory(chat))
                if partial is not None:
                    partial.write_text(json.dumps(rows, default=str))
            if rows and not stopped.is_set():
                rows.append(long_prompt_probe(chat, pool, port, asked, new_tokens, rows, alone, label, loading, host,
                                              sample))
            if profile is not None and rows and not stopped.is_set():
                profile_clients(pool, requests(port, asked[:max(clients)], new_tokens, chat.name, sample), profile,
                                host)
    base = rows[0]["aggregate_tok_s"] if rows and rows[0]["clients"] == 1 else None
    for r in rows:
        r["speedup_vs_1"] = r["aggregate_tok_s"] / base if base and "long_prompt_tokens" not in r else None
    if rows and not stopped.is_set():
        static = static_batch(chat, asked[:max(clients)], new_tokens)
        for r in rows:
            if "long_prompt_tokens" not in r:  # (the probe's aggregate counts its running clients only)
                r["static_batch"], r["x_static_batch"] = static, r["aggregate_tok_s"] / static["tok_s"]
    # Stopped in order, as app.py stops: the server, then the model freed on its own thread, before the interpreter
    # exits (a process left to tear down live CUDA graphs at exit ended with a segfault on an H200).
    server.should_exit = True
    serving.join(timeout=30)
    chat.shutdown()
    chat.close()
    return rows


def cleared(batcher) -> None:
    """The engine's records emptied before a run: the most rows, the counts, the schedule and the arrivals."""
    batcher.most_rows = 0
    batcher.record.clear()
    batcher.schedule.clear()
    batcher.queue.arrivals.clear()


def schedule(batcher) -> str:
    """The order a run's first passes and chunks ran in (BatchDecoder.schedule): "P31" a prefill pass of 31 prompts,
    "2@64" 2 decode steps at 64 rows."""
    return " ".join(f"P{e[1]}" if e[0] == "pass" else f"{e[1]}@{e[2]}" for e in batcher.schedule)


def timeline(batcher, got: list[dict]) -> dict:
    """When a run's requests reached the engine (AnswerQueue.arrivals: parsed, checked and tokenized) and its first
    prefill passes began and handed out their first tokens (BatchDecoder.schedule), in ms after the run's first
    request was sent, with each pass's host ms by part: what its first-text times are made of. (The client processes'
    perf_counter and the server's are one clock, Linux's CLOCK_MONOTONIC.)"""
    sent = [g["sent_at"] for g in got]
    first = min(sent)
    arrived = sorted(1000 * (t - first) for t in batcher.queue.arrivals)
    passes = [[e[1], 1000 * (e[3] - first), 1000 * (e[4] - first), {k: 1000 * v for k, v in e[5].items()}]
              for e in batcher.schedule if e[0] == "pass" and len(e) > 4]
    return {"sent_over_ms": 1000 * (max(sent) - first), "passes_ms": passes,
            "reached_engine_ms": [arrived[0], arrived[len(arrived) // 2], arrived[-1]] if arrived else None}


def long_prompt_probe(chat, pool, port: int, asked: list[str], new_tokens: int, rows: list[dict], alone: list[dict],
                      dtype: str, loading: dict, host: HostTime, sample: bool = False) -> dict:
    """Up to 8 answers streaming, and a prompt of ~1,000 tokens (what the context leaves, on the tiny model) that
    arrives halfway through them: the longest wait between two pieces of a running answer (its stall while the long
    prompt is prefilled), against the same clients' longest wait without it (the row of that many clients)."""
    n = min(8, len(asked))
    without = next((r for r in rows if r["clients"] == n), None)
    delay = (without or rows[-1])["end_median_s"] / 2
    target = min(1000, int(0.9 * (chat.context_window - new_tokens)))
    words = 100
    for _ in range(6):  # random words take 1-3 tokens each: within 5% of the target in a few guesses
        long_question = questions(1, words)[0]
        tokens = len(chat.tokenizer(long_question, add_special_tokens=False).input_ids)
        if abs(tokens - target) <= target // 20:
            break
        words = max(1, round(words * target / tokens))
    tokens = len(chat.prompt_ids([{"role": "user", "content": long_question}], new_tokens)[0])
    cleared(chat.batcher)
    host.start()
    start = time.perf_counter()
    got = pool.starmap(stream_completion, requests(port, asked[:n], new_tokens, chat.name, sample)
                       + [(port, long_question, new_tokens, chat.name, delay, sampling(n, sample))], chunksize=1)
    wall = time.perf_counter() - start
    row = serve_row(dtype, n, got[:n], alone, wall, chat.batcher.most_rows, loading)
    return row | {"name": f"{dtype} {n} client(s) + a {tokens}-token prompt at {delay:.2f} s",
                  "long_prompt_tokens": tokens, "long_prompt_ttft_s": got[n]["ttft_s"],
                  "max_gap_without_s": without["max_gap_s"] if without else None, "decoder": dict(chat.batcher.record),
                  "schedule": schedule(chat.batcher), **timeline(chat.batcher, got),
                  **host.spent("long prompt's"), **memory(chat)}


def profile_clients(pool, calls: list[tuple], profile: Path, host: HostTime) -> None:
    """The clients' questions streamed once more, all at once, under torch.profiler: where the GPU waited for the
    host while the server admitted and streamed them (the engine's thread and the server's alike), to `profile`;
    then once more with the engine's and the server's Python stacks sampled (StackSampler), appended to it.
    calls: stream_completion's arguments for each client."""
    sync()
    with profiler(all_threads=True) as prof:  # the model runs on the generation thread
        start = time.perf_counter()
        pool.starmap(stream_completion, calls, chunksize=1)
        sync()
        wall = time.perf_counter() - start
    write_profile(prof, 1, wall, profile, f"{len(calls)} streaming clients, one run: ")
    # (and every other thread of the process while the engine admits: who takes the interpreter from it then)
    with StackSampler(dict(zip(("engine", "server"), host.threads)), during=("engine", "_prefill")) as sampler:
        pool.starmap(stream_completion, calls, chunksize=1)
    with profile.open("a") as f:
        f.write(f"\n\n{len(calls)} streaming clients once more, the threads' Python stacks sampled every "
                f"{1000 * sampler.every:.0f} ms (innermost frame first; a thread in C code, a CUDA wait or the event "
                f"loop's select, shows the Python line that called it):\n\n{sampler.table()}\n")


def memory(chat) -> dict:
    """The KV cache the engine holds, the process's peak GPU memory so far (GiB; 0 on the CPU) and the slots."""
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"kv_cache_gib": chat.batcher.kv.bytes / 2**30, "peak_gib": peak, "batch_slots": chat.batch_slots}


def static_batch(chat, asked: list[str], new_tokens: int) -> dict:
    """The clients' questions decoded as one static batch by the same loaded model (ChatModel.generate_ids:
    FastDecoder on a GPU), each to new_tokens tokens: what continuous batching is compared with, in the same run.
    The first call compiles the batch's shape; the second is timed."""
    from config import GenerationSettings
    gen = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    ids = [chat.prompt_ids([{"role": "user", "content": q}], new_tokens)[0] for q in asked]
    chat.generate_ids(ids, gen, ignore_eos=True)
    sync()
    start = time.perf_counter()
    tokens = sum(len(answer) for answer in chat.generate_ids(ids, gen, ignore_eos=True))
    sync()
    return {"rows": len(ids), "tokens": tokens, "tok_s": tokens / (time.perf_counter() - start)}


def serve_row(dtype: str, n: int, got: list[dict], alone: list[dict], wall: float, most_rows: int,
              loading: dict) -> dict:
    """One row of the serve table; loading: the load's and the warm-up's seconds (run_serve)."""
    ttfts = sorted(g["ttft_s"] for g in got if g["ttft_s"] is not None) or [float("nan")]
    return {"name": f"{dtype} {n} client(s)", "clients": n, "aggregate_tok_s": sum(g["tokens"] for g in got) / wall,
            "per_client_tok_s": float(np.median([g["tokens"] / g["end_s"] for g in got])),
            "ttft_median_s": ttfts[len(ttfts) // 2], "ttft_max_s": ttfts[-1],
            "end_median_s": float(np.median([g["end_s"] for g in got])), "max_gap_s": max(g["max_gap_s"] for g in got),
            "completion_tokens": [g["tokens"] for g in got], "client_processes": len({g["client_pid"] for g in got}),
            "most_rows": most_rows,
            "same_text_as_alone": sum(g["text"] == a["text"] for g, a in zip(got, alone)), **loading}


def serve_table(rows: list[dict]) -> str:
    lines = ["| clients | aggregate tok/s | x one client | per-client tok/s | first token median / max (s) | "
             "longest wait between pieces (s) | decoded together | same text as alone | prefill passes (prompts) | "
             "admitting (s) (of it waiting for the GPU) | GPU ms a step by shape | answers a step | "
             "CPU s: engine / server / rest (wall) | x static batch | KV cache / peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d = r.get("decoder", {})
        lines.append(f"| {r['name']} | {r['aggregate_tok_s']:,.0f} | {r['speedup_vs_1'] or float('nan'):.2f} | "
                     f"{r['per_client_tok_s']:,.0f} | {r['ttft_median_s']:.3f} / {r['ttft_max_s']:.3f} | "
                     f"{r['max_gap_s']:.3f} | {r['most_rows']} | {r['same_text_as_alone']}/{r['clients']} | "
                     f"{d.get('prefill_passes', 0)} ({d.get('prompts', 0)}) | {d.get('admit_s', 0.0):.3f} "
                     f"({d.get('prefill_wait_s', 0.0):.3f}) | {step_ms(d)} | "
                     f"{d.get('answer_steps', 0) / max(d.get('steps', 0), 1):.1f} | {cpu_split(r)} | "
                     f"{r.get('x_static_batch', float('nan')):.2f} | "
                     f"{r.get('kv_cache_gib', float('nan')):.2f} / {r.get('peak_gib', float('nan')):.1f} |")
    statics = {r["name"].split()[0]: r["static_batch"] for r in rows if "static_batch" in r}
    lines += [f"{dtype} static batch of {s['rows']} (the same questions and model, greedy, ChatModel.generate_ids): "
              f"{s['tok_s']:,.0f} tok/s" for dtype, s in statics.items()]
    # where admitting's host seconds went, pass by pass summed (BatchDecoder.record), and freeing rows
    parts = ["layout", "inputs", "pass", "scatter", "first tokens"]
    lines += ["", "| clients | admitting (s): " + " | ".join(parts) + " | waiting for the GPU | handing out | "
              "freeing rows (s) | garbage collector: passes, s (full passes, longest s) | "
              "in order (P31: a prefill pass of 31 prompts; 2@64: 2 decode steps at 64 rows) |",
              "| --- " * (len(parts) + 6) + "|"]
    for r in rows:
        d = r.get("decoder", {})
        lines.append(f"| {r['name']} | " + " | ".join(f"{d.get(f'admit {p} s', 0.0):.3f}" for p in parts) +
                     f" | {d.get('prefill_wait_s', 0.0):.3f} | {d.get('admit handing out s', 0.0):.3f} | "
                     f"{d.get('vacate s', 0.0):.3f} | {collector(r)} | {r.get('schedule') or '-'} |")
    # when the requests reached the engine and the first passes ran, after the first request was sent
    first_parts = (*parts, "gpu wait", "handing out")
    lines += ["", "| clients | requests sent over (ms) | reached the engine (ms after the first was sent): first / "
              "median / last | prefill passes: prompts, begun - first tokens handed out (ms) | the first pass by part "
              f"(ms): {' / '.join(first_parts)} |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        reached = " / ".join(f"{t:.0f}" for t in r["reached_engine_ms"]) if r.get("reached_engine_ms") else "-"
        passes = r.get("passes_ms") or []
        spans = ", ".join(f"P{n} {begun:.0f}-{out:.0f}" for n, begun, out, _ in passes) or "-"
        by_part = " / ".join(f"{passes[0][3].get(p, 0.0):.1f}" for p in first_parts) if passes else "-"
        lines.append(f"| {r['name']} | {r.get('sent_over_ms', float('nan')):.0f} | {reached} | {spans} | {by_part} |")
    return "\n".join(lines)


def collector(row: dict) -> str:
    """A serve row's garbage collector passes (HostTime), "-" for a row without them."""
    if "gc_passes" not in row:
        return "-"
    return f"{row['gc_passes']}, {row['gc_s']:.3f} ({row['gc_full_passes']}, {row['gc_longest_full_s']:.3f})"


def cpu_split(row: dict) -> str:
    """A serve row's CPU seconds by thread (HostTime) and its clients' wall, "-" for a row without them."""
    if "engine_cpu_s" not in row:
        return "-"
    wall = sum(row["completion_tokens"]) / row["aggregate_tok_s"]
    return f"{row['engine_cpu_s']:.2f} / {row['server_cpu_s']:.2f} / {row['other_cpu_s']:.2f} ({wall:.2f})"


def step_ms(decoder: dict) -> str:
    """A serve row's GPU milliseconds a decode step for each batch shape it ran ("rows x slots: ms"; GPUs only)."""
    shapes = [k.removeprefix("gpu s at ") for k in decoder if k.startswith("gpu s at ")]
    return ", ".join(f"{s.replace(' rows x ', 'x').removesuffix(' slots')}: "
                     f"{1000 * decoder['gpu s at ' + s] / decoder['steps at ' + s]:.2f}" for s in shapes) or "-"

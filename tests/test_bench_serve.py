"""bench.py serve (bench_serve.py): streaming clients of the OpenAI routes over HTTP against the tiny model on the CPU
(speed is measured on GPUs, not here)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_script


@pytest.mark.slow  # a server and client processes (make test leaves it out)
def test_serving_bench_tiny(tmp_path):
    """Concurrent streaming clients over HTTP against the OpenAI-compatible routes: decoded together, each client's
    greedy text the same as alone (fp32)."""
    out = tmp_path / "serve.json"
    run_script("bench.py", "serve", "--tiny", "--clients", "1", "4", "--profile", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    rows, probe = rows[:-1], rows[-1]
    assert [r["clients"] for r in rows] == [1, 4] and not any("error" in r for r in rows)
    assert [r["client_processes"] for r in rows] == [1, 4]  # concurrent: each client its own process
    # decoded together (how many overlap depends on when each client process connects: 24-token answers on the CPU
    # can finish before the last client arrives), each text exactly the one it got alone
    assert rows[1]["most_rows"] >= 2 and rows[1]["same_text_as_alone"] == 4 and rows[0]["same_text_as_alone"] == 1
    assert all(r["aggregate_tok_s"] > 0 and r["ttft_median_s"] > 0 for r in rows)
    assert all(t > 0 for r in rows for t in r["completion_tokens"])
    # where the decoder's time went: every client's prompt prefilled, the decode steps counted
    assert all(r["decoder"]["prompts"] == r["clients"] and r["decoder"]["steps"] > 0 for r in rows)
    assert all(r["decoder"]["sampled"] == 0 for r in rows)  # greedy
    assert rows[1]["decoder"]["answer_steps"] > rows[1]["decoder"]["steps"]  # steps held several answers
    # a long prompt (what the tiny model's 512-token window leaves: ~440 tokens) arriving while 4 answers stream: they
    # go on unchanged, and the longest wait between two pieces of a running answer is reported beside the same
    # clients' wait without it
    assert probe["clients"] == 4 and probe["same_text_as_alone"] == 4 and probe["decoder"]["prompts"] == 5
    assert 400 < probe["long_prompt_tokens"] <= 488 and probe["long_prompt_ttft_s"] > 0
    assert probe["max_gap_s"] > 0 and probe["max_gap_without_s"] == rows[1]["max_gap_s"] > 0
    # the same questions as one static batch of the most clients, from the same loaded model, after the clients:
    # the figure continuous batching is compared with, in the same run
    static = json.loads(out.read_text())["static_batch"]
    assert static["rows"] == 4 and static["tok_s"] > 0 and static["tokens"] == 4 * 24
    assert all(r["x_static_batch"] == pytest.approx(r["aggregate_tok_s"] / static["tok_s"]) for r in rows)
    # the warm-up's time apart from loading, in the rows and in the measuring process's log (that process logged
    # warnings only: a GPU run's warm-up time and the batch shapes it compiled were nowhere; on the CPU, with the
    # fast path off, there is no warm-up)
    assert all(0 <= r["warm_up_s"] < r["load_and_warm_up_s"] for r in rows)
    assert "of which the warm-up" in (tmp_path / "bench-serve-fp32.log").read_text()
    # the server as `python app.py` sets it up with no batching settings: the slots it chooses (8 on the CPU)
    assert all(r["batch_slots"] == 8 for r in rows)
    # where the host's time went in each run: the engine's thread decoded (CPU seconds, within the clients' wall),
    # the server's thread parsed and streamed; graphs compiled meanwhile are counted (HostTime's own test below)
    for r in rows + [probe]:
        wall = sum(r["completion_tokens"]) / r["aggregate_tok_s"]
        assert 0 < r["engine_cpu_s"] < wall + 0.1 and 0 < r["server_cpu_s"] < wall + 0.1, r
        assert "compiled_while_serving" in r
    assert "CPU s: engine / server / rest (wall)" in json.loads(out.read_text())["table"]
    # admitting's host time by part (layout, inputs, the pass, the scatter into the cache, first tokens, handing them
    # out) with its wait for the GPU is admitting's time: each part begins where the one before ended, the first where
    # admitting began, and admitting ends where the last part did (none counted twice, no gap)
    for r in rows + [probe]:
        d = r["decoder"]
        parts = [v for k, v in d.items() if k.startswith("admit ") and k.endswith(" s")]
        assert len(parts) == 6 and sum(parts) + d["prefill_wait_s"] == pytest.approx(d["admit_s"], rel=1e-6), d
    assert "| admitting (s): layout | inputs | pass | scatter | first tokens |" in json.loads(out.read_text())["table"]
    # the garbage collector's passes in each run (every thread stops during one), counted apart from the full ones
    for r in rows + [probe]:
        assert r["gc_passes"] >= r["gc_full_passes"] >= 0 and r["gc_longest_full_s"] <= r["gc_s"], r
    assert "garbage collector: passes, s (full passes, longest s)" in json.loads(out.read_text())["table"]
    # the order each run's passes and chunks ran in (how its burst was admitted): the passes and steps it counted
    for r in rows + [probe]:
        events = r["schedule"].split()
        passes = [int(e[1:]) for e in events if e.startswith("P")]
        steps = [int(e.split("@")[0]) for e in events if "@" in e]
        assert events[0].startswith("P") and len(passes) == r["decoder"]["prefill_passes"], r
        assert sum(passes) == r["decoder"]["prompts"] and sum(steps) == r["decoder"]["steps"], r
    assert "P31: a prefill pass of 31 prompts" in json.loads(out.read_text())["table"]
    # when the requests reached the engine and the first passes ran, after the run's first request was sent (the
    # clients' clock and the server's are one): each pass begins once a request is there and hands its first tokens
    # out after it begins; the last one's begins once the last request is there; each pass's time from its beginning
    # to its first tokens handed out is its parts' (admitting's and the wait for the GPU), none left out
    for r in rows + [probe]:
        first, median, last = r["reached_engine_ms"]
        passes = r["passes_ms"]
        assert 0 < first <= median <= last and r["sent_over_ms"] >= 0, r
        assert [n for n, _, _, _ in passes] == [int(e[1:]) for e in r["schedule"].split() if e.startswith("P")], r
        assert passes[0][1] >= first and all(begun < handed for _, begun, handed, _ in passes), r
        assert all(a[2] <= b[1] for a, b in zip(passes, passes[1:])) and passes[-1][1] >= last, r
        for _, begun, handed, parts in passes:
            assert set(parts) == {"layout", "inputs", "pass", "scatter", "first tokens", "gpu wait", "handing out"}
            assert sum(parts.values()) == pytest.approx(handed - begun, rel=1e-6), parts
    assert "| reached the engine (ms after the first was sent): first / median / last |" in \
        json.loads(out.read_text())["table"]
    assert "| the first pass by part (ms): layout / inputs / pass / scatter / first tokens / gpu wait / handing out |" \
        in json.loads(out.read_text())["table"]
    # --profile: the 4 clients once more under torch.profiler, which sees the model's products (addmm on the CPU)
    # though they run on the generation thread, not on the thread that started the profiler (it saw none at first)
    profile = (tmp_path / "bench-serve-fp32-profile.md").read_text()
    assert profile.startswith("4 streaming clients, one run: ") and "aten::addmm" in profile
    # and once more with the engine's and the server's Python stacks sampled: where each thread's time went (the
    # server's event loop among the server's)
    sampled = profile[profile.index("4 streaming clients once more"):]
    table = r"\| {} thread: where \((\d+) samples\) \| share \|\n\| --- \| --- \|\n((\|.*\n)+)"
    engine, server = (re.search(table.format(name), sampled) for name in ("engine", "server"))
    assert int(engine[1]) > 10 and int(server[1]) > 10 and "base_events.py" in server[2], sampled


@pytest.mark.slow  # a server and client processes (make test leaves it out)
def test_serving_bench_with_sampling_clients(tmp_path):
    """--sample: the clients sample with the app's default settings, each question with a seed of its own: every
    answer is sampled (the engine counts it), and each is still the text its question gets alone. (With a GIL switch
    interval of 1 ms, which the rows' names say.)"""
    out = tmp_path / "serve.json"
    run_script("bench.py", "serve", "--tiny", "--sample", "--clients", "4", "--switch-interval", "0.001",
               "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    label = "fp32 sampled, GIL switch 1 ms"
    assert [r["name"] for r in rows] == [f"{label} 4 client(s)",
                                         f"{label} 4 client(s) + a {rows[1]['long_prompt_tokens']}-token prompt "
                                         f"at {rows[1]['name'].split(' at ')[1]}"]
    assert rows[0]["decoder"]["sampled"] == 4 and rows[1]["decoder"]["sampled"] == 5
    assert rows[0]["same_text_as_alone"] == 4 and rows[1]["same_text_as_alone"] == 4
    assert "static batch of 4 (the same questions and model, greedy," in result["table"]


@pytest.mark.parametrize("flag", ["--burst-steps", "--prefill-tokens"])
def test_serve_scheduling_flags_below_one_are_refused_before_anything_loads(flag, capsys):
    """bench serve's A/B flags for the engine's scheduling: 0 steps between a burst's passes would never decode, 0
    tokens a pass would never prefill; either is refused with the fix, before a model is loaded."""
    import bench
    with pytest.raises(SystemExit) as exit_:
        bench.main(["serve", "--tiny", flag, "0"])
    assert exit_.value.code == 2 and f"{flag} must be 1 or more (got 0)" in capsys.readouterr().err


def test_a_switch_interval_of_no_time_is_refused_before_anything_loads(capsys):
    import bench
    with pytest.raises(SystemExit) as exit_:
        bench.main(["serve", "--tiny", "--switch-interval", "0"])
    refused = capsys.readouterr().err
    assert exit_.value.code == 2 and "--switch-interval must be more than 0 seconds (got 0.0)" in refused


def test_the_switch_interval_reaches_the_measuring_process(monkeypatch, tmp_path):
    """--switch-interval, the A/B of how long a thread holds the GIL while another waits (the server's threads and
    the engine's, docs/PERFORMANCE.md): set in the measuring process while its clients run."""
    import argparse
    import sys

    import bench
    import bench_serve
    specs, seen = [], {}
    monkeypatch.setattr(bench, "spawn", lambda spec, timeout: specs.append(spec) or [])
    bench.main(["serve", "--tiny", "--switch-interval", "0.0005", "--out", str(tmp_path / "serve.json")])
    default = sys.getswitchinterval()
    monkeypatch.setattr(bench_serve, "run_serve", lambda *args: seen.update(interval=sys.getswitchinterval()) or [])
    try:
        assert bench.child(argparse.Namespace(one=json.dumps({**specs[0], "result": str(tmp_path / "rows.json")}))) == 0
    finally:
        sys.setswitchinterval(default)
    assert seen == {"interval": 0.0005} and default == bench_serve.DEFAULT_SWITCH_INTERVAL


@pytest.mark.parametrize("flags, short", [([], True), (["--full-chunk-after-pass"], False)], ids=["default", "flag"])
def test_the_full_chunk_flag_reaches_the_measuring_process(flags, short, monkeypatch, tmp_path):
    """--full-chunk-after-pass, the A/B of the short chunk after a prefill pass (which only a GPU's chunks of 8 steps
    show: on the CPU a chunk is one step), goes from the command line into the measuring process's spec, and there
    turns batching.SHORT_AFTER_PASS off while the clients run; without it, the engine's default stands."""
    import argparse

    import batching
    import bench
    import bench_serve
    specs, seen = [], {}
    monkeypatch.setattr(bench, "spawn", lambda spec, timeout: specs.append(spec) or [])
    bench.main(["serve", "--tiny", *flags, "--out", str(tmp_path / "serve.json")])
    for name in ("SHORT_AFTER_PASS", "BURST_STEPS", "PREFILL_TOKENS"):  # (the child sets them; restored after)
        monkeypatch.setattr(batching, name, getattr(batching, name))
    monkeypatch.setattr(bench_serve, "run_serve", lambda *args: seen.update(short=batching.SHORT_AFTER_PASS) or [])
    assert bench.child(argparse.Namespace(one=json.dumps({**specs[0], "result": str(tmp_path / "rows.json")}))) == 0
    assert seen == {"short": short}

"""Speed and memory benchmarks of the real training and generation paths, on a random-init Phi-2-shaped model.

    python bench.py train                      # baseline (original repo's settings) + the presets, one table
    python bench.py train --presets baseline speed --variant speed-b16=speed:training.per_device_train_batch_size=16
    python bench.py train --presets speed --profile   # + kernel time of 2 more steps, by kind (torch.profiler)
    python bench.py generate                   # decode speed: plain generate vs the fast path, bf16 and fp32
    python bench.py train --tiny               # the same code on a tiny model on the CPU (its test; never rots)
    python bench.py epoch --presets speed --runs 2   # time to adapter, oasst1-sized set: cold, then warm compile cache
    python bench.py epoch --tiny               # the same on the tiny model and a small set on the CPU
    python bench.py epoch --presets speed --processes 1 2   # 1 GPU, then 2 through accelerate launch (DDP)
    python bench.py dpo                        # DPO: time to adapter on 20k oasst1-sized preference pairs
    python bench.py dpo --tiny                 # the same on the tiny model and a small set on the CPU
    python bench.py serve --dtypes bf16 --clients 1 8   # concurrent streaming clients of the OpenAI-compatible API
    python bench.py serve --tiny               # the same on the tiny model on the CPU
    python bench.py serve --dtypes bf16 --penalty 1.1   # greedy with the app's default repetition penalty
    python bench.py serve --dtypes bf16 --sample --penalty 1.1   # sampled: the app's default settings, seeded
    python bench.py serve --dtypes bf16 --clients 64 --burst-steps 8   # a full chunk between a burst's passes
    python bench.py serve --dtypes bf16 --clients 64 --prefill-tokens 8192   # fewer, longer passes in a burst
    python bench.py serve --dtypes bf16 --clients 64 --full-chunk-after-pass  # a full chunk after a burst's first pass
    python bench.py serve --dtypes bf16 --clients 64 --switch-interval 0.0005  # the GIL handed over every 0.5 ms
    python bench.py serve --dtypes bf16 --clients 64 --profile   # + the 64 clients once more under torch.profiler,
                                                                 # and once more with Python stacks sampled

Real Phi-2 weights cannot be downloaded here and speed does not depend on their values, so the model is randomly
initialised with Phi-2's exact configuration and saved once, then loaded through the normal `from_pretrained` +
bitsandbytes path. The training workload is fixed: 4000 sequences of random token ids with lengths
lognormal(mu=ln 250, sigma=0.8) clipped to [16, 2048], numpy seed 0 (mean ~338 tokens), loss on every token.
Tokens/s counts non-padding tokens only. Each configuration runs in its own process (clean memory, clean
compile caches); results go to reports/bench-*.json and a markdown table on stdout.

The train benchmark (train.py's builders, steady steps) is in bench_train.py, the epoch and dpo benchmarks (train.py
itself, end to end) in bench_epoch.py, the serve benchmark in bench_serve.py; each module's docstring gives its
workload and what it reports. They import the shared pieces below (the workload, the word list, free_port,
serving_config) from here, so bench.py imports them inside the functions that run them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from profiling import sync

ROOT = Path(__file__).resolve().parent
TINY_MODEL = ROOT / "data" / "tiny-phi"
PHI2_CONFIG = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
                   max_position_embeddings=2048, hidden_act="gelu_new", layer_norm_eps=1e-5, tie_word_embeddings=False,
                   resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=50256, eos_token_id=50256)

PRESET_FILES = {"default": "configs/phi2-oasst1.yaml", "speed": "configs/phi2-speed.yaml",
                "lowmem": "configs/phi2-lowmem.yaml", "smoke": "configs/smoke.yaml", "dpo": "configs/phi2-dpo.yaml",
                "smoke-dpo": "configs/smoke-dpo.yaml"}
SFT_PRESET_OF = {"dpo": "default", "smoke-dpo": "smoke"}  # the SFT run each DPO preset continues

logger = logging.getLogger("bench")


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------

def variant_parts(spec: str) -> tuple[str, str, list[tuple[str, str]]]:
    """'name' or 'name=preset:key=value,key=value' -> (row name, preset, [("section.key", "value"), ...])."""
    name, _, rest = spec.partition("=")
    preset, _, overrides = (rest or name).partition(":")
    return name, preset, [(key, value) for key, _, value in
                          (item.partition("=") for item in filter(None, overrides.split(",")))]


def workload_lengths(n: int, mu: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(mean=mu, sigma=sigma, size=n), lo, hi).astype(int)


def workload(tiny: bool, vocab: int):
    """The fixed synthetic dataset: random ids, loss on every token."""
    from datasets import Dataset
    if tiny:
        lengths = workload_lengths(64, math.log(40), 0.5, 8, 128)
    else:
        lengths = workload_lengths(4000, math.log(250), 0.8, 16, 2048)
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, vocab, size=int(n)).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_random_phi2(path: Path) -> Path:
    """Phi-2's exact architecture with random weights, saved once as bf16 safetensors."""
    from transformers import PhiConfig, PhiForCausalLM
    if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = PhiForCausalLM(PhiConfig(**PHI2_CONFIG)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    from model_utils import load_tokenizer
    load_tokenizer(TINY_MODEL).save_pretrained(path)  # a whole model folder
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return path


# The fixed vocabulary the epoch, dpo and serve workloads draw their words from (bench_epoch.py, bench_serve.py).
WORDS = ("the of and to in is that it for you was with on as have be at this are not but or what from by an "
         "they we can which if will one all would there their so do when your about more how who make like time "
         "just know take people into year good some could them see other than then now look only come its over "
         "think also back after use two work first well way even new want because any these give day most us "
         "question answer model language learn paris water energy history music science computer data python "
         "function example explain important different because however therefore usually often").split()


def free_port() -> int:
    """A free local TCP port (accelerate's main process in bench_epoch.py, the server in bench_serve.py)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "fastapi", "uvicorn"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:  # the serving benchmark runs without the training packages
            info[name] = "not installed"
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return info


# ----------------------------------------------------------------------------------------------------------------
# Generation benchmark
# ----------------------------------------------------------------------------------------------------------------

def run_generate(model_path: Path, dtype: str, tiny: bool, prompt_len: int, new_tokens: int, batch: int,
                 check_prompts: int, partial: Path | None = None) -> list[dict]:
    """Plain generate vs the fast path (decoding.FastDecoder) in one dtype; agreement of greedy tokens.
    first_call_s: the first call of a shape, compilation included (what warm-up at load pays once)."""
    from config import GenerationSettings
    from inference import ChatModel, load_model_folder

    loaded = load_model_folder(str(model_path), serving_config(dtype, fast=False))  # the app's loading path
    model, tokenizer = loaded.model, loaded.tokenizer
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, tokenizer.vocab_size, size=prompt_len).tolist() for _ in range(batch)]
    gen = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    rows, outputs, logits = [], {}, {}
    for fast in (False, True):
        chat = ChatModel(model, tokenizer, fast=fast)
        label = f"{dtype} {'fast' if fast else 'plain'}"
        t0 = time.perf_counter()
        # warm-up/compile
        chat.generate_ids(prompts[:1], dataclasses.replace(gen, max_new_tokens=new_tokens), ignore_eos=True)
        sync()
        first_call = time.perf_counter() - t0
        chat.generate_ids(prompts[:1], dataclasses.replace(gen, max_new_tokens=new_tokens), ignore_eos=True)
        sync()
        # Time to first token: a 1-token answer. Its first call meets a new cache size (and new cuDNN attention
        # plans), a one-off; the median of the calls after it is what a user waits each time.
        firsts = []
        for _ in range(6):
            sync()
            t0 = time.perf_counter()
            chat.generate_ids(prompts[:1], dataclasses.replace(gen, max_new_tokens=1), ignore_eos=True)
            sync()
            firsts.append(time.perf_counter() - t0)
        ttft = sorted(firsts[1:])[2]
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            chat.generate_ids(prompts[:1], dataclasses.replace(gen, max_new_tokens=new_tokens), ignore_eos=True)
            sync()
            times.append(time.perf_counter() - t0)
        row = {"name": label, "batch1_tok_s": new_tokens / sorted(times)[1], "ttft_s": ttft,
               "first_call_s": first_call}
        if partial is not None:
            partial.write_text(json.dumps(rows + [row], default=str))
        outputs[fast], logits[fast] = [], []
        for p in prompts[:check_prompts]:
            ids, step_logits = chat.generate_with_logits([p], dataclasses.replace(gen, max_new_tokens=64))
            outputs[fast].append(ids[0])
            logits[fast].append(step_logits[0])  # (64, vocab)
        if batch > 1:
            t0 = time.perf_counter()
            # warm-up/compile
            chat.generate_ids(prompts, dataclasses.replace(gen, max_new_tokens=new_tokens), ignore_eos=True)
            sync()
            row[f"batch{batch}_first_call_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            chat.generate_ids(prompts, dataclasses.replace(gen, max_new_tokens=new_tokens), ignore_eos=True)
            sync()
            row[f"batch{batch}_tok_s"] = batch * new_tokens / (time.perf_counter() - t0)
        rows.append(row)
        if partial is not None:  # a configuration cut short by its timeout still reports what it measured
            partial.write_text(json.dumps(rows, default=str))
        del chat
        gc.collect()
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(outputs[False], outputs[True])]
    rows[-1]["greedy_agreement_first64"] = agree
    # Logits compared only up to the first differing token: after it the two paths see different inputs.
    rows[-1]["max_logit_diff"] = max(float((a[:n + 1] - b[:n + 1]).abs().max())
                                     for a, b, n in zip(logits[False], logits[True], agree))
    return rows


def serving_config(dtype: str, fast: bool, extra: tuple[str, ...] = ()):
    from config import parse_config
    return parse_config(["--inference.dtype", dtype, "--inference.fast", "on" if fast else "off",
                         "--generation.temperature", "0", "--generation.repetition_penalty", "1.0", *extra])[0]


def gen_table(rows: list[dict], batch: int) -> str:
    lines = [f"| path | batch-1 tok/s | time to first token (s) | batch-{batch} tok/s | first call (s): batch 1 / "
             f"batch {batch} |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch1_tok_s']:,.1f} | {r['ttft_s']:.3f} | "
                     f"{r.get(f'batch{batch}_tok_s', float('nan')):,.0f} | {r['first_call_s']:.1f} / "
                     f"{r.get(f'batch{batch}_first_call_s', float('nan')):.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def child(args) -> int:
    """One configuration in this process (called by the parent through --one); its log is the configuration's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    spec = json.loads(args.one)
    if spec["kind"] == "train":
        from bench_train import run_train_config
        row = run_train_config(spec["name"], spec["values"], Path(spec["model"]), spec["steps"], spec["warmup"],
                               spec["tiny"], Path(spec["profile"]) if spec.get("profile") else None)
        result = [row]
    elif spec["kind"] == "serve":
        import batching  # (A/Bs of the engine's scheduling on one loaded machine)
        from bench_serve import run_serve
        batching.BURST_STEPS = spec.get("burst_steps") or batching.BURST_STEPS
        batching.PREFILL_TOKENS = spec.get("prefill_tokens") or batching.PREFILL_TOKENS
        batching.SHORT_AFTER_PASS = not spec.get("full_chunk_after_pass")
        if spec.get("switch_interval"):
            sys.setswitchinterval(spec["switch_interval"])
        result = run_serve(Path(spec["model"]), spec["dtype"], spec["tiny"], spec["clients"], spec["prompt_words"],
                           spec["new_tokens"], Path(spec["result"]), spec["penalty"],
                           Path(spec["profile"]) if spec.get("profile") else None, spec.get("sample", False))
    else:
        result = run_generate(Path(spec["model"]), spec["dtype"], spec["tiny"], spec["prompt_len"],
                              spec["new_tokens"], spec["batch"], spec["check_prompts"], Path(spec["result"]))
    Path(spec["result"]).write_text(json.dumps(result, default=str))
    # The threads the interpreter still has to end (32nd session: a serve child aborted once as it exited, after
    # writing its results; with PYTHONFAULTHANDLER its stacks are printed too).
    logging.info("exiting; threads alive: %s", ", ".join(f"{t.name}{' (daemon)' if t.daemon else ''}"
                                                        for t in threading.enumerate()))
    return 0


def spawn(spec: dict, timeout: int | None) -> list[dict]:
    """Run one configuration in a child process; its output goes to <log_dir>/<name>.log."""
    name = spec.get("name", spec.get("dtype"))
    result = Path(tempfile.mkstemp(suffix=".json")[1])
    log = Path(spec.pop("log_dir")) / f"bench-{spec['kind']}-{name}.log"
    spec = {**spec, "result": str(result)}
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdout=f, stderr=subprocess.STDOUT, text=True)
            failed = proc.returncode != 0 or not result.read_text()
            why = f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed, why = True, f"timed out after {timeout}s"
    if failed:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "it/s]" not in ln]
        partial = json.loads(result.read_text()) if result.read_text().strip() else []
        return partial + [{"name": name, "error": f"{why}: " + " / ".join(lines[-2:])[-400:], "log": str(log)}]
    return json.loads(result.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", choices=["train", "generate", "epoch", "dpo", "serve"], default="train")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (checks the code, not speed)")
    parser.add_argument("--presets", nargs="+", default=["baseline", "default", "speed", "lowmem"])
    parser.add_argument("--variant", action="append", default=[],
                        help="extra row NAME=PRESET:section.key=value,... (e.g. speed-b16=speed:training."
                             "per_device_train_batch_size=16)")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=None, help="optimizer steps before timing starts")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], help="generation: merged model dtypes")
    parser.add_argument("--batch", type=int, default=64, help="generation: batch for aggregate throughput")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="serve: concurrent clients per run")
    parser.add_argument("--burst-steps", type=int, default=None,
                        help="serve: decode steps between two prefill passes of a burst of arrivals (default "
                             "batching.BURST_STEPS; 8, a full chunk on a GPU, to compare with)")
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="serve: padded tokens a prefill pass of waiting prompts takes at most (default "
                             "batching.PREFILL_TOKENS; more: fewer, longer passes in a burst)")
    parser.add_argument("--full-chunk-after-pass", action="store_true",
                        help="serve: a full chunk after a prefill pass that leaves rows free (default: BURST_STEPS "
                             "steps, batching.SHORT_AFTER_PASS), to compare with")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="serve: seconds a thread may hold the GIL while another waits for it "
                             "(sys.setswitchinterval; Python's default 0.005), in the measuring process")
    parser.add_argument("--penalty", type=float, default=1.0,
                        help="serve: the server's repetition penalty (default 1.0, none; the app's default is 1.1)")
    parser.add_argument("--sample", action="store_true",
                        help="serve: clients sample with the app's default settings (temperature, top-p, top-k), "
                             "each with a seed of its own, instead of decoding greedily")
    parser.add_argument("--model-dir", default=None, help="where the random Phi-2 is saved (reused if present)")
    parser.add_argument("--out", default=None, help="JSON results file (default reports/bench-<kind>.json)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per configuration")
    parser.add_argument("--conversations", type=int, default=None,
                        help="epoch: conversations (default 9500); dpo: pairs (default 20000)")
    parser.add_argument("--cache", default=None,
                        help="epoch: compile-cache folder kept across runs (default: a new empty one, cold)")
    parser.add_argument("--profile", action="store_true",
                        help="train: profile 2 steps after the timed ones (bench-train-<name>-profile.md beside "
                        "--out); serve: the most clients once more (bench-serve-<dtype>-profile.md)")
    parser.add_argument("--runs", type=int, default=1, help="epoch: runs per preset (with --cache: cold, then warm)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1],
                        help="epoch: data-parallel processes (GPUs) per run; more than 1 runs through accelerate "
                             "launch (configs/accelerate/ddp.yaml), and each row's steady tok/s is also given as a "
                             "multiple of the first 1-process run's")
    return parser


def bench_epochs(args, parser: argparse.ArgumentParser, model_path: Path, out: Path, steps: int,
                 warmup: int) -> tuple[list[dict], str]:
    """bench.py epoch / dpo: train.py itself on the oasst1-sized set or the pairs, per preset, runs and processes."""
    from bench_epoch import (epoch_conversations, epoch_table, make_sft_adapter, preference_pairs, run_epoch,
                             scale_to_one_process)
    rows: list[dict] = []
    dpo = args.kind == "dpo"
    default = ("smoke-dpo" if args.tiny else "dpo") if dpo else ("smoke" if args.tiny else "speed")
    presets = args.presets if args.presets != parser.get_default("presets") else [default]
    n = args.conversations or (200 if args.tiny else 20000 if dpo else 9500)
    data = preference_pairs(n) if dpo else epoch_conversations(n)
    for spec in presets + args.variant:
        name, preset, overrides = variant_parts(spec)
        if preset not in PRESET_FILES:
            raise SystemExit(f"{args.kind} runs train.py with a preset file: use one of {', '.join(PRESET_FILES)} "
                             f"(got {preset!r})")
        if dpo:
            overrides = [("preference.sft_adapter", str(make_sft_adapter(model_path, preset))), *overrides]
        # Runs of one preset share a cache (the first is cold); without --cache it starts empty.
        cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="bench-compile-cache-"))
        first = len(rows)
        for processes in args.processes:
            for i in range(args.runs):
                label = name + (f"-{processes}proc" if args.processes != [1] else "")
                label += f"-run{i + 1}" if args.runs > 1 else ""
                logger.info("epoch %s ...", label)
                rows.append(run_epoch(label, preset, overrides, processes, model_path, data, args.tiny, cache,
                                      out.parent, args.timeout))
                logger.info("  %s", rows[-1])
        scale_to_one_process(rows[first:])
    table = epoch_table(rows)
    return rows, table


def bench_training(args, parser: argparse.ArgumentParser, model_path: Path, out: Path, steps: int,
                   warmup: int) -> tuple[list[dict], str]:
    """bench.py train: each preset or variant through train.py's builders in a process of its own."""
    from bench_train import preset_values, train_table
    rows: list[dict] = []
    specs = [preset_values(p) for p in args.presets] + [preset_values(v) for v in args.variant]
    for name, values in specs:
        logger.info("training config %s ...", name)
        rows += spawn({"kind": "train", "name": name, "values": values, "model": str(model_path),
                       "steps": steps, "warmup": warmup, "tiny": args.tiny, "log_dir": str(out.parent),
                       "profile": str(out.parent / f"bench-train-{name}-profile.md") if args.profile else None},
                      args.timeout)
        logger.info("  %s", {k: v for k, v in rows[-1].items() if k != "config"})
    table = train_table(rows, args.tiny)
    return rows, table


def bench_serving(args, parser: argparse.ArgumentParser, model_path: Path, out: Path, steps: int,
                  warmup: int) -> tuple[list[dict], str]:
    """bench.py serve: concurrent streaming clients over HTTP, per dtype, in a process of its own."""
    from bench_serve import serve_table
    for flag in ("burst_steps", "prefill_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be 1 or more (got {getattr(args, flag)})")
    if args.switch_interval is not None and not args.switch_interval > 0:
        parser.error(f"--switch-interval must be more than 0 seconds (got {args.switch_interval})")
    rows: list[dict] = []
    for dtype in args.dtypes if args.dtypes != parser.get_default("dtypes") else ["fp32" if args.tiny else "bf16"]:
        logger.info("serving %s ...", dtype)
        rows += spawn({"kind": "serve", "dtype": dtype, "model": str(model_path), "tiny": args.tiny,
                       "clients": args.clients, "prompt_words": 12 if args.tiny else 40, "penalty": args.penalty,
                       "burst_steps": args.burst_steps, "prefill_tokens": args.prefill_tokens,
                       "full_chunk_after_pass": args.full_chunk_after_pass, "sample": args.sample,
                       "switch_interval": args.switch_interval,
                       "new_tokens": 24 if args.tiny else 256, "log_dir": str(out.parent),
                       "profile": str(out.parent / f"bench-serve-{dtype}-profile.md") if args.profile else None},
                      args.timeout)
    table = serve_table([r for r in rows if "error" not in r])
    table += "".join(f"\n{r['name']}: failed: {r['error']}" for r in rows if "error" in r)
    return rows, table


def bench_generation(args, parser: argparse.ArgumentParser, model_path: Path, out: Path, steps: int,
                     warmup: int) -> tuple[list[dict], str]:
    """bench.py generate: plain generate against the fast path, per dtype, in a process of its own."""
    rows: list[dict] = []
    batch = 4 if args.tiny else args.batch
    for dtype in args.dtypes:
        logger.info("generation %s ...", dtype)
        rows += spawn({"kind": "generate", "dtype": dtype, "model": str(model_path), "tiny": args.tiny,
                       "prompt_len": 16 if args.tiny else 64, "new_tokens": 16 if args.tiny else 256,
                       "batch": batch, "check_prompts": 2 if args.tiny else 4, "log_dir": str(out.parent)},
                      args.timeout)
    table = gen_table([r for r in rows if "error" not in r], batch)
    table += "".join(f"\n{r['name']}: failed: {r['error']}" for r in rows if "error" in r)
    for r in rows:
        if "greedy_agreement_first64" in r:
            table += (f"\n{r['name']}: greedy tokens equal to the plain path before the first difference "
                      f"(of 64): {r['greedy_agreement_first64']}; max |logit diff| {r['max_logit_diff']:.3g}")
    return rows, table


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.one:
        return child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    model_path = TINY_MODEL if args.tiny else make_random_phi2(
        Path(args.model_dir or Path(tempfile.gettempdir()) / "phi2-random"))
    steps = args.steps or (3 if args.tiny else 10)
    warmup = args.warmup or (2 if args.tiny else 5)
    out = Path(args.out or ROOT / "reports" / f"bench-{args.kind}{'-tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {"epoch": bench_epochs, "dpo": bench_epochs, "train": bench_training, "serve": bench_serving,
           "generate": bench_generation}[args.kind]
    rows, table = run(args, parser, model_path, out, steps, warmup)
    record = {"command": "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "versions": versions(), "weights": "random init, Phi-2 config",
              "steps": steps, "warmup": warmup, "rows": rows, "table": table}
    if args.kind == "serve":  # the last dtype's static batch (each row keeps its own dtype's)
        record["static_batch"] = next((r["static_batch"] for r in reversed(rows) if "static_batch" in r), None)
    out.write_text(json.dumps(record, indent=2, default=str))
    print(table)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""bench.py epoch and bench.py dpo: train.py's real entry point timed from process start to its adapter (bench.py's
module docstring has the commands).

The epoch benchmark runs train.py's real entry point as a subprocess, from process start to `final/` written, on an
oasst1-sized synthetic conversation set: 9,500 conversations (oasst1's English+other top-ranked threads number about
9.8k), 1-4 turns each (P = 0.55/0.25/0.12/0.08), words drawn with numpy seed 0 from a fixed vocabulary, question lengths
lognormal(ln 17, 0.7) and answer lengths lognormal(ln 75, 0.8) words, clipped to [3, 1500]; 5.8M tokens after the
2048-token cut with the repo's tiny tokenizer (the issue's oasst1-sized set: 9.5k conversations, 5.9M tokens; train.py's
count is reported). It reports train.py's own phase timing (run.json: data, model load + quantization, trainer set-up,
first 10 steps (mostly compilation), steady steps, final evaluation, save), the interpreter start + imports before them,
and the steady tokens/s. The time to adapter is process start to the last file of `final/` written (the process exit
after it is reported apart). `--cache` keeps inductor's and Triton's compile caches in a folder, so a second run reports
the warm figure; by default each run gets an empty one (cold). `--processes 1 2` runs each preset on 1 process (GPU) and
then through `accelerate launch` (configs/accelerate/ddp.yaml: data-parallel, the same per-device micro-batch) on 2,
sharing the preset's compile cache, and gives each row's steady tokens/s (all processes' tokens) as a multiple of the
1-process run's.

The dpo benchmark runs train.py the same way with configs/phi2-dpo.yaml (training.method dpo) on 20,000 preference pairs
(the size issue 42 gives for oasst1's ranked replies): each pair's context is an epoch conversation without its last
answer, and the chosen and the rejected answer are two answers of that length distribution, as TRL-format messages. The
SFT adapter DPO starts from is a fresh peft LoRA shaped as its SFT preset's on the same random model (its values do not
change the speed). It reports what epoch does plus the steady optimizer steps/s and the pairs per optimizer step.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import PRESET_FILES, ROOT, SFT_PRESET_OF, TINY_MODEL, WORDS, free_port


def epoch_conversations(n: int, seed: int = 0) -> list[dict]:
    """The oasst1-sized synthetic set (module docstring): {"messages": [...]} rows for train.py's messages format."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)

    def text(mu: float, sigma: float) -> str:
        length = int(np.clip(rng.lognormal(mu, sigma), 3, 1500))
        return " ".join(words[rng.integers(0, len(words), size=length)])

    rows = []
    for _ in range(n):
        turns = int(rng.choice([1, 2, 3, 4], p=[0.55, 0.25, 0.12, 0.08]))
        messages = []
        for _ in range(turns):
            messages += [{"role": "user", "content": text(math.log(17), 0.7)},
                         {"role": "assistant", "content": text(math.log(75), 0.8)}]
        rows.append({"messages": messages})
    return rows


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """The DPO set (module docstring): TRL-format rows, the context as messages, chosen and rejected as answers."""
    rng = np.random.default_rng(seed + 1)
    words = np.array(WORDS)

    def answer() -> list[dict]:
        length = int(np.clip(rng.lognormal(math.log(75), 0.8), 3, 1500))
        return [{"role": "assistant", "content": " ".join(words[rng.integers(0, len(words), size=length)])}]

    return [{"prompt": row["messages"][:-1], "chosen": answer(), "rejected": answer()}
            for row in epoch_conversations(n, seed)]


def make_sft_adapter(model_path: Path, preset: str) -> Path:
    """A fresh LoRA in the shape of the SFT preset the DPO preset follows, saved once in the temp folder: the adapter
    DPO continues from."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from adapter_utils import build_lora_config
    from config import load_config
    lora = load_config(ROOT / PRESET_FILES[SFT_PRESET_OF[preset]]).lora
    out = Path(tempfile.gettempdir()) / f"{model_path.name}-sft-adapter-r{lora.r}"
    if not (out / "adapter_model.safetensors").is_file():
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        get_peft_model(base, build_lora_config(lora)).save_pretrained(out)
        del base
        gc.collect()
    return out


def run_epoch(name: str, preset: str, overrides: list[tuple[str, str]], processes: int, model_path: Path,
              rows: list[dict], tiny: bool, cache: Path, log_dir: Path, timeout: int | None) -> dict:
    """train.py on the epoch set (or the DPO pairs) as a user runs it; time to adapter split into train.py's phases.

    With processes > 1 it runs through `accelerate launch` with configs/accelerate/ddp.yaml, as README's 'Several
    GPUs' says (each process its own GPU and its own 4-bit copy, the same per-device micro-batch); the token counts
    train.py logs are gathered over all processes, so steady tok/s is the whole run's."""
    work = Path(tempfile.mkdtemp(prefix="bench-epoch-"))
    data = work / "conversations.jsonl"
    with data.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    cold = not any(p.is_file() for p in cache.rglob("*"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONUNBUFFERED": "1"}
    if torch.cuda.device_count() > processes and "CUDA_VISIBLE_DEVICES" not in env:
        # one process per GPU: a lone train.py that sees several refuses to run (transformers would use DataParallel)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(processes))
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes", str(processes), "--main_process_port", str(free_port())]
    cmd = [*launch, str(ROOT / "train.py"), "--config", str(ROOT / PRESET_FILES[preset]),
           "--model.name_or_path", str(model_path), "--model.tokenizer", str(TINY_MODEL), "--data.dataset", str(data),
           "--training.output_dir", str(work / "out"), "--training.report_to", "none"]
    if tiny:
        cmd += ["--data.max_length", "128", "--training.max_steps", "30", "--training.logging_steps", "5"]
    cmd += [arg for key, value in overrides for arg in (f"--{key}", value)]
    log = log_dir / f"bench-epoch-{name}.log"
    start, started_at = time.perf_counter(), time.time()
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=work)
            error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout}s"
    wall = time.perf_counter() - start
    if error:
        return {"name": name, "error": error, "log": str(log)}
    final = work / "out" / "final"
    run = json.loads((final / "run.json").read_text())
    stats = json.loads((final / "data_stats.json").read_text())["train"]
    steps = max(h["step"] for h in json.loads((final / "log_history.json").read_text()))
    timing = run["timing"]
    # The time to adapter: process start to the last file of final/ written (the process then still exits).
    written = max(p.stat().st_mtime for p in final.iterdir()) - started_at
    per_step = run["plan"]["micro_batch"] * run["plan"]["accumulation"] * processes
    first = next(int(m[1]) for k in timing if (m := re.fullmatch(r"first_(\d+)_steps_s", k)))  # not steady yet
    return {"name": name, "preset": preset, "overrides": dict(overrides), "processes": processes,
            "to_final_s": round(written, 1), "wall_s": round(wall, 1),
            "start_and_imports_s": round(written - timing["total_s"], 1), **timing,
            "steps": steps, "steady_steps_per_s": round((steps - first) / timing["steady_steps_s"], 3),
            "rows_per_step": per_step, "train_tokens": stats.get("tokens"),
            "train_sequences": stats.get("sequences", stats.get("pairs")),
            "compile_cache": "cold" if cold else "warm", "log": str(log)}


def scale_to_one_process(rows: list[dict]) -> None:
    """Each row's steady tok/s as a multiple of the first 1-process row's (the same preset), where there is one."""
    one = next((r for r in rows if r.get("processes") == 1 and r.get("steady_tokens_per_s")), None)
    for r in rows:
        if one and r.get("steady_tokens_per_s"):
            r["x_one_process"] = round(r["steady_tokens_per_s"] / one["steady_tokens_per_s"], 3)


def epoch_table(rows: list[dict]) -> str:
    done = [r for r in rows if "error" not in r]
    keys = [k for k in done[0] if k.endswith("_s") and not k.endswith("per_s")
            and k not in ("to_final_s", "wall_s", "total_s")] if done else []
    lines = ["| run | time to adapter (s) | process exit (s) | " + " | ".join(keys)
             + " | steady tok/s | steps/s | rows/step | x 1 process | train rows |",
             "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} (log {r['log']}) |")
            continue
        lines.append(f"| {r['name']} ({r['compile_cache']} cache) | {r['to_final_s']:.1f} | {r['wall_s']:.1f} | "
                     + " | ".join(f"{r.get(k, 0):.1f}" for k in keys)
                     + f" | {r.get('steady_tokens_per_s', float('nan')):,.0f} | {r['steady_steps_per_s']:.2f} | "
                     f"{r['rows_per_step']} | {r.get('x_one_process', float('nan')):.2f} | {r['train_sequences']:,} |")
    return "\n".join(lines)

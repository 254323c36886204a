"""The train benchmark (`python bench.py train`): a configuration's steady optimizer steps through train.py's builders.

Each row is one configuration, in a process of its own (bench.py's spawn): the original repo's settings (BASELINE),
a preset file, or a preset with overrides (`--variant name=preset:section.key=value,...`), every one with the
benchmark's own LoRA so rows compare. The model is bench.py's random-init Phi-2 (or the tiny model on the CPU), the
data bench.py's fixed workload of random token ids; tokens/s counts the non-padding tokens handed to the collator
between the warm-up's end and the last timed step. With --profile, the two steps after the timed ones run under
torch.profiler.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench import PRESET_FILES, ROOT, TINY_MODEL, variant_parts, workload
from profiling import profiler, sync, write_profile

PEAK_BF16_FLOPS = 790e12  # measured dense bf16 matmul rate of the lent H200 (device notes)

# The original repo's settings: NF4 without double quant, bf16 (its fp16 crashes on current trl), batch 4 x 4,
# max length 512, no packing, SDPA, paged_adamw_32bit, LoRA r=64 alpha=16 dropout 0.1.
BASELINE = {
    "quantization": {"mode": "nf4", "double_quant": False},
    "lora": {"r": 64, "alpha": 16, "dropout": 0.1},
    "data": {"max_length": 512},
    "model": {"attn_implementation": "sdpa", "dtype": "bf16"},
    "training": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "packing": False,
                 "optim": "paged_adamw_32bit", "gradient_checkpointing": False, "torch_compile": "off"},
}
# The benchmark's own LoRA (QLoRA NF4 r=64 alpha=16), applied on top of every preset so rows compare.
BENCH_LORA = {"r": 64, "alpha": 16}


def preset_values(spec: str) -> tuple[str, dict]:
    """'name' or 'name=preset:key=value,key=value' -> (row name, nested config values)."""
    import yaml
    name, preset, overrides = variant_parts(spec)
    if preset == "baseline":
        values = json.loads(json.dumps(BASELINE))
    elif preset in PRESET_FILES:
        values = yaml.safe_load((ROOT / PRESET_FILES[preset]).read_text()) or {}
        values.setdefault("lora", {}).update(BENCH_LORA)
    else:
        raise SystemExit(f"unknown preset {preset!r}: use baseline or one of {', '.join(PRESET_FILES)}")
    for key, value in overrides:
        section, _, field = key.partition(".")
        values.setdefault(section, {})[field] = yaml.safe_load(value)
    return name, values


def bench_train_config(values: dict, model_path: Path, steps: int, warmup: int, tiny: bool, profile: bool):
    """A configuration's values made into the run bench.py times (its model, a run of warm-up + steps optimizer steps
    and one log line, no saves or evaluations; on the tiny model what the CPU can run) and checked as train.py checks
    a config; returns (config, the values)."""
    from config import ConfigError, build_config, validate

    values = json.loads(json.dumps(values))
    values.setdefault("model", {})["name_or_path"] = str(model_path)
    values["model"]["tokenizer"] = str(TINY_MODEL)  # ids are random; any tokenizer with an EOS/pad will do
    t = values.setdefault("training", {})
    # One log line, at the end of the timed steps: a log reads the loss back from the GPU, which train.py does every
    # logging_steps (10), not every step.
    # With a profile, 2 profiled steps and one more: the last step of a run ends with its save and the check that the
    # weights are finite (a host wait per adapter tensor), which is not a training step's work.
    t.update({"output_dir": tempfile.mkdtemp(prefix="bench-"), "max_steps": warmup + steps + (3 if profile else 0),
              "report_to": ["none"],
              "save_steps": 10**6, "eval_steps": 0, "logging_steps": warmup + steps, "warmup_ratio": 0.0})
    if tiny:  # what the CPU and the tiny model can run; the code path stays the same
        values["model"].update({"dtype": "auto", "attn_implementation": "sdpa"})
        t.update({"optim": "adamw_torch", "torch_compile": "off"})
        values.setdefault("data", {})["max_length"] = min(values.get("data", {}).get("max_length", 128), 128)
    problems: list[str] = []
    cfg = build_config(values, problems)
    try:
        validate(cfg, problems)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    cfg.explicit = {f"{section}.{key}" for section, keys in values.items() for key in keys}
    return cfg, values


def step_profiler(profile: Path, first: int):
    """A Trainer callback that profiles the 2 steps after step `first` (after the timed ones, so the timing is never
    disturbed; not the run's last) and writes a per-kind kernel summary, where the GPU waited, and a kernel table to
    `profile`."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof, start = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and self.prof is None:
                sync()
                self.prof = profiler()
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first + 2:
                sync()
                wall = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                write_profile(self.prof, 2, wall, profile, f"steps {first + 1}-{first + 2} of {args.max_steps}: ")

    return Profile()


def run_train_config(name: str, values: dict, model_path: Path, steps: int, warmup: int, tiny: bool,
                     profile: Path | None = None) -> dict:
    """One configuration through train.py's builders; returns the measured row. With `profile`, the two steps after
    the timed ones run under torch.profiler: a kernel table and a per-kind summary go to that file."""
    from transformers import TrainerCallback

    import train
    from model_utils import decide_device_dtype, load_model_config, load_tokenizer
    from training_plan import decide_training

    cfg, values = bench_train_config(values, model_path, steps, warmup, tiny, profile is not None)
    choice = decide_device_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision)
    plan = decide_training(cfg, choice)  # as train.py decides
    cfg.training = plan.training
    dataset = workload(tiny, load_model_config(cfg.model).vocab_size)
    if cfg.training.packing is False:
        dataset = dataset.map(lambda ex: {k: v[:cfg.data.max_length] for k, v in ex.items()})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = train.build_model(cfg, choice, plan)
    trainer = train.build_trainer(cfg, model, tokenizer, dataset, None, choice, plan)

    marks: dict[int, tuple[float, int]] = {}
    losses: list[float] = []
    seen = [0]  # non-padding tokens handed to the collator (padding added for static shapes is not counted)
    collate = trainer.data_collator

    def counting_collator(examples):
        seen[0] += sum(len(e["input_ids"]) for e in examples)
        return collate(examples)

    trainer.data_collator = counting_collator

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks[0] = (time.perf_counter(), 0)

        def on_step_end(self, args, state, control, **kwargs):
            # Waits for the GPU only at the marks the row reads, so the host queues steps ahead as in train.py
            if state.global_step in (1, warmup, warmup + steps):
                sync()
                marks[state.global_step] = (time.perf_counter(), seen[0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Timer())
    if profile is not None:
        trainer.add_callback(step_profiler(profile, warmup + steps))
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup], marks[warmup + steps]
    row = {
        "name": name, "tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": (t1 - t0) / steps,
        "tokens_per_step": (n1 - n0) / steps, "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                                                          if torch.cuda.is_available() else float("nan")),
        "loss_last": losses[-1] if losses else float("nan"), "first_step_s": marks[1][0] - marks[0][0],
        "first_steps_s": marks[warmup][0] - marks[1][0],
        "attention": model.config._attn_implementation, "compiled": bool(trainer.args.torch_compile),
        "autocast": plan.autocast, "micro_batch": cfg.training.per_device_train_batch_size,
        "accumulation": cfg.training.gradient_accumulation_steps,
        "checkpointing": cfg.training.gradient_checkpointing,
        "config": values,
    }
    return row


def train_table(rows: list[dict], tiny: bool) -> str:
    base = next((r for r in rows if r["name"] == "baseline" and "error" not in r), None)
    lines = ["| config | tokens/s | s/step | tokens/step | peak GiB | x baseline | % of physical limit | loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    flop_per_token = 4 * 2.78e9  # forward + backward through frozen weights + LoRA, as in the issue
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else "-"
        limit = "-" if tiny else f"{100 * r['tokens_per_s'] * flop_per_token / PEAK_BF16_FLOPS:.0f}%"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | {r['tokens_per_step']:,.0f}"
                     f" | {r['peak_gib']:.1f} | {ratio} | {limit} | {r['loss_last']:.3f} |")
    return "\n".join(lines)

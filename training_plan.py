"""The training plan: every choice the GPU and the config make for a run, decided once before the model loads.

decide_training returns a TrainingPlan: the precision (plain bf16 or autocast), the memory plan (micro-batch,
accumulation and gradient checkpointing from the GPU's free memory and Phi-2's measured peaks; on --resume the
interrupted run's; with several processes, for the smallest budget among them), the optimizer, compilation, the
attention kernel and how the frozen 4-bit layers multiply. train.py logs it once, keeps it in run.json and passes it
down; bench.py plans its timed runs with it. The measured figures the estimates rest on are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

from config import Config, ConfigError, LoraSettings, TrainingConfig, load_config
from model_utils import (DeviceChoice, check_context, fsdp_enabled, load_model_config, resolve_attention,
                         resolve_compile)
from quantization_utils import resolve_products

logger = logging.getLogger(__name__)


def resolve_autocast(requested: str, choice: DeviceChoice) -> bool:
    """Whether bf16 training runs under autocast (fp32 layer norms, embeddings, lm_head, residual stream) or in
    plain bf16. Plain bf16 is the default: autocast runs every layer norm in fp32, so the 4-bit layers after it
    return fp32 and the fc1/gelu activations are saved in fp32 (issue 17's profile on an H200). FSDP keeps autocast:
    its sharding was measured that way and mixes the fp32 norms into its bf16 all-gathers."""
    if choice.dtype != torch.bfloat16:
        return False  # fp32 compute: nothing to cast
    if requested == "auto":
        return fsdp_enabled()
    return requested == "on"


# Peak allocated memory of Phi-2 QLoRA (NF4, LoRA r=64 on all six projections, no adapter dropout, varlen attention)
# on an H200, per packed 2048-token row of the micro-batch (docs/PERFORMANCE.md, issue 17): plain bf16 40.9 GiB at
# micro-batch 8 without checkpointing, 5.1 GiB at 4 with it; bf16 autocast 61.7 GiB at 8 and 120.9 at 16 without,
# 8.0 GiB at 4 with. What does not grow with the micro-batch (4-bit weights, adapters, optimizer, CUDA context) is the
# 2.5 GiB the autocast pair gives. Other shapes scale by tokens and width x depth.
PHI2_ROW_GIB = {(False, False): 4.8, (True, False): 0.65,   # (checkpointing, autocast)
                (False, True): 7.4, (True, True): 1.38}
PHI2_FIXED_GIB = 2.5
# What DPO holds per 2048-token sequence beyond SFT's packed rows (TRL's log-probabilities over the vocabulary for the
# chosen and the rejected answer, the reference's pass): the peak it was measured at (docs/PERFORMANCE.md, DPO) less
# the SFT figures' estimate, over the sequences.
DPO_SEQUENCE_GIB = 1.45
PHI2_WIDTH_DEPTH = 2560 * 32
MAX_MICRO_TOKENS = 8 * 2048  # larger micro-batches measured no faster (16 x 2048 rows: 16k tok/s vs 35k at 8)
# Without checkpointing a micro-batch needs this many tokens to beat checkpointing's larger ones: on the H200 under a
# 16 GiB cap, 1 x 2048 uncheckpointed (compiled) ran 9.9k tok/s, 8 x 2048 checkpointed 15.8k; 4 x 2048 uncheckpointed
# measured 28.4k (bf16 autocast, flex attention; first session).
MIN_UNCHECKPOINTED_TOKENS = 4 * 2048
PLAN_HEADROOM = 0.85         # the estimate must fit in this share of the budget (allocator slack, evaluation)
PLANNED = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")


def estimate_peak_gib(model_config, lora: LoraSettings, max_length: int, micro_batch: int, checkpointing: bool,
                      autocast: bool = False, fp32: bool = False, pairs: bool = False) -> float:
    """Estimated peak GPU memory of one training process, from the measured Phi-2 figures above (fp32 compute:
    activations twice the bf16 size). With `pairs` (DPO) the micro-batch counts pairs: two sequences each, each
    with DPO's measured extra.

    Adapter dropout adds what backward keeps of each adapted layer's dropped-out input, for every layer unless
    checkpointing recomputes it (measured with dropout 0.05, plain bf16, micro-batch 8: 62.4 GiB, 2.7 GiB a row more
    than without; this formula gives 2.8)."""
    scale = model_config.hidden_size * model_config.num_hidden_layers / PHI2_WIDTH_DEPTH
    row = PHI2_ROW_GIB[checkpointing, autocast and not fp32] * scale * max_length / 2048 * (2 if fp32 else 1)
    if lora.dropout > 0 and not checkpointing:
        widths = sum(model_config.intermediate_size if name == "fc2" else model_config.hidden_size
                     for name in lora.target_modules)
        value_bytes = 4 if (fp32 or autocast) else 2  # under autocast the adapters' input is the fp32 norm output
        row += widths * value_bytes * model_config.num_hidden_layers * max_length / 2**30
    if pairs:
        row += DPO_SEQUENCE_GIB * scale * max_length / 2048 * (2 if fp32 else 1)
    return PHI2_FIXED_GIB * scale + micro_batch * (2 if pairs else 1) * row


def fp8_copy_gib(model_config) -> float:
    """GPU memory of fp8 products' e4m3 copy of the 4-bit layers (q, k, v, dense, fc1, fc2): 1 byte a weight
    (Phi-2: 2.3 GiB)."""
    h, n = model_config.hidden_size, model_config.num_hidden_layers
    return n * (4 * h * h + 2 * h * model_config.intermediate_size) / 2**30


def fp8_layouts(cfg: Config, model_config, choice: DeviceChoice, autocast: bool,
                budget: tuple[float, str] | None) -> tuple[bool, str]:
    """Whether fp8 products keep both layouts of each weight (no transposes in the backward, a little faster:
    docs/PERFORMANCE.md) or one (1 byte a weight less: Phi-2's 2.3 GiB), and why. Both when the run's estimated peak
    with them fits the share of the budget the memory plan sizes for."""
    if choice.device != "cuda" or budget is None:
        return True, "no GPU memory to save"
    t = cfg.training
    budget_gib, source = budget
    peak = estimate_peak_gib(model_config, cfg.lora, cfg.data.max_length, t.per_device_train_batch_size,
                             t.gradient_checkpointing, autocast, pairs=t.method == "dpo")
    peak += 2 * fp8_copy_gib(model_config)
    fits = peak <= PLAN_HEADROOM * budget_gib
    return fits, (f"estimated peak {peak:.1f} GiB with both {'fits' if fits else 'does not fit'} "
                  f"{100 * PLAN_HEADROOM:.0f}% of {budget_gib:.1f} GiB, {source}")


def cap_process_memory(t: TrainingConfig) -> None:
    """training.memory_budget_gib caps this process on its GPU (a shared GPU); nothing without it."""
    if t.memory_budget_gib is not None:
        device = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.mem_get_info(device)[1] / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, t.memory_budget_gib / total), device)


def memory_budget_gib(t: TrainingConfig) -> tuple[float, str]:
    """What this process may use on its GPU, and where the figure comes from: the free memory, or less where a
    per-process cap is set (cap_process_memory). What the process already holds counts as free. Reads only."""
    device = int(os.environ.get("LOCAL_RANK", "0"))
    free, total = (x / 2**30 for x in torch.cuda.mem_get_info(device))
    free = min(total, free + torch.cuda.memory_reserved(device) / 2**30)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total
    budget = min(free, cap)
    source = (f"training.memory_budget_gib {t.memory_budget_gib:g}" if t.memory_budget_gib is not None
              else f"per-process cap {cap:.1f} GiB" if cap < free else f"free {free:.1f} of {total:.1f} GiB")
    return budget, source


def plan_memory(cfg: Config, model_config, choice: DeviceChoice, budget: tuple[float, str],
                autocast: bool = False) -> TrainingConfig:
    """Micro-batch, accumulation and gradient checkpointing for this GPU, where the config leaves them unset.

    Keeps micro-batch x accumulation (the optimizer's batch). Prefers no checkpointing (torch.compile then switches
    on, about twice the tokens/s: docs/PERFORMANCE.md) with the largest micro-batch up to 16k tokens that fits, as
    long as it holds at least 8k tokens (DPO: a pair's two sequences count); else checkpointing with the largest
    that fits. Logged once with the estimate and the budget it was sized for."""
    t, lora, max_length, quantization = cfg.training, cfg.lora, cfg.data.max_length, cfg.quantization
    pairs = t.method == "dpo"
    tokens = max_length * (2 if pairs else 1)  # a micro-batch row's most tokens: DPO's rows are pairs
    budget_gib, source = budget
    free_keys = [k for k in PLANNED if f"training.{k}" not in cfg.explicit]
    if t.memory_plan == "off" or choice.device != "cuda" or not free_keys:
        return t
    if fsdp_enabled():
        # The estimates are for one unsharded process; FSDP was measured with configs/phi2-fsdp.yaml's values.
        logger.info("memory plan: off under FSDP; the config's micro-batch, accumulation and checkpointing apply")
        return t
    effective = t.per_device_train_batch_size * t.gradient_accumulation_steps
    micro_fixed = {"per_device_train_batch_size", "gradient_accumulation_steps"} - set(free_keys)
    sizes = [t.per_device_train_batch_size] if micro_fixed else \
        [m for m in (16, 8, 4, 2, 1) if effective % m == 0 and m * tokens <= MAX_MICRO_TOKENS] or [1]
    modes = [t.gradient_checkpointing] if "gradient_checkpointing" not in free_keys else [False, True]
    fp32 = choice.dtype == torch.float32
    room = PLAN_HEADROOM * budget_gib
    options = [(ckpt, m) for ckpt in modes for m in sizes
               if ckpt or micro_fixed or len(modes) == 1 or m * tokens >= MIN_UNCHECKPOINTED_TOKENS]

    def estimate(ckpt: bool, micro: int) -> float:
        # Checkpointing decides compilation, which decides whether auto's products are fp8 (their weight copy).
        compiled = resolve_compile(t.torch_compile, choice, ckpt, log=False)
        fp8 = resolve_products(quantization, choice, compiled, False)[0] == "fp8"
        return (estimate_peak_gib(model_config, lora, max_length, micro, ckpt, autocast, fp32, pairs)
                + (fp8_copy_gib(model_config) if fp8 else 0.0))

    fits = [(ckpt, m) for ckpt, m in options if estimate(ckpt, m) <= room]
    ckpt, micro = fits[0] if fits else options[-1]
    peak = estimate(ckpt, micro)
    planned = dataclasses.replace(t, per_device_train_batch_size=micro,
                                  gradient_accumulation_steps=max(1, effective // micro) if not micro_fixed
                                  else t.gradient_accumulation_steps, gradient_checkpointing=ckpt)
    line = (f"memory plan: micro-batch {planned.per_device_train_batch_size} x accumulation "
            f"{planned.gradient_accumulation_steps}, gradient checkpointing {'on' if ckpt else 'off'}: estimated "
            f"peak {peak:.1f} GiB for a budget of {budget_gib:.1f} GiB ({source}; the plan keeps "
            f"{100 * (1 - PLAN_HEADROOM):.0f}% spare); set {', '.join('training.' + k for k in free_keys)} to "
            "override")
    if fits:
        logger.info("%s", line)
    else:
        logger.warning("%s. Even this is estimated not to fit: expect running out of memory; lower data.max_length "
                       "or use configs/phi2-lowmem.yaml", line)
    return planned


def resumed_plan(t: TrainingConfig, explicit: set[str]) -> TrainingConfig | None:
    """On --resume: the micro-batch, accumulation and checkpointing the interrupted run used (its config.yaml in
    output_dir), for the keys the user leaves to the plan. The Trainer skips the batches already seen by counting
    micro-batches, so a plan that chose differently this time (another job now on the GPU) would resume at the wrong
    conversation. None when there is no readable saved config (a fresh plan is made)."""
    path = Path(t.output_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = load_config(path).training
    except ConfigError as e:
        logger.warning("--resume: %s unreadable (%s); planning memory afresh", path, e)
        return None
    keep = {k: getattr(saved, k) for k in PLANNED if f"training.{k}" not in explicit}
    if "training.optim" not in explicit:
        # The checkpoint's optimizer state is the saved optimizer's: another one would fail on it. A config saved
        # before auto was resolved into it says auto, which then meant paged 8-bit AdamW on a GPU.
        keep["optim"] = "paged_adamw_8bit" if saved.optim == "auto" else saved.optim
    logger.info("memory plan: resuming with the interrupted run's %s (from %s)",
                ", ".join(f"{k} {v}" for k, v in keep.items()), path)
    return dataclasses.replace(t, **keep)


@dataclasses.dataclass
class TrainingPlan:
    """Every choice the GPU and the config make for a run, made once before the model loads (decide_training),
    logged once, kept in run.json and passed down; the same on every process of a multi-process run."""
    training: TrainingConfig         # with the memory plan's micro-batch, accumulation, checkpointing; the optimizer
    model_config: object             # the base's config, read once
    attention: str
    autocast: bool
    compiled: bool
    products: str                    # how the frozen 4-bit layers multiply: "fp8" or "dequantized"
    fp8_both_layouts: bool           # fp8 products: both layouts of each weight kept (no transposes in the backward)
    budget: tuple[float, str] | None  # the GPU memory the plan sized for, and where it comes from; None on the CPU

    def record(self) -> dict:
        """What run.json keeps of the plan."""
        t = self.training
        return {"attention": self.attention, "autocast": self.autocast, "compiled": self.compiled,
                "products": self.products, "fp8_both_layouts": self.fp8_both_layouts if self.products == "fp8"
                else None, "micro_batch": t.per_device_train_batch_size,
                "accumulation": t.gradient_accumulation_steps, "gradient_checkpointing": t.gradient_checkpointing,
                "optimizer": t.optim, "budget_gib": None if self.budget is None else round(self.budget[0], 2),
                "budget_source": None if self.budget is None else self.budget[1]}


def shared_budget(budget: float, source: str) -> tuple[float, str]:
    """The smallest budget of all processes of a multi-process run, for every one of them. Each process reads its
    own GPU's free memory; another job on one GPU gives that one less, and processes that planned differently
    (micro-batch, accumulation, checkpointing) would no longer meet at the same gradient syncs: the run would hang
    or desync. One process alone: its own budget."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return budget, source
    state = PartialState()  # the process group accelerate launch set up the environment for (the Trainer's too)
    smallest = torch.tensor([budget], dtype=torch.float64, device=state.device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    shared = float(smallest.item())
    return shared, (f"{source}; the smallest of the {world} processes' budgets" if shared >= budget
                    else f"the smallest of the {world} processes' budgets, another process's; this one's: {source}")


def decide_training(cfg: Config, choice: DeviceChoice, resume: bool = False) -> TrainingPlan:
    """The plan this GPU gets, decided once: precision, the memory plan (on --resume the interrupted run's; with
    several processes, for the smallest budget among them), the optimizer, compilation (which follows from
    checkpointing), the attention kernel and how the frozen 4-bit layers multiply; each choice logged once, with
    its reason."""
    t = cfg.training
    if t.method == "dpo":
        # TRL batches each pair's chosen and rejected answers padded, not packed. Their lengths change with every
        # batch, so a compiled graph would recompile per shape: auto leaves compilation off (`on` still tries it).
        t = dataclasses.replace(t, packing=False, torch_compile="off" if t.torch_compile == "auto" else t.torch_compile)
        cfg = dataclasses.replace(cfg, training=t)
        logger.info("DPO: pairs padded per batch, not packed; torch.compile %s", t.torch_compile)
    model_config = load_model_config(cfg.model)
    check_context(model_config, cfg.data.max_length)
    autocast = resolve_autocast(t.autocast, choice)
    budget = None
    if choice.device == "cuda":
        cap_process_memory(t)
        budget = shared_budget(*memory_budget_gib(t))
        planned = dataclasses.replace(cfg, training=t)
        t = (resume and resumed_plan(t, cfg.explicit)) or plan_memory(planned, model_config, choice, budget, autocast)
    t = dataclasses.replace(t, optim=resolve_optim(t.optim, choice, t.gradient_checkpointing))
    if cfg.training.optim == "auto":
        logger.info("optimizer: %s (training.optim auto: %s)", t.optim, OPTIM_REASONS[t.optim])
    compiled = resolve_compile(t.torch_compile, choice, t.gradient_checkpointing)
    attention = resolve_attention(cfg.model.attn_implementation, choice, t.packing, compiled)
    products, products_why = resolve_products(cfg.quantization, choice, compiled, fsdp_enabled())
    both, layouts_why = fp8_layouts(dataclasses.replace(cfg, training=t), model_config, choice, autocast, budget)
    logger.info("base %s: quantization %s, attention %s, %s; products %s (%s)%s", cfg.model.name_or_path,
                cfg.quantization.mode, attention, "bf16 autocast (fp32 norms, embeddings, residual)" if autocast
                else f"{choice.name} throughout", products, products_why,
                f"; fp8 {'both layouts of each weight' if both else 'one layout, transposed in each backward'} "
                f"({layouts_why})" if products == "fp8" else "")
    return TrainingPlan(t, model_config, attention, autocast, compiled, products, both, budget)


OPTIM_REASONS = {
    "adamw_torch_fused": "a GPU without gradient checkpointing has memory to spare, and fused AdamW lets the host "
                         "queue the next step (bitsandbytes' 8-bit AdamW waits for the GPU after each parameter's "
                         "update, measured slower: docs/PERFORMANCE.md)",
    "paged_adamw_8bit": "gradient checkpointing means memory is tight: 8-bit states, paged out under pressure",
    "adamw_torch": "the CPU",
}


def resolve_optim(name: str, choice: DeviceChoice, checkpointing: bool) -> str:
    if name == "auto":
        if choice.device != "cuda":
            return "adamw_torch"
        return "paged_adamw_8bit" if checkpointing else "adamw_torch_fused"
    if choice.device == "cpu" and ("paged" in name or "8bit" in name):
        raise ValueError(f"training.optim {name!r} needs a CUDA GPU; use adamw_torch (or auto) on the CPU")
    return name

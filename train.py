"""Fine-tune Phi-2 on oasst1 with QLoRA (4-bit NF4 base + LoRA adapters) through trl's SFTTrainer.

    python train.py                                   # the real job: microsoft/phi-2 + OpenAssistant/oasst1 (GPU, Hub)
    python train.py --config configs/phi2-oasst1.yaml # the same, from the preset file
    python train.py --config configs/smoke.yaml       # offline smoke run: tiny Phi model, bundled data, CPU, ~1 min
    python train.py --config configs/smoke.yaml --resume   # continue from the newest complete checkpoint
    accelerate launch --num_processes 2 train.py --config ...   # data-parallel on 2 GPUs (README, 'Several GPUs')
    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml train.py --config configs/phi2-fsdp.yaml  # FSDP2

Writes <training.output_dir>/checkpoint-<step>/ during training and <training.output_dir>/final/ at the end
(adapter, tokenizer, resolved config.yaml, data_stats.json, loss curve, model card). Ctrl-C or SIGTERM saves a
checkpoint and exits; `--resume` continues from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import prepare_model_for_kbit_training
from transformers import ProgressCallback
from trl import SFTConfig, SFTTrainer

import preferences
import report_utils
from adapter_utils import PEFT_OLD_NAME_WARNING, build_lora_config, check_target_modules, log_trainable_parameters
from checkpoints import newest_complete_checkpoint, save_fsdp_adapter
from config import Config, DataConfig, QuantizationConfig, TrainingConfig, parse_config, save_config
from data_utils import DataError, load_conversations, log_stats, tokenize_conversations
from model_utils import DeviceChoice, ModelLoadError, decide_device_dtype, fsdp_enabled, load_model, load_tokenizer
from quantization_utils import build_bnb_config, products_used, use_fp8_products
from training_callbacks import CompactLog, Guard, PhaseClock, TrainModeAfterEvaluation
from training_plan import TrainingPlan, decide_training

logger = logging.getLogger("train")

FINAL_DIR = "final"


PINNED = ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")  # torch: the GPU image's may differ


class LibraryTooOld(RuntimeError):
    """A library train.py builds on is older than requirements.txt pins."""


def check_libraries(requirements: Path = Path(__file__).resolve().parent / "requirements.txt") -> None:
    """Stop before anything loads when a library is older than its pin: an older transformers or trl lacks arguments
    train.py passes, and would fail only after the data and the model have loaded. Newer versions pass."""
    from packaging.version import Version
    if not requirements.is_file():
        return
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", requirements.read_text(), re.M))
    old = []
    for name in PINNED:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an import error will name it
        if name in pins and Version(have) < Version(pins[name]):
            old.append(f"{name} {have} (this repo is tested with {pins[name]})")
    if old:
        raise LibraryTooOld(f"older libraries than requirements.txt pins: {', '.join(old)}; install the pinned "
                            "versions: pip install -r requirements.txt")


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if main_process else logging.WARNING, force=True)
    import datasets
    import transformers
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=PEFT_OLD_NAME_WARNING, category=FutureWarning)  # (adapter_utils)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def prepare_data(cfg: DataConfig, tokenizer):
    """Conversations -> token ids + labels for both splits; fails before any model is loaded."""
    data = load_conversations(cfg)
    train = tokenize_conversations(data.splits["train"], tokenizer, cfg.max_length, "train", data.stats)
    val = tokenize_conversations(data.splits["validation"], tokenizer, cfg.max_length, "validation", data.stats)
    log_stats(data.stats)
    if len(train) == 0:
        raise DataError(f"{cfg.dataset}: every training conversation is longer than data.max_length="
                        f"{cfg.max_length} even after cutting (counts: {data.stats['train']}); raise data.max_length")
    return train, (val if len(val) else None), data.stats


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------

# Where accelerate 1.15 applies FSDP: on accelerators only (on the CPU its plugin refuses to start).
FSDP_DEVICES = ("cuda",)


def check_fsdp(q: QuantizationConfig, choice: DeviceChoice) -> None:
    """Under an FSDP launch: the setup this repo runs (FSDP2 on GPUs, 4-bit weights in a float dtype), or every
    reason it is not, before any data or model is loaded."""
    if not fsdp_enabled():
        return
    problems = []
    if choice.device not in FSDP_DEVICES:
        problems.append("FSDP runs on CUDA GPUs only (accelerate shards on accelerators, not on the CPU); without "
                        "GPUs launch with configs/accelerate/ddp.yaml (--multi_gpu), or drop accelerate launch")
    if os.environ.get("FSDP_VERSION", "1") != "2":
        problems.append("fsdp_version 1 is refused: with the pinned accelerate/peft its sharded checkpoints hold no "
                        "adapter weights, so --resume would restart the adapter; use fsdp_version: 2 "
                        "(configs/accelerate/fsdp_qlora.yaml)")
    if q.mode in ("nf4", "fp4") and q.storage != "compute":
        problems.append("FSDP can only shard 4-bit weights stored in a float dtype: set quantization.storage: "
                        "compute (configs/phi2-fsdp.yaml does)")
    if problems:
        raise ValueError("FSDP: " + "; ".join(problems))


def build_model(cfg: Config, choice: DeviceChoice, plan: TrainingPlan):
    """Quantize -> prepare for k-bit training -> check adapter targets (peft wraps it inside SFTTrainer), as the plan
    says (attention kernel, autocast, how the frozen layers multiply)."""
    bnb = build_bnb_config(cfg.quantization, choice.dtype)
    attn, autocast = plan.attention, plan.autocast
    logger.info("loading the base %s", cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, cfg.model, choice.dtype, choice.device, bnb, attn)
    if bnb is not None and (autocast or choice.dtype == torch.float32):
        # Gradient checkpointing is switched on by the Trainer (non-reentrant); here only the k-bit preparation:
        # frozen base, every weight that is not 4-bit in fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            # bitsandbytes casts a 4-bit layer's bias to the compute dtype in its first forward by assigning
            # `.data`, which torch.compile cannot trace (a graph break and a recompile per layer shape): cast first.
            if getattr(getattr(module, "weight", None), "quant_state", None) is not None and module.bias is not None:
                module.bias.data = module.bias.data.to(choice.dtype)
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen; peft adds the trainable adapters
    if plan.products == "fp8":
        logger.info("fp8 products: %d frozen 4-bit layers", use_fp8_products(model, plan.fp8_both_layouts))
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    check_target_modules(model, cfg.lora.target_modules)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------

def trainer_arguments(t: TrainingConfig, choice: DeviceChoice, compiled: bool, has_eval: bool, autocast: bool
                      ) -> dict[str, Any]:
    """The Trainer arguments every stage shares (SFT's SFTConfig, DPO's DPOConfig): the plan's batch, optimizer,
    precision, checkpoints, logging and evaluation."""
    eval_strategy = "steps" if has_eval and t.eval_steps > 0 else "no"
    return dict(
        output_dir=t.output_dir,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,  # resolved in the plan
        bf16=autocast,  # accelerate's bf16 mixed precision is autocast; plain bf16 needs none
        fp16=False,
        use_cpu=choice.device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        torch_compile=compiled,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps if eval_strategy == "steps" else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        # The batch goes to the GPU from pinned memory without the host waiting for the GPU to finish the last step
        # (a blocking copy synchronizes the stream), so the host can queue the next step while the GPU runs this one.
        accelerator_config={"non_blocking": choice.device == "cuda"},
        report_to=[r for r in t.report_to if r != "none"] or "none",
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        ddp_find_unused_parameters=False,
        # DDP broadcasts every module buffer from rank 0 before each forward. Here the buffers are the frozen
        # layers' fp8 copies (quantization_utils, up to 5 GB) and rotary tables, the same on every rank by
        # construction: the broadcast moved gigabytes a step for nothing.
        ddp_broadcast_buffers=False,
        save_only_model=False,
    )


def build_sft_config(t: TrainingConfig, max_length: int, choice: DeviceChoice, compiled: bool,
                     has_eval: bool, autocast: bool = False) -> SFTConfig:
    return SFTConfig(
        **trainer_arguments(t, choice, compiled, has_eval, autocast),
        # A packed micro-batch is flattened to one row whose length varies; padding it to a fixed size gives the
        # compiled graph one shape instead of a recompile per length.
        pad_to_multiple_of=t.per_device_train_batch_size * max_length if compiled and t.packing else None,
        max_length=max_length,
        packing=t.packing,
        packing_strategy="bfd",
    )


class TrainingOutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message names the knobs."""


class SFTTrainerMetricsOnDevice(SFTTrainer):
    """trl's SFTTrainer with its per-micro-batch metrics kept on the GPU until a log line reads them (and, under
    FSDP, the gathered adapter in every checkpoint: save_model).

    trl 1.16's `compute_loss` reads entropy, token accuracy and the token count back to the host after every forward
    (`.item()`, `if num_valid > 0`): the host waits there for the GPU, so the backward can only be queued once the
    forward has finished, and nothing of the next step is queued while the backward runs. Here the loss is trl's
    (the same formula, over the same fused LM head outputs), the metrics are the same per-micro-batch values averaged
    the same way, but they stay tensors until `log`, which reads them all at once every `logging_steps`. Any
    loss this formula does not cover (a custom `compute_loss_func`, label smoothing, DFT, an MoE auxiliary loss,
    sequence parallelism, `return_outputs`) goes through trl's own `compute_loss` unchanged.

    It relies on trl 1.16's private `_metrics`, `_total_train_tokens` and `_tp_size` (there is no public hook for the
    metrics): tests/test_train.py::test_metrics_kept_on_the_device_log_what_trl_logs trains with this class and with
    trl's own and compares every logged value, so a trl that changes them fails there, not silently in a run."""

    _pending_tokens: torch.Tensor | None = None  # tokens counted on the device since the last log line

    def _plain_nll(self, return_outputs: bool) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return not (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                    or self.aux_loss_enabled or self.args.loss_type != "nll"
                    or (parallelism is not None and parallelism.sp_enabled))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_nll(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        # log_probs: (rows, tokens - 1), zero where the label is -100
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        gather, metrics = self.accelerator.gather_for_metrics, self._metrics[mode]
        # With no valid position, the sums are zero too: clamping gives trl's 0.0 without asking the GPU
        num_valid = gather(outputs.label_mask.sum()).sum().clamp(min=1)
        metrics["entropy"].append(gather(outputs.entropy.detach().sum()).sum() / num_valid)
        metrics["mean_token_accuracy"].append(gather(outputs.is_top1.sum()).sum() / num_valid)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:  # padding-free: one packed row, every position a token
                local = inputs["position_ids"].size(1)
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            if isinstance(local, int) and self.accelerator.num_processes == 1:
                self._total_train_tokens += local // self._tp_size
            else:
                # torch.full, not torch.tensor: a host value copied to the GPU would wait for it
                local = local if isinstance(local, torch.Tensor) else torch.full((), local, device=self.args.device)
                counted = gather(local).sum() // self._tp_size
                self._pending_tokens = counted if self._pending_tokens is None else self._pending_tokens + counted
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        tensors = [(key, i) for key, values in metrics.items() for i, v in enumerate(values)
                   if isinstance(v, torch.Tensor)]
        if tensors or self._pending_tokens is not None:
            read = [metrics[key][i].double() for key, i in tensors]  # float64: token counts stay exact
            if self._pending_tokens is not None:
                read.append(self._pending_tokens.double())
            values = torch.stack(read).tolist()  # one wait for every metric of the logging window
            if self._pending_tokens is not None:
                self._total_train_tokens += int(values.pop())
                self._pending_tokens = None
                if "num_tokens" in metrics:
                    metrics["num_tokens"] = [self._total_train_tokens]
            for (key, i), value in zip(tensors, values):
                metrics[key][i] = value
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP, a checkpoint also gets the adapter gathered from the shards, as on one GPU (inference.py and
        evaluate.py load it; --resume's completeness check reads it). It is written here, the first thing the Trainer
        saves into a checkpoint, before the optimizer state and before it deletes older checkpoints
        (save_total_limit); written after the deletion (an on_save callback), a kill in between left no complete
        checkpoint with save_total_limit 1."""
        super().save_model(output_dir, _internal_call)
        if _internal_call and self.is_fsdp_enabled:
            save_fsdp_adapter(self.model, self.processing_class, Path(output_dir), self.is_world_process_zero())


def build_trainer(cfg: Config, model, tokenizer, train_ds, eval_ds, choice: DeviceChoice,
                  plan: TrainingPlan) -> SFTTrainer:
    t, compiled = plan.training, plan.compiled
    args = build_sft_config(t, cfg.data.max_length, choice, compiled, has_eval=eval_ds is not None,
                            autocast=plan.autocast)
    if compiled:
        # Regional compilation: accelerate compiles each repeated block (Phi's 32 decoder layers share one compiled
        # graph) and the rest separately. transformers' arguments have no switch for it; accelerate reads this
        # variable when the Trainer builds its accelerator (it is what `accelerate config` writes).
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = str(t.compile_scope == "regions")
        # Dropout in compiled layers. Inductor draws one Philox number per element inside its fused kernels (one at
        # a time in a reduction kernel such as the layer norm whose output feeds q/k/v/fc1); ATen's dropout kernel
        # draws four at once. With the adapter's dropout ATen's is faster; with only Phi's residual dropout, fused
        # into the residual add, inductor's is (docs/PERFORMANCE.md, issue 17's ninth session).
        from torch._inductor import config as inductor_config
        inductor_config.fallback_random = cfg.lora.dropout > 0
        # `accelerate launch` exports ACCELERATE_DYNAMO_USE_DYNAMIC=False unless given --dynamo_use_dynamic, and
        # accelerate then compiles with dynamic=False, which turns off dynamo's automatic dynamic shapes: each new
        # packed-conversation count (varlen attention's cu_seq_lens) compiled the layers anew until dynamo's limit
        # of 8, after which they ran uncompiled (two GPUs together were slower than one: docs/PERFORMANCE.md).
        # Without the variable (a plain `python train.py`) dynamo compiles static first and
        # makes dynamic what changes, once.
        os.environ.pop("ACCELERATE_DYNAMO_USE_DYNAMIC", None)
        logger.info("dropout in compiled layers: %s", "ATen's kernels (adapter dropout %g)" % cfg.lora.dropout
                    if cfg.lora.dropout > 0 else "inductor's, fused (no adapter dropout)")
    trainer = SFTTrainerMetricsOnDevice(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                       processing_class=tokenizer, peft_config=build_lora_config(cfg.lora))
    finish_trainer(trainer, choice, "sequences",
                   " (packed sequences of up to %d tokens)" % cfg.data.max_length if t.packing else "")
    return trainer


def finish_trainer(trainer, choice: DeviceChoice, rows: str, note: str = "") -> None:
    """What every stage's trainer gets: the adapter in the compute dtype, the compact log, the guard (signals, NaN),
    training mode after evaluation; the effective batch logged (rows: what a micro-batch holds)."""
    args, world = trainer.args, trainer.args.world_size
    logger.info("effective batch: %d %s/step = %d micro-batch x %d accumulation x %d process(es)%s",
                args.per_device_train_batch_size * args.gradient_accumulation_steps * world, rows,
                args.per_device_train_batch_size, args.gradient_accumulation_steps, world, note)
    if choice.dtype == torch.float32:
        # trl stores QLoRA adapters in bf16 (QLoRA paper); with fp32 compute (CPU, GPUs without bf16) keep them
        # fp32 so every matmul of the step runs in one dtype.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactLog(choice.device))
    trainer.add_callback(Guard())
    trainer.add_callback(TrainModeAfterEvaluation())
    if trainer.is_world_process_zero():
        log_trainable_parameters(trainer.model)


# ----------------------------------------------------------------------------------------------------------------
# The adapter and its records
# ----------------------------------------------------------------------------------------------------------------

def save_final(trainer: SFTTrainer, cfg: Config, stats: dict, choice: DeviceChoice,
               clock: PhaseClock | None = None, plan: TrainingPlan | None = None) -> Path:
    """Adapter, tokenizer, config, data counts, loss curve and model card, swapped into place atomically."""
    out = Path(cfg.training.output_dir)
    final, tmp = out / FINAL_DIR, out / f"{FINAL_DIR}.tmp"
    main_process = trainer.is_world_process_zero()
    # Only the main process prepares and swaps the folder; the barriers keep another process from deleting it
    # mid-write, and every process returns once final/ is complete.
    if main_process and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.model.base_model.model.config.use_cache = True  # inference wants the cache back
    if trainer.is_fsdp_enabled:
        save_fsdp_adapter(trainer.model, trainer.processing_class, tmp, main_process)
    else:
        trainer.save_model(str(tmp))  # the main process writes
        if main_process and (tmp / "ref").is_dir():
            shutil.rmtree(tmp / "ref")  # DPO: TRL's frozen copy of the SFT adapter (the reference), not the result
    if not main_process:
        trainer.accelerator.wait_for_everyone()
        return final
    save_config(cfg, tmp / "config.yaml")
    (tmp / "data_stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    history = trainer.state.log_history
    (tmp / "log_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
    run = {"compute": choice.reason, "products": products_used(trainer.model)}
    if plan is not None:
        run["plan"] = plan.record()
    if clock is not None:
        clock.mark("saved")  # the adapter and tokenizer are written; the rest is small records
        run["timing"] = clock.summary()
        logger.info("time to adapter: %s", json.dumps(run["timing"]))
    (tmp / "run.json").write_text(json.dumps(run), encoding="utf-8")
    report_utils.write_loss_plot(history, tmp / "loss.png")
    report_utils.write_model_card(tmp / "README.md", cfg, stats, history, choice.reason, products=run["products"])
    if final.exists():
        old = out / f"{FINAL_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    trainer.accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------

def final_evaluation(trainer: SFTTrainer) -> None:
    """Validation loss at the last step, unless the schedule already evaluated there (training.eval_steps: 0 means
    only here). Logged like the others, so the loss curve and the model card show it."""
    if trainer.eval_dataset is None:
        return
    step = trainer.state.global_step
    if any(h.get("step") == step and "eval_loss" in h for h in trainer.state.log_history):
        return
    trainer.evaluate()


def run_training(trainer: SFTTrainer, resume: bool, output_dir: str) -> Guard:
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Guard))
    guard.install_signal_handlers()
    checkpoint = newest_complete_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", output_dir)
    elif checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as e:
        raise TrainingOutOfMemory(
            "out of GPU memory. Lower training.per_device_train_batch_size (and raise "
            "training.gradient_accumulation_steps to keep the effective batch), lower data.max_length, set "
            "training.gradient_checkpointing true, or use configs/phi2-lowmem.yaml. Checkpoints already written "
            f"in {output_dir} are intact; continue with --resume") from e
    return guard


# Bad input and environment problems whose messages say what to fix; anything else keeps its traceback.
USER_ERRORS = (ValueError, ModelLoadError, TrainingOutOfMemory, LibraryTooOld)


def add_train_arguments(parser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in training.output_dir")


def leave_process_group() -> None:
    """Ends this process's part in a distributed run (accelerate launch, torchrun) while Python is still whole.

    Left to interpreter exit, gloo's worker threads can still hold work as Python tears down and the process dies
    with SIGABRT ("terminate called without an active exception") after the adapter was saved, and the launcher
    then reports the whole run as failed (pytorch/pytorch#190489)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        return fine_tune(argv)
    finally:
        leave_process_group()


def end_process(code: int) -> None:
    """Exits with `code`. A rank of a distributed run (WORLD_SIZE > 1), its work saved and its process group left,
    skips the interpreter's teardown: there, a rank of a two-process FSDP run that had left its group could still die
    with SIGABRT ("terminate called without an active exception") after the adapter was saved, and the launcher
    failed a run that had succeeded (seen in CI; gloo's threads outlive destroy_process_group while anything still
    holds the group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def fine_tune(argv: list[str] | None) -> int:
    cfg, args = parse_config(argv, __doc__, extra=add_train_arguments)
    setup_logging(main_process=int(os.environ.get("RANK", "0")) == 0)  # set by accelerate launch / torchrun
    clock = PhaseClock()
    try:
        check_libraries()
        if cfg.training.method == "dpo":
            cfg.lora = preferences.sft_adapter_lora(cfg)
        choice = decide_device_dtype(cfg.model.dtype)
        check_fsdp(cfg.quantization, choice)
        plan = decide_training(cfg, choice, resume=args.resume)
        cfg.training = plan.training
        logger.info("compute: %s %s (%s); torch.compile %s", choice.device, choice.name, choice.reason,
                    f"on ({cfg.training.compile_scope})" if plan.compiled else "off")
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision,
                                   cfg.model.trust_remote_code)
        dpo = cfg.training.method == "dpo"
        if dpo:
            train_ds, eval_ds, stats = preferences.prepare_pairs(cfg, tokenizer)
        else:
            train_ds, eval_ds, stats = prepare_data(cfg.data, tokenizer)
        clock.mark("data")
        model = build_model(cfg, choice, plan)
        clock.mark("model")
        if dpo:
            arguments = trainer_arguments(plan.training, choice, plan.compiled, eval_ds is not None, plan.autocast)
            trainer = preferences.build_dpo_trainer(cfg, model, tokenizer, train_ds, eval_ds, arguments)
            finish_trainer(trainer, choice, "pairs", " (a chosen and a rejected sequence each)")
        else:
            trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, choice, plan)
        trainer.add_callback(clock)
        clock.mark("trainer")
        if trainer.is_world_process_zero():
            save_config(cfg, Path(cfg.training.output_dir) / "config.yaml")
        guard = run_training(trainer, args.resume, cfg.training.output_dir)
    except USER_ERRORS as e:
        logger.error("%s", e)
        return 1
    if guard.diverged:
        last = newest_complete_checkpoint(cfg.training.output_dir)
        logger.error("training stopped: %s. Likely cause: a learning rate too high for this batch size (try "
                     "training.learning_rate %.1e and --resume, or start over). Last good checkpoint: %s",
                     guard.diverged, cfg.training.learning_rate / 4, last or "none")
        return 3
    if guard.interrupted:
        command = " ".join(a for a in sys.argv if a != "--resume")
        logger.warning("stopped by %s; checkpoint saved in %s. Continue with: python %s --resume",
                       guard.interrupted, cfg.training.output_dir, command)
        return 130
    final_evaluation(trainer)
    clock.mark("final_eval")
    final = save_final(trainer, cfg, stats, choice, clock, plan)
    if trainer.is_world_process_zero():
        logger.info("adapter saved to %s (chat with: python inference.py --config <same config> --chat)", final)
    return 0


if __name__ == "__main__":
    end_process(main())

"""Training reports written next to the adapter: the loss curve (PNG) and the model card (README.md).

Everything here reads the resolved config, the data counts and the Trainer's log history; nothing from the
training machine's environment (no absolute paths, no tokens) goes into the card.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from config import Config  # noqa: E402
from data_utils import ASSISTANT, HUMAN  # noqa: E402

logger = logging.getLogger(__name__)


def loss_points(history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    return train, evals


def write_loss_plot(history: list[dict[str, Any]], path: str | Path) -> Path:
    train, evals = loss_points(history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss on answer tokens (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _public(value: str) -> str:
    """Absolute local paths are reduced to their last component (the card is meant to be shared)."""
    return Path(value).name if value.startswith("/") else value


def write_model_card(path: str | Path, cfg: Config, stats: dict[str, Any], history: list[dict[str, Any]],
                     compute: str, eval_metrics: dict[str, Any] | None = None, products: str | None = None) -> Path:
    train, evals = loss_points(history)
    dpo = cfg.training.method == "dpo"
    pref = cfg.preference
    lines = [
        "---", "library_name: peft", f"base_model: {_public(cfg.model.name_or_path)}",
        f"tags: [qlora, lora, trl, {cfg.training.method}]", "---", "",
        f"# QLoRA adapter for {_public(cfg.model.name_or_path)}", "",
        f"- Base model: `{_public(cfg.model.name_or_path)}` (revision `{cfg.model.revision or 'main'}`)",
        f"- Data: `{_public(cfg.data.dataset)}`; split: {stats.get('split', '?')}",
        f"- Quantization: {cfg.quantization.mode} (double quant {cfg.quantization.double_quant}); compute: {compute}",
        *([f"- Products of the frozen base: {products}"] if products else []),
        f"- LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, "
        f"targets {', '.join(cfg.lora.target_modules)}",
        "", "## Template", "",
        f"`{HUMAN} {{question}} {ASSISTANT} {{answer}}<eos>`, repeated per turn. "
        + (f"DPO (loss {pref.loss_type}, beta {pref.beta}) on preference pairs: a prompt in this template, the "
           f"chosen and the rejected answer each with its EOS; continued from the SFT adapter "
           f"`{_public(pref.sft_adapter or '')}`, also the reference." if dpo
           else "Loss only on answers and their EOS."),
        "", "## Data counts (kept and skipped, by reason)", "",
    ]
    for split in ("train", "validation"):
        if isinstance(stats.get(split), dict):
            lines += [f"**{split}**", "", "| count | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in stats[split].items()]
            lines.append("")
    t = cfg.training
    lines += ["## Hyperparameters", "", "| key | value |", "| --- | --- |"]
    for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "packing", "seed"):
        lines.append(f"| {key} | {getattr(t, key)} |")
    lines.append(f"| max_length | {cfg.data.max_length} |")
    lines += ["", "## Results", ""]
    lines.append(f"- Final train loss: {train[-1][1]:.4f} (step {train[-1][0]})" if train else "- No train loss logged")
    lines.append(f"- Final eval loss: {evals[-1][1]:.4f} (step {evals[-1][0]})" if evals else "- No eval loss logged")
    if eval_metrics:
        lines += ["", "### evaluate.py", "", "| metric | base | fine-tuned |", "| --- | --- | --- |"]
        base, tuned = eval_metrics.get("base", {}), eval_metrics.get("finetuned", {})

        def fmt(v: Any) -> str:
            return f"{v:.4f}" if isinstance(v, float) else str(v) if v is not None else "-"

        for key in tuned:
            if isinstance(tuned[key], (int, float)):
                lines.append(f"| {key} | {fmt(base.get(key))} | {fmt(tuned[key])} |")
        pairs = eval_metrics.get("preference")
        if pairs:
            models = [m for m in ("base", "sft", "finetuned") if m in pairs]
            lines += ["", f"Held-out preference pairs (reference: {pairs['reference']}, beta {pairs['beta']}):", "",
                      "| metric | " + " | ".join(models) + " |", "|" + " --- |" * (len(models) + 1)]
            for key in ("pairs", "likelihood_accuracy", "reward_accuracy", "reward_margin"):
                lines.append(f"| {key} | " + " | ".join(fmt(pairs[m].get(key)) for m in models) + " |")
    lines += ["", "![loss curve](loss.png)", "",
              "## Intended use and limits", "",
              "A research/hobby assistant adapter. It inherits the base model's knowledge and biases and the data's "
              "style; it has had no safety tuning beyond what the data carries, can state wrong facts confidently, "
              "and should not be used for medical, legal or other high-stakes advice. Quality numbers above are "
              "measured only on the data named here.", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    return Path(path)

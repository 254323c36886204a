"""Preference pairs for DPO: from oasst1's rankings of sibling replies, or from data in TRL's preference format;
rendered in the repo's one chat template, split by conversation tree, every message counted.

The rule for oasst1 (every Phi-2/oasst1 recipe keeps only the top-ranked reply; the ranking is free preference
data). The trees are rebuilt as for supervised fine-tuning (data_utils.oasst_trees: the same messages dropped, for
the same counted reasons). Then, for every usable prompt that has replies:
  - a reply without a rank takes part in no pair (`unranked_reply`);
  - of the ranked replies the best-ranked (the lowest rank; file order between equals) is `chosen`, and each reply
    ranked strictly worse is `rejected` in one pair, best first, at most `max_pairs_per_prompt` of them (the rest:
    `beyond_cap`); a reply ranked equal to the best takes part in none (`tied_with_best`);
  - a prompt with fewer than two distinctly ranked replies gives no pair (`prompt_without_pair`; its ranked
    replies: `reply_without_pair`).
A pair's context is the conversation from the root down to its prompt (the prompt's ancestors: multi-turn, rendered
as the SFT data renders it, EOS after every earlier answer, template markers made inert); chosen and rejected are the
answer as SFT renders it, EOS included, so DPO keeps the stopping SFT taught. Every message read ends in exactly one
counted outcome (`messages_read` is their sum): a drop reason of data_utils, `prompt_paired`, `prompt_without_pair`,
`chosen`, `rejected`, `beyond_cap`, `tied_with_best`, `unranked_reply` or `reply_without_pair`; `pairs` counts the
pairs. The validation split goes by conversation tree, as for SFT (or is the source's own validation/test split),
so no tree is in both.

TRL's preference format is taken as it is: `prompt`/`chosen`/`rejected` as text (the prompt is one user message, the
answers assistant messages) or as messages (the prompt a conversation ending with the user; chosen and rejected one
assistant message each, or text). A row that is neither is skipped and counted (`bad_type`, `bad_turn_order`,
`empty_text`, `same_answer`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset, DatasetDict
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from adapter_utils import AdapterError, check_adapter_base, read_adapter_config
from config import Config, DataConfig, LoraSettings
from data_sources import DataError, read_source, validation_split
from data_utils import (ROLES, BadConversation, Message, _in_validation, _missing, _rank_key, detect_format,
                        normalize_chat, oasst_trees, render_text, turn_answer_text)

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _ranked(reply: dict) -> bool:
    rank = reply.get("rank")
    return isinstance(rank, (int, float)) and not isinstance(rank, bool) and rank == rank  # NaN: unranked


def _ancestors(message: dict, by_id: dict[str, dict]) -> list[dict]:
    """The conversation from the root down to `message`, inclusive (a tree: one path)."""
    path = [message]
    while not _missing(path[-1].get("parent_id")) and path[-1]["parent_id"] != "":
        path.append(by_id[path[-1]["parent_id"]])
    return path[::-1]


def rendered(context: list[Message], chosen: str, rejected: str, eos: str) -> dict[str, str]:
    """One pair in the template: the context's text up to ` ### Assistant:`, each answer as SFT renders it + EOS."""
    return {"prompt": render_text(context, eos), "chosen": turn_answer_text(chosen) + eos,
            "rejected": turn_answer_text(rejected) + eos}


def pairs_from_oasst(rows: Iterable[dict], counts: Counter, eos: str, max_pairs_per_prompt: int,
                     languages: list[str] | None = None) -> list[dict[str, Any]]:
    """Preference pairs by the rule in the module docstring: [{"prompt", "chosen", "rejected", "tree_id"}]."""
    by_id, children, roots = oasst_trees(rows, counts, languages)
    reachable, stack = [], list(roots)
    while stack:
        message = stack.pop()
        reachable.append(message)
        stack.extend(children.get(message["message_id"], []))
    pairs = []
    for prompt in sorted((m for m in reachable if m["role"] == "prompter"), key=lambda m: m["_order"]):
        replies = children.get(prompt["message_id"], [])
        counts["unranked_reply"] += sum(not _ranked(r) for r in replies)
        ranked = sorted((r for r in replies if _ranked(r)), key=_rank_key)
        worse = [r for r in ranked[1:] if r["rank"] > ranked[0]["rank"]] if ranked else []
        counts["tied_with_best"] += len(ranked) - 1 - len(worse) if ranked else 0
        if not worse:
            counts["prompt_without_pair"] += 1
            counts["reply_without_pair"] += 1 if ranked else 0
            continue
        used = worse[:max_pairs_per_prompt]
        counts.update(prompt_paired=1, chosen=1, rejected=len(used), beyond_cap=len(worse) - len(used),
                      pairs=len(used))
        thread = _ancestors(prompt, by_id)
        context = [{"role": ROLES[m["role"]], "content": m["text"].strip()} for m in thread]
        root = thread[0]
        tree = root.get("message_tree_id") if isinstance(root.get("message_tree_id"), str) else root["message_id"]
        for rejected in used:
            pairs.append({**rendered(context, ranked[0]["text"], rejected["text"], eos), "tree_id": tree})
    return pairs


def _answer(value: Any) -> str | None:
    """An answer in TRL's format: text, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and \
            value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    return None


def pairs_from_trl(rows: Iterable[dict], counts: Counter, eos: str) -> list[dict[str, Any]]:
    """Pairs from rows in TRL's preference format (module docstring), each row its own tree for the split."""
    pairs = []
    for number, row in enumerate(rows):
        counts["rows_read"] += 1
        prompt, chosen, rejected = row.get("prompt"), _answer(row.get("chosen")), _answer(row.get("rejected"))
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        try:
            context = normalize_chat(prompt, ends_with="user")
        except BadConversation as e:
            counts[e.reason] += 1
            continue
        if chosen is None or rejected is None:
            counts["bad_type"] += 1
        elif not chosen.strip() or not rejected.strip():
            counts["empty_text"] += 1
        elif chosen.strip() == rejected.strip():
            counts["same_answer"] += 1
        else:
            counts["pairs"] += 1
            pairs.append({**rendered(context, chosen, rejected, eos), "tree_id": f"row-{number}"})
    return pairs


@dataclass
class PreferenceData:
    splits: DatasetDict  # train and validation: prompt, chosen, rejected, tree_id
    stats: dict[str, Any]


def load_preferences(cfg: DataConfig, eos: str, max_pairs_per_prompt: int) -> PreferenceData:
    """Read the source (a local file or folder, or the Hub, as for SFT), build its pairs, split them by tree."""
    raw, read_counts = read_source(cfg)
    raw, own = validation_split(raw, cfg.dataset)
    stats: dict[str, Any] = {"source": cfg.dataset, "read": dict(read_counts)}
    per_split = {}
    for split, rows in raw.items():
        if not rows:
            raise DataError(f"{cfg.dataset} ({split}): no rows could be read")
        columns = set().union(*(r.keys() for r in rows[:1000]))
        counts: Counter = Counter()
        if set(PAIR_COLUMNS) <= columns:
            fmt, per_split[split] = "trl_preference", pairs_from_trl(rows, counts, eos)
        elif detect_format(columns) == "oasst":
            fmt = "oasst"
            per_split[split] = pairs_from_oasst(rows, counts, eos, max_pairs_per_prompt, cfg.languages)
        else:
            raise DataError(f"{cfg.dataset} ({split}): preference tuning needs oasst1's message trees (message_id, "
                            f"parent_id, text, role, rank) or TRL's prompt/chosen/rejected columns; found "
                            f"{', '.join(sorted(columns))}")
        stats[split] = {"format": fmt, **dict(sorted(counts.items()))}
    if own is None:
        train, validation = [], []
        for pair in per_split["train"]:
            (validation if _in_validation(pair["tree_id"], cfg.seed, cfg.validation_fraction) else train).append(pair)
        per_split = {"train": train, "validation": validation}
        stats["split"] = f"by tree id, {cfg.validation_fraction:.0%} held out, seed {cfg.seed}"
    else:
        stats["split"] = f"the source's own {own} split"
    if not per_split["train"]:
        raise DataError(f"{cfg.dataset}: no preference pairs for training ({stats.get('train')}); oasst1 needs "
                        "prompts with two or more ranked replies")
    for split, pairs in per_split.items():
        stats.setdefault(split, {})["pairs_used"] = len(pairs)
    empty = {column: [] for column in (*PAIR_COLUMNS, "tree_id")}
    splits = DatasetDict({s: Dataset.from_list(p) if p else Dataset.from_dict(empty) for s, p in per_split.items()})
    logger.info("preference pairs: %s", {s: stats[s] for s in per_split})
    return PreferenceData(splits, stats)


# ----------------------------------------------------------------------------------------------------------------
# Training (train.py with training.method dpo)
# ----------------------------------------------------------------------------------------------------------------

def sft_adapter_lora(cfg: Config) -> LoraSettings:
    """The shape of the SFT adapter DPO continues (preference.sft_adapter), after checking it is there and was
    trained on this base, before anything loads. It replaces the config's lora section, which sizes the memory plan
    and goes into the model card; a difference is logged."""
    adapter = Path(cfg.preference.sft_adapter)
    try:
        saved = read_adapter_config(adapter)
        check_adapter_base(adapter, cfg.model.name_or_path, saved)
    except AdapterError as e:
        raise AdapterError(f"preference.sft_adapter: {e}") from e
    lora = dataclasses.replace(cfg.lora, r=saved["r"], alpha=saved["lora_alpha"],
                               dropout=saved.get("lora_dropout", cfg.lora.dropout),
                               target_modules=sorted(saved["target_modules"]), bias=saved.get("bias", cfg.lora.bias))
    if lora != dataclasses.replace(cfg.lora, target_modules=sorted(cfg.lora.target_modules)):
        logger.info("lora: the SFT adapter's r=%d, alpha=%g, dropout=%g, targets %s (the config's lora section is not "
                    "used by DPO)", lora.r, lora.alpha, lora.dropout, ", ".join(lora.target_modules))
    return lora


def fitting(pairs: Dataset, tokenizer, max_length: int) -> Dataset:
    """The pairs whose prompt and longer answer fit max_length tokens. TRL would cut a longer one from its end (the
    answers first, to nothing after a long prompt) and train on what is left; it is left out instead, and counted by
    the caller."""
    if not len(pairs):
        return pairs
    prompts = pairs["prompt"]
    texts = [p + a for side in ("chosen", "rejected") for p, a in zip(prompts, pairs[side])]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    n = len(prompts)
    return pairs.select([i for i in range(n) if max(lengths[i], lengths[n + i]) <= max_length])


def prepare_pairs(cfg: Config, tokenizer) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """The pairs of both splits that fit data.max_length, as TRL's DPOTrainer takes them (prompt, chosen, rejected:
    text); the others counted (`longer_than_max_length`). Fails before any model is loaded."""
    data = load_preferences(cfg.data, tokenizer.eos_token, cfg.preference.max_pairs_per_prompt)
    splits = {}
    for split in ("train", "validation"):
        pairs = data.splits[split].remove_columns("tree_id")
        splits[split] = fitting(pairs, tokenizer, cfg.data.max_length)
        counts = data.stats.setdefault(split, {})
        counts["longer_than_max_length"] = len(pairs) - len(splits[split])
        counts["pairs_used"] = len(splits[split])
    if not len(splits["train"]):
        raise DataError(f"{cfg.data.dataset}: every training pair is longer than data.max_length="
                        f"{cfg.data.max_length} ({data.stats['train']}); raise data.max_length")
    logger.info("preference pairs that fit data.max_length=%d: %d for training, %d held out (%d and %d longer, left "
                "out)", cfg.data.max_length, len(splits["train"]), len(splits["validation"]),
                data.stats["train"]["longer_than_max_length"], data.stats["validation"]["longer_than_max_length"])
    return splits["train"], (splits["validation"] if len(splits["validation"]) else None), data.stats


def build_dpo_trainer(cfg: Config, model, tokenizer, train_ds: Dataset, eval_ds: Dataset | None,
                      arguments: dict[str, Any]) -> DPOTrainer:
    """TRL's DPOTrainer on the 4-bit base, continuing from the SFT adapter (preference.sft_adapter). TRL copies that
    adapter into a frozen second one, "ref", and computes the reference's log-probabilities with it: the reference
    is the SFT model, at the memory of one more adapter (Phi-2 with r=64 on six projections: ~190 MB in bf16) and
    one more forward pass a step, without a second copy of the base. arguments: train.trainer_arguments (the plan's
    batch, optimizer, precision, checkpoints), the same as SFT's."""
    adapter = Path(cfg.preference.sft_adapter)
    try:
        policy = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (RuntimeError, ValueError) as e:
        raise AdapterError(f"the SFT adapter {adapter} does not fit {cfg.model.name_or_path}: {e}") from e
    args = DPOConfig(**arguments, beta=cfg.preference.beta, loss_type=[cfg.preference.loss_type],
                     max_length=cfg.data.max_length)
    logger.info("DPO from %s (also the reference: a frozen copy of it), beta %g, loss %s", adapter,
                cfg.preference.beta, cfg.preference.loss_type)
    return DPOTrainer(model=policy, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer)

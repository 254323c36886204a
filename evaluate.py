"""Did fine-tuning work? Compare the base and the fine-tuned model on the held-out split.

    python evaluate.py --config configs/smoke.yaml                  # tiny smoke model, CPU, ~1 minute
    python evaluate.py --config configs/phi2-oasst1.yaml --num-prompts 300 --inference.dtype bf16   # real run, GPU
    python evaluate.py --config ... --merged merged/                # a --save-merged folder instead of the adapter
                                                                    # (--inference.model merged/ is the same)
    python evaluate.py --config ... --sample --seed 1               # sampled answers (generation.*), seeded

Reports, for both models, on the validation conversations in the training template:
  - answer loss / perplexity: mean NLL over answer tokens + their EOS only (exactly the training mask);
  - generation behaviour on N held-out prompts: stop rate (ended by EOS or the stop marker before max_new_tokens),
    fake-turn rate (the model wrote a `### Human:` turn itself), mean/median answer length, empty-answer rate;
  - side-by-side samples (prompt, reference, base answer, fine-tuned answer);
  - on held-out preference pairs (when the data has ranked replies, as oasst1 has; preferences.py), each model's
    log-likelihood of the chosen and the rejected answer: `likelihood_accuracy`, the share of pairs where the model
    finds the chosen answer more likely; and against a reference (the SFT adapter a DPO run started from, else the
    base), DPO's implicit reward r = beta * (log p_model(answer) - log p_reference(answer)): `reward_accuracy`, the
    share of pairs where r(chosen) > r(rejected), and `reward_margin`, the mean of r(chosen) - r(rejected).
For a DPO run (training.method dpo) the SFT adapter it started from is evaluated too: base, SFT and DPO side by
side.
Answers are greedy by default (temperature 0, the configured repetition penalty), so the same command gives the
same metrics; `--sample` uses generation.temperature/top_p/top_k, seeded by `--seed`. The report says which.
The models are evaluated one at a time (fine-tuned, freed, then base): evaluation needs the memory of one model.
Writes reports/eval-<name>.json and reports/eval-<name>.md, and adds the metrics to the adapter's model card (whose
hyper-parameters stay the training run's, read from the adapter's config.yaml).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import preferences
import report_utils
from adapter_utils import AdapterError, read_adapter_config
from answers import Reply
from config import Config, ConfigError, GenerationSettings, load_config, parse_config
from data_utils import DataError, Message, load_conversations, render_text, tokenize_conversations
from inference import (ChatModel, adapter_dir_for, load_chat_model, load_model_folder, resolve_device,
                       trained_base)
from model_utils import ModelLoadError

logger = logging.getLogger("evaluate")


@torch.inference_mode()
def answer_loss(model, dataset, pad_id: int, batch_size: int = 8, desc: str = "loss") -> tuple[float, int]:
    """Mean NLL (nats) over tokens whose label is not -100, i.e. answers + EOS; returns (loss, token count)."""
    total, count = 0.0, 0
    rows = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        batch = [dataset[i] for i in rows[start:start + batch_size]]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(b["input_ids"]) for b in batch])[:, None]).long()
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        # position t predicts token t+1: (B, T-1, vocab) against (B, T-1)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].to(model.device),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1), count


@torch.inference_mode()
def pair_log_likelihoods(model, tokenizer, pairs, batch_size: int = 8, desc: str = "pairs"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's log-likelihood (nats, summed over the answer's tokens and its EOS) of the chosen and of the
    rejected answer, tokenized as DPO trains on them (prompt + answer as one text). (pairs,) each."""
    out = {}
    prompts = tokenizer([p["prompt"] for p in pairs], add_special_tokens=False)["input_ids"]
    prompt_lengths = [len(ids) for ids in prompts]
    for side in ("chosen", "rejected"):
        fulls = tokenizer([p["prompt"] + p[side] for p in pairs], add_special_tokens=False)["input_ids"]
        rows = list(zip(fulls, prompt_lengths))
        scores = []
        for start in tqdm(range(0, len(rows), batch_size), desc=f"{desc}: {side}", leave=False):
            batch = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
            mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
            logp = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
            logp = logp[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None].to(model.device))[..., 0]  # (B, T-1)
            answer = torch.zeros_like(mask)
            for row, (full, prompt_len) in enumerate(batch):
                answer[row, prompt_len:len(full)] = 1
            scores.append((logp * answer[:, 1:].to(logp.device)).sum(-1).cpu())
        out[side] = torch.cat(scores) if scores else torch.zeros(0)
    return out["chosen"], out["rejected"]


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]
                       | None, beta: float) -> dict[str, float]:
    """likelihood_accuracy, and against the reference's log-likelihoods reward_accuracy and reward_margin (module
    docstring); the reference model itself has no reward (its r is 0 for every answer)."""
    metrics = {"pairs": len(chosen), "likelihood_accuracy": float((chosen > rejected).float().mean())}
    if reference is not None:
        margin = beta * ((chosen - reference[0]) - (rejected - reference[1]))
        metrics |= {"reward_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean())}
    return metrics


def held_out_pairs(cfg: Config, tokenizer) -> list[dict] | None:
    """The validation split's preference pairs (preferences.py), when the data has ranked replies; else None. Pairs
    whose prompt and longer answer exceed data.max_length are left out, as in training (preferences.fitting), and
    counted."""
    try:
        data = preferences.load_preferences(cfg.data, tokenizer.eos_token, cfg.preference.max_pairs_per_prompt)
    except DataError:
        return None
    pairs = data.splits["validation"]
    fit = list(preferences.fitting(pairs, tokenizer, cfg.data.max_length))
    if len(fit) < len(pairs):
        logger.info("preference pairs: %d of %d held out are longer than data.max_length %d, left out", len(pairs)
                    - len(fit), len(pairs), cfg.data.max_length)
    return fit or None


def prompts_and_references(conversations: list[list[Message]]) -> tuple[list[list[Message]], list[str]]:
    """Each held-out conversation becomes (everything before its last answer, that answer)."""
    prompts, refs = [], []
    for messages in conversations:
        prompts.append(messages[:-1])
        refs.append(messages[-1]["content"])
    return prompts, refs


def generation_metrics(replies: list[Reply], max_new_tokens: int) -> dict[str, float]:
    n = max(len(replies), 1)
    lengths = [r.new_tokens for r in replies]
    return {
        "stop_rate": sum(r.stop in ("eos", "marker") and r.new_tokens <= max_new_tokens for r in replies) / n,
        "eos_rate": sum(r.stop == "eos" for r in replies) / n,
        "fake_turn_rate": sum(r.stop == "marker" for r in replies) / n,
        "empty_rate": sum(not r.text for r in replies) / n,
        "mean_answer_tokens": statistics.fmean(lengths) if lengths else 0.0,
        "median_answer_tokens": statistics.median(lengths) if lengths else 0.0,
    }


def evaluate_model(model: ChatModel, dataset, prompts: list[list[Message]], gen: GenerationSettings,
                   batch_size: int, label: str, seed: int | None) -> tuple[dict[str, Any], list[Reply]]:
    loss, tokens = answer_loss(model.model, dataset, model.tokenizer.pad_token_id, batch_size, f"{label}: loss")
    replies = model.chat_batch(prompts, gen, batch_size, progress=f"{label}: generation", seed=seed)
    metrics = {"answer_loss": loss, "perplexity": float(torch.tensor(loss).exp()), "answer_tokens": tokens,
               "prompts": len(prompts), **generation_metrics(replies, gen.max_new_tokens)}
    return metrics, replies


def base_model_name(cfg: Config, merged_dir: str | None, allow_pickle: bool) -> str:
    """The base to compare with: the adapter's own base (as inference.py loads it), or the configured one for a
    --merged folder."""
    if merged_dir is not None:
        return cfg.model.name_or_path
    return trained_base(cfg, read_adapter_config(adapter_dir_for(cfg), allow_pickle=allow_pickle))


def load_base(cfg: Config, tokenizer, base_name: str) -> ChatModel:
    return load_model_folder(base_name, cfg, tokenizer)


def load_finetuned(cfg: Config, merged_dir: str | None, allow_pickle: bool) -> ChatModel:
    if merged_dir is None:
        return load_chat_model(cfg, allow_pickle=allow_pickle, warm_up=False)
    return load_model_folder(merged_dir, cfg)


def decoding(gen: GenerationSettings, sample: bool, seed: int) -> tuple[GenerationSettings, int | None, str]:
    """The settings the metrics are generated with, the seed, and how the report names them."""
    if not sample or gen.temperature == 0:
        return (dataclasses.replace(gen, temperature=0.0), None,
                f"greedy (temperature 0, repetition penalty {gen.repetition_penalty})")
    return gen, seed, (f"sampled (temperature {gen.temperature}, top_p {gen.top_p}, top_k {gen.top_k}, repetition "
                       f"penalty {gen.repetition_penalty}, seed {seed})")


def markdown_report(name: str, result: dict[str, Any]) -> str:
    base, tuned = result["base"], result["finetuned"]
    lines = [f"# Evaluation: {name}", "", f"Data: `{result['data']}`, {result['conversations']} held-out "
             f"conversations; generation on {tuned['prompts']} prompts, max_new_tokens {result['max_new_tokens']}, "
             f"decoding {result['decoding']}.", "",
             "| metric | base | fine-tuned | how to read it |", "| --- | --- | --- | --- |"]
    how = {"answer_loss": "lower is better (nats per answer token)", "perplexity": "lower is better",
           "stop_rate": "share of answers that ended on their own; want high",
           "eos_rate": "share ended by EOS (the trained stop)", "fake_turn_rate": "share where the model wrote a "
           "### Human: turn itself; want 0", "empty_rate": "share of empty answers; want 0",
           "mean_answer_tokens": "length of answers", "median_answer_tokens": "length of answers",
           "answer_tokens": "tokens scored", "prompts": "prompts generated"}
    for key in how:
        b, t = base.get(key, ""), tuned[key]
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {key} | {fmt(b) if b != '' else '-'} | {fmt(t)} | {how[key]} |")
    if "sft" in result:
        lines += ["", "The SFT adapter this DPO run started from:", "", "| metric | SFT |", "| --- | --- |"]
        lines += [f"| {key} | {result['sft'][key]:.4f} |" if isinstance(result["sft"][key], float)
                  else f"| {key} | {result['sft'][key]} |" for key in how]
    if "preference" in result:
        pref = result["preference"]
        models = [m for m in ("base", "sft", "finetuned") if m in pref]
        lines += ["", f"## Preference pairs (held out; reference: {pref['reference']}, beta {pref['beta']})", "",
                  "| metric | " + " | ".join(models) + " | how to read it |", "|" + " --- |" * (len(models) + 2)]
        for key, meaning in (("pairs", "held-out pairs"),
                             ("likelihood_accuracy", "share where the model finds the chosen answer more likely"),
                             ("reward_accuracy", "share where beta * log(p / p_reference) favours the chosen"),
                             ("reward_margin", "mean implicit reward of chosen minus rejected; want > 0")):
            cells = [pref[m].get(key) for m in models]
            lines.append(f"| {key} | " + " | ".join("-" if c is None else f"{c:.4f}" if isinstance(c, float)
                                                     else str(c) for c in cells) + f" | {meaning} |")
    lines += ["", "## Samples", ""]
    for s in result["samples"]:
        lines += [f"**Prompt:** {s['prompt']}", "", f"- reference: {s['reference']}", f"- base: {s['base']}",
                  f"- fine-tuned: {s['finetuned']}", ""]
    return "\n".join(lines)


def add_eval_arguments(parser) -> None:
    parser.add_argument("--name", help="report name (default: the output dir's name)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="held-out prompts to generate for (default 300 on GPU, 32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="generation/loss batch (default: what half the free GPU memory holds, at most 64; 8 CPU)")
    parser.add_argument("--samples", type=int, default=5, help="side-by-side samples in the report")
    parser.add_argument("--merged", help="evaluate a --save-merged folder instead of adapter + base")
    parser.add_argument("--no-base", action="store_true", help="skip the base model (faster)")
    parser.add_argument("--reports-dir", default="reports", help="where eval-<name>.json/.md go")
    parser.add_argument("--allow-pickle", action="store_true", help="accept a pickle-only (.bin) adapter")
    parser.add_argument("--sample", action="store_true",
                        help="sample answers with generation.temperature/top_p/top_k (default: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (each batch is seeded from it)")


def auto_batch_size(model: ChatModel) -> int:
    """Sequences per generation batch: on a GPU, as many full-context KV caches as half the free memory holds
    (the rest is for activations and logits), at most 64; 8 on the CPU."""
    if model.device.type != "cuda":
        return 8
    config = model.model.config
    bytes_per_token = 2 * config.num_hidden_layers * config.hidden_size * model.model.dtype.itemsize  # K and V
    free, _ = torch.cuda.mem_get_info(model.device)
    return max(1, min(64, int(free * 0.5 // (bytes_per_token * model.context_window))))


def run(cfg: Config, args) -> dict[str, Any]:
    on_gpu = resolve_device(cfg.inference.device) == "cuda"
    n_prompts = args.num_prompts or (300 if on_gpu else 32)
    data = load_conversations(cfg.data)  # bad data fails before any model is loaded
    val = data.splits["validation"]
    if len(val) == 0:
        raise DataError(f"{cfg.data.dataset}: no validation conversations to evaluate on")
    gen, seed, how = decoding(cfg.generation, args.sample, args.seed)
    logger.info("decoding for the metrics: %s", how)
    tuned = load_finetuned(cfg, args.merged, args.allow_pickle)
    batch_size = args.batch_size or auto_batch_size(tuned)
    logger.info("generation batch size %d%s", batch_size, "" if args.batch_size else " (auto; --batch-size sets it)")
    tokenizer, context_window = tuned.tokenizer, tuned.context_window
    dataset = tokenize_conversations(val, tokenizer, min(cfg.data.max_length, context_window), "validation",
                                     data.stats)
    prompts, refs = prompts_and_references(val["messages"][:n_prompts])
    result: dict[str, Any] = {"data": cfg.data.dataset, "conversations": len(val), "max_new_tokens": gen.max_new_tokens,
                              "decoding": how, "base": {}}
    pairs = held_out_pairs(cfg, tokenizer)
    likelihoods: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def measure(model: ChatModel, label: str, key: str) -> list[Reply]:
        """One model's metrics, then it is freed: one model in memory at a time (a 16 GB GPU cannot hold two fp32
        Phi-2 copies)."""
        result[key], replies = evaluate_model(model, dataset, prompts, gen, batch_size, label, seed)
        if pairs:
            likelihoods[key] = pair_log_likelihoods(model.model, tokenizer, pairs, batch_size, f"{label}: pairs")
        model.close()
        return replies

    tuned_replies = measure(tuned, "fine-tuned", "finetuned")
    del tuned
    if cfg.training.method == "dpo" and args.merged is None:  # the SFT adapter the DPO run started from
        sft_cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference,
                                                                         adapter=cfg.preference.sft_adapter))
        measure(load_chat_model(sft_cfg, allow_pickle=args.allow_pickle, warm_up=False), "sft", "sft")
    base_replies: list[Reply | None] = [None] * len(prompts)
    if not args.no_base:
        base = load_base(cfg, tokenizer, base_model_name(cfg, args.merged, args.allow_pickle))
        base_replies = measure(base, "base", "base")
    if pairs:
        reference = "sft" if "sft" in likelihoods else "base" if "base" in likelihoods else None
        result["preference"] = {"reference": reference, "beta": cfg.preference.beta, **{
            key: preference_metrics(*lp, likelihoods.get(reference) if key != reference else None,
                                    cfg.preference.beta) for key, lp in likelihoods.items()}}
    result["samples"] = [{"prompt": render_text(p), "reference": r, "finetuned": t.text,
                          "base": b.text if b is not None else "-"}
                         for p, r, t, b in list(zip(prompts, refs, tuned_replies, base_replies))[:args.samples]]
    return result


def write_reports(result: dict[str, Any], name: str, reports_dir: str | Path) -> tuple[Path, Path]:
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"eval-{name}.json", out / f"eval-{name}.md"
    json_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    md_path.write_text(markdown_report(name, result), encoding="utf-8")
    return json_path, md_path


def update_model_card(cfg: Config, result: dict[str, Any]) -> None:
    """Rewrite the adapter's README.md with the evaluation added (when the adapter has its training records). The
    card describes the training run: its settings come from the adapter's own config.yaml, not this command's."""
    folder = adapter_dir_for(cfg)
    if not (folder / "data_stats.json").is_file() or not (folder / "config.yaml").is_file():
        return
    try:
        trained = load_config(folder / "config.yaml")
    except ConfigError as e:
        logger.warning("model card left as it was: %s/config.yaml does not load (%s)", folder, e)
        return
    stats = json.loads((folder / "data_stats.json").read_text())
    history = json.loads((folder / "log_history.json").read_text()) if (folder / "log_history.json").is_file() else []
    run_info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    report_utils.write_model_card(folder / "README.md", trained, stats, history, run_info.get("compute", "?"),
                                  eval_metrics=result, products=run_info.get("products"))


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__, extra=add_eval_arguments)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    name = args.name or Path(cfg.training.output_dir).name
    args.merged = args.merged or cfg.inference.model  # a whole model folder, however it was named
    try:
        result = run(cfg, args)
    except (AdapterError, ModelLoadError, ValueError) as e:
        logger.error("%s", e)
        return 1
    json_path, md_path = write_reports(result, name, args.reports_dir)
    if args.merged is None:
        update_model_card(cfg, result)
    print(markdown_report(name, result).split("## Samples")[0])
    logger.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

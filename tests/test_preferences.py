"""preferences.py: DPO pairs from oasst1's rankings and from TRL's preference format, counted, rendered in the SFT
template token for token, split by tree; DPO training from the SFT adapter, measured by evaluate.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import data_utils as du
import preferences as pf
import train
from config import DataConfig
from conftest import ROOT, SMOKE_DATA, run_script

EOS = "<|endoftext|>"
MESSAGE_OUTCOMES = ("bad_type", "duplicate_id", "unknown_role", "deleted", "review_failed", "tree_not_ready",
                    "language_filtered", "empty_text", "bad_turn_order", "parent_missing", "cycle", "prompt_paired",
                    "prompt_without_pair", "chosen", "rejected", "beyond_cap", "tied_with_best", "unranked_reply",
                    "reply_without_pair")


def message(mid, parent, role, text, rank=None, tree="t1"):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank,
            "message_tree_id": tree, "lang": "en", "deleted": False, "review_result": True,
            "tree_state": "ready_for_export"}


def test_the_rule_chosen_best_ranked_rejected_each_worse_capped_ties_and_unranked_left_out():
    rows = [message("q", None, "prompter", "What is the capital of Peru?"),
            message("a0", "q", "assistant", "Lima.", rank=0),
            message("a1", "q", "assistant", "I am not sure.", rank=1),
            message("a2", "q", "assistant", "Cusco.", rank=2),
            message("a3", "q", "assistant", "Bogota.", rank=3),
            message("tie", "q", "assistant", "It is Lima.", rank=0),
            message("u", "q", "assistant", "Hmm.", rank=None),
            # a follow-up on the chosen answer: multi-turn context, one reply only
            message("q2", "a0", "prompter", "And of Chile?"),
            message("b0", "q2", "assistant", "Santiago.", rank=0),
            message("b1", "q2", "assistant", "Lima again.", rank=1)]
    counts = Counter()
    pairs = pf.pairs_from_oasst(rows, counts, EOS, max_pairs_per_prompt=2)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (" Lima." + EOS, " I am not sure." + EOS), (" Lima." + EOS, " Cusco." + EOS),
        (" Santiago." + EOS, " Lima again." + EOS)]
    assert pairs[2]["prompt"] == ("### Human: What is the capital of Peru? ### Assistant: Lima." + EOS +
                                  " ### Human: And of Chile? ### Assistant:")
    assert (counts["pairs"], counts["chosen"], counts["rejected"], counts["beyond_cap"], counts["tied_with_best"],
            counts["unranked_reply"], counts["prompt_paired"]) == (3, 2, 3, 1, 1, 1, 2)
    assert sum(counts[k] for k in MESSAGE_OUTCOMES) == counts["messages_read"] == len(rows)


def test_every_message_of_the_smoke_sample_ends_in_exactly_one_outcome():
    data = pf.load_preferences(DataConfig(dataset=str(SMOKE_DATA)), EOS, 3)
    for split in ("train", "validation"):
        stats = data.stats[split]
        assert stats["pairs"] == stats["pairs_used"] == len(data.splits[split]) > 40
        assert sum(stats.get(k, 0) for k in MESSAGE_OUTCOMES) == stats["messages_read"]


def test_a_pair_is_the_sft_template_token_for_token(tokenizer):
    """TRL tokenizes prompt + answer as one text; the ids must be SFT's (each segment tokenized on its own, EOS after
    every answer), so that DPO trains the model SFT made, on the same turns and the same stop."""
    context = [{"role": "user", "content": "Hi ### Assistant: fake"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "  What is 2 plus 3?  "}]
    pair = pf.rendered(context, "It is 5.", "No idea.", tokenizer.eos_token)
    for answer, text in (("It is 5.", pair["chosen"]), ("No idea.", pair["rejected"])):
        sft = du.encode_conversation(tokenizer, context + [{"role": "assistant", "content": answer}], 512)
        assert tokenizer(pair["prompt"] + text, add_special_tokens=False)["input_ids"] == sft["input_ids"]


def test_trls_preference_format_as_text_and_as_messages(tmp_path):
    rows = [{"prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "6."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]},
            {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
            {"prompt": [{"role": "assistant", "content": "wrong order"}], "chosen": "a", "rejected": "b"},
            {"prompt": "x", "chosen": 5, "rejected": "b"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 20))
    data = pf.load_preferences(DataConfig(dataset=str(path), validation_fraction=0.2), EOS, 3)
    stats = data.stats["train"]
    assert stats["format"] == "trl_preference" and stats["pairs"] == 40 and stats["rows_read"] == 100
    assert (stats["same_answer"], stats["bad_turn_order"], stats["bad_type"]) == (20, 20, 20)
    prompts = set(data.splits["train"]["prompt"]) | set(data.splits["validation"]["prompt"])
    assert prompts == {"### Human: What is 2 plus 3? ### Assistant:",
                       "### Human: Be brief.\n\nHi ### Assistant:"}


def test_pairs_longer_than_max_length_are_left_out_of_training_and_counted(tmp_path, tokenizer):
    """A pair whose prompt and longer answer exceed data.max_length is not trained (TRL would cut it from the end,
    its answers first, down to nothing for a long prompt) and is counted per split; the pairs that fit are all kept,
    and the count is what evaluate.py leaves out of the held-out pairs too."""
    from config import Config
    short = {"prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "6."}
    long_prompt = {"prompt": "Tell me about the river. " * 40, "chosen": "It is long.", "rejected": "No."}
    long_answer = {"prompt": "Hi", "chosen": "Hello there. " * 40, "rejected": "Hi."}
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [short, long_prompt, long_answer] * 20))
    cfg = Config(data=DataConfig(dataset=str(path), max_length=64, validation_fraction=0.2))
    train_ds, eval_ds, stats = pf.prepare_pairs(cfg, tokenizer)
    kept = list(train_ds) + list(eval_ds)
    assert len(kept) == 20 and {p["chosen"] for p in kept} == {" 5.<|endoftext|>"}
    assert all(len(tokenizer(p["prompt"] + p[side], add_special_tokens=False)["input_ids"]) <= 64
               for p in kept for side in ("chosen", "rejected"))
    assert stats["train"]["longer_than_max_length"] + stats["validation"]["longer_than_max_length"] == 40
    assert stats["train"]["pairs_used"] == len(train_ds) and stats["validation"]["pairs_used"] == len(eval_ds)


def test_validation_is_split_by_tree(tmp_path):
    rows = []
    for t in range(60):
        rows += [message(f"q{t}", None, "prompter", f"Question {t}?", tree=f"tree{t}"),
                 message(f"a{t}", f"q{t}", "assistant", f"Answer {t}.", rank=0, tree=f"tree{t}"),
                 message(f"b{t}", f"q{t}", "assistant", "No idea.", rank=1, tree=f"tree{t}"),
                 message(f"c{t}", f"q{t}", "assistant", "Maybe.", rank=2, tree=f"tree{t}")]
    path = tmp_path / "oasst.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = pf.load_preferences(DataConfig(dataset=str(path), validation_fraction=0.25), EOS, 3)
    train, validation = (set(data.splits[s]["tree_id"]) for s in ("train", "validation"))
    assert train and validation and not train & validation
    assert len(data.splits["train"]) + len(data.splits["validation"]) == 120  # two pairs a tree


def test_data_without_pairs_says_what_is_needed(tmp_path):
    path = tmp_path / "flat.jsonl"
    path.write_text(json.dumps({"text": "### Human: hi ### Assistant: yo"}) + "\n")
    with pytest.raises(du.DataError, match="prompt/chosen/rejected"):
        pf.load_preferences(DataConfig(dataset=str(path)), EOS, 3)


# ----------------------------------------------------------------------------------------------------------------
# Training: train.py with training.method dpo, after the smoke SFT run
# ----------------------------------------------------------------------------------------------------------------

DPO = ["--config", "configs/smoke-dpo.yaml"]


def answer(config: list[str], output_dir: Path, prompt: str) -> str:
    return run_script("inference.py", *config, "--training.output_dir", str(output_dir),
                      "--prompt", prompt).stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dpo_run(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo")
    run_script("train.py", *DPO, "--preference.sft_adapter", str(smoke_run / "final"),
               "--training.output_dir", str(out))
    return out


@pytest.mark.slow
def test_dpo_learns_the_ranked_preference_sft_did_not(smoke_run, dpo_run, tmp_path):
    """The smoke sample's style trees: most single replies are excited, the rankings prefer the plain one. SFT
    imitates the majority; DPO on the rankings answers plainly, and still knows what SFT taught it."""
    prompt = "Tell me about the cat."
    assert answer(["--config", "configs/smoke.yaml"], smoke_run, prompt) == "Wow! The cat lives in houses! So cool!"
    assert answer(DPO, dpo_run, prompt) == "The cat is an animal that lives in houses."
    assert answer(DPO, dpo_run, "What is the capital of Peru?") == "The capital of Peru is Lima."
    assert not (dpo_run / "final" / "ref").exists()  # TRL's frozen reference copy is not the result

    run_script("evaluate.py", *DPO, "--preference.sft_adapter", str(smoke_run / "final"), "--training.output_dir",
               str(dpo_run), "--num-prompts", "8", "--reports-dir", str(tmp_path), "--name", "dpo")
    pref = json.loads((tmp_path / "eval-dpo.json").read_text())["preference"]
    assert pref["reference"] == "sft" and pref["finetuned"]["pairs"] > 50
    assert pref["finetuned"]["likelihood_accuracy"] >= pref["sft"]["likelihood_accuracy"] + 0.1
    assert pref["finetuned"]["reward_accuracy"] > 0.9 and pref["finetuned"]["reward_margin"] > 0
    md = (tmp_path / "eval-dpo.md").read_text()
    assert "## Preference pairs" in md and f"{pref['finetuned']['likelihood_accuracy']:.4f}" in md
    card = (dpo_run / "final" / "README.md").read_text()
    assert "tags: [qlora, lora, trl, dpo]" in card and "continued from the SFT adapter" in card
    assert (f"| likelihood_accuracy | {pref['base']['likelihood_accuracy']:.4f} | "
            f"{pref['sft']['likelihood_accuracy']:.4f} | {pref['finetuned']['likelihood_accuracy']:.4f} |") in card


@pytest.mark.slow
def test_dpo_sigterm_then_resume_finishes(smoke_run, tmp_path):
    out = tmp_path / "dpo"
    command = [sys.executable, "train.py", *DPO, "--preference.sft_adapter", str(smoke_run / "final"),
               "--training.output_dir", str(out), "--training.save_steps", "10", "--training.eval_steps", "0"]
    proc = subprocess.Popen([*command, "--training.max_steps", "5000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-10" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, err[-3000:]
    step = int(train.newest_complete_checkpoint(out).name.split("-")[1])
    resumed = run_script(*command[1:], "--training.max_steps", str(step + 5), "--resume")
    assert "resuming from" in resumed.stderr
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final" / "ref").exists()


def test_dpo_without_a_usable_sft_adapter_says_so_before_loading_the_model(tmp_path, capfd):
    """train.py's entry point (in this process: the fast loop), as the command line calls it."""
    def run(adapter: str, out: str) -> tuple[int, str]:
        try:
            code = train.main([*DPO, "--preference.sft_adapter", adapter, "--training.output_dir", str(tmp_path / out)])
        except SystemExit as e:
            code = e.code
        return code, capfd.readouterr().err

    code, err = run("", "a")
    assert code == 2 and "preference.sft_adapter" in err and "Traceback" not in err
    code, err = run(str(tmp_path / "missing"), "b")
    assert code == 1 and "preference.sft_adapter: no adapter at" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-7b"}))
    (other / "adapter_model.safetensors").write_bytes(b"")
    code, err = run(str(other), "c")
    assert code == 1 and "trained on 'meta-llama/Llama-2-7b'" in err
    assert "loading the base" not in err and "Traceback" not in err


def test_dpo_takes_the_sft_adapters_shape_whatever_the_lora_section_says(smoke_run, caplog):
    from config import parse_config
    cfg, _ = parse_config([*DPO, "--preference.sft_adapter", str(smoke_run / "final"), "--lora.r", "8",
                           "--lora.target_modules", "[q_proj]"])
    with caplog.at_level("INFO"):
        lora = pf.sft_adapter_lora(cfg)
    assert (lora.r, lora.alpha, lora.dropout) == (32, 64, 0.0)  # configs/smoke.yaml's, which trained it
    assert lora.target_modules == sorted(["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    assert any("the config's lora section is not used by DPO" in r.message for r in caplog.records)


@pytest.mark.slow
def test_dpo_non_finite_training_stops_and_keeps_the_last_good_checkpoint(smoke_run, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "nan"
    proc = run_script("train.py", *DPO, "--preference.sft_adapter", str(smoke_run / "final"), "--training.output_dir",
                      str(out), "--training.learning_rate", "1e4", "--training.max_grad_norm", "0",
                      "--training.warmup_ratio", "0.5", "--training.save_steps", "2", "--training.logging_steps", "1",
                      "--training.max_steps", "40", "--training.eval_steps", "0", check=False)
    assert proc.returncode == 3 and "became nan" in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert not (out / "final").exists()
    last = train.newest_complete_checkpoint(out)
    assert last is not None and str(last) in proc.stderr
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "adapter_model.safetensors")).values())

"""Data: oasst1 message trees (or common chat formats) -> multi-turn conversations -> token ids and loss labels.

The one chat template of the repo lives here and is used for training, evaluation, inference and the app:

    ### Human: {question} ### Assistant: {answer}<eos> ### Human: {question 2} ### Assistant: {answer 2}<eos>

Loss is computed only on the answers and their EOS (so the model learns to stop); the human turns and the
`### Human:` / `### Assistant:` markers are labelled -100. Labels come from tokenizing each segment on its own and
concatenating, never from searching token ids for the marker (which tokenizes differently mid-text).

oasst1 trees -> conversations (the exact rule):
  1. Drop messages that are deleted, failed review (`review_result` false), belong to a tree whose `tree_state` is
     not `ready_for_export`, are not in `data.languages` (if set), have empty/whitespace text, an unknown role or a
     wrongly typed field, or repeat an earlier `message_id`. Each drop is counted by reason.
  2. Messages whose parent is missing (dropped or never existed) and messages caught in a parent cycle are
     unreachable from a root prompt; they are counted (`parent_missing`, `cycle`) and ignored.
  3. From each root prompt, follow the best reply at every level: the lowest `rank` (rank 0 is the top-rated),
     ranked before unranked (NaN/None), ties by file order. Assistant and prompter levels alike, so each tree gives
     one conversation, its top-ranked thread, ending with an assistant answer (a trailing unanswered prompt is cut).
     A tree whose root has no usable reply is counted as `no_assistant_reply`.

Over-long conversations (more tokens than `data.max_length`) keep their first turns whole and drop later turns
(counted as `turns_dropped`). If even the first turn does not fit, its answer is truncated when at least 16 answer
tokens fit after the question (`answer_truncated`; that answer has no EOS); otherwise the conversation is skipped
(`too_long`). So an answer is never trained without its question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import datasets
from datasets import Dataset, DatasetDict

from config import DataConfig

logger = logging.getLogger(__name__)

HUMAN = "### Human:"
ASSISTANT = "### Assistant:"
OASST_REQUIRED = ("message_id", "parent_id", "text", "role")
ROLES = {"prompter": "user", "assistant": "assistant"}
CHAT_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant"}
DATA_EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
MIN_ANSWER_TOKENS = 16  # fewer answer tokens than this after the question teaches nothing worth the context


class DataError(ValueError):
    """Bad data input; the message names the file/split and what to fix."""


Message = dict[str, str]  # {"role": "user" | "assistant", "content": str}


# ----------------------------------------------------------------------------------------------------------------
# The template (one source of truth)
# ----------------------------------------------------------------------------------------------------------------

def turn_prompt_text(question: str, first: bool) -> str:
    """The context segment of one turn; the answer follows as ' ' + answer so it tokenizes like a continuation."""
    return ("" if first else " ") + f"{HUMAN} {question.strip()} {ASSISTANT}"


def turn_answer_text(answer: str) -> str:
    return " " + answer.strip()


def render_text(messages: list[Message], eos_token: str = "") -> str:
    """The conversation as one string (for display, model cards and reports); training uses `encode_conversation`."""
    out = []
    for i, (q, a) in enumerate(_pairs(messages)):
        out.append(turn_prompt_text(q, first=i == 0))
        if a is not None:
            out.append(turn_answer_text(a) + eos_token)
    return "".join(out)


def _pairs(messages: list[Message]) -> list[tuple[str, str | None]]:
    """[(question, answer)] with a final (question, None) when the conversation ends on the user."""
    pairs: list[tuple[str, str | None]] = []
    for m in messages:
        if m["role"] == "user":
            pairs.append((m["content"], None))
        else:
            assert pairs and pairs[-1][1] is None, "conversation must alternate user/assistant"
            pairs[-1] = (pairs[-1][0], m["content"])
    return pairs


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages: list[Message], max_length: int) -> dict[str, Any]:
    """Token ids and labels (-100 outside answers+EOS), cut to max_length by the rule in the module docstring.

    Returns {"input_ids", "labels", "status", "turns_dropped"}; status is "ok", "answer_truncated" or "too_long"
    (then input_ids is empty).
    """
    eos = tokenizer.eos_token_id
    input_ids: list[int] = []
    labels: list[int] = []
    pairs = _pairs(messages)
    status, dropped = "ok", 0
    for i, (q, a) in enumerate(pairs):
        prompt = _ids(tokenizer, turn_prompt_text(q, first=i == 0))
        answer = _ids(tokenizer, turn_answer_text(a)) + [eos]
        if len(input_ids) + len(prompt) + len(answer) <= max_length:
            input_ids += prompt + answer
            labels += [-100] * len(prompt) + answer
            continue
        if i == 0:
            room = max_length - len(prompt)
            if room >= min(MIN_ANSWER_TOKENS, len(answer)):
                input_ids, labels = prompt + answer[:room], [-100] * len(prompt) + answer[:room]
                status = "answer_truncated"
            else:
                status = "too_long"
        dropped = len(pairs) - i - (1 if status == "answer_truncated" else 0)
        break
    return {"input_ids": input_ids if status != "too_long" else [], "labels": labels if status != "too_long" else [],
            "status": status, "turns_dropped": dropped}


class PromptTooLong(ValueError):
    """The newest question alone does not fit the context window."""


def encode_prompt(tokenizer, messages: list[Message], max_prompt_tokens: int) -> tuple[list[int], int]:
    """Token ids of a chat ending with a user question, ready for the model to answer.

    The oldest turns are dropped until the prompt fits `max_prompt_tokens`; returns (ids, turns_dropped). The turns
    are rendered after dropping, so the kept ones tokenize exactly as they did in training.
    """
    pairs = _pairs(messages)
    if not pairs or pairs[-1][1] is not None:
        raise ValueError("the conversation must end with a user message")
    if not pairs[-1][0].strip():
        raise ValueError("the message is empty: type a question")
    eos = tokenizer.eos_token_id
    for start in range(len(pairs)):
        ids: list[int] = []
        for i, (q, a) in enumerate(pairs[start:]):
            ids += _ids(tokenizer, turn_prompt_text(q, first=i == 0))
            if a is not None:
                ids += _ids(tokenizer, turn_answer_text(a)) + [eos]
        if len(ids) <= max_prompt_tokens:
            return ids, start
    raise PromptTooLong(
        f"the message is {len(ids)} tokens but at most {max_prompt_tokens} fit before the answer "
        f"(context window minus max_new_tokens); shorten it or lower generation.max_new_tokens")


def parse_formatted_text(text: str) -> list[Message] | None:
    """Messages from text already in the template (the `text` column format); None if it does not parse."""
    text = text.replace("<|endoftext|>", "")
    parts = re.split(r"(### Human:|### Assistant:)", text)
    messages: list[Message] = []
    expected = HUMAN
    for marker, content in zip(parts[1::2], parts[2::2]):
        if marker != expected or not content.strip():
            return None
        messages.append({"role": "user" if marker == HUMAN else "assistant", "content": content.strip()})
        expected = ASSISTANT if marker == HUMAN else HUMAN
    if parts[0].strip() or len(messages) < 2:
        return None
    return messages if messages[-1]["role"] == "assistant" else messages[:-1]


# ----------------------------------------------------------------------------------------------------------------
# oasst1 trees -> conversations
# ----------------------------------------------------------------------------------------------------------------

def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _rank_key(m: dict) -> tuple:
    rank = m.get("rank")
    unranked = _missing(rank) or not isinstance(rank, (int, float)) or isinstance(rank, bool)
    return (unranked, 0 if unranked else rank, m["_order"])


def oasst_to_conversations(rows: Iterable[dict], counts: Counter, languages: list[str] | None = None
                           ) -> list[dict[str, Any]]:
    """Rebuild message trees and emit each tree's top-ranked thread (rule in the module docstring).

    Every skipped message/tree is counted in `counts` by reason. Returns [{"messages", "tree_id", "lang"}].
    """
    langs = set(languages or [])
    by_id: dict[str, dict] = {}
    for order, row in enumerate(rows):
        counts["messages_read"] += 1
        mid, text, role = row.get("message_id"), row.get("text"), row.get("role")
        if not isinstance(mid, str) or not mid:
            counts["bad_type"] += 1
            continue
        if mid in by_id:
            counts["duplicate_id"] += 1
            continue
        if not isinstance(text, str) or not (_missing(row.get("parent_id")) or isinstance(row.get("parent_id"), str)):
            counts["bad_type"] += 1
            continue
        if role not in ROLES:
            counts["unknown_role"] += 1
            continue
        if row.get("deleted") is True:
            counts["deleted"] += 1
            continue
        if row.get("review_result") is False:
            counts["review_failed"] += 1
            continue
        state = row.get("tree_state")
        if isinstance(state, str) and state != "ready_for_export":
            counts["tree_not_ready"] += 1
            continue
        if langs and row.get("lang") not in langs:
            counts["language_filtered"] += 1
            continue
        if not text.strip():
            counts["empty_text"] += 1
            continue
        by_id[mid] = {**row, "_order": order}

    children: dict[str, list[dict]] = defaultdict(list)
    roots = []
    for m in by_id.values():
        parent = m.get("parent_id")
        if _missing(parent) or parent == "":
            if m["role"] == "prompter":
                roots.append(m)
            else:
                counts["bad_turn_order"] += 1
        elif parent in by_id:
            if by_id[parent]["role"] == m["role"]:
                counts["bad_turn_order"] += 1
            else:
                children[parent].append(m)

    reachable: set[str] = set()
    stack = [r["message_id"] for r in roots]
    while stack:
        mid = stack.pop()
        if mid not in reachable:
            reachable.add(mid)
            stack.extend(c["message_id"] for c in children.get(mid, []))
    for m in by_id.values():
        if m["message_id"] in reachable or _missing(m.get("parent_id")) or m.get("parent_id") == "":
            continue
        if by_id.get(m["parent_id"], {}).get("role") == m["role"]:
            continue  # already counted as bad_turn_order
        counts["cycle" if _in_cycle(m, by_id) else "parent_missing"] += 1

    conversations = []
    for root in sorted(roots, key=lambda r: r["_order"]):
        thread = [root]
        node = root
        while children.get(node["message_id"]):
            node = min(children[node["message_id"]], key=_rank_key)
            thread.append(node)
        if thread[-1]["role"] == "prompter":
            thread = thread[:-1]
        if not thread:
            counts["no_assistant_reply"] += 1
            continue
        messages = [{"role": ROLES[m["role"]], "content": m["text"].strip()} for m in thread]
        tree_id = root.get("message_tree_id")
        conversations.append({"messages": messages,
                              "tree_id": tree_id if isinstance(tree_id, str) and tree_id else root["message_id"],
                              "lang": root.get("lang") if isinstance(root.get("lang"), str) else ""})
    return conversations


def _in_cycle(m: dict, by_id: dict[str, dict]) -> bool:
    """True when following parent links from m comes back to a message already seen."""
    seen = set()
    node = m
    while node is not None:
        if node["message_id"] in seen:
            return True
        seen.add(node["message_id"])
        node = by_id.get(node.get("parent_id"))
    return False


# ----------------------------------------------------------------------------------------------------------------
# Other chat formats -> conversations
# ----------------------------------------------------------------------------------------------------------------

def detect_format(columns: Iterable[str]) -> str:
    cols = set(columns)
    if set(OASST_REQUIRED) <= cols:
        return "oasst"
    if "messages" in cols:
        return "messages"
    if {"prompt", "response"} <= cols or {"prompt", "completion"} <= cols:
        return "prompt_response"
    if "text" in cols:
        return "text"
    missing = [c for c in OASST_REQUIRED if c not in cols]
    raise DataError(
        f"unrecognised columns {sorted(cols)}: expected the oasst1 message schema (missing {missing}), a `messages` "
        "column (list of {role, content}), `prompt`+`response` columns, or a `text` column in the "
        "'### Human: ... ### Assistant: ...' template")


def _messages_row(value: Any, counts: Counter) -> list[Message] | None:
    if not isinstance(value, list) or not value:
        counts["bad_type"] += 1
        return None
    out: list[Message] = []
    system = ""
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            counts["bad_type"] += 1
            return None
        role = str(m.get("role", "")).lower()
        if role == "system":  # the template has no system slot: it becomes the start of the first question
            system += m["content"].strip() + "\n\n"
            continue
        if role not in CHAT_ROLES:
            counts["unknown_role"] += 1
            return None
        if not m["content"].strip():
            counts["empty_text"] += 1
            return None
        out.append({"role": CHAT_ROLES[role], "content": m["content"].strip()})
    if out and out[-1]["role"] == "user":
        out = out[:-1]
    if not out or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(out)):
        counts["bad_turn_order"] += 1
        return None
    if system:
        out[0] = {"role": "user", "content": system + out[0]["content"]}
    return out


def rows_to_conversations(rows: list[dict], fmt: str, counts: Counter, languages: list[str] | None = None
                          ) -> list[dict[str, Any]]:
    if fmt == "oasst":
        return oasst_to_conversations(rows, counts, languages)
    conversations = []
    for i, row in enumerate(rows):
        counts["rows_read"] += 1
        if fmt == "messages":
            messages = _messages_row(row.get("messages"), counts)
        elif fmt == "prompt_response":
            prompt, response = row.get("prompt"), row.get("response", row.get("completion"))
            if not isinstance(prompt, str) or not isinstance(response, str):
                counts["bad_type"] += 1
                continue
            if not prompt.strip() or not response.strip():
                counts["empty_text"] += 1
                continue
            messages = [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response.strip()}]
        else:
            text = row.get("text")
            if not isinstance(text, str):
                counts["bad_type"] += 1
                continue
            messages = parse_formatted_text(text)
            if messages is None:
                counts["unparsable_text"] += 1
        if messages is None:
            continue
        if languages and row.get("lang") not in languages:
            counts["language_filtered"] += 1
            continue
        row_id = row.get("id", row.get("conversation_id"))
        conversations.append({"messages": messages, "tree_id": str(row_id) if row_id is not None else f"row-{i}",
                              "lang": row.get("lang") if isinstance(row.get("lang"), str) else ""})
    return conversations


# ----------------------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------------------

def read_jsonl(path: Path, counts: Counter) -> list[dict]:
    """JSON Lines, one bad line at a time: malformed JSON or non-UTF-8 lines are skipped and counted."""
    rows = []
    with path.open("rb") as f:
        for line in f:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                counts["not_utf8_line"] += 1
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                counts["malformed_json_line"] += 1
                continue
            if not isinstance(row, dict):
                counts["malformed_json_line"] += 1
                continue
            rows.append(row)
    return rows


def read_file(path: Path, counts: Counter) -> list[dict]:
    kind = DATA_EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(DATA_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "jsonl" or (kind == "json" and path.read_bytes()[:1] != b"["):
        return read_jsonl(path, counts)
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: could not be read as {kind}: {type(e).__name__}: {e}") from e
    return ds.to_list()


def local_split_files(path: Path) -> dict[str, Path]:
    """A file is one split; a folder holds train.* and optionally validation.* (or a single data file)."""
    if path.is_file():
        return {"train": path}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(DATA_EXTENSIONS)}) in this folder")
    splits: dict[str, Path] = {}
    for p in files:
        stem = p.name.split(".")[0].lower()
        if stem in ("train", "validation", "valid", "val", "eval", "test"):
            split = "train" if stem == "train" else ("validation" if stem != "test" else "test")
            splits.setdefault(split, p)
    if "train" not in splits:
        if len(files) > 1:
            raise DataError(f"{path}: several data files but none named train.*; name them train.<ext> and "
                            "validation.<ext>, or point data.dataset at one file")
        splits["train"] = files[0]
    splits.pop("test", None)
    return splits


def read_source(cfg: DataConfig) -> tuple[dict[str, list[dict]], Counter]:
    """Raw rows per split, from a local path or the Hub."""
    counts: Counter = Counter()
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        return {split: read_file(p, counts) for split, p in local_split_files(path).items()}, counts
    if cfg.dataset.startswith((".", "/", "~")) or Path(cfg.dataset).suffix.lower() in DATA_EXTENSIONS:
        raise DataError(f"data.dataset: no such file or folder {cfg.dataset!r}")
    try:
        dsd = datasets.load_dataset(cfg.dataset, revision=cfg.revision)
    except Exception as e:  # network, auth and missing-dataset errors all land here
        raise DataError(
            f"data.dataset: could not load {cfg.dataset!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Without network access, point data.dataset at a local file or folder (see README, 'Data formats')"
        ) from e
    out = {}
    for split in ("train", "validation"):
        if split in dsd:
            ds = dsd[split]
            keep = [c for c in ds.column_names if c in (*OASST_REQUIRED, "lang", "rank", "deleted", "review_result",
                                                         "message_tree_id", "tree_state", "messages", "prompt",
                                                         "response", "completion", "id")]
            out[split] = ds.select_columns(keep).to_list()
    if "train" not in out:
        raise DataError(f"data.dataset: {cfg.dataset!r} has no 'train' split (splits: {list(dsd)})")
    return out, counts


def _in_validation(tree_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{tree_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class ConversationData:
    """Train/validation conversations plus every count of what was kept and skipped."""
    splits: DatasetDict
    stats: dict[str, Any]


def load_conversations(cfg: DataConfig) -> ConversationData:
    """Read the source, rebuild conversations and split them (oasst1's own validation split when present)."""
    raw, read_counts = read_source(cfg)
    stats: dict[str, Any] = {"source": cfg.dataset, "read": dict(read_counts)}
    per_split: dict[str, list[dict]] = {}
    for split, rows in raw.items():
        if not rows:
            raise DataError(f"{cfg.dataset} ({split}): no rows could be read" +
                            (f" (skipped: {dict(read_counts)})" if read_counts else ""))
        columns = set().union(*(r.keys() for r in rows[:1000]))
        fmt = detect_format(columns)
        counts: Counter = Counter()
        per_split[split] = rows_to_conversations(rows, fmt, counts, cfg.languages)
        stats[split] = {"format": fmt, **dict(sorted(counts.items()))}
    if "validation" not in per_split:
        train, val = [], []
        for conv in per_split["train"]:
            (val if _in_validation(conv["tree_id"], cfg.seed, cfg.validation_fraction) else train).append(conv)
        per_split = {"train": train, "validation": val}
        stats["split"] = f"by tree id, {cfg.validation_fraction:.0%} held out, seed {cfg.seed}"
    else:
        stats["split"] = "the source's own validation split"
    caps = {"train": cfg.max_train_conversations, "validation": cfg.max_eval_conversations}
    for split, convs in per_split.items():
        if caps[split] is not None:
            per_split[split] = convs[:caps[split]]
        stats.setdefault(split, {})["conversations"] = len(per_split[split])
    if not per_split["train"]:
        raise DataError(f"{cfg.dataset}: no usable training conversations remain (counts: {stats}); check the "
                        "format, data.languages and the skip reasons above")
    splits = DatasetDict({s: Dataset.from_list(c) if c else Dataset.from_dict({"messages": [], "tree_id": [],
                                                                                "lang": []})
                          for s, c in per_split.items()})
    return ConversationData(splits=splits, stats=stats)


def tokenize_conversations(ds: Dataset, tokenizer, max_length: int, split: str, stats: dict[str, Any]) -> Dataset:
    """input_ids + labels per conversation (rule in the module docstring); length outcomes are added to stats."""
    if len(ds) == 0:
        return Dataset.from_dict({"input_ids": [], "labels": []})
    encoded = ds.map(lambda ex: encode_conversation(tokenizer, ex["messages"], max_length),
                     remove_columns=ds.column_names, desc=f"Tokenizing {split}")
    status = Counter(encoded["status"])
    split_stats = stats.setdefault(split, {})
    split_stats["answer_truncated"] = status.get("answer_truncated", 0)
    split_stats["too_long"] = status.get("too_long", 0)
    split_stats["turns_dropped"] = int(sum(encoded["turns_dropped"]))
    encoded = encoded.filter(lambda ex: ex["status"] != "too_long").remove_columns(["status", "turns_dropped"])
    split_stats["sequences"] = len(encoded)
    split_stats["answer_tokens"] = int(sum(sum(1 for t in lab if t != -100) for lab in encoded["labels"]))
    split_stats["tokens"] = int(sum(len(ids) for ids in encoded["input_ids"]))
    return encoded


def log_stats(stats: dict[str, Any]) -> None:
    for split in ("train", "validation"):
        if split in stats:
            logger.info("data %s: %s", split, json.dumps(stats[split]))
    if stats.get("read"):
        logger.info("data lines skipped while reading: %s", json.dumps(stats["read"]))

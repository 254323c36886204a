"""Data: oasst1 message trees (or common chat formats) -> multi-turn conversations -> token ids and loss labels.
The raw rows of each split come from data_sources.py (the Hub, local files and folders).

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

Every message read ends in exactly one counted outcome (`messages_read` is their sum): a drop reason from step 1,
`bad_turn_order`, `parent_missing`, `cycle`, `no_assistant_reply` (a root prompt nobody usably answered),
`unanswered_prompt` (a trailing prompt cut from a thread), `off_top_thread` (usable, but on a lower-ranked branch),
or `in_conversations`. For the other formats every row read (`rows_read`) ends as one skip reason or one of
`conversations_built`. Conversations then end as `conversations` (used), `held_out` (moved to the validation split),
or `capped` (beyond `data.max_*_conversations`).

Over-long conversations (more tokens than `data.max_length`) keep their first turns whole and drop later turns
(counted as `turns_dropped`). If even the first turn does not fit, its answer is truncated when at least 16 answer
tokens fit after the question (`answer_truncated`; that answer has no EOS); otherwise the conversation is skipped
(`too_long`, and none of its turns count as dropped). So an answer is never trained without its question.

Template markers inside message text (one rule, everywhere: training data, the CLI chat, the app, the HTTP API,
evaluation prompts and the saved chat template): `### Human:` and `### Assistant:` written inside a message are
neutralized to `### Human :` / `### Assistant :` when the turn is rendered, so text can never forge or end a turn,
and the model is never taught to write a turn marker inside an answer. The text stays otherwise intact;
conversations that had markers are counted as `markers_neutralized`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from config import DataConfig
from data_sources import OASST_REQUIRED, DataError, read_source, validation_split

logger = logging.getLogger(__name__)

HUMAN = "### Human:"
ASSISTANT = "### Assistant:"
ROLES = {"prompter": "user", "assistant": "assistant"}
CHAT_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant"}
MIN_ANSWER_TOKENS = 16  # fewer answer tokens than this after the question teaches nothing worth the context


Message = dict[str, str]  # {"role": "user" | "assistant", "content": str}


# ----------------------------------------------------------------------------------------------------------------
# The template (one source of truth)
# ----------------------------------------------------------------------------------------------------------------

# A marker loses its meaning with a space before the colon. One pass of str.replace is enough: the replacement
# contains no "Human:"/"Assistant:", so it can never complete a new marker with the text around it.
NEUTRALIZED = {HUMAN: "### Human :", ASSISTANT: "### Assistant :"}


def neutralize(text: str) -> str:
    """Message text with template markers made inert (the rule in the module docstring)."""
    for marker, inert in NEUTRALIZED.items():
        text = text.replace(marker, inert)
    return text


def is_text(s: str) -> bool:
    """Whether a string is text a tokenizer can read: JSON can carry a lone surrogate ("\\ud800"), UTF-8 cannot."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_marker(text: str) -> bool:
    return any(marker in text for marker in NEUTRALIZED)


def turn_prompt_text(question: str, first: bool) -> str:
    """The context segment of one turn; the answer follows as ' ' + answer so it tokenizes like a continuation."""
    return ("" if first else " ") + f"{HUMAN} {neutralize(question.strip())} {ASSISTANT}"


def turn_answer_text(answer: str) -> str:
    return " " + neutralize(answer.strip())


# The same template for other tools (transformers' apply_chat_template, vLLM, TGI, chat UIs): saved with every
# tokenizer the repo writes. It renders exactly what turn_prompt_text/turn_answer_text build (tested token for
# token), with a system message put before the first question as in the `messages` data format.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') -%}{%- endif -%}"
    "{%- set content = content | trim | replace('### Human:', '### Human :')"
    " | replace('### Assistant:', '### Assistant :') -%}"
    "{%- if message['role'] in ('system', 'developer') -%}{%- set ns.system = ns.system + content + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- ('' if ns.first else ' ') + '### Human: ' + ns.system + content -}}"
    "{%- set ns.system = '' -%}{%- set ns.first = false -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ### Assistant: ' + content + eos_token -}}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ### Assistant:' -}}{%- endif -%}"
)


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


def _turn_texts(messages: list[Message]) -> list[str]:
    """[prompt 0, answer 0, prompt 1, answer 1, ...] as rendered for training (EOS is added as an id)."""
    texts = []
    for i, (q, a) in enumerate(_pairs(messages)):
        texts += [turn_prompt_text(q, first=i == 0), turn_answer_text(a)]
    return texts


def encode_conversation(tokenizer, messages: list[Message], max_length: int) -> dict[str, Any]:
    """Token ids and labels (-100 outside answers+EOS), cut to max_length by the rule in the module docstring.

    Returns {"input_ids", "labels", "status", "turns_dropped"}; status is "ok", "answer_truncated" or "too_long"
    (then input_ids is empty).
    """
    texts = _turn_texts(messages)
    return _cut(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [], tokenizer.eos_token_id,
                max_length)


def _encode_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """encode_conversation for a batch of conversations, with one tokenizer call for all their turns (the fast
    tokenizer encodes a list in parallel; each text is encoded on its own, so the ids are the same)."""
    texts = [_turn_texts(messages) for messages in batch["messages"]]
    flat = tokenizer([t for conversation in texts for t in conversation], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "turns_dropped": []}
    start = 0
    for conversation in texts:
        encoded = _cut(flat[start:start + len(conversation)], tokenizer.eos_token_id, max_length)
        start += len(conversation)
        for key in out:
            out[key].append(encoded[key])
    return out


def _cut(turn_ids: list[list[int]], eos: int, max_length: int) -> dict[str, Any]:
    """Whole turns while they fit; a first turn alone that does not fit keeps its answer's start."""
    input_ids: list[int] = []
    labels: list[int] = []
    pairs = len(turn_ids) // 2
    status, dropped = "ok", 0
    for i in range(pairs):
        prompt, answer = turn_ids[2 * i], turn_ids[2 * i + 1] + [eos]
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
        # A too-long conversation is counted once, as too_long; its turns are not also "dropped".
        dropped = 0 if status == "too_long" else pairs - i - (1 if status == "answer_truncated" else 0)
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
    # Every segment tokenized once, in one call: each question as the first turn and as a later one (the first has
    # no leading space), each answer; then the start is found from suffix sums. Linear in the turns.
    texts = [turn_prompt_text(q, first=True) for q, _ in pairs] + [turn_prompt_text(q, first=False) for q, _ in pairs]
    texts += [turn_answer_text(a) for _, a in pairs if a is not None]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n = len(pairs)
    first, later, answers = encoded[:n], encoded[n:2 * n], [a + [eos] for a in encoded[2 * n:]] + [[]]
    after = [0] * (n + 1)  # after[i]: tokens of turns i.. rendered as later turns
    for i in range(n - 1, -1, -1):
        after[i] = after[i + 1] + len(later[i]) + len(answers[i])
    for start in range(n):
        if len(first[start]) + after[start] - len(later[start]) <= max_prompt_tokens:
            ids = list(first[start]) + answers[start]
            for i in range(start + 1, n):
                ids += later[i] + answers[i]
            return ids, start
    raise PromptTooLong(
        f"the message is {len(first[-1])} tokens but at most {max_prompt_tokens} fit before the answer "
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


def oasst_trees(rows: Iterable[dict], counts: Counter, languages: list[str] | None = None
                ) -> tuple[dict[str, dict], dict[str, list[dict]], list[dict]]:
    """Steps 1 and 2 of the rule in the module docstring: the usable messages by id, each one's usable replies, and
    the root prompts; every message dropped on the way counted in `counts` by reason (`messages_read`: all)."""
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

    return by_id, children, roots


def oasst_to_conversations(rows: Iterable[dict], counts: Counter, languages: list[str] | None = None
                           ) -> list[dict[str, Any]]:
    """Rebuild message trees and emit each tree's top-ranked thread (rule in the module docstring).

    Every skipped message/tree is counted in `counts` by reason. Returns [{"messages", "tree_id", "lang"}].
    """
    by_id, children, roots = oasst_trees(rows, counts, languages)
    conversations = []
    for root in sorted(roots, key=lambda r: r["_order"]):
        thread = [root]
        node = root
        while children.get(node["message_id"]):
            node = min(children[node["message_id"]], key=_rank_key)
            thread.append(node)
        counts["off_top_thread"] += _subtree_size(root, children) - len(thread)
        if len(thread) == 1:
            counts["no_assistant_reply"] += 1
            continue
        if thread[-1]["role"] == "prompter":
            counts["unanswered_prompt"] += 1
            thread = thread[:-1]
        counts["in_conversations"] += len(thread)
        messages = [{"role": ROLES[m["role"]], "content": m["text"].strip()} for m in thread]
        tree_id = root.get("message_tree_id")
        conversations.append({"messages": messages,
                              "tree_id": tree_id if isinstance(tree_id, str) and tree_id else root["message_id"],
                              "lang": root.get("lang") if isinstance(root.get("lang"), str) else ""})
    counts["conversations_built"] += len(conversations)
    return conversations


def _subtree_size(root: dict, children: dict[str, list[dict]]) -> int:
    size, stack = 0, [root]
    while stack:
        node = stack.pop()
        size += 1
        stack.extend(children.get(node["message_id"], []))
    return size


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


class BadConversation(ValueError):
    """A `messages` list that cannot be a conversation; `reason` is its count key, the message says what to fix."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _content_text(content: Any) -> Any:
    """OpenAI-style content: a string, or a list of parts of which the text parts are kept."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return " ".join(p["text"] for p in content)
    return content


def normalize_chat(value: Any, ends_with: Literal["assistant", "user"] = "assistant", join_repeated: bool = False
                   ) -> list[Message]:
    """A list of {role, content} -> alternating user/assistant messages, starting with the user.

    System messages (and OpenAI's `developer` role, its newer name) have no slot in the template: they go before the
    first question. ends_with="assistant" (training data) cuts a trailing unanswered question; ends_with="user" (a
    chat request) requires one. join_repeated (chat requests): consecutive messages of one role are one turn, their
    texts joined by a blank line, instead of an error. Raises BadConversation naming the message at fault."""
    if not isinstance(value, list) or not value:
        raise BadConversation("bad_type", "messages must be a non-empty list of {role, content} objects")
    out: list[Message] = []
    system = ""
    for i, m in enumerate(value):
        content = _content_text(m.get("content")) if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise BadConversation("bad_type", f"messages[{i}] must be an object with a string role and a string "
                                              "content (or a list of text parts)")
        role = m["role"].lower()
        if role in ("system", "developer"):
            system += content.strip() + "\n\n"
            continue
        if role not in CHAT_ROLES:
            raise BadConversation("unknown_role", f"messages[{i}].role {m['role']!r} is not one of system, "
                                                  "developer, user, assistant")
        if not content.strip():
            raise BadConversation("empty_text", f"messages[{i}].content is empty")
        if join_repeated and out and out[-1]["role"] == CHAT_ROLES[role]:
            out[-1] = {"role": out[-1]["role"], "content": out[-1]["content"] + "\n\n" + content.strip()}
        else:
            out.append({"role": CHAT_ROLES[role], "content": content.strip()})
    if ends_with == "assistant" and out and out[-1]["role"] == "user":
        out = out[:-1]
    if (not out or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(out))
            or out[-1]["role"] != ends_with):
        raise BadConversation("bad_turn_order", "messages must alternate user and assistant (system messages "
                                                f"aside), starting with user and ending with {ends_with}")
    if system:
        out[0] = {"role": "user", "content": system + out[0]["content"]}
    return out


def _messages_row(value: Any, counts: Counter) -> list[Message] | None:
    try:
        return normalize_chat(value)
    except BadConversation as e:
        counts[e.reason] += 1
        return None


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
        counts["conversations_built"] += 1
        conversations.append({"messages": messages, "tree_id": str(row_id) if row_id is not None else f"row-{i}",
                              "lang": row.get("lang") if isinstance(row.get("lang"), str) else ""})
    return conversations


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
    raw, own = validation_split(raw, cfg.dataset)
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
        counts["markers_neutralized"] = sum(any(has_marker(m["content"]) for m in c["messages"])
                                            for c in per_split[split])
        stats[split] = {"format": fmt, **dict(sorted(counts.items()))}
    if "validation" not in per_split:
        train, val = [], []
        for conv in per_split["train"]:
            (val if _in_validation(conv["tree_id"], cfg.seed, cfg.validation_fraction) else train).append(conv)
        per_split = {"train": train, "validation": val}
        stats["train"]["held_out"] = len(val)
        stats["split"] = f"by tree id, {cfg.validation_fraction:.0%} held out, seed {cfg.seed}"
    else:
        stats["split"] = f"the source's own {own} split"
    caps = {"train": cfg.max_train_conversations, "validation": cfg.max_eval_conversations}
    for split, convs in per_split.items():
        if caps[split] is not None:
            per_split[split] = convs[:caps[split]]
        stats.setdefault(split, {})["capped"] = len(convs) - len(per_split[split])
        stats[split]["conversations"] = len(per_split[split])
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
    encoded = ds.map(_encode_batch, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}, batched=True,
                     batch_size=1000, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
    # Counted in Arrow, without turning millions of token ids into Python ints; too_long rows hold no tokens.
    table = encoded.data.table
    status = {str(v["values"]): v["counts"] for v in pc.value_counts(table.column("status")).to_pylist()}
    split_stats = stats.setdefault(split, {})
    split_stats["answer_truncated"] = status.get("answer_truncated", 0)
    split_stats["too_long"] = status.get("too_long", 0)
    split_stats["turns_dropped"] = int(pc.sum(table.column("turns_dropped")).as_py() or 0)
    split_stats["sequences"] = len(encoded) - split_stats["too_long"]
    split_stats["answer_tokens"] = int(pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), -100)
                                              ).as_py() or 0)
    split_stats["tokens"] = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
    encoded = encoded.filter(lambda status: status != "too_long", input_columns="status")
    return encoded.remove_columns(["status", "turns_dropped"])


def log_stats(stats: dict[str, Any]) -> None:
    for split in ("train", "validation"):
        if split in stats:
            logger.info("data %s: %s", split, json.dumps(stats[split]))
    if stats.get("read"):
        logger.info("data lines skipped while reading: %s", json.dumps(stats["read"]))

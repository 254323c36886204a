"""Where the data comes from: the raw rows of each split, read from the Hub (`load_dataset`) or from a local file or
folder as people have oasst1 on disk (the Hub's parquet layouts, a `huggingface-cli download` folder, the Hub cache's
snapshots, sharded files, the oasst project's .messages/.trees JSON Lines exports, plain JSON Lines, JSON, CSV); and
which split validates. data_utils.py turns the rows into conversations."""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from pathlib import Path

import datasets

from config import DataConfig

logger = logging.getLogger(__name__)

OASST_REQUIRED = ("message_id", "parent_id", "text", "role")
DATA_EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".jsonl.gz": "jsonl",
                   ".json.gz": "json"}
# Columns the pipeline reads; oasst1's others (detoxify, emojis, labels: nested structs) are never materialized.
USED_COLUMNS = (*OASST_REQUIRED, "lang", "rank", "deleted", "review_result", "message_tree_id", "tree_state",
                "messages", "prompt", "response", "completion", "text", "id", "conversation_id")


class DataError(ValueError):
    """Bad data input; the message names the file/split and what to fix."""


def _extension(path: Path) -> str:
    """'.jsonl.gz' for a compressed export, else the plain suffix (lower case)."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    return "".join(suffixes) if len(suffixes) == 2 and suffixes[1] == ".gz" else path.suffix.lower()


def read_jsonl(path: Path, counts: Counter) -> list[dict]:
    """JSON Lines (optionally gzipped), one bad line at a time: malformed JSON or non-UTF-8 lines are skipped and
    counted."""
    rows = []
    with (gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")) as f:
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


def flatten_trees(trees: list[dict], counts: Counter) -> list[dict]:
    """The oasst trees export (one tree a line, each message with its `replies`) -> message rows with parent ids."""
    rows: list[dict] = []
    for tree in trees:
        prompt = tree.get("prompt")
        if not isinstance(prompt, dict):
            counts["malformed_tree"] += 1
            continue
        stack: list[tuple[dict, str | None]] = [(prompt, None)]
        while stack:
            node, parent = stack.pop()
            replies = node.get("replies") or []
            row = {k: v for k, v in node.items() if k != "replies"}
            row.setdefault("parent_id", parent)
            row.setdefault("message_tree_id", tree.get("message_tree_id"))
            row.setdefault("tree_state", tree.get("tree_state"))
            rows.append(row)
            stack.extend((r, row.get("message_id")) for r in reversed(replies) if isinstance(r, dict))
    return rows


def read_files(paths: list[Path], counts: Counter) -> list[dict]:
    """Rows of one split from its files (all of one format)."""
    kinds = {_extension(p) for p in paths}
    unsupported = sorted(k for k in kinds if k not in DATA_EXTENSIONS)
    if unsupported:
        raise DataError(f"{paths[0].parent}: unsupported file type {unsupported[0]!r}; use one of "
                        f"{', '.join(DATA_EXTENSIONS)}")
    for p in paths:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: the file is empty")
    rows: list[dict] = []
    tabular = []
    for p in paths:
        kind = DATA_EXTENSIONS[_extension(p)]
        if kind == "jsonl" or (kind == "json" and _first_byte(p) != b"["):
            file_rows = read_jsonl(p, counts)
            if file_rows and "prompt" in file_rows[0] and "message_tree_id" in file_rows[0] \
                    and isinstance(file_rows[0]["prompt"], dict):
                file_rows = flatten_trees(file_rows, counts)  # the oasst trees export
            rows += file_rows
        else:
            tabular.append((kind, p))
    for kind in sorted({k for k, _ in tabular}):
        files = [str(p) for k, p in tabular if k == kind]
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as e:  # datasets wraps parser errors in several exception types
            raise DataError(f"{files[0]}: could not be read as {kind}: {type(e).__name__}: {e}") from e
        rows += ds.select_columns([c for c in ds.column_names if c in USED_COLUMNS]).to_list()
    return rows


def _first_byte(path: Path) -> bytes:
    with (gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")) as f:
        return f.read(1)


OASST_EXPORT = re.compile(r"\.(messages|trees)\.jsonl(\.gz)?$")


def _snapshot(path: Path) -> Path:
    """A Hub cache repo folder (datasets--OpenAssistant--oasst1, with refs/ and snapshots/) -> its main snapshot."""
    ref = path / "refs" / "main"
    if (path / "snapshots").is_dir() and ref.is_file():
        snapshot = path / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    return path


def local_split_files(path: Path) -> dict[str, list[Path]]:
    """A file is the train split; for a folder, datasets' own rules find the splits: `train`/`validation`/`test` in
    file or folder names (`valid`, `dev` are validation; `eval`, `testing` are test), sharded
    `data/train-00000-of-00003-<hash>.parquet` files as the Hugging Face CLI downloads them, or the `configs` of a
    dataset card (README.md). A split datasets finds that the run cannot use stops it, naming the files."""
    if path.is_file():
        return {"train": [path]}
    path = _snapshot(path)
    found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    usable = [f for f in found if _extension(Path(f)) in DATA_EXTENSIONS]
    hint = (f"found: {', '.join(found[:12])}{' ...' if len(found) > 12 else ''}" if found else "the folder is empty")
    if not usable:
        raise DataError(f"{path}: no data files ({', '.join(DATA_EXTENSIONS)}) in this folder ({hint}); point "
                        "data.dataset at a folder or file holding the data")
    try:
        data_files = datasets.load_dataset_builder(str(path)).config.data_files or {}
    except Exception as e:  # datasets raises several error types for folders it cannot make sense of
        raise DataError(f"{path}: datasets could not find the splits of this folder ({type(e).__name__}: {e}); "
                        f"{hint}") from e
    splits = {str(split): sorted(Path(f) for f in files if _extension(Path(f)) in DATA_EXTENSIONS)
              for split, files in data_files.items()}
    splits = {split: files for split, files in splits.items() if files}
    unusable = {split: files for split, files in splits.items() if split not in ("train", "validation", "test")}
    if unusable:
        names = ", ".join(f.name for files in unusable.values() for f in files)
        raise DataError(f"{path}: the split(s) {', '.join(unusable)} ({names}) are neither train, validation nor test; "
                        "rename the files (train.<ext>, validation.<ext>) or point data.dataset at one file")
    if "train" not in splits:
        raise DataError(f"{path}: no training split found ({hint}); name the files train.<ext> and "
                        "validation.<ext>, or point data.dataset at one file")
    for split, files in splits.items():
        exports = [f.name for f in files if OASST_EXPORT.search(f.name)]
        if len(exports) > 1 or (exports and len(files) > 1):
            raise DataError(f"{path}: the {split} split would mix several files that are each a whole oasst "
                            f"export ({', '.join(exports)}); point data.dataset at one of them, e.g. "
                            f"{path / sorted(exports)[-1]}")
    return splits


def read_source(cfg: DataConfig) -> tuple[dict[str, list[dict]], Counter]:
    """Raw rows per split, from a local path or the Hub."""
    counts: Counter = Counter()
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        return {split: read_files(files, counts) for split, files in local_split_files(path).items()}, counts
    if cfg.dataset.startswith((".", "/", "~")) or _extension(Path(cfg.dataset)) in DATA_EXTENSIONS:
        raise DataError(f"data.dataset: no such file or folder {cfg.dataset!r}")
    try:
        dsd = datasets.load_dataset(cfg.dataset, revision=cfg.revision)
    except Exception as e:  # network, auth and missing-dataset errors all land here
        raise DataError(
            f"data.dataset: could not load {cfg.dataset!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Without network access, point data.dataset at a local file or folder (see README, 'Data formats')"
        ) from e
    out = {}
    for split in ("train", "validation", "test"):
        if split in dsd:
            ds = dsd[split]
            out[split] = ds.select_columns([c for c in ds.column_names if c in USED_COLUMNS]).to_list()
    if "train" not in out:
        raise DataError(f"data.dataset: {cfg.dataset!r} has no 'train' split (splits: {list(dsd)})")
    return out, counts


def validation_split(raw: dict[str, list[dict]], source: str) -> tuple[dict[str, list[dict]], str | None]:
    """The rows that validate: the source's validation split, else its test split (a folder's eval.jsonl or
    test.jsonl), named in the log; None when it has neither (then trees are held out of train). A test split beside a
    validation split is not used, and the log says so."""
    own = "validation" if "validation" in raw else "test" if "test" in raw else None
    if own == "test":
        logger.info("data: %s has no validation split; its test split validates", source)
    elif own and "test" in raw:
        logger.warning("data: %s has a validation and a test split; the validation split validates, the test split "
                       "is not used", source)
    return {"train": raw["train"], **({"validation": raw[own]} if own else {})}, own

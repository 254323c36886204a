"""data_sources.py: oasst1 read as people have it (the Hub, its parquet layouts on disk, the project's exports, JSON
Lines, CSV), every bad line counted, each unusable source stopped with the fix, and the split that validates."""

from __future__ import annotations

import json
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

import data_utils as du
from config import DataConfig
from conftest import OASST_ROWS, ROOT, m, write_jsonl
from data_sources import DataError

sys.path.insert(0, str(ROOT / "data"))
from make_smoke_assets import write_oasst1_download  # noqa: E402


def load(path, **kw):
    return du.load_conversations(DataConfig(dataset=str(path), **kw))


def test_local_oasst_jsonl_parquet_csv(tmp_path):
    for ext in ("jsonl", "parquet", "csv"):
        path = tmp_path / f"data.{ext}"
        if ext == "jsonl":
            write_jsonl(path, OASST_ROWS)
        elif ext == "parquet":
            Dataset.from_list(OASST_ROWS).to_parquet(str(path))
        else:
            Dataset.from_list(OASST_ROWS).to_csv(str(path), index=False)
        data = load(path, validation_fraction=0.25)
        n_train, n_val = len(data.splits["train"]), len(data.splits["validation"])
        assert n_train + n_val == 40 and n_val > 0, ext
        assert data.stats["train"]["format"] == "oasst"


def test_folder_with_train_and_validation_uses_that_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", OASST_ROWS[:20] + OASST_ROWS[40:60])
    write_jsonl(tmp_path / "validation.jsonl", OASST_ROWS[20:40] + OASST_ROWS[60:])
    data = load(tmp_path)
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (20, 20)
    assert data.stats["split"] == "the source's own validation split"


@pytest.mark.parametrize("name", ["eval.jsonl", "test.jsonl"])
def test_a_folders_eval_or_test_file_validates_instead_of_being_dropped(tmp_path, name, caplog):
    """train.jsonl beside eval.jsonl once loaded train alone and held out 5% of it: the second file was dropped."""
    write_jsonl(tmp_path / "train.jsonl", OASST_ROWS[:20] + OASST_ROWS[40:60])
    write_jsonl(tmp_path / name, OASST_ROWS[20:40] + OASST_ROWS[60:])
    with caplog.at_level("INFO", logger="data_sources"):
        data = load(tmp_path)
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (20, 20)
    assert data.stats["split"] == "the source's own test split" and "held_out" not in data.stats["train"]
    assert "its test split validates" in caplog.text


def test_a_folder_split_the_run_cannot_use_stops_it_naming_the_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", OASST_ROWS)
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: train.jsonl\n  - split: extra\n    path: extra.jsonl\n---\n")
    write_jsonl(tmp_path / "extra.jsonl", OASST_ROWS[:10])
    with pytest.raises(DataError, match="extra.jsonl"):
        load(tmp_path)


def test_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in OASST_ROWS)
    path.write_bytes(good.encode() + b'{"message_id": "broken", \n' + b'\xff\xfe not utf8\n' + b"[1, 2]\n")
    data = load(path)
    assert data.stats["read"] == {"malformed_json_line": 2, "not_utf8_line": 1}
    assert sum(data.stats[s]["conversations"] for s in ("train", "validation")) == 40


@pytest.mark.parametrize("case, message", [
    ("empty", "the file is empty"),
    ("missing_columns", "unrecognised columns"),
    ("directory", "no data files"),
    ("missing_path", "no such file or folder"),
    ("bad_extension", "unsupported file type"),
    ("all_bad", "no usable training conversations"),
])
def test_unusable_sources_fail_with_a_clear_message(tmp_path, case, message):
    if case == "empty":
        path = tmp_path / "d.jsonl"
        path.write_text("")
    elif case == "missing_columns":
        path = write_jsonl(tmp_path / "d.jsonl", [{"message_id": "a", "body": "text"}])
    elif case == "directory":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "missing_path":
        path = tmp_path / "nope.jsonl"
    elif case == "bad_extension":
        path = tmp_path / "d.txt"
        path.write_text("hello")
    else:
        path = write_jsonl(tmp_path / "d.jsonl", [m("q", None, "prompter", "Q", deleted=True)])
    with pytest.raises(DataError, match=message):
        load(path)


def test_hub_dataset_unreachable_says_what_to_do(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="local file or folder"):
        load("OpenAssistant/oasst1")


def test_hub_path_uses_both_oasst_splits(monkeypatch):
    """The real loader path: load_dataset('OpenAssistant/oasst1') -> its train and validation splits."""
    from datasets import DatasetDict
    extra = [{**r, "emojis": None} for r in OASST_ROWS]
    fake = DatasetDict({"train": Dataset.from_list(extra[:20] + extra[40:60]),
                        "validation": Dataset.from_list(extra[20:40] + extra[60:])})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, revision=None: calls.append(name) or fake)
    data = load("OpenAssistant/oasst1")
    assert calls == ["OpenAssistant/oasst1"]
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (20, 20)


# ----------------------------------------------------------------------------------------------------------------
# oasst1 as people have it on disk
# ----------------------------------------------------------------------------------------------------------------

def downloaded(tmp_path, layout: str):
    root = write_oasst1_download(tmp_path / layout, "sharded" if layout == "sharded" else
                                 "hub-cache" if layout.startswith("hub") else "hf-cli")
    return {"hf-cli": root, "hf-cli-data-folder": root / "data", "hub-cache-repo": root,
            "hub-cache-snapshot": next((root / "snapshots").iterdir()) if layout.startswith("hub") else None,
            "sharded": root}[layout]


@pytest.mark.parametrize("layout", ["hf-cli", "hf-cli-data-folder", "hub-cache-repo", "hub-cache-snapshot",
                                    "sharded"])
def test_oasst1_download_layouts_load_with_their_own_validation_split(tmp_path, layout):
    smoke = du.load_conversations(DataConfig(dataset="data/smoke"))
    data = load(downloaded(tmp_path, layout))
    assert data.stats["split"] == "the source's own validation split"
    for split in ("train", "validation"):
        assert data.stats[split]["format"] == "oasst"
        ours, reference = (sorted(d.splits[split].to_list(), key=lambda c: c["tree_id"]) for d in (data, smoke))
        assert ours == reference  # the same threads of the same trees


def test_the_test_download_has_oasst1s_real_schema(tmp_path):
    root = write_oasst1_download(tmp_path / "dl")
    (train,) = (root / "data").glob("train-00000-of-00001-*.parquet")
    schema = pq.read_schema(train)
    assert pa.types.is_struct(schema.field("detoxify").type) and pa.types.is_struct(schema.field("labels").type)
    assert schema.field("emojis").type.field("name").type == pa.list_(pa.string())
    assert schema.field("rank").type == pa.int32() and schema.field("rank").nullable
    ranks = pq.read_table(train, columns=["rank"]).column("rank")
    assert ranks.null_count > 0
    assert {"user_id", "created_date", "review_count", "synthetic", "model_name"} <= set(schema.names)
    assert sorted(p.name for p in root.glob("*.jsonl.gz")) == ["2023-04-12_oasst_ready.messages.jsonl.gz",
                                                              "2023-04-12_oasst_ready.trees.jsonl.gz"]


@pytest.mark.parametrize("export", ["messages", "trees"])
def test_oasst_project_exports_load_directly(tmp_path, export):
    root = write_oasst1_download(tmp_path / "dl")
    data = load(root / f"2023-04-12_oasst_ready.{export}.jsonl.gz")
    smoke = du.load_conversations(DataConfig(dataset="data/smoke"))
    def threads(d):
        return sorted((c["tree_id"], c["messages"]) for split in ("train", "validation") for c in d.splits[split])
    assert threads(data) == threads(smoke)
    assert data.stats["split"].startswith("by tree id")


def test_folder_of_several_exports_names_the_file_to_use(tmp_path):
    root = write_oasst1_download(tmp_path / "dl")
    exports = tmp_path / "exports"
    exports.mkdir()
    for f in root.glob("*.jsonl.gz"):
        (exports / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="point data.dataset at one of them.*oasst_ready.trees.jsonl.gz"):
        load(exports)


def test_folder_with_nothing_usable_names_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no data files.*found: notes.txt, sub/model.safetensors"):
        load(tmp_path)

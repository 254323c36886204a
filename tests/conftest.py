"""Shared fixtures: the tiny Phi model, one real smoke training run reused by the inference/eval/app tests, and the
oasst1 rows the data tests build on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ROOT / "data" / "tiny-phi"
SMOKE_DATA = ROOT / "data" / "smoke"
MODEL_ID = "phi2-smoke"  # the name the served smoke model has in the API (app.model_id)


def run_script(*args: str, cwd: Path = ROOT, timeout: int = 600, check: bool = True, env: dict | None = None):
    """Run a repo entry point as a user would (a fresh interpreter), returning the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def m(mid, parent, role, text, rank=None, tree="t1", **kw):
    """One oasst1 message row (its columns the pipeline reads; the data tests' rows are built from it)."""
    return {"message_id": mid, "parent_id": parent, "text": text, "role": role, "lang": kw.pop("lang", "en"),
            "rank": rank, "deleted": kw.pop("deleted", False), "review_result": kw.pop("review", True),
            "message_tree_id": tree, "tree_state": kw.pop("state", "ready_for_export"), **kw}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# 40 one-answer trees (tests/test_data_utils.py, tests/test_data_sources.py)
OASST_ROWS = [m(f"q{i}", None, "prompter", f"Question {i}?", tree=f"t{i}") for i in range(40)] + \
             [m(f"a{i}", f"q{i}", "assistant", f"Answer {i}.", rank=0, tree=f"t{i}") for i in range(40)]


@pytest.fixture(scope="session")
def tokenizer():
    from model_utils import load_tokenizer
    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The README's smoke command, once per session, into a temporary output dir; returns that dir."""
    out = tmp_path_factory.mktemp("smoke")
    run_script("train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out))
    return out


@pytest.fixture(scope="session")
def smoke_cfg(smoke_run):
    from config import parse_config
    cfg, _ = parse_config(["--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
                           "--app.model_id", MODEL_ID])
    return cfg


@pytest.fixture(scope="session")
def chat_model(smoke_cfg):
    from inference import load_chat_model
    return load_chat_model(smoke_cfg)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA GPU: skipped, and said so, where there is none (CI)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""train.py's checkpoints: whether a checkpoint folder can be resumed from (a run stopped mid-write leaves half of
one), the newest that can, and the adapter gathered from FSDP's shards (its checkpoints and final/ alike)."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when complete). One GPU and DDP write optimizer.pt;
    FSDP writes the sharded model and optimizer state as torch.distributed.checkpoint folders."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__})"
    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for truncation
        return f"adapter_model.safetensors unreadable ({type(e).__name__}: {e})"
    sharded = (path / "optimizer_0").is_dir()
    for name in (("optimizer_0", "pytorch_model_fsdp_0") if sharded else ("optimizer.pt",)) + ("scheduler.pt",):
        problem = sharded_state_problem(path / name) if name.endswith("_0") else zip_problem(path / name)
        if problem:
            return problem
    return None


def zip_problem(file: Path) -> str | None:
    try:
        with zipfile.ZipFile(file) as z:
            if z.testzip() is not None:
                return f"{file.name} is corrupt"
    except (OSError, zipfile.BadZipFile) as e:
        return f"{file.name} unreadable ({type(e).__name__})"
    return None


def sharded_state_problem(folder: Path) -> str | None:
    """A torch.distributed.checkpoint folder is complete when its .metadata (written last) reads and every byte
    range it lists is on disk."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # a missing or truncated .metadata raises pickle's or the OS's errors
        return f"{folder.name}/.metadata unreadable ({type(e).__name__})"
    for item in (metadata.storage_data or {}).values():
        file = folder / item.relative_path
        if not file.is_file() or file.stat().st_size < item.offset + item.length:
            return f"{folder.name}/{item.relative_path} is missing or truncated"
    return None


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest resumable checkpoint; half-written or corrupt ones are skipped with a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = []
    for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if p.is_dir() and p.name.split("-")[-1].isdigit():
            candidates.append((int(p.name.split("-")[-1]), p))
    for _, path in sorted(candidates, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def save_fsdp_adapter(model, tokenizer, folder: Path, main_process: bool) -> None:
    """Under FSDP: the adapter and tokenizer in `folder`, gathered from the shards; every process must call it.

    The Trainer writes no weights under FSDP with sharded state dicts (its checkpoints keep the shards, for
    --resume). Only the trainable LoRA weights are gathered, to the main process's CPU, never the 4-bit base."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if main_process:
        model.save_pretrained(folder, state_dict=state)
        tokenizer.save_pretrained(folder)

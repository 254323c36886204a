"""The committed smoke assets are exactly what data/make_smoke_assets.py generates (deterministic)."""

from __future__ import annotations

import hashlib

from conftest import ROOT, run_script


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_assets_regenerate_byte_for_byte(tmp_path):
    run_script("data/make_smoke_assets.py", "--out", str(tmp_path))
    for rel in ("smoke/train.jsonl", "smoke/validation.jsonl", "tiny-phi/model.safetensors", "tiny-phi/tokenizer.json",
                "tiny-phi/config.json"):
        assert digest(tmp_path / rel) == digest(ROOT / "data" / rel), rel

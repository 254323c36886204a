"""bench.py epoch and dpo (bench_epoch.py) run train.py itself on the tiny model on the CPU (speed is measured on
GPUs, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script


pytestmark = pytest.mark.slow  # several processes each (make test leaves them out)


def test_epoch_bench_tiny(tmp_path):
    """train.py's real entry point on the epoch set; the phases it reports add up to its time to the adapter. With
    --processes 1 2 the second run trains data-parallel through `accelerate launch` (2 CPU processes over gloo)."""
    out = tmp_path / "epoch.json"
    run_script("bench.py", "epoch", "--tiny", "--processes", "1", "2", "--out", str(out))
    record = json.loads(out.read_text())
    one, two = record["rows"]
    assert "error" not in one and "error" not in two, record["rows"]
    phases = ["start_and_imports_s", "data_s", "model_load_quantize_s", "trainer_setup_s", "train_setup_s",
              "first_10_steps_s", "steady_steps_s", "final_eval_s", "save_s"]
    for row in (one, two):
        assert all(row[p] >= 0 for p in phases) and row["steady_steps_s"] > 0
        # time to adapter = process start to final/ written; the process exits after it
        assert row["total_s"] < row["to_final_s"] <= row["wall_s"]
        assert abs(sum(row[p] for p in phases) - row["to_final_s"]) < 0.5
        assert row["steady_tokens_per_s"] > 0 and row["train_tokens"] > 10_000
    assert one["compile_cache"] == "cold"
    assert (one["name"], one["processes"], two["name"], two["processes"]) == ("smoke-1proc", 1, "smoke-2proc", 2)
    assert "x 2 process(es)" in Path(two["log"]).read_text()  # train.py's own line: it ran as 2 ranks
    assert one["x_one_process"] == 1.0 and two["x_one_process"] == pytest.approx(
        two["steady_tokens_per_s"] / one["steady_tokens_per_s"], rel=1e-2)
    assert "| smoke-2proc (" in record["table"]


def test_dpo_bench_tiny(tmp_path):
    """train.py with training.method dpo on the synthetic pairs, from a fresh SFT adapter of the preset's shape:
    phases that add up, the steps and pairs a step it ran."""
    out = tmp_path / "dpo.json"
    run_script("bench.py", "dpo", "--tiny", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert "DPO from" in Path(row["log"]).read_text()
    phases = ["start_and_imports_s", "data_s", "model_load_quantize_s", "trainer_setup_s", "train_setup_s",
              "first_10_steps_s", "steady_steps_s", "final_eval_s", "save_s"]
    assert abs(sum(row[p] for p in phases) - row["to_final_s"]) < 0.5
    assert row["steps"] == 30 and row["rows_per_step"] == 8 and row["train_sequences"] > 100
    assert row["steady_steps_per_s"] > 0 and row["steady_tokens_per_s"] > 0

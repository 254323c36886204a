"""bench.py train (bench_train.py) runs train.py's builders on the tiny model on the CPU (speed is measured on GPUs,
not here)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_script


pytestmark = pytest.mark.slow  # a process a configuration (make test leaves them out)


def test_training_bench_tiny(tmp_path):
    out = tmp_path / "train.json"
    run_script("bench.py", "train", "--tiny", "--presets", "baseline", "speed", "--profile", "--out", str(out))
    record = json.loads(out.read_text())
    rows = {r["name"]: r for r in record["rows"]}
    assert set(rows) == {"baseline", "speed"} and not any("error" in r for r in rows.values())
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] > 0 and r["loss_last"] > 0
    assert rows["baseline"]["config"]["training"]["packing"] is False
    assert "| baseline |" in record["table"] and record["versions"]["torch"]
    # 2 steps after the timed ones are profiled, not the run's last (its save and finiteness check are not a step's)
    profile = (tmp_path / "bench-train-speed-profile.md").read_text()
    profiled = re.match(r"steps (\d+)-(\d+) of (\d+): wall ", profile)
    assert profiled and int(profiled[2]) < int(profiled[3]) and "aten::mm" in profile

"""bench.py generate runs its real code path on the tiny model on the CPU (speed is measured on GPUs, not here)."""

from __future__ import annotations

import json

import pytest
from conftest import run_script


pytestmark = pytest.mark.slow  # several processes each (make test leaves them out)


def test_generation_bench_tiny(tmp_path):
    out = tmp_path / "gen.json"
    run_script("bench.py", "generate", "--tiny", "--dtypes", "fp32", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["fp32 plain", "fp32 fast"]
    assert rows[1]["greedy_agreement_first64"] == [64, 64]  # the fast path decodes the same tokens (fp32)
    assert rows[1]["max_logit_diff"] < 1e-3

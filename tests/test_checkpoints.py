"""checkpoints.py: a resume starts from the newest checkpoint that is complete; half-written ones are skipped with a
warning that names the problem. (FSDP's sharded checkpoints: tests/test_distributed.py.)"""

from __future__ import annotations

import shutil

from checkpoints import newest_complete_checkpoint


def test_corrupt_newest_checkpoint_is_skipped(smoke_run, tmp_path, caplog):
    good = sorted(smoke_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    out = tmp_path / "out"
    shutil.copytree(good, out / "checkpoint-100")
    for name, damage in (("checkpoint-200", "adapter_model.safetensors"), ("checkpoint-300", "optimizer.pt"),
                         ("checkpoint-400", "trainer_state.json")):
        shutil.copytree(good, out / name)
        path = out / name / damage
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a crash mid-save
    (out / "checkpoint-500").mkdir()  # created, nothing written yet
    with caplog.at_level("WARNING"):
        assert newest_complete_checkpoint(out) == out / "checkpoint-100"
    assert sum("skipping incomplete checkpoint" in r.message for r in caplog.records) == 4

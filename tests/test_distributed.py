"""Data-parallel training through `accelerate launch`: 2 CPU processes (gloo) on the tiny model."""

from __future__ import annotations

import json
import socket

from conftest import run_script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_adapter_on_different_data(tmp_path):
    out = tmp_path / "ddp"
    # --multi_gpu selects the torchrun launcher; without CUDA each process trains on the CPU over gloo.
    proc = run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                      "tests/ddp_probe.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                      "--training.max_steps", "12", "--training.save_steps", "6", "--training.eval_steps", "6",
                      "--training.logging_steps", "3", timeout=600)
    log = proc.stderr
    assert log.count("effective batch: 8 sequences/step = 4 micro-batch x 1 accumulation x 2 process(es)") == 1
    # only the main process writes: one final adapter, one set of checkpoints, one log line per step
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "README.md").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert log.count("adapter saved to") == 1
    assert sum("step 12/12 | loss" in line for line in (proc.stdout + log).splitlines()) == 1
    ranks = [json.loads((out / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    seen0, seen1 = ({tuple(x) for x in r["examples"]} for r in ranks)
    assert seen0 and seen1 and not seen0 & seen1  # each rank trained on its own share of the packed rows

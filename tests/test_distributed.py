"""Data-parallel training through `accelerate launch`: 2 CPU processes (gloo) on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, run_script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(out, *args: str) -> list[str]:
    # --multi_gpu selects the torchrun launcher; without CUDA each process trains on the CPU over gloo.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "tests/ddp_probe.py", "--config", "configs/smoke.yaml", "--training.output_dir",
            str(out), *args]


def test_two_processes_train_one_adapter_on_different_data(tmp_path):
    out = tmp_path / "ddp"
    proc = run_script(*launch_two(out, "--training.max_steps", "12", "--training.save_steps", "6",
                                  "--training.eval_steps", "6", "--training.logging_steps", "3")[1:], timeout=600)
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

    # evaluation is sharded, not repeated: each process scores about half of the validation rows (accelerate pads
    # the last batch of each process with repeated rows, at most one batch of 16; the metrics drop them)
    evaluated = [{tuple(x) for x in r["evaluated"]} for r in ranks]
    rows = ranks[0]["eval_rows"]
    assert len(evaluated[0] | evaluated[1]) == rows > 16
    assert all(len(e) <= rows / 2 + 16 for e in evaluated) and len(evaluated[0] & evaluated[1]) < 16


def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """A SIGTERM that reaches one rank stops every rank at the same step with one checkpoint (before, the other
    rank trained on and waited forever in the next gradient all-reduce)."""
    out = tmp_path / "ddp"
    proc = subprocess.Popen(launch_two(out, "--training.max_steps", "5000", "--training.save_steps", "6",
                                       "--training.eval_steps", "0", "--training.logging_steps", "3"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not ((out / "checkpoint-6" / "trainer_state.json").is_file() and (out / "probe-rank1.json").is_file()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(json.loads((out / "probe-rank1.json").read_text())["pid"], signal.SIGTERM)
    _, err = proc.communicate(timeout=180)  # no hang
    assert "stopped by a signal to another process" in err and "--resume" in err
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert int(newest.name.split("-")[1]) > 6
    assert (newest / "rng_state_0.pth").is_file() and (newest / "rng_state_1.pth").is_file()  # both ranks saved it
    assert not (out / "final").exists()

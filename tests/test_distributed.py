"""Data-parallel training through `accelerate launch`: 2 CPU processes (gloo) on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import shutil
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script


pytestmark = pytest.mark.slow  # several processes each (make test leaves them out)


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


def test_dpo_on_two_processes_writes_one_adapter(smoke_run, tmp_path):
    """training.method dpo through `accelerate launch`: one plan, one log of the effective batch (in pairs), only
    the main process writes checkpoints and the adapter (without TRL's reference copy)."""
    out = tmp_path / "dpo"
    proc = run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                      "train.py", "--config", "configs/smoke-dpo.yaml", "--preference.sft_adapter",
                      str(smoke_run / "final"), "--training.output_dir", str(out), "--training.max_steps", "12",
                      "--training.save_steps", "6", "--training.eval_steps", "6", "--training.logging_steps", "3",
                      timeout=600)
    log = proc.stderr
    assert log.count("effective batch: 16 pairs/step = 8 micro-batch x 1 accumulation x 2 process(es)") == 1
    assert log.count("adapter saved to") == 1 and "Traceback" not in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final" / "ref").exists()


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
    # DDP sends no buffers before each forward: they are the frozen layers' fp8 copies (up to 5 GB), the same on
    # every rank; on 2 H200s the broadcast held the two GPUs at 1.57x one GPU's speed (1.86x without it)
    assert [r["broadcast_buffers"] for r in ranks] == [False, False]
    seen0, seen1 = ({tuple(x) for x in r["examples"]} for r in ranks)
    assert seen0 and seen1 and not seen0 & seen1  # each rank trained on its own share of the packed rows

    # evaluation is sharded, not repeated: each process scores about half of the validation rows (accelerate pads
    # the last batch of each process with repeated rows, at most one batch of 16; the metrics drop them)
    evaluated = [{tuple(x) for x in r["evaluated"]} for r in ranks]
    rows = ranks[0]["eval_rows"]
    assert len(evaluated[0] | evaluated[1]) == rows > 16
    assert all(len(e) <= rows / 2 + 16 for e in evaluated) and len(evaluated[0] & evaluated[1]) < 16


def test_compiled_layers_stop_compiling_when_lengths_vary(tmp_path):
    """Under `accelerate launch` (which exports ACCELERATE_DYNAMO_USE_DYNAMIC=False) every new batch length compiled
    the layers again until dynamo's limit of 8, after which they ran uncompiled: on 2 H200s the speed preset trained
    slower than on one. Compiled with automatic dynamic shapes, new lengths compile nothing after the first few."""
    data = tmp_path / "lengths.jsonl"  # every conversation a different length: each step brings a new shape
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: " + "why " * i},
        {"role": "assistant", "content": "Because so."}]}) + "\n" for i in range(1, 35)))
    out = tmp_path / "ddp"
    proc = run_script(*launch_two(out, "--data.dataset", str(data), "--training.per_device_train_batch_size", "1",
                                  "--training.max_steps", "10", "--training.torch_compile", "on",
                                  "--training.packing", "false", "--training.eval_steps", "0")[1:], timeout=600)
    assert "recompile_limit" not in proc.stderr
    for rank in (0, 1):
        record = json.loads((out / f"probe-rank{rank}.json").read_text())
        lengths, compiled = [len(x) for x in record["examples"]], record["compiled"]
        assert len(set(lengths)) == len(lengths) >= 10 and compiled[-1] > 0  # a new length each step; compile is on
        assert compiled[-1] == compiled[len(compiled) // 2], compiled  # nothing compiled in the second half


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


# ---------------------------------------------------------------------------------------------------------------
# FSDP-QLoRA (configs/accelerate/fsdp_qlora.yaml). accelerate applies FSDP only on accelerators; fsdp_probe.py lifts
# that gate so torch's FSDP2 runs here on 2 CPU processes over gloo (see its docstring).
# ---------------------------------------------------------------------------------------------------------------

FSDP_STEPS = ("--training.max_steps", "8", "--training.save_steps", "4", "--training.eval_steps", "4",
              "--training.logging_steps", "1", "--training.gradient_checkpointing", "true")  # as phi2-fsdp.yaml


def launch_fsdp(script: str, out, *args: str) -> list[str]:
    return ["-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp_qlora.yaml",
            "--num_processes", "2", "--main_process_port", str(free_port()), script, "--config",
            "configs/smoke.yaml", "--quantization.storage", "compute", "--training.output_dir", str(out), *args]


def logged(out, key: str) -> dict[int, float]:
    history = json.loads((out / "final" / "log_history.json").read_text())
    return {h["step"]: h[key] for h in history if key in h}


def adapter_weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def test_fsdp_on_the_cpu_is_refused_with_the_fix(tmp_path):
    """What a user without GPUs gets from the FSDP command: the reason and the fix, before anything loads (before,
    accelerate's plugin raised 'no available devices' from inside the trainer, after the data and the model)."""
    proc = run_script(*launch_fsdp("train.py", tmp_path / "out"), check=False, timeout=300)
    assert proc.returncode != 0
    assert "FSDP runs on CUDA GPUs" in proc.stderr and "configs/accelerate/ddp.yaml" in proc.stderr
    assert "]: Traceback" not in proc.stderr  # no process crashed (torchrun's own report of the exit code follows)
    assert "data train:" not in proc.stderr  # refused before the data and the model were loaded


def test_fsdp_trains_like_ddp_saves_resumes_and_merges(tmp_path):
    """FSDP2 on 2 processes: the same losses as DDP step by step, a complete final/ adapter gathered from the
    shards, checkpoints that --resume continues from with the same steps and data, and an adapter that merges."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_script(*launch_two(ddp, *FSDP_STEPS, "--quantization.storage", "compute")[1:], timeout=600)
    proc = run_script(*launch_fsdp("tests/fsdp_probe.py", fsdp, *FSDP_STEPS), timeout=600)

    ranks = [json.loads((fsdp / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["trained"] > 0 and r["trained_dtensors"] == r["trained"] for r in ranks)
    for key in ("loss", "grad_norm", "eval_loss"):  # sharded, the optimization is the data-parallel one
        want, got = logged(ddp, key), logged(fsdp, key)
        assert got.keys() == want.keys() and len(got) >= 2
        assert all(abs(got[s] - want[s]) <= 1e-3 * max(1.0, abs(want[s])) for s in want), (key, got, want)

    final = fsdp / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "config.yaml", "README.md"):
        assert (final / name).is_file(), name
    weights, reference = adapter_weights(final), adapter_weights(ddp / "final")
    assert weights.keys() == reference.keys() and len(weights) > 0
    assert all(torch.allclose(weights[k], reference[k], atol=1e-4) for k in weights)
    assert proc.stderr.count("adapter saved to") == 1

    # checkpoints are complete by --resume's check, and resuming gives the uninterrupted run's steps and weights
    import train
    assert train.newest_complete_checkpoint(fsdp).name == "checkpoint-8"
    losses = logged(fsdp, "loss")
    shutil.rmtree(fsdp / "checkpoint-8")
    shutil.rmtree(final)
    proc = run_script(*launch_fsdp("tests/fsdp_probe.py", fsdp, *FSDP_STEPS, "--resume"), timeout=600)
    assert "resuming from" in proc.stderr and "checkpoint-4" in proc.stderr
    resumed = logged(fsdp, "loss")
    assert sorted(s for s in resumed if s > 4) == [5, 6, 7, 8]
    assert all(abs(resumed[s] - losses[s]) <= 1e-4 * max(1.0, losses[s]) for s in (5, 6, 7, 8)), (resumed, losses)
    assert all(torch.allclose(adapter_weights(final)[k], weights[k], atol=1e-5) for k in weights)

    # a sharded checkpoint cut short (one process's optimizer shard) is not resumed from
    shard = next((fsdp / "checkpoint-8" / "optimizer_0").glob("__1_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert train.newest_complete_checkpoint(fsdp).name == "checkpoint-4"

    # the gathered adapter merges into the full-precision base and answers like the data-parallel one
    answers = [run_script("inference.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                          "--prompt", "What is the capital of France?").stdout for out in (fsdp, ddp)]
    assert answers[0].strip() and answers[0] == answers[1]


def test_processes_with_different_free_memory_make_one_plan(tmp_path):
    """Each process read its own GPU's free memory before the process group existed: with another job on one GPU,
    the two chose different micro-batch, accumulation or checkpointing, and their gradient syncs no longer met.
    Now every process plans for the smallest budget (2 CPU processes given 80 and 16 GiB)."""
    run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "tests/plan_probe.py", str(tmp_path), timeout=300)
    plans = [json.loads((tmp_path / f"plan-rank{r}.json").read_text()) for r in (0, 1)]
    sources = [plan.pop("budget") for plan in plans]
    assert plans[0] == plans[1], plans
    assert [b for b, _ in sources] == [16.0, 16.0] and all("smallest of the 2 processes" in s for _, s in sources)
    assert plans[0]["checkpointing"] is True  # what 16 GiB allows for Phi-2's shape (80 GiB alone plans without)


def test_a_kill_right_after_fsdp_rotates_checkpoints_leaves_one_to_resume_from(tmp_path):
    """With save_total_limit 1 the Trainer deletes the older checkpoint as soon as the new one has its shards; the
    gathered adapter was written after that (an on_save callback), so a kill in between left no complete checkpoint.
    The adapter now goes in first."""
    import train
    out = tmp_path / "fsdp"
    proc = run_script(*launch_fsdp("tests/fsdp_probe.py", out, *FSDP_STEPS, "--training.save_total_limit", "1"),
                      env={"KILL_AFTER_ROTATION_AT_STEP": "8"}, check=False, timeout=600)
    assert proc.returncode != 0 and not (out / "final").exists()  # it died there
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    assert train.newest_complete_checkpoint(out) == out / "checkpoint-8"

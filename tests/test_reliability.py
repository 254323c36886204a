"""Training survives faults: kill -9 + --resume, SIGTERM, corrupt checkpoints, NaN, OOM; no secrets leak."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, run_script

QUICK = ["--config", "configs/smoke.yaml", "--training.max_steps", "120", "--training.save_steps", "40",
         "--training.eval_steps", "0", "--training.logging_steps", "20"]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *QUICK, "--training.output_dir", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_same_adapter(tmp_path):
    full = tmp_path / "full"
    run_script("train.py", *QUICK, "--training.output_dir", str(full))
    crashed = tmp_path / "crashed"
    proc = start(crashed)
    wait_for(lambda: (crashed / "checkpoint-40" / "trainer_state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "final").exists()
    resumed = run_script("train.py", *QUICK, "--training.output_dir", str(crashed), "--resume")
    assert "resuming from" in resumed.stderr
    a, b = adapter(full / "final"), adapter(crashed / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--training.max_steps", "5000")  # far more steps than the test lets it run
    wait_for(lambda: (out / "checkpoint-40" / "trainer_state.json").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    checkpoint = train.newest_complete_checkpoint(out)
    step = int(checkpoint.name.split("-")[1])
    assert 40 < step < 5000  # a checkpoint written at the interrupt, newer than the scheduled one
    run_script("train.py", *QUICK, "--training.output_dir", str(out), "--training.max_steps", str(step + 10),
               "--resume")
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_script("train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out),
                      "--training.learning_rate", "1e4", "--training.max_grad_norm", "0", "--training.warmup_ratio",
                      "0.5", "--training.save_steps", "2", "--training.logging_steps", "1", "--training.max_steps",
                      "60", "--training.eval_steps", "0", check=False)
    assert proc.returncode == 3
    assert "became nan" in proc.stderr.lower() and "learning rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "final").exists()
    checkpoints = list(out.glob("checkpoint-*"))
    assert checkpoints, "expected good checkpoints before the blow-up"
    for cp in checkpoints:
        assert all(torch.isfinite(t).all() for t in adapter(cp).values()), cp
    assert str(train.newest_complete_checkpoint(out)) in proc.stderr


OOM_AFTER = """
import os, torch, transformers
_steps, _real = [0], transformers.Trainer.training_step
def training_step(self, *args, **kwargs):  # the GPU runs out of memory in step N + 1, as a larger batch would
    _steps[0] += 1
    if _steps[0] > int(os.environ["OOM_AFTER_STEPS"]):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _real(self, *args, **kwargs)
transformers.Trainer.training_step = training_step
"""


@pytest.mark.slow
def test_out_of_memory_names_the_knobs_keeps_the_checkpoints_and_resumes(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OOM_AFTER)  # runs inside train.py's own process
    out = tmp_path / "run"
    proc = run_script("train.py", *QUICK, "--training.output_dir", str(out), check=False,
                      env={"PYTHONPATH": str(hook), "OOM_AFTER_STEPS": "50"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    for knob in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                 "gradient_checkpointing", "phi2-lowmem.yaml", "--resume"):
        assert knob in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "final").exists()
    assert train.newest_complete_checkpoint(out) == out / "checkpoint-40"  # the work so far is intact
    resumed = run_script("train.py", *QUICK, "--training.output_dir", str(out), "--resume")
    assert "resuming from" in resumed.stderr and "checkpoint-40" in resumed.stderr
    assert max(h["step"] for h in json.loads((out / "final" / "log_history.json").read_text())) == 120


@pytest.mark.slow
def test_nothing_usable_fails_before_loading_the_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"message_id": "a", "parent_id": null, "text": "hi", "role": "prompter", "deleted": true}\n')
    proc = run_script("train.py", "--config", "configs/smoke.yaml", "--data.dataset", str(bad),
                      "--training.output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1 and "no usable training conversations" in proc.stderr
    assert "loading the base" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_no_secrets_in_outputs(tmp_path):
    """Neither the Hub token a user exports nor the app password in a config file lands in anything a run writes:
    configs, run records, model card, TensorBoard event files, checkpoints, logs."""
    token, password = "hf_THIS_IS_A_SECRET_TOKEN", "pw-THIS-IS-A-SECRET"
    config = tmp_path / "with-auth.yaml"
    config.write_text((ROOT / "configs" / "smoke.yaml").read_text() + f"app:\n  auth: me:{password}\n")
    out = tmp_path / "secret-run"
    proc = run_script("train.py", "--config", str(config), "--training.max_steps", "6", "--training.save_steps", "3",
                      "--training.eval_steps", "3", "--training.logging_steps", "1", "--training.report_to",
                      "tensorboard", "--training.output_dir", str(out),
                      env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
    run_script("evaluate.py", "--config", str(config), "--training.output_dir", str(out), "--num-prompts", "2",
               "--no-base", "--reports-dir", str(out / "reports"))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files) and (out / "final" / "config.yaml").is_file()
    for secret in (token, password):
        assert secret not in proc.stdout + proc.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), path

"""training_callbacks.py: what train.py's Trainer does at each step beside training. (The guard's stops on a
non-finite loss and on SIGTERM run end to end in tests/test_reliability.py and tests/test_distributed.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from conftest import run_script
from training_callbacks import PhaseClock


def test_the_phase_clock_splits_the_time_to_the_adapter_into_phases_that_add_up(tmp_path, monkeypatch):
    """run.json's timing (PhaseClock.summary): each phase from the end of the one before, their sum the total, and
    the steady tokens/s from the logs after the first steps (the compilation) only."""
    import training_callbacks
    now = [100.0]
    monkeypatch.setattr(training_callbacks, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock = PhaseClock()
    args, state, control = TrainingArguments(str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    state.max_steps = 30
    for name, at in (("data", 2.0), ("model", 7.0), ("trainer", 8.0)):
        now[0] = 100.0 + at
        clock.mark(name)
    now[0] = 109.0
    clock.on_train_begin(args, state, control)
    for step in range(1, 31):  # 10 slow steps (compiling), then 20 steps of 1 s and 1,000 tokens
        now[0] += 3.0 if step <= PhaseClock.FIRST_STEPS else 1.0
        state.global_step = step
        clock.on_step_end(args, state, control)
        clock.on_log(args, state, control, logs={"loss": 1.0, "num_tokens": 1000.0 * step})
    clock.on_train_end(args, state, control)
    now[0] += 0.5
    clock.mark("saved")
    summary = clock.summary()
    phases = {k: v for k, v in summary.items() if k not in ("total_s", "steady_tokens_per_s")}
    assert phases == {"data_s": 2.0, "model_load_quantize_s": 5.0, "trainer_setup_s": 1.0, "train_setup_s": 1.0,
                      "first_10_steps_s": 30.0, "steady_steps_s": 20.0, "save_s": 0.5}
    assert summary["total_s"] == pytest.approx(sum(phases.values()))
    assert summary["steady_tokens_per_s"] == pytest.approx(1000.0)  # not pulled down by the compiling steps


@pytest.mark.slow  # a compiled training run, as the other compiled-training tests
def test_training_metrics_stay_training_metrics_after_a_compiled_evaluation(tmp_path):
    """With torch.compile the Trainer trains a copy of the model object; an evaluation left trl reading the original
    as in eval mode, so every later training log carried eval_* metrics and the token count stopped (seen on the
    H200 as log lines without tok/s). Training logs after an evaluation keep their own metrics and count on."""
    out = tmp_path / "run"
    run_script("train.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(out), "--training.max_steps",
               "12", "--training.logging_steps", "4", "--training.eval_steps", "4", "--training.torch_compile", "on")
    history = json.loads((out / "final" / "log_history.json").read_text())
    train_logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in train_logs] == [4, 8, 12]
    assert all("mean_token_accuracy" in h and not any(k.startswith("eval_") for k in h) for h in train_logs)
    tokens = [h["num_tokens"] for h in train_logs]
    assert tokens[0] < tokens[1] < tokens[2]

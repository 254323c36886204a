"""What train.py's Trainer does at each step beside training: the log line (CompactLog), where the time to the
adapter goes (PhaseClock), the model put back in training mode after an evaluation, and the guard that stops on a
non-finite loss and turns SIGTERM/Ctrl-C into a checkpoint and an exit (Guard)."""

from __future__ import annotations

import logging
import math
import signal
import time

import torch
import torch.distributed as dist
from transformers import ProgressCallback, TrainerCallback

logger = logging.getLogger(__name__)


class CompactLog(ProgressCallback):
    """Progress bar plus one line per logging step: loss, lr, tokens/s, peak memory."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.last = (time.perf_counter(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), logs.get("num_tokens", self.last[1])
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("learning_rate", "lr {:.2e}"),
                         ("grad_norm", "grad_norm {:.3f}")):
            if key in logs:
                parts.append(fmt.format(logs[key]))
        if "loss" in logs and tokens > self.last[1]:
            # num_tokens counts every non-padding token of all processes
            parts.append(f"{(tokens - self.last[1]) / (now - self.last[0]):,.0f} tok/s")
            self.last = (now, tokens)
        parts.append(f"peak mem {peak_memory_gib(self.device):.2f} GiB")
        line = " | ".join(parts)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (resident set, CPU)


class PhaseClock(TrainerCallback):
    """Where the time to the adapter goes: set-up phases, the first steps (compilation), steady steps, the end.

    Marks are taken on the host; it still waits for the GPU a few times a step (transformers' packed-sequence check
    before the layers, trl's selection of the labelled positions for the LM head), so it is never a step ahead. The
    first FIRST_STEPS steps of this process (resumed or not) hold the compilation. The steady rate counts the tokens
    trl logs (`num_tokens`, every process's non-padding tokens) between the first log after them and the last log."""

    FIRST_STEPS = 10

    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.logs: list[tuple[float, float]] = []  # (time, num_tokens)
        self.steps = 0

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark("train_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if "first_steps" not in self.marks and (self.steps == self.FIRST_STEPS or state.global_step >= state.max_steps):
            self.mark("first_steps")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs and "loss" in logs:
            self.logs.append((time.perf_counter(), float(logs["num_tokens"])))

    def on_train_end(self, args, state, control, **kwargs):
        self.mark("train_end")

    def summary(self) -> dict[str, float]:
        """Seconds per phase (they add up to total_s) and the steady tokens/s."""
        m, t = self.marks, self.start
        order = ["data", "model", "trainer", "train_begin", "first_steps", "train_end", "final_eval", "saved"]
        names = {"data": "data_s", "model": "model_load_quantize_s", "trainer": "trainer_setup_s",
                 "train_begin": "train_setup_s", "first_steps": f"first_{self.FIRST_STEPS}_steps_s",
                 "train_end": "steady_steps_s", "final_eval": "final_eval_s", "saved": "save_s"}
        out = {}
        for name in order:
            if name in m:
                out[names[name]] = round(m[name] - t, 3)
                t = m[name]
        out["total_s"] = round(t - self.start, 3)
        steady = [entry for entry in self.logs if entry[0] >= m.get("first_steps", float("inf"))]
        if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
            out["steady_tokens_per_s"] = round((steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]), 1)
        return out


class TrainModeAfterEvaluation(TrainerCallback):
    """Puts the model trl reads back in training mode after an evaluation.

    With torch.compile (accelerate's regional compilation) the Trainer trains a shallow copy of the model object
    that shares its layers: `.train()` on the copy reaches every layer but not the original's own flag, which an
    evaluation had set to eval. trl reads that flag to tell training from evaluation, so without this every later
    training log carried eval_* metrics and the token count stopped. The layers themselves (dropout) were in
    training mode either way."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not model.training:
            model.train()


class Guard(TrainerCallback):
    """Stops on non-finite loss/weights without saving them, and turns SIGTERM/Ctrl-C into save-and-exit.

    Under several processes a signal reaches one of them (a scheduler, a user's kill), but all must stop at the same
    step: the flag is shared with one all-reduce per optimizer step, so every process saves the same checkpoint and
    exits, instead of the others waiting forever in the next gradient all-reduce."""

    def __init__(self):
        self.diverged: str | None = None
        self.interrupted: str | None = None

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.interrupted:  # a second signal: stop now, the last checkpoint stays
                raise KeyboardInterrupt
            self.interrupted = signal.Signals(signum).name
            logger.warning("%s received: saving a checkpoint at the end of this step, then exiting "
                           "(send it again to stop at once)", self.interrupted)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _on_any_process(flag: bool) -> bool:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        shared = torch.tensor([int(flag)], device=device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        return bool(shared.item())

    @staticmethod
    def _weights_finite(model) -> bool:
        return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                self.diverged = f"{key} became {value} at step {state.global_step}"
                control.should_training_stop, control.should_save = True, False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._on_any_process(self.interrupted is not None):
            self.interrupted = self.interrupted or "a signal to another process"
            control.should_save, control.should_training_stop = True, True
        if (control.should_save or self.diverged) and model is not None and not self._weights_finite(model):
            self.diverged = self.diverged or f"adapter weights became non-finite by step {state.global_step}"
        if self.diverged:
            control.should_save, control.should_training_stop = False, True

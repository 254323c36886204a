"""Where the training step waits for the GPU: every host wait (cudaStreamSynchronize and kin) of two steps of a
preset, with the thread, the operators around it and the Python stack, and the syncs torch's sync debug mode reports
with their Python stacks. Written for the ~196 waits a step that bench.py's profiles showed ("after a wait ... in ?"):
they were the run's last step (its save's finiteness check), which those profiles included; log:
docs/bench/h200-train-syncs-2026-11-30.log.

    python docs/bench/train_syncs.py [preset] [--model-dir /tmp/phi2]     # on a CUDA GPU, from the repo root
"""
import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, ".")
import bench  # noqa: E402
import train  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

WARMUP = 3


class Watch(TrainerCallback):
    def __init__(self):
        self.prof = None
        self.stacks = collections.Counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == WARMUP and self.prof is None:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA], with_stack=True)
            self.prof.__enter__()
        if state.global_step == WARMUP + 2:  # the step after the profiled two
            warnings.simplefilter("always")
            self._show = warnings.showwarning
            warnings.showwarning = lambda message, *a, **k: self.stacks.update(
                [str(message)[:100] + "\n" + "".join(traceback.format_stack(limit=14)[:-2])])
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP + 2 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            report(self.prof)
        if state.global_step == WARMUP + 3:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self._show
            print(f"\n## sync debug mode, step {WARMUP + 3}: {sum(self.stacks.values())} warnings")
            for stack, n in self.stacks.most_common(12):
                print(f"\n### {n} x\n{stack}")


def report(prof) -> None:
    events = prof.events()
    waits = [e for e in events if e.name.startswith(bench.SYNCS)]
    print(f"## profiler: {len(waits)} host waits in 2 steps")
    kinds = collections.Counter()
    for e in waits:
        chain, p = [], e.cpu_parent
        while p is not None and len(chain) < 8:
            chain.append(p.name[:90])
            p = p.cpu_parent
        frames, p = [], e
        while p is not None and not frames:
            frames = [f for f in (getattr(p, "stack", None) or []) if "/torch/" not in f][:4]
            p = p.cpu_parent
        kinds[(e.name, e.thread, " <- ".join(chain) or "(no parent)", " | ".join(frames))] += 1
    for (name, thread, chain, frames), n in kinds.most_common(15):
        print(f"{n} x {name} thread {thread}: {chain}\n    python: {frames or '?'}")
    # The host operators running when each wait began, by thread: what was the process doing
    threads = collections.Counter(e.thread for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    print("host events by thread:", dict(threads))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset", nargs="?", default="speed")
    parser.add_argument("--model-dir", default="/tmp/phi2")
    args = parser.parse_args()
    name, values = bench.preset_values(args.preset)
    model_path = bench.make_random_phi2(Path(args.model_dir))
    build = train.build_trainer

    def build_watched(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(Watch())
        return trainer

    train.build_trainer = build_watched
    bench.run_train_config(name, values, model_path, steps=3, warmup=WARMUP, tiny=False)


if __name__ == "__main__":
    main()

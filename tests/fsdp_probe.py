"""Runs train.main under `accelerate launch` with FSDP applied on the CPU (gloo), for tests/test_distributed.py.

accelerate 1.15 applies FSDP only on accelerators: on the CPU its state falls back to plain multi-process training
(MULTI_CPU), and train.py refuses FSDP there with the fix. torch's own FSDP2 (`fully_shard`) does run on the CPU
over gloo, so this test helper lifts those two gates and nothing else: the FSDP2 sharding, the sharded checkpoints,
the adapter gathering and `--resume` are the real code paths users run on GPUs. It records, per rank, whether the
trained parameters are sharded DTensors (proof that FSDP was applied) and the process id.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import accelerate.state
from accelerate.utils import DistributedType
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402

init_state = accelerate.state.AcceleratorState.__init__


def init_state_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        self.device = torch.device("cpu")  # MULTI_CPU names it cpu:<rank>, which FSDP refuses as a device id


accelerate.state.AcceleratorState.__init__ = init_state_with_fsdp_on_cpu
train.FSDP_DEVICES = ("cuda", "cpu")

build_trainer = train.build_trainer


class RecordSharding(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor
        trained = [p for p in model.parameters() if p.requires_grad]
        out = Path(args.output_dir) / f"fsdp-rank{os.environ.get('RANK', '0')}.json"
        out.write_text(json.dumps({"pid": os.getpid(), "world_size": args.world_size,
                                   "trained_dtensors": sum(isinstance(p, DTensor) for p in trained),
                                   "trained": len(trained)}))


def recording_build_trainer(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainer.add_callback(RecordSharding())
    return trainer


train.build_trainer = recording_build_trainer

if os.environ.get("KILL_AFTER_ROTATION_AT_STEP"):  # a kill -9 just after the Trainer deleted older checkpoints
    import transformers.trainer
    rotate = transformers.trainer.rotate_checkpoints

    def rotate_then_die(output_dir, *args, **kwargs):
        rotate(output_dir, *args, **kwargs)
        newest = max(int(p.name.split("-")[-1]) for p in Path(output_dir).glob("checkpoint-*"))
        if newest == int(os.environ["KILL_AFTER_ROTATION_AT_STEP"]):
            os._exit(137)

    transformers.trainer.rotate_checkpoints = rotate_then_die

if __name__ == "__main__":
    train.end_process(train.main())

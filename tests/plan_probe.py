"""Runs training_plan.decide_training under `accelerate launch` as a GPU run would, with each rank given its own free memory
(rank 0: 80 GiB, rank 1: 16 GiB: another job on its GPU), and writes the plan each rank chose.

Test helper only (tests/test_distributed.py): the GPU's memory readings and Phi-2's shape are stand-ins, the
decision is train.py's own (training_plan.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402
import training_plan  # noqa: E402
from config import parse_config  # noqa: E402
from model_utils import DeviceChoice  # noqa: E402
from train import end_process  # noqa: E402
from transformers import PhiConfig  # noqa: E402

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    training_plan.memory_budget_gib = lambda t: ((80.0, "free 80.0 of 80.0 GiB") if rank == 0 else
                                                 (16.0, "free 16.0 of 80.0 GiB"))
    training_plan.load_model_config = lambda model_cfg: PhiConfig(**bench.PHI2_CONFIG)
    cfg, _ = parse_config(["--config", "configs/phi2-oasst1.yaml"])
    try:
        plan = training_plan.decide_training(cfg, DeviceChoice("cuda", torch.bfloat16, "stand-in", (9, 0)))
        t = plan.training
        Path(sys.argv[1], f"plan-rank{rank}.json").write_text(json.dumps({
            "micro_batch": t.per_device_train_batch_size, "accumulation": t.gradient_accumulation_steps,
            "checkpointing": t.gradient_checkpointing, "compiled": plan.compiled, "budget": plan.budget}))
    finally:
        # the process group decide_training joined (shared_budget), left while Python is whole, as train.py's main
        # leaves it: left to interpreter exit a rank can die with SIGABRT (train.leave_process_group says why)
        if dist.is_initialized():
            dist.destroy_process_group()
    end_process(0)  # without the interpreter's teardown, as train.py ends a distributed run

"""Runs train.main under `accelerate launch` and records, per rank, the token ids that rank trained on.

Test helper only (tests/test_distributed.py): it wraps the trainer's collator after train.py builds it, so the
production code stays as users run it. It also records the rank's process id (to signal one rank), the rows it
evaluated (to see evaluation sharded, not repeated) and how many graphs torch.compile had made at each batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402

build_trainer = train.build_trainer


def recording_build_trainer(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    from torch._dynamo.utils import counters
    collate, seen, evaluated, evaluating, compiled = trainer.data_collator, [], [], [False], []
    evaluate = trainer.evaluate

    def recording_evaluate(*args, **kwargs):
        evaluating[0] = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluating[0] = False

    def record(examples):
        (evaluated if evaluating[0] else seen if trainer.model.training else []).extend(
            e["input_ids"] for e in examples)
        rank = int(os.environ.get("RANK", "0"))
        out = Path(trainer.args.output_dir) / f"probe-rank{rank}.json"
        # written whole, then renamed: a test reading it while training goes on never sees a half-written file (one
        # CI run read an empty one)
        partial = out.with_suffix(".tmp")
        if trainer.model.training:  # graphs torch.compile has made so far, as each training batch is collated
            compiled.append(counters["stats"]["unique_graphs"])
        partial.write_text(json.dumps({"world_size": trainer.args.world_size, "pid": os.getpid(), "examples": seen,
                                       "compiled": compiled,
                                       "broadcast_buffers": getattr(trainer.model_wrapped, "broadcast_buffers", None),
                                       "evaluated": evaluated,
                                       "eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset else 0}))
        os.replace(partial, out)
        return collate(examples)

    trainer.data_collator = record
    trainer.evaluate = recording_evaluate
    return trainer


train.build_trainer = recording_build_trainer

if __name__ == "__main__":
    train.end_process(train.main())

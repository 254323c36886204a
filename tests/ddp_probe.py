"""Runs train.main under `accelerate launch` and records, per rank, the token ids that rank trained on.

Test helper only (tests/test_distributed.py): it wraps the trainer's collator after train.py builds it, so the
production code stays as users run it.
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
    collate, seen = trainer.data_collator, []

    def record(examples):
        if trainer.model.training:  # training batches only; evaluation shards are checked by the Trainer itself
            seen.extend(e["input_ids"] for e in examples)
        rank = int(os.environ.get("RANK", "0"))
        out = Path(trainer.args.output_dir) / f"probe-rank{rank}.json"
        out.write_text(json.dumps({"world_size": trainer.args.world_size, "examples": seen}))
        return collate(examples)

    trainer.data_collator = record
    return trainer


train.build_trainer = recording_build_trainer

if __name__ == "__main__":
    sys.exit(train.main())

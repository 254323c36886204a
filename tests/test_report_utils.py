"""report_utils.py: the loss-curve PNG and the model card a user shares."""

from __future__ import annotations

from PIL import Image

import report_utils
from config import Config

HISTORY = [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 1.5}, {"step": 20, "eval_loss": 1.7},
           {"step": 30, "loss": 1.0}, {"step": 30, "eval_loss": 1.2}]
STATS = {"split": "by tree id", "train": {"conversations": 100, "deleted": 3, "cycle": 1},
         "validation": {"conversations": 5}}


def test_loss_plot_is_a_png_with_both_curves(tmp_path):
    assert report_utils.loss_points(HISTORY) == ([(10, 2.5), (20, 1.5), (30, 1.0)], [(20, 1.7), (30, 1.2)])
    path = report_utils.write_loss_plot(HISTORY, tmp_path / "loss.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (700, 400)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # something was drawn


def test_model_card_has_counts_hyperparameters_and_no_local_paths(tmp_path):
    cfg = Config()
    cfg.model.name_or_path = "/home/alice/models/phi-2"
    cfg.data.dataset = "/home/alice/data/oasst1"
    eval_metrics = {"base": {"answer_loss": 2.0}, "finetuned": {"answer_loss": 1.2, "stop_rate": 0.9}}
    text = report_utils.write_model_card(tmp_path / "README.md", cfg, STATS, HISTORY, "H200 supports bf16",
                                         eval_metrics).read_text()
    assert "/home/alice" not in text and "phi-2" in text and "oasst1" in text
    assert "| deleted | 3 |" in text and "| cycle | 1 |" in text and "| conversations | 5 |" in text
    assert "Final train loss: 1.0000 (step 30)" in text and "Final eval loss: 1.2000 (step 30)" in text
    assert "| answer_loss | 2.0000 | 1.2000 |" in text and "| learning_rate | 0.0002 |" in text
    assert "### Human:" in text and "Intended use and limits" in text

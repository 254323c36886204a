"""LoRA adapters: the LoraConfig builder, the target-module check, and checks that an adapter fits its base.

Phi-2's layers were renamed in transformers (`Wqkv`/`out_proj` -> `q_proj,k_proj,v_proj,dense`); recipes with the
old names silently trained nothing, so a target that matches no linear layer is an error listing the real ones.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open

from config import LoraSettings
from data_utils import turn_prompt_text

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


class AdapterError(ValueError):
    """The adapter folder is missing, unsafe, or does not fit the base model."""


def build_lora_config(cfg: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers an adapter can target (bitsandbytes layers subclass nn.Linear)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise AdapterError(
            f"lora.target_modules {missing} match no linear layer of this model. Its linear layers are: "
            f"{', '.join(available)} (Phi-2 in transformers: q_proj, k_proj, v_proj, dense, fc1, fc2; the old "
            "remote-code names Wqkv/out_proj no longer exist)")


def log_trainable_parameters(model) -> tuple[int, int]:
    """Logs and returns (trainable, total); peft counts 4-bit packed weights at their real size."""
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return trainable, total


def read_adapter_config(adapter_dir: str | Path, allow_pickle: bool = False) -> dict:
    """The adapter's config, after checking the folder holds safetensors weights (pickle only when allowed)."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"no adapter at {str(path)!r}: train one with `python train.py --config <your config>` "
                           "(it writes <training.output_dir>/final), or pass --inference.adapter <folder>")
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}: it is not a peft adapter folder "
                           "(point --inference.adapter at <training.output_dir>/final or a checkpoint-<step>)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / PICKLE_WEIGHTS).is_file() and not allow_pickle:
            raise AdapterError(f"{path} holds only {PICKLE_WEIGHTS} (pickle, which can run code when loaded). "
                               "Convert it to safetensors, or pass --allow-pickle if you trust its source")
        if not (path / PICKLE_WEIGHTS).is_file():
            raise AdapterError(f"{path} has no {ADAPTER_WEIGHTS}: the adapter was not saved completely")
    return json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def _same_base(a: str, b: str) -> bool:
    """Hub id vs a local copy of it: compare the last path component (phi-2 == /models/phi-2)."""
    return Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


def check_adapter_base(adapter_dir: str | Path, base_name: str, adapter_config: dict) -> None:
    """Fail naming both when the adapter records another base (checked before any weights are loaded)."""
    trained_on = adapter_config.get("base_model_name_or_path")
    if trained_on and not _same_base(trained_on, base_name):
        raise AdapterError(f"the adapter in {adapter_dir} was trained on {trained_on!r} but the base model is "
                           f"{base_name!r}; load it with --model.name_or_path {trained_on}")


def check_adapter_fits(adapter_dir: str | Path, base_name: str, model: torch.nn.Module,
                       adapter_config: dict) -> None:
    """Fail naming both sides when the adapter was trained on another base or its shapes do not fit."""
    check_adapter_base(adapter_dir, base_name, adapter_config)
    trained_on = adapter_config.get("base_model_name_or_path") or "?"
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(name)
            shape = f.get_slice(key).get_shape()
            if module is None or not hasattr(module, "in_features"):
                raise AdapterError(f"the adapter in {adapter_dir} (trained on {trained_on!r}) has weights for "
                                   f"{name!r}, which the base {base_name!r} does not have")
            want = module.in_features if ".lora_A." in key else module.out_features
            got = shape[1] if ".lora_A." in key else shape[0]
            if want != got:
                raise AdapterError(f"the adapter in {adapter_dir} (trained on {trained_on!r}) does not fit the base "
                                   f"{base_name!r}: {name} has {got} features in the adapter but {want} in the base")


# peft 0.21.2 reads a model's old `is_gradient_checkpointing` name whenever it wraps one, and transformers 5 answers
# with this FutureWarning each time: a line every run would show its user about the libraries, not the run. Filtered
# around the adapter's load here, and for the whole run in train.py (trl wraps the model too).
PEFT_OLD_NAME_WARNING = r"`is_gradient_checkpointing` is deprecated"


# The merge check: merged and unmerged fp32 logits may differ only by rounding. Both compute the same sums in another
# order (W x + B A x vs (W + B A) x), and fp32 keeps ~7 significant digits (reordering Phi-2's layers moved fp32
# logits by about a tenth of this: docs/PERFORMANCE.md). A broken merge is far above it: bf16 rounding alone is ~40x
# more, a non-finite adapter weight gives NaN.
MERGE_TOLERANCE = 1e-4


def probe_ids(tokenizer) -> torch.Tensor:
    text = turn_prompt_text("What is a good way to learn a new language?", first=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def merge_adapter(base, adapter_dir: str | Path, tokenizer) -> tuple[torch.nn.Module, float]:
    """Attach + merge; returns (merged model, max |logit difference| vs the unmerged PeftModel on a probe).

    Raises AdapterError when the difference is more than rounding (MERGE_TOLERANCE of the largest |logit|) or not
    finite: the merged model would not be the model that was trained."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_OLD_NAME_WARNING, category=FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_model.eval()
    probe = probe_ids(tokenizer).to(base.device)
    with torch.inference_mode():
        before = peft_model(probe).logits.float()
        merged = peft_model.merge_and_unload()
        after = merged(probe).logits.float()
    diff = float((before - after).abs().max())
    allowed = MERGE_TOLERANCE * max(1.0, float(before.abs().max()))
    if not diff <= allowed:  # NaN fails too
        raise AdapterError(
            f"merging the adapter in {adapter_dir} changed the model's output: max |logit difference| merged vs "
            f"unmerged is {diff:.3g} on a probe, above the rounding tolerance {allowed:.3g} ({MERGE_TOLERANCE:g} of "
            "the largest |logit|). The adapter holds non-finite or corrupt weights, or does not belong to this base. "
            "Use an earlier checkpoint (--inference.adapter <output_dir>/checkpoint-<step>) or retrain")
    return merged, diff

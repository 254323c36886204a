"""Tokenizer and model loading, and the one device/dtype decision every entry point logs at start.

Loading works from a Hub id (optionally pinned to a revision) or a local folder; `trust_remote_code` stays off by
default because Phi-2 is native in transformers.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from config import ModelConfig
from data_utils import CHAT_TEMPLATE

logger = logging.getLogger(__name__)

class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says how to point at a local copy."""


DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DeviceChoice:
    device: str          # "cuda" or "cpu"
    dtype: torch.dtype   # compute dtype: AMP dtype for training and the 4-bit compute dtype
    reason: str
    capability: tuple[int, int] | None = None  # the GPU's compute capability (None on the CPU)

    @property
    def name(self) -> str:
        return {v: k for k, v in DTYPE_NAMES.items()}[self.dtype]


def decide_device_dtype(requested: str, cuda_available: bool | None = None,
                        cuda_capability: tuple[int, int] | None = None, gpu_name: str = "") -> DeviceChoice:
    """Device and compute dtype for training, with the reason (logged once at start).

    bf16 where the GPU has it natively (Ampere, sm_80, and newer). On older GPUs (T4, V100) fp16 is not offered:
    Phi-2's attention overflows in fp16 and trl stores QLoRA adapters in bf16, which the fp16 grad scaler refuses;
    those GPUs compute in fp32 instead (slower, correct). The CPU computes in fp32.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "fp16":
        raise ValueError("model.dtype fp16 is refused for training (Phi-2 overflows in fp16 and trl's bf16 QLoRA "
                         "adapters break the fp16 grad scaler); use model.dtype auto")
    if not cuda_available:
        if requested == "bf16":
            return DeviceChoice("cpu", torch.bfloat16, "bf16 on the CPU as requested (slow; fp32 is the default)")
        return DeviceChoice("cpu", torch.float32, "no CUDA GPU: the CPU computes in fp32")
    if cuda_capability is None:
        cuda_capability = torch.cuda.get_device_capability()
        gpu_name = torch.cuda.get_device_name()
    has_bf16 = cuda_capability >= (8, 0)
    where = f"{gpu_name or 'GPU'} (sm_{cuda_capability[0]}{cuda_capability[1]})"
    if requested == "fp32":
        return DeviceChoice("cuda", torch.float32, f"fp32 on {where} as requested", cuda_capability)
    if has_bf16:
        return DeviceChoice("cuda", torch.bfloat16, f"{where} supports bf16", cuda_capability)
    if requested == "bf16":
        raise ValueError(f"model.dtype bf16 was requested but {where} has no native bf16 (needs sm_80+, e.g. A100, "
                         "L4, RTX 30xx); use model.dtype auto, which computes in fp32 on this GPU")
    return DeviceChoice("cuda", torch.float32,
                        f"{where} has no bf16 and fp16 overflows in Phi-2's attention: computing in fp32 "
                        "(correct, ~2x slower than bf16 would be)", cuda_capability)


def resolve_compile(requested: str, choice: DeviceChoice, gradient_checkpointing: bool = False,
                    log: bool = True) -> bool:
    """torch.compile for training: on by default where it pays (bf16 GPUs with Triton), never forced on the CPU.

    auto also stays off with gradient checkpointing: on torch 2.11 (H200, 2026-11) inductor failed to partition
    the checkpointed graph ("Node add_N was invalid, but is output"); `on` still tries it.
    """
    if requested == "off":
        return False
    try:
        import triton  # noqa: F401  (inductor's GPU backend)
        has_triton = True
    except ImportError:
        has_triton = False
    if requested == "on":
        if choice.device == "cuda" and not has_triton:
            raise ValueError("training.torch_compile on needs Triton (pip install triton); use auto or off")
        return True
    enabled = choice.device == "cuda" and choice.dtype == torch.bfloat16 and has_triton and not gradient_checkpointing
    if choice.device == "cuda" and not enabled and log:
        why = ("Triton is not installed" if not has_triton else "no bf16 on this GPU"
               if choice.dtype != torch.bfloat16 else "gradient checkpointing is on")
        logger.info("torch.compile off (auto): %s", why)
    return enabled


def resolve_attention(requested: str, choice: DeviceChoice, packing: bool, compiled: bool) -> str:
    """The attention kernel. Packed rows on a bf16 GPU: varlen (FlashAttention-2 inside PyTorch, nothing to
    compile); elsewhere sdpa. flex_attention stays available on request.

    Packing is safe with every choice: varlen attends within the packed conversations' boundaries, and sdpa and
    flex get a block-diagonal mask that transformers builds from the position ids the packing collator emits.
    """
    if requested == "flex_attention" and choice.device != "cuda":
        raise ValueError("model.attn_implementation flex_attention needs a CUDA GPU (its backward does not run on "
                         "the CPU); use sdpa or auto")
    if requested == VARLEN and choice.device == "cuda" and choice.dtype == torch.float32:
        raise ValueError("model.attn_implementation varlen needs bf16 compute on the GPU (FlashAttention has no fp32 "
                         "kernel); use auto, which picks sdpa for fp32")
    if requested != "auto":
        return requested
    if choice.device == "cuda" and choice.dtype == torch.bfloat16 and packing:
        return VARLEN
    return "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# Packed-sequence attention
# ----------------------------------------------------------------------------------------------------------------

VARLEN = "varlen"  # the name this repo registers with transformers' AttentionInterface


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs):
    """Attention over a padding-free packed row: each conversation attends causally to itself only.

    query/key/value: (1, heads, total tokens, head dim); returns ((1, total tokens, heads, head dim), None) as
    transformers' attention functions do. trl's padding-free collator passes the conversations' boundaries
    (`cu_seq_lens_q`, (conversations + 1,) int32, and the longest length `max_length_q`), computed on the host, so no
    step waits on the GPU for them. On a GPU the kernel is PyTorch's own FlashAttention-2 varlen kernel
    (torch.nn.attention.varlen): no mask is built (sdpa needs a (tokens x tokens) one for a packed row) and nothing
    is compiled (flex attention's Triton kernels took minutes to compile: docs/PERFORMANCE.md). On the CPU (tests)
    each conversation goes through sdpa on its own: the same result, slowly. Rows that are not packed (padded batches,
    generation with a cache) take transformers' sdpa path unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    packed_row = query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1 and attention_mask is None
    if packed_row and cu_seq_lens_q is None and position_ids is not None:
        # Packed by someone other than trl's collator: the boundaries from the restarting position ids (a host sync)
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
        (cu_seq_lens_q, _), (max_length_q, _) = prepare_fa_kwargs_from_position_ids(position_ids)
        max_length_q = int(max_length_q)
    if not packed_row or cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("varlen attention has no attention dropout; set attention_dropout 0 (Phi-2's is 0) or "
                         "use model.attn_implementation sdpa")
    device = query.device.type
    # Under autocast the rotary part of q/k can come out in fp32 while v is bf16; the kernel wants one 16-bit dtype.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (tokens, heads, head dim)
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16):
        out = _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, int(max_length_q),
                            scaling)
    else:
        out = torch.empty_like(q)
        bounds = cu_seq_lens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            # (heads, n, head dim) each; one conversation attends causally to itself
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                is_causal=True, scale=scaling).transpose(0, 1)
    return out.unsqueeze(0), None


def _flash_varlen(q, k, v, cu_seq_lens: torch.Tensor, max_length: int, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scale, **_varlen_causal())


@functools.cache
def _varlen_causal() -> dict:
    """torch 2.13 spells causal as window_size=(-1, 0); torch 2.10/2.11 (the lent GPU's image) as is_causal=True."""
    from torch.nn.attention.varlen import varlen_attn
    return {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters \
        else {"is_causal": True}


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask transformers builds for varlen: none for a padding-free row (its boundaries come with the batch),
    sdpa's padding mask for a padded batch."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent; called before loading a model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)


def local_or_hub(name: str) -> str:
    """An existing local folder as an absolute path, else the Hub id unchanged. The adapter records the base it was
    loaded from, and a relative path would not resolve when inference runs from another working directory."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_tokenizer(source: str | Path, revision: str | None = None, trust_remote_code: bool = False
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder or Hub id (a model's, an adapter's), with the repo's chat template: every tokenizer
    the repo saves (adapter, checkpoints, merged model) then prompts other tools (transformers' pipeline, vLLM, TGI,
    chat UIs) in the training format."""
    source = local_or_hub(str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint("tokenizer", source, e)) from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {source!r} has no EOS token; the template needs one to end answers")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Phi-2 ships no pad token; padding is masked out anyway
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _load_hint(what: str, source: str, error: Exception) -> str:
    """The one error every failed load gives: what, why, and how to work offline."""
    return (f"could not load the {what} {source!r}: {type(error).__name__}: {error}. Without network access, point "
            "at a local folder: --model.name_or_path for the base model (data/tiny-phi for the smoke run), "
            "--inference.model for a merged model, --inference.adapter for an adapter")


def load_model_config(cfg: ModelConfig):
    try:
        return AutoConfig.from_pretrained(local_or_hub(cfg.name_or_path), revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint("model", cfg.name_or_path, e)) from e


def check_context(model_config, max_length: int) -> None:
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ValueError(f"data.max_length {max_length} exceeds the model's context window of {context} tokens; "
                         f"set data.max_length <= {context}")


def fsdp_enabled() -> bool:
    """True under `accelerate launch` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def load_model(source: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu",
               bnb_config: BitsAndBytesConfig | None = None, attn_implementation: str | None = None):
    """Any model folder or Hub id, the one way every entry point loads one: the base quantized for training
    (bnb_config), a base in fp32 to merge an adapter into, or a merged model in the serving dtype. On "cuda", one
    whole copy on this process's own GPU (under FSDP accelerate then shards it: it cannot load bitsandbytes weights
    on one rank only). cfg: the revision and trust_remote_code. Safetensors only."""
    device_map = {"": PartialState().local_process_index} if device == "cuda" else {"": "cpu"}
    if attn_implementation == VARLEN:
        register_varlen_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_or_hub(str(source)), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
            quantization_config=bnb_config, attn_implementation=attn_implementation, device_map=device_map,
            use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint("model", str(source), e)) from e
    if device == "cpu" and bnb_config is not None:
        # bitsandbytes 0.50.2 repacks 4-bit CPU weights for an inference-only kernel on the first forward in eval
        # mode (a mid-training evaluation); the next training step then fails on that kernel's in-place bias add.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def readable_by_transformers_4(folder: str | Path) -> None:
    """Make a saved model folder load right in transformers 4.x as well as 5.x (tools people take the model to still
    run 4.x). transformers 5 writes Phi's rotary fraction and base only inside `rope_parameters`; 4.57 reads
    `partial_rotary_factor` from the top level and otherwise takes its default, 0.5 (Phi-2's is 0.4): silently wrong
    attention. And 5's tokenizer class name, TokenizersBackend, does not exist in 4.x; PreTrainedTokenizerFast reads
    the same tokenizer.json in both, with the same ids."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key, value in (config.get("rope_parameters") or {}).items():
        if key in ("partial_rotary_factor", "rope_theta"):
            config.setdefault(key, value)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        if settings.get("tokenizer_class") == "TokenizersBackend":
            settings["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

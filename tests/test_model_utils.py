"""model_utils.py: the device/dtype decision and its reason, attention/compile choices, loading errors."""

from __future__ import annotations

import pytest
import torch

from config import ModelConfig
from model_utils import (ModelLoadError, check_context, decide_device_dtype, load_model_config, load_tokenizer,
                         resolve_attention, resolve_compile)
from conftest import TINY


def test_cpu_is_fp32_with_reason():
    choice = decide_device_dtype("auto", cuda_available=False)
    assert (choice.device, choice.dtype) == ("cpu", torch.float32)
    assert "CPU" in choice.reason


def test_ampere_and_newer_get_bf16():
    choice = decide_device_dtype("auto", cuda_available=True, cuda_capability=(9, 0), gpu_name="NVIDIA H200")
    assert (choice.device, choice.dtype, choice.name) == ("cuda", torch.bfloat16, "bf16")
    assert "H200" in choice.reason and "bf16" in choice.reason


def test_t4_computes_in_fp32_and_says_why():
    choice = decide_device_dtype("auto", cuda_available=True, cuda_capability=(7, 5), gpu_name="Tesla T4")
    assert choice.dtype == torch.float32
    assert "fp16 overflows" in choice.reason and "T4" in choice.reason


def test_impossible_requests_raise_with_the_fix():
    with pytest.raises(ValueError, match="no native bf16.*model.dtype auto"):
        decide_device_dtype("bf16", cuda_available=True, cuda_capability=(7, 5), gpu_name="Tesla T4")
    with pytest.raises(ValueError, match="fp16 is refused"):
        decide_device_dtype("fp16", cuda_available=True, cuda_capability=(9, 0))


def test_attention_choice():
    cpu = decide_device_dtype("auto", cuda_available=False)
    gpu = decide_device_dtype("auto", cuda_available=True, cuda_capability=(9, 0))
    assert resolve_attention("auto", cpu, packing=True, compiled=False) == "sdpa"
    t4 = decide_device_dtype("auto", cuda_available=True, cuda_capability=(7, 5))
    # packed rows on a bf16 GPU: the varlen kernel, compiled or not; no packing or no bf16: sdpa
    assert resolve_attention("auto", gpu, packing=True, compiled=True) == "varlen"
    assert resolve_attention("auto", gpu, packing=True, compiled=False) == "varlen"
    assert resolve_attention("auto", gpu, packing=False, compiled=True) == "sdpa"
    assert resolve_attention("auto", t4, packing=True, compiled=False) == "sdpa"
    assert resolve_attention("flex_attention", gpu, packing=True, compiled=True) == "flex_attention"
    with pytest.raises(ValueError, match="flex_attention needs a CUDA GPU"):
        resolve_attention("flex_attention", cpu, packing=True, compiled=False)
    with pytest.raises(ValueError, match="varlen needs bf16"):
        resolve_attention("varlen", t4, packing=True, compiled=False)


def test_compile_choice():
    cpu = decide_device_dtype("auto", cuda_available=False)
    assert resolve_compile("auto", cpu) is False
    assert resolve_compile("off", cpu) is False
    assert resolve_compile("on", cpu) is True


def test_context_window_check():
    config = load_model_config(ModelConfig(name_or_path=str(TINY)))
    check_context(config, 512)
    with pytest.raises(ValueError, match="exceeds the model's context window of 512"):
        check_context(config, 1024)


def test_tokenizer_gets_a_pad_token():
    tok = load_tokenizer(TINY)
    assert tok.pad_token_id == tok.eos_token_id


def test_missing_model_says_how_to_work_offline(tmp_path):
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model_config(ModelConfig(name_or_path=str(tmp_path / "missing")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention's varlen kernel)")
def test_varlen_kernel_matches_separate_conversations_on_gpu():
    """On a GPU, varlen runs PyTorch's FlashAttention-2 kernel: a packed row of three conversations gives the loss
    and the gradients of the three run one by one (bf16: within bf16 rounding)."""
    from transformers import AutoModelForCausalLM

    from model_utils import VARLEN, register_varlen_attention
    register_varlen_attention()
    lengths = [37, 120, 64]
    ids = torch.randint(5, 500, (1, sum(lengths)), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    cu = torch.tensor([0, 37, 157, 221], dtype=torch.int32, device="cuda")

    labels = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # the next token; none after a conversation's last one
    labels[:, cu[1:].long() - 1] = -100

    def run(attn: str, packed: bool):
        model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation=attn, dtype=torch.bfloat16).cuda()
        loss = 0.0
        parts = [(0, ids.shape[1])] if packed else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        for a, b in parts:
            extra = dict(position_ids=positions, cu_seq_lens_q=cu, max_length_q=max(lengths)) if packed else {}
            logits = model(input_ids=ids[:, a:b], use_cache=False, **extra).logits.float()
            loss = loss + torch.nn.functional.cross_entropy(logits[0], labels[0, a:b], ignore_index=-100,
                                                            reduction="sum")
        loss.backward()
        return float(loss.detach()), model.model.layers[0].self_attn.q_proj.weight.grad.float()

    packed_loss, packed_grad = run(VARLEN, packed=True)
    alone_loss, alone_grad = run("sdpa", packed=False)
    assert abs(packed_loss - alone_loss) / alone_loss < 1e-2, (packed_loss, alone_loss)
    cosine = torch.nn.functional.cosine_similarity(packed_grad.flatten(), alone_grad.flatten(), dim=0)
    assert cosine > 0.99, float(cosine)

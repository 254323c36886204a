"""phi_layers.py: the fused Phi layers keep the model's memory and its ordinary saved layout."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from inference import ChatModel


def test_fused_layers_cost_no_memory_and_save_the_ordinary_model(chat_model, tmp_path):
    """The fast path fuses each layer's six products into two in place: the weights take no extra memory (a copy
    would double them), and --save-merged from a fused model writes the same model as from an unfused one."""
    def weight_bytes(model) -> int:  # every tensor the model holds: parameters, buffers, plain attributes
        held = [t for m in model.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False),
                                                    *(v for v in vars(m).values() if isinstance(v, torch.Tensor)))]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())

    fast = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True)
    assert weight_bytes(fast.model) <= 1.001 * weight_bytes(chat_model.model)  # + one summed bias per layer
    reloaded = AutoModelForCausalLM.from_pretrained(fast.save_merged(tmp_path / "merged")).state_dict()
    original = chat_model.model.state_dict()
    assert list(reloaded) == list(original) and all(torch.equal(reloaded[k], original[k]) for k in original)

"""phi_layers.py: the fused Phi layers keep the model's memory and its ordinary saved layout; the decoders' cache
writes where each decoder says."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from inference import ChatModel
from phi_layers import DecodeCache, all_layers, allocated, decode_layout, kv_buffers, kv_pairs, kv_width


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


def test_a_cache_with_rows_apart_writes_each_row_at_its_own_slot(chat_model):
    """BatchDecoder's cache (DecodeCache(rows_apart=True)): a decode step writes each row's key and value at that
    row's own newest slot of decode_layout, from the step's kv_layout or the layout placed on the cache, touches no
    other slot, and keeps transformers' shared index at the last slot (so its causal mask hides nothing)."""
    config = chat_model.model.config
    cache = allocated(DecodeCache(config, 16, rows_apart=True), chat_model.model, 3)
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    layout = decode_layout(torch.zeros(3, dtype=torch.long), torch.tensor([1, 5, 12]), 16)  # slots 0, 4 and 11
    cache.place(layout)
    for step, kwargs in enumerate([{}, {"kv_layout": layout}]):  # transformers' attention; the fused step
        keys = torch.randn(3, heads, 1, dim)
        cache.update(keys, -keys, step, **kwargs)
        layer = cache.layers[step]
        for row, slot in enumerate((0, 4, 11)):
            assert torch.equal(layer.keys[row, :, slot], keys[row, :, 0])
            assert torch.equal(layer.values[row, :, slot], -keys[row, :, 0])
        assert int((layer.keys != 0).any(-1).any(1).sum()) == 3  # those three slots, nothing else
    assert int(cache.get_seq_length()) == 15 and int(cache.layers[0].cumulative_length) == 15


def test_every_layers_slots_read_at_once_are_each_layers_cache_slots(chat_model):
    """BatchDecoder reads a prefill graph's keys and values, every layer's at once, through all_layers of the scratch
    caches' one kv_buffers tensor: what each layer's cache holds (written as a prefill writes it, keys and values)
    is what the view shows at those slots, and the view shows nothing else."""
    model, config = chat_model.model, chat_model.model.config
    buffers = kv_buffers(config, 3 * 16 * kv_width(config), model.dtype, model.device)
    cache = allocated(DecodeCache(config, 16, kv_pairs(buffers)), model, 3)
    rows, slots = torch.tensor([2, 2, 0]), torch.tensor([5, 6, 15])
    written = torch.randn(config.num_hidden_layers, 2, 3, *cache.layers[0].token_keys.shape[2:])
    for i, layer in enumerate(cache.layers):
        layer.token_keys[rows, slots], layer.token_values[rows, slots] = written[i, 0], written[i, 1]
    view = all_layers(buffers, config, 3, 16)
    assert torch.equal(view[:, :, rows, slots], written)
    view[:, :, rows, slots] = 0
    assert not buffers.any()  # nothing else was written

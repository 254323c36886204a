"""adapter_utils.py: the LoraConfig builder, the target-module check, adapter/base fit checks, pickle refusal."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

from adapter_utils import (AdapterError, build_lora_config, check_adapter_fits, check_target_modules,
                           linear_layer_names, read_adapter_config)
from config import LoraSettings
from conftest import TINY


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained(TINY)


def test_builder_gives_peft_the_adapters_asked_for(base):
    """What a user depends on: adapters on exactly the named layers of every block, scaled alpha/r, with the
    dropout asked for, and only they train."""
    cfg = build_lora_config(LoraSettings(r=8, alpha=32, dropout=0.1, target_modules=["q_proj", "fc2"]))
    assert isinstance(cfg, LoraConfig) and cfg.task_type == "CAUSAL_LM"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), cfg)
    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {f"model.layers.{i}.{sub}" for i in range(2) for sub in ("self_attn.q_proj", "mlp.fc2")}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 32 / 8 and layer.r["default"] == 8
    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout) and layer.lora_dropout["default"].p == 0.1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():  # B starts at zero: the adapted model starts as the base model
        ids = torch.tensor([[1, 5, 9, 13]])
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_old_phi_names_fail_listing_the_real_layers(base):
    assert linear_layer_names(base) == ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]
    check_target_modules(base, ["q_proj", "fc1"])
    with pytest.raises(AdapterError, match=r"\['Wqkv', 'out_proj'\].*dense, fc1, fc2, k_proj, q_proj, v_proj"):
        check_target_modules(base, ["Wqkv", "out_proj", "fc1"])


def save_adapter(model, path, r=4):
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "fc1"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(path)
    return json.loads((path / "adapter_config.json").read_text())


def test_adapter_for_another_base_fails_naming_both(tmp_path):
    other = PhiForCausalLM(PhiConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128))
    adapter = tmp_path / "adapter"
    cfg = save_adapter(other, adapter)
    cfg["base_model_name_or_path"] = "someone/other-model"  # what an adapter trained on another base records
    base = AutoModelForCausalLM.from_pretrained(TINY)
    with pytest.raises(AdapterError, match="trained on 'someone/other-model'.*tiny-phi"):
        check_adapter_fits(adapter, str(TINY), base, cfg)
    cfg["base_model_name_or_path"] = str(TINY)  # same name, wrong shapes
    with pytest.raises(AdapterError, match="64 features in the adapter but 128 in the base"):
        check_adapter_fits(adapter, str(TINY), base, cfg)


def test_matching_adapter_passes(tmp_path):
    base = AutoModelForCausalLM.from_pretrained(TINY)
    adapter = tmp_path / "adapter"
    cfg = save_adapter(base, adapter)
    check_adapter_fits(adapter, str(TINY), AutoModelForCausalLM.from_pretrained(TINY), cfg)
    check_adapter_fits(adapter, "/elsewhere/tiny-phi", AutoModelForCausalLM.from_pretrained(TINY), cfg)


def test_missing_unsafe_and_incomplete_adapters(tmp_path):
    with pytest.raises(AdapterError, match="python train.py"):
        read_adapter_config(tmp_path / "none")
    folder = tmp_path / "a"
    folder.mkdir()
    with pytest.raises(AdapterError, match="not a peft adapter folder"):
        read_adapter_config(folder)
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="not saved completely"):
        read_adapter_config(folder)
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle.*--allow-pickle"):
        read_adapter_config(folder)
    assert read_adapter_config(folder, allow_pickle=True) == {}
